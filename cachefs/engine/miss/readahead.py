"""Readahead: fetch ahead of a sequential reader in growing windows.

Policy: from the second read of a sequential run on, the engine keeps the
blocks up to ``window`` bytes past the reader fetched or in flight.  The
window starts at 1 MiB (or one block) and doubles each time it is topped
up, up to ``max_readahead``.  It is topped up in whole calls of ``max_fetch``
bytes (half a window while the window is smaller) as soon as one fits, so
calls stay large and some are always in flight (refilling half a window at
once leaves the pipeline empty between refills).  Fetches
run as background tasks of the engine; the engine's fetch limiter allows at
most ``max_fetches`` calls in flight, each with one buffer of at most
``max_fetch`` bytes: that bounds the memory readahead uses.  When the
reader seeks away or closes, its readahead is cancelled and the transfer
ends with a CANCELED call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from cachefs.engine.miss.transfers import Transfer
from cachefs.engine.state.index import CachedFile

log = logging.getLogger(__name__)

FIRST_WINDOW = 1 << 20
# How long stopping waits for cancelled fetches to come back from the backend.
STOP_DEADLINE = 10.0

EnsureFn = Callable[[CachedFile, int, int, Transfer], Awaitable[object]]


class Readahead:
    """The readahead of one sequential run (one continuous transfer)."""

    __slots__ = (
        "transfer",
        "upto",
        "window",
        "_block_size",
        "_max_window",
        "_chunk",
        "_nursery",
        "_ensure",
        "_scopes",
        "_idle",
        "_running",
        "_stopped",
    )

    def __init__(
        self,
        transfer: Transfer,
        block_size: int,
        max_readahead: int,
        chunk: int,
        nursery: trio.Nursery,
        ensure: EnsureFn,
    ) -> None:
        """*chunk*: the most one call fetches (the engine's max_fetch)."""
        self.transfer = transfer
        self.upto = 0
        self.window = max(min(FIRST_WINDOW, max_readahead), block_size)
        self._block_size = block_size
        self._max_window = max(max_readahead, block_size)
        self._chunk = chunk
        self._nursery = nursery
        self._ensure = ensure
        self._scopes: set[trio.CancelScope] = set()
        self._idle = trio.Event()
        self._idle.set()
        self._running = 0
        self._stopped = False

    def extend(self, cf: CachedFile, end: int) -> None:
        """The reader reached *end*: have blocks up to end + window fetched.

        Topped up in whole calls of up to the chunk size as soon as one
        fits, so the calls stay large and the pipeline never drains.
        """
        if self._stopped or self.upto >= cf.size:
            return
        bs = self._block_size
        unit = max(bs, min(self._chunk, self.window // 2) // bs * bs)
        start = max(self.upto, -(-end // bs) * bs)
        upto = min(cf.size, end + self.window)
        if upto < cf.size:
            upto = start + (upto - start) // unit * unit
        if upto <= start:
            return
        self.upto = upto
        self.window = min(self.window * 2, self._max_window)
        per_call = unit // bs
        first, last = start // bs, (upto - 1) // bs
        for a in range(first, last + 1, per_call):
            b = min(last, a + per_call - 1)
            if cf.present.find(0, a, b + 1) >= 0:
                self._running += 1
                self._idle = trio.Event() if self._running == 1 else self._idle
                self._nursery.start_soon(self._fetch, cf, a, b)

    async def _fetch(self, cf: CachedFile, first: int, last: int) -> None:
        try:
            if self._stopped:
                return
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    await self._ensure(cf, first, last, self.transfer)
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
