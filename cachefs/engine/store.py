"""Block bytes on disk: one sparse data file per cached file version.

Block ``i`` lives at offset ``i * block_size`` of ``data/<row id>``; a block
that was never written is a hole and reads as zeros.  The hit path preads a
kept-open fd on the trio loop (the measured exception to "no blocking I/O on
the loop"); writes and syncs run in worker threads, and an fd is closed only
when no thread uses it, so a number is never reused under a writer.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import trio

log = logging.getLogger(__name__)


class DataFile:
    """One version's data file.  ``users`` counts holders of the fd."""

    __slots__ = ("path", "size", "fd", "users", "retired")

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd: int | None = None
        self.users = 0
        self.retired = False

    def acquire(self) -> int:
        """Open (creating a sparse file of the full size) and hold the fd."""
        if self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size != self.size:
                    os.ftruncate(fd, self.size)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
        self.users += 1
        return self.fd

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def retire(self) -> None:
        """Forget this version's bytes: unlink now, close when the last user leaves."""
        if not self.retired:
            self.retired = True
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def write(self, offset: int, data: memoryview, limiter: trio.CapacityLimiter) -> None:
        if self.retired:  # its bytes are no longer wanted; do not recreate the file
            return
        fd = self.acquire()
        try:
            await trio.to_thread.run_sync(_pwrite_all, fd, data, offset, limiter=limiter)
        finally:
            self.release()

    async def sync(self, limiter: trio.CapacityLimiter) -> None:
        if self.retired:
            return
        fd = self.acquire()
        try:
            await trio.to_thread.run_sync(os.fdatasync, fd, limiter=limiter)
        finally:
            self.release()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n
