"""Reading a local source's files: the fds of an open file, and reads through
them, bypassing the page cache where they can (policy: backends.local)."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading

from cachefs._linux.pagecache import PAGE, cached_pages, open_direct

log = logging.getLogger(__name__)

# OpenFile.direct before the O_DIRECT fd is opened, and once it is refused.
_UNOPENED, _REFUSED = -2, -3


class OpenFile:
    """The file_context of an open file: the fd reads use.

    A re-open after an external change replaces ``fd``; the old fd may still
    be in use by another worker thread, so it is closed only by ``close``.
    A read holds the context (``enter``/``leave``): ``close`` while one runs
    (its caller abandoned it) leaves the fds to the last read to close, so
    no thread ever reads an fd number that was closed and given to another
    file meanwhile.
    """

    __slots__ = ("file_id", "fd", "direct", "_retired", "_lock", "_users", "_closed")

    def __init__(self, file_id: str, fd: int) -> None:
        self.file_id = file_id
        self.fd = fd
        self.direct = _UNOPENED  # the same file opened O_DIRECT, once asked for
        self._retired: list[int] = []
        self._lock = threading.Lock()
        self._users = 0
        self._closed = False

    def enter(self) -> None:
        with self._lock:
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if not self._closed or self._users:
                return
            fds = self._take_fds()
        _close_all(fds)

    def replace(self, fd: int) -> None:
        with self._lock:
            self._retired.append(self.fd)
            if self.direct >= 0:
                self._retired.append(self.direct)
            self.fd = fd
            self.direct = _UNOPENED

    def direct_fd(self, fd: int) -> int:
        """The file of *fd* opened again with O_DIRECT (the same inode); negative if refused."""
        with self._lock:
            if self.fd != fd or self._closed:  # replaced meanwhile: read through fd
                return _REFUSED
            if self.direct == _UNOPENED:
                try:
                    self.direct = open_direct(fd)
                except OSError as e:  # a filesystem without O_DIRECT, no /proc
                    log.debug("%s: no direct reads: %s", self.file_id, e)
                    self.direct = _REFUSED
            return self.direct

    def refuse_direct(self, direct: int) -> None:
        """Reads through *direct* were refused (EINVAL): read through the page cache."""
        with self._lock:
            if self.direct == direct:
                self._retired.append(direct)
                self.direct = _REFUSED

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._users:  # the last read closes them
                return
            fds = self._take_fds()
        _close_all(fds)

    def _take_fds(self) -> list[int]:
        fds, self._retired = [self.fd, self.direct, *self._retired], []
        self.fd = self.direct = -1
        return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def read_into(ctx: OpenFile, fd: int, buffer: memoryview, position: int, count: int) -> int:
    """Read up to *count* bytes at *position* into *buffer*; fewer only at EOF.

    When no page of the range is in the page cache and the buffer and
    position are page-aligned, the whole pages are read with O_DIRECT: the
    disk writes straight into *buffer*, and the source's bytes are not kept
    in the page cache beside the cache's copy of them.
    """
    whole = count - count % PAGE
    if (
        whole
        and position % PAGE == 0
        and _address(buffer) % PAGE == 0
        and cached_pages(fd, position, count) == 0
        and (direct := ctx.direct_fd(fd)) >= 0
    ):
        try:
            done = pread_into(direct, buffer, position, whole)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file refuses these reads
                raise
            ctx.refuse_direct(direct)
            return pread_into(fd, buffer, position, count)
        if done < whole:  # the end of the file
            return done
        return done + pread_into(fd, buffer[done:], position + done, count - done)
    return pread_into(fd, buffer, position, count)


def _address(buffer: memoryview) -> int:
    """Where *buffer* starts in memory (1, never aligned, if it is read-only)."""
    if buffer.readonly or not buffer.c_contiguous:
        return 1
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def pread_into(fd: int, buffer: memoryview, position: int, count: int) -> int:
    """Read up to *count* bytes at *position* into *buffer*; fewer only at EOF."""
    done = 0
    while done < count:
        n = os.preadv(fd, [buffer[done:count]], position + done)
        if n == 0:
            break
        done += n
    return done
