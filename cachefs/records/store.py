"""The record store of one member: the reference's record operations over the
member's own database, with every change signed by this member and every
arrival checked.

Policy:
- A member's own changes are checked as strictly as anyone's: an
  administrator may add, update and delete any record, a member only the
  records it created; nobody may publish past their credentials' expiry.
- Changes from elsewhere (``apply_remote``: the engine, a snapshot) are
  checked by Trust, then applied only if they win over the version held
  (``Record.sort_key``): replaying, reordering or duplicating them changes
  nothing, and every member ends with the same version.
- Records read from the database are checked again before they are
  returned (once per version per process): the file is not trusted either.
- Events are raised on this member for every change it applies, its own
  included, and EXPIRED once when a record's expiration passes.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cachefs.records.arrivals import Arrivals
from cachefs.records.attributes import format_date, normalize_attributes
from cachefs.records.clock import Clock
from cachefs.records.core import StoreCore
from cachefs.records.credentials import Credential, Role
from cachefs.records.database import Database
from cachefs.records.errors import (
    GroupError,
    GroupNotReady,
    InvalidRecord,
    InvalidRecordExpiration,
    MaxRecordSizeExceeded,
    NotAuthorized,
    RecordNotFound,
    RecordsError,
)
from cachefs.records.events import EventSubscription, RecordEnumeration
from cachefs.records.identity import Identity
from cachefs.records.model import (
    RESERVED_TYPES,
    ChangeType,
    Record,
    RecordEvent,
    RecordFlags,
    encode_record,
    from_micros,
    micros,
    record_id,
)
from cachefs.records.search import compile_query, parse_search
from cachefs.records.stats import StoreStatistics
from cachefs.records.trust import Trust
from cachefs.records.upkeep import plan_refresh

__all__ = ["RecordStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_US = timedelta(microseconds=1)


class RecordStore:
    """The records of one group as this member sees them (``group.records``);
    ``arrivals`` takes the changes from elsewhere."""

    def __init__(
        self,
        db: Database,
        *,
        group_id: str,
        identity: Identity,
        trust: Trust,
        max_record_size: int,
        clock: Clock,
    ) -> None:
        self._core = core = StoreCore(
            db,
            group_id=group_id,
            member_id=identity.member_id,
            trust=trust,
            max_record_size=max_record_size,
            clock=clock,
        )
        self._db = db
        self._me = identity
        self.group_id = group_id
        self.trust = trust
        self.max_record_size = max_record_size
        self.clock = clock
        self.arrivals = Arrivals(core)

    # -- the operations ------------------------------------------------------------------

    async def add(self, record: Record, *, internal: bool = False) -> uuid.UUID:
        """Store a new record; returns its id.  Only ``type``, ``expires``,
        ``attributes``, ``data`` and the AUTOREFRESH flag are taken from *record*.
        *internal* lets cachefs itself use its reserved types."""
        if not isinstance(record.type, uuid.UUID):
            raise InvalidRecord("a record needs a type, a UUID")
        if record.type in RESERVED_TYPES and not internal:
            raise NotAuthorized(f"record type {record.type} is reserved by cachefs")
        now = self.clock.now()
        cred = self._my_credential(now)
        expires = self._check_expiry(record.expires, now, cred.expires)
        attributes = normalize_attributes(record.attributes)
        async with self._core.lock:
            # the id is derived from the creation time: the next microsecond if taken
            for _ in range(100):
                rid = record_id(self.group_id, self._me.member_id, record.type, now)
                stored = Record(
                    type=record.type,
                    expires=expires,
                    attributes=attributes,
                    data=bytes(record.data),
                    flags=record.flags & RecordFlags.AUTOREFRESH,
                    id=rid,
                    version=1,
                    creator=self._me.member_id,
                    modified_by=self._me.member_id,
                    created=now,
                    modified=now,
                )
                try:
                    await self._commit_local(stored, None)
                except _Changed:
                    now += _US
                    continue
                return rid
        raise GroupError("cannot give the record an id: the database is changing too fast")

    async def get(self, record_id: uuid.UUID) -> Record:
        """The live record with this id; RECORD_NOT_FOUND if it never existed, was
        deleted or has expired."""
        now = self.clock.now()
        found = await self._read(self._db.get_live, record_id, micros(now))
        if not found:
            raise RecordNotFound(f"no record {record_id}")
        return found[0]

    async def update(self, record: Record, *, internal: bool = False) -> Record:
        """Change a record's attributes, expiration (kept or extended) and data;
        returns the new version.  *record* is a version read from the store: if the
        record changed since (INVALID_RECORD), read it again, so that no one's
        change is overwritten unseen."""
        if record.id is None:
            raise InvalidRecord("update needs the id of a record; add a new one with add()")
        now = self.clock.now()
        cred = self._my_credential(now)
        async with self._core.lock:
            held = await self._live(record.id, now)
            self._may_change(held, cred.role, internal)
            if record.version != held.version:
                raise InvalidRecord(
                    f"record {held.id} changed since it was read (version {held.version}, "
                    f"not {record.version}): get it again and redo the change"
                )
            for name in ("type", "flags", "creator", "created"):
                if getattr(record, name) != getattr(held, name):
                    raise InvalidRecord(
                        f"update may change only attributes, expires and data, not {name}"
                    )
            if record.expires < held.expires:
                raise InvalidRecordExpiration(
                    f"an update may keep or extend the expiration, not lower it "
                    f"({format_date(record.expires)} < {format_date(held.expires)})"
                )
            expires = self._check_expiry(record.expires, now, cred.expires)
            new = dataclasses.replace(
                held,
                attributes=normalize_attributes(record.attributes),
                data=bytes(record.data),
                expires=expires,
                version=held.version + 1,
                modified_by=self._me.member_id,
                modified=max(now, _after(held.modified)),
            )
            return await self._commit_local(new, held)

    async def delete(self, record_id: uuid.UUID, *, internal: bool = False) -> None:
        """Delete a record: a tombstone replaces it and replicates; it is gone from
        get, enum and search on every member."""
        now = self.clock.now()
        cred = self._my_credential(now)
        async with self._core.lock:
            held = await self._live(record_id, now)
            self._may_change(held, cred.role, internal)
            tomb = dataclasses.replace(
                held,
                attributes="",
                data=b"",
                flags=held.flags | RecordFlags.DELETED,
                version=held.version + 1,
                modified_by=self._me.member_id,
                modified=max(now, _after(held.modified)),
            )
            await self._commit_local(tomb, held)

    def enum(self, record_type: uuid.UUID | None = None) -> RecordEnumeration:
        """Every live record (of one type, or all), in id order, read in pages as
        it is iterated; close it early with ``aclose()`` or ``async with``."""

        async def page(after: str, limit: int) -> tuple[list[Record], str | None]:
            now_us = micros(self.clock.now())
            return await self._read_page(record_type, after, limit, now_us)

        return RecordEnumeration(page)

    async def search(self, query: str) -> list[Record]:
        """The live records a ``<peersearch>`` query matches (INVALID_SEARCH if it is
        malformed), in id order."""
        sql, params = compile_query(parse_search(query))
        now_us = micros(self.clock.now())
        return await self._read(self._db.search, sql, params, now_us)

    def events(self, types: Collection[uuid.UUID] | None = None) -> EventSubscription:
        """``async with store.events() as events: async for event in events``: every
        change from now on (of these types)."""
        return self._core.hub.subscribe(types)

    async def count(self) -> tuple[int, int]:
        """(live records, tombstones) held."""
        return await self._db_call(self._db.counts, micros(self.clock.now()))

    def statistics(self) -> StoreStatistics:
        core = self._core
        return dataclasses.replace(
            core.stats, watchers=core.hub.watchers, watchers_dropped=core.hub.overflows
        )

    # -- for the replication and snapshots --------------------------------------------

    async def wait_changed(self) -> None:
        """Return when a local change was queued for the engine since the last return."""
        await self._core.wait_queued()

    async def db(self, fn: Callable[..., T], *args: object) -> T:
        """Run a database call in the store's one database thread."""
        return await self._core.call(fn, *args)

    # -- upkeep: expiry and autorefresh (the loop is cachefs.records.upkeep) -------------

    async def expire_due(self) -> datetime | None:
        """Drop what has expired, raising EXPIRED for live records; returns when the
        next expiration is due."""
        self._core.upkeep_started()
        now = self.clock.now()
        due = await self._db_call(self._db.expire, micros(now))
        for record in due:
            if not record.deleted and record.id is not None:
                self._core.stats.expired += 1
                self._core.hub.publish(
                    RecordEvent(ChangeType.EXPIRED, record.id, record.type, record.version)
                )
        nxt = await self._db_call(self._db.next_expiry)
        return None if nxt is None else from_micros(nxt)

    async def refresh_due(self) -> datetime | None:
        """Republish this member's AUTOREFRESH records that are due; returns when the
        next one will be."""
        now = self.clock.now()
        mine = await self._db_call(self._db.autorefreshed, self._me.member_id)
        cred = self.trust.credential(self._me.member_id, now)
        due, nxt = plan_refresh(mine, None if cred is None else cred.expires, now)
        for record, expires in due:
            assert record.id is not None
            try:
                if await self._extend(record.id, expires):
                    self._core.stats.refreshed += 1
            except RecordsError as e:
                log.warning("cannot refresh record %s: %s", record.id, e)
        return nxt

    async def _extend(self, record_id: uuid.UUID, expires: datetime) -> bool:
        """A refresh: the version held now, its expiration extended (whatever else
        changed since the refresh was planned stays)."""
        now = self.clock.now()
        async with self._core.lock:
            held = await self._live(record_id, now)
            if held.expires >= expires or held.creator != self._me.member_id:
                return False
            new = dataclasses.replace(
                held,
                expires=expires,
                version=held.version + 1,
                modified_by=self._me.member_id,
                modified=max(now, _after(held.modified)),
            )
            await self._commit_local(new, held)
            return True

    async def wait_upkeep(self, until: datetime | None) -> None:
        """Return when a change moved the next expiration or refresh before *until*."""
        await self._core.wait_upkeep(until)

    # -- plumbing --------------------------------------------------------------------------

    def _my_credential(self, now: datetime) -> Credential:
        cred = self.trust.credential(self._me.member_id, now)
        if cred is None:
            raise GroupNotReady(
                f"member {self._me.member_id} has no valid credentials in group "
                f"{self.group_id} (never issued, expired or revoked)"
            )
        return cred

    def _check_expiry(self, expires: datetime, now: datetime, limit: datetime) -> datetime:
        if not isinstance(expires, datetime):
            raise InvalidRecordExpiration("a record needs an expiration time")
        if expires.tzinfo is None:
            raise InvalidRecordExpiration("the expiration needs a time zone (use UTC)")
        expires = expires.astimezone(UTC)
        if expires <= now:
            raise InvalidRecordExpiration(f"expiration {format_date(expires)} is not in the future")
        if expires > limit:
            raise InvalidRecordExpiration(
                f"expiration {format_date(expires)} outlives this member's credentials, "
                f"which expire at {format_date(limit)}"
            )
        return expires

    def _may_change(self, held: Record, role: Role, internal: bool) -> None:
        if held.type in RESERVED_TYPES and not internal:
            raise NotAuthorized(f"record type {held.type} is reserved by cachefs")
        if role is not Role.ADMIN and held.creator != self._me.member_id:
            raise NotAuthorized(
                f"record {held.id} belongs to {held.creator}: a member may change only "
                "its own records"
            )

    async def _live(self, record_id: uuid.UUID, now: datetime) -> Record:
        held = await self._db_call(self._db.get, record_id)
        if held is None or held.deleted or held.expires <= now:
            raise RecordNotFound(f"no record {record_id}")
        return held

    async def _commit_local(self, record: Record, held: Record | None) -> Record:
        body = encode_record(self.group_id, dataclasses.replace(record, signature=b""))
        signature = self._me.sign(body)
        if len(body) + len(signature) > self.max_record_size:
            raise MaxRecordSizeExceeded(
                f"the record takes {len(body) + len(signature)} bytes; the group's maximum "
                f"is {self.max_record_size}"
            )
        signed = dataclasses.replace(record, signature=signature)
        # what we write we check as anyone would, before it leaves
        self.trust.check_record(body, signed, held)
        if not await self._db_call(self._db.put, signed, ("rec", body, signature), held):
            if held is None:
                raise _Changed
            raise InvalidRecord(
                f"record {held.id} changed meanwhile (another process of this member): "
                "get it again and redo the change"
            )
        self._core.stats.local_changes += 1
        self._core.changed(signed, held, queued=True)
        return signed

    async def _read(self, fn: Callable[..., list[Record]], *args: object) -> list[Record]:
        """Records a database read returns, each checked; those that fail dropped."""
        (good, _) = await self._core.read_checked(lambda: (fn(*args), None))
        return good

    async def _read_page(
        self, record_type: uuid.UUID | None, after: str, limit: int, now_us: int
    ) -> tuple[list[Record], str | None]:
        def page() -> tuple[list[Record], str | None]:
            records = self._db.live_page(record_type, after, limit, now_us)
            return records, str(records[-1].id) if len(records) == limit else None

        return await self._core.read_checked(page)

    async def _db_call(self, fn: Callable[..., T], *args: object) -> T:
        return await self._core.call(fn, *args)


class _Changed(Exception):
    """The id a new record would take is held (the same microsecond)."""


def _after(t: datetime | None) -> datetime:
    assert t is not None
    return t + _US
