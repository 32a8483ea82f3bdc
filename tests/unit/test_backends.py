"""Backend contract tests: local, memory, the faulty and trace wrappers, registry."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from conftest import cached_pages, evict_page_cache
from enginerig import read_request

from backends.faulty import FaultyBackend
from backends.local import LocalBackend, OpenFile
from backends.local import open_backend as open_local
from backends.memory import MemoryBackend
from backends.trace import TraceBackend, read_trace
from cachefs.contract import FileKind, ReadData, RWEvent, RWResult
from cachefs.errors import RulesError, SourceError, UnknownBackend
from cachefs.registry import open_backend

DATA = bytes(range(256)) * 64 + b"tail"  # 16388 bytes, every offset distinct mod 256


# A read of this module's DATA, unless told otherwise.
request = partial(read_request, size=len(DATA), flags=RWEvent.RANDOM_STARTED | RWEvent.BEFORE_END)


def canceled(file_id: str) -> ReadData:
    return request(file_id, 0, 0, flags=RWEvent.CANCELED | RWEvent.CONTINUOUS_STARTED)


def got(req: ReadData) -> bytes:
    return bytes(req.buffer[: req.bytes_read])


# -- local -----------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """src/{data.bin, .hidden, sub/inner.txt, link -> data.bin}, and outside/."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "data.bin").write_bytes(DATA)
    (src / ".hidden").write_bytes(b"h")
    (src / "sub" / "inner.txt").write_bytes(b"inner")
    (src / "link").symlink_to("data.bin")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(b"secret")
    return src


@pytest.fixture
def local(tree: Path) -> LocalBackend:
    return open_local(str(tree))


@pytest.mark.parametrize(
    ("position", "count"), [(0, 1), (0, 4096), (1, 255), (4095, 2), (1000, 9000), (0, len(DATA))]
)
async def test_local_reads_exact_bytes(local: LocalBackend, position: int, count: int) -> None:
    ctx = await local.open_file("data.bin")
    try:
        req = request("data.bin", position, count, context=ctx)
        await local.read_data(req)
    finally:
        await local.close_file("data.bin", ctx)
    assert (req.result_code, req.bytes_read) == (RWResult.SUCCESS, count)
    assert got(req) == DATA[position : position + count]


async def test_local_read_without_context_opens_for_the_call(local: LocalBackend) -> None:
    req = request("sub/inner.txt", 1, 3, size=5)
    await local.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.SUCCESS, b"nne")


@pytest.mark.parametrize(("position", "expected"), [(len(DATA) - 10, 10), (len(DATA), 0)])
async def test_local_range_beyond_eof(local: LocalBackend, position: int, expected: int) -> None:
    req = request("data.bin", position, 4096)
    await local.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.RANGE_BEYOND_EOF, expected)
    assert got(req) == DATA[position:]


async def test_local_stat_and_version(local: LocalBackend, tree: Path) -> None:
    attrs = await local.stat("data.bin")
    s = os.lstat(tree / "data.bin")
    assert attrs is not None
    assert attrs.kind is FileKind.FILE
    assert attrs.size == len(DATA)
    assert attrs.version == f"{s.st_ino}-{s.st_mtime_ns}-{s.st_size}-{s.st_ctime_ns}"
    assert attrs.mode == s.st_mode & 0o7777
    assert attrs.mtime == pytest.approx(s.st_mtime)
    root = await local.stat("")
    assert root is not None and root.kind is FileKind.DIR
    assert await local.stat("nope") is None
    assert await local.stat("data.bin/below") is None


async def test_local_modified_externally(local: LocalBackend, tree: Path) -> None:
    before = await local.stat("data.bin")
    assert before is not None
    ctx = await local.open_file("data.bin")
    (tree / "data.bin").write_bytes(DATA + b"more")  # same inode, another size
    req = request("data.bin", 0, 100, context=ctx, version=before.version)
    await local.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    # Without a version to hold on to, the read serves what is there now.
    req = request("data.bin", len(DATA), 10, context=ctx)
    await local.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.RANGE_BEYOND_EOF, b"more")
    await local.close_file("data.bin", ctx)


async def test_local_same_size_rewrite_with_the_mtime_put_back_is_a_new_version(
    local: LocalBackend, tree: Path
) -> None:
    path = tree / "data.bin"
    before = await local.stat("data.bin")
    assert before is not None
    old = os.stat(path)
    ctx = await local.open_file("data.bin")
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(100))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))  # touch -d back to the old time
    assert os.stat(path).st_mtime_ns == old.st_mtime_ns
    after = await local.stat("data.bin")
    assert after is not None and after.version != before.version
    req = request("data.bin", 0, 100, context=ctx, version=before.version)
    await local.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    await local.close_file("data.bin", ctx)


async def test_local_keeps_reading_the_inode_it_opened_after_a_rename_over_it(
    local: LocalBackend, tree: Path
) -> None:
    before = await local.stat("data.bin")
    assert before is not None
    ctx = await local.open_file("data.bin")
    with open(tree / "data.bin", "r+b") as writer:  # kept open past the replacement
        new = tree / "data.new"
        new.write_bytes(b"replaced")
        os.replace(new, tree / "data.bin")  # the old inode's ctime moves: it is unlinked
        req = request("data.bin", 0, 100, context=ctx, version=before.version)
        await local.read_data(req)
        assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:100])
        writer.write(b"x" * (len(DATA) + 1))  # but a write to it is a change
        writer.flush()
    req = request("data.bin", 0, 100, context=ctx, version=before.version)
    await local.read_data(req)
    assert req.result_code == RWResult.FILE_MODIFIED_EXTERNALLY
    await local.close_file("data.bin", ctx)


async def test_local_reopens_when_the_path_has_the_asked_version(
    local: LocalBackend, tree: Path
) -> None:
    ctx = await local.open_file("data.bin")  # holds the old inode
    new = tree / "data.new"
    new.write_bytes(b"replaced")
    os.replace(new, tree / "data.bin")
    now = await local.stat("data.bin")
    assert now is not None
    req = request("data.bin", 0, 8, context=ctx, version=now.version)
    await local.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.SUCCESS, b"replaced")
    await local.close_file("data.bin", ctx)


async def test_local_deleted_file_is_modified_externally(local: LocalBackend, tree: Path) -> None:
    (tree / "data.bin").unlink()
    req = request("data.bin", 0, 10)
    await local.read_data(req)
    assert req.result_code == RWResult.FILE_MODIFIED_EXTERNALLY
    with pytest.raises(FileNotFoundError):
        await local.open_file("data.bin")


async def test_local_symlink_is_shown_not_followed(local: LocalBackend) -> None:
    attrs = await local.stat("link")
    assert attrs is not None
    assert (attrs.kind, attrs.link_target) == (FileKind.SYMLINK, "data.bin")
    with pytest.raises(OSError):
        await local.open_file("link")
    req = request("link", 0, 10)
    await local.read_data(req)
    assert req.bytes_read == 0 and req.result_code != RWResult.SUCCESS


async def test_local_list_dir(local: LocalBackend) -> None:
    entries = {e.name: e.attrs for e in await local.list_dir("")}
    assert set(entries) == {"data.bin", ".hidden", "sub", "link"}
    assert entries["sub"].kind is FileKind.DIR
    assert entries["link"].kind is FileKind.SYMLINK
    assert entries["link"].link_target == "data.bin"
    assert entries["data.bin"] == await local.stat("data.bin")
    assert [e.name for e in await local.list_dir("sub")] == ["inner.txt"]
    with pytest.raises(FileNotFoundError):
        await local.list_dir("missing")
    with pytest.raises(NotADirectoryError):
        await local.list_dir("data.bin")


async def test_local_special_files_are_absent(local: LocalBackend, tree: Path) -> None:
    os.mkfifo(tree / "fifo")
    assert await local.stat("fifo") is None
    assert "fifo" not in {e.name for e in await local.list_dir("")}
    with pytest.raises(OSError):
        await local.open_file("fifo")  # must fail, not block


@pytest.mark.parametrize(
    "file_id", ["../outside/secret", "sub/../../outside/secret", "/etc/hostname"]
)
async def test_local_paths_never_escape(local: LocalBackend, file_id: str) -> None:
    assert await local.stat(file_id) is None
    with pytest.raises(FileNotFoundError):
        await local.open_file(file_id)
    req = request(file_id, 0, 6)
    await local.read_data(req)
    assert req.bytes_read == 0 and req.result_code == RWResult.FILE_MODIFIED_EXTERNALLY


async def test_local_refuses_paths_through_a_symlinked_dir(local: LocalBackend, tree: Path) -> None:
    (tree / "out").symlink_to(tree.parent / "outside")
    attrs = await local.stat("out")
    assert attrs is not None and attrs.kind is FileKind.SYMLINK
    assert await local.stat("out/secret") is None
    with pytest.raises(NotADirectoryError):
        await local.list_dir("out")
    with pytest.raises(FileNotFoundError):
        await local.open_file("out/secret")
    req = request("out/secret", 0, 6)
    await local.read_data(req)
    assert req.bytes_read == 0 and req.result_code != RWResult.SUCCESS


async def test_local_canceled_call_returns_at_once(local: LocalBackend) -> None:
    req = canceled("data.bin")
    await local.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.SUCCESS, 0)


def test_local_missing_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist") as info:
        open_local(str(tmp_path / "nope"))
    assert "\n" not in str(info.value)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(SourceError, match="not a directory"):
        open_local(str(tmp_path / "file"))
    with pytest.raises(SourceError, match="file:///"):
        open_local("file://host/x")


# -- local: cold reads straight from the disk ---------------------------------


def aligned(n: int) -> memoryview:
    """A page-aligned buffer of *n* bytes, as the cache's fetch buffers are."""
    return memoryview(mmap.mmap(-1, n))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("position", "count", "result", "pages_left"),
    [
        (4096, 8192, RWResult.SUCCESS, 0),
        # Four whole pages from the disk, the 4-byte tail through the page cache.
        (0, len(DATA), RWResult.SUCCESS, 1),
        (0, 5 * 4096, RWResult.RANGE_BEYOND_EOF, 0),
    ],
)
async def test_local_cold_reads_leave_the_source_out_of_the_page_cache(
    local: LocalBackend,
    tree: Path,
    position: int,
    count: int,
    result: RWResult,
    pages_left: int,
) -> None:
    evict_page_cache(tree)
    assert cached_pages(tree / "data.bin") == 0
    fds = open_fds()
    ctx = await local.open_file("data.bin")
    try:
        req = request("data.bin", position, count, context=ctx, buffer=aligned(count))
        await local.read_data(req)
    finally:
        await local.close_file("data.bin", ctx)
    assert (req.result_code, got(req)) == (result, DATA[position : position + count])
    # The cache keeps these bytes: a second copy in RAM would be waste.
    assert cached_pages(tree / "data.bin") == pages_left
    assert open_fds() == fds


async def test_local_reads_through_the_page_cache_what_it_holds_or_cannot_bypass(
    local: LocalBackend, tree: Path
) -> None:
    evict_page_cache(tree)
    ctx = await local.open_file("data.bin")
    try:
        unaligned = aligned(8192 + 1)[1:]
        req = request("data.bin", 0, 8192, context=ctx, buffer=unaligned)
        await local.read_data(req)
        assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:8192])
        assert cached_pages(tree / "data.bin") > 0
        # Partly in the page cache now: the rest comes through it too.
        req = request("data.bin", 0, 16384, context=ctx, buffer=aligned(16384))
        await local.read_data(req)
        assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:16384])
    finally:
        await local.close_file("data.bin", ctx)


async def test_local_filesystem_refusing_direct_reads(
    local: LocalBackend, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open, real_preadv = os.open, os.preadv
    refused: list[str] = []

    def no_direct_open(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    def no_direct_read(fd: int, *args: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("read")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, *args)

    fds = open_fds()
    for name, patch in [("open", no_direct_open), ("preadv", no_direct_read)]:
        monkeypatch.setattr(os, name, patch)
        for _ in range(2):
            evict_page_cache(tree)
            ctx = await local.open_file("data.bin")
            try:
                for _ in range(2):
                    req = request("data.bin", 0, 16384, context=ctx, buffer=aligned(16384))
                    await local.read_data(req)
                    assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:16384])
            finally:
                await local.close_file("data.bin", ctx)
        monkeypatch.undo()
    # Refused once per open file, then read through the page cache.
    assert refused == ["open", "open", "read", "read"]
    assert open_fds() == fds


async def test_local_cold_read_follows_a_replaced_path(local: LocalBackend, tree: Path) -> None:
    ctx = await local.open_file("data.bin")  # holds the old inode
    new = bytes(reversed(DATA))
    (tree / "data.new").write_bytes(new)
    os.replace(tree / "data.new", tree / "data.bin")
    now = await local.stat("data.bin")
    assert now is not None
    try:
        # The re-open, then a read straight from the disk on the new file.
        for _ in range(2):
            evict_page_cache(tree)
            buffer = aligned(16384)
            req = request("data.bin", 0, 16384, context=ctx, version=now.version, buffer=buffer)
            await local.read_data(req)
            assert (req.result_code, got(req)) == (RWResult.SUCCESS, new[:16384])
        assert cached_pages(tree / "data.bin") == 0
    finally:
        await local.close_file("data.bin", ctx)


# -- memory ----------------------------------------------------------------


async def test_memory_backend() -> None:
    mem = MemoryBackend({"a/b/c.txt": b"hello", "top": DATA})
    mem.mkdir("empty")
    assert [e.name for e in await mem.list_dir("")] == ["a", "empty", "top"]
    assert [e.name for e in await mem.list_dir("a/b")] == ["c.txt"]
    assert await mem.list_dir("empty") == []
    with pytest.raises(FileNotFoundError):
        await mem.list_dir("nope")
    with pytest.raises(NotADirectoryError):
        await mem.list_dir("top")
    assert await mem.stat("nope") is None
    attrs = await mem.stat("a/b/c.txt")
    assert attrs is not None and (attrs.kind, attrs.size) == (FileKind.FILE, 5)
    dir_attrs = await mem.stat("a")
    assert dir_attrs is not None and dir_attrs.kind is FileKind.DIR

    ctx = await mem.open_file("top")
    req = request("top", 100, 50, context=ctx, version=(await mem.stat("top")).version)
    await mem.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[100:150])
    req = request("top", len(DATA) - 4, 10, context=ctx)
    await mem.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.RANGE_BEYOND_EOF, b"tail")
    await mem.close_file("top", ctx)


async def test_memory_versions() -> None:
    mem = MemoryBackend()
    v1 = mem.put("f", b"one")
    v2 = mem.put("f", b"two")
    assert v1 != v2 and (await mem.stat("f")).version == v2
    req = request("f", 0, 3, version=v1)
    await mem.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    req = request("f", 0, 3, version=v2)
    await mem.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.SUCCESS, b"two")
    mem.delete("f")
    req = request("f", 0, 3)
    await mem.read_data(req)
    assert req.result_code == RWResult.FILE_MODIFIED_EXTERNALLY
    with pytest.raises(FileNotFoundError):
        await mem.open_file("f")


# -- faulty ----------------------------------------------------------------


def write_rules(path: Path, rules: object) -> None:
    """Replace the rules file the way a user should: write, then rename over."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(rules if isinstance(rules, str) else json.dumps(rules))
    os.replace(tmp, path)


def faulty(tmp_path: Path, rules: object) -> FaultyBackend:
    path = tmp_path / "rules.json"
    write_rules(path, rules)
    return FaultyBackend(MemoryBackend({"a.bin": DATA, "b.bin": DATA}), path)


async def read(backend: Any, file_id: str, position: int, count: int) -> ReadData:
    req = request(file_id, position, count)
    await backend.read_data(req)
    return req


async def test_faulty_result_only(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "a.*", "result": "FILE_FAILURE"}])
    req = await read(fb, "a.bin", 0, 100)
    assert (req.result_code, req.bytes_read) == (RWResult.FILE_FAILURE, 0)
    req = await read(fb, "b.bin", 0, 100)
    assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:100])


async def test_faulty_max_bytes(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "*", "result": "PARTIAL", "max_bytes": 10}])
    req = await read(fb, "a.bin", 5, 100)
    assert (req.result_code, got(req)) == (RWResult.PARTIAL, DATA[5:15])
    # A real error of the sub-request wins over the injected one.
    req = await read(fb, "a.bin", len(DATA) - 3, 100)
    assert (req.result_code, got(req)) == (RWResult.RANGE_BEYOND_EOF, DATA[-3:])


async def test_faulty_eof(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "a.bin", "eof": 1000}])
    req = await read(fb, "a.bin", 0, 1000)
    assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:1000])
    req = await read(fb, "a.bin", 900, 200)
    assert (req.result_code, got(req)) == (RWResult.RANGE_BEYOND_EOF, DATA[900:1000])
    req = await read(fb, "a.bin", 2000, 10)
    assert (req.result_code, req.bytes_read) == (RWResult.RANGE_BEYOND_EOF, 0)


async def test_faulty_count_and_first_match(tmp_path: Path) -> None:
    fb = faulty(
        tmp_path,
        [
            {"file": "a.bin", "result": "FAILURE", "count": 2},
            {"file": "*", "result": "PERMANENT_FAILURE", "count": 1},
        ],
    )
    results = [(await read(fb, "a.bin", 0, 10)).result_code for _ in range(4)]
    assert results == [
        RWResult.FAILURE,
        RWResult.FAILURE,
        RWResult.PERMANENT_FAILURE,
        RWResult.SUCCESS,
    ]


async def test_faulty_passes_canceled_and_metadata_through(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "*", "result": "FAILURE"}])
    req = canceled("a.bin")
    await fb.read_data(req)
    assert req.result_code == RWResult.SUCCESS
    assert (await fb.stat("a.bin")).size == len(DATA)
    assert {e.name for e in await fb.list_dir("")} == {"a.bin", "b.bin"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{nope", "invalid JSON"),
        ({"file": "*"}, "expected a JSON list"),
        ([{"file": "*", "result": "BOGUS"}], "rule 1: unknown result 'BOGUS' (expected one of"),
        ([{"file": "*", "result": "FAILURE", "color": 1}], "rule 1: unknown key 'color'"),
        ([{"file": "*"}, {"file": 3, "result": "FAILURE"}], "rule 1: missing key 'result'"),
        ([{"file": 3, "result": "FAILURE"}], "rule 1: 'file' must be a glob"),
        ([{"file": "*", "result": "PARTIAL", "max_bytes": "1"}], "max_bytes must be an integer"),
        ([{"file": "*", "result": "FAILURE", "count": -1}], "count must not be negative"),
        ([{"file": "*", "result": "FAILURE", "count": True}], "count must be an integer"),
        (["*"], "rule 1: expected an object"),
    ],
)
def test_faulty_malformed_at_start(tmp_path: Path, content: object, message: str) -> None:
    with pytest.raises(RulesError) as info:
        faulty(tmp_path, content)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"faults file {tmp_path / 'rules.json'}: ")
    assert message in text


def test_faulty_missing_file_at_start(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read"):
        FaultyBackend(MemoryBackend(), tmp_path / "absent.json")


async def test_faulty_reloads_and_keeps_last_good_rules(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fb = faulty(tmp_path, [])
    path = tmp_path / "rules.json"
    assert (await read(fb, "a.bin", 0, 10)).result_code == RWResult.SUCCESS

    write_rules(path, [{"file": "*", "result": "FAILURE"}])
    assert (await read(fb, "a.bin", 0, 10)).result_code == RWResult.FAILURE

    caplog.set_level(logging.ERROR, logger="backends.faulty")
    write_rules(path, [{"file": "*", "result": "BOGUS"}])
    for _ in range(3):
        assert (await read(fb, "a.bin", 0, 10)).result_code == RWResult.FAILURE
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "unknown result 'BOGUS'" in errors[0].getMessage()

    path.unlink()
    for _ in range(3):
        assert (await read(fb, "a.bin", 0, 10)).result_code == RWResult.FAILURE
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2

    write_rules(path, [{"file": "*", "result": "PARTIAL", "max_bytes": 1}])
    req = await read(fb, "a.bin", 0, 10)
    assert (req.result_code, req.bytes_read) == (RWResult.PARTIAL, 1)


# -- trace -----------------------------------------------------------------


async def test_trace_records_every_call(tmp_path: Path) -> None:
    trace_path = tmp_path / "trace.jsonl"
    tb = TraceBackend(MemoryBackend({"f": b"0123456789"}), trace_path)
    flags = RWEvent.CONTINUOUS_STARTED | RWEvent.TIL_END
    await tb.read_data(request("f", 0, 4, flags=flags, size=10))
    await tb.read_data(request("f", 8, 4, size=10))
    await tb.read_data(canceled("f"))
    assert read_trace(trace_path) == [
        {
            "file_id": "f",
            "size": 10,
            "position": 0,
            "bytes_to_read": 4,
            "flags": ["CONTINUOUS_STARTED", "TIL_END"],
            "result": "SUCCESS",
            "bytes_read": 4,
        },
        {
            "file_id": "f",
            "size": 10,
            "position": 8,
            "bytes_to_read": 4,
            "flags": ["RANDOM_STARTED", "BEFORE_END"],
            "result": "RANGE_BEYOND_EOF",
            "bytes_read": 2,
        },
        {
            "file_id": "f",
            "size": len(DATA),
            "position": 0,
            "bytes_to_read": 0,
            "flags": ["CANCELED", "CONTINUOUS_STARTED"],
            "result": "SUCCESS",
            "bytes_read": 0,
        },
    ]
    await tb.aclose()


class Exploding(MemoryBackend):
    async def read_data(self, req: ReadData) -> None:
        raise RuntimeError("boom")


async def test_trace_records_exceptions_and_stacks(tmp_path: Path) -> None:
    trace_path = tmp_path / "trace.jsonl"
    tb = TraceBackend(Exploding(), trace_path)
    with pytest.raises(RuntimeError, match="boom"):
        await tb.read_data(request("x", 0, 1))
    await tb.aclose()
    assert [r["result"] for r in read_trace(trace_path)] == ["EXCEPTION"]

    rules = tmp_path / "rules.json"
    write_rules(rules, [{"file": "*", "result": "PARTIAL", "max_bytes": 3}])
    stacked = TraceBackend(FaultyBackend(MemoryBackend({"f": DATA}), rules), trace_path)
    await stacked.read_data(request("f", 0, 10))
    await stacked.aclose()
    last = read_trace(trace_path)[-1]
    assert (last["result"], last["bytes_read"]) == ("PARTIAL", 3)


# -- registry --------------------------------------------------------------


async def test_registry_plain_paths_and_file_urls(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for source in (str(tree), f"file://{tree}"):
        backend = open_backend(source)
        assert isinstance(backend, LocalBackend)
        assert (await backend.stat("data.bin")).size == len(DATA)
    monkeypatch.chdir(tree.parent)
    assert isinstance(open_backend("src"), LocalBackend)
    with pytest.raises(SourceError):
        open_backend(str(tree / "missing"))


def test_registry_memory_and_unknown() -> None:
    assert isinstance(open_backend("memory://"), MemoryBackend)
    with pytest.raises(UnknownBackend) as info:
        open_backend("xyz://bucket/key")
    assert str(info.value) == (
        "unknown source scheme 'xyz' in 'xyz://bucket/key': known schemes are file, memory, s3"
    )


def test_a_context_closed_during_a_read_keeps_its_fds_until_the_read_leaves(
    tmp_path: Path,
) -> None:
    """A read whose caller gave up (an interrupted reader) may still be in its
    thread when the context is closed: its fd must not be closed under it
    (the number could be given to another file it would then read)."""
    (tmp_path / "f").write_bytes(b"data")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    ctx = OpenFile("f", fd)
    ctx.enter()
    ctx.close()
    assert os.pread(fd, 4, 0) == b"data"  # still this file's
    ctx.leave()
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
