"""What a mount's group records hold: content, version, node status and pin records.

Each kind has a reserved record type (cachefs.records.model) and one JSON
object as its data, with the attributes a member searches by:

- content (CONTENT_INFO_TYPE): ``{"file": id, "info": <content information>}``
  (the info as ``ContentInfo.to_bytes`` writes it); attribute ``key`` is
  :func:`version_key` of the file and version.
- version (FILE_VERSION_TYPE): ``{"file": id, "version": v or null, "size": n}``
  (null: the file is gone); attribute ``key`` is :func:`file_key`.
- node status (NODE_STATUS_TYPE): :class:`NodeStatus`.  Its mount rewrites it
  every third of its lifetime (auto-refreshed by the mount, not by the
  store's AUTOREFRESH flag: that renews a record while *any* process of its
  member runs, which would keep a dead mount's status alive beside another
  mount or a CLI command of the same machine).
- pin (GROUP_PIN_TYPE): ``{"file": id}``; attribute ``key`` is :func:`file_key`.

String attributes compare case-insensitively, so lookups go by the hex
digests below and check the file id (and version) of what they find: two
files whose names differ only in case are never confused.  Decoding refuses
anything malformed with ValueError (one line); a member counts it as a
rejected record.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from typing import Any

from cachefs.contract import ContentInfo
from cachefs.records import Attribute, Record, parse_attributes, render_attributes
from cachefs.records.model import (
    CONTENT_INFO_TYPE,
    FILE_VERSION_TYPE,
    GROUP_PIN_TYPE,
    NODE_STATUS_TYPE,
)

__all__ = [
    "CONTENT_INFO_TYPE",
    "FILE_VERSION_TYPE",
    "GROUP_PIN_TYPE",
    "NODE_STATUS_TYPE",
    "NodeStatus",
    "PinProgress",
    "content_record",
    "decode_content",
    "decode_pin",
    "decode_status",
    "decode_version",
    "file_key",
    "key_query",
    "pin_record",
    "status_record",
    "version_key",
    "version_record",
]


def file_key(file_id: str) -> str:
    """The search key of a file (lower-case hex, so case-folding cannot merge two)."""
    return hashlib.sha256(b"file\0" + file_id.encode("utf-8", "surrogateescape")).hexdigest()


def version_key(file_id: str, version: str) -> str:
    """The search key of one version of a file."""
    raw = b"version\0" + file_id.encode("utf-8", "surrogateescape") + b"\0" + version.encode()
    return hashlib.sha256(raw).hexdigest()


def key_query(key: str) -> str:
    """The ``<peersearch>`` query for records whose attribute ``key`` is *key*."""
    return f'<peersearch><clause attrib="key" type="string">{key}</clause></peersearch>'


def _attributes(key: str, file_id: str | None = None) -> str:
    attrs = [Attribute("key", "string", key)]
    if file_id is not None:
        attrs.append(Attribute("file", "string", file_id))
    return render_attributes(attrs)


def _load(record: Record) -> dict[str, Any]:
    try:
        raw = json.loads(record.data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"record {record.id}: data is not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"record {record.id}: data is not a JSON object")
    return raw


def _check_type(record: Record, expected: uuid.UUID) -> None:
    if record.type != expected:
        raise ValueError(f"record {record.id}: of type {record.type}, not {expected}")


def _file(record: Record, raw: dict[str, Any]) -> str:
    file_id = raw.get("file")
    if not isinstance(file_id, str) or not file_id or file_id.startswith("/"):
        raise ValueError(f"record {record.id}: no file id")
    return file_id


def _key_of(record: Record) -> str | None:
    try:
        attrs = parse_attributes(record.attributes)
    except Exception:
        return None
    value = next((a.value for a in attrs if a.name.lower() == "key"), None)
    return value if isinstance(value, str) else None


# -- content ------------------------------------------------------------------------------


def content_record(file_id: str, info: ContentInfo, expires: datetime) -> Record:
    data = json.dumps(
        {"file": file_id, "info": json.loads(info.to_bytes())}, separators=(",", ":")
    ).encode()
    return Record(
        type=CONTENT_INFO_TYPE,
        expires=expires,
        attributes=_attributes(version_key(file_id, info.version), file_id),
        data=data,
    )


def decode_content(record: Record) -> tuple[str, ContentInfo]:
    """(file id, content information) of a content record; ValueError if malformed
    or if its key does not name that file and version."""
    raw = _load(record)
    file_id = _file(record, raw)
    try:
        info = ContentInfo.from_bytes(json.dumps(raw.get("info")).encode())
    except ValueError as e:
        raise ValueError(f"record {record.id}: {e}") from None
    if _key_of(record) != version_key(file_id, info.version):
        raise ValueError(f"record {record.id}: its key does not name {file_id} at its version")
    return file_id, info


# -- versions -----------------------------------------------------------------------------


def version_record(file_id: str, version: str | None, size: int, expires: datetime) -> Record:
    data = json.dumps(
        {"file": file_id, "version": version, "size": size}, separators=(",", ":")
    ).encode()
    return Record(
        type=FILE_VERSION_TYPE,
        expires=expires,
        attributes=_attributes(file_key(file_id), file_id),
        data=data,
    )


def decode_version(record: Record) -> tuple[str, str | None]:
    """(file id, version or None when the file is gone) of a version record."""
    _check_type(record, FILE_VERSION_TYPE)
    raw = _load(record)
    file_id = _file(record, raw)
    version = raw.get("version")
    if version is not None and not isinstance(version, str):
        raise ValueError(f"record {record.id}: bad version")
    return file_id, version


# -- pins ---------------------------------------------------------------------------------


def pin_record(file_id: str, expires: datetime) -> Record:
    data = json.dumps({"file": file_id}, separators=(",", ":")).encode()
    return Record(
        type=GROUP_PIN_TYPE,
        expires=expires,
        attributes=_attributes(file_key(file_id), file_id),
        data=data,
    )


def decode_pin(record: Record) -> str:
    """The file id a pin record pins."""
    _check_type(record, GROUP_PIN_TYPE)
    return _file(record, _load(record))


# -- node status --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PinProgress:
    """How far one node is with one group pin: bytes cached of *size*, or its error."""

    file: str
    cached: int = 0
    size: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """What a mount says of itself in its status record (refreshed while it runs)."""

    host: str
    mountpoint: str
    source: str
    software: str
    cached_bytes: int = 0
    cache_limit: int = 0
    hit_ratio: float | None = None
    #: bytes read from the origin, from the hosted cache, served from the local cache
    origin_bytes: int = 0
    hosted_bytes: int = 0
    local_bytes: int = 0
    pins: tuple[PinProgress, ...] = field(default_factory=tuple)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()


def status_record(status: NodeStatus, expires: datetime) -> Record:
    return Record(
        type=NODE_STATUS_TYPE,
        expires=expires,
        attributes=_attributes(file_key(status.host + "\0" + status.mountpoint)),
        data=status.to_json(),
    )


def decode_status(record: Record) -> NodeStatus:
    _check_type(record, NODE_STATUS_TYPE)
    raw = _load(record)
    names = {f.name for f in fields(NodeStatus)}
    try:
        given = {k: v for k, v in raw.items() if k in names}
        pins = tuple(PinProgress(**p) for p in given.pop("pins", ()))
        status = NodeStatus(**given, pins=pins)
    except TypeError as e:
        raise ValueError(f"record {record.id}: not a node status: {e}") from None
    for name in ("host", "mountpoint", "source", "software"):
        if not isinstance(getattr(status, name), str):
            raise ValueError(f"record {record.id}: not a node status: bad {name}")
    return status
