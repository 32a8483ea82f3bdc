"""The record, its flags and change events, and its canonical encoding.

A record is what the reference's PEER_RECORD is, in Python terms.  The
store owns ``id``, ``version``, ``creator``, ``modified_by``, ``created``,
``modified`` and ``signature``: whatever a caller puts there is ignored on
add and must be left as read on update.  Times are aware UTC datetimes with
microsecond precision (what the encoding keeps).

The canonical encoding (``encode_record``) is what is signed, replicated and
exported: every field in a fixed order, the group id first, so a record
signed for one group is not valid in another.  Two encodings of one record
are the same bytes.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = [
    "ApplyResult",
    "RESERVED_ATTRIBUTES",
    "RESERVED_TYPES",
    "ChangeType",
    "Record",
    "RecordEvent",
    "RecordFlags",
    "EncodingError",
    "decode_record",
    "encode_record",
    "from_micros",
    "micros",
    "record_id",
]


class RecordFlags(enum.IntFlag):
    """AUTOREFRESH: the creator republishes the record before it expires, for
    as long as it runs.  DELETED: a tombstone, kept until the record's
    expiration so that the deletion replicates."""

    AUTOREFRESH = 0x1
    DELETED = 0x2


class ApplyResult(enum.Enum):
    """What became of a change that arrived from elsewhere (the engine, a snapshot)."""

    APPLIED = "applied"  # new: stored, an event raised
    STALE = "stale"  # already held, or an older version than the one held
    REJECTED = "rejected"  # failed a check: counted, logged, never applied


class ChangeType(enum.IntEnum):
    ADDED = 1
    UPDATED = 2
    DELETED = 3
    EXPIRED = 4


# Derived from the header fields: searchable, never settable.
RESERVED_ATTRIBUTES = frozenset(
    {
        "peerrecordid",
        "peerrecordtype",
        "peercreatorid",
        "peerlastmodifiedby",
        "peercreationtime",
        "peerlastmodificationtime",
    }
)

# Record types cachefs keeps for itself (its mounts' status, file version,
# content and pin records); an application gets NOT_AUTHORIZED for them.  Fixed
# values, so that every version of cachefs agrees.
_NAMESPACE = uuid.UUID("6f1d2c9e-2b7a-5c1e-9f3e-0c4a1b2d3e4f")
NODE_STATUS_TYPE = uuid.uuid5(_NAMESPACE, "cachefs/node-status")
FILE_VERSION_TYPE = uuid.uuid5(_NAMESPACE, "cachefs/file-version")
CONTENT_INFO_TYPE = uuid.uuid5(_NAMESPACE, "cachefs/content-info")
GROUP_PIN_TYPE = uuid.uuid5(_NAMESPACE, "cachefs/group-pin")
RESERVED_TYPES = frozenset({NODE_STATUS_TYPE, FILE_VERSION_TYPE, CONTENT_INFO_TYPE, GROUP_PIN_TYPE})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(t: datetime) -> int:
    """Microseconds since the epoch of an aware datetime (naive means UTC)."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return (t - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True, slots=True)
class Record:
    """One group record.  Build a new one with ``Record(type=..., expires=...)``
    and give it to ``add``; change one you read with ``dataclasses.replace``
    (attributes, expires, data only) and give it to ``update``."""

    type: uuid.UUID
    expires: datetime
    attributes: str = ""
    data: bytes = b""
    flags: RecordFlags = RecordFlags(0)
    # set by the store
    id: uuid.UUID | None = None
    version: int = 0
    creator: str = ""
    modified_by: str = ""
    created: datetime | None = None
    modified: datetime | None = None
    signature: bytes = b""

    @property
    def deleted(self) -> bool:
        return bool(self.flags & RecordFlags.DELETED)

    @property
    def autorefresh(self) -> bool:
        return bool(self.flags & RecordFlags.AUTOREFRESH)

    def sort_key(self) -> tuple[int, int, str, bytes]:
        """The order in which versions of one record win: the higher version,
        then (two members changed the same version at once) the later
        modification, the greater modifier id, the greater signature.  Every
        member picks the same winner."""
        return (self.version, micros(self.modified or _EPOCH), self.modified_by, self.signature)


@dataclass(frozen=True, slots=True)
class RecordEvent:
    """A change a member saw: ``record_type`` lets a watcher filter without a get."""

    change: ChangeType
    record_id: uuid.UUID
    record_type: uuid.UUID
    version: int = 0


def record_id(group_id: str, creator: str, record_type: uuid.UUID, created: datetime) -> uuid.UUID:
    """The id of a record: derived from its group, creator, type and creation time
    (a version 8 UUID), so that no member can give its own record the id of
    another's and take it over where the original was not seen yet.  A member
    never creates two records of one type at the same microsecond."""
    text = f"cachefs-record-id\0{group_id}\0{creator}\0{record_type}\0{micros(created)}"
    raw = bytearray(hashlib.sha256(text.encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8: custom
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    return uuid.UUID(bytes=bytes(raw))


_MAGIC = b"CFSREC1\0"
_HEAD = struct.Struct(">16s16sQI")
_TIMES = struct.Struct(">qqq")
_LEN = struct.Struct(">I")


def _put(out: bytearray, field: bytes) -> None:
    out += _LEN.pack(len(field))
    out += field


def encode_record(group_id: str, record: Record) -> bytes:
    """The canonical bytes of a stored record (everything but its signature)."""
    if record.id is None or record.created is None or record.modified is None:
        raise ValueError("only a stored record has a canonical encoding")
    out = bytearray(_MAGIC)
    _put(out, group_id.encode())
    out += _HEAD.pack(record.id.bytes, record.type.bytes, record.version, int(record.flags))
    _put(out, record.creator.encode())
    _put(out, record.modified_by.encode())
    _put(out, record.attributes.encode())
    out += _TIMES.pack(micros(record.created), micros(record.modified), micros(record.expires))
    _put(out, record.data)
    return bytes(out)


class EncodingError(ValueError):
    pass


def decode_record(body: bytes, signature: bytes = b"") -> tuple[str, Record]:
    """(group id, record) from canonical bytes; EncodingError if they are not."""
    view = memoryview(body)
    pos = len(_MAGIC)
    if bytes(view[:pos]) != _MAGIC:
        raise EncodingError("not a cachefs record")

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > len(view):
            raise EncodingError("record cut short")
        part = view[pos : pos + n]
        pos += n
        return part

    def field() -> bytes:
        (n,) = _LEN.unpack(take(_LEN.size))
        return bytes(take(n))

    try:
        group_id = field().decode()
        rid, rtype, version, flags = _HEAD.unpack(take(_HEAD.size))
        creator = field().decode()
        modified_by = field().decode()
        attributes = field().decode()
        created, modified, expires = _TIMES.unpack(take(_TIMES.size))
        data = field()
        if pos != len(view):
            raise EncodingError("trailing bytes after the record")
        record = Record(
            type=uuid.UUID(bytes=rtype),
            expires=from_micros(expires),
            attributes=attributes,
            data=data,
            flags=RecordFlags(flags & 0x3),
            id=uuid.UUID(bytes=rid),
            version=version,
            creator=creator,
            modified_by=modified_by,
            created=from_micros(created),
            modified=from_micros(modified),
            signature=signature,
        )
    except (UnicodeDecodeError, OverflowError, struct.error) as e:
        raise EncodingError(f"malformed record: {e}") from None
    if flags & ~0x3:
        raise EncodingError(f"unknown flags {flags:#x}")
    return group_id, record
