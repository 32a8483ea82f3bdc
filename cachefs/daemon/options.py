"""What a mount is asked to do: its options, checked once, as data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachefs.engine import CacheConfig
from cachefs.registry import source_scheme


@dataclass(frozen=True, slots=True)
class MountOptions:
    source: str
    mountpoint: Path
    cache_dir: Path
    config: CacheConfig
    faults: Path | None = None
    trace: Path | None = None
    throttle: str | None = None
    readahead_kb: int = 1024
    #: keyword options of the source's backend factory (the ``--s3-*`` options)
    backend_options: dict[str, Any] = field(default_factory=dict)
    #: encrypt the cache at rest, the key from key_file or CACHEFS_KEY
    encrypt: bool = False
    key_file: Path | None = None
    #: let the kernel read whole cached files by itself (FUSE passthrough)
    passthrough: bool = True
    #: the FUSE transport: "native" (cachefs's own, with passthrough) or "pyfuse3"
    fuse: str = "native"


def normalize_source(source: str) -> str:
    """A plain path made absolute; URLs as written."""
    if source_scheme(source) == "file" and "://" not in source:
        return os.path.abspath(source)
    return source


def default_cache_dir(identity: str) -> Path:
    """``$XDG_CACHE_HOME/cachefs/<hash>`` (root: ``/var/cache/cachefs/<hash>``).

    *identity* names what is cached: the source, and for a bucket its endpoint
    (``cachefs.cli.s3options.cache_identity``), so that two sources never share a dir.
    """
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    if os.geteuid() == 0:
        base = Path("/var/cache")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cachefs" / digest
