"""The hosted cache's read path under a hostile store, a broken peer or a
changing origin, in process: what a reader gets, what the origin was asked,
and what was uploaded (every blob must hash to its name)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from enginerig import BS, Bare, read_at, read_sequential
from sharedrig import make_nodes, plant, request, version_of

from backends.memory import MemoryBackend
from cachefs.contract import ContentInfo, ReadData, RWEvent, RWResult
from cachefs.errors import VersionGone
from cachefs.group.hosted import block_name

DATA = os.urandom(5 * BS + 777)  # six blocks, the last one short
NEW = os.urandom(len(DATA))


# -- blocks of the right name and other bytes ----------------------------------------------


@pytest.mark.parametrize("how", ["truncated", "longer", "empty"])
async def test_a_block_of_another_length_is_never_served(tmp_path: Path, how: str) -> None:
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    plant(store, DATA, info)
    name = block_name(info.block_hashes[1])
    good = store.blobs[name]
    store.blobs[name] = {"truncated": good[:-1], "longer": good + b"\0", "empty": b""}[how]
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["corrupt_from_backend"] == 0
    assert a.hosted.statistics().rejected_blocks == 1
    assert a.origin.asked == [(BS, BS)]  # only the block the hosted cache could not give


async def test_a_store_answering_for_another_name_is_never_served(tmp_path: Path) -> None:
    """A broken store (or a proxy) answers block 3's bytes when asked for block 2."""
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    plant(store, DATA, info)
    store.lie[block_name(info.block_hashes[2])] = block_name(info.block_hashes[3])
    async with a.running() as cache:
        assert await read_at(cache, "f", 0, len(DATA)) == DATA
    assert a.hosted.statistics().rejected_blocks == 1
    assert a.origin.bytes < len(DATA)


async def test_some_blocks_answered_others_raising_in_one_call(tmp_path: Path) -> None:
    """Blocks 0, 1 and 3 answer, block 2 raises, within one call: the reader gets
    blocks 0 and 1 from the hosted cache, the rest from the origin, every byte right."""
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    plant(store, DATA, info)
    store.failing.add(block_name(info.block_hashes[2]))
    version = await version_of(origin, "f")
    req = request("f", len(DATA), 0, len(DATA), version)
    await a.shared.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.SUCCESS, len(DATA))
    assert bytes(req.buffer) == DATA
    assert a.origin.asked == [(2 * BS, len(DATA) - 2 * BS)]
    store.check()


# -- the origin changing between the hosted part and the origin part ------------------------


@pytest.mark.parametrize("hosted_blocks", [1, 2, 5])
async def test_a_version_change_mid_call_never_mixes_versions(
    tmp_path: Path, hosted_blocks: int
) -> None:
    """The hosted cache holds the leading blocks of version 1; the origin has moved
    to version 2 (same size) after the file was opened.  The reader gets one
    version whole, or an error: never version 1's head on version 2's tail."""
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    for i in range(hosted_blocks):
        store.blobs[block_name(info.block_hashes[i])] = DATA[i * BS : (i + 1) * BS]
    async with a.running() as cache:
        fh = await cache.open("f")
        try:
            origin.put("f", NEW)
            try:
                got = bytes(await cache.read(fh, 0, len(DATA)))
            except VersionGone:  # ESTALE: the reader is told, and opens again
                got = None
        finally:
            await cache.close(fh)
        if got is not None:
            assert got in (DATA, NEW, DATA[: len(got)], NEW[: len(got)])
        # read again: whatever the engine decided, the bytes are one version's
        again = await read_sequential(cache, "f")
        assert again in (DATA, NEW)
    store.check()


async def test_a_version_change_after_hosted_blocks_answers_the_served_part_only(
    tmp_path: Path,
) -> None:
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    store.blobs[block_name(info.block_hashes[0])] = DATA[:BS]
    version = await version_of(origin, "f")
    origin.put("f", NEW)
    req = request("f", len(DATA), 0, 3 * BS, version)
    await a.shared.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.PARTIAL, BS)
    assert bytes(req.buffer[:BS]) == DATA[:BS]
    assert a.hosted.queue_bytes == 0  # nothing of the new version offered as the old one


async def test_a_version_change_while_learning_publishes_no_mixed_record(tmp_path: Path) -> None:
    """No content information: the member learns hashes as it reads, and the
    origin changes half way.  A record it publishes describes one version."""
    origin = Bare({"f": DATA})
    store, records, (a,) = make_nodes(tmp_path, origin, 1)
    async with a.running() as cache:
        fh = await cache.open("f")
        try:
            head = bytes(await cache.read(fh, 0, 3 * BS))
            origin.memory.put("f", NEW)
            try:
                await cache.read(fh, 3 * BS, len(DATA))
            except VersionGone:
                pass
        finally:
            await cache.close(fh)
        assert head == DATA[: 3 * BS]
        assert await read_sequential(cache, "f") == NEW
        await a.settle()
    for _, info in records.published:
        assert info in (
            ContentInfo.of_bytes(DATA, info.version, BS),
            ContentInfo.of_bytes(NEW, info.version, BS),
        )
    store.check()


# -- sizes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, BS - 1, BS, BS + 1, 2 * BS])
async def test_odd_sizes_are_shared_and_served_whole(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    origin = Bare({"f": data})
    store, records, (a, b) = make_nodes(tmp_path, origin)
    async with a.running() as cache:
        assert await read_sequential(cache, "f") == data
        await a.settle()
    store.check()
    assert len(store.blobs) == -(-size // BS)
    async with b.running() as cache:
        assert await read_sequential(cache, "f") == data
    assert b.origin.bytes == 0
    if size:
        assert [f for f, _ in records.published] == ["f"]


async def test_a_record_of_another_size_is_not_used(tmp_path: Path) -> None:
    """A record for this version claiming one byte less, its blocks planted."""
    origin = Bare({"f": DATA})
    store, records, (a,) = make_nodes(tmp_path, origin, 1)
    version = await version_of(origin.memory, "f")
    short = NEW[: len(DATA) - 1]
    lie = ContentInfo.of_bytes(short, version, BS)
    records.infos[("f", version)] = lie
    plant(store, short, lie)
    async with a.running() as cache:
        assert await read_at(cache, "f", 0, len(DATA)) == DATA
    assert a.hosted.statistics().hits == 0


@pytest.mark.parametrize("published", [BS // 2, 4 * BS])
async def test_origin_information_of_another_block_size_is_ignored(
    tmp_path: Path, published: int, caplog: pytest.LogCaptureFixture
) -> None:
    """`cachefs publish --block-size` other than the mount's: the mount ignores
    that information (as --help says) and shares blocks as without it."""
    origin = MemoryBackend({"f": DATA})
    origin.publish("f", published)
    store, _, (a, b) = make_nodes(tmp_path, origin)
    with caplog.at_level(logging.WARNING):
        async with a.running() as cache:
            assert await read_sequential(cache, "f") == DATA
            await a.settle()
        async with b.running() as cache:
            assert await read_sequential(cache, "f") == DATA
    store.check()
    assert a.hosted.statistics().rejected_blocks == b.hosted.statistics().rejected_blocks == 0
    assert not [r for r in caplog.records if r.name.startswith("cachefs.group")]


async def test_a_call_past_the_end_served_by_the_hosted_cache(tmp_path: Path) -> None:
    """A call reaching past the end whose blocks the hosted cache has: the reader
    gets the file's bytes and RANGE_BEYOND_EOF, as from the origin."""
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    plant(store, DATA, info)
    version = await version_of(origin, "f")
    req = request("f", len(DATA), 4 * BS, 4 * BS, version)
    await a.shared.read_data(req)
    assert req.bytes_read == len(DATA) - 4 * BS
    assert req.result_code in (RWResult.RANGE_BEYOND_EOF, RWResult.SUCCESS)
    assert bytes(req.buffer[: req.bytes_read]) == DATA[4 * BS :]
    assert a.origin.bytes == 0


# -- offers ---------------------------------------------------------------------------------


async def test_offers_survive_the_buffer_being_reused(tmp_path: Path) -> None:
    """The engine reuses its buffer as soon as read_data returns: what is
    uploaded is still the block's bytes."""
    origin = Bare({"f": DATA})
    store, records, (a,) = make_nodes(tmp_path, origin, 1)
    version = await version_of(origin.memory, "f")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.hosted.serve)
        buf = memoryview(bytearray(len(DATA)))
        req = ReadData("f", len(DATA), 0, RWEvent(0), buf, len(DATA), version=version)
        await a.shared.read_data(req)
        assert bytes(buf) == DATA
        buf[:] = b"\xff" * len(DATA)  # the engine's next call
        await a.settle()
        nursery.cancel_scope.cancel()
    store.check()
    assert sorted(store.blobs.values()) == sorted(DATA[i : i + BS] for i in range(0, len(DATA), BS))
    assert [info for _, info in records.published] == [ContentInfo.of_bytes(DATA, version, BS)]


async def test_a_full_queue_with_stalled_uploads_never_holds_a_reader(tmp_path: Path) -> None:
    """Uploads that never finish keep the queue full: readers still get every
    byte (a reader waiting on the queue would hang: the deadline catches it)."""
    origin = MemoryBackend({"f": DATA, "g": NEW})
    store, records, (a,) = make_nodes(tmp_path, origin, 1, queue_bytes=BS)
    store.stalled = True
    with trio.fail_after(60):
        async with a.running() as cache:
            assert await read_sequential(cache, "f") == DATA
            assert await read_sequential(cache, "g") == NEW
            assert await read_at(cache, "f", 0, len(DATA)) == DATA
            assert a.hosted.statistics().dropped_offers >= 10
            assert a.hosted.queue_bytes <= BS
    assert len(a.origin.asked) == 12  # each block once: nothing re-read for the offers
    assert records.published == []
    assert store.blobs == {}


# -- many readers ---------------------------------------------------------------------------


async def test_many_readers_on_two_nodes_at_once(tmp_path: Path) -> None:
    data = os.urandom(24 * BS + 5)
    origin = Bare({"f": data})
    store, records, (a, b) = make_nodes(tmp_path, origin)
    got: list[bytes] = []

    async def reader(cache: Any, chunk: int) -> None:
        got.append(await read_sequential(cache, "f", chunk))

    async with a.running() as ca, b.running() as cb:
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(reader, ca, BS * (1 + i % 3))
                nursery.start_soon(reader, cb, BS * (1 + i % 2) + (i % 2) * 1000)
        await a.settle()
        await b.settle()
    assert got == [data] * 12
    store.check()
    assert len(store.blobs) == 25
    version = await version_of(origin.memory, "f")
    for _, info in records.published:
        assert info == ContentInfo.of_bytes(data, version, BS)
    # each block offered by both nodes is uploaded once (has_blob or known first)
    assert len(store.puts()) <= 2 * 25


async def test_only_the_origins_blocks_of_a_mixed_call_are_offered(tmp_path: Path) -> None:
    origin = MemoryBackend({"f": DATA})
    info = origin.publish("f", BS)
    store, _, (a,) = make_nodes(tmp_path, origin, 1)
    store.blobs[block_name(info.block_hashes[0])] = DATA[:BS]
    version = await version_of(origin, "f")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.hosted.serve)
        req = request("f", len(DATA), 0, 3 * BS, version)
        await a.shared.read_data(req)
        await a.settle()
        nursery.cancel_scope.cancel()
    assert (req.result_code, req.bytes_read) == (RWResult.SUCCESS, 3 * BS)
    assert bytes(req.buffer) == DATA[: 3 * BS]
    assert a.origin.asked == [(BS, 2 * BS)]
    assert sorted(store.puts()) == sorted(block_name(h) for h in info.block_hashes[1:3])
    store.check()
