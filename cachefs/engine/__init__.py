"""The cache engine: no FUSE, no CLI, testable alone."""

from cachefs.engine.engine import CacheConfig, FileCache, OpenFile, open_file_cache

__all__ = ["CacheConfig", "FileCache", "OpenFile", "open_file_cache"]
