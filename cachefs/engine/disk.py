"""The cache filesystem's health: a failing cache disk is not a failing source.

Policy:

* The first error of the cache filesystem (EIO, ENOSPC, EROFS, EDQUOT, a
  SQLite error) while blocks are written, read back, synced, hashed or
  punched, or while the index is committed, latches the cache disk: one
  warning names it, ``cachefs stats`` shows it (``cache_disk_error``).
* While it is latched nothing more is written: misses are fetched into the
  reader's own buffer and served from there; hits are still read from the
  data files where they can be, and from the source where they cannot.  A
  fetch whose blocks could not be stored serves its readers from its buffer.
* Every few seconds (``CacheConfig.disk_probe_interval``) a latched disk is
  tried again (the engine's probe: room made, a small file written, synced
  and removed, the index committed).  Once that works the latch is lifted,
  and after an error that may have damaged data (anything but a full disk)
  every cached block is checked against its hash again before it is next
  served.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from cachefs.errors import CacheDiskFailed

log = logging.getLogger(__name__)

# Errors of a disk that is full, not broken: what it holds is still good.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
PROBE_NAME = ".probe"
PROBE_SIZE = 4096

#: What the cache filesystem raises when it fails.
DiskError = (OSError, sqlite3.Error)


class CacheDisk:
    """The latch of one cache directory's filesystem."""

    def __init__(self) -> None:
        self.error: str | None = None
        # The latch came from an error that may have damaged data.
        self.suspect = False
        self.failures = 0
        self._latched = trio.Event()
        self._working = trio.Event()
        self._working.set()

    @property
    def usable(self) -> bool:
        return self.error is None

    def failed(self, doing: str, e: BaseException) -> CacheDiskFailed:
        """The cache filesystem failed while *doing*: latch (once) and return the
        error to raise."""
        self.failures += 1
        if isinstance(e, CacheDiskFailed):
            return e
        if getattr(e, "errno", None) not in _FULL:
            self.suspect = True
        if self.error is None:
            reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
            self.error = f"{doing}: {reason}"
            log.warning(
                "the cache disk failed %s; reads go to the source, uncached, until it works again",
                self.error,
            )
            self._latched.set()
            self._working = trio.Event()
        return self.failure()

    def failure(self) -> CacheDiskFailed:
        """The error for work refused while the disk is latched."""
        return CacheDiskFailed(f"the cache disk failed {self.error}")

    async def wait_usable(self) -> None:
        """Return once the disk is not latched."""
        await self._working.wait()

    async def serve_probe(
        self,
        probe: Callable[[], Awaitable[None]],
        recovered: Callable[[bool], None],
        interval: float,
    ) -> None:
        """While latched, run *probe* every *interval* seconds; when it passes,
        lift the latch and call *recovered* (with whether blocks are suspect)."""
        while True:
            await self._latched.wait()
            while self.error is not None:
                await trio.sleep(interval)
                try:
                    await probe()
                except (*DiskError, CacheDiskFailed) as e:
                    log.debug("the cache disk still fails: %s", e)
                    continue
                log.warning("the cache disk works again (it failed %s)", self.error)
                suspect, self.error, self.suspect = self.suspect, None, False
                recovered(suspect)
                self._working.set()
            self._latched = trio.Event()


def write_probe(directory: Path) -> None:
    """Write, sync and remove a small file in *directory*; OSError if any fails."""
    path = directory / PROBE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if os.write(fd, bytes(PROBE_SIZE)) != PROBE_SIZE:
            raise OSError(errno.ENOSPC, "short write")
        os.fsync(fd)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
