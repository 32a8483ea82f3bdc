"""Namespace changes in a local source (backends.local): one OS call each.

Policy:

- Each function takes the absolute paths the backend checked (never
  outside the root) and blocks.  It answers SUCCESS with the entry's new
  attributes, FILE_MODIFIED_EXTERNALLY when the version given ("" for any)
  is not the one the path holds, and raises OSError for everything else:
  the backend answers FILE_FAILURE with that errno (:func:`refused`), which
  the user then gets, as from the file system itself.
- A version is checked then acted on: a change made between the two is not
  seen (a rename or unlink has no precondition in POSIX).
- ``rename`` without replace never replaces (renameat2 RENAME_NOREPLACE;
  where the file system lacks it, a check then a rename).  ``make_dir``
  gives the directory exactly the mode asked (the daemon's umask does not
  apply again).  ``set_attrs`` and the mode of ``make_dir`` act on the inode
  found without following a symlink; a symlink keeps its mode (Linux has
  none) and gets the time.  ``set_size`` fsyncs what it cut or extended.
"""

from __future__ import annotations

import errno
import os
import stat as st

from backends.localfs import attrs_at, attrs_of, rename_noreplace, set_mode_and_time, version_of
from cachefs.contract import ChangeResult, RWResult

_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO})
# O_NONBLOCK: a fifo put at the path must not block the open.
_WRITE = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def refused(e: OSError, what: str) -> ChangeResult:
    """The answer to a change the file system refused with *e*."""
    code = e.errno or errno.EIO
    reason = f"{what}: {e.strerror or os.strerror(code)}"
    return ChangeResult(RWResult.FILE_FAILURE, error=code, reason=reason)


def _moved(what: str) -> ChangeResult:
    return ChangeResult(RWResult.FILE_MODIFIED_EXTERNALLY, reason=f"{what}: at another version")


def _done(path: str) -> ChangeResult:
    return ChangeResult(attrs=attrs_at(path))


def make_dir(path: str, mode: int | None) -> ChangeResult:
    os.mkdir(path, 0o777 if mode is None else mode & 0o777)
    if mode is not None:  # exactly: past the daemon's umask, with setgid or sticky
        set_mode_and_time(path, mode, None)
    return _done(path)


def remove_file(path: str, version: str) -> ChangeResult:
    s = os.lstat(path)
    if st.S_ISDIR(s.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if version and version_of(s) != version:
        return _moved(f"remove {path}")
    os.unlink(path)
    return ChangeResult()


def remove_dir(path: str) -> ChangeResult:
    os.rmdir(path)
    return ChangeResult()


def rename(old: str, new: str, replace: bool) -> ChangeResult:
    if replace:
        os.rename(old, new)
    else:
        rename_noreplace(old, new)
    return _done(new)


def set_size(path: str, size: int, version: str) -> ChangeResult:
    try:
        fd = os.open(path, _WRITE)
    except OSError as e:
        if version and e.errno in _GONE:
            return _moved(f"set the size of {path}")
        raise
    try:
        s = os.fstat(fd)
        if version and version_of(s) != version:
            return _moved(f"set the size of {path}")
        if not st.S_ISREG(s.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.ftruncate(fd, size)
        os.fsync(fd)
        return ChangeResult(attrs=attrs_of(os.fstat(fd)))
    finally:
        os.close(fd)


def set_attrs(path: str, mode: int | None, mtime: float | None) -> ChangeResult:
    set_mode_and_time(path, mode, mtime)
    return _done(path)


def make_symlink(path: str, target: str) -> ChangeResult:
    os.symlink(target, path)
    return _done(path)
