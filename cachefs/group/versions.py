"""File versions through the group: published when this mount's cache drops
one, acted on when another member publishes one.

Policy:

- When the cache drops a version of a file (its source changed, or the file
  is gone), the new version is published (null when gone) unless the group
  said so already: a version heard from the group is never echoed back.
- When another member publishes a version and the cache holds another
  version of that file, the cache asks its source again at once (whatever
  its TTL) and the kernel is told to look the name up again.  The record
  is only a hint: what the source answers decides, so a forged version
  record costs a stat, never a wrong byte.
- Bounded: at most REVALIDATIONS files wait to be published or asked again
  (more are dropped: the TTL covers them), ANNOUNCED versions are
  remembered; a version record lives an hour.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import trio

from cachefs.errors import CacheFSError, NotFound
from cachefs.group.formats import FILE_VERSION_TYPE, decode_version, version_record
from cachefs.group.ports import CacheView
from cachefs.records import ChangeType, Group, GroupError, RecordsError
from cachefs.records.errors import RecordNotFound

log = logging.getLogger(__name__)

LIFETIME = timedelta(hours=1)
ANNOUNCED = 65536
REVALIDATIONS = 4096


@dataclass(slots=True)
class VersionCounters:
    versions_published: int = 0
    versions_applied: int = 0
    rejected_records: int = 0


class Versions:
    """This mount's side of the group's version records."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self._me = group.identity.member_id
        self.counters = VersionCounters()
        self._announced: OrderedDict[str, str | None] = OrderedDict()
        self._retired: set[str] = set()
        self._retired_wakeup = trio.Event()
        self._stale: set[str] = set()
        self._stale_wakeup = trio.Event()

    def retired(self, file_id: str) -> None:
        """The cache dropped a version of *file_id* (never blocks)."""
        if len(self._retired) < REVALIDATIONS:
            self._retired.add(file_id)
            self._retired_wakeup.set()

    async def serve(
        self,
        cache: CacheView,
        forget_entry: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish, cache)
            await nursery.start(self._watch, cache)
            nursery.start_soon(self._revalidate, cache, forget_entry)
            task_status.started()

    def _announce(self, file_id: str, version: str | None) -> None:
        self._announced[file_id] = version
        self._announced.move_to_end(file_id)
        if len(self._announced) > ANNOUNCED:
            self._announced.popitem(last=False)

    async def _publish(self, cache: CacheView) -> None:
        while True:
            await self._retired_wakeup.wait()
            self._retired_wakeup = trio.Event()
            retired, self._retired = self._retired, set()
            for file_id in sorted(retired):
                attrs = cache.known_attrs(file_id)
                if attrs is None:
                    try:
                        attrs = await cache.revalidate(file_id)
                    except NotFound:
                        attrs = None
                    except CacheFSError as e:
                        log.debug("version of %s unknown (%s): not published", file_id, e)
                        continue
                version = attrs.version if attrs is not None and attrs.version else None
                if file_id in self._announced and self._announced[file_id] == version:
                    continue  # the group said so (or this member did)
                self._announce(file_id, version)
                size = attrs.size if attrs is not None else 0
                records = self._group.records
                record = version_record(file_id, version, size, records.clock.now() + LIFETIME)
                try:
                    await records.add(record, internal=True)
                except RecordsError as e:
                    log.warning("version of %s not published to the group: %s", file_id, e)
                    continue
                self.counters.versions_published += 1

    async def _watch(
        self, cache: CacheView, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        while True:
            try:
                async with self._group.records.events({FILE_VERSION_TYPE}) as events:
                    if not started:
                        task_status.started()
                        started = True
                    async for event in events:
                        if event.change in (ChangeType.ADDED, ChangeType.UPDATED):
                            await self._heard(cache, event.record_id)
            except GroupError as e:  # fell behind: what was missed, the TTL covers
                log.warning("group version events: %s", e)

    async def _heard(self, cache: CacheView, record_id: uuid.UUID) -> None:
        try:
            record = await self._group.records.get(record_id)
        except RecordNotFound:
            return
        if record.modified_by == self._me:
            return
        try:
            file_id, version = decode_version(record)
        except ValueError as e:
            self.counters.rejected_records += 1
            log.warning("version record not used: %s", e)
            return
        self._announce(file_id, version)
        known = cache.known_attrs(file_id)
        if known is None or known.version == version:
            return
        if len(self._stale) < REVALIDATIONS:
            self._stale.add(file_id)
            self._stale_wakeup.set()

    async def _revalidate(self, cache: CacheView, forget_entry: Callable[[str], None]) -> None:
        while True:
            await self._stale_wakeup.wait()
            self._stale_wakeup = trio.Event()
            stale, self._stale = self._stale, set()
            for file_id in sorted(stale):
                try:
                    await cache.revalidate(file_id)
                except CacheFSError as e:
                    log.debug("%s asked again after a group version record: %s", file_id, e)
                forget_entry(file_id)  # after the cache knows: the kernel's lookup gets it
                self.counters.versions_applied += 1
