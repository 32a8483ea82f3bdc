"""cachefs: a FUSE mount served from a persistent block cache over pluggable backends."""

from cachefs.contract import Backend, DirEntry, FileAttrs, FileKind, ReadData, RWEvent, RWResult
from cachefs.engine import CacheConfig, FileCache, OpenFile, open_file_cache
from cachefs.errors import (
    CacheDirError,
    CacheDirInUse,
    CacheFSError,
    ConfigError,
    FileQuarantined,
    InvalidBlockSize,
    NotAFile,
    NotFound,
    ReadFailed,
    RulesError,
    SourceError,
    StorageQuarantined,
    TransientFailure,
    UnknownBackend,
)

__all__ = [
    "Backend",
    "CacheConfig",
    "CacheDirError",
    "CacheDirInUse",
    "CacheFSError",
    "ConfigError",
    "DirEntry",
    "FileAttrs",
    "FileCache",
    "FileKind",
    "FileQuarantined",
    "InvalidBlockSize",
    "NotAFile",
    "NotFound",
    "OpenFile",
    "ReadData",
    "ReadFailed",
    "RulesError",
    "RWEvent",
    "RWResult",
    "SourceError",
    "StorageQuarantined",
    "TransientFailure",
    "UnknownBackend",
    "open_file_cache",
]
