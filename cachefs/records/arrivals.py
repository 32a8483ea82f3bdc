"""Deciding what to do with records that arrive from elsewhere (the engine, a
snapshot): run in the database thread, one batch in one transaction.

Each item is decoded, checked against the group, the size limit, the
version held and Trust; the winners are stored together.  The rules:
an item no newer than the version held (``Record.sort_key``) or already
expired is STALE; anything that fails a check is REJECTED with the reason,
and never stored.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cachefs.records.attributes import Attribute, parse_attributes
from cachefs.records.database import Database
from cachefs.records.errors import RecordsError
from cachefs.records.model import ApplyResult, EncodingError, Record, decode_record, encode_record
from cachefs.records.trust import Trust

__all__ = ["Outcome", "decide_batch"]


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
