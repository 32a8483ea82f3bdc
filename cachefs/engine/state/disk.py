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

from cachefs._linux import fileio
from cachefs.engine.state import store
from cachefs.errors import CacheDiskFailed

log = logging.getLogger(__name__)

# Errors of a disk that is full, not broken: what it holds is still good.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
# Errors of this process's limits, not of the disk: the call fails, nothing latches.
_NOT_THE_DISK = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})
PROBE_NAME = ".probe"
PROBE_SIZE = 4096

#: What the cache filesystem raises when it fails.
DiskError = (OSError, sqlite3.Error)


def _full(e: BaseException) -> bool:
    """Whether *e* says the disk is full, nothing worse: what it holds is good."""
    if isinstance(e, store.SyncFailed):
        return False
    if isinstance(e, sqlite3.Error):
        return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
    return getattr(e, "errno", None) in _FULL


class CacheDisk:
    """The latch of one cache directory's filesystem.

    *on_suspect* is called (on the trio thread) when an error that may have
    lost or damaged data is first seen during a latch: what was written
    since the last sync is not to be trusted.
    """

    def __init__(self, on_suspect: Callable[[], None] = lambda: None) -> None:
        self.error: str | None = None
        # An error of this latch may have lost or damaged data.
        self.suspect = False
        self.failures = 0
        self._on_suspect = on_suspect
        self._latched = trio.Event()
        self._working = trio.Event()
        self._working.set()

    @property
    def usable(self) -> bool:
        return self.error is None

    @staticmethod
    def counts(e: BaseException) -> bool:
        """Whether *e* is the cache disk failing (not this process's limits)."""
        return getattr(e, "errno", None) not in _NOT_THE_DISK

    def failed(self, doing: str, e: BaseException) -> CacheDiskFailed:
        """The cache filesystem failed while *doing*: latch (once) and return the
        error to raise.  Errors of the process's limits (EMFILE...) do not latch."""
        if isinstance(e, CacheDiskFailed):
            return e
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e)
        if not self.counts(e):
            log.warning("cache disk: %s: %s", doing, reason)
            return CacheDiskFailed(f"the cache disk failed {doing}: {reason}")
        self.failures += 1
        self._note(e)
        if self.error is None:
            self.error = f"{doing}: {reason}"
            log.warning(
                "the cache disk failed %s; reads go to the source, uncached, until it works again",
                self.error,
            )
            self._latched.set()
            self._working = trio.Event()
        return self.failure()

    def _note(self, e: BaseException) -> None:
        if not self.suspect and not _full(e):
            self.suspect = True
            self._on_suspect()

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
                    if not isinstance(e, CacheDiskFailed):
                        self._note(e)
                    continue
                log.warning("the cache disk works again (it failed %s)", self.error)
                suspect, self.error, self.suspect = self.suspect, None, False
                recovered(suspect)
                self._working.set()
            self._latched = trio.Event()


def write_probe(directory: Path) -> None:
    """Make *directory* if it is gone, then write (as blocks are written), sync
    and remove a small file in it; OSError if any of that fails."""
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / PROBE_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        fileio.pwrite_all(fd, memoryview(bytes(PROBE_SIZE)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
