"""An in-process source held in a dict (scheme ``memory``), for tests.

Policy:

- Files are ``path -> bytes``; directories are implied by the paths of the
  files below them, plus any made with :meth:`MemoryBackend.mkdir`.
- Every :meth:`MemoryBackend.put` gives the file a new version (a counter)
  and sets its mtime to the time of the put.
- A read answers FILE_MODIFIED_EXTERNALLY when the file is gone or when
  ``req.version`` is set and is not the current version; RANGE_BEYOND_EOF
  when the range reaches past the end (the bytes that exist are copied).
- Changes made with put/delete/mkdir are visible at once, to every caller.
- Content information is a dict ``path -> ContentInfo``, set with
  ``put_content_info`` or :meth:`MemoryBackend.publish`; it is kept as given
  (whatever version it names) until replaced or deleted.
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from dataclasses import dataclass

import trio

from cachefs.contract import (
    ContentInfo,
    DirEntry,
    FileAttrs,
    FileKind,
    ReadData,
    RWEvent,
    RWResult,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _File:
    data: bytes
    version: str
    mtime: float


def _norm(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid path {path!r}")
    return "/".join(parts)


def _parents(path: str) -> list[str]:
    """The directories above *path*, the root ``""`` first."""
    parts = path.split("/")[:-1]
    return ["", *("/".join(parts[: i + 1]) for i in range(len(parts)))]


class MemoryBackend:
    """A source whose files are given as ``{"dir/name": b"bytes"}``."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self._files: dict[str, _File] = {}
        self._dirs: set[str] = {""}
        self._versions = itertools.count(1)
        self._content: dict[str, ContentInfo] = {}
        self._created = time.time()
        for path, data in (files or {}).items():
            self.put(path, data)

    def __repr__(self) -> str:
        return f"MemoryBackend({len(self._files)} files)"

    # -- changing the source (synchronous, for tests) ----------------------

    def put(self, path: str, data: bytes) -> str:
        """Create or replace a file; returns its new version."""
        path = _norm(path)
        if not path or self._is_dir(path):
            raise IsADirectoryError(errno.EISDIR, f"is a directory: {path!r}")
        if any(d in self._files for d in _parents(path)):
            raise NotADirectoryError(errno.ENOTDIR, f"a parent of {path!r} is a file")
        version = str(next(self._versions))
        self._files[path] = _File(bytes(data), version, time.time())
        return version

    def delete(self, path: str) -> None:
        """Remove a file; FileNotFoundError if there is none."""
        path = _norm(path)
        if self._files.pop(path, None) is None:
            raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}")

    def mkdir(self, path: str) -> None:
        """Make a directory (and its parents) that exists even when empty."""
        path = _norm(path)
        if any(d in self._files for d in [*_parents(path), path]):
            raise FileExistsError(errno.EEXIST, f"{path!r} or a parent is a file")
        self._dirs.update(_parents(path))
        self._dirs.add(path)

    def publish(self, path: str, block_size: int) -> ContentInfo:
        """Give the file at *path* the content information of what it holds now."""
        path = _norm(path)
        f = self._files.get(path)
        if f is None:
            raise FileNotFoundError(errno.ENOENT, f"no such file: {path!r}")
        info = ContentInfo.of_bytes(f.data, f.version, block_size)
        self._content[path] = info
        return info

    # -- the Backend protocol ----------------------------------------------

    def _is_dir(self, path: str) -> bool:
        if path in self._dirs:
            return True
        prefix = path + "/"
        return any(p.startswith(prefix) for p in self._files) or any(
            d.startswith(prefix) for d in self._dirs
        )

    def _attrs(self, path: str) -> FileAttrs | None:
        f = self._files.get(path)
        if f is not None:
            return FileAttrs(FileKind.FILE, len(f.data), f.mtime, f.version, 0o644)
        if self._is_dir(path):
            return FileAttrs(FileKind.DIR, 0, self._created, "dir", 0o755)
        return None

    async def stat(self, file_id: str) -> FileAttrs | None:
        await trio.lowlevel.checkpoint()
        try:
            return self._attrs(_norm(file_id))
        except ValueError:
            return None

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        await trio.lowlevel.checkpoint()
        path = _norm(dir_id)
        if path in self._files:
            raise NotADirectoryError(errno.ENOTDIR, f"not a directory: {dir_id!r}")
        if not self._is_dir(path):
            raise FileNotFoundError(errno.ENOENT, f"no such directory: {dir_id!r}")
        prefix = path + "/" if path else ""
        names = {
            p[len(prefix) :].split("/", 1)[0]
            for p in itertools.chain(self._files, self._dirs)
            if p.startswith(prefix) and p != path
        }
        out = []
        for name in sorted(names):
            attrs = self._attrs(prefix + name)
            if attrs is not None:
                out.append(DirEntry(name, attrs))
        return out

    async def open_file(self, file_id: str) -> str:
        """The context is the normalized path: reads see the current bytes."""
        await trio.lowlevel.checkpoint()
        path = _norm(file_id)
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

    async def content_info(self, file_id: str) -> ContentInfo | None:
        await trio.lowlevel.checkpoint()
        try:
            return self._content.get(_norm(file_id))
        except ValueError:
            return None

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None:
        await trio.lowlevel.checkpoint()
        self._content[_norm(file_id)] = info

    async def delete_content_info(self, file_id: str) -> None:
        await trio.lowlevel.checkpoint()
        self._content.pop(_norm(file_id), None)

    async def content_info_ids(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return sorted(self._content)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def open_backend(url: str) -> MemoryBackend:
    """``memory://`` opens a new, empty MemoryBackend."""
    return MemoryBackend()
