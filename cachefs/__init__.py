"""cachefs: a FUSE mount served from a persistent block cache over pluggable backends.

The public API: the ReadData contract a backend implements (``Backend``,
``ReadData``, ``RWEvent``, ``RWResult``, ...), the cache engine
(``FileCache``, ``open_file_cache``) and the errors.  The layers below it,
each importing only the ones after it (checked by ``lint-imports``):

- ``cachefs.cli``: the ``cachefs`` command, one module per command family
- ``cachefs.daemon``: the mount daemon, the one place that wires the rest
- ``cachefs.control``: a mount's control socket (protocol, server, client)
- ``cachefs.fs``: the file system over the engine; knows no FUSE transport
- ``cachefs.fuse``: transports that drive fs (``native``, ``pyfuse3``)
- ``cachefs.engine``: the block cache (disk state, hit path, miss path, policy)
- ``cachefs.contract``: what backends implement (``backends/`` holds them)
- ``cachefs._linux``: syscall helpers

The engine is imported on first use of its names, so that a backend importing
``cachefs.contract`` loads neither the engine nor ``cryptography``.
"""

from typing import TYPE_CHECKING, Any

from cachefs.contract import (
    Backend,
    ChangeResult,
    ContentInfo,
    ContentInfoSource,
    ContentInfoStore,
    DirEntry,
    FileAttrs,
    FileKind,
    ReadData,
    RWEvent,
    RWResult,
    WritableBackend,
    WriteCapability,
    WriteData,
)
from cachefs.errors import (
    AccessDenied,
    BadKey,
    CacheDirError,
    CacheDirInUse,
    CacheDiskFailed,
    CacheFSError,
    ConfigError,
    CorruptData,
    FileQuarantined,
    InvalidBlockSize,
    NoContentInfo,
    NotAFile,
    NotFound,
    OutOfBounds,
    PinLimitExceeded,
    ReadFailed,
    RulesError,
    SourceError,
    StorageQuarantined,
    TransientFailure,
    UnknownBackend,
    VersionGone,
)

__all__ = [
    "AccessDenied",
    "BadKey",
    "Backend",
    "ChangeResult",
    "ContentInfo",
    "ContentInfoSource",
    "ContentInfoStore",
    "CorruptData",
    "CacheConfig",
    "CacheDirError",
    "CacheDirInUse",
    "CacheDiskFailed",
    "CacheFSError",
    "ConfigError",
    "DirEntry",
    "FileAttrs",
    "FileCache",
    "FileKind",
    "FileQuarantined",
    "InvalidBlockSize",
    "NotAFile",
    "NoContentInfo",
    "NotFound",
    "OutOfBounds",
    "OpenFile",
    "PinLimitExceeded",
    "ReadData",
    "ReadFailed",
    "RulesError",
    "RWEvent",
    "RWResult",
    "WritableBackend",
    "WriteCapability",
    "WriteData",
    "SourceError",
    "StorageQuarantined",
    "TransientFailure",
    "UnknownBackend",
    "VersionGone",
    "open_file_cache",
]

if TYPE_CHECKING:
    from cachefs.engine import CacheConfig, FileCache, OpenFile, open_file_cache

_ENGINE = frozenset({"CacheConfig", "FileCache", "OpenFile", "open_file_cache"})


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        import cachefs.engine

        value = getattr(cachefs.engine, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cachefs' has no attribute {name!r}")
