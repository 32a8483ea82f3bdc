"""File I/O the cache's data files need beyond os: allocate-then-write,
hole punching, reads that never wait for the disk.

Nothing here knows about blocks or the cache: offsets and lengths only.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os

from cachefs._linux.pagecache import PAGE

log = logging.getLogger(__name__)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def pwrite_all(fd: int, data: memoryview, offset: int, allocate: bool = True) -> None:
    """Write all of *data* at *offset*, the range allocated first (*allocate*).

    Allocating first makes ext4 fill a sparse file several times cheaper in
    CPU; it is the space the write takes anyway.  Where it is not
    supported, just write.  A small write gains nothing from it: it costs a
    syscall.
    """
    if allocate:
        _fallocate(fd, 0, offset, len(data))
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def page_end(offset: int) -> int:
    """*offset* rounded up to a 4 KiB page, so a partial last page is freed too."""
    return -(-offset // PAGE) * PAGE


def punch_holes(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Deallocate byte ranges of *fd*; they read as zeros afterwards.

    Where the filesystem cannot punch holes, the ranges are overwritten with
    zeros (correct, though the space is not returned) and a warning is logged.
    """
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    for offset, length in ranges:
        if _fallocate(fd, mode, offset, length) == 0:
            continue
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))
        log.warning("the cache filesystem cannot punch holes: evicted space is not returned")
        pwrite_all(fd, memoryview(bytes(length)), offset)


def read_nowait(fd: int, buf: bytearray, offset: int) -> int:
    """Read what the page cache holds at *offset* into *buf*, without blocking."""
    try:
        return os.preadv(fd, [buf], offset, _NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        return 0  # this filesystem cannot say: read in a thread


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill *buf* from *offset*; fewer bytes only at the end of the file."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done
