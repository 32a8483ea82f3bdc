"""This mount's node status record: what ``cachefs group status`` shows of it.

Policy: one record per mount, rewritten with fresh figures every third of
its lifetime (``--status-expiry``), so it lives while the mount runs and
disappears that long after the mount dies.  The mount refreshes it itself
rather than through the store's AUTOREFRESH flag (cachefs.group.formats
says why).  A clean unmount deletes it and gives the engine STATUS_GOODBYE
seconds to take the deletion.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import trio

from cachefs.group.formats import NodeStatus, status_record
from cachefs.records import Group, RecordsError
from cachefs.records.errors import RecordNotFound

log = logging.getLogger(__name__)

STATUS_GOODBYE = 2.0


@dataclass(frozen=True, slots=True)
class Described:
    """What the status record says the mount is."""

    mountpoint: str
    source: str
    software: str
    host: str = field(default_factory=socket.gethostname)


async def serve_status(
    group: Group,
    expiry: float,
    figures: Callable[[], NodeStatus],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish *figures* every third of *expiry* seconds until cancelled."""
    records = group.records
    record_id: uuid.UUID | None = None
    task_status.started()
    try:
        while True:
            expires = records.clock.now() + timedelta(seconds=expiry)
            try:
                record_id = await _write(group, record_id, figures(), expires)
            except RecordsError as e:
                log.warning("node status not published: %s", e)
            await trio.sleep(expiry / 3)
    finally:
        if record_id is not None:
            # gone from `group status` at once, if the engine takes it in time
            with trio.move_on_after(STATUS_GOODBYE) as scope:
                scope.shield = True
                try:
                    await records.delete(record_id, internal=True)
                    await group.sync(STATUS_GOODBYE)
                except RecordsError:
                    pass


async def _write(
    group: Group, record_id: uuid.UUID | None, status: NodeStatus, expires: datetime
) -> uuid.UUID:
    records = group.records
    if record_id is not None:
        try:
            held = await records.get(record_id)
        except RecordNotFound:  # expired while this mount was stalled: a new one
            held = None
        if held is not None:
            new = dataclasses.replace(held, data=status.to_json(), expires=expires)
            await records.update(new, internal=True)
            return record_id
    return await records.add(status_record(status, expires), internal=True)
