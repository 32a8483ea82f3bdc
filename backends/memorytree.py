"""The memory backend's namespace: files, symlinks and directories by path.

A directory exists when made (or kept by a removal or a rename below it)
and while anything is below it.  Keys are normalized paths (:func:`norm`),
``""`` the root.  Every stored content gets a new version (a counter).
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from dataclasses import dataclass
from typing import TypeVar

from cachefs.contract import FileAttrs, FileKind

FILE_MODE, DIR_MODE = 0o644, 0o755
T = TypeVar("T")


def norm(path: str) -> str:
    """*path* without empty parts; ValueError if a part is ``.`` or ``..``."""
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ValueError(f"invalid path {path!r}")
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class File:
    data: bytes
    version: str
    mtime: float
    mode: int = FILE_MODE


@dataclass(frozen=True, slots=True)
class Link:
    target: str
    version: str
    mtime: float


@dataclass(frozen=True, slots=True)
class Dir:
    mode: int
    mtime: float


class Tree:
    """Files, symlinks and the directories that exist even when empty.

    A directory also exists while anything is below it.  Keys are
    normalized paths, ``""`` the root.
    """

    def __init__(self, created: float) -> None:
        self.created = created
        self.files: dict[str, File] = {}
        self.links: dict[str, Link] = {}
        self.dirs: dict[str, Dir] = {"": Dir(DIR_MODE, created)}
        self._versions = itertools.count(1)

    def new_version(self) -> str:
        return str(next(self._versions))

    def store(self, path: str, data: bytes, mode: int | None) -> str:
        """Put *data* at *path* as a new version (now); the version."""
        version = self.new_version()
        self.files[path] = File(data, version, time.time(), FILE_MODE if mode is None else mode)
        return version

    @staticmethod
    def parents(path: str) -> list[str]:
        """The directories above *path*, the root ``""`` first."""
        parts = path.split("/")[:-1]
        return ["", *("/".join(parts[: i + 1]) for i in range(len(parts)))]

    def below(self, path: str) -> bool:
        """Whether anything is inside the directory *path*."""
        prefix = path + "/" if path else ""
        return any(
            p.startswith(prefix) and p != path
            for p in itertools.chain(self.files, self.links, self.dirs)
        )

    def is_dir(self, path: str) -> bool:
        return path in self.dirs or self.below(path)

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.links or self.is_dir(path)

    def blocked(self, path: str) -> bool:
        """Whether a file or a symlink stands where a parent of *path* would be."""
        return any(p in self.files or p in self.links for p in self.parents(path))

    def parent_error(self, path: str) -> int:
        """Why nothing can be made at *path* (ENOTDIR, ENOENT); 0 if it can."""
        if self.blocked(path):
            return errno.ENOTDIR
        return 0 if self.is_dir(self.parents(path)[-1]) else errno.ENOENT

    def keep_dir(self, path: str) -> None:
        self.dirs.setdefault(path, Dir(DIR_MODE, self.created))

    def keep_parents(self, path: str) -> None:
        for p in self.parents(path):
            self.keep_dir(p)

    def remove(self, path: str) -> None:
        """Remove the entry *path* (a directory's: only the entry itself)."""
        self.files.pop(path, None)
        self.links.pop(path, None)
        if path:
            self.dirs.pop(path, None)

    def move(self, old: str, new: str) -> None:
        """Move *old* and everything below it to *new*."""
        _move_keys(self.files, old, new)
        _move_keys(self.links, old, new)
        _move_keys(self.dirs, old, new)

    def attrs(self, path: str) -> FileAttrs | None:
        f = self.files.get(path)
        if f is not None:
            return FileAttrs(FileKind.FILE, len(f.data), f.mtime, f.version, f.mode)
        link = self.links.get(path)
        if link is not None:
            size = len(os.fsencode(link.target))
            return FileAttrs(FileKind.SYMLINK, size, link.mtime, link.version, 0o777, link.target)
        if self.is_dir(path):
            d = self.dirs.get(path, Dir(DIR_MODE, self.created))
            return FileAttrs(FileKind.DIR, 0, d.mtime, "dir", d.mode)
        return None


def _move_keys(table: dict[str, T], old: str, new: str) -> None:
    prefix = old + "/"
    for p in [p for p in table if p == old or p.startswith(prefix)]:
        table[new + p[len(old) :]] = table.pop(p)
