"""A source under the faulty and trace wrappers, and an engine over it.

The source is a memory backend unless a test passes another: the
``make_source`` fixture of s3server.py makes one of each kind in
``SOURCE_KINDS`` (a memory backend, a local directory, an S3 bucket on a
moto server), all changed through one small API, :class:`Source`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from backends.faulty import FaultyBackend
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from backends.trace import TraceBackend, read_trace
from cachefs import Backend, CacheConfig, FileCache, open_file_cache
from cachefs.contract import ReadData, RWEvent

BS = 64 * 1024
# Readahead off unless a test turns it on: most tests count the calls a read makes.
CONFIG = CacheConfig(block_size=BS, retry_delay=0, retries=3, max_readahead=0)


SOURCE_KINDS = ["memory", "local", "s3"]
SourceFactory = Callable[..., "Source"]


class Source(Protocol):
    """A backend, and how a test changes what it serves."""

    backend: Backend

    def put(self, path: str, data: bytes) -> None: ...

    def delete(self, path: str) -> None: ...

    def close(self) -> None: ...


class MemorySource:
    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        self.memory = MemoryBackend(files)
        self.backend: Backend = self.memory

    def put(self, path: str, data: bytes) -> None:
        self.memory.put(path, data)

    def delete(self, path: str) -> None:
        self.memory.delete(path)

    def close(self) -> None:
        pass


class LocalSource:
    """A directory; a put replaces the file (a new inode, so a new version)."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        root.mkdir(parents=True)
        self.root = root
        for path, data in files.items():
            self.put(path, data)
        self.backend: Backend = LocalBackend(root)

    def put(self, path: str, data: bytes) -> None:
        target = self.root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def delete(self, path: str) -> None:
        (self.root / path).unlink()

    def close(self) -> None:
        pass


class Bare:
    """A memory backend without the optional content information calls."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.memory = MemoryBackend(files)

    def __getattr__(self, name: str) -> Any:
        if "content_info" in name:
            raise AttributeError(name)
        return getattr(self.memory, name)

    def __repr__(self) -> str:
        return "Bare()"


class Rig:
    def __init__(
        self, tmp_path: Path, files: dict[str, bytes] | None = None, *, source: Source | None = None
    ) -> None:
        self.source: Source = source if source is not None else MemorySource(files)
        self.rules = tmp_path / "rules.json"
        self.faults([])
        self.trace_path = tmp_path / "trace.jsonl"
        self.backend = TraceBackend(FaultyBackend(self.source.backend, self.rules), self.trace_path)
        self.cache_dir = tmp_path / "cache"
        self.cache_dir.mkdir()
        self._seen = 0

    @property
    def memory(self) -> MemoryBackend:
        """The memory backend, for tests that patch it (memory sources only)."""
        if not isinstance(self.source, MemorySource):
            raise AttributeError(f"{type(self.source).__name__} has no memory backend")
        return self.source.memory

    def faults(self, rules: list[dict[str, Any]]) -> None:
        # A new inode each time, so the wrapper sees the change whatever the clock.
        tmp = self.rules.with_suffix(".tmp")
        tmp.write_text(json.dumps(rules))
        os.replace(tmp, self.rules)

    def calls(self) -> list[dict[str, Any]]:
        """ReadData calls traced since the last look."""
        lines = read_trace(self.trace_path) if self.trace_path.exists() else []
        new, self._seen = lines[self._seen :], len(lines)
        return new

    def reads(self) -> list[dict[str, Any]]:
        """Like calls(), without the zero-length CANCELED notifications."""
        return [c for c in self.calls() if "CANCELED" not in c["flags"]]

    @asynccontextmanager
    async def engine(self, key: bytes | None = None, **overrides: Any):
        async with open_file_cache(
            self.backend, self.cache_dir, replace(CONFIG, **overrides), key_material=key
        ) as cache:
            yield cache


def record_made(monkeypatch: Any, module: object, name: str) -> list[Any]:
    """What the factory ``module.name`` makes from now on, as it makes it:
    how a test gets hold of one of the engine's parts without reaching
    into the engine."""
    made: list[Any] = []
    real = getattr(module, name)

    def make(*args: Any, **kwargs: Any) -> Any:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(module, name, make)
    return made


def read_request(
    file_id: str,
    position: int,
    count: int,
    *,
    size: int,
    flags: RWEvent,
    context: Any = None,
    version: str = "",
    buffer: memoryview | None = None,
) -> ReadData:
    """A ReadData of *count* bytes at *position*, as the engine raises it (with a
    fresh buffer unless given one)."""
    return ReadData(
        file_id=file_id,
        size=size,
        position=position,
        flags=flags,
        buffer=memoryview(bytearray(count)) if buffer is None else buffer,
        bytes_to_read=count,
        file_context=context,
        version=version,
    )


async def read_sequential(cache: FileCache, file_id: str, chunk: int = BS) -> bytes:
    fh = await cache.open(file_id)
    try:
        out = bytearray()
        while data := await cache.read(fh, len(out), chunk):
            out += data
        return bytes(out)
    finally:
        await cache.close(fh)


async def read_at(cache: FileCache, file_id: str, offset: int, length: int) -> bytes:
    fh = await cache.open(file_id)
    try:
        return await cache.read(fh, offset, length)
    finally:
        await cache.close(fh)
