"""Group pins: files the group's administrators pin on every member.

Policy:

- A pin record counts while its last signer is an administrator now (not
  expired, not revoked); a member's pin record is ignored and counted.
- Every member pins (fetches whole and keeps) the files of live pin
  records, one after another, and releases them when the record is
  deleted or expires.  A file this mount's user had pinned already stays
  the user's: the group neither pins nor releases it.
- The files pinned for the group are written to ``group-pins.json`` in the
  cache dir before they are pinned, so that one whose record went away
  while the mount was down, or that was being pinned when it died, is
  released at the next mount.  A pin that fails (the file is gone, the
  cache too small) is shown with its error and tried again after
  PIN_RETRY; so is a pass that could not read the records.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import trio

from cachefs.errors import CacheFSError
from cachefs.group.formats import GROUP_PIN_TYPE, PinProgress, decode_pin
from cachefs.group.ports import CacheView
from cachefs.records import Group, GroupError, Record, RecordsError, Role

log = logging.getLogger(__name__)

STATE_FILE = "group-pins.json"
PIN_RETRY = 60.0


class GroupPins:
    """Pins and releases what the group's administrators pin."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self.rejected_records = 0
        self._changed = trio.Event()
        self._errors: dict[str, str] = {}
        self.live: list[str] = []
        self._state_error: str | None = None

    def progress(self, cache: CacheView | None) -> list[PinProgress]:
        """How far this mount is with each live group pin."""
        shown = []
        for file_id in self.live:
            cached = size = 0
            if cache is not None:
                attrs = cache.known_attrs(file_id)
                size = attrs.size if attrs is not None else 0
                cached = cache.cached_bytes_of(file_id)
            shown.append(PinProgress(file_id, cached, size, self._errors.get(file_id)))
        return shown

    def _counts(self, record: Record) -> bool:
        records = self._group.records
        cred = records.trust.credential(record.modified_by, records.clock.now())
        return cred is not None and cred.role is Role.ADMIN

    async def _live_records(self) -> list[str]:
        live: set[str] = set()
        async with self._group.records.enum(GROUP_PIN_TYPE) as records:
            async for record in records:
                try:
                    file_id = decode_pin(record)
                except ValueError:
                    self.rejected_records += 1
                    continue
                if self._counts(record):
                    live.add(file_id)
                else:
                    self.rejected_records += 1
        return sorted(live)

    async def serve(
        self,
        cache: CacheView,
        cache_dir: Path,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        state = cache_dir / STATE_FILE
        mine = set(await trio.to_thread.run_sync(_load, state))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            task_status.started()
            while True:
                self._changed = trio.Event()
                retry = await self._pass(cache, state, mine)
                with trio.move_on_after(PIN_RETRY if retry else float("inf")):
                    await self._changed.wait()

    async def _pass(self, cache: CacheView, state: Path, mine: set[str]) -> bool:
        """Pin what is live, release what is not; True if something is to be retried."""
        try:
            self.live = await self._live_records()
        except RecordsError as e:  # nothing is released on a failed read
            log.warning("group pins: %s", e)
            return True
        retry = False
        users = set(cache.pinned()) - mine
        for file_id in self.live:
            if file_id in users or (file_id in mine and file_id not in self._errors):
                continue
            mine.add(file_id)
            await self._save(state, mine)  # first: a crash while pinning releases it later
            try:
                await cache.pin(file_id)
            except CacheFSError as e:
                self._errors[file_id] = str(e)
                retry = True
                log.warning("group pin of %s: %s", file_id, e)
                continue
            self._errors.pop(file_id, None)
        for file_id in sorted(mine - set(self.live)):
            try:
                await cache.unpin(file_id)
            except CacheFSError as e:
                log.warning("group unpin of %s: %s", file_id, e)
            mine.discard(file_id)
            self._errors.pop(file_id, None)
            await self._save(state, mine)
        return retry or self._state_error is not None

    async def _save(self, state: Path, mine: set[str]) -> None:
        try:
            await trio.to_thread.run_sync(_store, state, sorted(mine))
        except OSError as e:
            if self._state_error is None:
                log.warning("%s cannot be written (%s): group pins kept in memory", state, e)
            self._state_error = str(e)
            return
        self._state_error = None

    async def _watch(self) -> None:
        while True:
            try:
                async with self._group.records.events({GROUP_PIN_TYPE}) as events:
                    async for _ in events:
                        self._changed.set()
            except GroupError as e:
                log.warning("group pin events: %s", e)
                self._changed.set()


def _load(path: Path) -> list[str]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): starting with no group pins", path, e)
        return []
    return [f for f in raw if isinstance(f, str)] if isinstance(raw, list) else []


def _store(path: Path, files: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(files))
    os.replace(tmp, path)
