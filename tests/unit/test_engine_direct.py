"""Large cache hits none of whose pages is cached: read O_DIRECT into lent huge-page buffers.

The tests push the data files out of the page cache first (fsync, then
POSIX_FADV_DONTNEED), as after a reboot or under memory pressure.  Most run
plain and encrypted: encrypted, the chunks are opened in the buffer.
"""

from __future__ import annotations

import errno
import gc
import os
import random
from pathlib import Path

import pytest
from conftest import cached_pages, evict_page_cache
from enginerig import BS, Rig, read_at, read_sequential, record_made

from cachefs._linux import fileio
from cachefs._linux.hugepages import Slots
from cachefs._linux.uring import Ring
from cachefs.engine import FileCache, OpenFile
from cachefs.engine.hit import direct
from cachefs.engine.state import store

DATA = random.Random(5).randbytes(8 * BS + 999)  # the last block is partial
FILES = {"big.bin": DATA}
KEY = os.urandom(32)
KEYS = pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])


def data_file(rig: Rig) -> Path:
    """The data file of big.bin (encrypted, its nonces and tags follow the data)."""
    (path,) = [p for p in (rig.cache_dir / "data").iterdir() if p.stat().st_size >= len(DATA)]
    return path


def data_pages(rig: Rig) -> int:
    """Pages of big.bin's bytes in the data file that are in the page cache."""
    return cached_pages(data_file(rig), len(DATA))


async def cached_cold(rig: Rig, cache) -> None:  # type: ignore[no-untyped-def]
    """Fetch everything, then push the data file out of the page cache."""
    assert await read_sequential(cache, "big.bin") == DATA
    await cache.flush()
    evict_page_cache(rig.cache_dir / "data")
    assert cached_pages(data_file(rig)) == 0
    rig.reads()


@KEYS
@pytest.mark.parametrize("io_uring", [True, False])
async def test_cold_large_hits_come_from_the_disk_exactly_and_leave_no_pages_behind(
    tmp_path: Path, io_uring: bool, key: bytes | None
) -> None:
    rig = Rig(tmp_path, FILES)
    async with rig.engine(key, io_uring=io_uring) as cache:
        assert cache.statistics()["disk_reads"] == ("io_uring" if io_uring else "threads")
        await cached_cold(rig, cache)
        reads = [(0, 2 * BS), (BS, 4 * BS), (6 * BS, 4 * BS)]  # the last to the end of the file
        if key is None:
            reads.append((4096, 3 * BS))  # encrypted, reads start on a chunk
        fh = await cache.open("big.bin")
        try:
            for offset, length in reads:
                got = await cache.read(fh, offset, length)
                assert got == DATA[offset : offset + length], (offset, length)
                assert isinstance(got, memoryview) and got.readonly
        finally:
            await cache.close(fh)
        # The kernel keeps what a mount replies in its own pages: the data
        # file's would be a second copy of the same bytes.
        assert data_pages(rig) == 0
        assert rig.reads() == []
        # Small and unaligned hits still go through the page cache.
        assert await read_at(cache, "big.bin", 100, 2 * BS) == DATA[100 : 100 + 2 * BS]
        assert await read_at(cache, "big.bin", 3 * BS, 4096) == DATA[3 * BS : 3 * BS + 4096]
        assert data_pages(rig) > 0
        assert rig.reads() == []


@pytest.mark.parametrize("where", ["ciphertext", "tag"])
async def test_a_chunk_tampered_with_on_disk_is_never_served_from_a_direct_read(
    tmp_path: Path, where: str
) -> None:
    rig = Rig(tmp_path, FILES)
    async with rig.engine(KEY) as cache:
        await cached_cold(rig, cache)
        path = data_file(rig)
        # One byte of block 3's ciphertext, or of its nonce and tag in the table after the data.
        at = 3 * BS + 17 if where == "ciphertext" else fileio.page_end(len(DATA)) + 3 * 28 + 20
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 1]))
        evict_page_cache(rig.cache_dir / "data")
        fh = await cache.open("big.bin")
        try:
            got = await cache.read(fh, 2 * BS, 2 * BS)
            assert got == DATA[2 * BS : 4 * BS]
        finally:
            await cache.close(fh)
        assert [(c["position"], c["bytes_to_read"]) for c in rig.reads()] == [(3 * BS, BS)]
        assert cache.statistics()["corrupt_in_cache"] == 1


@KEYS
async def test_a_sequential_reader_finds_its_next_bytes_already_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: bytes | None
) -> None:
    started: list[int] = []
    real = Ring.read_into

    async def read_into(ring: Ring, fd: int, view: memoryview, offset: int) -> int:
        started.append(offset)
        return await real(ring, fd, view, offset)

    monkeypatch.setattr(Ring, "read_into", read_into)
    made = record_made(monkeypatch, direct, "Slots")
    rig = Rig(tmp_path, FILES)
    async with rig.engine(key) as cache:
        await cached_cold(rig, cache)
        [slots] = made
        fh = await cache.open("big.bin")
        try:
            got = [await cache.read(fh, 0, 2 * BS)]
            # The disk reads on past the request, to the last whole request of the file.
            assert sorted(started) == [0, 2 * BS, 4 * BS, 6 * BS]
            for offset in (2 * BS, 4 * BS):
                got.append(await cache.read(fh, offset, 2 * BS))
            assert sorted(started) == [0, 2 * BS, 4 * BS, 6 * BS]  # nothing read twice
            assert b"".join(got) == DATA[: 6 * BS]
            # The reader goes elsewhere: what was read ahead for it is let go.
            assert await cache.read(fh, BS, 2 * BS) == DATA[BS : 3 * BS]
            assert fh.direct is not None and not fh.direct.reads
            del got
            assert slots.out == 0
            # Read ahead again, then closed: let go too.
            assert await cache.read(fh, 3 * BS, 2 * BS) == DATA[3 * BS : 5 * BS]
            assert fh.direct.reads
        finally:
            await cache.close(fh)
        assert slots.out == 0
        assert rig.reads() == []


async def test_reads_of_whole_pages_only_are_read_ahead(tmp_path: Path) -> None:
    rig = Rig(tmp_path, FILES)
    async with rig.engine() as cache:
        await cached_cold(rig, cache)
        fh = await cache.open("big.bin")
        try:
            n = 2 * BS + 100  # the next read would start off a page: not read ahead
            for offset in (0, n):
                assert await cache.read(fh, offset, n) == DATA[offset : offset + n]
            assert fh.direct is not None and not fh.direct.reads
            assert fh.data is not None and not fh.data.direct_refused
        finally:
            await cache.close(fh)


@KEYS
async def test_bytes_read_ahead_of_a_replaced_version_go_to_its_handle_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: bytes | None
) -> None:
    new = bytes(b ^ 0x5A for b in DATA)
    made = record_made(monkeypatch, direct, "Slots")
    rig = Rig(tmp_path, FILES)
    async with rig.engine(key, ttl=0) as cache:
        await cached_cold(rig, cache)
        fh = await cache.open("big.bin")
        try:
            assert await cache.read(fh, 0, 2 * BS) == DATA[: 2 * BS]
            assert fh.direct is not None and 2 * BS in fh.direct.reads  # old bytes, ahead
            rig.source.put("big.bin", new)
            assert await read_sequential(cache, "big.bin") == new  # a new open: the new version
            await cache.flush()
            evict_page_cache(rig.cache_dir / "data")
            # The handle reads the version it opened, whole, from the data file it holds.
            assert await read_sequential_from(cache, fh, 2 * BS) == DATA[2 * BS :]
            assert await read_sequential(cache, "big.bin") == new
        finally:
            await cache.close(fh)
        [slots] = made
        assert slots.out == 0


async def read_sequential_from(cache: FileCache, fh: OpenFile, offset: int) -> bytes:
    out = bytearray()
    while data := await cache.read(fh, offset + len(out), 2 * BS):
        out += data
    return bytes(out)


async def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct, "SLOTS", 2)
    made = record_made(monkeypatch, direct, "Slots")
    rig = Rig(tmp_path, FILES)
    async with rig.engine() as cache:
        await cached_cold(rig, cache)
        [slots] = made
        # Each read on a fresh handle, away from 0: none is sequential, none reads ahead.
        first = await read_at(cache, "big.bin", BS, 2 * BS)
        assert isinstance(first, memoryview)
        part = first[BS:]  # a slice outlives the view it was cut from
        del first
        second = await read_at(cache, "big.bin", 3 * BS, 2 * BS)
        assert isinstance(second, memoryview) and slots.out == 2
        # Both buffers lent: served another way, still exactly.
        third = await read_at(cache, "big.bin", 5 * BS, 2 * BS)
        assert not isinstance(third, memoryview) and third == DATA[5 * BS : 7 * BS]
        evict_page_cache(rig.cache_dir / "data")
        del second
        gc.collect()
        assert slots.out == 1
        fourth = await read_at(cache, "big.bin", 6 * BS, 2 * BS)  # into second's buffer
        assert isinstance(fourth, memoryview) and slots.out == 2
        assert part == DATA[2 * BS : 3 * BS] and fourth == DATA[6 * BS : 8 * BS]
        del part, fourth
        assert slots.out == 0
        assert rig.reads() == []


@KEYS
async def test_a_block_evicted_during_a_direct_read_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: bytes | None
) -> None:
    rig = Rig(tmp_path, FILES)
    async with rig.engine(key) as cache:
        await cached_cold(rig, cache)
        cf = cache.catalog.files["big.bin"]
        real = Ring.read_into

        async def read_into(ring: Ring, *args: object) -> int:
            cache.catalog.unmark(cf, 1)  # evicted while the disk reads
            return await real(ring, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(Ring, "read_into", read_into)
        assert await read_at(cache, "big.bin", 0, 2 * BS) == DATA[: 2 * BS]
        assert [(c["position"], c["bytes_to_read"]) for c in rig.reads()] == [(BS, BS)]


@pytest.mark.parametrize("where", ["open", "read"])
async def test_a_cache_disk_that_refuses_direct_reads_is_read_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    refused: list[int] = []
    if where == "open":
        real_open = os.open

        def open_(path, flags, *args):  # type: ignore[no-untyped-def]
            if flags & os.O_DIRECT:
                refused.append(flags)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(path, flags, *args)

        monkeypatch.setattr(store.os, "open", open_)
    else:

        async def read_into(ring: Ring, fd: int, *args: object) -> int:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(Ring, "read_into", read_into)
    rig = Rig(tmp_path, FILES)
    async with rig.engine() as cache:
        await cached_cold(rig, cache)
        fh = await cache.open("big.bin")
        try:
            tried = []
            for offset in (0, 2 * BS, 4 * BS, 6 * BS):
                assert await cache.read(fh, offset, 2 * BS) == DATA[offset : offset + 2 * BS]
                evict_page_cache(rig.cache_dir / "data")
                tried.append(len(refused))
        finally:
            await cache.close(fh)
        # Refused by the first read (and those already started ahead of it),
        # then not asked again for this file.
        assert tried[0] >= 1 and tried[1:] == [tried[0]] * 3, tried
        assert rig.reads() == []


def test_slots_come_back_when_the_last_view_goes_and_are_let_go_when_idle() -> None:
    slots = Slots(1 << 20, 2)
    assert not slots.mapped and slots.out == 0
    a = slots.take()
    assert a is not None and slots.mapped
    slots.buffer(a)[:5] = b"hello"
    view = slots.lend(a, 5)
    assert view == b"hello" and view.readonly
    b = slots.take()
    assert b is not None and slots.take() is None  # both out
    slots.give(b)  # read failed: back at once
    assert slots.out == 1
    piece = view[1:3]
    del view
    assert slots.out == 1 and piece == b"el"
    del piece
    assert slots.out == 0
    slots.trim()  # taken since the last trim: kept
    assert slots.mapped
    slots.trim()
    assert not slots.mapped
