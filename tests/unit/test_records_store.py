"""The record store of one member, without an engine: each operation, each
error name, the role rules, expiry and AUTOREFRESH on trio's mock clock
(jumped explicitly; it also runs at real speed, so deadlines hold)."""

from __future__ import annotations

import dataclasses
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
import trio.testing
from groupsrig import GROUP, make_group

from cachefs.records import (
    ChangeType,
    GroupNotReady,
    InvalidAttributes,
    InvalidRecord,
    InvalidRecordExpiration,
    InvalidSearch,
    MaxRecordSizeExceeded,
    NotAuthorized,
    Record,
    RecordFlags,
    RecordNotFound,
    Role,
    open_group,
)
from cachefs.records.clock import TrioClock
from cachefs.records.model import NODE_STATUS_TYPE, RecordEvent

T1 = uuid.UUID("11111111-1111-4111-8111-111111111111")
T2 = uuid.UUID("22222222-2222-4222-8222-222222222222")
ATTRS = (
    '<attributes><attribute name="size" type="int">5</attribute>'
    '<attribute name="owner" type="string">ann</attribute></attributes>'
)


@pytest.fixture
def clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    mock_clock.rate = 1.0
    return mock_clock


@pytest.fixture
def dirs(tmp_path: Path) -> list[Path]:
    return make_group(tmp_path, (Role.MEMBER, Role.MEMBER))


def soon(hours: float = 1.0) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


def opened(d: Path, **kw):  # type: ignore[no-untyped-def]
    return open_group(GROUP, groups_dir=d, replicate=False, clock=TrioClock(), **kw)


async def test_add_get_update_delete(dirs: list[Path], clock: trio.testing.MockClock) -> None:
    async with opened(dirs[1]) as group:
        me = group.identity.member_id
        draft = Record(
            type=T1,
            expires=soon(),
            attributes=ATTRS,
            data=b"\x00payload",
            # store-owned fields: ignored on add
            id=uuid.UUID(int=7),
            version=99,
            creator="someone",
            modified_by="someone",
            created=datetime(2000, 1, 1, tzinfo=UTC),
            signature=b"forged",
            flags=RecordFlags.DELETED,
        )
        rid = await group.records.add(draft)
        assert rid != uuid.UUID(int=7)
        got = await group.records.get(rid)
        assert (got.type, got.data, got.version, got.creator, got.modified_by) == (
            T1,
            b"\x00payload",
            1,
            me,
            me,
        )
        assert got.created is not None and got.created.year > 2000
        assert not got.deleted and got.signature != b"forged" and len(got.signature) == 64

        later = got.expires + timedelta(hours=1)
        new = await group.records.update(
            dataclasses.replace(got, data=b"v2", expires=later, attributes="")
        )
        assert (new.version, new.data, new.expires, new.attributes) == (2, b"v2", later, "")
        assert (await group.records.get(rid)).data == b"v2"

        await group.records.delete(rid)
        with pytest.raises(RecordNotFound, match="RECORD_NOT_FOUND"):
            await group.records.get(rid)
        with pytest.raises(RecordNotFound):
            await group.records.delete(rid)
        with pytest.raises(RecordNotFound):
            await group.records.update(new)
        assert [r async for r in group.records.enum()] == []


async def test_update_may_change_only_attributes_expires_data(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[1]) as group:
        rid = await group.records.add(Record(type=T1, expires=soon()))
        got = await group.records.get(rid)
        for change in (
            {"type": T2},
            {"flags": RecordFlags.AUTOREFRESH},
            {"creator": "mzzz"},
            {"created": datetime(2020, 1, 1, tzinfo=UTC)},
        ):
            with pytest.raises(InvalidRecord, match="INVALID_RECORD"):
                await group.records.update(dataclasses.replace(got, **change))
        with pytest.raises(InvalidRecordExpiration, match="lower"):
            await group.records.update(
                dataclasses.replace(got, expires=got.expires - timedelta(seconds=1))
            )
        with pytest.raises(InvalidRecord):
            await group.records.update(dataclasses.replace(got, id=None))
        assert (await group.records.get(rid)).version == 1


async def test_expiration_rules(dirs: list[Path], clock: trio.testing.MockClock) -> None:
    async with opened(dirs[1]) as group:
        for bad in (
            datetime.now(UTC) - timedelta(seconds=1),
            datetime(2000, 1, 1, tzinfo=UTC),
            soon(24 * 365),  # past the member's credentials (30 days)
        ):
            with pytest.raises(InvalidRecordExpiration, match="INVALID_RECORD_EXPIRATION"):
                await group.records.add(Record(type=T1, expires=bad))
        with pytest.raises(InvalidRecordExpiration, match="time zone"):
            await group.records.add(Record(type=T1, expires=datetime(2999, 1, 1)))


async def test_roles(dirs: list[Path], clock: trio.testing.MockClock) -> None:
    # each member writes one record; the database is local, so pass them by hand
    admin_dir, m1_dir, m2_dir = dirs
    async with opened(admin_dir) as admin, opened(m1_dir) as m1, opened(m2_dir) as m2:
        a_id = await admin.records.add(Record(type=T1, expires=soon(), data=b"admin"))
        m1_id = await m1.records.add(Record(type=T1, expires=soon(), data=b"m1"))
        await copy_record(admin, m2, a_id)
        await copy_record(m1, m2, m1_id)
        await copy_record(m1, admin, m1_id)
        # a member may not change an administrator's record, nor another member's
        for rid in (a_id, m1_id):
            held = await m2.records.get(rid)
            with pytest.raises(NotAuthorized, match="NOT_AUTHORIZED"):
                await m2.records.update(dataclasses.replace(held, data=b"hijack"))
            with pytest.raises(NotAuthorized):
                await m2.records.delete(rid)
            assert (await m2.records.get(rid)).data == held.data
        # an administrator may change anyone's
        held = await admin.records.get(m1_id)
        new = await admin.records.update(dataclasses.replace(held, data=b"by admin"))
        assert (new.creator, new.modified_by) == (m1.identity.member_id, admin.identity.member_id)
        await admin.records.delete(m1_id)


async def copy_record(src, dst, rid: uuid.UUID) -> None:  # type: ignore[no-untyped-def]
    from cachefs.records.model import ApplyResult, encode_record

    for cred in src.records.trust.credentials():  # what an engine would carry too
        await dst.records.arrivals.apply_credential(cred.to_bytes())
    record = await src.records.get(rid)
    body = encode_record(src.group_id, dataclasses.replace(record, signature=b""))
    assert await dst.records.arrivals.apply_remote(body, record.signature) is ApplyResult.APPLIED


async def test_reserved_types_and_attribute_names(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[0]) as group:
        with pytest.raises(NotAuthorized, match="reserved"):
            await group.records.add(Record(type=NODE_STATUS_TYPE, expires=soon()))
        await group.records.add(Record(type=NODE_STATUS_TYPE, expires=soon()), internal=True)
        for name in ("peerrecordid", "peercreatorid", "PeerRecordType", "bad-name", "a b"):
            xml = f'<attributes><attribute name="{name}" type="string">x</attribute></attributes>'
            with pytest.raises(InvalidAttributes, match="INVALID_ATTRIBUTES"):
                await group.records.add(Record(type=T1, expires=soon(), attributes=xml))
        for xml in ("<attributes>", "<attrs/>", ATTRS.replace(">5<", ">five<")):
            with pytest.raises(InvalidAttributes):
                await group.records.add(Record(type=T1, expires=soon(), attributes=xml))
        with pytest.raises(InvalidRecord, match="type"):
            await group.records.add(Record(type="not a uuid", expires=soon()))  # type: ignore[arg-type]


async def test_max_record_size(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    (d,) = make_group(tmp_path, (), max_record_size=4096)
    async with opened(d) as group:
        await group.records.add(Record(type=T1, expires=soon(), data=b"x" * 3000))
        with pytest.raises(MaxRecordSizeExceeded, match="MAX_RECORD_SIZE_EXCEEDED.*4096"):
            await group.records.add(Record(type=T1, expires=soon(), data=b"x" * 4096))
        assert (await group.records.count()) == (1, 0)


async def test_enum_by_type_and_closed_early(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[0]) as group:
        ones = {await group.records.add(Record(type=T1, expires=soon())) for _ in range(600)}
        twos = {await group.records.add(Record(type=T2, expires=soon())) for _ in range(3)}
        assert {r.id async for r in group.records.enum(T1)} == ones
        assert {r.id async for r in group.records.enum(T2)} == twos
        assert len([r async for r in group.records.enum()]) == 603
        seen = 0
        async with group.records.enum() as records:
            async for _ in records:
                seen += 1
                if seen == 10:
                    break
        assert seen == 10


async def test_search(dirs: list[Path], clock: trio.testing.MockClock) -> None:
    async with opened(dirs[0]) as group:
        rid = await group.records.add(Record(type=T1, expires=soon(), attributes=ATTRS))
        await group.records.add(Record(type=T1, expires=soon()))
        q = (
            '<peersearch><and><clause attrib="size" type="int" compare="greater">4</clause>'
            '<clause attrib="OWNER" type="string">A*</clause></and></peersearch>'
        )
        assert [r.id for r in await group.records.search(q)] == [rid]
        me = group.identity.member_id
        q = f'<peersearch><clause attrib="peercreatorid" type="string">{me}</clause></peersearch>'
        assert len(await group.records.search(q)) == 2
        with pytest.raises(InvalidSearch, match="INVALID_SEARCH"):
            await group.records.search("<peersearch/>")
        await group.records.delete(rid)
        assert await group.records.search(q.replace(me, "*")) != []
        q = '<peersearch><clause attrib="size" type="int">5</clause></peersearch>'
        assert await group.records.search(q) == []


async def test_events_and_expiry(dirs: list[Path], clock: trio.testing.MockClock) -> None:
    async with (
        opened(dirs[0]) as group,
        group.records.events() as every,
        group.records.events([T2]) as twos,
    ):
        rid = await group.records.add(Record(type=T1, expires=soon(1)))
        r2 = await group.records.add(Record(type=T2, expires=soon(2)))
        held = await group.records.get(rid)
        await group.records.update(dataclasses.replace(held, data=b"x"))
        await group.records.delete(r2)
        got = [await every.__anext__() for _ in range(4)]
        assert [(e.change, e.record_id) for e in got] == [
            (ChangeType.ADDED, rid),
            (ChangeType.ADDED, r2),
            (ChangeType.UPDATED, rid),
            (ChangeType.DELETED, r2),
        ]
        assert [(e.change, e.record_id) for e in [await twos.__anext__() for _ in range(2)]] == [
            (ChangeType.ADDED, r2),
            (ChangeType.DELETED, r2),
        ]
        clock.jump(3600 + 1)
        with trio.fail_after(10):
            event = await every.__anext__()
        assert (event.change, event.record_id, event.record_type) == (
            ChangeType.EXPIRED,
            rid,
            T1,
        )
        with pytest.raises(RecordNotFound):
            await group.records.get(rid)
        assert [r async for r in group.records.enum()] == []
        assert group.records.statistics().expired == 1
        # EXPIRED once: nothing more comes
        with trio.move_on_after(0.2):
            extra = await every.__anext__()
            pytest.fail(f"a second event: {extra}")


async def test_autorefresh_while_the_creator_runs(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[1]) as group:
        rid = await group.records.add(
            Record(type=T1, expires=soon(1), flags=RecordFlags.AUTOREFRESH)
        )
        first = await group.records.get(rid)
        async with group.records.events() as events:
            clock.jump(45 * 60)  # into the last third of its hour
            with trio.fail_after(10):
                event = await events.__anext__()
            assert (event.change, event.record_id) == (ChangeType.UPDATED, rid)
        refreshed = await group.records.get(rid)
        assert refreshed.version == 2 and refreshed.expires > first.expires
        assert refreshed.autorefresh
        async with opened(dirs[0]) as other:  # another member holds it too
            await copy_record(group, other, rid)
    # the creator stopped: no one refreshes it, and it expires on the other member
    async with opened(dirs[0]) as other, other.records.events() as events:
        assert (await other.records.get(rid)).version == 2
        clock.jump(2 * 3600)
        with trio.fail_after(10):
            event = await events.__anext__()
        assert (event.change, event.record_id) == (ChangeType.EXPIRED, rid)
        with pytest.raises(RecordNotFound):
            await other.records.get(rid)


async def test_group_not_ready_once_credentials_expire(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    dirs = make_group(tmp_path, (Role.MEMBER,), credential_lifetime=timedelta(hours=2))
    async with opened(dirs[1]) as group:
        await group.records.add(Record(type=T1, expires=soon(1)))
        clock.jump(3 * 3600)
        with pytest.raises(GroupNotReady, match="GROUP_NOT_READY"):
            await group.records.add(Record(type=T1, expires=soon(4)))


async def test_a_tampered_database_row_is_refused(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[0]) as group:
        rid = await group.records.add(Record(type=T1, expires=soon(), data=b"genuine"))
    db = sqlite3.connect(dirs[0] / "groups" / GROUP / "records.db")
    db.execute("UPDATE records SET data = ? WHERE id = ?", (b"forged!", str(rid)))
    db.commit()
    db.close()
    async with opened(dirs[0]) as group:
        with pytest.raises(RecordNotFound):
            await group.records.get(rid)
        assert group.records.statistics().rejected == 1
        assert [r async for r in group.records.enum()] == []


async def test_searches_use_the_index(dirs: list[Path], clock: trio.testing.MockClock) -> None:
    from cachefs.records.search import compile_query, parse_search

    async with opened(dirs[0]) as group:
        for i in range(50):
            attrs = f'<attributes><attribute name="n" type="int">{i}</attribute></attributes>'
            await group.records.add(Record(type=T1, expires=soon(), attributes=attrs))
        q = '<peersearch><clause attrib="n" type="int" compare="less">3</clause></peersearch>'
        assert len(await group.records.search(q)) == 3
        sql, params = compile_query(parse_search(q))
        plan = group.database.explain(sql, params, 0)
        assert not any(step.startswith("SCAN") for step in plan), plan


async def test_an_error_leaves_open_group_as_itself(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    with pytest.raises(RecordNotFound):
        async with opened(dirs[0]) as group:
            await group.records.get(uuid.uuid4())


async def test_an_update_of_a_version_read_before_a_change_is_refused(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[0]) as group:
        rid = await group.records.add(Record(type=T1, expires=soon(), data=b"v1"))
        read = await group.records.get(rid)
        await group.records.update(dataclasses.replace(read, data=b"v2"))
        with pytest.raises(InvalidRecord, match="changed since it was read"):
            await group.records.update(dataclasses.replace(read, data=b"lost v2"))
        assert (await group.records.get(rid)).data == b"v2"


async def test_reserved_types_cannot_be_changed_by_applications(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[0]) as group:
        rid = await group.records.add(Record(type=NODE_STATUS_TYPE, expires=soon()), internal=True)
        held = await group.records.get(rid)
        with pytest.raises(NotAuthorized, match="reserved"):
            await group.records.update(dataclasses.replace(held, data=b"x"))
        with pytest.raises(NotAuthorized, match="reserved"):
            await group.records.delete(rid)
        await group.records.update(dataclasses.replace(held, data=b"x"), internal=True)
        await group.records.delete(rid, internal=True)


async def test_an_offline_outbox_holds_each_record_once(
    dirs: list[Path], clock: trio.testing.MockClock
) -> None:
    async with opened(dirs[1]) as group:
        before = (await group.statistics()).outbox  # the member's credentials
        rid = await group.records.add(Record(type=T1, expires=soon(), data=b"0"))
        for i in range(1, 50):
            held = await group.records.get(rid)
            await group.records.update(dataclasses.replace(held, data=b"%d" % i))
        other = await group.records.add(Record(type=T1, expires=soon()))
        await group.records.delete(other)
        assert (await group.statistics()).outbox == before + 2


async def test_a_watcher_too_far_behind_is_told_it_lost_events() -> None:
    from cachefs.records import GroupError
    from cachefs.records.events import EventHub, EventSubscription

    hub = EventHub()
    async with EventSubscription(hub, None, buffer=2) as events:
        for i in range(3):
            hub.publish(RecordEvent(ChangeType.ADDED, uuid.UUID(int=i), T1))
        assert [(await events.__anext__()).record_id for _ in range(2)] == [
            uuid.UUID(int=0),
            uuid.UUID(int=1),
        ]
        with pytest.raises(GroupError, match="events were lost"):
            await events.__anext__()
    assert hub.overflows == 1 and hub.watchers == 0
