"""Content information in a local source, beside the files it describes.

The record of ``<root>/<file_id>`` is ``<root>/.cachefs-ci/<file_id>``,
holding ``ContentInfo.to_bytes()``.  The functions take the record's
absolute path and act on it with no symlink on the way, in one kernel walk
(backends.localfs: a directory swapped for a symlink meanwhile never leads
outside the root), and block: the backend runs them in a worker thread.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as st
import tempfile
from collections.abc import Callable

from backends.localfs import open_no_symlinks, pin_parent
from cachefs.contract import ContentInfo

log = logging.getLogger(__name__)

# Below the root; never part of the source.
CI_DIR = ".cachefs-ci"
_TMP_PREFIX = ".cachefs-tmp-"
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# errnos meaning "there is no record at that path"
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


def read(path: str, file_id: str) -> ContentInfo | None:
    """The record at *path* as stored; None if there is none, it is
    malformed, or *path* passes through a symlink (checked here: the caller
    need not check the record's directories)."""
    try:
        fd = open_no_symlinks(path, _OPEN_FLAGS)
    except OSError as e:
        if e.errno in _ABSENT:
            return None
        raise
    try:
        if not st.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return ContentInfo.from_bytes(b"".join(chunks))
    except ValueError as e:
        log.warning("ignoring the content information of %s: %s", file_id, e)
        return None


def write(path: str, data: bytes) -> None:
    """Replace the record at *path* atomically: a temporary file, fsync, rename.

    Makes the directories above it; refuses (FileNotFoundError) when they
    pass through a symlink (_pinned).
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _pinned(path, lambda pinned: _replace(pinned, data))


def _replace(path: str, data: bytes) -> None:
    parent = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def delete(path: str, top: str) -> None:
    """Remove the record at *path*, and the directories below *top* it leaves
    empty; each in the directory found holding it."""
    try:
        _pinned(path, os.unlink)
    except (FileNotFoundError, NotADirectoryError):
        return
    parent = os.path.dirname(path)
    while parent != top:
        try:
            _pinned(parent, os.rmdir)
        except OSError:
            break
        parent = os.path.dirname(parent)


def _pinned(path: str, act: Callable[[str], None]) -> None:
    """*act* on *path* in the directory found holding it, with no symlink on
    the way (backends.localfs.pin_parent), whatever is swapped in later."""
    parent_fd, pinned = pin_parent(path)
    try:
        act(pinned)
    finally:
        os.close(parent_fd)


def file_ids(top: str) -> list[str]:
    """The file ids that have a record below *top*, sorted (symlinks are not followed)."""
    if os.path.realpath(top) != top:
        return []
    out = []
    for dirpath, _dirs, files in os.walk(top):
        rel = os.path.relpath(dirpath, top)
        for name in files:
            try:
                mode = os.lstat(os.path.join(dirpath, name)).st_mode
            except FileNotFoundError:
                continue
            if st.S_ISREG(mode):
                out.append(name if rel == "." else f"{rel}/{name}")
    return sorted(out)
