"""The cache survives restarts, rebuilds what it cannot trust, refuses bad input."""

from __future__ import annotations

import os
import sqlite3

import pytest
from enginerig import BS, Rig, read_at, read_sequential

from cachefs import CacheConfig, CacheDirError, CacheDirInUse, InvalidBlockSize, open_file_cache

DATA = os.urandom(5 * BS + 9)
SMALL = os.urandom(1000)


async def fill(rig: Rig) -> None:
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        assert await read_sequential(cache, "s") == SMALL
    assert rig.reads()


async def test_a_second_engine_serves_the_same_bytes_with_zero_calls(tmp_path):
    rig = Rig(tmp_path, {"d/f": DATA, "s": SMALL})
    await fill(rig)
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        assert await read_at(cache, "s", 10, 100) == SMALL[10:110]
        assert cache.statistics()["cached_bytes"] == len(DATA) + len(SMALL)
    assert rig.calls() == []


async def test_metadata_is_committed_only_after_the_data(tmp_path):
    rig = Rig(tmp_path, {"d/f": DATA, "s": SMALL})
    async with rig.engine(flush_interval=3600) as cache:
        assert await read_at(cache, "s", 0, 10) == SMALL[:10]
        db = sqlite3.connect(cache.cache_dir / "index.sqlite3")
        assert db.execute("SELECT count(*) FROM files").fetchone() == (0,)
        await cache.flush()
        (present,) = db.execute("SELECT present FROM files WHERE file_id='s'").fetchone()
        assert present == b"\x01"
        db.close()


async def test_a_deleted_data_file_is_refetched_not_served(tmp_path):
    rig = Rig(tmp_path, {"d/f": DATA, "s": SMALL})
    await fill(rig)
    for entry in os.scandir(rig.cache_dir / "data"):
        os.truncate(entry.path, 0) if entry.stat().st_size > 1000 else os.unlink(entry.path)
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        assert await read_sequential(cache, "s") == SMALL
    assert rig.reads()


@pytest.mark.parametrize("damage", ["garbage", "deleted", "truncated"])
async def test_a_damaged_index_gives_an_empty_cache_never_wrong_bytes(tmp_path, damage):
    rig = Rig(tmp_path, {"d/f": DATA, "s": SMALL})
    await fill(rig)
    db = rig.cache_dir / "index.sqlite3"
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    elif damage == "deleted":
        db.unlink()
    else:
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 2)
    rig.memory.put("s", b"changed")  # the source moved on: old bytes must not come back
    async with rig.engine() as cache:
        assert cache.statistics()["cached_bytes"] == 0
        assert await read_sequential(cache, "d/f") == DATA
        assert await read_sequential(cache, "s") == b"changed"


async def test_a_new_block_size_starts_the_cache_afresh(tmp_path):
    rig = Rig(tmp_path, {"d/f": DATA, "s": SMALL})
    await fill(rig)
    async with rig.engine(block_size=2 * BS) as cache:
        assert cache.statistics()["cached_bytes"] == 0
        assert await read_sequential(cache, "d/f") == DATA


async def test_a_cache_dir_in_use_is_refused(tmp_path):
    rig = Rig(tmp_path)
    async with rig.engine():
        with pytest.raises(CacheDirInUse, match=f"pid {os.getpid()}"):
            async with rig.engine():
                pass
    async with rig.engine():  # released on exit
        pass


@pytest.mark.parametrize("size", [0, 3000, 6 << 10, 128 << 20, 2 << 10])
async def test_bad_block_sizes_are_refused(tmp_path, size):
    with pytest.raises(InvalidBlockSize, match="power of two between 4K and 64M"):
        async with open_file_cache(Rig(tmp_path).backend, tmp_path, CacheConfig(block_size=size)):
            pass


async def test_a_missing_cache_dir_is_refused(tmp_path):
    with pytest.raises(CacheDirError, match="does not exist"):
        async with open_file_cache(Rig(tmp_path).backend, tmp_path / "nope"):
            pass


async def test_a_file_as_cache_dir_is_refused(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CacheDirError, match="not a directory"):
        async with open_file_cache(Rig(tmp_path).backend, tmp_path / "file"):
            pass


async def test_start_up_gives_back_space_of_blocks_written_but_never_marked(tmp_path):
    rig = Rig(tmp_path, {"d/f": DATA, "s": SMALL})
    async with rig.engine() as cache:
        assert await read_at(cache, "d/f", 0, 10) == DATA[:10]
    (data_file,) = [
        e.path for e in os.scandir(rig.cache_dir / "data") if e.stat().st_size == len(DATA)
    ]
    with open(data_file, "r+b") as f:  # a fill that crashed before its blocks were marked
        f.seek(2 * BS)
        f.write(os.urandom(3 * BS))
    assert os.stat(data_file).st_blocks * 512 >= 4 * BS
    async with rig.engine() as cache:
        assert os.stat(data_file).st_blocks * 512 <= BS + 4096
        assert cache.statistics()["cached_bytes"] == BS
        assert await read_sequential(cache, "d/f") == DATA
