"""A member of a group, open: ``async with open_group(name) as group``.

Opening reads the membership (charter, credentials, engine URL) from the
groups directory, checks every credential and revocation held, and starts
the member's background work in a nursery it owns: expiry and AUTOREFRESH
(always) and the replication through the engine (when the group has one).
Closing cancels them; nothing a change returned for is lost, since it is
in the database and its outbox before the call returns.

Without an engine, or while it is unreachable, the store works on its own
database; changes are published when the engine is back.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from cachefs.records.clock import Clock, SystemClock
from cachefs.records.credentials import Credential, Revocation, Role, revoke
from cachefs.records.database import Database
from cachefs.records.errors import NotAuthorized, RecordsError
from cachefs.records.groups import IDENTITY_FILE, Membership, default_groups_dir, load_membership
from cachefs.records.identity import Identity
from cachefs.records.model import ApplyResult, encode_record
from cachefs.records.replication import OutboxEntry, ReplicationStatistics, Replicator
from cachefs.records.stats import StoreStatistics
from cachefs.records.store import RecordStore
from cachefs.records.trust import Trust
from cachefs.records.upkeep import serve_upkeep

__all__ = ["Group", "GroupStatistics", "open_group"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupStatistics:
    store: StoreStatistics
    replication: ReplicationStatistics | None  # None: no engine
    live_records: int
    tombstones: int
    outbox: int  # local changes the engine has not acknowledged


class Group:
    """One group as this member sees it: ``records`` is its record store."""

    def __init__(
        self,
        membership: Membership,
        identity: Identity,
        records: RecordStore,
        db: Database,
        replicator: Replicator | None,
    ) -> None:
        self.membership = membership
        self.name = membership.name
        self.group_id = membership.charter.group_id
        self.identity = identity
        self.records = records
        self._db = db
        self._replicator = replicator

    @property
    def rejected(self) -> int:
        """Changes from elsewhere refused: by the store's checks, and entries of the
        engine too malformed to reach them."""
        malformed = self._replicator.statistics().malformed if self._replicator else 0
        return self.records.statistics().rejected + malformed

    @property
    def database(self) -> Database:
        """This member's database, for what only a snapshot needs: call its methods
        through ``records.db(fn, ...)``, the store's one database thread."""
        return self._db

    @property
    def engine(self) -> str | None:
        """The engine URL, its password hidden (None: no engine)."""
        return self._replicator.display_url if self._replicator is not None else None

    async def sync(self, timeout: float = 5.0) -> bool:
        """Publish this member's pending changes and read what the engine holds until
        caught up, within *timeout*; False if the engine could not be reached (the
        store goes on without it).  True at once for a group without an engine."""
        if self._replicator is None:
            return True
        return await self._replicator.sync(timeout)

    async def revoke(self, member_id: str) -> Revocation:
        """Revoke a member (administrators only): its changes from now on are refused
        by every member."""
        now = self.records.clock.now()
        mine = self.records.trust.credential(self.identity.member_id, now)
        if mine is None or mine.role is not Role.ADMIN:
            raise NotAuthorized("only an administrator may revoke a member")
        if member_id == self.records.trust.creator_id:
            raise NotAuthorized("the creator of a group cannot be revoked")
        rev = revoke(self.identity, self.membership.charter, member_id, now=now)
        if (
            await self.records.arrivals.apply_revocation(rev.to_bytes(), publish=True)
            is ApplyResult.REJECTED
        ):
            raise NotAuthorized(f"the revocation of {member_id} was refused")
        return rev

    def members(self) -> list[tuple[Credential, bool]]:
        """Every member this member knows of, now: its credential (the one in force,
        else its latest) and whether it is revoked; in order of issue."""
        return self.records.trust.members(self.records.clock.now())

    def revoked(self) -> list[Revocation]:
        return self.records.trust.revocations()

    async def statistics(self) -> GroupStatistics:
        live, dead = await self.records.count()
        return GroupStatistics(
            store=self.records.statistics(),
            replication=self._replicator.statistics() if self._replicator else None,
            live_records=live,
            tombstones=dead,
            outbox=await self.records.db(self._db.outbox_size),
        )


class _Link:
    """The store as the replication sees it (replication.ReplicaLink)."""

    def __init__(self, store: RecordStore, db: Database) -> None:
        self._store = store
        self._db = db
        self.group_id = store.group_id

    async def pending(self, limit: int) -> list[OutboxEntry]:
        rows = await self._store.db(self._db.pending, limit)
        return [OutboxEntry(r.seq, r.kind, r.body, r.signature) for r in rows]

    async def published(self, seqs: Sequence[int]) -> None:
        await self._store.db(self._db.published, seqs)

    async def apply(self, kind: str, body: bytes, signature: bytes) -> ApplyResult:
        if kind == "rec":
            return await self._store.arrivals.apply_remote(body, signature)
        if kind == "cred":
            return await self._store.arrivals.apply_credential(body)
        if kind == "revoke":
            return await self._store.arrivals.apply_revocation(body)
        return ApplyResult.REJECTED

    async def apply_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[ApplyResult]:
        """Runs of records go to the store as one batch each; the rest one by one."""
        results: list[ApplyResult] = []
        run: list[tuple[bytes, bytes]] = []
        for kind, body, signature in items:
            if kind == "rec":
                run.append((body, signature))
                continue
            if run:
                results += [o.result for o in await self._store.arrivals.apply_records(run)]
                run = []
            results.append(await self.apply(kind, body, signature))
        if run:
            results += [o.result for o in await self._store.arrivals.apply_records(run)]
        return results

    async def position(self) -> str | None:
        return await self._store.db(self._db.meta, "stream_id")

    async def set_position(self, stream_id: str | None) -> None:
        await self._store.db(self._db.set_meta, "stream_id", stream_id)

    async def engine_epoch(self) -> str | None:
        return await self._store.db(self._db.meta, "engine_epoch")

    async def set_engine_epoch(self, epoch: str) -> None:
        await self._store.db(self._db.set_meta, "engine_epoch", epoch)

    async def republish_all(self) -> None:
        await self._store.arrivals.queue_everything()

    async def held(self, record_id: str) -> tuple[bytes, bytes] | None:
        try:
            record = await self._store.db(self._db.get, uuid.UUID(record_id))
        except ValueError:
            return None
        if record is None:
            return None
        unsigned = dataclasses.replace(record, signature=b"")
        return encode_record(self._store.group_id, unsigned), record.signature

    async def wait_outbox(self) -> None:
        await self._store.wait_changed()


def _load_trust(membership: Membership, db: Database) -> tuple[Trust, int]:
    """The charter, this member's chain, then what the database holds, each checked;
    returns the trust and how many held blobs failed their checks."""
    trust = Trust(membership.charter)
    pending = [c.to_bytes() for c in reversed(membership.chain)] + db.blobs("credentials")
    failed = 0
    # a credential can only be checked once its issuer's is known: go round until stuck
    while pending:
        left = []
        for blob in pending:
            try:
                trust.add_credential(Credential.from_bytes(blob))
            except RecordsError:
                left.append(blob)
        if len(left) == len(pending):
            failed += len(left)
            break
        pending = left
    for blob in db.blobs("revocations"):
        try:
            trust.add_revocation(Revocation.from_bytes(blob))
        except RecordsError:
            failed += 1
    return trust, failed


@asynccontextmanager
async def open_group(
    name: str,
    *,
    groups_dir: Path | None = None,
    engine: str | None = None,
    replicate: bool = True,
    clock: Clock | None = None,
) -> AsyncIterator[Group]:
    """Open this machine's membership of group *name* (GroupError if it has none).
    *engine* overrides the group's engine URL; *replicate* False keeps the group
    local for this opening (no connection at all)."""
    groups_dir = groups_dir or default_groups_dir()
    membership = await trio.to_thread.run_sync(load_membership, groups_dir, name)
    identity = await trio.to_thread.run_sync(Identity.load, groups_dir / IDENTITY_FILE)
    db = await trio.to_thread.run_sync(Database, membership.database)
    try:
        trust, failed = await trio.to_thread.run_sync(_load_trust, membership, db)
        if failed:
            log.warning(
                "%d credentials or revocations in %s failed their checks and are ignored",
                failed,
                membership.database,
            )
        store = RecordStore(
            db,
            group_id=membership.charter.group_id,
            identity=identity,
            trust=trust,
            max_record_size=membership.charter.max_record_size,
            clock=clock or SystemClock(),
        )
        # this member's credentials go to the engine once, before its first record
        chain_key = ",".join(c.signature.hex()[:16] for c in membership.chain)
        if await store.db(db.meta, "chain_queued") != chain_key:
            await store.arrivals.publish_credentials(
                [c.to_bytes() for c in reversed(membership.chain)]
            )
            await store.db(db.set_meta, "chain_queued", chain_key)
        url = engine or membership.engine
        replicator = None
        if url and replicate:
            replicator = Replicator(
                _Link(store, db),
                url,
                stream_maxlen=membership.stream_maxlen,
                max_record_size=membership.charter.max_record_size,
                clock=store.clock,
            )
        group = Group(membership, identity, store, db, replicator)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_upkeep, store)
                if replicator is not None:
                    await nursery.start(replicator.serve)
                try:
                    yield group
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as eg:
            # an error of the caller's block (or of a background task) leaves as
            # itself, not wrapped by the nursery the group runs
            if len(eg.exceptions) == 1 and not isinstance(eg.exceptions[0], BaseExceptionGroup):
                raise eg.exceptions[0] from None
            raise
    finally:
        db.close()
