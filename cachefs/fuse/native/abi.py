"""The kernel's FUSE interface: opcodes, flags and the layouts of what is read and written.

Layouts follow the kernel's ``include/uapi/linux/fuse.h`` (protocol 7.x,
little-endian on every machine cachefs runs on).  Only what a read-only
file system needs is here.  Replies are packed from the plain values of
cachefs.fuse.api (:class:`Entry`, :class:`Opened`, :class:`Statfs`).
"""

from __future__ import annotations

import stat
import struct

from cachefs.fuse.api import Entry, Opened, Statfs

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

#: Requests that would change the file system, by name (``Operations.change``).
CHANGES = {
    SETATTR: "setattr",
    SYMLINK: "symlink",
    MKNOD: "mknod",
    MKDIR: "mkdir",
    UNLINK: "unlink",
    RMDIR: "rmdir",
    RENAME: "rename",
    LINK: "link",
    WRITE: "write",
    SETXATTR: "setxattr",
    REMOVEXATTR: "removexattr",
    CREATE: "create",
    FALLOCATE: "fallocate",
    RENAME2: "rename",
    COPY_FILE_RANGE: "copy_file_range",
    TMPFILE: "tmpfile",
    COPY_FILE_RANGE_64: "copy_file_range",
}
#: Requests the kernel expects no answer to.
NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT, NOTIFY_REPLY})

# -- INIT flags (flags | flags2 << 32) ------------------------------------------
ASYNC_READ = 1 << 0
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
FOPEN_PASSTHROUGH = 1 << 7

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
FH_IN = struct.Struct("<Q")  # the fh that RELEASE, RELEASEDIR, FLUSH, FSYNC start with
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
    return OPEN_OUT.pack(opened.fh, flags, opened.backing_id)


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
        if self.plus:
            valid, valid_nsec, *attr = _attr_fields(entry)
            DIRENTPLUS.pack_into(
                self._buf,
                at,
                entry.ino,
                0,
                valid,
                valid,
                valid_nsec,
                valid_nsec,
                *attr,
                entry.ino,
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
