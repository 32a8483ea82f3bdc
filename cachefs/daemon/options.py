"""What a mount is asked to do: its options, checked once, as data.

``cachefs mount`` checks the options in the user's process and hands the
daemon this value as JSON (``to_json``, ``from_json``): the daemon never
parses a command line of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachefs.engine import CacheConfig
from cachefs.errors import CacheFSError
from cachefs.fuse import TRANSPORTS
from cachefs.group.options import MemberOptions
from cachefs.registry import source_scheme


@dataclass(frozen=True, slots=True)
class MountOptions:
    source: str
    mountpoint: Path
    cache_dir: Path
    config: CacheConfig
    #: the wrappers stacked on the backend, innermost first: (plugin name, its
    #: option's value as its check returned it); see cachefs.registry.wrapper
    wrappers: tuple[tuple[str, str], ...] = ()
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
    #: the group this mount takes part in, None for none
    group: MemberOptions | None = None
    #: where to serve Prometheus metrics, (host, port); None: not served
    metrics: tuple[str, int] | None = None
    #: let users other than the mounting one in (FUSE allow_other)
    allow_other: bool = False

    def wrapper(self, name: str) -> str | None:
        """The value of wrapper *name*, None if it is not stacked."""
        return next((value for n, value in self.wrappers if n == name), None)

    def to_json(self) -> str:
        """These options as JSON, for ``from_json`` (in the daemon)."""
        return json.dumps(_plain(self))

    @classmethod
    def from_json(cls, text: str) -> MountOptions:
        """The options ``to_json`` wrote; ValueError if *text* holds anything else."""
        try:
            data = json.loads(text, parse_constant=_no_constant)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        options: MountOptions = _typed(data, cls, "options")
        try:
            options.config.validate()
        except CacheFSError as e:
            raise ValueError(str(e)) from None
        for name in ("mountpoint", "cache_dir"):
            if not getattr(options, name).is_absolute():
                raise ValueError(f"{name} is not an absolute path")
        if options.readahead_kb < 0:
            raise ValueError("readahead_kb is negative")
        if options.fuse not in TRANSPORTS:
            raise ValueError(f"fuse is not one of {', '.join(TRANSPORTS)}")
        return options


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number the options may hold")


def _plain(value: object) -> object:
    """*value* as JSON data: dataclasses as objects, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(value: object, hint: Any, where: str) -> Any:
    """*value* (JSON data) as type *hint*; ValueError naming *where* if it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _typed(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} is not {hint}")
    if hint is Any or (hint is type(None) and value is None):
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object, not {value!r}")
        hints = typing.get_type_hints(hint)
        names = {f.name for f in dataclasses.fields(hint)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        given = {k: _typed(v, hints[k], f"{where}.{k}") for k, v in value.items()}
        try:
            return hint(**given)
        except TypeError as e:  # a field without a default is missing
            raise ValueError(f"{where}: {e}") from None
    if origin is tuple and isinstance(value, list):
        items = args[:1] * len(value) if args[-1:] == (...,) else args
        if len(items) != len(value):
            raise ValueError(f"{where}: expected {len(items)} items, not {value!r}")
        return tuple(_typed(v, t, where) for v, t in zip(value, items, strict=True))
    if origin is dict and isinstance(value, dict):
        return {_typed(k, args[0], where): _typed(v, args[1], where) for k, v in value.items()}
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is float and type(value) is int:
        return float(value)
    if hint in (str, int, float, bool) and type(value) is hint:
        return value
    raise ValueError(f"{where}: {value!r} is not {getattr(hint, '__name__', hint)}")


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
