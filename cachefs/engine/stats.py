"""The engine's counters, and the shape of :meth:`FileCache.statistics`.

Each collaborator is handed the one :class:`Stats` of its cache and counts
into it (``stats.hit_bytes += n``); nothing else writes the counters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict, cast

from cachefs.contract import RWResult
from cachefs.latency import Histogram, HistogramData


class Counters(TypedDict):
    read_data_calls: int
    bytes_from_backend: int
    hit_bytes: int
    miss_bytes: int
    stale_served: int
    passthrough_opens: int
    version_gone_reads: int
    corrupt_from_backend: int
    corrupt_in_cache: int
    add_data_accepted: int
    add_data_rejected: int
    fetched_ahead: int


@dataclass(slots=True)
class Stats:
    """Counters since the mount started (``passthrough_opens``: opens
    handed to the kernel to read by itself, less those given back unused)."""

    read_data_calls: int = 0
    bytes_from_backend: int = 0
    hit_bytes: int = 0
    miss_bytes: int = 0
    #: What was last known, served while the source failed or was offline.
    stale_served: int = 0
    passthrough_opens: int = 0
    version_gone_reads: int = 0
    #: Blocks from the backend that did not match the content information.
    corrupt_from_backend: int = 0
    #: Blocks read back from the cache disk that failed their check.
    corrupt_in_cache: int = 0
    add_data_accepted: int = 0
    add_data_rejected: int = 0
    #: Files fetched whole ahead of a reader walking their directory.
    fetched_ahead: int = 0
    #: ReadData calls answered, by result code name (FAILURE too for a backend
    #: that raised or answered what cannot be); a call cancelled before its
    #: answer is in ``read_data_calls`` only.
    read_data_results: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(RWResult.__members__, 0)
    )
    #: How long the answered ReadData calls took.
    read_data_seconds: Histogram = field(default_factory=Histogram)

    def as_dict(self) -> Counters:
        """The counters by name, in declaration order."""
        return cast(Counters, {name: getattr(self, name) for name in Counters.__annotations__})


class CacheStatistics(Counters):
    """What :meth:`FileCache.statistics` returns: the counters, then gauges."""

    read_data_results: dict[str, int]
    read_data_seconds: HistogramData
    hit_ratio: float | None
    cached_bytes: int
    cache_limit: int
    min_free: int
    pinned_bytes: int
    evicted_bytes: int
    files_in_error: int
    file_errors: list[str]
    short_files: list[str]
    external_error: str | None
    block_size: int
    verify: str
    encrypted: bool
    disk_reads: str
    passthrough_files: int
    cache_disk_error: str | None
    cache_disk_failures: int
    unhashed_blocks: int
    ttl: float
    cache_dir: str
