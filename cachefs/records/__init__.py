"""Group records: a signed, searchable, expiring record store shared by the
members of a group, replicated through Redis.

The front door::

    from cachefs.records import Record, open_group

    async with open_group("render-farm") as group:
        rid = await group.records.add(Record(type=MY_TYPE, expires=soon, data=b"..."))
        async with group.records.events() as events:
            async for event in events: ...

Layers (imports point down): group -> replication | snapshot -> store ->
database -> identity | search -> attributes -> model, errors.  This package
knows nothing of the cache engine or the file system.  docs/records.md is the
user's guide.
"""

from cachefs.records.attributes import Attribute, parse_attributes, render_attributes
from cachefs.records.credentials import Role
from cachefs.records.errors import (
    GroupError,
    GroupNotReady,
    InvalidAttributes,
    InvalidRecord,
    InvalidRecordExpiration,
    InvalidSearch,
    MaxRecordSizeExceeded,
    NotAuthorized,
    RecordNotFound,
    RecordsError,
)
from cachefs.records.group import Group, GroupStatistics, open_group
from cachefs.records.model import ChangeType, Record, RecordEvent, RecordFlags
from cachefs.records.snapshot import export_snapshot, import_snapshot
from cachefs.records.where import where_to_xml

__all__ = [
    "Attribute",
    "ChangeType",
    "Group",
    "GroupError",
    "GroupNotReady",
    "GroupStatistics",
    "InvalidAttributes",
    "InvalidRecord",
    "InvalidRecordExpiration",
    "InvalidSearch",
    "MaxRecordSizeExceeded",
    "NotAuthorized",
    "Record",
    "RecordEvent",
    "RecordFlags",
    "RecordNotFound",
    "RecordsError",
    "Role",
    "export_snapshot",
    "import_snapshot",
    "open_group",
    "parse_attributes",
    "render_attributes",
    "where_to_xml",
]
