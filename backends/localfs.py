"""What the local backend needs of the file system beyond ``os``.

Version tags and attributes of a stat result, the names of its temporary
files, and the few calls Python has no safe form of: a rename that never
replaces (renameat2 RENAME_NOREPLACE) and a chmod or utime that never
follows a symlink put in place meanwhile.  Paths given here are absolute
and already checked by the backend (backends.local); every call blocks.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import secrets
import stat as st

from cachefs.contract import FileAttrs, FileKind

log = logging.getLogger(__name__)


def version_of(s: os.stat_result) -> str:
    """The version tag of a stat result: inode, mtime in ns, size and ctime in ns."""
    return f"{s.st_ino}-{s.st_mtime_ns}-{s.st_size}-{s.st_ctime_ns}"


def has_version(s: os.stat_result, version: str) -> bool:
    """Whether the open file of stat result *s* still holds *version*.

    An inode unlinked from every directory (replaced by rename, deleted)
    got a new ctime from the unlinking alone: its other fields decide.
    """
    tag = version_of(s)
    if tag == version:
        return True
    return s.st_nlink == 0 and tag.rpartition("-")[0] == version.rpartition("-")[0]


def kind_of(mode: int) -> FileKind | None:
    if st.S_ISREG(mode):
        return FileKind.FILE
    if st.S_ISDIR(mode):
        return FileKind.DIR
    if st.S_ISLNK(mode):
        return FileKind.SYMLINK
    return None


def attrs_of(s: os.stat_result, link_target: str | None = None) -> FileAttrs | None:
    """The attributes of a stat result; None for what the backend never shows."""
    mode = s.st_mode
    kind = _KINDS.get(st.S_IFMT(mode))
    if kind is None:
        return None
    # Positional, version_of written out: one of these per entry listed.
    mtime_ns = s.st_mtime_ns
    return FileAttrs(
        kind,
        s.st_size,
        mtime_ns / 1e9,
        f"{s.st_ino}-{mtime_ns}-{s.st_size}-{s.st_ctime_ns}",
        mode & 0o7777,
        link_target,
    )


_KINDS = {st.S_IFREG: FileKind.FILE, st.S_IFDIR: FileKind.DIR, st.S_IFLNK: FileKind.SYMLINK}


def attrs_at(path: str) -> FileAttrs | None:
    """The attributes of what *path* names, a symlink's target included."""
    s = os.lstat(path)
    return attrs_of(s, os.readlink(path) if st.S_ISLNK(s.st_mode) else None)


# -- temporary files -------------------------------------------------------------

# ".NAME.cachefs-" + 8 hex digits: a whole file being written, beside its target.
_TEMP = re.compile(r"\..*\.cachefs-[0-9a-f]{8}", re.DOTALL)
_TEMP_EXTRA = len(".") + len(".cachefs-") + 8
_NAME_MAX = 255


def is_temp(name: str) -> bool:
    """Whether *name* is one of the backend's temporary files (never shown)."""
    return name[:1] == "." and _TEMP.fullmatch(name) is not None


def temp_name(name: str) -> str:
    """A fresh temporary name for a file being written as *name*.

    A long name is cut (in bytes) so that the temporary one still fits
    NAME_MAX; a character cut in two is kept as os.fsdecode keeps bytes.
    """
    stem = os.fsdecode(os.fsencode(name)[: _NAME_MAX - _TEMP_EXTRA])
    return f".{stem}.cachefs-{secrets.token_hex(4)}"


# -- calls with no safe form in os -------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int
# renameat2 answers these where the kernel or the filesystem lacks the flag.
_NO_RENAMEAT2 = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


# openat2(2): the same number on every architecture.
_SYS_OPENAT2 = 437
_RESOLVE_NO_SYMLINKS = 0x04


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# Set once openat2 is found missing (an old kernel, a seccomp filter).
_no_openat2 = False


def open_no_symlinks(path: str, flags: int) -> int:
    """Open the absolute *path* with *flags*; ELOOP if any component of it is
    a symlink.

    One openat2 call (RESOLVE_NO_SYMLINKS), where checking each parent
    directory takes a call per component; where the kernel lacks openat2,
    a check of the parent's real path, then an open with O_NOFOLLOW.
    """
    global _no_openat2
    if not _no_openat2:
        how = _OpenHow(flags | os.O_NOFOLLOW, 0, _RESOLVE_NO_SYMLINKS)
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(_AT_FDCWD),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EPERM):
            raise OSError(err, os.strerror(err), path)
        _no_openat2 = True
    parent = os.path.dirname(path)
    if os.path.realpath(parent) != parent:
        raise OSError(errno.ELOOP, f"{parent} passes through a symlink", path)
    return os.open(path, flags | os.O_NOFOLLOW)


def _renameat2_noreplace(src: str, dst: str) -> bool:
    """Rename without replacing; False where the flag is not supported here."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_RENAMEAT2:
        return False
    raise OSError(err, os.strerror(err), dst)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename *src* to *dst*; FileExistsError if *dst* exists.

    Atomic with renameat2; where the filesystem refuses it, a check then a
    rename (something made at *dst* between the two is replaced).
    """
    if _renameat2_noreplace(src, dst):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def link_noreplace(src: str, dst: str) -> None:
    """Put the file *src* at *dst* (*src* is gone after); FileExistsError if
    *dst* exists.  renameat2, else link and unlink (both atomic), else
    rename_noreplace's check then rename."""
    if _renameat2_noreplace(src, dst):
        return
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        rename_noreplace(src, dst)
        return
    os.unlink(src)


def fsync_dir(path: str) -> None:
    """Make a change of the entries of directory *path* durable; a failure is
    logged only: the change has been made, and saying otherwise would be wrong."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.debug("fsync of directory %s: %s", path, e)


def set_mode_and_time(path: str, mode: int | None, mtime: float | None) -> None:
    """chmod and utime (keeping the access time) of what *path* names, never
    following a symlink: they act on the inode an O_PATH open found, through
    /proc/self/fd.  A symlink gets the time only (Linux has no mode for it)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        s = os.fstat(fd)
        if st.S_ISLNK(s.st_mode):
            if mtime is not None:
                os.utime(path, ns=(s.st_atime_ns, _ns(mtime)), follow_symlinks=False)
            return
        # Without /proc (a bare chroot), the path itself: only a race could follow a symlink.
        target = f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else path
        if mode is not None:
            os.chmod(target, mode & 0o7777)
        if mtime is not None:
            os.utime(target, ns=(s.st_atime_ns, _ns(mtime)))
    finally:
        os.close(fd)


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
