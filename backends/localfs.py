"""What the local backend needs of the file system beyond ``os``.

Version tags and attributes of a stat result, the names of its temporary
files, and the few calls Python has no safe form of: an open that follows
no symlink on the way, a rename that never replaces (renameat2
RENAME_NOREPLACE) and a chmod or utime that never follows a symlink put in
place meanwhile.  Paths given here are absolute, inside the root by their
names (backends.local); every call blocks.

Symlinks on the way (policy): a path is checked and acted on in one kernel
walk, never checked by one walk and used by another, so a directory swapped
for a symlink to outside the root between the two (renameat2
RENAME_EXCHANGE makes that atomic) never leads outside:

- :func:`open_no_symlinks` opens a path with one openat2 call
  (RESOLVE_NO_SYMLINKS): ELOOP if any component is a symlink.
- :func:`open_parent` opens the directory holding a path that way (O_PATH);
  the backend then acts on the last name relative to that fd (``dir_fd``:
  stat, open with O_NOFOLLOW, readlink), and :func:`pin_parent` gives a
  path through that fd (``/proc/self/fd/N/NAME``) for the calls that take
  paths (writes, namespace changes).  ELOOP of the directory means a
  symlink above the name: the name is absent (ENOENT).
- Whether openat2 works is probed once, on "/": an error of one path
  (EPERM from fanotify, say) is that path's answer, not a missing call.
- Limits: where openat2 is missing (Linux before 5.6, a seccomp filter),
  the fallback checks the real path, then opens by path: a swap between
  the two still wins (the old race).  Without /proc, pin_parent gives the
  path itself, checked once: the same race for writes and changes.
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


def _openat2(path: str, flags: int) -> int:
    """openat2(AT_FDCWD, *path*, *flags*, RESOLVE_NO_SYMLINKS); -errno on failure."""
    how = _OpenHow(flags, 0, _RESOLVE_NO_SYMLINKS)
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    return int(fd) if fd >= 0 else -ctypes.get_errno()


def _probe_openat2() -> bool:
    """Whether openat2 works here: decided once, on "/", so that a refusal of
    one path (EPERM from fanotify, say) is never taken for a missing call."""
    fd = _openat2("/", os.O_PATH | os.O_CLOEXEC)
    if fd < 0:
        log.info("no openat2 (%s): symlinks are checked by real path", os.strerror(-fd))
        return False
    os.close(fd)
    return True


_has_openat2 = _probe_openat2()


def open_no_symlinks(path: str, flags: int) -> int:
    """Open the absolute *path* with *flags*; ELOOP if any component of it,
    the last one included, is a symlink.

    One openat2 call (RESOLVE_NO_SYMLINKS), where checking each parent
    directory takes a call per component; where the kernel lacks openat2,
    a check of the real path, then an open (a swap between them wins).
    """
    if _has_openat2:
        fd = _openat2(path, flags)
        if fd < 0:
            raise OSError(-fd, os.strerror(-fd), path)
        return fd
    if os.path.realpath(path) != path:
        raise OSError(errno.ELOOP, f"{path} passes through a symlink", path)
    return os.open(path, flags)


_PARENT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def open_parent(path: str) -> int:
    """An O_PATH fd of the directory holding the absolute *path*, opened by
    open_no_symlinks; FileNotFoundError if that directory or one above it
    is a symlink.  Calls with ``dir_fd`` and the last name act on the
    directory the check found, whatever is swapped in by path afterwards."""
    try:
        return open_no_symlinks(os.path.dirname(path), _PARENT_FLAGS)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise FileNotFoundError(errno.ENOENT, f"{path} is below a symlink") from None


def pin_parent(path: str) -> tuple[int, str]:
    """The directory holding the absolute *path*, opened by open_parent, and
    a path of the same entry through that fd (``/proc/self/fd/N/NAME``): a
    call by that path acts in the directory checked, whatever is swapped in
    at *path* later.  Without /proc, *path* itself (checked once, then used:
    the old race).  The caller closes the fd when done with the path."""
    dir_fd = open_parent(path)
    through = _fd_path(dir_fd)
    if through is None:
        return dir_fd, path
    return dir_fd, os.path.join(through, os.path.basename(path))


def _fd_path(fd: int) -> str | None:
    """A path of the file open as *fd* (a magic link of /proc); None without /proc."""
    return f"/proc/self/fd/{fd}" if _HAS_PROC_FD else None


_HAS_PROC_FD = os.path.isdir("/proc/self/fd")


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
        os.link(src, dst, follow_symlinks=False)  # a src swapped for a symlink is linked as one
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
        target = _fd_path(fd) or path
        if mode is not None:
            os.chmod(target, mode & 0o7777)
        if mtime is not None:
            os.utime(target, ns=(s.st_atime_ns, _ns(mtime)))
    finally:
        os.close(fd)


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
