"""Writing to backends: WriteData transfers and namespace changes of the local
and memory backends, and the wrappers (trace, faulty, throttled) over them."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from backends.faulty import FaultyBackend
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from backends.throttled import MiB, ThrottledBackend
from backends.trace import TraceBackend, read_trace
from backends.wrapper import Wrapper
from cachefs.contract import (
    ChangeResult,
    DirEntry,
    FileAttrs,
    FileKind,
    ReadData,
    RWEvent,
    RWResult,
    WritableBackend,
    WriteCapability,
    WriteData,
)
from cachefs.errors import RulesError

OLD = b"0123456789"
NEW = b"a new content, longer than the old one"
WHOLE = RWEvent.WHOLE_FILE | RWEvent.TIL_END
ALL_CAPS = (
    WriteCapability.RANDOM_WRITES
    | WriteCapability.RENAME
    | WriteCapability.RENAME_DIRS
    | WriteCapability.SYMLINKS
    | WriteCapability.MODES
    | WriteCapability.TIMES
    | WriteCapability.EMPTY_DIRS
)

Writable = LocalBackend | MemoryBackend


class Side:
    """A writable backend, and what its storage holds as seen from outside it."""

    def __init__(self, backend: Writable, root: Path | None) -> None:
        self.backend = backend
        self.root = root

    def content(self, path: str) -> bytes | None:
        if self.root is not None:
            p = self.root / path
            return p.read_bytes() if p.is_file() and not p.is_symlink() else None
        assert isinstance(self.backend, MemoryBackend)
        f = self.backend._files.get(path)
        return None if f is None else f.data

    def put(self, path: str, data: bytes) -> None:
        """Change a file behind the backend's back (another writer)."""
        if self.root is not None:
            (self.root / path).write_bytes(data)
        else:
            assert isinstance(self.backend, MemoryBackend)
            self.backend.put(path, data)

    async def listed(self, dir_id: str = "") -> set[str]:
        return {e.name for e in await self.backend.list_dir(dir_id)}

    async def version(self, file_id: str) -> str:
        attrs = await self.backend.stat(file_id)
        assert attrs is not None, file_id
        return attrs.version


@pytest.fixture(params=["local", "memory"])
def side(request: pytest.FixtureRequest, tmp_path: Path) -> Side:
    """data.bin holding OLD, and an empty directory sub/."""
    if request.param == "local":
        root = tmp_path / "src"
        (root / "sub").mkdir(parents=True)
        (root / "data.bin").write_bytes(OLD)
        (tmp_path / "outside").mkdir()
        return Side(LocalBackend(root), root)
    mem = MemoryBackend({"data.bin": OLD})
    mem.mkdir("sub")
    return Side(mem, None)


def call(
    file_id: str,
    position: int,
    data: bytes,
    flags: RWEvent,
    *,
    size: int,
    version: str = "",
    context: object = None,
) -> WriteData:
    return WriteData(
        file_id=file_id,
        size=size,
        position=position,
        flags=flags,
        buffer=memoryview(data).toreadonly(),
        bytes_to_write=len(data),
        file_context=context,
        version=version,
    )


async def write_whole(
    backend: Any, file_id: str, data: bytes, version: str = "", pieces: int = 2
) -> WriteData:
    """A whole-file transfer of *data* in *pieces* calls; the last call, or
    the first one that failed."""
    step = max(1, -(-len(data) // pieces))
    starts = list(range(0, len(data), step)) or [0]
    context: object = None
    for i, start in enumerate(starts):
        flags = WHOLE | (RWEvent.CONTINUOUS_STARTED if i == 0 else RWEvent.IN_PROGRESS)
        if i == len(starts) - 1:
            flags = flags & ~RWEvent.IN_PROGRESS | RWEvent.CONTINUOUS_FINISHED
        req = call(
            file_id,
            start,
            data[start : start + step],
            flags,
            size=len(data),
            version=version,
            context=context,
        )
        await backend.write_data(req)
        if req.result_code is not RWResult.SUCCESS:
            return req
        context = req.file_context
    return req


async def cancel(backend: Any, req: WriteData) -> None:
    await backend.write_data(
        call(
            req.file_id,
            0,
            b"",
            RWEvent.WHOLE_FILE | RWEvent.CANCELED,
            size=req.size,
            version=req.version,
            context=req.file_context,
        )
    )


def failed(result: ChangeResult, error: int) -> bool:
    return (result.result_code, result.error) == (RWResult.FILE_FAILURE, error)


# -- whole-file transfers ------------------------------------------------------------


async def test_a_new_file_is_created_by_a_whole_file_transfer(side: Side) -> None:
    b = side.backend
    assert b.write_capabilities == ALL_CAPS
    req = await write_whole(b, "sub/new.txt", NEW, pieces=3)
    assert (req.result_code, req.bytes_written) == (RWResult.SUCCESS, req.bytes_to_write)
    assert side.content("sub/new.txt") == NEW
    assert req.new_version == await side.version("sub/new.txt")

    again = await write_whole(b, "sub/new.txt", b"other")
    assert again.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert side.content("sub/new.txt") == NEW
    assert await side.listed("sub") == {"new.txt"}


async def test_an_empty_new_file_is_one_call(side: Side) -> None:
    req = await write_whole(side.backend, "empty", b"")
    assert req.result_code is RWResult.SUCCESS
    assert side.content("empty") == b""
    assert req.new_version == await side.version("empty")


async def test_a_new_file_in_a_missing_directory_is_refused(side: Side) -> None:
    req = await write_whole(side.backend, "nodir/new.txt", NEW)
    assert req.result_code is RWResult.FILE_FAILURE
    assert await side.backend.stat("nodir/new.txt") is None


async def test_a_whole_file_replaces_the_old_one_at_the_end_only(side: Side) -> None:
    b = side.backend
    version = await side.version("data.bin")
    first = call(
        "data.bin", 0, NEW[:10], WHOLE | RWEvent.CONTINUOUS_STARTED, size=len(NEW), version=version
    )
    await b.write_data(first)
    assert first.result_code is RWResult.SUCCESS
    assert side.content("data.bin") == OLD  # mid-transfer: the old content, whole
    assert await side.listed() == {"data.bin", "sub"}
    last = call(
        "data.bin",
        10,
        NEW[10:],
        WHOLE | RWEvent.CONTINUOUS_FINISHED,
        size=len(NEW),
        version=version,
        context=first.file_context,
    )
    await b.write_data(last)
    assert last.result_code is RWResult.SUCCESS
    assert side.content("data.bin") == NEW
    assert last.new_version == await side.version("data.bin") != version
    assert await side.listed() == {"data.bin", "sub"}


async def test_a_reader_that_opened_mid_transfer_reads_the_old_content_whole(
    tmp_path: Path,
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "data.bin").write_bytes(OLD)
    b = LocalBackend(root)
    version = await b.stat("data.bin")
    assert version is not None
    first = call(
        "data.bin",
        0,
        NEW[:5],
        WHOLE | RWEvent.CONTINUOUS_STARTED,
        size=len(NEW),
        version=version.version,
    )
    await b.write_data(first)
    with open(root / "data.bin", "rb") as reader:
        last = call(
            "data.bin",
            5,
            NEW[5:],
            WHOLE | RWEvent.CONTINUOUS_FINISHED,
            size=len(NEW),
            version=version.version,
            context=first.file_context,
        )
        await b.write_data(last)
        assert last.result_code is RWResult.SUCCESS
        assert reader.read() == OLD
    assert (root / "data.bin").read_bytes() == NEW


async def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "data.bin").write_bytes(OLD)
    os.chmod(root / "data.bin", 0o640)
    b = LocalBackend(root)
    req = await write_whole(b, "data.bin", NEW, (await b.stat("data.bin")).version)  # type: ignore[union-attr]
    assert req.result_code is RWResult.SUCCESS
    assert os.stat(root / "data.bin").st_mode & 0o7777 == 0o640


async def test_a_canceled_transfer_leaves_the_old_content_and_no_temporary_file(
    side: Side,
) -> None:
    b = side.backend
    version = await side.version("data.bin")
    first = call(
        "data.bin", 0, NEW[:10], WHOLE | RWEvent.CONTINUOUS_STARTED, size=len(NEW), version=version
    )
    await b.write_data(first)
    new = call("fresh", 0, NEW[:10], WHOLE | RWEvent.CONTINUOUS_STARTED, size=len(NEW))
    await b.write_data(new)
    assert (first.result_code, new.result_code) == (RWResult.SUCCESS, RWResult.SUCCESS)
    await cancel(b, first)
    await cancel(b, new)
    assert side.content("data.bin") == OLD
    assert await side.version("data.bin") == version
    assert await b.stat("fresh") is None
    assert await side.listed() == {"data.bin", "sub"}
    if side.root is not None:
        assert set(os.listdir(side.root)) == {"data.bin", "sub"}


async def test_closing_the_backend_drops_unfinished_transfers(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    b = LocalBackend(root)
    req = call("fresh", 0, NEW, WHOLE | RWEvent.CONTINUOUS_STARTED, size=2 * len(NEW))
    await b.write_data(req)
    assert len(os.listdir(root)) == 1  # the temporary file, never shown
    assert await b.list_dir("") == []
    await b.aclose()
    assert os.listdir(root) == []


async def test_a_file_changed_before_the_end_is_not_overwritten(side: Side) -> None:
    b = side.backend
    version = await side.version("data.bin")
    first = call(
        "data.bin", 0, NEW[:10], WHOLE | RWEvent.CONTINUOUS_STARTED, size=len(NEW), version=version
    )
    await b.write_data(first)
    side.put("data.bin", b"theirs")
    last = call(
        "data.bin",
        10,
        NEW[10:],
        WHOLE | RWEvent.CONTINUOUS_FINISHED,
        size=len(NEW),
        version=version,
        context=first.file_context,
    )
    await b.write_data(last)
    assert last.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert side.content("data.bin") == b"theirs"
    await cancel(b, last)  # as the cache does after a failure: nothing left to drop
    assert await side.listed() == {"data.bin", "sub"}
    if side.root is not None:
        assert set(os.listdir(side.root)) == {"data.bin", "sub"}


async def test_a_stale_version_is_refused_and_nothing_changes(side: Side) -> None:
    b = side.backend
    stale = await side.version("data.bin")
    side.put("data.bin", b"theirs!!")
    whole = await write_whole(b, "data.bin", NEW, stale)
    assert whole.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    rand = call(
        "data.bin", 0, b"XX", RWEvent.RANDOM_STARTED | RWEvent.BEFORE_END, size=8, version=stale
    )
    await b.write_data(rand)
    assert (rand.result_code, rand.bytes_written) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    gone = await write_whole(b, "missing.bin", NEW, stale)
    assert gone.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert side.content("data.bin") == b"theirs!!"
    assert await side.listed() == {"data.bin", "sub"}


# -- random transfers ---------------------------------------------------------------


async def test_random_writes_land_in_place(side: Side) -> None:
    b = side.backend
    version = await side.version("data.bin")
    first = call(
        "data.bin",
        2,
        b"ab",
        RWEvent.RANDOM_STARTED | RWEvent.BEFORE_END,
        size=len(OLD),
        version=version,
    )
    await b.write_data(first)
    assert (first.result_code, first.bytes_written) == (RWResult.SUCCESS, 2)
    assert side.content("data.bin") == b"01ab456789"  # in place, at once
    last = call(
        "data.bin",
        8,
        b"XY",
        RWEvent.RANDOM_FINISHED | RWEvent.TIL_END,
        size=len(OLD),
        version=version,
        context=first.file_context,
    )
    await b.write_data(last)
    assert last.result_code is RWResult.SUCCESS
    assert side.content("data.bin") == b"01ab4567XY"
    assert last.new_version == await side.version("data.bin")


async def test_a_call_without_a_transfer_fails(side: Side) -> None:
    req = call("data.bin", 0, b"ab", RWEvent.IN_PROGRESS | RWEvent.BEFORE_END, size=10)
    await side.backend.write_data(req)
    assert req.result_code is RWResult.FAILURE
    assert side.content("data.bin") == OLD


async def test_a_full_disk_is_a_failure_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "src"
    root.mkdir()
    b = LocalBackend(root)

    def full(fd: int, data: Any, position: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    req = await write_whole(b, "new.bin", NEW)
    assert (req.result_code, req.bytes_written) == (RWResult.FAILURE, 0)
    assert os.listdir(root) == []  # the temporary file is gone


# -- namespace changes --------------------------------------------------------------


async def test_set_size_cuts_and_extends_with_a_precondition(side: Side) -> None:
    b = side.backend
    version = await side.version("data.bin")
    cut = await b.set_size("data.bin", 4, version)
    assert cut.result_code is RWResult.SUCCESS
    assert side.content("data.bin") == b"0123"
    assert cut.attrs is not None and cut.attrs.version == await side.version("data.bin")
    stale = await b.set_size("data.bin", 0, version)
    assert stale.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    grown = await b.set_size("data.bin", 6, "")
    assert grown.result_code is RWResult.SUCCESS
    assert side.content("data.bin") == b"0123\0\0"
    assert failed(await b.set_size("sub", 0, ""), errno.EISDIR)
    assert failed(await b.set_size("missing", 0, ""), errno.ENOENT)


async def test_rename_with_and_without_replace(side: Side) -> None:
    b = side.backend
    await write_whole(b, "other.bin", NEW)
    refused = await b.rename("data.bin", "other.bin", False)
    assert failed(refused, errno.EEXIST)
    assert (side.content("data.bin"), side.content("other.bin")) == (OLD, NEW)
    moved = await b.rename("data.bin", "other.bin", True)
    assert moved.result_code is RWResult.SUCCESS
    assert moved.attrs is not None and moved.attrs.size == len(OLD)
    assert (side.content("data.bin"), side.content("other.bin")) == (None, OLD)
    fresh = await b.rename("other.bin", "sub/fresh.bin", False)
    assert fresh.result_code is RWResult.SUCCESS
    assert side.content("sub/fresh.bin") == OLD
    assert failed(await b.rename("missing", "x", True), errno.ENOENT)


async def test_rename_a_directory_with_what_is_in_it(side: Side) -> None:
    b = side.backend
    await write_whole(b, "sub/inner.txt", NEW)
    assert (await b.rename("sub", "moved", False)).result_code is RWResult.SUCCESS
    assert await side.listed() == {"data.bin", "moved"}
    assert side.content("moved/inner.txt") == NEW
    assert failed(await b.rename("moved", "moved/deeper", False), errno.EINVAL)
    assert failed(await b.rename("data.bin", "moved", True), errno.EISDIR)


async def test_make_and_remove_directories_and_files(side: Side) -> None:
    b = side.backend
    made = await b.make_dir("sub/deep", 0o750)
    assert made.result_code is RWResult.SUCCESS
    assert made.attrs is not None and (made.attrs.kind, made.attrs.mode) == (FileKind.DIR, 0o750)
    assert (await b.stat("sub/deep")).mode == 0o750  # type: ignore[union-attr]
    assert failed(await b.make_dir("sub/deep", None), errno.EEXIST)
    assert failed(await b.make_dir("nodir/deep", None), errno.ENOENT)
    assert failed(await b.remove_dir("sub"), errno.ENOTEMPTY)
    assert (await b.remove_dir("sub/deep")).result_code is RWResult.SUCCESS
    assert await side.listed("sub") == set()  # the parent stays, empty
    assert failed(await b.remove_dir("sub/deep"), errno.ENOENT)
    assert failed(await b.remove_dir("data.bin"), errno.ENOTDIR)
    assert failed(await b.remove_file("sub", ""), errno.EISDIR)

    version = await side.version("data.bin")
    side.put("data.bin", b"theirs")
    stale = await b.remove_file("data.bin", version)
    assert stale.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert side.content("data.bin") == b"theirs"
    current = await side.version("data.bin")
    assert (await b.remove_file("data.bin", current)).result_code is RWResult.SUCCESS
    assert await b.stat("data.bin") is None
    assert failed(await b.remove_file("data.bin", ""), errno.ENOENT)
    assert (await b.remove_dir("sub")).result_code is RWResult.SUCCESS
    assert await side.listed() == set()


async def test_symlinks_are_made_as_given_and_never_followed(side: Side) -> None:
    b = side.backend
    made = await b.make_symlink("ln", "../outside/secret")
    assert made.result_code is RWResult.SUCCESS
    attrs = await b.stat("ln")
    assert attrs is not None
    assert (attrs.kind, attrs.link_target) == (FileKind.SYMLINK, "../outside/secret")
    assert made.attrs == attrs
    assert failed(await b.make_symlink("ln", "data.bin"), errno.EEXIST)
    assert failed(await b.make_symlink("data.bin", "x"), errno.EEXIST)
    if side.root is not None:
        assert os.readlink(side.root / "ln") == "../outside/secret"
    assert (await b.remove_file("ln", attrs.version)).result_code is RWResult.SUCCESS
    assert await b.stat("ln") is None


async def test_set_attrs_sets_the_mode_and_the_modification_time(side: Side) -> None:
    b = side.backend
    done = await b.set_attrs("data.bin", 0o600, 1_000_000_000.5)
    assert done.result_code is RWResult.SUCCESS
    attrs = await b.stat("data.bin")
    assert attrs is not None and (attrs.mode, attrs.mtime) == (0o600, 1_000_000_000.5)
    assert done.attrs == attrs
    kept = await b.set_attrs("data.bin", None, None)
    assert kept.attrs is not None and (kept.attrs.mode, kept.attrs.mtime) == (0o600, 1e9 + 0.5)
    assert (await b.set_attrs("sub", 0o700, None)).result_code is RWResult.SUCCESS
    assert (await b.stat("sub")).mode == 0o700  # type: ignore[union-attr]
    await b.make_symlink("ln", "data.bin")
    assert (await b.set_attrs("ln", 0o600, 2e9)).result_code is RWResult.SUCCESS
    link = await b.stat("ln")
    assert link is not None and (link.kind, link.mtime) == (FileKind.SYMLINK, 2e9)
    assert (await b.stat("data.bin")).mode == 0o600  # type: ignore[union-attr]
    assert failed(await b.set_attrs("missing", 0o600, None), errno.ENOENT)


@pytest.mark.parametrize("escape", ["../outside/x", "sub/../../outside/x", "/etc/x", "a/./b"])
async def test_paths_never_escape(side: Side, escape: str, tmp_path: Path) -> None:
    b = side.backend
    assert (await write_whole(b, escape, NEW)).result_code is RWResult.FILE_FAILURE
    assert failed(await b.make_dir(escape, None), errno.ENOENT)
    assert failed(await b.make_symlink(escape, "/etc/passwd"), errno.ENOENT)
    assert failed(await b.rename("data.bin", escape, True), errno.ENOENT)
    assert failed(await b.rename(escape, "data.bin", True), errno.ENOENT)
    assert failed(await b.remove_file(escape, ""), errno.ENOENT)
    assert failed(await b.set_size(escape, 0, ""), errno.ENOENT)
    assert failed(await b.set_attrs(escape, 0o777, None), errno.ENOENT)
    assert side.content("data.bin") == OLD
    if side.root is not None:
        assert os.listdir(tmp_path / "outside") == []


async def test_the_root_is_never_changed(side: Side) -> None:
    b = side.backend
    assert failed(await b.remove_dir(""), errno.EBUSY)
    assert failed(await b.rename("", "elsewhere", True), errno.EBUSY)
    assert failed(await b.rename("sub", "", True), errno.EBUSY)
    assert (await write_whole(b, "", NEW)).result_code is RWResult.FILE_FAILURE


async def test_local_changes_never_pass_a_symlinked_directory(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "out").symlink_to(tmp_path / "outside")
    b = LocalBackend(root)
    assert failed(await b.make_dir("out/d", None), errno.ENOENT)
    assert (await write_whole(b, "out/f", NEW)).result_code is RWResult.FILE_FAILURE
    assert os.listdir(tmp_path / "outside") == []
    # The link itself is an entry like any other.
    assert (await b.rename("out", "renamed", False)).result_code is RWResult.SUCCESS
    assert os.readlink(root / "renamed") == str(tmp_path / "outside")


async def test_local_temporary_names_are_never_shown(tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / ".data.bin.cachefs-0123abcd").write_bytes(b"partial")
    (root / ".data.bin.cachefs-not-ours").write_bytes(b"a user's")
    b = LocalBackend(root)
    assert {e.name for e in await b.list_dir("")} == {".data.bin.cachefs-not-ours"}
    assert await b.stat(".data.bin.cachefs-0123abcd") is None


# -- wrappers -------------------------------------------------------------------------


class ReadOnly:
    """A backend with the read calls only."""

    def __init__(self) -> None:
        self.mem = MemoryBackend({"f": OLD})

    async def stat(self, file_id: str) -> FileAttrs | None:
        return await self.mem.stat(file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        return await self.mem.list_dir(dir_id)

    async def open_file(self, file_id: str) -> object:
        return await self.mem.open_file(file_id)

    async def close_file(self, file_id: str, context: object) -> None:
        await self.mem.close_file(file_id, context)

    async def read_data(self, req: ReadData) -> None:
        await self.mem.read_data(req)

    async def aclose(self) -> None:
        pass

    def __repr__(self) -> str:
        return "ReadOnly()"


def writable(backend: object) -> bool:
    """How the cache decides whether it may write to *backend*."""
    return isinstance(backend, WritableBackend) and backend.write_capabilities != 0


async def test_wrappers_are_as_writable_as_what_they_wrap(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text("[]")
    assert not writable(ReadOnly())
    for wrapped in (
        Wrapper(ReadOnly()),
        TraceBackend(FaultyBackend(ReadOnly(), rules), tmp_path / "t"),
        ThrottledBackend(ReadOnly()),
    ):
        assert not writable(wrapped)
        with pytest.raises(NotImplementedError, match=r"ReadOnly\(\) is read-only"):
            await wrapped.make_dir("d", None)
    stacked = TraceBackend(
        FaultyBackend(ThrottledBackend(MemoryBackend(), latency=0), rules), tmp_path / "t"
    )
    assert writable(stacked) and stacked.write_capabilities == ALL_CAPS
    assert (await write_whole(stacked, "f", NEW)).result_code is RWResult.SUCCESS
    assert (await stacked.stat("f")).size == len(NEW)  # type: ignore[union-attr]


async def test_trace_records_writes_and_changes(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    tb = TraceBackend(MemoryBackend({"old": OLD}), trace)
    await write_whole(tb, "f", b"hello", pieces=1)
    await tb.rename("f", "old", False)
    await tb.set_size("old", 3, "")
    await tb.aclose()
    assert read_trace(trace) == []  # reads only, unless asked
    assert read_trace(trace, op=None) == [
        {
            "op": "write",
            "file_id": "f",
            "size": 5,
            "position": 0,
            "bytes_to_write": 5,
            "flags": ["WHOLE_FILE", "CONTINUOUS_STARTED", "CONTINUOUS_FINISHED", "TIL_END"],
            "result": "SUCCESS",
            "bytes_written": 5,
        },
        {
            "op": "rename",
            "file_id": "f",
            "new_id": "old",
            "replace": False,
            "result": "FILE_FAILURE",
            "error": "EEXIST",
        },
        {"op": "set_size", "file_id": "old", "size": 3, "result": "SUCCESS", "error": None},
    ]
    assert [r["op"] for r in read_trace(trace, op="write")] == ["write"]


def faulty(tmp_path: Path, rules: object, backend: Any = None) -> FaultyBackend:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    return FaultyBackend(backend if backend is not None else MemoryBackend({"a": OLD}), path)


async def test_faulty_fails_writes_and_changes(tmp_path: Path) -> None:
    fb = faulty(
        tmp_path,
        [
            {"file": "new*", "op": "write", "result": "FILE_FAILURE", "count": 1},
            {"file": "a", "op": "write", "result": "FILE_MODIFIED_EXTERNALLY"},
            {"file": "d*", "op": "make_dir", "result": "FILE_FAILURE", "error": "ENOSPC"},
            {"file": "*", "result": "FAILURE"},  # reads only
        ],
    )
    first = await write_whole(fb, "new.bin", NEW)
    assert (first.result_code, first.bytes_written) == (RWResult.FILE_FAILURE, 0)
    assert await fb.stat("new.bin") is None
    assert (await write_whole(fb, "new.bin", NEW)).result_code is RWResult.SUCCESS
    version = (await fb.stat("a")).version  # type: ignore[union-attr]
    refused = await write_whole(fb, "a", NEW, version)
    assert refused.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert failed(await fb.make_dir("dir", None), errno.ENOSPC)
    assert await fb.stat("dir") is None
    assert (await fb.make_dir("other", None)).result_code is RWResult.SUCCESS
    assert (await fb.set_size("new.bin", 1, "")).result_code is RWResult.SUCCESS


async def test_faulty_stores_part_of_a_write(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "*", "op": "write", "result": "PARTIAL", "max_bytes": 4}])
    req = call(
        "new",
        0,
        NEW,
        WHOLE | RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_FINISHED,
        size=len(NEW),
    )
    await fb.write_data(req)
    assert (req.result_code, req.bytes_written) == (RWResult.PARTIAL, 4)
    assert await fb.stat("new") is None  # the transfer is not finished
    # The cache sends the rest, the call still finishing the transfer.
    rules = tmp_path / "rules.json"
    tmp = tmp_path / "rules.tmp"
    tmp.write_text("[]")
    os.replace(tmp, rules)
    rest = call(
        "new",
        4,
        NEW[4:],
        WHOLE | RWEvent.CONTINUOUS_FINISHED,
        size=len(NEW),
        context=req.file_context,
    )
    await fb.write_data(rest)
    assert rest.result_code is RWResult.SUCCESS
    assert (await fb.inner.stat("new")).size == len(NEW)  # type: ignore[union-attr]
    assert rest.new_version == (await fb.stat("new")).version  # type: ignore[union-attr]


async def test_faulty_hangs_a_write_until_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fb = faulty(tmp_path, [{"file": "*", "op": "*", "hang": True}])
    req = call("new", 0, NEW, WHOLE | RWEvent.CONTINUOUS_STARTED, size=len(NEW))
    with trio.move_on_after(60) as scope:
        await fb.write_data(req)
    assert scope.cancelled_caught
    with trio.move_on_after(60) as scope:
        await fb.remove_file("a", "")
    assert scope.cancelled_caught
    assert await fb.inner.stat("a") is not None


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"file": "*", "op": "write", "eof": 3}, "'eof' applies to reads only"),
        ({"file": "*", "op": "wirte", "result": "FAILURE"}, "op 'wirte' matches none of"),
        ({"file": "*", "result": "FILE_FAILURE", "error": "ENOPE"}, "error must be an errno"),
        ({"file": "*", "hang": True, "result": "FAILURE"}, "'hang' cannot be combined"),
        ({"file": "*", "hang": 1}, "hang must be true or false"),
    ],
)
def test_faulty_write_rules_are_checked(tmp_path: Path, rule: object, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        faulty(tmp_path, [rule])


async def test_throttled_writes_cost_latency_and_bandwidth(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mem = MemoryBackend()
    throttled = ThrottledBackend(mem, latency=0.030, bandwidth=MiB)
    data = bytes(2 * MiB)
    start = trio.current_time()
    req = await write_whole(throttled, "big", data, pieces=2)
    assert req.result_code is RWResult.SUCCESS
    assert trio.current_time() - start == pytest.approx(2 * (0.030 + 1.0))
    assert throttled.statistics()["bytes_written"] == 2 * MiB
    assert mem._files["big"].data == data
    start = trio.current_time()
    assert (await throttled.make_dir("d", None)).result_code is RWResult.SUCCESS
    assert trio.current_time() - start == pytest.approx(0.030)
