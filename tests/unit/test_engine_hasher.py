"""Blocks fetched without content information are hashed later, off the read path."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import threading
from pathlib import Path

import pytest

from cachefs.engine.miss import hasher
from cachefs.threads import Workers
from tests.enginerig import BS, Rig, read_at, read_sequential

DATA = random.Random(23).randbytes(6 * BS + 321)


def block_hashes(data: bytes) -> bytes:
    return b"".join(hashlib.sha256(data[at : at + BS]).digest() for at in range(0, len(data), BS))


def present_in_index(cache_dir: Path, file_id: str) -> bytes:
    db = sqlite3.connect(cache_dir / "index.sqlite3")
    try:
        (present,) = db.execute("SELECT present FROM files WHERE file_id=?", (file_id,)).fetchone()
        return present
    finally:
        db.close()


async def test_fetched_blocks_are_hashed_after_the_read_and_kept(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(flush_interval=3600) as cache:
        assert await read_sequential(cache, "f") == DATA
        cf = cache.catalog.files["f"]
        await cache.flush()  # waits for the hasher
        assert cache.statistics()["unhashed_blocks"] == 0
        assert bytes(cf.hashes) == block_hashes(DATA)
        assert cf.unhashed is None
        assert present_in_index(rig.cache_dir, "f") == b"\x01" * 7
    rig.reads()
    async with rig.engine() as cache:  # a second mount trusts them: no call
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["corrupt_in_cache"] == 0
    assert rig.reads() == []


async def test_blocks_not_yet_hashed_are_committed_as_absent_and_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    stalled: list[hasher._Run] = []

    async def stall(self: hasher.Hasher, run: hasher._Run, urgent: bool = False) -> None:
        stalled.append(run)  # never hashed: as if the process ended first

    monkeypatch.setattr(hasher.Hasher, "_hash", stall)
    monkeypatch.setattr(hasher, "DRAIN_SECONDS", 0.0)
    async with rig.engine(flush_interval=3600) as cache:
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["unhashed_blocks"] == 7
        await cache.commit()  # the periodic flush: no waiting for the hasher
        assert present_in_index(rig.cache_dir, "f") == b"\x00" * 7
    assert stalled
    rig.reads()
    monkeypatch.undo()
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
        stats = cache.statistics()
        assert stats["corrupt_in_cache"] == 0  # absent, not damaged
    assert sum(r["bytes_read"] for r in rig.reads()) == len(DATA)  # all of it again


@pytest.mark.parametrize("verify", ["always", "off"])
async def test_only_verify_once_defers(tmp_path: Path, verify: str) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(verify=verify) as cache:
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["unhashed_blocks"] == 0  # hashed inline, or not at all
        cf = cache.catalog.files["f"]
        if verify == "always":
            assert bytes(cf.hashes) == block_hashes(DATA)
        else:
            assert cf.hashes is None


async def test_a_full_queue_means_hashing_inline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hasher, "QUEUE", 1)
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(max_fetch=BS) as cache:  # one block per fetch: seven runs
        for offset in range(0, len(DATA), BS):
            assert await read_at(cache, "f", offset, BS) == DATA[offset : offset + BS]
            assert cache.statistics()["unhashed_blocks"] <= 1
        await cache.flush()
        assert bytes(cache.catalog.files["f"].hashes) == block_hashes(DATA)


async def test_a_block_evicted_before_its_hash_gets_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def idle(self: hasher.Hasher) -> None:  # runs wait for the flush's drain
        pass

    monkeypatch.setattr(hasher.Hasher, "serve", idle)
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(flush_interval=3600) as cache:
        assert await read_sequential(cache, "f") == DATA
        cf = cache.catalog.files["f"]
        await cache.evictor.drop([(cf, 2)])  # LRU eviction does not wait for the hasher
        await cache.flush()
        hashes = block_hashes(DATA)
        assert cf.hashes[64:96] == bytes(32)  # never read from the hole
        for b in (0, 1, 3, 4, 5, 6):
            assert cf.hashes[32 * b : 32 * b + 32] == hashes[32 * b : 32 * b + 32]
        assert present_in_index(rig.cache_dir, "f") == b"\x01\x01\x00\x01\x01\x01\x01"
        assert await read_sequential(cache, "f") == DATA
        await cache.flush()
        assert bytes(cf.hashes) == hashes


async def test_a_purge_keeps_the_hashes_of_what_it_drops(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
        await cache.purge("f")
        assert bytes(cache.catalog.files["f"].hashes) == block_hashes(DATA)


async def test_the_hashing_thread_runs_at_low_priority() -> None:
    pool = Workers(1, "cachefs-hasher", on_start=hasher._lower_priority)
    try:
        nice = await pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    finally:
        pool.close()
    assert nice == 19


async def test_other_blocks_coming_and_going_do_not_keep_a_block_unhashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    files: list[object] = []
    real = hasher.hash_run

    def meanwhile(fd: int, start: int, end: int, block_size: int) -> list[bytes]:
        hashes = real(fd, start, end, block_size)
        for cf in files:  # another block of the file evicted or refetched meanwhile,
            cf.epoch += 1  # as when a whole file fails its check and heals
        return hashes

    monkeypatch.setattr(hasher, "hash_run", meanwhile)
    async with rig.engine(flush_interval=3600, max_fetch=BS) as cache:  # a run per block
        fh = await cache.open("f")
        files.append(cache.catalog.files["f"])
        await cache.close(fh)
        assert await read_sequential(cache, "f") == DATA
        await cache.flush()
        assert bytes(files[0].hashes) == block_hashes(DATA)
        assert present_in_index(rig.cache_dir, "f") == b"\x01" * 7
    rig.reads()
    async with rig.engine() as cache:  # nothing fetched twice
        assert await read_sequential(cache, "f") == DATA
    assert rig.reads() == []
