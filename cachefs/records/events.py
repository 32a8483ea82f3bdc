"""Change events to watchers, and the paged enumeration of records.

A watcher gets every event from its subscription on, in order, through a
bounded buffer: one that falls more than ``BUFFER`` events behind loses its
subscription with an error saying so, rather than slowing the store or
growing without bound.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection
from types import TracebackType

import trio

from cachefs.records.errors import GroupError
from cachefs.records.model import Record, RecordEvent

__all__ = ["BUFFER", "EventHub", "EventSubscription", "RecordEnumeration"]

BUFFER = 10_000


class EventSubscription:
    """``async with store.events(types) as events: async for event in events: ...``"""

    def __init__(
        self, hub: EventHub, types: Collection[uuid.UUID] | None, buffer: int = BUFFER
    ) -> None:
        self._hub = hub
        self.types = None if types is None else frozenset(types)
        self.buffer = buffer
        self._send, self._receive = trio.open_memory_channel[RecordEvent](buffer)
        self.overflowed = False

    def _offer(self, event: RecordEvent) -> None:
        if self.types is not None and event.record_type not in self.types:
            return
        if self.overflowed:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.overflowed = True
            self._hub.overflows += 1
            self._send.close()
        except trio.ClosedResourceError:
            pass

    async def __aenter__(self) -> EventSubscription:
        self._hub._add(self)
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._hub._remove(self)
        self._send.close()
        await self._receive.aclose()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> RecordEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.overflowed:
                raise GroupError(
                    f"events were lost: this watcher fell more than {self.buffer} events behind"
                ) from None
            raise StopAsyncIteration from None


class EventHub:
    def __init__(self) -> None:
        self._subs: list[EventSubscription] = []
        self.overflows = 0  # subscriptions ended for falling too far behind

    @property
    def watchers(self) -> int:
        return len(self._subs)

    def subscribe(self, types: Collection[uuid.UUID] | None) -> EventSubscription:
        return EventSubscription(self, types)

    def publish(self, event: RecordEvent) -> None:
        for sub in list(self._subs):
            sub._offer(event)

    def _add(self, sub: EventSubscription) -> None:
        self._subs.append(sub)

    def _remove(self, sub: EventSubscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)


# (records of the page, the id to read on from, None at the end)
Page = Callable[[str, int], Awaitable[tuple[list[Record], str | None]]]


class RecordEnumeration:
    """An async iterator over records read in pages of ``page_size``; ``aclose()``
    (or leaving ``async with``) ends it early."""

    def __init__(self, page: Page, page_size: int = 256) -> None:
        self._page = page
        self._size = page_size
        self._buffer: list[Record] = []
        self._after = ""
        self._done = False

    def __aiter__(self) -> RecordEnumeration:
        return self

    async def __anext__(self) -> Record:
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            page, after = await self._page(self._after, self._size)
            if after is None:
                self._done = True
            else:
                self._after = after
            self._buffer = page[::-1]
        return self._buffer.pop()

    async def aclose(self) -> None:
        self._done = True
        self._buffer = []

    async def __aenter__(self) -> RecordEnumeration:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
