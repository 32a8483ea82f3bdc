"""Size cap, free-space floor, LRU eviction by block.

Policy:

* The cache holds at most ``limit`` bytes of blocks, and never lets the cache
  filesystem's free space drop below ``min_free``.  Before a fill would cross
  either, an eviction round frees the least recently read unpinned blocks
  down to 90% of the limit (rounds are batched, one at a time).  The only
  overshoot is the blocks of fetches in flight, which are written before
  they can be evicted.
* A background task trims the cache when something else filled the disk.
* Evicting a block: clear its bit, commit the index, then punch its hole.
  While the hole is punched the block counts as in flight, so a reader
  waits and refetches it: a reader never sees an evicted block's zeros.
"""

from __future__ import annotations

import heapq
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from cachefs._linux.fileio import page_end
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk, DiskError
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.inflight import Fetch

log = logging.getLogger(__name__)

LOW_WATER = 0.9
DEFAULT_MAX = 10 << 30
TRIM_INTERVAL = 5.0


class Evictor:
    def __init__(
        self,
        catalog: Catalog,
        cache_dir: Path,
        cache_size: int | None,
        min_free: int | None,
        disk_limiter: trio.CapacityLimiter,
        disk: CacheDisk,
    ) -> None:
        self._catalog = catalog
        self._cache_dir = cache_dir
        self._disk_limiter = disk_limiter
        self._disk = disk
        st = os.statvfs(cache_dir)
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        self.min_free = total * 5 // 100 if min_free is None else min_free
        if cache_size is None:
            cache_size = min(DEFAULT_MAX, (free + catalog.cached_bytes) * 8 // 10)
        self.limit = cache_size
        self.evicted_bytes = 0
        # Bytes whose bits are cleared but whose holes are not punched yet.
        self._punching = 0
        # Bytes fills were given room for but have not marked yet.
        self._reserved = 0
        self._lock = trio.Lock()
        #: Bytes the cache dir holds beside the blocks (working copies of
        #: changed files): they count against the limit and are never evicted.
        self.outside: Callable[[], int] = lambda: 0

    def disk_free(self) -> int:
        """Free bytes of the cache filesystem above the free-space floor."""
        st = os.statvfs(self._cache_dir)
        return max(0, st.f_bavail * st.f_frsize - self.min_free)

    def allowed(self) -> int:
        """What the cache may hold now: the limit (less what changed files
        hold), less any shortfall of free space."""
        st = os.statvfs(self._cache_dir)
        free = st.f_bavail * st.f_frsize
        used = self._catalog.cached_bytes + self._reserved
        limit = self.limit - self.outside()
        return min(limit, used + free - self.min_free) - self._punching - self._reserved

    async def make_room(self, nbytes: int) -> None:
        """Evict before *nbytes* more would cross the limit or the free-space floor.

        The room is reserved until :meth:`settle` (the fill marked its blocks).
        """
        if self._catalog.cached_bytes + nbytes > self.allowed():
            async with self._lock:
                allowed = self.allowed()
                if self._catalog.cached_bytes + nbytes > allowed:
                    await self._evict_to(int(min(self.limit * LOW_WATER, allowed)) - nbytes)
        self._reserved += nbytes

    def settle(self, nbytes: int) -> None:
        self._reserved -= nbytes

    async def serve_trimmer(self) -> None:
        while True:
            await trio.sleep(TRIM_INTERVAL)
            # A latched cache disk is trimmed by its probe (engine/state/disk.py).
            if self._disk.usable and self._catalog.cached_bytes > self.allowed():
                try:
                    async with self._lock:
                        await self._evict_to(int(self.allowed() * LOW_WATER))
                except DiskError as e:
                    self._disk.failed("evicting cached blocks", e)

    async def _evict_to(self, target: int) -> None:
        need = self._catalog.cached_bytes - max(0, target)
        if need <= 0:
            return
        victims = self._choose(need)
        if not victims:
            log.debug("cache over its limit by %d bytes, but nothing can be evicted", need)
            return
        await self.drop(victims)

    def _choose(self, need: int) -> list[tuple[CachedFile, int]]:
        bs = self._catalog.block_size
        candidates = (
            (cf.atime[b] if cf.atime else 0, cf.row_id, b, cf)
            for cf in self._catalog.files.values()
            if not cf.pinned and not cf.held
            for b in evictable(cf)
        )
        best = heapq.nsmallest(need // bs + 1, candidates, key=lambda c: c[:3])
        out, freed = [], 0
        for _, _, b, cf in best:
            if freed >= need:
                break
            out.append((cf, b))
            freed += self._catalog.block_len(cf, b)
        return out

    async def drop_from(self, cf: CachedFile, first: int) -> int:
        """Drop the cached blocks of *cf* from block *first* on (a purge, not
        counted as evicted); the bytes freed.  CacheDiskFailed if the disk fails."""
        if cf.retired:  # dropped meanwhile: nothing of it is counted any more
            return 0
        victims = [(cf, b) for b in evictable(cf) if b >= first]
        before = self._catalog.cached_bytes
        try:
            await self.drop(victims, count=False)
        except DiskError as e:
            raise self._disk.failed("dropping cached blocks", e) from None
        return before - self._catalog.cached_bytes

    async def drop(self, victims: list[tuple[CachedFile, int]], *, count: bool = True) -> None:
        """Evict these blocks: clear, commit, punch; readers wait meanwhile.

        *count*: add them to ``evicted_bytes`` (a purge does not).
        """
        cat = self._catalog
        by_file: dict[CachedFile, list[int]] = {}
        for cf, b in victims:
            by_file.setdefault(cf, []).append(b)
        holds: list[tuple[CachedFile, Fetch]] = []
        for cf, blocks in by_file.items():
            for first, last in runs(sorted(blocks)):
                hold = Fetch(first, last)
                for b in range(first, last + 1):
                    if count:
                        self.evicted_bytes += cat.block_len(cf, b)
                    cat.unmark(cf, b)
                cf.hold(hold)
                holds.append((cf, hold))
        pending = sum(cat.block_len(cf, b) for cf, b in victims)
        self._punching += pending
        try:
            await cat.commit_cleared(list(by_file))
            for cf, hold in holds:
                assert cf.data is not None
                start, end = cf.data.span(hold.first, hold.last)
                end = page_end(end)
                await cf.data.punch([(start, end - start)], self._disk_limiter)
        finally:
            self._punching -= pending
            for cf, hold in holds:
                cf.finish(hold)


def evictable(cf: CachedFile) -> Iterator[int]:
    """Present blocks of *cf* that no one is fetching or evicting."""
    present, inflight = cf.present, cf.inflight or {}
    b = present.find(1)
    while b >= 0:
        if b not in inflight:
            yield b
        b = present.find(1, b + 1)


def runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted block numbers as (first, last) runs of consecutive ones."""
    if not blocks:
        return
    first = prev = blocks[0]
    for b in blocks[1:]:
        if b != prev + 1:
            yield first, prev
            first = b
        prev = b
    yield first, prev
