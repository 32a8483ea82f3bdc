"""A mount's part in its group, with real members over one Redis and a cache
stand-in: whose content records are taken, version records making other
members ask their source again, group pins and node status records."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from enginerig import Bare
from groupsrig import GROUP, make_group
from redisserver import RedisServer

from backends.memory import MemoryBackend
from cachefs.contract import ContentInfo, FileAttrs, FileKind, ReadData, RWEvent
from cachefs.errors import NotFound, PinLimitExceeded
from cachefs.group import member as member_module
from cachefs.group.content import ContentRecords
from cachefs.group.formats import (
    NODE_STATUS_TYPE,
    content_record,
    decode_status,
    pin_record,
)
from cachefs.group.hosted import HostedCache, block_name
from cachefs.group.member import Described, Member
from cachefs.group.options import MemberOptions
from cachefs.group.shared import SharedBackend
from cachefs.records import ChangeType, Group, Role, open_group

pytestmark = pytest.mark.records

BS = 1 << 20
DEADLINE = 20


def attrs(version: str, size: int = 3 * BS) -> FileAttrs:
    return FileAttrs(kind=FileKind.FILE, size=size, mtime=0.0, version=version)


class Cache:
    """What a Member sees of a cache (cachefs.group.ports.CacheView)."""

    def __init__(self, source: dict[str, FileAttrs]) -> None:
        self.source = source  # what the origin says now
        self.held: dict[str, FileAttrs] = {}
        self.revalidated: list[str] = []
        self.pins: list[str] = []
        self.unpins: list[str] = []
        self.changed = trio.Event()
        self.whole: dict[str, ContentInfo] = {}  # what the cache holds whole

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def known_attrs(self, file_id: str) -> FileAttrs | None:
        return self.held.get(file_id)

    async def revalidate(self, file_id: str) -> FileAttrs:
        self.revalidated.append(file_id)
        self._note()
        if file_id not in self.source:
            self.held.pop(file_id, None)
            raise NotFound(f"{file_id}: no such file")
        self.held[file_id] = self.source[file_id]
        return self.held[file_id]

    async def pin(self, file_id: str) -> None:
        self.pins.append(file_id)
        self._note()

    async def unpin(self, file_id: str) -> bool:
        self.unpins.append(file_id)
        self._note()
        return True

    def pinned(self) -> list[str]:
        return sorted(set(self.pins) - set(self.unpins))

    def cached_bytes_of(self, file_id: str) -> int:
        return 0

    def content_of(self, file_id: str) -> ContentInfo | None:
        return self.whole.get(file_id)

    def statistics(self) -> dict[str, Any]:
        return {"cached_bytes": 5, "cache_limit": 10, "hit_bytes": 7, "bytes_from_backend": 9}


async def until(cache: Cache, check: Any) -> None:
    with trio.fail_after(DEADLINE):
        while not check():
            await cache.changed.wait()


@pytest.fixture
def dirs(tmp_path: Path, redis_server: RedisServer) -> list[Path]:
    return make_group(tmp_path, (Role.MEMBER, Role.MEMBER), engine=redis_server.url)


@asynccontextmanager
async def member(
    groups_dir: Path, cache: Cache, tmp_path: Path, **options: Any
) -> AsyncIterator[tuple[Member, list[str]]]:
    """A Member serving *cache*; yields it and the file ids it told the kernel to forget."""
    forgotten: list[str] = []
    async with open_group(GROUP, groups_dir=groups_dir) as group:
        content = ContentRecords(group, options.pop("trust", "members"), BS)
        opts = MemberOptions(GROUP, groups_dir, **options)
        m = Member(group, opts, content, None, MemoryBackend())
        cache_dir = tmp_path / f"cache-{groups_dir.name}"
        cache_dir.mkdir(exist_ok=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                m.serve, cache, cache_dir, forgotten.append, Described("/mnt", "s3://b", "t")
            )
            yield m, forgotten
            nursery.cancel_scope.cancel()


def info_for(version: str) -> ContentInfo:
    return ContentInfo.of_bytes(b"x" * (3 * BS), version, BS)


async def add_content(group: Group, file_id: str, info: ContentInfo) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    await group.records.add(content_record(file_id, info, expires), internal=True)
    assert await group.sync(10)


@pytest.mark.parametrize(("trust", "taken"), [("members", True), ("admins", False)])
async def test_a_members_content_record_is_taken_as_the_mount_says(
    dirs: list[Path], trust: str, taken: bool
) -> None:
    info = info_for("v1")
    async with open_group(GROUP, groups_dir=dirs[1]) as m1:
        await add_content(m1, "data/f", info)
    async with open_group(GROUP, groups_dir=dirs[2]) as m2:
        assert await m2.sync(10)
        records = ContentRecords(m2, trust, BS)
        got = await records.lookup("data/f", "v1", 3 * BS)
        assert (got == info) is taken
        assert records.counters.rejected_records == (0 if taken else 1)
        # another version, another size, another file whose name differs in case: none
        assert await records.lookup("data/f", "v2", 3 * BS) is None
        assert await records.lookup("data/f", "v1", 3 * BS + 1) is None
        assert await records.lookup("data/F", "v1", 3 * BS) is None


async def test_an_administrators_record_is_taken_by_admins_only_mounts(dirs: list[Path]) -> None:
    info = info_for("v1")
    async with open_group(GROUP, groups_dir=dirs[0]) as admin:
        await add_content(admin, "f", info)
    async with open_group(GROUP, groups_dir=dirs[2]) as m2:
        assert await m2.sync(10)
        assert await ContentRecords(m2, "admins", BS).lookup("f", "v1", None) == info


async def test_a_record_whose_key_names_another_version_is_refused(dirs: list[Path]) -> None:
    good = info_for("v1")
    async with open_group(GROUP, groups_dir=dirs[1]) as m1:
        record = content_record("f", good, datetime.now(UTC) + timedelta(hours=1))
        lying = content_record("f", info_for("v2"), record.expires)
        # the search key of v1, the information of v2
        forged = dataclasses.replace(lying, attributes=record.attributes)
        await m1.records.add(forged, internal=True)
        assert await m1.sync(10)
    async with open_group(GROUP, groups_dir=dirs[2]) as m2:
        assert await m2.sync(10)
        records = ContentRecords(m2, "members", BS)
        assert await records.lookup("f", "v1", None) is None
        assert records.counters.rejected_records == 1


async def test_a_version_seen_by_one_member_makes_the_others_ask_again(
    dirs: list[Path], tmp_path: Path
) -> None:
    source = {"f": attrs("v2")}
    seer, other = Cache(source), Cache(source)
    seer.held["f"] = attrs("v2")  # it learned v2 (its cache dropped v1)
    other.held["f"] = attrs("v1")  # still holds v1, TTL an hour away
    async with (
        member(dirs[1], seer, tmp_path) as (a, _),
        member(dirs[2], other, tmp_path) as (b, forgotten),
    ):
        a.on_retired("f")
        await until(other, lambda: forgotten == ["f"])
        assert other.revalidated == ["f"] and other.held["f"].version == "v2"
        assert b.statistics()["versions_applied"] == 1
        assert a.statistics()["versions_published"] == 1
        # b's own drop of v1 is not published again: the group said v2 already
        b.on_retired("f")
        await trio.testing.wait_all_tasks_blocked()
        assert b.statistics()["versions_published"] == 0
        # a member holding that version already is not asked
        assert seer.revalidated == []


async def test_a_file_gone_is_published_as_gone(dirs: list[Path], tmp_path: Path) -> None:
    source: dict[str, FileAttrs] = {}
    seer, other = Cache(source), Cache(source)
    other.held["f"] = attrs("v1")
    async with (
        member(dirs[1], seer, tmp_path) as (a, _),
        member(dirs[2], other, tmp_path) as (_, forgotten),
    ):
        a.on_retired("f")  # the source no longer has it
        await until(other, lambda: forgotten == ["f"])
        assert "f" not in other.held


async def test_group_pins_by_administrators_only(dirs: list[Path], tmp_path: Path) -> None:
    cache = Cache({})
    expires = datetime.now(UTC) + timedelta(hours=1)
    async with member(dirs[2], cache, tmp_path):
        async with open_group(GROUP, groups_dir=dirs[1]) as m1:  # a member's pin: ignored
            await m1.records.add(pin_record("nope", expires), internal=True)
            assert await m1.sync(10)
        async with open_group(GROUP, groups_dir=dirs[0]) as admin:
            pin_id = await admin.records.add(pin_record("big/file", expires), internal=True)
            assert await admin.sync(10)
            await until(cache, lambda: cache.pins == ["big/file"])
            await admin.records.delete(pin_id, internal=True)
            assert await admin.sync(10)
            await until(cache, lambda: cache.unpins == ["big/file"])
    assert "nope" not in cache.pins
    # the set pinned for the group is kept across mounts: nothing left
    assert (tmp_path / "cache-m2" / "group-pins.json").read_text() == "[]"


async def test_a_pin_removed_while_the_mount_was_down_is_released(
    dirs: list[Path], tmp_path: Path
) -> None:
    expires = datetime.now(UTC) + timedelta(hours=1)
    cache = Cache({})
    async with open_group(GROUP, groups_dir=dirs[0]) as admin:
        pin_id = await admin.records.add(pin_record("f", expires), internal=True)
        assert await admin.sync(10)
        async with member(dirs[1], cache, tmp_path):
            await until(cache, lambda: cache.pins == ["f"])
        await admin.records.delete(pin_id, internal=True)
        assert await admin.sync(10)
    later = Cache({})
    later.pins = ["f"]  # the cache remembers the pin
    async with member(dirs[1], later, tmp_path):
        await until(later, lambda: later.unpins == ["f"])


async def test_node_status_is_published_and_deleted_at_a_clean_exit(
    dirs: list[Path], tmp_path: Path
) -> None:
    cache = Cache({})
    async with (
        open_group(GROUP, groups_dir=dirs[0]) as admin,
        admin.records.events({NODE_STATUS_TYPE}) as events,
    ):
        async with member(dirs[1], cache, tmp_path, status_expiry=30.0):
            with trio.fail_after(DEADLINE):
                event = await events.__anext__()
            assert event.change is ChangeType.ADDED
            (record,) = await admin.records.search(_type_query())
            status = decode_status(record)
            assert (status.mountpoint, status.source, status.cached_bytes) == ("/mnt", "s3://b", 5)
            assert record.expires - record.modified <= timedelta(seconds=31)  # type: ignore[operator]
        with trio.fail_after(DEADLINE):
            while (await events.__anext__()).change is not ChangeType.DELETED:
                pass
        assert await admin.records.search(_type_query()) == []


def _type_query() -> str:
    return (
        '<peersearch><clause attrib="peerrecordtype" type="string">'
        f"{NODE_STATUS_TYPE}</clause></peersearch>"
    )


async def test_add_data_offers_the_blocks_that_match_the_origins_information(
    dirs: list[Path], tmp_path: Path
) -> None:
    """AddData's rule: data added and verified is offered to the hosted cache;
    bytes that do not match the version's content information are not."""
    data = os.urandom(2 * BS + 10)
    origin = MemoryBackend({"f": data})
    info = origin.publish("f", BS)
    store = Blobs()
    cache = Cache({})
    cache.held["f"] = (await origin.stat("f")) or attrs("?")
    async with open_group(GROUP, groups_dir=dirs[1]) as group:
        hosted = HostedCache(store, "mem://hosted")
        content = ContentRecords(group, "members", BS)
        shared = SharedBackend(origin, hosted, content, BS)
        m = Member(group, MemberOptions(GROUP, dirs[1]), content, shared, shared)
        async with trio.open_nursery() as nursery:
            await nursery.start(hosted.serve)
            wrong = bytearray(data)
            wrong[BS + 1] ^= 1  # the second block damaged
            await m.offer_added(cache, "f", 0, bytes(wrong))
            with trio.fail_after(DEADLINE):
                while hosted.queue_bytes:
                    await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert sorted(store.blobs) == sorted(block_name(info.block_hashes[b]) for b in (0, 2))
    for name, blob in store.blobs.items():
        assert name == block_name(hashlib.sha256(blob).digest())


class Blobs:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def get_blob(self, name: str, limit: int | None = None) -> bytes | None:
        return self.blobs.get(name)

    async def has_blob(self, name: str) -> bool:
        return name in self.blobs

    async def put_blob(self, name: str, data: bytes) -> None:
        self.blobs[name] = data

    async def aclose(self) -> None:
        pass


class FailingPins(Cache):
    """A cache whose pins fail after marking the file pinned (a prefetch that failed)."""

    async def pin(self, file_id: str) -> None:
        await super().pin(file_id)
        raise PinLimitExceeded(f"cannot pin {file_id}: too big")


async def test_a_pin_that_failed_is_still_released_by_an_unpin(
    dirs: list[Path], tmp_path: Path
) -> None:
    cache = FailingPins({})
    expires = datetime.now(UTC) + timedelta(hours=1)
    async with (
        member(dirs[1], cache, tmp_path) as (m, _),
        open_group(GROUP, groups_dir=dirs[0]) as admin,
    ):
        pin_id = await admin.records.add(pin_record("f", expires), internal=True)
        assert await admin.sync(10)
        await until(cache, lambda: cache.pins == ["f"])
        (shown,) = m.statistics()["group_pins"]
        assert shown["error"] == "cannot pin f: too big"
        await admin.records.delete(pin_id, internal=True)
        assert await admin.sync(10)
        await until(cache, lambda: cache.unpins == ["f"])


async def test_an_unwritable_pin_state_file_does_not_end_the_member(
    dirs: list[Path], tmp_path: Path
) -> None:
    cache = Cache({})
    state = tmp_path / "cache-m1" / "group-pins.json"
    state.mkdir(parents=True)  # a directory where the file goes: every write fails
    expires = datetime.now(UTC) + timedelta(hours=1)
    async with (
        member(dirs[1], cache, tmp_path),
        open_group(GROUP, groups_dir=dirs[0]) as admin,
    ):
        await admin.records.add(pin_record("f", expires), internal=True)
        assert await admin.sync(10)
        await until(cache, lambda: cache.pins == ["f"])


async def test_a_version_whose_offers_were_dropped_is_published_from_the_caches_hashes(
    dirs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hosted cache slower than the origin: offers dropped, the version's
    record comes from the hashes the cache computed once it holds it whole."""
    monkeypatch.setattr(member_module, "HOLES_INTERVAL", 0.05)
    data = os.urandom(3 * BS)
    origin = Bare({"f": data})
    attrs_f = await origin.memory.stat("f")
    assert attrs_f is not None
    cache = Cache({})
    async with open_group(GROUP, groups_dir=dirs[1]) as group:
        hosted = HostedCache(Blobs(), "mem://hosted", queue_bytes=BS)  # room for one block
        content = ContentRecords(group, "members", BS)
        shared = SharedBackend(origin, hosted, content, BS)
        m = Member(group, MemberOptions(GROUP, dirs[1]), content, shared, shared)
        async with trio.open_nursery() as nursery:
            await nursery.start(content.serve)
            await nursery.start(
                m.serve, cache, tmp_path, lambda f: None, Described("/mnt", "s3://b", "t")
            )
            req = ReadData(
                "f", len(data), 0, RWEvent(0), memoryview(bytearray(len(data))), len(data)
            )
            req.version = attrs_f.version
            await shared.read_data(req)  # three blocks offered at once: two dropped
            assert hosted.statistics().dropped_offers == 2
            cache.whole["f"] = ContentInfo.of_bytes(data, attrs_f.version, BS)
            with trio.fail_after(DEADLINE):
                while content.counters.content_published == 0:
                    await group.records.wait_changed()  # the record added
            found = await content.lookup("f", attrs_f.version, len(data))
            assert found == cache.whole["f"]
            nursery.cancel_scope.cancel()
