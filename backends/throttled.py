"""A wrapper that makes a fast backend behave like a remote object store.

Policy:

- Every request to the storage (``stat``, ``list_dir``, ``read_data``,
  ``write_data``, the namespace changes, the content information calls)
  waits ``latency`` seconds before its first byte.  ``open_file`` and
  ``close_file`` pass through at no cost: an object store has no open.
- A ReadData or WriteData call is one connection: after its first byte, its
  bytes travel at ``bandwidth`` bytes per second.  The call returns when
  its last byte would have arrived, ``start + latency + bytes / bandwidth``
  (bytes read, or bytes written); time the wrapped backend spends counts
  towards that, it is not added to it.
- Concurrent calls are concurrent connections, each at the full
  ``bandwidth`` (as range GETs on separate connections are); with
  ``max_connections`` set, further calls first wait for a free connection,
  as in a client's connection pool.
- CANCELED notifications pass through at once.

The defaults, 30 ms and 90 MiB/s, are roughly one S3 connection.  Time is
trio's clock, so tests can run the wrapper under a MockClock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import trio

from backends.wrapper import Wrapper
from cachefs.contract import (
    Backend,
    ChangeResult,
    ContentInfo,
    DirEntry,
    FileAttrs,
    ReadData,
    RWEvent,
    WriteData,
)
from cachefs.errors import ConfigError

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_LATENCY = 0.030
DEFAULT_BANDWIDTH = 90 * MiB


class ThrottledBackend(Wrapper):
    """Wrap *inner*: *latency* seconds per request, *bandwidth* bytes/s per connection."""

    def __init__(
        self,
        inner: Backend,
        *,
        latency: float = DEFAULT_LATENCY,
        bandwidth: float = DEFAULT_BANDWIDTH,
        max_connections: int | None = None,
    ) -> None:
        if latency < 0:
            raise ConfigError(f"throttle latency must not be negative, got {latency}")
        if bandwidth <= 0:
            raise ConfigError(f"throttle bandwidth must be positive, got {bandwidth}")
        if max_connections is not None and max_connections < 1:
            raise ConfigError(f"max_connections must be at least 1, got {max_connections}")
        super().__init__(inner)
        self.latency = latency
        self.bandwidth = bandwidth
        self._pool = trio.CapacityLimiter(max_connections) if max_connections else None
        self._requests = 0
        self._bytes = 0
        self._written = 0
        self._active = 0
        self._peak = 0
        self._busy = 0.0

    def __repr__(self) -> str:
        return (
            f"ThrottledBackend({self.inner!r}, latency={self.latency:g}, "
            f"bandwidth={self.bandwidth / MiB:g} MiB/s)"
        )

    def statistics(self) -> dict[str, Any]:
        """Requests and bytes read and written so far, connections open now and
        at most, and the summed duration of the finished ReadData calls (over a
        wall time: the mean number of connections in use)."""
        return {
            "requests": self._requests,
            "bytes": self._bytes,
            "bytes_written": self._written,
            "connections": self._active,
            "peak_connections": self._peak,
            "read_seconds": self._busy,
        }

    async def _first_byte(self) -> float:
        """Count a request, wait for its first byte; the time it was sent."""
        self._requests += 1
        start = trio.current_time()
        await trio.sleep(self.latency)
        return start

    async def _read(self, req: ReadData) -> None:
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            start = await self._first_byte()
            await self.inner.read_data(req)
            self._bytes += req.bytes_read
            await trio.sleep_until(start + self.latency + req.bytes_read / self.bandwidth)
            self._busy += trio.current_time() - start
        finally:
            self._active -= 1

    async def read_data(self, req: ReadData) -> None:
        if req.flags & RWEvent.CANCELED:
            await self.inner.read_data(req)
            return
        if self._pool is None:
            await self._read(req)
            return
        async with self._pool:
            await self._read(req)

    async def _write(self, req: WriteData) -> None:
        self._active += 1
        self._peak = max(self._peak, self._active)
        try:
            start = await self._first_byte()
            await super().write_data(req)
            self._written += req.bytes_written
            await trio.sleep_until(start + self.latency + req.bytes_written / self.bandwidth)
        finally:
            self._active -= 1

    async def write_data(self, req: WriteData) -> None:
        if req.flags & RWEvent.CANCELED:
            await super().write_data(req)
            return
        if self._pool is None:
            await self._write(req)
            return
        async with self._pool:
            await self._write(req)

    async def stat(self, file_id: str) -> FileAttrs | None:
        await self._first_byte()
        return await self.inner.stat(file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        await self._first_byte()
        return await self.inner.list_dir(dir_id)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        await self._first_byte()
        return await super().make_dir(dir_id, mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        await self._first_byte()
        return await super().remove_file(file_id, version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        await self._first_byte()
        return await super().remove_dir(dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        await self._first_byte()
        return await super().rename(old_id, new_id, replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        await self._first_byte()
        return await super().set_size(file_id, size, version)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        await self._first_byte()
        return await super().set_attrs(file_id, mode, mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        await self._first_byte()
        return await super().make_symlink(file_id, target)

    async def content_info(self, file_id: str) -> ContentInfo | None:
        await self._first_byte()
        return await super().content_info(file_id)

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None:
        await self._first_byte()
        await super().put_content_info(file_id, info)

    async def delete_content_info(self, file_id: str) -> None:
        await self._first_byte()
        await super().delete_content_info(file_id)

    async def content_info_ids(self) -> list[str]:
        await self._first_byte()
        return await super().content_info_ids()


def parse_throttle(spec: str) -> tuple[float, float]:
    """``"LATENCY_MS,MIBPS"`` (e.g. ``"30,90"``) as (seconds, bytes per second).

    Raises ConfigError with the reason when *spec* is malformed.
    """
    parts = spec.split(",")
    if len(parts) != 2:
        raise ConfigError(f"throttle {spec!r}: expected LATENCY_MS,MIBPS (e.g. 30,90)")
    try:
        latency_ms, mibps = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigError(f"throttle {spec!r}: expected two numbers, e.g. 30,90") from None
    if not (0 <= latency_ms < math.inf and 0 < mibps < math.inf):  # also rejects nan
        raise ConfigError(f"throttle {spec!r}: latency must be >= 0 and bandwidth > 0, both finite")
    return latency_ms / 1000, mibps * MiB


def throttle(inner: Backend, spec: str = "30,90", **options: Any) -> ThrottledBackend:
    """Wrap *inner* as *spec* (``"LATENCY_MS,MIBPS"``) says; the mount's factory."""
    latency, bandwidth = parse_throttle(spec)
    return ThrottledBackend(inner, latency=latency, bandwidth=bandwidth, **options)


# What a mount may simulate: finite, and wide enough for any real store.
MAX_LATENCY_MS = 60_000
MIN_MIBPS, MAX_MIBPS = 0.001, 1_000_000


class ThrottlePlugin:
    """The mount's ``--throttle LATENCY_MS,MIBPS`` (entry point ``throttle`` of
    ``cachefs.wrappers``)."""

    def check(self, value: str) -> str:
        """*value* as written, once it parses and lies in range; ConfigError if not."""
        latency, bandwidth = parse_throttle(value)
        if latency * 1000 > MAX_LATENCY_MS or not MIN_MIBPS <= bandwidth / MiB <= MAX_MIBPS:
            raise ConfigError(
                f"throttle {value!r}: latency must be from 0 to {MAX_LATENCY_MS} ms and "
                f"bandwidth from {MIN_MIBPS} to {MAX_MIBPS} MiB/s"
            )
        return value

    def wrap(self, inner: Backend, value: str, names: Callable[[str], str]) -> Backend:
        return throttle(inner, value)


plugin = ThrottlePlugin()
