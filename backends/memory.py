"""An in-process source held in a dict (scheme ``memory``), for tests.

Policy:

- Files are ``path -> bytes``; directories are implied by the paths of the
  entries below them, plus any made with :meth:`MemoryBackend.mkdir` or
  ``make_dir`` (or left behind by a removal or a rename: like a file
  system's, a directory stays when what was in it goes).  Symlinks are
  ``path -> target``, never followed.
- Every :meth:`MemoryBackend.put` gives the file a new version (a counter)
  and sets its mtime to the time of the put.
- A read answers FILE_MODIFIED_EXTERNALLY when the file is gone or when
  ``req.version`` is set and is not the current version; RANGE_BEYOND_EOF
  when the range reaches past the end (the bytes that exist are copied).
- Changes made with put/delete/mkdir are visible at once, to every caller.
- Content information is a dict ``path -> ContentInfo``, set with
  ``put_content_info`` or :meth:`MemoryBackend.publish`; it is kept as given
  (whatever version it names) until replaced or deleted.
- Writes (backends.memorywrites) behave as the local backend's, in memory:
  the same capabilities, preconditions, result codes and errnos.  Every
  change of a file's bytes gives it a new version; a mode, a time or a
  rename does not.
"""

from __future__ import annotations

import errno
import itertools
import logging
import time

import trio

from backends.memorytree import Tree, norm
from backends.memorywrites import Changes
from cachefs.contract import (
    ChangeResult,
    ContentInfo,
    DirEntry,
    FileAttrs,
    ReadData,
    RWEvent,
    RWResult,
    WriteCapability,
    WriteData,
)

log = logging.getLogger(__name__)

WRITE_CAPABILITIES = WriteCapability.POSIX


class MemoryBackend:
    """A source whose files are given as ``{"dir/name": b"bytes"}``."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self._tree = Tree(time.time())
        self._files = self._tree.files  # tests look at the bytes held
        self._changes = Changes(self._tree)
        self._content: dict[str, ContentInfo] = {}
        for path, data in (files or {}).items():
            self.put(path, data)

    def __repr__(self) -> str:
        return f"MemoryBackend({len(self._files)} files)"

    # -- changing the source (synchronous, for tests) ----------------------

    def put(self, path: str, data: bytes) -> str:
        """Create or replace a file; returns its new version."""
        path = norm(path)
        tree = self._tree
        if not path or tree.is_dir(path):
            raise IsADirectoryError(errno.EISDIR, f"is a directory: {path!r}")
        if tree.blocked(path):
            raise NotADirectoryError(errno.ENOTDIR, f"a parent of {path!r} is a file")
        tree.links.pop(path, None)
        old = tree.files.get(path)
        return tree.store(path, bytes(data), old.mode if old else None)

    def delete(self, path: str) -> None:
        """Remove a file; FileNotFoundError if there is none."""
        path = norm(path)
        if self._tree.files.pop(path, None) is None:
            raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}")

    def mkdir(self, path: str) -> None:
        """Make a directory (and its parents) that exists even when empty."""
        path = norm(path)
        tree = self._tree
        if any(p in tree.files or p in tree.links for p in [*tree.parents(path), path]):
            raise FileExistsError(errno.EEXIST, f"{path!r} or a parent is a file")
        tree.keep_parents(path)
        tree.keep_dir(path)

    def publish(self, path: str, block_size: int) -> ContentInfo:
        """Give the file at *path* the content information of what it holds now."""
        path = norm(path)
        f = self._files.get(path)
        if f is None:
            raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}")
        info = ContentInfo.of_bytes(f.data, f.version, block_size)
        self._content[path] = info
        return info

    # -- the Backend protocol ----------------------------------------------

    async def stat(self, file_id: str) -> FileAttrs | None:
        await trio.lowlevel.checkpoint()
        try:
            return self._tree.attrs(norm(file_id))
        except ValueError:
            return None

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        await trio.lowlevel.checkpoint()
        path = norm(dir_id)
        tree = self._tree
        if path in tree.files or path in tree.links:
            raise NotADirectoryError(errno.ENOTDIR, f"not a directory: {dir_id!r}")
        if not tree.is_dir(path):
            raise FileNotFoundError(errno.ENOENT, f"no such directory: {dir_id!r}")
        prefix = path + "/" if path else ""
        names = {
            p[len(prefix) :].split("/", 1)[0]
            for p in itertools.chain(tree.files, tree.links, tree.dirs)
            if p.startswith(prefix) and p != path
        }
        out = []
        for name in sorted(names):
            attrs = tree.attrs(prefix + name)
            if attrs is not None:
                out.append(DirEntry(name, attrs))
        return out

    async def open_file(self, file_id: str) -> str:
        """The context is the normalized path: reads see the current bytes."""
        await trio.lowlevel.checkpoint()
        path = norm(file_id)
        if path not in self._files:
            raise FileNotFoundError(errno.ENOENT, f"no such file: {file_id!r}")
        return path

    async def close_file(self, file_id: str, context: object) -> None:
        await trio.lowlevel.checkpoint()

    async def read_data(self, req: ReadData) -> None:
        await trio.lowlevel.checkpoint()
        if req.bytes_to_read == 0 or req.flags & RWEvent.CANCELED:
            return
        f = self._files.get(req.file_id)
        if f is None or (req.version and req.version != f.version):
            req.bytes_read = 0
            req.result_code = RWResult.FILE_MODIFIED_EXTERNALLY
            return
        chunk = memoryview(f.data)[req.position : req.position + req.bytes_to_read]
        n = len(chunk)
        req.buffer[:n] = chunk
        req.bytes_read = n
        req.result_code = RWResult.SUCCESS if n == req.bytes_to_read else RWResult.RANGE_BEYOND_EOF

    # -- writes (backends.memorywrites) ------------------------------------

    @property
    def write_capabilities(self) -> WriteCapability:
        return WRITE_CAPABILITIES

    async def write_data(self, req: WriteData) -> None:
        await trio.lowlevel.checkpoint()
        self._changes.write(req)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.make_dir(dir_id, mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.remove_file(file_id, version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.remove_dir(dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.rename(old_id, new_id, replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.set_size(file_id, size, version)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.set_attrs(file_id, mode, mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return self._changes.make_symlink(file_id, target)

    # -- content information -----------------------------------------------

    async def content_info(self, file_id: str) -> ContentInfo | None:
        await trio.lowlevel.checkpoint()
        try:
            return self._content.get(norm(file_id))
        except ValueError:
            return None

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None:
        await trio.lowlevel.checkpoint()
        self._content[norm(file_id)] = info

    async def delete_content_info(self, file_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self._content.pop(norm(file_id), None)

    async def content_info_ids(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(self._content)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def open_backend(url: str) -> MemoryBackend:
    """``memory://`` opens a new, empty MemoryBackend."""
    return MemoryBackend()
