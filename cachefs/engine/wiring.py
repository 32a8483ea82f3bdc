"""How the engine's collaborators are made and wired: the one place that
knows all of them.  Each gets the few others it needs; none gets the
FileCache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from cachefs._linux.uring import open_ring
from cachefs.contract import Backend
from cachefs.engine.attrs import Attributes
from cachefs.engine.config import CacheConfig
from cachefs.engine.handle import OpenFile
from cachefs.engine.hit.reader import HitReader
from cachefs.engine.hit.whole import WholeFiles
from cachefs.engine.miss.fetch import FetchRunner
from cachefs.engine.miss.hasher import Hasher
from cachefs.engine.miss.reads import MissReader
from cachefs.engine.miss.source import Source
from cachefs.engine.miss.supply import Supplier
from cachefs.engine.miss.writer import BlockWriter
from cachefs.engine.policy.content import Content
from cachefs.engine.policy.evict import Evictor
from cachefs.engine.policy.upkeep import Upkeep
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.commits import Committer
from cachefs.engine.state.disk import CacheDisk
from cachefs.engine.stats import Stats

# Cache-disk work (writes, syncs, hashing) in worker threads at once.
DISK_THREADS = 8


@dataclass(frozen=True, slots=True)
class Parts:
    """The collaborators the front door (FileCache) talks to."""

    stats: Stats
    disk: CacheDisk
    evictor: Evictor
    committer: Committer
    attrs: Attributes
    content: Content
    hasher: Hasher
    hits: HitReader
    whole: WholeFiles
    source: Source
    misses: MissReader[OpenFile]
    supplier: Supplier
    #: The most one fetch asks for, and the furthest readahead goes, in bytes.
    max_fetch: int
    max_readahead: int


def wire(
    backend: Backend,
    cache_dir: Path,
    config: CacheConfig,
    catalog: Catalog,
    nursery: trio.Nursery,
    on_suspect: Callable[[], None],
    on_recovered: Callable[[bool], None],
) -> Parts:
    """Make the collaborators of a cache over *backend* and start their
    background work in *nursery*.

    *on_suspect* and *on_recovered* are the cache disk's (state/disk.py).
    """
    stats = Stats()
    disk_limiter = trio.CapacityLimiter(DISK_THREADS)
    disk = CacheDisk(on_suspect)
    evictor = Evictor(catalog, cache_dir, config.cache_size, config.min_free, disk_limiter, disk)
    # What is in flight stays well inside the cache, or fills would evict
    # each other's blocks before their readers get them.
    bs, limit = config.block_size, evictor.limit
    share = limit // (4 * config.max_fetches)
    max_fetch = max(bs, min(config.max_fetch, share) // bs * bs)
    max_readahead = min(config.max_readahead, max(bs, limit // 4))
    committer = Committer(catalog, disk, disk_limiter)
    attrs = Attributes(backend, catalog, config.ttl, stats)
    content = Content(backend, catalog, config.verify, catalog.key is not None, stats)
    hasher = Hasher(catalog, bs, disk)
    ring = open_ring() if config.io_uring else None
    hits = HitReader(catalog, content, bs, ring, nursery, disk, disk_limiter)
    source = Source(backend, catalog, committer, stats)
    writer = BlockWriter(catalog, content, evictor, hasher, disk, committer, disk_limiter)
    fetch_limiter = trio.CapacityLimiter(config.max_fetches)
    runner = FetchRunner(source, writer, content, config, max_fetch, fetch_limiter, stats)
    misses = MissReader[OpenFile](
        runner, source, content, disk, catalog, nursery, max_readahead, stats, hits.serve
    )
    upkeep = Upkeep(
        catalog, committer, disk, evictor, disk_limiter, (runner.buffers.trim, hits.trim)
    )
    nursery.start_soon(upkeep.serve_flusher, config.flush_interval)
    nursery.start_soon(committer.serve_early_commits)
    probe = upkeep.probe(cache_dir / "data", max_fetch)
    nursery.start_soon(disk.serve_probe, probe, on_recovered, config.disk_probe_interval)
    nursery.start_soon(evictor.serve_trimmer)
    nursery.start_soon(hasher.serve)
    if ring is not None:
        nursery.start_soon(ring.serve)
    return Parts(
        stats=stats,
        disk=disk,
        evictor=evictor,
        committer=committer,
        attrs=attrs,
        content=content,
        hasher=hasher,
        hits=hits,
        whole=WholeFiles(catalog, content, disk, stats),
        source=source,
        misses=misses,
        supplier=Supplier(attrs, content, hasher, writer, disk_limiter, stats),
        max_fetch=max_fetch,
        max_readahead=max_readahead,
    )
