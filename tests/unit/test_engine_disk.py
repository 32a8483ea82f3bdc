"""A failing cache disk is not a failing source (engine/state/disk.py), in process.

The cache disk is made to fail where the engine meets it (block writes, reads
of cached blocks, index commits) and made to work again; readers must get the
source's bytes all along, the latch must show in the statistics, and the
cache must take blocks again once the disk works.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3

import pytest
import trio
from enginerig import BS, Rig, read_at, read_sequential

from cachefs import CacheDiskFailed
from cachefs._linux import fileio
from cachefs.engine.hit import reader as hits
from cachefs.engine.state import catalog, store
from cachefs.engine.state.disk import CacheDisk

DATA = os.urandom(8 * BS + 123)
PROBE = 0.05
DEADLINE = 30.0
OTHER = os.urandom(5 * BS)


def failing(err: int):
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(err, os.strerror(err))

    return fail


async def test_a_full_cache_disk_serves_the_fetched_bytes_and_recovers(
    tmp_path, monkeypatch, caplog
):
    rig = Rig(tmp_path, {"f": DATA, "g": OTHER})
    async with rig.engine(disk_probe_interval=PROBE) as cache:
        with monkeypatch.context() as patch:
            patch.setattr(fileio, "pwrite_all", failing(errno.ENOSPC))
            with caplog.at_level(logging.WARNING, logger="cachefs"):
                assert await read_sequential(cache, "f") == DATA
            stats = cache.statistics()
            assert "No space left on device" in stats["cache_disk_error"]
            assert stats["cached_bytes"] == 0
            # Each byte came from the source once: what could not be stored was
            # served from the fetch buffer, not fetched again.
            assert stats["bytes_from_backend"] == len(DATA)
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1 and "cache disk failed" in warnings[0].getMessage()
            assert not any(r.exc_info for r in caplog.records)
            with pytest.raises(CacheDiskFailed):
                await cache.prefetch("g")  # a whole-file fetch cannot be kept
            assert await read_at(cache, "g", BS, 10) == OTHER[BS : BS + 10]
        # The disk works again: the probe finds out and lifts the latch.
        with trio.fail_after(DEADLINE):
            await cache.disk.wait_usable()
        assert cache.statistics()["cache_disk_error"] is None
        assert await read_sequential(cache, "f") == DATA
        rig.calls()
        assert await read_sequential(cache, "f") == DATA
        assert rig.calls() == []  # cached again


async def test_a_cache_disk_that_fails_to_read_falls_back_to_the_source(tmp_path, monkeypatch):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(io_uring=False, disk_probe_interval=PROBE) as cache:
        assert await read_sequential(cache, "f") == DATA
        await cache.flush()
        rig.calls()
        with monkeypatch.context() as patch:
            for name in ("read_nowait", "pread_into"):
                patch.setattr(hits, name, failing(errno.EIO))
            patch.setattr(fileio, "pwrite_all", failing(errno.EIO))
            assert await read_sequential(cache, "f") == DATA
            assert "Input/output error" in cache.statistics()["cache_disk_error"]
            assert rig.reads()  # from the source
        with trio.fail_after(DEADLINE):
            await cache.disk.wait_usable()
        assert cache.statistics()["cache_disk_error"] is None
        # Blocks read back before the failure are checked against their hashes
        # again before they are served: they may have been damaged.
        assert all(cf.verified is None for cf in cache.catalog.files.values())
        assert await read_sequential(cache, "f") == DATA


async def test_an_index_that_cannot_be_committed_latches_and_the_mount_goes_on(
    tmp_path, monkeypatch
):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(disk_probe_interval=PROBE) as cache:

        def broken(*args: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        with monkeypatch.context() as patch:
            patch.setattr(catalog.Catalog, "_write", broken)
            assert await read_sequential(cache, "f") == DATA
            with pytest.raises(CacheDiskFailed):
                await cache.flush()
            assert "disk I/O error" in cache.statistics()["cache_disk_error"]
            assert await read_sequential(cache, "f") == DATA
        with trio.fail_after(DEADLINE):
            await cache.disk.wait_usable()
        assert cache.statistics()["cache_disk_error"] is None
    # What was fetched while the index could not be written was committed by
    # the probe: a remount serves it without the source.
    rig.calls()
    async with rig.engine(disk_probe_interval=PROBE) as cache:
        assert await read_sequential(cache, "f") == DATA
    assert rig.calls() == []


async def test_a_block_that_cannot_be_read_back_is_fetched_again_not_latched_again(
    tmp_path, monkeypatch
):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(io_uring=False, disk_probe_interval=PROBE) as cache:
        assert await read_sequential(cache, "f") == DATA
        with monkeypatch.context() as patch:
            for name in ("read_nowait", "pread_into"):
                patch.setattr(hits, name, failing(errno.EIO))
            assert await read_at(cache, "f", 0, 4096) == DATA[:4096]  # one bad read
        # Dropped, so it is not read back again (a bad sector would latch the
        # disk again each time the probe lifted it).
        assert cache.catalog.files["f"].present[0] == 0
        with trio.fail_after(DEADLINE):
            await cache.disk.wait_usable()
        for _ in range(3):  # the block was dropped: fetched and stored anew, once
            assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["cache_disk_failures"] == 1


# ENOSPC too: thin storage that runs out fails the writeback of what it took.
@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
async def test_blocks_whose_sync_failed_are_never_served_from_the_disk(tmp_path, monkeypatch, err):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(disk_probe_interval=PROBE) as cache:
        assert await read_sequential(cache, "f") == DATA  # written, not synced yet
        with monkeypatch.context() as patch:
            patch.setattr(store.os, "fdatasync", failing(err))
            with pytest.raises(CacheDiskFailed):
                await cache.flush()
            # A failed sync may have lost the writes: the file reads as holes now.
            (path,) = (tmp_path / "cache" / "data").iterdir()
            path.write_bytes(bytes(path.stat().st_size))
            assert await read_sequential(cache, "f") == DATA
        with trio.fail_after(DEADLINE):
            await cache.disk.wait_usable()
        assert await read_sequential(cache, "f") == DATA


async def test_a_version_dropped_on_a_cache_disk_that_refuses_to_unlink(tmp_path, monkeypatch):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(ttl=0) as cache:
        assert await read_sequential(cache, "f") == DATA
        monkeypatch.setattr(store.os, "unlink", failing(errno.EROFS))
        rig.source.put("f", OTHER)
        assert await read_sequential(cache, "f") == OTHER


def test_running_out_of_file_descriptors_is_not_a_cache_disk_failure() -> None:
    disk = CacheDisk()
    error = disk.failed("opening a cache data file", OSError(errno.EMFILE, "too many"))
    assert isinstance(error, CacheDiskFailed) and disk.usable
