"""When the index is committed: now, soon, or when the disk allows.

Committing syncs the data files written since the last commit, then writes
the bitmaps (Catalog.flush).  A cache disk that is latched is not committed
to: its probe commits once it works again.
"""

from __future__ import annotations

import trio

from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk, DiskError
from cachefs.errors import CacheDiskFailed

#: How long an early commit waits for more files to become whole, seconds.
#: Until it, a whole file is read through the page cache, not passthrough.
EARLY_COMMIT_GATHER = 0.2


class Committer:
    """Commits the catalog to the index; :meth:`serve_early_commits` runs in a nursery."""

    def __init__(
        self, catalog: Catalog, disk: CacheDisk, disk_limiter: trio.CapacityLimiter
    ) -> None:
        self._catalog = catalog
        self._disk = disk
        self._disk_limiter = disk_limiter
        self._soon = trio.Event()

    async def commit(self) -> None:
        """Commit metadata now; CacheDiskFailed if the cache disk fails (or failed)."""
        if not self._disk.usable:
            raise self._disk.failure()
        try:
            await self._catalog.flush(self._disk_limiter)
        except DiskError as e:
            raise self._disk.failed("committing the cache index", e) from None

    async def commit_if_usable(self) -> None:
        """Commit now, unless the cache disk is latched (its probe commits once
        it works again)."""
        if self._disk.usable:
            try:
                await self.commit()
            except CacheDiskFailed:
                pass  # latched and logged

    def commit_soon(self) -> None:
        """Have the index committed (and the data synced) now, not at the next
        flush interval: a file just became whole (hit/whole.py), or one with
        unsynced blocks was closed (filecache.py)."""
        self._soon.set()

    async def serve_early_commits(self) -> None:
        while True:
            await self._soon.wait()
            # Files that become whole together share one commit: a reader
            # of many small files would otherwise pay a sync per file.
            await trio.sleep(EARLY_COMMIT_GATHER)
            self._soon = trio.Event()
            await self.commit_if_usable()
