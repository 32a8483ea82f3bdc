"""An in-memory engine for the file system's tests (cachefs.fs), without a mount."""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import count

import pytest

from cachefs.contract import DirEntry, FileAttrs, FileKind
from cachefs.engine import CacheConfig
from cachefs.errors import ChangeRefused, NotFound
from cachefs.fs.inodes import Namespace
from cachefs.fs.operations import Operations
from cachefs.fuse.api import Entry, FUSEError

BLOCK = 4096


def file(version: str = "v1", size: int = 3, mode: int | None = 0o640) -> FileAttrs:
    return FileAttrs(FileKind.FILE, size=size, mtime=1.0, version=version, mode=mode)


def directory(mode: int | None = 0o750) -> FileAttrs:
    return FileAttrs(FileKind.DIR, size=0, mtime=1.0, version="", mode=mode)


@dataclass(eq=False)
class Handle:
    file_id: str
    attrs: FileAttrs
    continues: str = ""
    wc: object = None


class FakeCache:
    """The engine API the file system uses, over a dict of paths.

    A file being changed has a working copy: its attributes replace the
    source's, with a version "local:N" (``copies`` holds the version it was
    made from).  Files named in ``whole`` are held whole (fd 7) unless
    being changed.
    """

    def __init__(
        self, tree: dict[str, FileAttrs], *, writable: bool = True, whole: tuple[str, ...] = ()
    ) -> None:
        self.config = CacheConfig(ttl=10.0, block_size=BLOCK)
        self.writable = writable
        self.tree = tree
        self.copies: dict[str, str] = {}
        self.whole = set(whole)
        self.closed: list[Handle] = []
        self.flushed: list[str] = []
        self.room = (100 * BLOCK, 40 * BLOCK + 5)
        self._numbers = count(1)
        #: What was asked of it: stats, listings, files to fetch ahead.
        self.stats: list[str] = []
        self.listings: list[str] = []
        self.ahead: list[str] = []
        #: Whether a close of a writer flushes (--write-back-delay 0).
        self.flush_close = True

    def _attrs(self, file_id: str) -> FileAttrs:
        if file_id not in self.tree:
            raise NotFound(file_id)
        return self.tree[file_id]

    def _copy(self, file_id: str, truncate: bool) -> FileAttrs:
        attrs = self._attrs(file_id)
        if attrs.kind is not FileKind.FILE:
            raise ChangeRefused(file_id, errno.EISDIR)
        if file_id not in self.copies:
            self.copies[file_id] = attrs.version
            attrs = dataclasses.replace(attrs, version=f"local:{next(self._numbers)}")
        if truncate:
            attrs = dataclasses.replace(attrs, size=0)
        self.tree[file_id] = attrs
        return attrs

    def _below(self, file_id: str) -> Iterator[str]:
        return (p for p in list(self.tree) if p == file_id or p.startswith(f"{file_id}/"))

    # -- reading

    def shown_attrs(self, file_id: str) -> FileAttrs | None:
        return self.tree.get(file_id)

    async def getattr(self, file_id: str) -> FileAttrs:
        self.stats.append(file_id)
        return self._attrs(file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        self.listings.append(dir_id)
        prefix = f"{dir_id}/" if dir_id else ""
        return [
            DirEntry(path[len(prefix) :], attrs)
            for path, attrs in self.tree.items()
            if path.startswith(prefix) and path and "/" not in path[len(prefix) :]
        ]

    async def open(self, file_id: str, *, write: bool = False, truncate: bool = False) -> Handle:
        if write or truncate:
            self._copy(file_id, truncate)
        return Handle(file_id, self._attrs(file_id), self.copies.get(file_id, ""))

    def has_working_copy(self, file_id: str) -> bool:
        return file_id in self.copies

    def hold_whole(self, handle: Handle) -> int | None:
        return 7 if handle.file_id in self.whole and handle.file_id not in self.copies else None

    def let_go_whole(self, handle: Handle) -> None:
        pass

    async def close(self, handle: Handle) -> None:
        self.closed.append(handle)

    # -- changes

    async def create(self, file_id: str, mode: int, *, exclusive: bool) -> Handle:
        if file_id in self.tree:
            if exclusive:
                raise ChangeRefused(f"{file_id}: file exists", errno.EEXIST)
            return await self.open(file_id, write=True, truncate=True)
        self.copies[file_id] = ""
        self.tree[file_id] = file(f"local:{next(self._numbers)}", size=0, mode=mode)
        return Handle(file_id, self.tree[file_id])

    async def write(self, handle: Handle, offset: int, data: bytes | memoryview) -> int:
        attrs = self.tree[handle.file_id]
        size = max(attrs.size, offset + len(data))
        self.tree[handle.file_id] = dataclasses.replace(attrs, size=size)
        return len(data)

    async def set_size(self, file_id: str, size: int, fh: object = None) -> FileAttrs:
        self._copy(file_id, False)
        self.tree[file_id] = dataclasses.replace(self.tree[file_id], size=size)
        return self.tree[file_id]

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> FileAttrs:
        attrs = self._attrs(file_id)
        if mode is not None:
            attrs = dataclasses.replace(attrs, mode=mode)
        if mtime is not None:
            attrs = dataclasses.replace(attrs, mtime=mtime)
        if attrs.kind is FileKind.FILE and file_id not in self.copies:
            attrs = dataclasses.replace(attrs, version=f"{attrs.version}+")  # a new ctime
        self.tree[file_id] = attrs
        return attrs

    async def fsync(self, handle: Handle) -> None:
        self.flushed.append(handle.file_id)

    def flushes_on_close(self, handle: Handle) -> bool:
        return self.flush_close and handle.file_id in self.copies

    def fetch_ahead(self, file_ids: Iterable[str]) -> None:
        self.ahead += file_ids

    async def flush_on_close(self, handle: Handle) -> None:
        self.flushed.append(handle.file_id)

    async def make_dir(self, dir_id: str, mode: int) -> FileAttrs:
        if dir_id in self.tree:
            raise ChangeRefused(f"{dir_id}: file exists", errno.EEXIST)
        self.tree[dir_id] = directory(mode)
        return self.tree[dir_id]

    async def make_symlink(self, file_id: str, target: str) -> FileAttrs:
        self.tree[file_id] = FileAttrs(FileKind.SYMLINK, 0, 1.0, "", link_target=target)
        return self.tree[file_id]

    async def remove_file(self, file_id: str) -> None:
        if self._attrs(file_id).kind is FileKind.DIR:
            raise ChangeRefused(f"{file_id}: is a directory", errno.EISDIR)
        del self.tree[file_id]
        self.copies.pop(file_id, None)

    async def remove_dir(self, dir_id: str) -> None:
        if self._attrs(dir_id).kind is not FileKind.DIR:
            raise ChangeRefused(f"{dir_id}: not a directory", errno.ENOTDIR)
        if len(list(self._below(dir_id))) > 1:
            raise ChangeRefused(f"{dir_id}: directory not empty", errno.ENOTEMPTY)
        del self.tree[dir_id]

    async def rename(self, old_id: str, new_id: str, *, replace: bool = True) -> None:
        self._attrs(old_id)
        if new_id in self.tree and not replace:
            raise ChangeRefused(f"{new_id}: file exists", errno.EEXIST)
        for path in self._below(new_id):
            del self.tree[path]
        for path in self._below(old_id):
            to = new_id + path[len(old_id) :]
            self.tree[to] = self.tree.pop(path)
            if path in self.copies:
                self.copies[to] = self.copies.pop(path)

    def space(self) -> tuple[int, int]:
        return self.room


class FakeKernel:
    def __init__(self, passthrough: bool) -> None:
        self.passthrough = passthrough
        self.backings = count(1)

    def open_backing(self, fd: int) -> int:
        return next(self.backings)

    def close_backing(self, backing_id: int) -> None:
        pass


def tree() -> dict[str, FileAttrs]:
    return {"": directory(), "d": directory(), "d/f": file(), "d/sub": directory(), "g": file()}


def mount(
    cache: FakeCache | None = None, *, passthrough: bool = False
) -> tuple[Operations, FakeCache]:
    cache = cache or FakeCache(tree())
    ns = Namespace(cache)  # type: ignore[arg-type]
    return Operations(ns, cache, FakeKernel(passthrough)), cache  # type: ignore[arg-type]


async def errno_of(call: object) -> int:
    with pytest.raises(FUSEError) as info:
        await call  # type: ignore[misc]
    return info.value.errno


class Listing:
    plus = True

    def __init__(self) -> None:
        self.names: list[bytes] = []

    def add(self, name: bytes, entry: Entry, next_offset: int) -> bool:
        self.names.append(name)
        return True


async def names(ops: Operations, ino: int) -> list[bytes]:
    fh = (await ops.opendir(ino)).fh
    listing = Listing()
    await ops.readdir(fh, 0, listing)
    await ops.releasedir(fh)
    return listing.names[2:]
