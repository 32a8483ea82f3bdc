"""The kernel's FUSE interface: opcodes, flags and the layouts of what is read and written.

Layouts follow the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.x,
little-endian on every machine cachefs runs on).  Only what cachefs
answers is here; requests that change the file system and have no method
of their own are named in :data:`CHANGES`.  Replies are packed from the
plain values of cachefs.fuse.api (:class:`Entry`, :class:`Opened`,
:class:`Statfs`); SETATTR is read into a :class:`SetAttr`.
"""

from __future__ import annotations

import stat
import struct

from cachefs.fuse.api import Entry, Opened, SetAttr, Statfs

#: The protocol cachefs speaks: 7.40 added passthrough (max_stack_depth, backing_id).
MAJOR = 7
MINOR = 40

# -- opcodes ------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
CREATE = 35
INTERRUPT = 36
DESTROY = 38
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
COPY_FILE_RANGE = 47
TMPFILE = 51
COPY_FILE_RANGE_64 = 53

#: Requests that change the file system and have no method of their own,
#: by name (``Operations.change``).
CHANGES = {
    LINK: "link",
    SETXATTR: "setxattr",
    REMOVEXATTR: "removexattr",
    FALLOCATE: "fallocate",
    COPY_FILE_RANGE: "copy_file_range",
    TMPFILE: "tmpfile",
    COPY_FILE_RANGE_64: "copy_file_range",
}
#: Requests the kernel expects no answer to.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY})

# -- INIT flags (flags | flags2 << 32) ------------------------------------------
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3  # O_TRUNC comes with OPEN, not as a SETATTR before it
BIG_WRITES = 1 << 5  # without it the kernel sends writes a page at a time
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
ASYNC_DIO = 1 << 15
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
INIT_EXT = 1 << 30
PASSTHROUGH = 1 << 37

# -- OPEN answer flags ----------------------------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3  # the kernel caches the listing (with KEEP_CACHE: keeps it)
FOPEN_NOFLUSH = 1 << 5  # a close of the file sends no FLUSH (Linux 5.17+)
FOPEN_PASSTHROUGH = 1 << 7

# -- SETATTR: which fields of fuse_setattr_in are set ------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8

# -- FSYNC ----------------------------------------------------------------------------
FSYNC_FDATASYNC = 1 << 0

# -- notifications ----------------------------------------------------------------
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

# -- /dev/fuse ioctls: _IOW(229, nr, size) ------------------------------------------
_IOC_WRITE = 1


def _iow(nr: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (229 << 8) | nr


BACKING_MAP = struct.Struct("<iIQ")  # fd, flags, padding
DEV_IOC_BACKING_OPEN = _iow(1, BACKING_MAP.size)
DEV_IOC_BACKING_CLOSE = _iow(2, 4)

# -- layouts ------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (then flags2 from 7.36)
INIT_OUT = struct.Struct("<IIIIHHIIHHII2x22x")  # ... flags2 max_stack_depth, unused
INIT_OUT_COMPAT_22 = 24
_ATTR = "QQQQQQIIIIIIIIII"  # ino size blocks a/m/ctime a/m/ctimensec mode nlink uid gid rdev ...
_ENTRY = "QQQQII"  # nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
_DIRENT = "QQII"  # ino off namelen type, then the name, padded to 8 bytes
ENTRY_OUT = struct.Struct("<" + _ENTRY + _ATTR)
ATTR_OUT = struct.Struct("<QII" + _ATTR)  # attr_valid attr_valid_nsec dummy, attr
DIRENT = struct.Struct("<" + _DIRENT)
DIRENTPLUS = struct.Struct("<" + _ENTRY + _ATTR + _DIRENT)
OPEN_IN = struct.Struct("<II")  # flags open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
READ_IN = struct.Struct("<QQI")  # fh offset size (then read_flags lock_owner flags)
FH_IN = struct.Struct("<Q")  # the fh that RELEASE, RELEASEDIR, FLUSH start with
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags, then the name
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding, then the name
MKDIR_IN = struct.Struct("<II")  # mode umask, then the name
RENAME_IN = struct.Struct("<Q")  # newdir, then the old name and the new
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding, then the names
# valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec
# mode unused4 uid gid unused5; the times signed (before 1970 is negative)
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")  # size padding
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FORGET_IN = struct.Struct("<Q")
INTERRUPT_IN = struct.Struct("<Q")  # unique of the interrupted request
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino offset length
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags, then the name and NUL


def _attr_fields(entry: Entry) -> tuple[int, ...]:
    """(valid, valid_nsec) and the fuse_attr fields of *entry*."""
    valid = int(entry.timeout)
    valid_nsec = int((entry.timeout - valid) * 1e9)
    sec, nsec = divmod(entry.mtime_ns, 1_000_000_000)
    blocks = (entry.size + 511) // 512
    return (
        valid,
        valid_nsec,
        entry.ino,
        entry.size,
        blocks,
        sec,
        sec,
        sec,
        nsec,
        nsec,
        nsec,
        entry.mode,
        entry.nlink,
        entry.uid,
        entry.gid,
        0,
        entry.blksize,
        0,
    )


def entry_out(entry: Entry) -> bytes:
    valid, valid_nsec, *attr = _attr_fields(entry)
    return ENTRY_OUT.pack(entry.ino, 0, valid, valid, valid_nsec, valid_nsec, *attr)


def attr_out(entry: Entry) -> bytes:
    valid, valid_nsec, *attr = _attr_fields(entry)
    return ATTR_OUT.pack(valid, valid_nsec, 0, *attr)


def open_out(opened: Opened) -> bytes:
    flags = FOPEN_KEEP_CACHE if opened.keep_cache else 0
    if opened.direct_io:
        flags |= FOPEN_DIRECT_IO
    if opened.backing_id:
        flags |= FOPEN_PASSTHROUGH
    if opened.noflush:
        flags |= FOPEN_NOFLUSH
    if opened.cache_dir:
        flags |= FOPEN_CACHE_DIR
    return OPEN_OUT.pack(opened.fh, flags, opened.backing_id)


def create_out(entry: Entry, opened: Opened) -> bytes:
    """CREATE's answer: the new entry, then the handle it is open with."""
    return entry_out(entry) + open_out(opened)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def name_in(body: bytes, at: int = 0) -> bytes:
    """The NUL-terminated name at *at* of a request's body."""
    end = body.find(b"\0", at)
    return body[at:] if end < 0 else body[at:end]


def names_in(body: bytes, at: int) -> tuple[bytes, bytes]:
    """The two NUL-terminated names at *at* (RENAME: old, new; SYMLINK: name, target)."""
    end = body.find(b"\0", at)
    if end < 0:
        raise ValueError("a request with two names has one")
    return body[at:end], name_in(body, end + 1)


def setattr_in(body: bytes) -> SetAttr:
    """A SETATTR's fuse_setattr_in as the fields it changes.

    ``*_NOW`` (utimensat's UTIME_NOW, touch) comes with the kernel's clock
    reading as well: it is given as ``*_now`` alone, the time left None.
    """
    (valid, _, fh, size, _, atime, mtime, _, atime_ns, mtime_ns, _, mode, _, uid, gid, _) = (
        SETATTR_IN.unpack_from(body)
    )
    atime_now = bool(valid & FATTR_ATIME_NOW)
    mtime_now = bool(valid & FATTR_MTIME_NOW)
    return SetAttr(
        size=size if valid & FATTR_SIZE else None,
        mode=stat.S_IMODE(mode) if valid & FATTR_MODE else None,
        uid=uid if valid & FATTR_UID else None,
        gid=gid if valid & FATTR_GID else None,
        atime_ns=atime * 1_000_000_000 + atime_ns
        if valid & FATTR_ATIME and not atime_now
        else None,
        mtime_ns=mtime * 1_000_000_000 + mtime_ns
        if valid & FATTR_MTIME and not mtime_now
        else None,
        atime_now=atime_now,
        mtime_now=mtime_now,
        fh=fh if valid & FATTR_FH else None,
    )


def statfs_out(st: Statfs) -> bytes:
    return STATFS_OUT.pack(
        st.blocks, st.bfree, st.bavail, st.files, st.ffree, st.bsize, st.namelen, st.frsize, 0
    )


class DirReply:
    """Entries of one READDIR(PLUS) answer, packed until *size* bytes are used.

    With *plus* every entry carries its attributes and the kernel counts a
    lookup for each one added, except "." and "..".
    """

    __slots__ = ("plus", "_buf", "_used")

    def __init__(self, size: int, plus: bool) -> None:
        self.plus = plus
        self._buf = bytearray(size)  # zeros: the padding of every record
        self._used = 0

    def add(self, name: bytes, entry: Entry, next_offset: int) -> bool:
        """Add one entry; False (nothing added) once the answer is full."""
        n = len(name)
        at = self._used
        head = DIRENTPLUS.size if self.plus else DIRENT.size
        end = at + ((head + n + 7) & ~7)
        if end > len(self._buf):
            return False
        kind = stat.S_IFMT(entry.mode) >> 12
        if self.plus:  # _attr_fields written out: one of these per entry listed
            ino, size, timeout = entry.ino, entry.size, entry.timeout
            valid = int(timeout)
            valid_nsec = int((timeout - valid) * 1e9)
            sec, nsec = divmod(entry.mtime_ns, 1_000_000_000)
            DIRENTPLUS.pack_into(
                self._buf,
                at,
                ino,
                0,
                valid,
                valid,
                valid_nsec,
                valid_nsec,
                ino,
                size,
                (size + 511) // 512,
                sec,
                sec,
                sec,
                nsec,
                nsec,
                nsec,
                entry.mode,
                entry.nlink,
                entry.uid,
                entry.gid,
                0,
                entry.blksize,
                0,
                ino,
                next_offset,
                n,
                kind,
            )
        else:
            DIRENT.pack_into(self._buf, at, entry.ino, next_offset, n, kind)
        self._buf[at + head : at + head + n] = name
        self._used = end
        return True

    def payload(self) -> memoryview:
        return memoryview(self._buf)[: self._used]
