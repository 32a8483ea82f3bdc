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
import sqlite3
import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import trio

from cachefs.records.arrivals import Outcome, decide_batch
from cachefs.records.attributes import format_date, normalize_attributes
from cachefs.records.clock import Clock
from cachefs.records.credentials import Credential, Revocation, Role
from cachefs.records.database import Database, digest
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
from cachefs.records.events import EventHub, EventSubscription, RecordEnumeration
from cachefs.records.identity import Identity
from cachefs.records.model import (
    RESERVED_TYPES,
    ApplyResult,
    ChangeType,
    Record,
    RecordEvent,
    RecordFlags,
    encode_record,
    from_micros,
    micros,
)
from cachefs.records.search import compile_query, parse_search
from cachefs.records.stats import StoreStatistics
from cachefs.records.trust import Trust
from cachefs.records.upkeep import plan_refresh

__all__ = ["RecordStore"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_US = timedelta(microseconds=1)
# record versions remembered as checked (about 200 bytes each)
VERIFIED_CAP = 100_000


class RecordStore:
    """The records of one group as this member sees them (``group.records``)."""

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
        self._db = db
        self.group_id = group_id
        self._me = identity
        self.trust = trust
        self.max_record_size = max_record_size
        self.clock = clock
        self._limiter = trio.CapacityLimiter(1)  # one database call at a time
        self._lock = trio.Lock()  # a read-check-write of one change at a time
        self._hub = EventHub()
        # record versions checked already (a bounded FIFO: insertion-ordered dict)
        self._verified: dict[tuple[uuid.UUID, int, bytes], None] = {}
        self._changed = trio.Event()  # set when a local change was queued for the engine
        self._upkeep_wake = trio.Event()
        self._upkeep_at: datetime | None = None  # the upkeep's next planned wake
        self.stats = StoreStatistics()
        self._logged: set[str] = set()

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
        stored = Record(
            type=record.type,
            expires=expires,
            attributes=attributes,
            data=bytes(record.data),
            flags=record.flags & RecordFlags.AUTOREFRESH,
            id=uuid.uuid4(),
            version=1,
            creator=self._me.member_id,
            modified_by=self._me.member_id,
            created=now,
            modified=now,
        )
        async with self._lock:
            await self._commit_local(stored, None)
        return stored.id  # type: ignore[return-value]

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
        async with self._lock:
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
        async with self._lock:
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
        return self._hub.subscribe(types)

    async def count(self) -> tuple[int, int]:
        """(live records, tombstones) held."""
        return await self._db_call(self._db.counts, micros(self.clock.now()))

    def statistics(self) -> StoreStatistics:
        return dataclasses.replace(
            self.stats, watchers=self._hub.watchers, watchers_dropped=self._hub.overflows
        )

    # -- arrivals ------------------------------------------------------------------------

    async def apply_remote(self, body: bytes, signature: bytes) -> ApplyResult:
        """Check and apply a record from elsewhere: APPLIED, STALE (held already, an
        older version, or expired) or REJECTED (counted and logged once)."""
        (outcome,) = await self.apply_records([(body, signature)])
        return outcome.result

    async def apply_records(
        self, items: Sequence[tuple[bytes, bytes]], *, publish: bool = False
    ) -> list[Outcome]:
        """apply_remote for a batch of (body, signature), checked and stored in one
        transaction: how a member catches up on thousands of changes quickly.  With
        *publish* (an import), what was applied is also queued for the engine."""
        now = self.clock.now()
        async with self._lock:
            outcomes = await self._db_call(
                decide_batch,
                self._db,
                self.trust,
                self.group_id,
                self.max_record_size,
                items,
                now,
                publish,
            )
        for outcome in outcomes:
            if outcome.result is ApplyResult.REJECTED:
                self._reject(outcome.reason, outcome.detail)
            elif outcome.result is ApplyResult.STALE:
                self.stats.stale += 1
            else:
                record = outcome.record
                assert record is not None and record.id is not None
                self._remember_checked((record.id, record.version, record.signature))
                self.stats.applied += 1
                self._raise_event(record, outcome.held)
                self._upkeep_needed(record)
        if publish and any(o.result is ApplyResult.APPLIED for o in outcomes):
            self._changed.set()
        return outcomes

    async def apply_credential(self, blob: bytes, *, publish: bool = False) -> ApplyResult:
        """Check and keep a credential; with *publish* (one this member issued or
        imported), a new one is also queued for the engine."""
        return await self._apply_blob("credentials", blob, publish)

    async def apply_revocation(self, blob: bytes, *, publish: bool = False) -> ApplyResult:
        """Check and keep a revocation: the member's later changes are refused."""
        return await self._apply_blob("revocations", blob, publish)

    async def publish_credentials(self, blobs: Sequence[bytes]) -> None:
        """Queue these (already trusted) credentials for the engine, held or not: this
        member's own chain, before its first change."""
        for blob in blobs:
            await self._db_call(self._db.add_blob, "credentials", blob, "cred")
        self._changed.set()

    async def _apply_blob(self, table: str, blob: bytes, publish: bool) -> ApplyResult:
        kind = "cred" if table == "credentials" else "revoke"
        try:
            async with self._lock:
                if kind == "cred":
                    new = self.trust.add_credential(Credential.from_bytes(blob))
                else:
                    rev = Revocation.from_bytes(blob)
                    new = self.trust.add_revocation(rev)
        except RecordsError as e:
            return self._reject(
                e.name, f"{'credential' if kind == 'cred' else 'revocation'}: {e.detail}"
            )
        if not new:
            return ApplyResult.STALE
        await self._db_call(self._db.add_blob, table, blob, kind if publish else None)
        if publish:
            self._changed.set()
        if kind == "revoke":
            log.info("member %s was revoked by %s", rev.member_id, rev.issuer_id)
        return ApplyResult.APPLIED

    async def queue_everything(self) -> None:
        """Put every credential, revocation and record held (tombstones too) back in
        the outbox: the engine lost its data."""

        def collect() -> None:
            entries: list[tuple[str, bytes, bytes, str]] = []
            entries += [("cred", b, b"", digest(b)) for b in self._db.blobs("credentials")]
            entries += [("revoke", b, b"", digest(b)) for b in self._db.blobs("revocations")]
            self._db.queue(entries)
            batch: list[tuple[str, bytes, bytes, str]] = []
            for record in self._db.all_records():
                unsigned = dataclasses.replace(record, signature=b"")
                body = encode_record(self.group_id, unsigned)
                batch.append(("rec", body, record.signature, str(record.id)))
                if len(batch) >= 500:
                    self._db.queue(batch)
                    batch = []
            self._db.queue(batch)

        await self._db_call(collect)
        self._changed.set()

    async def wait_changed(self) -> None:
        """Return when a local change was queued for the engine since the last return."""
        await self._changed.wait()
        self._changed = trio.Event()

    async def db(self, fn: Callable[..., T], *args: object) -> T:
        """Run a database call in the store's one database thread."""
        return await self._db_call(fn, *args)

    # -- upkeep: expiry and autorefresh (the loop is cachefs.records.upkeep) -------------

    async def expire_due(self) -> datetime | None:
        """Drop what has expired, raising EXPIRED for live records; returns when the
        next expiration is due."""
        self._upkeep_at = None  # a change from now on wakes the next cycle
        now = self.clock.now()
        due = await self._db_call(self._db.expire, micros(now))
        for record in due:
            if not record.deleted and record.id is not None:
                self.stats.expired += 1
                self._hub.publish(
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
                    self.stats.refreshed += 1
            except RecordsError as e:
                log.warning("cannot refresh record %s: %s", record.id, e)
        return nxt

    async def _extend(self, record_id: uuid.UUID, expires: datetime) -> bool:
        """A refresh: the version held now, its expiration extended (whatever else
        changed since the refresh was planned stays)."""
        now = self.clock.now()
        async with self._lock:
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
        """Return when a change moved the next expiration or refresh before *until*
        (the upkeep's next wake; None: none planned)."""
        self._upkeep_at = until
        await self._upkeep_wake.wait()
        self._upkeep_wake = trio.Event()

    def _upkeep_needed(self, record: Record) -> None:
        when = record.expires
        if record.autorefresh and record.creator == self._me.member_id and record.modified:
            when -= (record.expires - record.modified) / 3
        if self._upkeep_at is None or when < self._upkeep_at:
            self._upkeep_at = when
            self._upkeep_wake.set()

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
        await self._db_call(self._db.put, signed, ("rec", body, signature))
        assert signed.id is not None
        self._remember_checked((signed.id, signed.version, signature))
        self.stats.local_changes += 1
        self._raise_event(signed, held)
        self._changed.set()
        self._upkeep_needed(signed)
        return signed

    def _raise_event(self, record: Record, held: Record | None) -> None:
        assert record.id is not None
        live_before = held is not None and not held.deleted
        if record.deleted:
            if not live_before:
                return
            change = ChangeType.DELETED
        else:
            change = ChangeType.UPDATED if live_before else ChangeType.ADDED
        self._hub.publish(RecordEvent(change, record.id, record.type, record.version))

    async def _read(self, fn: Callable[..., list[Record]], *args: object) -> list[Record]:
        """Records a database read returns, each checked (in the database thread)
        unless this version was checked before; those that fail are dropped."""
        (good, _) = await self._read_checked(lambda: (fn(*args), None))
        return good

    async def _read_page(
        self, record_type: uuid.UUID | None, after: str, limit: int, now_us: int
    ) -> tuple[list[Record], str | None]:
        def page() -> tuple[list[Record], str | None]:
            records = self._db.live_page(record_type, after, limit, now_us)
            return records, str(records[-1].id) if len(records) == limit else None

        return await self._read_checked(page)

    async def _read_checked(
        self, read: Callable[[], tuple[list[Record], str | None]]
    ) -> tuple[list[Record], str | None]:
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

        good, bad, more = await self._db_call(run)
        for record in good:
            assert record.id is not None
            self._remember_checked((record.id, record.version, record.signature))
        for record, e in bad:
            self._reject(e.name, f"record {record.id} in the local database: {e.detail}")
        if bad:
            # only that very version: a newer one may have arrived meanwhile
            async with self._lock:
                await self._db_call(self._db.remove_versions, [r for r, _ in bad])
        return good, more

    def _remember_checked(self, key: tuple[uuid.UUID, int, bytes]) -> None:
        # bounded, the oldest forgotten first (then checked again when read)
        self._verified[key] = None
        while len(self._verified) > VERIFIED_CAP:
            del self._verified[next(iter(self._verified))]

    def _reject(self, reason: str, detail: str) -> ApplyResult:
        self.stats.rejected += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("rejected a change (%s): %s", reason, detail)
        else:
            log.debug("rejected a change (%s): %s", reason, detail)
        return ApplyResult.REJECTED

    async def _db_call(self, fn: Callable[..., T], *args: object) -> T:
        def call() -> T:
            try:
                return fn(*args)
            except sqlite3.Error as e:  # locked for too long, disk full, damaged file
                raise GroupError(f"the record database of group {self.group_id}: {e}") from e

        return await trio.to_thread.run_sync(call, limiter=self._limiter)


def _after(t: datetime | None) -> datetime:
    assert t is not None
    return t + _US
