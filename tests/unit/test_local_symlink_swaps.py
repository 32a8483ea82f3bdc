"""A local source whose directories are swapped for symlinks between reads.

The local backend checks a path for symlinks with one openat2 call
(RESOLVE_NO_SYMLINKS), or, where the kernel lacks it, with a check of the
parent's real path: both must refuse a file, or its content information,
reached through a directory that became a symlink to outside the root
after an earlier read of the same path.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from enginerig import read_request

from backends import localfs
from backends.local import LocalBackend
from backends.local import open_backend as open_local
from cachefs.contract import ContentInfo, RWEvent, RWResult

INSIDE = b"inside bytes"
SECRET = b"outside secret bytes"
INFO = ContentInfo.of_bytes(INSIDE, "v1", 4096)
request = partial(read_request, flags=RWEvent.RANDOM_STARTED | RWEvent.TIL_END)


@pytest.fixture(params=["openat2", "realpath"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both ways of checking: openat2, and the fallback without it."""
    if request.param == "realpath":
        monkeypatch.setattr(localfs, "_no_openat2", True)
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
