"""Readahead: fetch ahead of a sequential reader in growing windows.

Policy: from the second read of a sequential run on, the engine keeps the
blocks up to ``window`` bytes past the reader fetched or in flight (refilled
when less than half a window is left).  The
window starts at 1 MiB (or one block) and doubles each time it is extended,
up to ``max_readahead``.  Fetches run as background tasks of the engine, one
ReadData call per chunk of up to 4 MiB; the engine's fetch limiter allows at
most ``max_fetches`` calls in flight, each with one buffer of at most
``max_fetch`` bytes: that bounds the memory readahead uses.  When the reader
seeks away or closes, its readahead is cancelled and the transfer ends with
a CANCELED call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from cachefs.engine.index import CachedFile
from cachefs.engine.transfers import Transfer

log = logging.getLogger(__name__)

FIRST_WINDOW = 1 << 20
CHUNK = 4 << 20
# How long stopping waits for cancelled fetches to come back from the backend.
STOP_DEADLINE = 10.0

EnsureFn = Callable[[CachedFile, int, int, Transfer], Awaitable[None]]


class Readahead:
    """The readahead of one sequential run (one continuous transfer)."""

    __slots__ = ("transfer", "upto", "window", "_scopes", "_idle", "_running", "_stopped")

    def __init__(self, transfer: Transfer, block_size: int, max_readahead: int) -> None:
        self.transfer = transfer
        self.upto = 0
        self.window = max(min(FIRST_WINDOW, max_readahead), block_size)
        self._scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._running = 0
        self._stopped = False

    def extend(
        self,
        cf: CachedFile,
        end: int,
        block_size: int,
        max_readahead: int,
        nursery: trio.Nursery,
        ensure: EnsureFn,
    ) -> None:
        """The reader reached *end*: have blocks up to end + window fetched."""
        # Refill once less than half a window is ahead, so calls stay large.
        if self._stopped or self.upto >= cf.size or end + self.window // 2 <= self.upto:
            return
        start = max(self.upto, end)
        self.upto = min(cf.size, end + self.window)
        self.window = min(self.window * 2, max(max_readahead, block_size))
        if start >= self.upto:
            return
        bs = block_size
        per_call = max(1, CHUNK // bs)
        first, last = start // bs, (self.upto - 1) // bs
        for a in range(first, last + 1, per_call):
            b = min(last, a + per_call - 1)
            if cf.present.find(0, a, b + 1) >= 0:
                self._running += 1
                self._idle = trio.Event() if self._running == 1 else self._idle
                nursery.start_soon(self._fetch, cf, a, b, ensure)

    async def _fetch(self, cf: CachedFile, first: int, last: int, ensure: EnsureFn) -> None:
        try:
            if self._stopped:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    await ensure(cf, first, last, self.transfer)
                except Exception as e:  # the reader meets it again in the foreground
                    log.debug("readahead of %s blocks %d-%d: %r", cf.file_id, first, last, e)
                finally:
                    self._scopes.discard(scope)
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    async def stop(self) -> None:
        """Cancel what is in flight and wait (bounded) until it has returned."""
        self._stopped = True
        for scope in self._scopes:
            scope.cancel()
        with trio.move_on_after(STOP_DEADLINE):
            await self._idle.wait()
