"""The catalog's data files (engine/state/catalog.py): those kept open between
opens are bounded, let go when their version is replaced, all closed with
the cache; blocks a commit is syncing count as unsynced until it is done."""

from __future__ import annotations

import errno
import os
import threading

import pytest
import trio
from conftest import fds_under
from enginerig import BS, Rig, read_sequential

from cachefs import CacheDiskFailed
from cachefs.engine.hit import reader as hits
from cachefs.engine.state import catalog, store

pytestmark = pytest.mark.unit

DEADLINE = 30.0


def data_fds(rig: Rig) -> list[str]:
    """Where this process's fds on the cache's data files point."""
    return fds_under("self", rig.cache_dir / "data")


async def test_kept_files_are_bounded_and_closed_with_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "KEEP_OPEN", 3)
    files = {f"f{i}": os.urandom(BS + i) for i in range(8)}
    rig = Rig(tmp_path, files)
    async with rig.engine() as cache:
        for name, data in files.items():
            assert await read_sequential(cache, name) == data
            await cache.commit()  # no sync in flight (it may open a file of its own)
            assert len(data_fds(rig)) <= 3
        assert len(data_fds(rig)) == 3  # the last ones read
        rig.reads()
        for name, data in files.items():  # read again: from the cache
            assert await read_sequential(cache, name) == data
        assert rig.reads() == []
    assert data_fds(rig) == []


async def test_a_replaced_version_lets_its_kept_file_go(tmp_path):
    old, new = os.urandom(3 * BS), os.urandom(2 * BS + 5)
    rig = Rig(tmp_path, {"f": old})
    async with rig.engine(ttl=0) as cache:
        assert await read_sequential(cache, "f") == old
        assert await read_sequential(cache, "f") == old  # a hit, from the kept file
        await cache.commit()  # no sync in flight (it may open a file of its own)
        (kept,) = data_fds(rig)
        rig.source.put("f", new)
        assert await read_sequential(cache, "f") == new
        assert await read_sequential(cache, "f") == new
        await cache.commit()
        (now,) = data_fds(rig)
        assert now != kept and not now.endswith(" (deleted)")


async def test_a_read_from_the_disk_during_a_failing_commit_syncs_first(tmp_path, monkeypatch):
    """Blocks a commit is syncing are not synced yet: a reader of them from the
    cache disk meanwhile waits for a sync of its own, and the source's bytes
    come when it fails (the failed writeback left holes)."""
    data = os.urandom(4 * BS)
    rig = Rig(tmp_path, {"f": data})
    syncs: list[int] = []
    gate = threading.Event()

    def slow_failing_sync(fd: int) -> None:
        syncs.append(fd)
        gate.wait(DEADLINE)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    async def until(check) -> None:
        with trio.fail_after(DEADLINE):
            while not check():
                await trio.sleep(0.01)

    async with rig.engine(io_uring=False, disk_probe_interval=0.05) as cache:
        assert await read_sequential(cache, "f") == data  # written, not synced yet
        monkeypatch.setattr(store.os, "fdatasync", slow_failing_sync)
        # Nothing of it in the page cache: read from the disk.
        monkeypatch.setattr(hits, "cached_pages", lambda fd, offset, length: 0)
        monkeypatch.setattr(hits, "read_nowait", lambda fd, buf, offset: 0)
        got: list[bytes] = []

        async def commit() -> None:
            with pytest.raises(CacheDiskFailed):
                await cache.flush()

        async def read() -> None:
            got.append(await read_sequential(cache, "f"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit)
            await until(lambda: syncs)
            (path,) = (tmp_path / "cache" / "data").iterdir()
            path.write_bytes(bytes(path.stat().st_size))  # the writeback was lost
            nursery.start_soon(read)
            await until(lambda: got or len(syncs) > 1)
            gate.set()
        assert got == [data]


async def test_a_block_dropped_and_written_again_during_a_commit_stays_unsynced(
    tmp_path, monkeypatch
):
    """A block evicted and written again while a commit syncs its data file
    may hold bytes that sync did not cover: it stays unsynced, so a reader
    of it from the disk syncs first."""
    data = os.urandom(2 * BS)
    rig = Rig(tmp_path, {"f": data})
    syncing = threading.Event()
    gate = threading.Event()
    real_sync = os.fdatasync

    def slow_sync(fd: int) -> None:
        syncing.set()
        gate.wait(DEADLINE)
        real_sync(fd)

    async with rig.engine(io_uring=False) as cache:
        assert await read_sequential(cache, "f") == data
        await cache.flush()
        catalog_ = cache.catalog
        cf = catalog_.files["f"]
        catalog_.unmark(cf, 1)
        catalog_.mark(cf, 1)  # written again
        catalog_.note_written(cf)
        monkeypatch.setattr(store.os, "fdatasync", slow_sync)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.flush)
            with trio.fail_after(DEADLINE):
                while not syncing.is_set():
                    await trio.sleep(0.01)
            catalog_.unmark(cf, 1)  # evicted while the sync runs...
            catalog_.mark(cf, 1)  # ...and written again
            gate.set()
        assert cf.unsynced == {1}


async def test_a_commit_that_fails_one_sync_of_many_drops_only_unsynced_blocks(
    tmp_path, monkeypatch
):
    """A commit syncs many data files in a few jobs: when one sync fails, the
    cache disk counts as having lost what was not synced, and only that is
    fetched again; every file reads as the source's bytes."""
    files = {f"f{i}": os.urandom(BS + i) for i in range(4 * store.SYNC_JOBS)}
    rig = Rig(tmp_path, files)
    async with rig.engine(io_uring=False, disk_probe_interval=0.05) as cache:
        for name, data in files.items():
            assert await read_sequential(cache, name) == data  # written, not synced yet
        failing = cache.catalog.files["f5"].data.path
        synced: list[str] = []
        real_sync = os.fdatasync

        def sync_or_fail(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path == failing:
                with open(path, "r+b") as f:  # its writeback was lost
                    f.write(bytes(BS))
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_sync(fd)
            synced.append(path)

        monkeypatch.setattr(store.os, "fdatasync", sync_or_fail)
        monkeypatch.setattr(hits, "cached_pages", lambda fd, offset, length: 0)
        monkeypatch.setattr(hits, "read_nowait", lambda fd, buf, offset: 0)
        with pytest.raises(CacheDiskFailed):
            await cache.flush()
        assert synced  # the other jobs went on
        monkeypatch.setattr(store.os, "fdatasync", real_sync)
        with trio.fail_after(DEADLINE):
            await cache.disk.wait_usable()
        rig.reads()
        for name, data in files.items():
            assert await read_sequential(cache, name) == data
        fetched = {r["file_id"] for r in rig.reads()}
        assert "f5" in fetched
        assert not fetched & {n for n in files if cache.catalog.files[n].data.path in synced}
