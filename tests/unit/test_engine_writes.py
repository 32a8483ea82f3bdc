"""The engine's write path attacked: flush plans, result codes, conflicts,
latches, offline writes, a stopped engine, back-pressure.

Each test changes files through the engine over a memory source (under the
faulty and trace wrappers, tests/enginerig.py) and checks what a user would
notice: the source's bytes, the errors, the WriteData calls the backend saw.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import trio
from enginerig import BS, Rig

from backends.trace import read_trace
from cachefs import FileCache
from cachefs.errors import (
    ChangeRefused,
    NoSpace,
    NotFound,
    ReadOnly,
    StorageQuarantined,
    WriteFailed,
)

PAGE = 4096


def held(rig: Rig, path: str) -> bytes | None:
    f = rig.memory._files.get(path)
    return None if f is None else f.data


def writes(rig: Rig) -> list[dict[str, Any]]:
    return read_trace(rig.trace_path, op="write") if rig.trace_path.exists() else []


async def write_file(cache: FileCache, path: str, data: bytes, at: int = 0) -> None:
    """Write *data* at *at* of *path*, made if it does not exist (as open(O_CREAT))."""
    try:
        fh = await cache.open(path, write=True)
    except NotFound:
        fh = await cache.create(path, 0o644, exclusive=True)
    try:
        assert await cache.write(fh, at, data) == len(data)
    finally:
        await cache.close(fh)


async def read_all(cache: FileCache, path: str) -> bytes:
    fh = await cache.open(path)
    try:
        out = bytearray()
        while chunk := await cache.read(fh, len(out), 1 << 20):
            out += chunk
        return bytes(out)
    finally:
        await cache.close(fh)


async def test_a_new_file_is_one_whole_file_transfer_and_nothing_before_the_flush(tmp_path):
    rig = Rig(tmp_path, {})
    data = os.urandom(5 * (4 << 20) // 2 + 7)  # three calls of up to 4 MiB
    async with rig.engine(write_back_delay=3600) as cache:
        fh = await cache.create("new.bin", 0o640, exclusive=True)
        await cache.write(fh, 0, data)
        assert await cache.read(fh, 0, 10) == data[:10]
        await cache.close(fh)
        assert held(rig, "new.bin") is None  # written back later, not now
        assert (await cache.getattr("new.bin")).size == len(data)
        assert [e.name for e in await cache.list_dir("")] == ["new.bin"]
        report = await cache.flush_files()
        assert report.flushed == ["new.bin"]
    assert held(rig, "new.bin") == data
    calls = writes(rig)
    assert [c["flags"] for c in calls] == [
        ["WHOLE_FILE", "CONTINUOUS_STARTED", "TIL_END"],
        ["IN_PROGRESS", "WHOLE_FILE", "TIL_END"],
        ["WHOLE_FILE", "CONTINUOUS_FINISHED", "TIL_END"],
    ]
    assert [c["position"] for c in calls] == [0, 4 << 20, 8 << 20]
    assert {c["size"] for c in calls} == {len(data)}


async def test_a_change_in_the_middle_sends_only_the_changed_pages(tmp_path):
    old = os.urandom(3 * BS)
    rig = Rig(tmp_path, {"f": old})
    async with rig.engine(write_back_delay=3600) as cache:
        await write_file(cache, "f", b"x" * 10, at=BS + 5)
        await cache.flush_files()
    want = old[: BS + 5] + b"x" * 10 + old[BS + 15 :]
    assert held(rig, "f") == want
    (call,) = writes(rig)
    assert (call["position"], call["bytes_to_write"]) == (BS, PAGE)
    assert call["flags"] == ["RANDOM_STARTED", "RANDOM_FINISHED", "BEFORE_END"]


async def test_cut_then_grown_reads_zeros_in_the_gap_in_the_cache_and_in_the_source(tmp_path):
    old = bytes(range(256)) * 64  # 16 KiB
    rig = Rig(tmp_path, {"f": old})
    async with rig.engine(write_back_delay=3600) as cache:
        await cache.set_size("f", 1000)
        await cache.set_size("f", 9000)
        want = old[:1000] + bytes(8000)
        assert await read_all(cache, "f") == want
        await cache.flush_files()
        assert held(rig, "f") == want
        # A later change on top of the flushed state needs no other cut.
        await write_file(cache, "f", b"END", at=9000)
        await cache.flush_files()
    assert held(rig, "f") == want + b"END"


async def test_a_reader_opened_before_the_writer_sees_the_writes_at_once(tmp_path):
    old = os.urandom(2 * BS)
    rig = Rig(tmp_path, {"f": old})
    async with rig.engine(write_back_delay=3600) as cache:
        reader = await cache.open("f")
        assert await cache.read(reader, 0, 4) == old[:4]
        await write_file(cache, "f", b"NEW!")
        assert await cache.read(reader, 0, 4) == b"NEW!"
        assert await cache.read(reader, BS, 4) == old[BS : BS + 4]
        await cache.close(reader)


async def test_the_source_changed_under_a_dirty_file_keeps_both_versions(tmp_path):
    rig = Rig(tmp_path, {"doc.txt": b"base"})
    async with rig.engine(write_back_delay=3600) as cache:
        fh = await cache.open("doc.txt", write=True)
        await cache.write(fh, 0, b"mine")
        rig.memory.put("doc.txt", b"theirs")
        with pytest.raises(WriteFailed, match="conflict|changed in the source"):
            await cache.fsync(fh)
        await cache.close(fh)
        await cache.flush_files()
        names = sorted(e.name for e in await cache.list_dir(""))
        stats = cache.write_statistics()
    assert held(rig, "doc.txt") == b"theirs"
    (copy,) = [n for n in names if n.startswith("doc.txt.conflict-")]
    assert held(rig, copy) == b"mine"
    assert stats.conflicts == 1
    assert (await_no_dirty := stats.dirty_files) == 0, await_no_dirty


async def test_failure_is_retried_and_fsync_says_eio_meanwhile(tmp_path):
    rig = Rig(tmp_path, {})
    rig.faults([{"op": "write", "file": "*", "result": "FAILURE", "count": 1}])
    async with rig.engine(write_back_delay=3600) as cache:
        fh = await cache.create("f", 0o644, exclusive=True)
        await cache.write(fh, 0, b"data")
        with pytest.raises(WriteFailed):
            await cache.fsync(fh)
        assert held(rig, "f") is None
        await cache.fsync(fh)  # the fault was for one call only
        await cache.close(fh)
        assert cache.write_statistics().write_failures == 1
    assert held(rig, "f") == b"data"


async def test_partial_answers_get_the_rest(tmp_path):
    rig = Rig(tmp_path, {})
    data = os.urandom(3 * PAGE)
    rig.faults([{"op": "write", "file": "*", "result": "PARTIAL", "max_bytes": 1000, "count": 2}])
    async with rig.engine(write_back_delay=3600) as cache:
        await write_file(cache, "f", data)
        report = await cache.flush_files()
        assert report.flushed == ["f"], report
    assert held(rig, "f") == data
    positions = [c["position"] for c in writes(rig)]
    assert positions == [0, 1000, 2000]


async def test_file_failure_latches_until_reset_and_keeps_the_data(tmp_path):
    rig = Rig(tmp_path, {})
    rig.faults([{"op": "write", "file": "f", "result": "FILE_FAILURE", "count": 1}])
    async with rig.engine(write_back_delay=3600) as cache:
        await write_file(cache, "f", b"kept")
        report = await cache.flush_files()
        assert report.failed and report.failed[0][0] == "f"
        assert cache.write_statistics().latched == ["f"]
        report = await cache.flush_files()  # latched: not tried again
        assert len(writes(rig)) == 1
        assert await read_all(cache, "f") == b"kept"
        assert await cache.reset_file_errors(["f"]) == ["f"]
        await cache.flush_files()
        assert cache.write_statistics().latched == []
    assert held(rig, "f") == b"kept"


async def test_offline_writes_land_in_the_cache_and_flush_after_the_reset(tmp_path):
    rig = Rig(tmp_path, {"old": b"x" * 100})
    rig.faults([{"op": "write", "file": "*", "result": "PERMANENT_FAILURE", "count": 1}])
    async with rig.engine(write_back_delay=3600) as cache:
        assert await read_all(cache, "old") == b"x" * 100  # known to the cache, then offline
        await write_file(cache, "a", b"first")
        await cache.flush_files()
        assert cache.external_error is not None
        # Offline: new files, changes to cached files, fsync all work locally.
        fh = await cache.create("b", 0o644, exclusive=True)
        await cache.write(fh, 0, b"second")
        await cache.fsync(fh)
        await cache.close(fh)
        await write_file(cache, "old", b"yy", at=10)
        with pytest.raises(StorageQuarantined):  # names are written through: not offline
            await cache.make_dir("d", 0o755)
        assert held(rig, "a") is None and held(rig, "b") is None
        await cache.reset_external_error()
        await cache.flush_files()
    assert (held(rig, "a"), held(rig, "b")) == (b"first", b"second")
    assert held(rig, "old") == b"x" * 10 + b"yy" + b"x" * 88


async def test_a_stopped_engine_leaves_changes_that_the_next_one_flushes(tmp_path):
    rig = Rig(tmp_path, {"f": b"a" * 50})
    async with rig.engine(write_back_delay=3600) as cache:
        await write_file(cache, "f", b"BB", at=48)
        await write_file(cache, "g", b"new file")
        fh = await cache.open("f", write=True)
        await cache.write(fh, 0, b"C")  # still open when the engine stops
    assert held(rig, "f") == b"a" * 50 and held(rig, "g") is None
    async with rig.engine(write_back_delay=3600) as cache:
        assert await read_all(cache, "f") == b"C" + b"a" * 47 + b"BB"
        with trio.fail_after(10):
            while held(rig, "g") is None or held(rig, "f") == b"a" * 50:
                await trio.sleep(0.01)  # the recovered copies flush at start
        while cache.write_statistics().dirty_files:
            await trio.sleep(0.01)
    assert (held(rig, "f"), held(rig, "g")) == (b"C" + b"a" * 47 + b"BB", b"new file")


async def test_writers_wait_for_room_and_get_enospc_only_when_nothing_can_flush(tmp_path):
    rig = Rig(tmp_path, {})
    chunk = os.urandom(8 * PAGE)
    async with rig.engine(write_back_delay=3600, max_dirty=16 * PAGE) as cache:
        for i in range(6):  # three times max-dirty, in separate files
            await write_file(cache, f"f{i}", chunk)
        assert cache.write_statistics().dirty_bytes <= 16 * PAGE
        await cache.flush_files()
        rig.faults([{"op": "write", "file": "*", "result": "PERMANENT_FAILURE", "count": 1}])
        await write_file(cache, "g", chunk)
        await cache.flush_files()  # latches the storage
        fh = await cache.create("h", 0o644, exclusive=True)
        await cache.write(fh, 0, chunk[: 4 * PAGE])
        with pytest.raises(NoSpace):
            await cache.write(fh, 4 * PAGE, chunk)
        await cache.close(fh)
    assert all(held(rig, f"f{i}") == chunk for i in range(6))


async def test_names_go_through_and_unflushed_files_never_reach_the_source(tmp_path):
    rig = Rig(tmp_path, {"dir/a": b"A", "b": b"B"})
    async with rig.engine(write_back_delay=3600) as cache:
        await cache.make_dir("new", 0o755)
        await cache.rename("dir/a", "new/a")
        fh = await cache.create("tmp", 0o644, exclusive=True)
        await cache.write(fh, 0, b"scratch")
        await cache.close(fh)
        await cache.rename("tmp", "b")  # over an existing file: replaces it at the flush
        assert await read_all(cache, "b") == b"scratch"
        await write_file(cache, "gone", b"never flushed")
        await cache.remove_file("gone")
        with pytest.raises(ChangeRefused) as info:
            await cache.remove_dir("new")
        assert info.value.errno == errno.ENOTEMPTY
        with pytest.raises(ChangeRefused) as info:
            await cache.rename("b", "new/a", replace=False)
        assert info.value.errno == errno.EEXIST
        await cache.flush_files()
    assert (held(rig, "new/a"), held(rig, "dir/a"), held(rig, "b")) == (b"A", None, b"scratch")
    assert held(rig, "gone") is None and held(rig, "tmp") is None


async def test_a_read_only_mount_refuses_every_change(tmp_path):
    rig = Rig(tmp_path, {"f": b"data"})
    async with rig.engine(read_only=True) as cache:
        assert not cache.writable
        for change in (
            lambda: cache.open("f", write=True),
            lambda: cache.create("g", 0o644, exclusive=True),
            lambda: cache.set_size("f", 0),
            lambda: cache.make_dir("d", 0o755),
            lambda: cache.remove_file("f"),
            lambda: cache.rename("f", "g"),
        ):
            with pytest.raises(ReadOnly):
                await change()
        assert await read_all(cache, "f") == b"data"
    assert held(rig, "f") == b"data"


async def test_a_flush_cut_short_midway_is_finished_whole_without_a_conflict(tmp_path, monkeypatch):
    """The source took the first run of a random flush, then the engine stopped
    (as under kill -9): the next engine sends the file whole against the
    version that half-flush made, not a conflict copy and never a mix."""
    old = os.urandom(8 * PAGE)
    rig = Rig(tmp_path, {"f": old})
    memory = rig.memory
    real = type(memory).write_data
    calls = 0
    stuck = trio.Event()

    async def second_call_never_returns(self: Any, req: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            stuck.set()
            await trio.sleep_forever()
        await real(self, req)

    monkeypatch.setattr(type(memory), "write_data", second_call_never_returns)
    async with rig.engine(write_back_delay=3600) as cache:
        fh = await cache.open("f", write=True)
        await cache.write(fh, 0, b"A" * 10)  # page 0
        await cache.write(fh, 4 * PAGE, b"B" * 10)  # page 4: a second run
        await cache.close(fh)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cache.flush_files)
            await stuck.wait()
            nursery.cancel_scope.cancel()  # the daemon goes away mid-flush
    half = held(rig, "f")
    assert half is not None and half[:10] == b"A" * 10  # the first run reached the source
    assert half[4 * PAGE : 4 * PAGE + 10] != b"B" * 10  # the second did not
    monkeypatch.setattr(type(memory), "write_data", real)
    want = b"A" * 10 + old[10 : 4 * PAGE] + b"B" * 10 + old[4 * PAGE + 10 :]
    async with rig.engine(write_back_delay=3600) as cache:
        await cache.flush_files()
        assert cache.write_statistics().conflicts == 0
        names = [e.name for e in await cache.list_dir("")]
    assert held(rig, "f") == want
    assert names == ["f"]


async def test_a_failure_on_the_first_change_leaves_a_later_conflict_a_conflict(tmp_path):
    """A flush the source refused before changing anything does not make the
    next one overwrite: a change made meanwhile in the source is kept."""
    rig = Rig(tmp_path, {"f": b"base"})
    rig.faults([{"op": "write", "file": "*", "result": "FAILURE", "count": 1}])
    async with rig.engine(write_back_delay=3600) as cache:
        await write_file(cache, "f", b"mine")
        assert (await cache.flush_files()).failed
        rig.memory.put("f", b"theirs")
        await cache.flush_files()
        assert cache.write_statistics().conflicts == 1
    assert held(rig, "f") == b"theirs"


async def test_a_file_extended_by_truncate_takes_no_room_and_is_no_change_to_send(tmp_path):
    rig = Rig(tmp_path, {"f": b"x" * 100})
    async with rig.engine(write_back_delay=3600, cache_size=64 * BS, min_free=0) as cache:
        before = cache.space()[1]
        await cache.set_size("f", 1 << 40)  # holes, not bytes (never flushed here)
        assert cache.space()[1] >= before - PAGE
        assert cache.write_statistics().dirty_bytes == 0
