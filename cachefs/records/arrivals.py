"""Changes that arrive from elsewhere (the engine, a snapshot): records decided
in the database thread, one batch in one transaction; credentials and
revocations through Trust.

Each item is decoded, checked against the group, the size limit, the
version held and Trust; the winners are stored together.  The rules:
an item no newer than the version held (``Record.sort_key``) or already
expired is STALE; anything that fails a check is REJECTED with the reason,
and never stored.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cachefs.records.attributes import Attribute, parse_attributes
from cachefs.records.core import StoreCore
from cachefs.records.credentials import Credential, Revocation
from cachefs.records.database import Database, digest
from cachefs.records.errors import RecordsError
from cachefs.records.model import ApplyResult, EncodingError, Record, decode_record, encode_record
from cachefs.records.trust import Trust

__all__ = ["Arrivals", "Outcome", "decide_batch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Outcome:
    result: ApplyResult
    record: Record | None = None  # APPLIED: the version stored
    held: Record | None = None  # APPLIED: the version it replaced
    reason: str = ""  # REJECTED: the error's name or what was wrong
    detail: str = ""


def _sound(trust: Trust, held: Record) -> bool:
    """Whether the version held still passes its checks (a revocation learnt since,
    a damaged row): one that does not cannot shadow a valid arrival."""
    body = encode_record(trust.charter.group_id, dataclasses.replace(held, signature=b""))
    try:
        trust.check_record(body, held, None)
    except RecordsError:
        return False
    return True


def decide_batch(
    db: Database,
    trust: Trust,
    group_id: str,
    max_record_size: int,
    items: Sequence[tuple[bytes, bytes]],
    now: datetime,
    publish: bool = False,
) -> list[Outcome]:
    """The outcome of each item, in order; with *publish* the winners are queued in
    the outbox in the same transaction."""
    out: list[Outcome] = []
    winners: dict[uuid.UUID, tuple[Record, tuple[Attribute, ...], bytes]] = {}
    for body, signature in items:
        try:
            item_group, record = decode_record(body, signature)
        except EncodingError as e:
            out.append(Outcome(ApplyResult.REJECTED, reason="malformed record", detail=str(e)))
            continue
        if item_group != group_id:
            out.append(
                Outcome(ApplyResult.REJECTED, reason="record of another group", detail=item_group)
            )
            continue
        assert record.id is not None
        if len(body) + len(signature) > max_record_size:
            out.append(
                Outcome(
                    ApplyResult.REJECTED,
                    reason="record over the group's maximum size",
                    detail=f"record {record.id}: {len(body) + len(signature)} bytes",
                )
            )
            continue
        held = winners[record.id][0] if record.id in winners else db.get(record.id)
        if held is not None and record.sort_key() <= held.sort_key() and _sound(trust, held):
            out.append(Outcome(ApplyResult.STALE))
            continue
        if record.expires <= now:
            out.append(Outcome(ApplyResult.STALE))
            continue
        try:
            trust.check_record(body, record, held)
            attrs = () if record.deleted else parse_attributes(record.attributes)
        except RecordsError as e:
            detail = f"record {record.id} by {record.modified_by}: {e.detail}"
            out.append(Outcome(ApplyResult.REJECTED, reason=e.name, detail=detail))
            continue
        winners[record.id] = (record, attrs, body)
        # a later item of the same batch may replace it: both events are raised, in order
        out.append(Outcome(ApplyResult.APPLIED, record, held))
    db.put_many(list(winners.values()), publish)
    return out


class Arrivals:
    """Changes from elsewhere, as the replication and snapshots give them:
    records, credentials, revocations; and the outbox refilled after the engine
    lost its data."""

    def __init__(self, core: StoreCore) -> None:
        self._core = core

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
        core = self._core
        now = core.clock.now()
        async with core.lock:
            outcomes = await core.call(
                decide_batch,
                core.db,
                core.trust,
                core.group_id,
                core.max_record_size,
                items,
                now,
                publish,
            )
        for outcome in outcomes:
            if outcome.result is ApplyResult.REJECTED:
                core.reject(outcome.reason, outcome.detail)
            elif outcome.result is ApplyResult.STALE:
                core.stats.stale += 1
            else:
                assert outcome.record is not None
                core.stats.applied += 1
                core.changed(outcome.record, outcome.held, queued=publish)
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
            await self._core.call(self._core.db.add_blob, "credentials", blob, "cred")
        self._core.queued()

    async def _apply_blob(self, table: str, blob: bytes, publish: bool) -> ApplyResult:
        core = self._core
        kind = "cred" if table == "credentials" else "revoke"
        try:
            async with core.lock:
                if kind == "cred":
                    new = core.trust.add_credential(Credential.from_bytes(blob))
                else:
                    rev = Revocation.from_bytes(blob)
                    new = core.trust.add_revocation(rev)
        except RecordsError as e:
            what = "credential" if kind == "cred" else "revocation"
            return core.reject(e.name, f"{what}: {e.detail}")
        if not new:
            return ApplyResult.STALE
        await core.call(core.db.add_blob, table, blob, kind if publish else None)
        if publish:
            core.queued()
        if kind == "revoke":
            log.info("member %s was revoked by %s", rev.member_id, rev.issuer_id)
        return ApplyResult.APPLIED

    async def queue_everything(self) -> None:
        """Put every credential, revocation and record held (tombstones too) back in
        the outbox: the engine lost its data."""
        db, group_id = self._core.db, self._core.group_id

        def collect() -> None:
            entries: list[tuple[str, bytes, bytes, str]] = []
            entries += [("cred", b, b"", digest(b)) for b in db.blobs("credentials")]
            entries += [("revoke", b, b"", digest(b)) for b in db.blobs("revocations")]
            db.queue(entries)
            batch: list[tuple[str, bytes, bytes, str]] = []
            for record in db.all_records():
                body = encode_record(group_id, dataclasses.replace(record, signature=b""))
                batch.append(("rec", body, record.signature, str(record.id)))
                if len(batch) >= 500:
                    db.queue(batch)
                    batch = []
            db.queue(batch)

        await self._core.call(collect)
        self._core.queued()
