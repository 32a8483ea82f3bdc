"""Blocks in flight: a run of blocks held by whoever fetches, evicts or
supplies it, and what the readers that wait for it do when it ends.

A block held is neither read nor fetched by anyone else: readers wait on
the hold's ``done`` (set by :meth:`CachedFile.finish`), then fail like its
fetcher did (ReadFailed) or plan their read again against what is present
now (:class:`Replan`).
"""

from __future__ import annotations

import trio

from cachefs.errors import ReadFailed


class Replan(Exception):
    """Stop this transfer and plan the read again against the current view."""


class Fetch:
    """Blocks first..last being fetched by one reader; others wait on ``done``.

    ``data`` holds the bytes from ``data_at`` to the end of the run when
    they could not be stored (the cache disk failed): its readers are
    served from it.
    """

    __slots__ = ("first", "last", "done", "error", "data", "data_at")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.data: bytes | None = None
        self.data_at = 0

    def serves(self, offset: int, end: int) -> memoryview | None:
        """Bytes [offset, end) from ``data``, if it holds all of them."""
        data = self.data
        if data is None or offset < self.data_at or end > self.data_at + len(data):
            return None
        return memoryview(data)[offset - self.data_at : end - self.data_at]

    def raise_error(self) -> None:
        """In a waiter: fail like the fetcher did, or re-plan."""
        e = self.error
        if isinstance(e, ReadFailed):
            raise type(e)(str(e))
        if e is not None:
            raise Replan
