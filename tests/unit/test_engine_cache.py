"""Cache management: the size limit, LRU eviction, pins, purge, readahead."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing
from enginerig import BS, Rig, read_at, read_sequential

from cachefs import PinLimitExceeded

LIMIT = 16 * BS


def disk_usage(cache_dir: Path) -> int:
    """Bytes the cache's data files really occupy on disk."""
    return sum(e.stat().st_blocks * 512 for e in os.scandir(cache_dir / "data"))


async def test_the_limit_holds_under_four_parallel_readers(tmp_path):
    files = {f"f{i}": os.urandom(20 * BS + i) for i in range(4)}  # 5x the limit
    rig = Rig(tmp_path, files)
    max_fetches, max_fetch = 2, 2 * BS
    # In flight may overshoot; a file's partial last block takes a whole 4 KiB page.
    bound = LIMIT + max_fetches * max_fetch + 4096 * len(files)
    peak = 0
    async with rig.engine(
        cache_size=LIMIT, min_free=0, max_fetches=max_fetches, max_fetch=max_fetch
    ) as cache:

        async def reader(name: str) -> None:
            nonlocal peak
            rnd = random.Random(name)
            fh = await cache.open(name)
            for _ in range(60):
                offset = rnd.randrange(len(files[name]))
                got = await cache.read(fh, offset, rnd.randrange(1, 3 * BS))
                assert got == files[name][offset : offset + len(got)]
                peak = max(peak, disk_usage(rig.cache_dir))
            await cache.close(fh)

        async with trio.open_nursery() as nursery:
            for name in files:
                nursery.start_soon(reader, name)
        stats = cache.statistics()
        assert stats["cached_bytes"] <= LIMIT
        assert stats["evicted_bytes"] > 0
    assert peak <= bound
    assert disk_usage(rig.cache_dir) <= LIMIT + 4096 * len(files)


async def test_eviction_is_least_recently_read_first(tmp_path):
    files = {name: os.urandom(BS) for name in "abcde"}
    rig = Rig(tmp_path, files)
    async with rig.engine(cache_size=4 * BS, min_free=0) as cache:
        for name in "abcd":
            await read_at(cache, name, 0, 10)
        await read_at(cache, "a", 0, 10)  # a is now the most recently read
        await read_at(cache, "e", 0, 10)  # over the limit: b and c go first
        rig.calls()
        for name in "ade":
            assert await read_at(cache, name, 0, BS) == files[name]
        assert rig.reads() == []
        assert await read_at(cache, "b", 0, BS) == files["b"]
        assert [c["file_id"] for c in rig.reads()] == ["b"]


async def test_evicted_space_is_returned_to_the_filesystem(tmp_path):
    rig = Rig(tmp_path, {"big": os.urandom(8 * BS), "other": os.urandom(8 * BS)})
    async with rig.engine(cache_size=10 * BS, min_free=0) as cache:
        assert await read_sequential(cache, "big") == rig.memory._files["big"].data
        assert disk_usage(rig.cache_dir) >= 8 * BS
        await read_sequential(cache, "other")
        # A filesystem page per file of slack: extent blocks, a partial page.
        assert disk_usage(rig.cache_dir) <= 10 * BS + 2 * 4096


async def test_pinned_files_survive_pressure_and_remounts(tmp_path):
    files = {"pinned": os.urandom(6 * BS + 3), **{f"f{i}": os.urandom(8 * BS) for i in range(5)}}
    rig = Rig(tmp_path, files)
    async with rig.engine(cache_size=LIMIT, min_free=0) as cache:
        await cache.pin("pinned")
        assert cache.statistics()["pinned_bytes"] == len(files["pinned"])
        for i in range(5):
            await read_sequential(cache, f"f{i}")
        rig.calls()
        assert await read_sequential(cache, "pinned") == files["pinned"]
        assert rig.reads() == []
    async with rig.engine(cache_size=LIMIT, min_free=0) as cache:
        assert cache.pinned() == ["pinned"]
        for i in range(5):
            await read_sequential(cache, f"f{i}")
        rig.calls()
        assert await read_sequential(cache, "pinned") == files["pinned"]
        assert rig.reads() == []
        assert await cache.unpin("pinned")
        assert cache.statistics()["pinned_bytes"] == 0


async def test_pinning_beyond_the_limit_is_refused(tmp_path):
    rig = Rig(tmp_path, {"a": os.urandom(10 * BS), "b": os.urandom(10 * BS)})
    async with rig.engine(cache_size=LIMIT, min_free=0) as cache:
        await cache.pin("a")
        with pytest.raises(PinLimitExceeded, match="cannot pin b"):
            await cache.pin("b")
        assert cache.pinned() == ["a"]


async def test_purge_drops_unpinned_data(tmp_path):
    files = {"a": os.urandom(5 * BS), "p": os.urandom(3 * BS)}
    rig = Rig(tmp_path, files)
    async with rig.engine(min_free=0) as cache:
        await read_sequential(cache, "a")
        await cache.pin("p")
        assert await cache.purge("a") == 5 * BS
        assert await cache.purge("p") == 0
        assert disk_usage(rig.cache_dir) <= 3 * BS + 4096
        rig.calls()
        assert await read_sequential(cache, "a") == files["a"]
        assert rig.reads()


async def test_prefetch_then_remount_serves_with_zero_calls(tmp_path):
    files = {"a": os.urandom(5 * BS + 1), "d/b": os.urandom(100)}
    rig = Rig(tmp_path, files)
    async with rig.engine() as cache:
        for name in files:
            await cache.prefetch(name)
    assert all("WHOLE_FILE" in c["flags"] for c in rig.calls())
    async with rig.engine() as cache:
        for name, data in files.items():
            assert await read_sequential(cache, name) == data
    assert rig.calls() == []


async def test_readahead_windows_grow_and_stop_with_canceled_on_seek_away(tmp_path):
    data = os.urandom(128 * BS)  # 8 MiB
    rig = Rig(tmp_path, {"f": data})
    step = 2 * BS  # 128 KiB reads, like the kernel's
    mib = 1 << 20
    async with rig.engine(max_readahead=4 * mib) as cache:
        fh = await cache.open("f")
        reached, seen = [], []
        for i in range(4):
            assert await cache.read(fh, i * step, step) == data[i * step : (i + 1) * step]
            await trio.testing.wait_all_tasks_blocked()
            seen += rig.calls()
            reached.append(max(c["position"] + c["bytes_to_read"] for c in seen))
        ends = [(i + 1) * step for i in range(4)]
        # No readahead on the first read; then up to 1, 2, 4 MiB past the
        # reader, topped up in whole calls of up to half a window.
        assert reached[0] == ends[0]
        ahead = [r - e for r, e in zip(reached[1:], ends[1:], strict=True)]
        for got, window in zip(ahead, [mib, 2 * mib, 4 * mib], strict=True):
            assert window // 2 <= got <= window
        rig.calls()
        assert await cache.read(fh, 100 * BS, 10) == data[100 * BS : 100 * BS + 10]
        await cache.close(fh)
    after = rig.calls()
    assert after[0]["flags"] == ["CANCELED"]
    assert "RANDOM_STARTED" in after[1]["flags"]
    assert all(c["position"] >= 100 * BS or c["flags"] == ["CANCELED"] for c in after)


async def test_readahead_calls_are_whole_fetches(tmp_path):
    data = os.urandom(128 * BS)  # 8 MiB
    rig = Rig(tmp_path, {"f": data})
    step = 2 * BS  # 128 KiB reads, like the kernel's
    async with rig.engine(max_readahead=2 << 20, max_fetch=8 * BS) as cache:
        fh = await cache.open("f")
        for offset in range(0, len(data), step):
            assert await cache.read(fh, offset, step) == data[offset : offset + step]
            await trio.testing.wait_all_tasks_blocked()
        await cache.close(fh)
    sizes = [c["bytes_to_read"] for c in rig.reads()]
    # The reader's first two reads, then readahead alone, max_fetch a call
    # (never a sliver of a window) up to what is left at the end; each block once.
    assert sizes[:2] == [step, step]
    assert set(sizes[2:-1]) == {8 * BS} and 0 < sizes[-1] <= 8 * BS
    assert sum(sizes) == len(data)


async def test_fresh_blocks_are_not_evicted_before_older_ones(tmp_path):
    files = {name: os.urandom(4 * BS) for name in "abcd"}
    rig = Rig(tmp_path, files)
    async with rig.engine(cache_size=14 * BS, min_free=0) as cache:
        await read_sequential(cache, "a")
        await cache.prefetch("b")  # fetched after a, never read: still newer than a
        await read_sequential(cache, "c")
        await read_sequential(cache, "d")
        rig.calls()
        assert await read_sequential(cache, "b") == files["b"]
        assert rig.reads() == []


async def test_prefetching_a_file_larger_than_the_cache_ends_and_keeps_the_limit(tmp_path):
    big = os.urandom(64 * BS)
    rig = Rig(tmp_path, {"big": big})
    async with rig.engine(cache_size=LIMIT, min_free=0, max_fetches=2) as cache:
        await cache.prefetch("big")
        assert cache.statistics()["cached_bytes"] <= LIMIT
        assert cache.statistics()["bytes_from_backend"] == len(big)  # each block once
        assert await read_sequential(cache, "big") == big


async def test_readers_and_a_prefetch_under_pressure_make_progress(tmp_path):
    files = {f"f{i}": os.urandom(32 * BS + i) for i in range(4)}
    rig = Rig(tmp_path, files)
    async with rig.engine(cache_size=8 * BS, min_free=0, max_readahead=16 * BS) as cache:

        async def reader(name: str) -> None:
            assert await read_sequential(cache, name, 3 * BS) == files[name]

        async with trio.open_nursery() as nursery:
            for name in ("f0", "f1", "f2"):
                nursery.start_soon(reader, name)
            nursery.start_soon(cache.prefetch, "f3")
        # A cache this small thrashes (readahead is evicted before use), but no
        # fill evicts another's blocks before its reader got them over and over.
        assert cache.statistics()["bytes_from_backend"] <= 4 * sum(map(len, files.values()))
