"""The cache engine: no FUSE, no CLI, testable alone."""

from cachefs.engine.config import CacheConfig
from cachefs.engine.filecache import FileCache
from cachefs.engine.handle import OpenFile
from cachefs.engine.opening import open_file_cache

__all__ = ["CacheConfig", "FileCache", "OpenFile", "open_file_cache"]
