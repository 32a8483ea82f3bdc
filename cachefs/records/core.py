"""What a member's store and its arrivals share: the database and the one
thread it is used from, the lock over read-check-write changes, the events,
the counters, the record versions already checked, and the wake-ups of the
engine's publisher and of the upkeep.

Policy: the database is used from one worker thread at a time (sqlite is
not thread-safe, and every change is a read-check-write); a change holds
``lock`` across its read and its write.  Records read back are checked in
that thread too, once per version per process (a bounded cache), and a
version that fails is removed, that version only.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import trio

from cachefs.records.clock import Clock
from cachefs.records.database import Database
from cachefs.records.errors import GroupError, RecordsError
from cachefs.records.events import EventHub
from cachefs.records.model import ApplyResult, ChangeType, Record, RecordEvent, encode_record
from cachefs.records.stats import StoreStatistics
from cachefs.records.trust import Trust

__all__ = ["StoreCore"]

log = logging.getLogger("cachefs.records.store")
T = TypeVar("T")
# record versions remembered as checked (about 200 bytes each)
VERIFIED_CAP = 100_000

Key = tuple[uuid.UUID, int, bytes]


class StoreCore:
    def __init__(
        self,
        db: Database,
        *,
        group_id: str,
        member_id: str,
        trust: Trust,
        max_record_size: int,
        clock: Clock,
    ) -> None:
        self.db = db
        self.group_id = group_id
        self.member_id = member_id
        self.trust = trust
        self.max_record_size = max_record_size
        self.clock = clock
        self.lock = trio.Lock()  # a read-check-write of one change at a time
        self.hub = EventHub()
        self.stats = StoreStatistics()
        self._limiter = trio.CapacityLimiter(1)  # one database call at a time
        self._verified: dict[Key, None] = {}  # a bounded FIFO: insertion-ordered
        self._logged: set[str] = set()
        self._changed = trio.Event()  # a local change was queued for the engine
        self._upkeep_wake = trio.Event()
        self._upkeep_at: datetime | None = None  # the upkeep's next planned wake
        self._in_cycle = False  # the upkeep is reading the database
        self._cycle_min: datetime | None = None  # what changes meanwhile need, earliest

    async def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run a database call in the one database thread; a database error is a
        one-line GroupError."""

        def run() -> T:
            try:
                return fn(*args)
            except sqlite3.Error as e:  # locked for too long, disk full, damaged file
                raise GroupError(f"the record database of group {self.group_id}: {e}") from e

        return await trio.to_thread.run_sync(run, limiter=self._limiter)

    # -- checks ------------------------------------------------------------------------

    def remember_checked(self, record: Record) -> None:
        assert record.id is not None
        self._verified[(record.id, record.version, record.signature)] = None
        while len(self._verified) > VERIFIED_CAP:  # the oldest forgotten first
            del self._verified[next(iter(self._verified))]

    async def read_checked(
        self, read: Callable[[], tuple[list[Record], str | None]]
    ) -> tuple[list[Record], str | None]:
        """What *read* (run in the database thread) returns, each record checked
        there unless this version was checked before; those that fail are dropped
        and removed."""

        def run() -> tuple[list[Record], list[tuple[Record, RecordsError]], str | None]:
            records, more = read()
            good, bad = [], []
            for record in records:
                assert record.id is not None
                if (record.id, record.version, record.signature) in self._verified:
                    good.append(record)
                    continue
                body = encode_record(self.group_id, dataclasses.replace(record, signature=b""))
                try:
                    self.trust.check_record(body, record, None)
                except RecordsError as e:
                    bad.append((record, e))
                    continue
                good.append(record)
            return good, bad, more

        good, bad, more = await self.call(run)
        for record in good:
            self.remember_checked(record)
        for record, e in bad:
            self.reject(e.name, f"record {record.id} in the local database: {e.detail}")
        if bad:
            # only that very version: a newer one may have arrived meanwhile
            async with self.lock:
                await self.call(self.db.remove_versions, [r for r, _ in bad])
        return good, more

    def reject(self, reason: str, detail: str) -> ApplyResult:
        """Count a refused change; the first of each reason is a WARNING."""
        self.stats.rejected += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("rejected a change (%s): %s", reason, detail)
        else:
            log.debug("rejected a change (%s): %s", reason, detail)
        return ApplyResult.REJECTED

    # -- what a change sets off ------------------------------------------------------------

    def changed(self, record: Record, held: Record | None, *, queued: bool) -> None:
        """A version was stored in place of *held*: its event, the upkeep's wake and
        (*queued* for the engine) the publisher's."""
        self.remember_checked(record)
        self.raise_event(record, held)
        self.upkeep_needed(record)
        if queued:
            self.queued()

    def raise_event(self, record: Record, held: Record | None) -> None:
        assert record.id is not None
        live_before = held is not None and not held.deleted
        if record.deleted:
            if not live_before:
                return
            change = ChangeType.DELETED
        else:
            change = ChangeType.UPDATED if live_before else ChangeType.ADDED
        self.hub.publish(RecordEvent(change, record.id, record.type, record.version))

    def queued(self) -> None:
        self._changed.set()

    async def wait_queued(self) -> None:
        """Return when a change was queued for the engine since the last return."""
        await self._changed.wait()
        self._changed = trio.Event()

    def upkeep_needed(self, record: Record) -> None:
        when = record.expires
        if record.autorefresh and record.creator == self.member_id and record.modified:
            when -= (record.expires - record.modified) / 3
        if self._in_cycle:  # the cycle may have read the database before this change
            if self._cycle_min is None or when < self._cycle_min:
                self._cycle_min = when
        elif self._upkeep_at is None or when < self._upkeep_at:
            self._upkeep_at = when
            self._upkeep_wake.set()

    def upkeep_started(self) -> None:
        self._in_cycle = True
        self._cycle_min = None

    async def wait_upkeep(self, until: datetime | None) -> None:
        """Return when a change moved the next expiration or refresh before *until*
        (the upkeep's next wake; None: none planned)."""
        self._in_cycle = False
        if self._cycle_min is not None and (until is None or self._cycle_min < until):
            await trio.lowlevel.checkpoint()
            return  # a change during the cycle comes first: plan again
        self._upkeep_at = until
        await self._upkeep_wake.wait()
        self._upkeep_wake = trio.Event()
