"""The store's notion of now, as UTC datetimes with microsecond precision.

``SystemClock`` reads the wall clock; ``TrioClock`` counts from the wall
clock at its creation by trio's clock, so that tests run days of expiry in
an instant with trio's ``MockClock``.  Either sleeps with trio, so a sleeper
is woken by cancellation at once.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

import trio

from cachefs.records.model import from_micros

__all__ = ["Clock", "SystemClock", "TrioClock"]


class Clock(Protocol):
    def now(self) -> datetime: ...

    async def sleep_until(self, when: datetime) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return from_micros(time.time_ns() // 1000)

    async def sleep_until(self, when: datetime) -> None:
        # the wall clock may be stepped: never sleep more than a minute at a time
        delay = (when - self.now()).total_seconds()
        await trio.sleep(min(max(delay, 0.0), 60.0))


class TrioClock:
    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime.now(UTC)
        self._t0 = trio.current_time()

    def now(self) -> datetime:
        elapsed = trio.current_time() - self._t0
        return self._start + timedelta(microseconds=int(elapsed * 1_000_000))

    async def sleep_until(self, when: datetime) -> None:
        await trio.sleep_until(self._t0 + (when - self._start).total_seconds())
