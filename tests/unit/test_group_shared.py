"""The hosted cache in front of the origin, in process: what a reader gets and
what the origin and the hosted cache were asked (cachefs.group.shared, hosted)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from enginerig import BS, Bare, read_at, read_sequential
from sharedrig import Node, Records, Store, make_nodes

from backends.memory import MemoryBackend
from cachefs.contract import ContentInfo, ReadData
from cachefs.group.hosted import block_name

DATA = os.urandom(5 * BS + 777)  # six blocks, the last one short
OTHER = os.urandom(len(DATA))


def nodes(tmp_path: Path, origin: Any, n: int = 2) -> tuple[Store, Records, list[Node]]:
    return make_nodes(tmp_path, origin, n)


async def test_second_node_reads_every_block_from_the_hosted_cache(tmp_path: Path) -> None:
    origin = Bare({"f": DATA})  # no published content information: records carry it
    store, records, (a, b) = nodes(tmp_path, origin)
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
        await a.settle()
    assert a.origin.bytes == len(DATA)
    assert [f for f, _ in records.published] == ["f"]
    assert len(store.blobs) == 6  # content-addressed, one object per block
    async with b.running() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert b.origin.bytes == 0
    assert b.hosted.statistics().hits == 6 and b.hosted.statistics().bytes == len(DATA)


async def test_identical_blocks_are_stored_once(tmp_path: Path) -> None:
    block = os.urandom(BS)
    origin = Bare({"x": block * 3, "y": block * 2})
    store, _, (a,) = nodes(tmp_path, origin, 1)
    async with a.running() as cache:
        await read_sequential(cache, "x")
        await read_sequential(cache, "y")
        await a.settle()
    assert list(store.blobs) == [block_name(hashlib.sha256(block).digest())]
    assert [op for op, _ in store.asked].count("put") == 1


async def test_a_poisoned_block_is_never_served(tmp_path: Path) -> None:
    origin = MemoryBackend({"f": DATA})
    origin.publish("f", BS)  # the origin's own content information
    store, _, (a, b) = nodes(tmp_path, origin)
    async with a.running() as cache:
        await read_sequential(cache, "f")
        await a.settle()
    info = await origin.content_info("f")
    assert info is not None
    bad = block_name(info.block_hashes[2])
    store.blobs[bad] = OTHER[: len(store.blobs[bad])]  # same length, other bytes
    async with b.running() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert b.hosted.statistics().rejected_blocks == 1
    # the origin was asked for what the hosted cache could not give, not for all of it
    assert 0 < b.origin.bytes < len(DATA)


async def test_a_record_for_other_bytes_cannot_make_a_reader_see_them(tmp_path: Path) -> None:
    """A lying content record with matching blocks planted: the origin's published
    information wins, and the cache never serves the planted bytes."""
    origin = MemoryBackend({"f": DATA})
    origin.publish("f", BS)
    store, records, (a,) = nodes(tmp_path, origin, 1)
    attrs = await origin.stat("f")
    assert attrs is not None
    lie = ContentInfo.of_bytes(OTHER, attrs.version, BS)
    records.infos[("f", attrs.version)] = lie
    for i, h in enumerate(lie.block_hashes):
        store.blobs[block_name(h)] = OTHER[i * BS : (i + 1) * BS]
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert a.hosted.statistics().hits == 0


async def test_a_lying_record_without_origin_information_costs_reads_not_bytes(
    tmp_path: Path,
) -> None:
    """No origin information, a trusted record that lies, its blocks planted: the
    cache serves... what the record vouches for.  This is what --trust-content
    decides; the test pins down that a *wrong size* record is never used."""
    origin = Bare({"f": DATA})
    store, records, (a,) = nodes(tmp_path, origin, 1)
    attrs = await origin.memory.stat("f")
    assert attrs is not None
    short = ContentInfo.of_bytes(OTHER[: len(DATA) - 1], attrs.version, BS)
    records.infos[("f", attrs.version)] = short
    for i, h in enumerate(short.block_hashes):
        store.blobs[block_name(h)] = OTHER[i * BS : min((i + 1) * BS, len(DATA) - 1)]
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert a.hosted.statistics().hits == 0


async def test_a_dead_hosted_cache_costs_one_try_per_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    origin = MemoryBackend({"f": DATA, "g": DATA[::-1]})
    origin.publish("f", BS)
    origin.publish("g", BS)
    store, _, (a,) = nodes(tmp_path, origin, 1)
    store.down = True
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
        gets = [op for op, _ in store.asked].count("get")
        assert a.hosted.down is not None
        assert gets <= 6  # one call's blocks at most, then skipped while down
        assert a.origin.bytes == len(DATA)
        # back after the backoff: the next read uses it again
        store.down = False
        await trio.sleep(60)
        assert await read_sequential(cache, "g") == DATA[::-1]
        await a.settle()
    assert a.hosted.down is None


async def test_a_stalled_hosted_cache_never_stalls_a_reader(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    origin = MemoryBackend({"f": DATA})
    origin.publish("f", BS)
    store, _, (a,) = nodes(tmp_path, origin, 1)
    store.stalled_gets = True
    async with a.running() as cache:
        # the deadline passes (the mock clock jumps to it): the reader gets its bytes
        assert await read_sequential(cache, "f") == DATA
    assert a.hosted.down is not None
    assert a.origin.bytes == len(DATA)


async def test_a_full_offer_queue_drops_offers_and_keeps_reading(tmp_path: Path) -> None:
    origin = Bare({"f": DATA})
    store, records, (a,) = make_nodes(tmp_path, origin, 1, queue_bytes=2 * BS)
    store.stalled = True
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
        assert a.hosted.statistics().dropped_offers >= 4
        assert a.hosted.queue_bytes <= 2 * BS
    assert records.published == []  # a version with a hole is not published


async def test_an_exception_from_the_origin_after_hosted_blocks_is_a_partial(
    tmp_path: Path,
) -> None:
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, records, (a,) = nodes(tmp_path, origin, 1)
    store.blobs[block_name(info.block_hashes[0])] = DATA[:BS]

    async def boom(req: ReadData) -> None:
        raise OSError("origin gone")

    a.origin.read_data = boom  # type: ignore[method-assign]
    attrs = await origin.stat("f")
    assert attrs is not None
    req = ReadData("f", len(DATA), 0, 0, memoryview(bytearray(2 * BS)), 2 * BS)  # type: ignore[arg-type]
    req.version = attrs.version
    await a.shared.read_data(req)
    assert (req.result_code.name, req.bytes_read) == ("PARTIAL", BS)
    assert bytes(req.buffer[:BS]) == DATA[:BS]


@pytest.mark.parametrize("pos", [1, BS + 5])
async def test_a_call_off_a_block_boundary_goes_to_the_origin(tmp_path: Path, pos: int) -> None:
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = nodes(tmp_path, origin, 1)
    for i, h in enumerate(info.block_hashes):
        store.blobs[block_name(h)] = DATA[i * BS : (i + 1) * BS]
    attrs = await origin.stat("f")
    assert attrs is not None
    req = ReadData("f", len(DATA), pos, 0, memoryview(bytearray(BS)), BS)  # type: ignore[arg-type]
    req.version = attrs.version
    await a.shared.read_data(req)
    assert bytes(req.buffer[: req.bytes_read]) == DATA[pos : pos + req.bytes_read]
    assert a.hosted.statistics().hits == 0


async def test_a_wrong_record_never_makes_the_origins_own_bytes_refused(tmp_path: Path) -> None:
    """A trusted record with the hashes of other bytes, and no blocks for it:
    the origin's bytes are served (the record is no authority over them)."""
    origin = Bare({"f": DATA})
    _, records, (a,) = nodes(tmp_path, origin, 1)
    attrs = await origin.memory.stat("f")
    assert attrs is not None
    records.infos[("f", attrs.version)] = ContentInfo.of_bytes(OTHER, attrs.version, BS)
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["corrupt_from_backend"] == 0
    assert a.origin.bytes == len(DATA)


async def test_the_cache_gives_the_hashes_of_a_version_it_holds_whole(tmp_path: Path) -> None:
    """What a member publishes when its offers were dropped (FileCache.content_of)."""
    origin = Bare({"f": DATA, "g": DATA[:100]})
    _, _, (a,) = nodes(tmp_path, origin, 1)
    attrs = await origin.memory.stat("f")
    assert attrs is not None
    async with a.running() as cache:
        assert cache.content_of("f") is None  # nothing cached
        await read_at(cache, "f", 0, BS)
        assert cache.content_of("f") is None  # not whole
        assert await read_sequential(cache, "f") == DATA
        await cache.flush()  # the hashes put off come in
        assert cache.content_of("f") == ContentInfo.of_bytes(DATA, attrs.version, BS)
        # a block taken on trust vouches for nothing
        gattrs = await cache.getattr("g")
        await cache.add_data("g", 0, DATA[:100], trust=True)
        assert cache.known_attrs("g") == gattrs
        assert cache.content_of("g") is None
