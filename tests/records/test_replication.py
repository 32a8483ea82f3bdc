"""Group records replicated between real members (three groups directories,
as on three machines) through a real redis-server: changes reach every
member, an offline member catches up, tampered entries are rejected by every
member, concurrent updates converge.  Synchronisation is ``Group.sync``
(publish, then read until caught up), always with a deadline."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from groupsrig import GROUP, identity, make_group
from redisserver import RedisServer

from cachefs.records import ChangeType, Group, Record, RecordNotFound, Role, open_group
from cachefs.records.model import decode_record, encode_record

TYPE = uuid.UUID("33333333-3333-4333-8333-333333333333")
SYNC = 30.0  # seconds: a deadline, never a measure


@pytest.fixture
def dirs(tmp_path: Path, redis_server: RedisServer) -> list[Path]:
    """An administrator and two members, each with its own groups directory."""
    return make_group(tmp_path, (Role.MEMBER, Role.MEMBER), engine=redis_server.url)


@asynccontextmanager
async def members(*dirs: Path) -> AsyncIterator[list[Group]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_group(GROUP, groups_dir=d)) for d in dirs]


async def synced(*groups: Group) -> None:
    """Each publishes, then each reads: afterwards all have seen all."""
    for group in [*groups, *groups]:
        assert await group.sync(SYNC), await group.statistics()


async def held(group: Group) -> dict[uuid.UUID, tuple[int, str, bytes, bytes]]:
    async with group.records.enum() as records:
        return {r.id: (r.version, r.modified_by, r.data, r.signature) async for r in records}  # type: ignore[misc]


def version_offset(group_id: str) -> int:
    """Where the low byte of the version is in a record's canonical encoding."""
    probe = Record(type=TYPE, expires=soon(), id=uuid.UUID(int=0), version=0x0123456789ABCDEF)
    probe = replace(probe, created=probe.expires, modified=probe.expires)
    return encode_record(group_id, probe).index(bytes.fromhex("0123456789abcdef")) + 7


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


async def test_changes_reach_every_member(dirs: list[Path]) -> None:
    async with members(*dirs) as (admin, m1, m2):
        async with m2.records.events() as events:
            ids = [
                await g.records.add(Record(type=TYPE, expires=soon(), data=g.name.encode()))
                for g in (admin, m1, m2)
            ]
            await synced(admin, m1, m2)
            mine = await m1.records.get(ids[1])
            await admin.records.update(replace(mine, data=b"the admin may"))
            await m2.records.delete(ids[2])
            await synced(admin, m1, m2)
            seen = []
            with trio.fail_after(SYNC):
                async for event in events:
                    seen.append((event.change, event.record_id))
                    if len(seen) == 5:
                        break
        everyone = [await held(g) for g in (admin, m1, m2)]
        assert everyone[0] == everyone[1] == everyone[2] and len(everyone[0]) == 2
        assert everyone[2][ids[1]][2] == b"the admin may"
        for g in (admin, m1, m2):
            with pytest.raises(RecordNotFound):
                await g.records.get(ids[2])
        # m2 saw the others' adds, its own add and delete, the admin's update
        assert sorted(seen) == sorted(
            [
                (ChangeType.ADDED, ids[0]),
                (ChangeType.ADDED, ids[1]),
                (ChangeType.ADDED, ids[2]),
                (ChangeType.UPDATED, ids[1]),
                (ChangeType.DELETED, ids[2]),
            ]
        )
        for g in (admin, m1, m2):
            stats = await g.statistics()
            assert stats.outbox == 0 and stats.replication is not None
            assert stats.replication.rejected == 0 and stats.store.rejected == 0


async def test_an_offline_member_catches_up_on_1000_changes(dirs: list[Path]) -> None:
    async with members(*dirs) as groups:
        await synced(*groups)
    async with members(dirs[0]) as (admin,):  # the members are offline
        ids = [
            await admin.records.add(Record(type=TYPE, expires=soon(), data=b"%d" % i))
            for i in range(600)
        ]
        for rid in ids[:400]:
            record = await admin.records.get(rid)
            await admin.records.update(replace(record, data=b"v2"))
        await synced(admin)
        expected = await held(admin)
    async with members(dirs[2]) as (m2,):
        await synced(m2)
        assert await held(m2) == expected and len(expected) == 600
        stats = await m2.statistics()
        assert stats.replication is not None
        assert stats.replication.resyncs == 0  # followed the log from its position
        assert stats.replication.applied == 1000


async def test_a_tampered_entry_is_rejected_by_every_member(
    dirs: list[Path], redis_server: RedisServer
) -> None:
    async with members(*dirs) as groups:
        admin, m1, m2 = groups
        rid = await m1.records.add(Record(type=TYPE, expires=soon(), data=b"genuine"))
        await synced(*groups)
        log_key = f"cachefs:{admin.group_id}:log"
        async with redis_server.client() as client:
            entries = await client.xrange(log_key)
            real = next(e.field_values for e in entries if e.field_values[b"kind"] == b"rec")
            _, record = decode_record(real[b"body"])
            # one bit of the version (1 -> 3): it would win, if its signature held
            tampered = bytearray(real[b"body"])
            tampered[version_offset(admin.group_id)] ^= 0x02
            assert decode_record(bytes(tampered))[1].version == 3
            # and a record signed by someone the group never heard of
            stranger = identity(dirs[0].parent / "stranger")
            forged = replace(record, version=9, data=b"forged", modified_by=stranger.member_id)
            forged_body = encode_record(admin.group_id, forged)
            for fields in (
                {b"kind": b"rec", b"body": bytes(tampered), b"sig": real[b"sig"]},
                {b"kind": b"rec", b"body": forged_body, b"sig": stranger.sign(forged_body)},
            ):
                await client.xadd(log_key, fields)  # type: ignore[arg-type]
        await synced(*groups)
        for g in groups:
            assert (await g.records.get(rid)).data == b"genuine"
            stats = await g.statistics()
            assert stats.replication is not None and stats.replication.rejected == 2


async def test_concurrent_updates_converge(dirs: list[Path]) -> None:
    async with members(*dirs) as groups:
        rid = await groups[1].records.add(Record(type=TYPE, expires=soon(), data=b"v1"))
        await synced(*groups)
    # the admin and the creator both update version 1, neither seeing the other's
    for d, data in ((dirs[0], b"admin's"), (dirs[1], b"creator's")):
        async with open_group(GROUP, groups_dir=d, replicate=False) as g:
            record = await g.records.get(rid)
            await g.records.update(replace(record, data=data))
    async with members(*dirs) as groups:
        await synced(*groups)
        winners = [await g.records.get(rid) for g in groups]
    assert winners[0] == winners[1] == winners[2]
    assert winners[0].version == 2 and winners[0].data in (b"admin's", b"creator's")
