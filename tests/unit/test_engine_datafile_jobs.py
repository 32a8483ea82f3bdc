"""A data file no one holds open is opened, written and closed in one worker
job (engine/state/store.py): what happens around that job.

A file retired and unlinked while its job runs must not be left behind
(the job may have made it anew), and a file cut short by someone else
before a write is still noticed (``remade``), so no block it was said to
hold is read back as zeros.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.engine.state.store import DataFile, sync_files

BS = 4096
SIZE = 3 * BS


def block(n: int) -> memoryview:
    return memoryview(bytes([n]) * BS)


async def test_a_file_unlinked_during_its_write_job_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "7"
    data = DataFile(str(path), SIZE, BS)
    unlinked = threading.Event()
    real = DataFile._open_sized

    def open_after_unlink(self: DataFile) -> tuple[int, int]:
        unlinked.wait(10)  # the job opens (and so makes the file) after the unlink
        return real(self)

    monkeypatch.setattr(DataFile, "_open_sized", open_after_unlink)
    limiter = trio.CapacityLimiter(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(data.write_blocks, 0, block(1), None, False, limiter)
        await trio.testing.wait_all_tasks_blocked()
        data.retire()
        data.unlink()
        unlinked.set()
    assert not path.exists()


async def test_a_write_job_notices_a_file_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "8"
    data = DataFile(str(path), SIZE, BS)
    limiter = trio.CapacityLimiter(1)
    await data.write_blocks(0, block(1), None, False, limiter)
    await data.write_blocks(1, block(2), None, False, limiter)
    assert data.fd is None and data.remade is None  # no holder: every job had its own fd
    os.truncate(path, BS)  # someone else cuts it: block 1 is gone
    await data.write_blocks(2, block(3), None, False, limiter)
    assert data.remade == BS
    assert os.path.getsize(path) == SIZE


async def test_a_sync_of_a_file_no_one_holds_opens_nothing_on_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "9"
    data = DataFile(str(path), SIZE, BS)
    limiter = trio.CapacityLimiter(1)
    hashes, n = await data.write_blocks(0, block(4), None, True, limiter)
    assert n == BS and len(hashes) == 1
    await data.sync(limiter)
    assert data.fd is None and data.users == 0
    with open(path, "rb") as f:
        assert f.read(BS) == bytes(block(4))


async def test_a_file_said_to_hold_blocks_found_gone_is_known_remade_before_a_reader_opens_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write to a file that holds blocks opens it on the loop: a reader
    opening it while the write runs must learn that the blocks it was said
    to hold are gone, not read them back as zeros from a file made anew."""
    path = tmp_path / "10"
    data = DataFile(str(path), SIZE, BS)
    limiter = trio.CapacityLimiter(1)
    await data.write_blocks(0, block(5), None, False, limiter)
    os.unlink(path)  # lost: block 0 with it
    writing = threading.Event()
    release = threading.Event()
    real = DataFile._write_blocks

    def slow_write(self: DataFile, fd: int, **kwargs: object) -> tuple[list[bytes], int]:
        writing.set()
        release.wait(10)
        return real(self, fd, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DataFile, "_write_blocks", slow_write)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(data.write_blocks, 1, block(6), None, False, limiter)
        with trio.fail_after(10):
            while not writing.is_set():
                await trio.sleep(0.005)
        data.acquire()  # a reader, while the write runs
        try:
            assert data.remade == 0
        finally:
            data.release()
            release.set()


async def test_a_sync_never_makes_a_lost_file_anew_nor_calls_it_synced(tmp_path: Path) -> None:
    path = tmp_path / "11"
    data = DataFile(str(path), SIZE, BS)
    limiter = trio.CapacityLimiter(1)
    await data.write_blocks(0, block(7), None, False, limiter)
    os.unlink(path)
    synced: list[DataFile] = []
    await sync_files([data], limiter, synced.append)
    assert synced == [] and not path.exists() and data.remade == 0
    assert not await data.sync(limiter)
