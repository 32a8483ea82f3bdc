"""Cache hits read from the cache disk through io_uring, and the way back to threads.

The engine tests push the data files out of the page cache first
(fsync, then POSIX_FADV_DONTNEED), so a hit really goes to the disk.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import evict_page_cache

from cachefs._linux import mapped, pagecache, uring
from cachefs._linux.uring import Ring, open_ring
from cachefs.engine import wiring
from tests.enginerig import BS, Rig, read_at, read_sequential, record_made

FILES = {"a.bin": random.Random(7).randbytes(5 * BS + 123), "b.bin": b"x" * (2 * BS)}


class Counted:
    """Counts Ring.pread calls (which path the hits took)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = Ring.pread

        async def pread(ring: Ring, *args: object, **kwargs: object) -> int:
            self.calls += 1
            return await real(ring, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Ring, "pread", pread)


# -- the ring itself --------------------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[int, bytes]:
    data = random.Random(3).randbytes(300_000)
    path = tmp_path / "data"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


@pytest.fixture
async def ring(nursery: trio.Nursery) -> Ring:
    r = open_ring(entries=8)
    if r is None:
        pytest.fail("no io_uring on this machine: the cache-disk fast path is not tested")
    nursery.start_soon(r.serve)
    return r


async def test_concurrent_reads_more_than_the_ring_holds_each_get_their_bytes(
    ring: Ring, data_file: tuple[int, bytes]
) -> None:
    fd, data = data_file
    rnd = random.Random(5)
    wanted = [(rnd.randrange(len(data)), rnd.randrange(1, 70_000)) for _ in range(200)]
    got: dict[int, bytes] = {}

    async def one(i: int, offset: int, length: int) -> None:
        buf = bytearray(length)
        n = await ring.pread(fd, buf, offset, offload=i % 2 == 0)
        got[i] = bytes(buf[:n])

    async with trio.open_nursery() as n:
        for i, (offset, length) in enumerate(wanted):
            n.start_soon(one, i, offset, length)
    for i, (offset, length) in enumerate(wanted):
        assert got[i] == data[offset : offset + length], (offset, length)
    assert ring.in_flight == 0


async def test_a_read_past_the_end_is_short_and_at_the_end_empty(
    ring: Ring, data_file: tuple[int, bytes]
) -> None:
    fd, data = data_file
    buf = bytearray(1000)
    assert await ring.pread(fd, buf, len(data) - 10) == 10
    assert bytes(buf[:10]) == data[-10:]
    assert await ring.pread(fd, bytearray(10), len(data)) == 0


async def test_a_failed_read_raises_its_errno_in_the_reader(ring: Ring, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)  # a directory: read gives EISDIR
    try:
        with pytest.raises(IsADirectoryError):
            await ring.pread(fd, bytearray(10), 0)
    finally:
        os.close(fd)
    assert ring.usable  # the ring itself is fine


async def ended_ring() -> Ring:
    """A ring whose serve() task has run and been cancelled."""
    r = open_ring(entries=4)
    assert r is not None
    async with trio.open_nursery() as n:
        n.start_soon(r.serve)
        await trio.testing.wait_all_tasks_blocked()
        n.cancel_scope.cancel()
    return r


async def test_the_ring_closes_its_eventfd_when_its_task_ends() -> None:
    r = await ended_ring()
    with pytest.raises(OSError) as e:
        os.fstat(r._efd)
    assert e.value.errno == errno.EBADF


# -- hits through the engine ------------------------------------------------------------


async def test_hits_from_the_cache_disk_go_through_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, FILES)
    counted = Counted(monkeypatch)
    async with rig.engine() as cache:
        for name, data in FILES.items():
            assert await read_sequential(cache, name) == data
        await cache.flush()
        assert evict_page_cache(rig.cache_dir / "data") == len(FILES)
        rig.reads()
        assert await read_sequential(cache, "a.bin", chunk=4096) == FILES["a.bin"]
        assert await read_at(cache, "b.bin", BS - 100, 200) == FILES["b.bin"][BS - 100 : BS + 100]
        assert rig.reads() == []  # all of it hits
        assert cache.statistics()["disk_reads"] == "io_uring"
    assert counted.calls >= 2


@pytest.mark.parametrize("how", ["config", "no liburing", "refused"])
async def test_without_a_ring_hits_are_read_by_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    overrides: dict[str, object] = {}
    if how == "config":
        overrides["io_uring"] = False
    elif how == "no liburing":
        monkeypatch.setitem(sys.modules, "liburing", None)  # import fails
    else:

        def refuse(*args: object) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        import liburing

        monkeypatch.setattr(liburing, "io_uring_queue_init", refuse)
    counted = Counted(monkeypatch)
    rig = Rig(tmp_path, FILES)
    async with rig.engine(**overrides) as cache:
        assert await read_sequential(cache, "a.bin") == FILES["a.bin"]
        await cache.flush()
        evict_page_cache(rig.cache_dir / "data")
        rig.reads()
        assert await read_sequential(cache, "a.bin", chunk=4096) == FILES["a.bin"]
        assert rig.reads() == []
        assert cache.statistics()["disk_reads"] == "threads"
    assert counted.calls == 0


async def test_a_ring_that_fails_to_submit_hands_over_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, FILES)
    rings = record_made(monkeypatch, wiring, "open_ring")
    async with rig.engine() as cache:
        assert await read_sequential(cache, "a.bin") == FILES["a.bin"]
        await cache.flush()
        evict_page_cache(rig.cache_dir / "data")
        [ring] = rings
        assert ring is not None

        class Failing:
            def __getattr__(self, name: str) -> object:
                return getattr(uring_lib, name)

            @staticmethod
            def io_uring_submit(r: object) -> int:
                raise OSError(errno.EBUSY, "Device or resource busy")

        uring_lib = ring._lib
        monkeypatch.setattr(ring, "_lib", Failing())
        rig.reads()
        assert await read_sequential(cache, "a.bin", chunk=4096) == FILES["a.bin"]
        assert rig.reads() == []
        assert cache.statistics()["disk_reads"] == "threads"
        assert isinstance(ring.broken, OSError)


def test_the_ring_module_says_why_it_is_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "liburing", None)
    caplog.set_level("INFO", logger=uring.__name__)
    assert open_ring() is None
    assert "cache-disk reads go through threads" in caplog.text


# -- large hits as views of the mapped data file ----------------------------------------

BIG = {"big.bin": random.Random(11).randbytes(8 * BS + 999)}


async def test_large_resident_hits_are_views_and_read_back_exactly(tmp_path: Path) -> None:
    rig = Rig(tmp_path, BIG)
    data = BIG["big.bin"]
    async with rig.engine() as cache:
        assert await read_sequential(cache, "big.bin") == data
        rig.reads()
        fh = await cache.open("big.bin")
        try:
            for offset, length in [(0, BS), (BS - 5, 3 * BS), (7 * BS, 2 * BS)]:
                got = await cache.read(fh, offset, length)
                assert isinstance(got, memoryview)  # no copy into Python
                assert bytes(got) == data[offset : offset + length]
            small = await cache.read(fh, 100, 4096)
            assert not isinstance(small, memoryview) and small == data[100:4196]
            await cache.flush()
            evict_page_cache(rig.cache_dir / "data")
            # Pages mapped by the views above stay resident; these were never mapped.
            cold = await cache.read(fh, 4 * BS + 10, BS)  # not resident: copied, from the disk
            assert not isinstance(cold, memoryview) and cold == data[4 * BS + 10 : 5 * BS + 10]
        finally:
            await cache.close(fh)
        assert rig.reads() == []


async def test_without_cachestat_large_hits_are_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def enosys(*args: object) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(pagecache, "_syscall", enosys)
    monkeypatch.setattr(pagecache._State, "available", True)
    rig = Rig(tmp_path, BIG)
    async with rig.engine() as cache:
        assert await read_sequential(cache, "big.bin") == BIG["big.bin"]
        got = await read_at(cache, "big.bin", 0, 2 * BS)
        assert not isinstance(got, memoryview) and got == BIG["big.bin"][: 2 * BS]
    assert not pagecache.available()


async def test_a_view_outlives_a_new_version_and_the_new_bytes_are_served(
    tmp_path: Path,
) -> None:
    old = BIG["big.bin"]
    new = bytes(b ^ 0xFF for b in old)
    rig = Rig(tmp_path, BIG)
    async with rig.engine(ttl=0) as cache:
        assert await read_sequential(cache, "big.bin") == old
        view = await read_at(cache, "big.bin", 0, 2 * BS)
        assert isinstance(view, memoryview)
        rig.source.put("big.bin", new)
        assert await read_sequential(cache, "big.bin") == new  # the old data file retired
        assert bytes(view) == old[: 2 * BS]  # still mapped, still the old bytes: no SIGBUS


def test_residency_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(256 << 10))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.pread(fd, 256 << 10, 0)
        assert pagecache.cached_pages(fd, 0, 256 << 10) == pagecache.pages_in(0, 256 << 10) == 64
        assert pagecache.pages_in(4095, 2) == 2
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert pagecache.cached_pages(fd, 4096, 8192) == 0
    finally:
        os.close(fd)


async def test_a_range_that_cannot_be_mapped_is_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    rig = Rig(tmp_path, BIG)
    async with rig.engine() as cache:
        assert await read_sequential(cache, "big.bin") == BIG["big.bin"]
        monkeypatch.setattr(mapped.mmap, "mmap", refuse)
        got = await read_at(cache, "big.bin", BS, 2 * BS)
        assert not isinstance(got, memoryview) and got == BIG["big.bin"][BS : 3 * BS]


async def test_a_closed_ring_refuses_reads_instead_of_touching_the_kernel(
    data_file: tuple[int, bytes],
) -> None:
    r = await ended_ring()
    assert not r.usable
    with pytest.raises(OSError) as e:
        await r.pread(data_file[0], bytearray(10), 0)
    assert e.value.errno == errno.ESHUTDOWN
