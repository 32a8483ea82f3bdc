"""Tunables of the engine, checked once at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from cachefs.errors import ConfigError, InvalidBlockSize

MIN_BLOCK, MAX_BLOCK = 4 << 10, 64 << 20


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Tunables of the engine.  The defaults suit a local disk and S3 alike.

    ``cache_size`` None: 10 GiB or 80% of the cache filesystem's free space,
    whichever is smaller.  ``min_free`` None: 5% of the cache filesystem.
    ``verify``: when blocks read back from the cache disk are checked
    against their hashes: ``once`` per block per mount, ``always``, or
    ``off`` (no hashing, no content information).  ``io_uring``: hits that
    miss the page cache are read through io_uring where the system allows
    it; False: through reader threads.
    """

    block_size: int = 1 << 20
    ttl: float = 60.0
    retries: int = 3
    retry_delay: float = 0.1
    retry_max_delay: float = 2.0
    max_fetch: int = 8 << 20
    max_fetches: int = 8
    max_readahead: int = 64 << 20
    cache_size: int | None = None
    min_free: int | None = None
    flush_interval: float = 5.0
    #: How often a cache disk that failed is tried again (engine/state/disk.py).
    disk_probe_interval: float = 2.0
    verify: str = "once"
    io_uring: bool = True
    #: No change is taken (EROFS), whatever the backend can do.
    read_only: bool = False
    #: Seconds from the last close of a changed file to its flush (0: at close).
    write_back_delay: float = 5.0
    #: Changed bytes not yet flushed before writers wait; None: half the cache size.
    max_dirty: int | None = None

    def validate(self) -> None:
        bs = self.block_size
        if not (MIN_BLOCK <= bs <= MAX_BLOCK) or bs & (bs - 1):
            raise InvalidBlockSize(f"block size {bs} must be a power of two between 4K and 64M")
        for name in ("ttl", "retries", "retry_delay", "retry_max_delay", "max_readahead"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        if self.max_fetches < 1 or self.max_fetch < 1:
            raise ConfigError("max_fetches and max_fetch must be at least 1")
        if self.verify not in ("once", "always", "off"):
            raise ConfigError(f"verify must be once, always or off, not {self.verify!r}")
        if self.write_back_delay < 0:
            raise ConfigError("write_back_delay must not be negative")
        for name in ("cache_size", "min_free", "max_dirty"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{name} must not be negative")
