"""A mount in a group: what it publishes and how it acts on what others publish.

``open_member`` opens this machine's membership of the group (its records
replicate in the background: Redis down costs nothing but sharing), and,
with a hosted cache, the shared backend (cachefs.group.shared) the mount
reads through.  ``Member.serve`` then runs, for a mounted cache:

- Node status: one record, rewritten every third of its lifetime with this
  mount's figures (the mount refreshes it itself: see
  cachefs.group.formats); deleted at a clean unmount, gone at its expiry
  when the node dies.
- Versions: when the cache drops a version of a file (its source changed),
  this member publishes the file's new version, unless the group said so
  already.  When another member publishes one, and the cache holds another
  version of that file, the cache asks its source again at once (whatever
  its TTL) and the kernel is told to look the name up again.  The record
  is only a hint: what the source answers decides, so a forged version
  record costs a stat, never a wrong byte.
- Group pins: pin records whose last signer is an administrator now are pinned (fetched
  whole, kept) on every member, and released when the record is deleted or
  expires.  A file this mount had pinned itself stays pinned.  The files
  pinned for the group are kept in ``group-pins.json`` in the cache dir,
  so that a pin removed while the mount was down is released at the next
  mount.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import trio

from cachefs.contract import Backend, BlobStore
from cachefs.errors import CacheFSError, NotFound
from cachefs.group.content import ContentRecords
from cachefs.group.formats import (
    FILE_VERSION_TYPE,
    GROUP_PIN_TYPE,
    NodeStatus,
    PinProgress,
    decode_pin,
    decode_version,
    status_record,
    version_record,
)
from cachefs.group.hosted import HostedCache
from cachefs.group.ports import CacheView
from cachefs.group.shared import SharedBackend
from cachefs.records import ChangeType, Group, GroupError, Record, RecordsError, Role, open_group
from cachefs.records.errors import RecordNotFound

log = logging.getLogger(__name__)

PINS_FILE = "group-pins.json"
VERSION_LIFETIME = timedelta(hours=1)
STATUS_GOODBYE = 2.0  # seconds an unmount gives the deletion of its status record
PIN_RETRY = 60.0  # a pin that failed is tried again after this long
ANNOUNCED = 65536  # file versions remembered as told to the group
REVALIDATIONS = 4096  # files waiting to be asked again at most


@dataclass(frozen=True, slots=True)
class MemberOptions:
    """How a mount takes part in its group (``cachefs mount --group ...``)."""

    group: str
    groups_dir: Path | None = None
    #: the hosted cache's URL (s3://bucket/prefix or a directory), None for none
    shared_cache: str | None = None
    #: keyword options of the hosted cache's blob store factory (its S3 endpoint)
    shared_cache_options: dict[str, Any] = field(default_factory=dict)
    trust_content: str = "members"
    #: the node status record's lifetime in seconds (rewritten every third of it)
    status_expiry: float = 60.0


@dataclass(slots=True)
class _Counters:
    versions_published: int = 0
    versions_applied: int = 0
    rejected_records: int = 0


@dataclass(frozen=True, slots=True)
class Described:
    """What the status record says the mount is."""

    mountpoint: str
    source: str
    software: str
    host: str = field(default_factory=socket.gethostname)


class Member:
    """This mount's part in the group (see the module's policy)."""

    def __init__(
        self,
        group: Group,
        options: MemberOptions,
        content: ContentRecords,
        hosted: HostedCache | None,
    ) -> None:
        self.group = group
        self.options = options
        self.content = content
        self.hosted = hosted
        self.shared: SharedBackend | None = None
        self._counters = _Counters()
        self._announced: OrderedDict[str, str | None] = OrderedDict()
        self._retired: set[str] = set()
        self._retired_wakeup = trio.Event()
        self._to_revalidate: set[str] = set()
        self._revalidate_wakeup = trio.Event()
        self._pins_changed = trio.Event()
        self._pin_errors: dict[str, str] = {}
        self._live_pins: list[str] = []
        self._cache: CacheView | None = None  # the cache served, once serve runs

    @property
    def me(self) -> str:
        return self.group.identity.member_id

    def wrap(self, origin: Backend, block_size: int) -> Backend:
        """The backend the mount reads through: *origin*, or the shared backend in front of it."""
        if self.hosted is None:
            return origin
        self.shared = SharedBackend(origin, self.hosted, self.content, block_size)
        return self.shared

    # -- statistics --------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        h = self.hosted
        hc = h.counters if h is not None else None
        c = self.content.counters
        return {
            "name": self.group.name,
            "member": self.me,
            "hosted_cache": h.url if h is not None else None,
            "hosted_hits": hc.hits if hc else 0,
            "hosted_misses": hc.misses if hc else 0,
            "hosted_bytes": hc.bytes if hc else 0,
            "hosted_errors": hc.errors if hc else 0,
            "rejected_blocks": hc.rejected_blocks if hc else 0,
            "offered": hc.offered if hc else 0,
            "uploaded": hc.uploaded if hc else 0,
            "already_there": hc.already_there if hc else 0,
            "dropped_offers": hc.dropped_offers if hc else 0,
            "offer_queue_bytes": h.queue_bytes if h is not None else 0,
            "hosted_down": h.down if h is not None else None,
            "content_published": c.content_published,
            "content_used": c.content_used,
            "rejected_records": c.rejected_records
            + self._counters.rejected_records
            + self.group.rejected,
            "versions_published": self._counters.versions_published,
            "versions_applied": self._counters.versions_applied,
            "group_pins": [dataclasses.asdict(p) for p in self._pin_progress(self._cache)],
        }

    # -- AddData -----------------------------------------------------------------------

    async def offer_added(self, cache: CacheView, file_id: str, offset: int, data: bytes) -> None:
        """Offer the whole blocks of *data* (supplied with add-data, at *offset*)
        that match the content information of the file's current version."""
        shared = self.shared
        attrs = cache.known_attrs(file_id)
        if shared is None or attrs is None:
            return
        info = await shared.info_for(file_id, attrs.version, attrs.size)
        if info is None:
            return
        bs = info.block_size
        b = -(-offset // bs)
        while b < len(info.block_hashes):
            pos = b * bs
            length = min(bs, info.size - pos)
            if pos + length > offset + len(data):
                return
            block = data[pos - offset : pos - offset + length]
            shared.hosted.offer_nowait(bytes(block), info.block_hashes[b])
            b += 1

    # -- running with a cache ------------------------------------------------------------

    def on_retired(self, file_id: str) -> None:
        """The engine dropped a version of *file_id* (its on_invalidate; never blocks)."""
        if len(self._retired) < REVALIDATIONS:
            self._retired.add(file_id)
            self._retired_wakeup.set()

    async def serve(
        self,
        cache: CacheView,
        cache_dir: Path,
        forget_entry: Callable[[str], None],
        described: Described,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Publish and act on the group's records for *cache* until cancelled."""
        self._cache = cache
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._publish_versions, cache)
            await nursery.start(self._watch_versions, cache)
            nursery.start_soon(self._revalidate, cache, forget_entry)
            await nursery.start(self._pins, cache, cache_dir / PINS_FILE)
            nursery.start_soon(self._status, cache, described)
            task_status.started()

    # versions

    def _announce(self, file_id: str, version: str | None) -> None:
        self._announced[file_id] = version
        self._announced.move_to_end(file_id)
        if len(self._announced) > ANNOUNCED:
            self._announced.popitem(last=False)

    async def _publish_versions(self, cache: CacheView) -> None:
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
                size = attrs.size if attrs is not None else 0
                if file_id in self._announced and self._announced[file_id] == version:
                    continue  # the group said so (or this member did)
                self._announce(file_id, version)
                records = self.group.records
                expires = records.clock.now() + VERSION_LIFETIME
                try:
                    await records.add(
                        version_record(file_id, version, size, expires), internal=True
                    )
                except RecordsError as e:
                    log.warning("version of %s not published to the group: %s", file_id, e)
                    continue
                self._counters.versions_published += 1

    async def _watch_versions(
        self, cache: CacheView, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        records = self.group.records
        started = False
        while True:
            try:
                async with records.events({FILE_VERSION_TYPE}) as events:
                    if not started:
                        task_status.started()
                        started = True
                    async for event in events:
                        if event.change not in (ChangeType.ADDED, ChangeType.UPDATED):
                            continue
                        await self._version_heard(cache, event.record_id)
            except GroupError as e:  # fell behind: what was missed, the TTL covers
                log.warning("group version events: %s", e)

    async def _version_heard(self, cache: CacheView, record_id: Any) -> None:
        try:
            record = await self.group.records.get(record_id)
        except RecordNotFound:
            return
        if record.modified_by == self.me:
            return
        try:
            file_id, version = decode_version(record)
        except ValueError as e:
            self._counters.rejected_records += 1
            log.warning("version record not used: %s", e)
            return
        self._announce(file_id, version)
        known = cache.known_attrs(file_id)
        if known is None or known.version == version:
            return
        if len(self._to_revalidate) < REVALIDATIONS:
            self._to_revalidate.add(file_id)
            self._revalidate_wakeup.set()

    async def _revalidate(self, cache: CacheView, forget_entry: Callable[[str], None]) -> None:
        while True:
            await self._revalidate_wakeup.wait()
            self._revalidate_wakeup = trio.Event()
            files, self._to_revalidate = self._to_revalidate, set()
            for file_id in sorted(files):
                try:
                    await cache.revalidate(file_id)
                except CacheFSError as e:
                    log.debug("%s asked again after a group version record: %s", file_id, e)
                forget_entry(file_id)
                self._counters.versions_applied += 1

    # pins

    def _admin_signed(self, record: Record) -> bool:
        records = self.group.records
        cred = records.trust.credential(record.modified_by, records.clock.now())
        return cred is not None and cred.role is Role.ADMIN

    async def _live_pin_records(self) -> dict[str, Record]:
        live: dict[str, Record] = {}
        async with self.group.records.enum(GROUP_PIN_TYPE) as records:
            async for record in records:
                if not self._admin_signed(record):
                    self._counters.rejected_records += 1
                    continue
                try:
                    live[decode_pin(record)] = record
                except ValueError:
                    self._counters.rejected_records += 1
        return live

    async def _pins(
        self,
        cache: CacheView,
        state: Path,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        mine = set(await trio.to_thread.run_sync(_load_pins, state))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_pins)
            task_status.started()
            while True:
                self._pins_changed = trio.Event()
                try:
                    live = await self._live_pin_records()
                except RecordsError as e:
                    log.warning("group pins: %s", e)
                    live = {}
                self._live_pins = sorted(live)
                retry = False
                pinned = set(cache.pinned())
                for file_id in self._live_pins:
                    if file_id in mine or file_id in pinned:
                        continue  # pinned for the group already, or by this mount's user
                    try:
                        await cache.pin(file_id)
                    except CacheFSError as e:
                        self._pin_errors[file_id] = str(e)
                        retry = True
                        log.warning("group pin of %s: %s", file_id, e)
                        continue
                    self._pin_errors.pop(file_id, None)
                    mine.add(file_id)
                    await trio.to_thread.run_sync(_save_pins, state, sorted(mine))
                for file_id in sorted(mine - set(live)):
                    try:
                        await cache.unpin(file_id)
                    except CacheFSError as e:
                        log.warning("group unpin of %s: %s", file_id, e)
                    mine.discard(file_id)
                    self._pin_errors.pop(file_id, None)
                    await trio.to_thread.run_sync(_save_pins, state, sorted(mine))
                with trio.move_on_after(PIN_RETRY if retry else float("inf")):
                    await self._pins_changed.wait()

    async def _watch_pins(self) -> None:
        while True:
            try:
                async with self.group.records.events({GROUP_PIN_TYPE}) as events:
                    async for _ in events:
                        self._pins_changed.set()
            except GroupError as e:
                log.warning("group pin events: %s", e)
                self._pins_changed.set()

    def _pin_progress(self, cache: CacheView | None) -> list[PinProgress]:
        shown = []
        for file_id in self._live_pins:
            cached = size = 0
            if cache is not None:
                attrs = cache.known_attrs(file_id)
                size = attrs.size if attrs is not None else 0
                cached = cache.cached_bytes_of(file_id)
            shown.append(PinProgress(file_id, cached, size, self._pin_errors.get(file_id)))
        return shown

    # status

    async def _status(self, cache: CacheView, described: Described) -> None:
        records = self.group.records
        expiry = self.options.status_expiry
        record_id = None
        try:
            while True:
                status = self._node_status(cache, described)
                expires = records.clock.now() + timedelta(seconds=expiry)
                try:
                    record_id = await self._write_status(record_id, status, expires)
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
                        await self.group.sync(STATUS_GOODBYE)
                    except RecordsError:
                        pass

    async def _write_status(self, record_id: Any, status: NodeStatus, expires: Any) -> Any:
        records = self.group.records
        if record_id is not None:
            try:
                held = await records.get(record_id)
            except RecordNotFound:
                held = None
            if held is not None:
                new = dataclasses.replace(held, data=status.to_json(), expires=expires)
                await records.update(new, internal=True)
                return record_id
        return await records.add(status_record(status, expires), internal=True)

    def _node_status(self, cache: CacheView, described: Described) -> NodeStatus:
        stats = cache.statistics()
        hosted = self.hosted.counters.bytes if self.hosted is not None else 0
        return NodeStatus(
            host=described.host,
            mountpoint=described.mountpoint,
            source=described.source,
            software=described.software,
            cached_bytes=int(stats.get("cached_bytes", 0)),
            cache_limit=int(stats.get("cache_limit", 0)),
            hit_ratio=stats.get("hit_ratio"),
            origin_bytes=int(stats.get("bytes_from_backend", 0)) - hosted,
            hosted_bytes=hosted,
            local_bytes=int(stats.get("hit_bytes", 0)),
            pins=tuple(self._pin_progress(cache)),
        )


def _load_pins(path: Path) -> list[str]:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): starting with no group pins", path, e)
        return []
    return [f for f in raw if isinstance(f, str)] if isinstance(raw, list) else []


def _save_pins(path: Path, files: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(files))
    os.replace(tmp, path)


@asynccontextmanager
async def open_member(
    options: MemberOptions,
    block_size: int,
    open_store: Callable[..., BlobStore] | None = None,
) -> AsyncIterator[Member]:
    """Open this machine's membership of the group, and the hosted cache
    (*open_store* makes its blob store from the URL and its options, in a
    worker thread).

    GroupError (one line) when this machine is not a member of the group.
    """
    async with open_group(options.group, groups_dir=options.groups_dir) as group:
        content = ContentRecords(group, options.trust_content, block_size)
        hosted = None
        if options.shared_cache is not None:
            assert open_store is not None
            store = await trio.to_thread.run_sync(
                partial(open_store, options.shared_cache, **options.shared_cache_options)
            )
            hosted = HostedCache(store, options.shared_cache)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(content.serve)
                if hosted is not None:
                    await nursery.start(hosted.serve)
                yield Member(group, options, content, hosted)
                nursery.cancel_scope.cancel()
        finally:
            if hosted is not None:
                with trio.CancelScope(shield=True):
                    await hosted.aclose()
