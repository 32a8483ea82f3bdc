"""Asking the kernel which pages of a file are in the page cache: cachestat(2);
and opening a file to read around the page cache (O_DIRECT).

Linux 6.5 and later.  Where the kernel has no cachestat, or a sandbox
refuses it, every answer is "cannot say" (None) from then on, and callers
take their safe path.  Asking never reads the file or starts readahead.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading

log = logging.getLogger(__name__)

_NR_CACHESTAT = 451  # the same number on every architecture (Linux 6.5+)
PAGE = mmap.PAGESIZE


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]


class _State:
    available = True  # cleared for good when the kernel refuses cachestat


class _Probe(threading.local):
    """One pair of argument structs per thread, allocated once."""

    def __init__(self) -> None:
        self.range, self.stat = _Range(), _Stat()
        self.args = ctypes.addressof(self.range), ctypes.addressof(self.stat)


_probe = _Probe()


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of bytes [offset, offset + length) of *fd* are in the
    page cache; None if the kernel cannot say."""
    if not _State.available:
        return None
    p = _probe
    p.range.off, p.range.len = offset, length
    if _syscall(_NR_CACHESTAT, fd, *p.args, 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM):  # before 6.5, or a sandbox
            _State.available = False
            log.info("no cachestat (%s): page cache residency is unknown", os.strerror(err))
        return None
    return p.stat.nr_cache


def pages_in(offset: int, length: int) -> int:
    """How many pages bytes [offset, offset + length) touch."""
    return (offset + length - 1) // PAGE - offset // PAGE + 1


def available() -> bool:
    return _State.available


def open_direct(fd: int) -> int:
    """The file of *fd* opened again, read-only, with O_DIRECT.

    Through /proc/self/fd, so it is the same inode as *fd* even if its path
    was replaced or unlinked since.  OSError where the filesystem refuses
    O_DIRECT or there is no /proc.
    """
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
