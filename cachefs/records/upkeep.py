"""A member's background upkeep: EXPIRED when records expire, and its own
AUTOREFRESH records republished before they do, for as long as it runs.

An AUTOREFRESH record is refreshed in the last third of its lifetime (the
time from its last modification to its expiration) with the same lifetime
again, never past its creator's credentials: a record whose credentials end
first is left to expire.  The loop sleeps until the next expiration or
refresh is due, or until a change moves either.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

import trio

from cachefs.records.clock import Clock
from cachefs.records.model import Record

__all__ = ["plan_refresh", "serve_upkeep"]

# wake at least this often, whatever the database says (seconds)
MAX_SLEEP = 3600.0


class Upkept(Protocol):
    """What the upkeep needs of a store (RecordStore)."""

    clock: Clock

    async def expire_due(self) -> datetime | None: ...

    async def refresh_due(self) -> datetime | None: ...

    async def wait_upkeep(self, until: datetime | None) -> None: ...


def plan_refresh(
    mine: Sequence[Record], credentials_expire: datetime | None, now: datetime
) -> tuple[list[tuple[Record, datetime]], datetime | None]:
    """(records to refresh now with their new expiration, when the next is due)."""
    due: list[tuple[Record, datetime]] = []
    nxt: datetime | None = None
    for record in mine:
        assert record.modified is not None
        lifetime = record.expires - record.modified
        when = record.expires - lifetime / 3
        if when > now:
            nxt = when if nxt is None else min(nxt, when)
            continue
        if credentials_expire is None or record.expires <= now:
            continue
        expires = min(now + lifetime, credentials_expire)
        if expires > record.expires:
            due.append((record, expires))
    return due, nxt


async def serve_upkeep(
    store: Upkept, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run the upkeep of *store* until cancelled."""
    task_status.started()
    while True:
        expiry = await store.expire_due()
        refresh = await store.refresh_due()
        wakes = [w for w in (expiry, refresh) if w is not None]
        until = min(wakes) if wakes else None
        with trio.move_on_after(MAX_SLEEP):
            async with trio.open_nursery() as nursery:
                if until is not None:
                    nursery.start_soon(_sleep_then_cancel, store.clock, until, nursery)
                await store.wait_upkeep(until)
                nursery.cancel_scope.cancel()


async def _sleep_then_cancel(clock: Clock, when: datetime, nursery: trio.Nursery) -> None:
    await clock.sleep_until(when)
    nursery.cancel_scope.cancel()
