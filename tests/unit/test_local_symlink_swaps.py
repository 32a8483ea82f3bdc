"""A local source whose directories are swapped for symlinks between reads.

The local backend checks a path for symlinks with one openat2 call
(RESOLVE_NO_SYMLINKS), or, where the kernel lacks it, with a check of the
parent's real path: both must refuse a file, or its content information,
reached through a directory that became a symlink to outside the root
after an earlier read of the same path.

A swap can also land in the middle of one call: between the check of the
directories and the act on the last name.  With openat2, stat, open, list,
a write and a namespace change act in the directory the one walk found, so
a swap at that moment (made here by a hook on the os call that acts) never
reaches outside; the fallback without openat2 keeps that race.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest
from enginerig import read_request

from backends import localfs
from backends.local import LocalBackend
from backends.local import open_backend as open_local
from cachefs.contract import ContentInfo, RWEvent, RWResult, WriteData

INSIDE = b"inside bytes"
SECRET = b"outside secret bytes"
INFO = ContentInfo.of_bytes(INSIDE, "v1", 4096)
request = partial(read_request, flags=RWEvent.RANDOM_STARTED | RWEvent.TIL_END)


@pytest.fixture(params=["openat2", "realpath"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways of checking: openat2, and the fallback without it."""
    if request.param == "realpath":
        monkeypatch.setattr(localfs, "_has_openat2", False)
    yield request.param


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """src/d/f (INSIDE) with its record; outside/d/f (SECRET), with a record
    of the secret where src's records are."""
    root = tmp_path / "src"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(INSIDE)
    outside = tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "d" / "f").write_bytes(SECRET)
    (outside / "ci" / "d").mkdir(parents=True)
    (outside / "ci" / "d" / "f").write_bytes(ContentInfo.of_bytes(SECRET, "v1", 4096).to_bytes())
    return root


def swap(directory: Path, target: Path) -> None:
    """Replace *directory* with a symlink to *target*."""
    shutil.rmtree(directory)
    directory.symlink_to(target, target_is_directory=True)


async def read_all(local: LocalBackend, file_id: str, size: int) -> tuple[RWResult, bytes]:
    ctx = await local.open_file(file_id)
    try:
        req = request(file_id, 0, size, size=size, context=ctx)
        await local.read_data(req)
    finally:
        await local.close_file(file_id, ctx)
    return req.result_code, bytes(req.buffer[: req.bytes_read])


async def test_a_directory_swapped_for_a_symlink_gives_no_outside_byte(way: str, src: Path) -> None:
    local = open_local(str(src))
    assert await read_all(local, "d/f", len(INSIDE)) == (RWResult.SUCCESS, INSIDE)
    swap(src / "d", src.parent / "outside" / "d")
    with pytest.raises(FileNotFoundError):
        await local.open_file("d/f")
    req = request("d/f", 0, len(SECRET), size=len(SECRET))  # no context: opened by the call
    await local.read_data(req)
    assert req.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert SECRET not in bytes(req.buffer)


async def test_a_file_swapped_for_a_symlink_is_not_followed(way: str, src: Path) -> None:
    local = open_local(str(src))
    assert await read_all(local, "d/f", len(INSIDE)) == (RWResult.SUCCESS, INSIDE)
    os.unlink(src / "d" / "f")
    (src / "d" / "f").symlink_to(src.parent / "outside" / "d" / "f")
    with pytest.raises(OSError):
        await local.open_file("d/f")
    req = request("d/f", 0, len(SECRET), size=len(SECRET))
    await local.read_data(req)
    assert req.result_code is not RWResult.SUCCESS
    assert SECRET not in bytes(req.buffer)


async def test_a_records_directory_swapped_for_a_symlink_gives_no_record(
    way: str, src: Path
) -> None:
    local = open_local(str(src))
    await local.put_content_info("d/f", INFO)
    assert await local.content_info("d/f") == INFO
    swap(src / ".cachefs-ci" / "d", src.parent / "outside" / "ci" / "d")
    assert await local.content_info("d/f") is None
    swap(src / ".cachefs-ci", src.parent / "outside" / "ci")
    assert await local.content_info("d/f") is None


async def test_a_root_above_a_symlink_is_refused(way: str, src: Path, tmp_path: Path) -> None:
    """A directory above the root swapped for a symlink (to the same tree):
    the path passes through a symlink, so the file is absent."""
    local = open_local(str(src))
    assert await read_all(local, "d/f", len(INSIDE)) == (RWResult.SUCCESS, INSIDE)
    moved = tmp_path / "moved"
    src.rename(moved)
    src.symlink_to(moved, target_is_directory=True)
    with pytest.raises(FileNotFoundError):
        await local.open_file("d/f")
    assert await local.content_info("d/f") is None


# -- a swap in the middle of one call ---------------------------------------------

needs_openat2 = pytest.mark.skipif(not localfs._has_openat2, reason="no openat2 here")


@pytest.fixture
def swap_on(monkeypatch: pytest.MonkeyPatch, src: Path) -> Callable[[str, str], list[str]]:
    """swap_on(call, end): the first ``os.<call>`` of a path ending in *end*
    (of every call armed) first moves src/d aside (src/d.old, still inside
    the root) and puts a symlink to outside/d in its place; the list it
    returns (the same for every call armed) names the path the swap fired
    on, once it did."""
    fired: list[str] = []

    def arm(call: str, end: str) -> list[str]:
        real = getattr(os, call)

        def hooked(path: object, *args: object, **kwargs: object) -> object:
            if not fired and isinstance(path, str) and path.endswith(end):
                fired.append(path)
                (src / "d").rename(src / "d.old")
                (src / "d").symlink_to(src.parent / "outside" / "d", target_is_directory=True)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, call, hooked)
        return fired

    return arm


@needs_openat2
async def test_a_swap_during_a_stat_gives_no_outside_attributes(
    src: Path, swap_on: Callable[[str, str], list[str]]
) -> None:
    local = open_local(str(src))
    swap_on("stat", "f")
    fired = swap_on("lstat", "d/f")
    attrs = await local.stat("d/f")
    assert fired
    assert attrs is None or attrs.size == len(INSIDE)


@needs_openat2
async def test_a_swap_during_an_open_gives_no_outside_byte(
    src: Path, swap_on: Callable[[str, str], list[str]]
) -> None:
    """d/f is a symlink (the open takes its second step, by the parent);
    outside/d/f is a file with the secret."""
    local = open_local(str(src))
    os.unlink(src / "d" / "f")
    (src / "d" / "f").symlink_to("nowhere")
    fired = swap_on("open", "f")
    req = request("d/f", 0, len(SECRET), size=len(SECRET))
    await local.read_data(req)
    assert fired
    assert req.result_code is not RWResult.SUCCESS
    assert SECRET not in bytes(req.buffer)


@needs_openat2
async def test_a_swap_during_a_listing_lists_no_outside_entry(
    src: Path, swap_on: Callable[[str, str], list[str]]
) -> None:
    (src / "d" / "sub").mkdir()
    (src.parent / "outside" / "d" / "sub").mkdir()
    (src.parent / "outside" / "d" / "sub" / "secret").write_bytes(SECRET)
    local = open_local(str(src))
    swap_on("open", "d/sub")  # where a second walk by path would open it
    try:
        names = [e.name for e in await local.list_dir("d/sub")]
    except FileNotFoundError:
        names = []
    assert "secret" not in names


def _write(file_id: str, data: bytes, flags: RWEvent) -> WriteData:
    return WriteData(
        file_id=file_id,
        size=len(data),
        position=0,
        flags=flags,
        buffer=memoryview(data).toreadonly(),
        bytes_to_write=len(data),
        file_context=None,
        version="",
    )


@needs_openat2
@pytest.mark.parametrize(
    "flags",
    [
        RWEvent.WHOLE_FILE | RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_FINISHED,
        RWEvent.RANDOM_STARTED | RWEvent.RANDOM_FINISHED,
    ],
    ids=["whole", "random"],
)
async def test_a_swap_during_a_write_writes_nothing_outside(
    src: Path, swap_on: Callable[[str, str], list[str]], flags: RWEvent
) -> None:
    local = open_local(str(src))
    swap_on("open", "new")
    fired = swap_on("lstat", "new")
    req = _write("d/new", INSIDE, flags)
    await local.write_data(req)
    assert fired
    assert not (src.parent / "outside" / "d" / "new").exists()
    if req.result_code is RWResult.SUCCESS:
        assert (src / "d.old" / "new").read_bytes() == INSIDE


@needs_openat2
async def test_a_swap_during_a_change_changes_nothing_outside(
    src: Path, swap_on: Callable[[str, str], list[str]]
) -> None:
    local = open_local(str(src))
    fired = swap_on("mkdir", "made")
    await local.make_dir("d/made", None)
    assert fired
    assert not (src.parent / "outside" / "d" / "made").exists()


@needs_openat2
async def test_a_swap_during_a_removal_removes_nothing_outside(
    src: Path, swap_on: Callable[[str, str], list[str]]
) -> None:
    local = open_local(str(src))
    fired = swap_on("lstat", "f")  # remove_file checks the version, then unlinks
    await local.remove_file("d/f", "")
    assert fired
    assert (src.parent / "outside" / "d" / "f").read_bytes() == SECRET


@needs_openat2
async def test_a_swap_during_a_record_write_writes_no_record_outside(
    src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = open_local(str(src))
    await local.put_content_info("d/f", INFO)
    records, outside = src / ".cachefs-ci", src.parent / "outside" / "ci"
    secret = (outside / "d" / "f").read_bytes()
    real = tempfile.mkstemp

    def swap_then_mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        (records / "d").rename(records / "d.old")
        (records / "d").symlink_to(outside / "d", target_is_directory=True)
        monkeypatch.setattr(tempfile, "mkstemp", real)
        return real(*args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(tempfile, "mkstemp", swap_then_mkstemp)
    await local.put_content_info("d/f", ContentInfo.of_bytes(b"new", "v2", 4096))
    assert (outside / "d" / "f").read_bytes() == secret
    assert os.listdir(outside / "d") == ["f"]
