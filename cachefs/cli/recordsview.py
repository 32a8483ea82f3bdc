"""How the ``records`` commands show records and events: one readable line
each, or (``--json``) every field: attributes as a list and as XML, times in
ISO 8601 UTC, data in base64."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cachefs.cli.groupsession import iso

if TYPE_CHECKING:  # the record store is imported when used (see cli.groupsession)
    from cachefs.records.attributes import Attribute
    from cachefs.records.model import Record, RecordEvent

__all__ = ["event_json", "record_json", "record_line", "show"]


def show(record: Record, as_json: bool) -> None:
    print(json.dumps(record_json(record)) if as_json else record_line(record), flush=False)


def attr_value(attr: Attribute) -> str | int:
    value = attr.value
    return iso(value) if isinstance(value, datetime) else value


def record_json(record: Record) -> dict[str, Any]:
    """Every field of a record, as ``--json`` prints it."""
    from cachefs.records.attributes import parse_attributes
    from cachefs.records.model import RecordFlags

    assert record.created is not None and record.modified is not None
    attrs = parse_attributes(record.attributes)
    return {
        "id": str(record.id),
        "type": str(record.type),
        "version": record.version,
        "flags": [f.name for f in RecordFlags if f in record.flags],
        "creator": record.creator,
        "modified_by": record.modified_by,
        "created": iso(record.created),
        "modified": iso(record.modified),
        "expires": iso(record.expires),
        "attributes": [{"name": a.name, "type": a.type, "value": attr_value(a)} for a in attrs],
        "attributes_xml": record.attributes,
        "data": base64.b64encode(record.data).decode("ascii"),
        "data_size": len(record.data),
        "signature": base64.b64encode(record.signature).decode("ascii"),
    }


def record_line(record: Record) -> str:
    """One readable line: id, version, type, expiry, attributes, data size."""
    from cachefs.records.attributes import parse_attributes

    attrs = " ".join(
        f"{a.name}={shown(attr_value(a))}" for a in parse_attributes(record.attributes)
    )
    flags = " autorefresh" if record.autorefresh else ""
    return (
        f"{record.id}  v{record.version}  type {record.type}  expires "
        f"{iso(record.expires)}{flags}  by {record.modified_by}  "
        f"[{attrs}]  {len(record.data)} bytes"
    )


def shown(value: str | int) -> str:
    text = str(value)
    if isinstance(value, str) and (not text or any(c in text for c in " \t\n\"'[]=")):
        return json.dumps(text)
    return text


def event_json(event: RecordEvent) -> dict[str, Any]:
    return {
        "change": event.change.name,
        "code": int(event.change),
        "id": str(event.record_id),
        "type": str(event.record_type),
        "version": event.version,
    }
