"""The memory backend's writes: WriteData and namespace changes on its Tree.

Policy: what backends.localwrites and backends.localchanges do on disk,
done in memory, so that engine tests see what a local source would answer:

- A transfer's first call (``*_STARTED``) checks the precondition: the file
  is at ``req.version``, or nothing is at the name for version "" (and its
  parent is a directory: else FILE_FAILURE).  Otherwise
  FILE_MODIFIED_EXTERNALLY and nothing changes.
- A whole-file transfer (WHOLE_FILE, or any continuous one) gathers its
  bytes and stores the file, cut or padded to ``req.size``, on its
  finishing call, after checking the precondition again: until then readers
  see the old bytes (or no file).  A random transfer writes each call's
  bytes in place at once, each write a new version (with version "" it
  makes the file, empty, first).  A file removed under a random transfer
  answers FILE_MODIFIED_EXTERNALLY (a real fd would go on writing, unseen).
- The finishing call sets ``req.new_version``.  CANCELED drops what the
  transfer gathered, and a file it made that nobody changed since.
- Namespace changes answer as a local file system would (FILE_FAILURE and
  the errno), FILE_MODIFIED_EXTERNALLY where a version given is not the
  file's.  The root is never made, removed or moved (EBUSY); a file id
  with ``.`` or ``..`` parts is refused (ENOENT).  Mode, time and rename
  keep the version; a directory emptied by a removal or a rename stays.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from collections.abc import Callable

from backends.memorytree import DIR_MODE, Dir, Link, Tree, norm
from cachefs.contract import ChangeResult, FileAttrs, RWEvent, RWResult, WriteData

_STARTING = RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED | RWEvent.RANDOM_STARTED
_FINISHING = RWEvent.CONTINUOUS_FINISHED | RWEvent.RANDOM_FINISHED
_WHOLE = RWEvent.WHOLE_FILE | RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED


class _Refused(Exception):
    def __init__(self, code: RWResult, error: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.error, self.reason = code, error, reason


def _failure(error: int, what: str) -> _Refused:
    return _Refused(RWResult.FILE_FAILURE, error, f"{what}: {os.strerror(error)}")


def _moved(what: str) -> _Refused:
    return _Refused(RWResult.FILE_MODIFIED_EXTERNALLY, 0, f"{what}: at another version")


class Transfer:
    """The file_context of one transfer: what a whole-file one gathered, the
    version a random one last wrote, whether it made the file."""

    __slots__ = ("path", "version", "whole", "data", "last", "created", "open")

    def __init__(self, path: str, version: str, whole: bool) -> None:
        self.path = path
        self.version = version
        self.whole = whole
        self.data = bytearray()
        self.last = version
        self.created = False
        self.open = True


class Changes:
    """WriteData and the namespace changes, applied to a :class:`Tree`."""

    def __init__(self, tree: Tree) -> None:
        self._tree = tree

    # -- WriteData -------------------------------------------------------------

    def write(self, req: WriteData) -> None:
        ctx = req.file_context
        tr = ctx if isinstance(ctx, Transfer) else None
        if req.flags & RWEvent.CANCELED:
            if tr is not None:
                self._drop(tr)
            return
        try:
            if req.flags & _STARTING:
                if tr is not None:
                    self._drop(tr)
                tr = None
                tr = self._start(req)
                req.file_context = tr
            elif tr is None or not tr.open:
                raise _Refused(RWResult.FAILURE, 0, "no transfer under way")
            data = bytes(req.buffer[: req.bytes_to_write])
            if tr.whole:
                _put(tr.data, req.position, data)
            elif data:
                self._in_place(tr, req.position, data)
            if req.flags & _FINISHING:
                req.new_version = self._finish(tr, req.size)
                tr.open = False
        except _Refused as e:
            req.bytes_written, req.result_code = 0, e.code
            if tr is not None:
                self._drop(tr)
        else:
            req.bytes_written, req.result_code = req.bytes_to_write, RWResult.SUCCESS

    def _start(self, req: WriteData) -> Transfer:
        path = self._path(req.file_id, errno.EISDIR)
        tree = self._tree
        if req.version:
            f = tree.files.get(path)
            if f is None or f.version != req.version:
                raise _moved(f"write {path}")
        else:
            if tree.exists(path):
                raise _Refused(RWResult.FILE_MODIFIED_EXTERNALLY, 0, "a new file's name is taken")
            if err := tree.parent_error(path):
                raise _failure(err, f"create {path}")
        tr = Transfer(path, req.version, bool(req.flags & _WHOLE))
        if not tr.whole and not req.version:
            tr.last, tr.created = tree.store(path, b"", None), True
        return tr

    def _in_place(self, tr: Transfer, position: int, data: bytes) -> None:
        f = self._tree.files.get(tr.path)
        if f is None:
            raise _Refused(RWResult.FILE_MODIFIED_EXTERNALLY, 0, f"{tr.path} is gone")
        buf = bytearray(f.data)
        _put(buf, position, data)
        tr.last = self._tree.store(tr.path, bytes(buf), f.mode)

    def _finish(self, tr: Transfer, size: int) -> str:
        tree = self._tree
        f = tree.files.get(tr.path)
        if not tr.whole:
            if f is None:
                raise _Refused(RWResult.FILE_MODIFIED_EXTERNALLY, 0, f"{tr.path} is gone")
            return f.version
        if tr.version and (f is None or f.version != tr.version):
            raise _moved(f"write {tr.path}")
        if not tr.version:
            if tree.exists(tr.path):
                raise _Refused(RWResult.FILE_MODIFIED_EXTERNALLY, 0, "a new file's name is taken")
            if err := tree.parent_error(tr.path):
                raise _failure(err, f"create {tr.path}")
        data = bytes(tr.data[:size]).ljust(size, b"\0")
        return tree.store(tr.path, data, f.mode if f is not None else None)

    def _drop(self, tr: Transfer) -> None:
        if tr.open and tr.created:
            f = self._tree.files.get(tr.path)
            if f is not None and f.version == tr.last:
                del self._tree.files[tr.path]
        tr.open = False

    # -- namespace changes -------------------------------------------------------

    def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        return self._answer(self._make_dir, dir_id, mode)

    def remove_file(self, file_id: str, version: str) -> ChangeResult:
        return self._answer(self._remove_file, file_id, version)

    def remove_dir(self, dir_id: str) -> ChangeResult:
        return self._answer(self._remove_dir, dir_id)

    def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        return self._answer(self._rename, old_id, new_id, replace)

    def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        return self._answer(self._set_size, file_id, size, version)

    def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        return self._answer(self._set_attrs, file_id, mode, mtime)

    def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        return self._answer(self._make_symlink, file_id, target)

    @staticmethod
    def _answer(fn: Callable[..., FileAttrs | None], *args: object) -> ChangeResult:
        try:
            return ChangeResult(attrs=fn(*args))
        except _Refused as e:
            return ChangeResult(e.code, e.error, e.reason)

    def _path(self, file_id: str, root_error: int = errno.EBUSY) -> str:
        try:
            path = norm(file_id)
        except ValueError:
            raise _failure(errno.ENOENT, f"invalid file id {file_id!r}") from None
        if not path:
            raise _failure(root_error, "the root of the source")
        return path

    def _make_new(self, path: str, what: str) -> None:
        """Refuse to make *path* unless its name is free and its parent a directory."""
        if self._tree.exists(path):
            raise _failure(errno.EEXIST, f"{what} {path}")
        if err := self._tree.parent_error(path):
            raise _failure(err, f"{what} {path}")

    def _make_dir(self, dir_id: str, mode: int | None) -> FileAttrs | None:
        path = self._path(dir_id)
        self._make_new(path, "make directory")
        tree = self._tree
        tree.dirs[path] = Dir(DIR_MODE if mode is None else mode & 0o7777, time.time())
        return tree.attrs(path)

    def _remove_file(self, file_id: str, version: str) -> None:
        path = self._path(file_id)
        tree = self._tree
        entry = tree.files.get(path) or tree.links.get(path)
        if entry is None:
            error = errno.EISDIR if tree.is_dir(path) else errno.ENOENT
            raise _failure(error, f"remove {path}")
        if version and entry.version != version:
            raise _moved(f"remove {path}")
        tree.remove(path)
        tree.keep_parents(path)

    def _remove_dir(self, dir_id: str) -> None:
        path = self._path(dir_id)
        tree = self._tree
        if path in tree.files or path in tree.links:
            raise _failure(errno.ENOTDIR, f"remove directory {path}")
        if not tree.is_dir(path):
            raise _failure(errno.ENOENT, f"remove directory {path}")
        if tree.below(path):
            raise _failure(errno.ENOTEMPTY, f"remove directory {path}")
        tree.remove(path)
        tree.keep_parents(path)

    def _rename(self, old_id: str, new_id: str, replace: bool) -> FileAttrs | None:
        old, new = self._path(old_id), self._path(new_id)
        tree = self._tree
        what = f"rename {old} -> {new}"
        if not tree.exists(old):
            raise _failure(errno.ENOENT, what)
        if err := tree.parent_error(new):
            raise _failure(err, what)
        if old == new:
            return tree.attrs(new)
        old_dir = tree.is_dir(old)
        if old_dir and new.startswith(old + "/"):
            raise _failure(errno.EINVAL, what)
        if tree.exists(new):
            new_dir = tree.is_dir(new)
            if not replace:
                raise _failure(errno.EEXIST, what)
            if old_dir != new_dir:
                raise _failure(errno.ENOTDIR if old_dir else errno.EISDIR, what)
            if new_dir and tree.below(new):
                raise _failure(errno.ENOTEMPTY, what)
            tree.remove(new)
        tree.keep_parents(old)
        tree.move(old, new)
        return tree.attrs(new)

    def _set_size(self, file_id: str, size: int, version: str) -> FileAttrs | None:
        path = self._path(file_id, errno.EISDIR)
        tree = self._tree
        f = tree.files.get(path)
        if f is None or (version and f.version != version):
            if version:
                raise _moved(f"set the size of {path}")
            error = errno.ENOENT
            if path in tree.links:
                error = errno.ELOOP
            elif tree.is_dir(path):
                error = errno.EISDIR
            raise _failure(error, f"set the size of {path}")
        if size < 0:
            raise _failure(errno.EINVAL, f"set the size of {path}")
        tree.store(path, f.data[:size].ljust(size, b"\0"), f.mode)
        return tree.attrs(path)

    def _set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> FileAttrs | None:
        path = self._path(file_id)
        tree = self._tree
        f, link = tree.files.get(path), tree.links.get(path)
        if f is not None:
            tree.files[path] = dataclasses.replace(
                f,
                mode=f.mode if mode is None else mode & 0o7777,
                mtime=f.mtime if mtime is None else mtime,
            )
        elif link is not None:  # a symlink has no mode to set
            tree.links[path] = dataclasses.replace(
                link, mtime=link.mtime if mtime is None else mtime
            )
        elif tree.is_dir(path):
            d = tree.dirs.get(path, Dir(DIR_MODE, tree.created))
            tree.dirs[path] = Dir(
                d.mode if mode is None else mode & 0o7777, d.mtime if mtime is None else mtime
            )
        else:
            raise _failure(errno.ENOENT, f"set attributes of {path}")
        return tree.attrs(path)

    def _make_symlink(self, file_id: str, target: str) -> FileAttrs | None:
        path = self._path(file_id)
        self._make_new(path, "make symlink")
        tree = self._tree
        tree.links[path] = Link(target, tree.new_version(), time.time())
        return tree.attrs(path)


def _put(buf: bytearray, position: int, data: bytes) -> None:
    """Write *data* into *buf* at *position*, as pwrite would (zeros before it)."""
    if len(buf) < position:
        buf.extend(bytes(position - len(buf)))
    buf[position : position + len(data)] = data
