"""The cache's periodic work: commits, trims, and the probe of a latched disk.

Policy: metadata is committed every flush interval (without waiting for
the hasher: blocks still unhashed show as absent), and buffers nobody used
for a whole interval are given back.  A latched cache disk is probed
(state/disk.py): a file written as blocks are and synced, the index
committed, then room made for a fetch.  Nothing is evicted before the
index can be committed (an eviction clears bits in it before it punches).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from cachefs.engine.policy.evict import Evictor
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.commits import Committer
from cachefs.engine.state.disk import CacheDisk, write_probe
from cachefs.errors import CacheDiskFailed


class Upkeep:
    """Runs :meth:`serve_flusher`; makes the disk probe (:meth:`probe`).

    *trims* are called every flush interval (each lets go of buffers that
    went unused for a whole interval).
    """

    def __init__(
        self,
        catalog: Catalog,
        committer: Committer,
        disk: CacheDisk,
        evictor: Evictor,
        disk_limiter: trio.CapacityLimiter,
        trims: Sequence[Callable[[], None]],
    ) -> None:
        self._catalog = catalog
        self._committer = committer
        self._disk = disk
        self._evictor = evictor
        self._disk_limiter = disk_limiter
        self._trims = trims

    async def serve_flusher(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            for trim in self._trims:
                trim()
            if self._catalog.needs_flush and self._disk.usable:
                try:
                    await self._committer.commit()
                except CacheDiskFailed:
                    pass  # latched and logged: the probe commits once it works

    def probe(self, data_dir: Path, room: int) -> Callable[[], Awaitable[None]]:
        """The probe of a latched disk whose data files are in *data_dir*,
        making *room* bytes (one fetch); it raises what fails."""

        async def probe() -> None:
            await trio.to_thread.run_sync(write_probe, data_dir, limiter=self._disk_limiter)
            await self._catalog.flush(self._disk_limiter)
            evictor = self._evictor
            await evictor.make_room(room)
            evictor.settle(room)
            if self._catalog.cached_bytes + room > evictor.allowed():
                raise CacheDiskFailed("no room on the cache filesystem")

        return probe
