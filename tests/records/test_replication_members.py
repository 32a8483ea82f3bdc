"""Real members through a real redis-server, the hostile cases: a revoked
member's later changes refused everywhere, Redis killed and restarted with
its data lost while a member keeps writing, a member whose position was
trimmed from the log, and EXPIRED raised once on every member.  Waits are
``Group.sync`` or events, always under a deadline."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from groupsrig import GROUP, make_group
from redisserver import RedisServer

from cachefs.records import (
    ChangeType,
    Group,
    GroupNotReady,
    Record,
    RecordNotFound,
    Role,
    open_group,
)

TYPE = uuid.UUID("44444444-4444-4444-8444-444444444444")
SYNC = 30.0  # seconds: a deadline, never a measure


def soon(hours: float = 1.0) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


@asynccontextmanager
async def members(*dirs: Path, **options: object) -> AsyncIterator[list[Group]]:
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(open_group(GROUP, groups_dir=d, **options))  # type: ignore[arg-type]
            for d in dirs
        ]


async def synced(*groups: Group) -> None:
    for group in [*groups, *groups]:
        assert await group.sync(SYNC), await group.statistics()


async def test_a_revoked_member_is_refused_everywhere(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    admin_dir, m1_dir, m2_dir = make_group(
        tmp_path, (Role.MEMBER, Role.MEMBER), engine=redis_server.url
    )
    async with members(admin_dir, m1_dir, m2_dir) as (admin, m1, m2):
        before = await m2.records.add(Record(type=TYPE, expires=soon(), data=b"before"))
        await synced(admin, m1, m2)
    # m2, cut off from the engine, does not learn it was revoked and writes on
    async with members(admin_dir) as (admin,):
        await admin.revoke(m2.identity.member_id)
        assert await admin.sync(SYNC)
    async with members(m2_dir, replicate=False) as (m2,):
        after = await m2.records.add(Record(type=TYPE, expires=soon(), data=b"after"))
        held = await m2.records.get(before)
        await m2.records.update(replace(held, data=b"changed after"))
    async with members(admin_dir, m1_dir, m2_dir) as (admin, m1, m2):
        await synced(m2, admin, m1)
        for g in (admin, m1):
            with pytest.raises(RecordNotFound):
                await g.records.get(after)
            assert (await g.records.get(before)).data == b"before"
            assert (await g.statistics()).store.rejected >= 2
        # and m2 now knows: it may not write any more
        with pytest.raises(GroupNotReady):
            await m2.records.add(Record(type=TYPE, expires=soon()))
        revoked = {c.member_id for c, gone in admin.members() if gone}
        assert revoked == {m2.identity.member_id}


async def test_redis_killed_and_restarted_empty_loses_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a_dir, b_dir = make_group(tmp_path, (Role.MEMBER,), engine=redis_server.url)
    async with members(a_dir, b_dir) as (a, b):
        first = await a.records.add(Record(type=TYPE, expires=soon(), data=b"first"))
        await synced(a, b)
        redis_server.kill()  # no persistence: everything it held is gone
        offline = [
            await a.records.add(Record(type=TYPE, expires=soon(), data=b"offline %d" % i))
            for i in range(20)
        ]
        assert not await a.sync(0.5)  # unreachable: a says so, within its deadline
        assert (await a.statistics()).outbox == 20
        redis_server.start()
        await synced(a, b)
        for rid in [first, *offline]:
            assert (await b.records.get(rid)).data == (await a.records.get(rid)).data
        assert (await a.statistics()).outbox == 0
    # a member that joins the engine afresh later gets everything from its state
    async with members(b_dir) as (b,):
        assert len([r async for r in b.records.enum()]) == 21


async def test_a_member_trimmed_out_of_the_log_resyncs(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a_dir, b_dir = make_group(tmp_path, (Role.MEMBER,), engine=redis_server.url, stream_maxlen=50)
    async with members(a_dir, b_dir) as (a, b):
        await synced(a, b)
    async with members(a_dir) as (a,):
        ids = [await a.records.add(Record(type=TYPE, expires=soon())) for _ in range(400)]
        gone = ids[:100]
        for rid in gone:
            await a.records.delete(rid)
        assert await a.sync(SYNC)
    async with members(b_dir) as (b,):
        assert await b.sync(SYNC)
        assert {r.id async for r in b.records.enum()} == set(ids[100:])
        stats = await b.statistics()
        assert stats.replication is not None and stats.replication.resyncs >= 1


async def test_expired_is_raised_once_on_every_member(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    dirs = make_group(tmp_path, (Role.MEMBER, Role.MEMBER), engine=redis_server.url)
    async with members(*dirs) as groups:
        async with AsyncExitStack() as stack:
            watchers = [await stack.enter_async_context(g.records.events()) for g in groups]
            # long enough for the add to reach everyone first on a loaded machine
            expires = datetime.now(UTC) + timedelta(seconds=5)
            rid = await groups[1].records.add(Record(type=TYPE, expires=expires))
            await synced(*groups)
            for watcher in watchers:
                with trio.fail_after(SYNC):
                    seen = [await watcher.__anext__(), await watcher.__anext__()]
                assert [(e.change, e.record_id) for e in seen] == [
                    (ChangeType.ADDED, rid),
                    (ChangeType.EXPIRED, rid),
                ]
        for g in groups:
            with pytest.raises(RecordNotFound):
                await g.records.get(rid)
            assert g.records.statistics().expired == 1


async def test_a_forged_state_entry_cannot_hide_a_record(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a_dir, b_dir, late_dir = make_group(
        tmp_path, (Role.MEMBER, Role.MEMBER), engine=redis_server.url
    )
    async with members(a_dir, b_dir) as (a, b):
        rid = await a.records.add(Record(type=TYPE, expires=soon(), data=b"v1"))
        await synced(a, b)
        # whoever can write to Redis claims a far later version of the record
        prefix = f"cachefs:{a.group_id}"
        async with redis_server.client() as redis:
            await redis.hset(f"{prefix}:order", {str(rid): "9" * 40})
            await redis.hset(f"{prefix}:state", {str(rid): b"\x00\x00\x00\x03bad"})
        held = await a.records.get(rid)
        await a.records.update(replace(held, data=b"v2"))
        await synced(a, b)
        # the log carried v2 to b; the state holds v2 again for whoever resyncs
        assert (await b.records.get(rid)).data == b"v2"
    async with members(late_dir) as (late,):  # never connected: reads the state
        assert await late.sync(SYNC)
        assert (await late.records.get(rid)).data == b"v2"
        assert (await late.statistics()).store.rejected == 0
