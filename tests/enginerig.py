"""A memory source under the faulty and trace wrappers, and an engine over it."""

from __future__ import annotations

import json
import os
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from backends.faulty import FaultyBackend
from backends.memory import MemoryBackend
from backends.trace import TraceBackend, read_trace
from cachefs import CacheConfig, FileCache, open_file_cache

BS = 64 * 1024
# Readahead off unless a test turns it on: most tests count the calls a read makes.
CONFIG = CacheConfig(block_size=BS, retry_delay=0, retries=3, max_readahead=0)


class Rig:
    def __init__(self, tmp_path: Path, files: dict[str, bytes] | None = None) -> None:
        self.memory = MemoryBackend(files)
        self.rules = tmp_path / "rules.json"
        self.faults([])
        self.trace_path = tmp_path / "trace.jsonl"
        self.backend = TraceBackend(FaultyBackend(self.memory, self.rules), self.trace_path)
        self.cache_dir = tmp_path / "cache"
        self.cache_dir.mkdir()
        self._seen = 0

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
    async def engine(self, **overrides: Any):
        async with open_file_cache(
            self.backend, self.cache_dir, replace(CONFIG, **overrides)
        ) as cache:
            yield cache


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
