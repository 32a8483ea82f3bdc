"""A mount in a group: its membership, its hosted cache, and what it does on
the group's records.

``open_member`` opens this machine's membership of the group (its records
replicate in the background: Redis down costs nothing but sharing) and,
with a hosted cache, puts the shared backend (cachefs.group.shared) in
front of the origin.  ``Member.serve`` then runs, for the mounted cache,
the node status record (cachefs.group.status), the version records
(cachefs.group.versions) and the group pins (cachefs.group.pins), and
publishes the content records of versions whose offers were dropped from
the hashes the cache computed (every HOLES_INTERVAL, for HOLES_PATIENCE).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypedDict

import trio

from cachefs.contract import Backend, BlobStore
from cachefs.group.content import TRACKED, ContentRecords
from cachefs.group.formats import NodeStatus
from cachefs.group.hosted import HostedCache
from cachefs.group.options import MemberOptions
from cachefs.group.pins import GroupPins
from cachefs.group.ports import CacheView
from cachefs.group.shared import SharedBackend
from cachefs.group.status import Described, serve_status
from cachefs.group.versions import Versions
from cachefs.records import Group, open_group

__all__ = ["Described", "GroupStatistics", "Member", "MemberOptions", "open_member"]

log = logging.getLogger(__name__)

HOLES_INTERVAL = 5.0
HOLES_PATIENCE = 600.0


class GroupStatistics(TypedDict):
    """The ``group`` object of ``cachefs stats`` (docs/group.md explains each)."""

    name: str
    member: str
    hosted_cache: str | None
    hosted_hits: int
    hosted_misses: int
    hosted_bytes: int
    hosted_errors: int
    rejected_blocks: int
    offered: int
    uploaded: int
    already_there: int
    dropped_offers: int
    mismatched_offers: int
    offer_queue_bytes: int
    hosted_down: str | None
    content_published: int
    content_used: int
    rejected_records: int
    versions_published: int
    versions_applied: int
    group_pins: list[dict[str, Any]]


class Member:
    """This mount's part in the group.  Made by :func:`open_member`."""

    def __init__(
        self,
        group: Group,
        options: MemberOptions,
        content: ContentRecords,
        shared: SharedBackend | None,
        backend: Backend,
    ) -> None:
        self.group = group
        self.options = options
        self.content = content
        self.shared = shared
        #: what the mount reads through: the shared backend, or the origin itself
        self.backend = backend
        self.versions = Versions(group)
        self.pins = GroupPins(group)
        self._serving: CacheView | None = None

    @property
    def hosted(self) -> HostedCache | None:
        return self.shared.hosted if self.shared is not None else None

    def statistics(self) -> GroupStatistics:
        h = self.hosted
        hs = h.statistics() if h is not None else None
        c = self.content.counters
        v = self.versions.counters
        return {
            "name": self.group.name,
            "member": self.group.identity.member_id,
            "hosted_cache": h.url if h is not None else None,
            "hosted_hits": hs.hits if hs else 0,
            "hosted_misses": hs.misses if hs else 0,
            "hosted_bytes": hs.bytes if hs else 0,
            "hosted_errors": hs.errors if hs else 0,
            "rejected_blocks": hs.rejected_blocks if hs else 0,
            "offered": hs.offered if hs else 0,
            "uploaded": hs.uploaded if hs else 0,
            "already_there": hs.already_there if hs else 0,
            "dropped_offers": hs.dropped_offers if hs else 0,
            "mismatched_offers": hs.mismatched_offers if hs else 0,
            "offer_queue_bytes": h.queue_bytes if h is not None else 0,
            "hosted_down": h.down if h is not None else None,
            "content_published": c.content_published,
            "content_used": c.content_used,
            "rejected_records": c.rejected_records
            + v.rejected_records
            + self.pins.rejected_records
            + self.group.rejected,
            "versions_published": v.versions_published,
            "versions_applied": v.versions_applied,
            "group_pins": [dataclasses.asdict(p) for p in self.pins.progress(self._serving)],
        }

    async def offer_added(self, cache: CacheView, file_id: str, offset: int, data: bytes) -> None:
        """AddData's rule: offer the whole blocks of *data* (supplied at *offset*)
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
            view = memoryview(data)[pos - offset : pos - offset + length]
            shared.hosted.offer_nowait(view, info.block_hashes[b])
            b += 1

    def on_retired(self, file_id: str) -> None:
        """The engine dropped a version of *file_id* (its on_invalidate; never blocks)."""
        self.versions.retired(file_id)

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
        self._serving = cache
        async with trio.open_nursery() as nursery:
            await nursery.start(self.versions.serve, cache, forget_entry)
            await nursery.start(self.pins.serve, cache, cache_dir)
            if self.shared is not None:
                nursery.start_soon(self._publish_holes, cache, self.shared)
            figures = partial(self._node_status, cache, described)
            await nursery.start(serve_status, self.group, self.options.status_expiry, figures)
            task_status.started()

    async def _publish_holes(self, cache: CacheView, shared: SharedBackend) -> None:
        """Publish the versions whose offers were dropped from the hashes the
        cache computed, once it holds them whole (given up after HOLES_PATIENCE)."""
        waiting: dict[tuple[str, str], float] = {}
        while True:
            await trio.sleep(HOLES_INTERVAL)
            now = trio.current_time()
            for key in shared.trackers.take_holes():
                waiting.setdefault(key, now)
            for (file_id, version), since in list(waiting.items()):
                info = cache.content_of(file_id)
                if info is not None and info.version == version:
                    self.content.publish_nowait(file_id, info)
                elif now - since < HOLES_PATIENCE and len(waiting) <= 4 * TRACKED:
                    continue
                del waiting[(file_id, version)]

    def _node_status(self, cache: CacheView, described: Described) -> NodeStatus:
        stats = cache.statistics()
        h = self.hosted
        hosted = h.statistics().bytes if h is not None else 0
        return NodeStatus(
            host=described.host,
            mountpoint=described.mountpoint,
            source=described.source,
            software=described.software,
            cached_bytes=int(stats.get("cached_bytes", 0)),
            cache_limit=int(stats.get("cache_limit", 0)),
            hit_ratio=stats.get("hit_ratio"),
            origin_bytes=max(0, int(stats.get("bytes_from_backend", 0)) - hosted),
            hosted_bytes=hosted,
            local_bytes=int(stats.get("hit_bytes", 0)),
            pins=tuple(self.pins.progress(cache)),
        )


@asynccontextmanager
async def open_member(
    options: MemberOptions,
    block_size: int,
    origin: Backend,
    open_store: Callable[..., BlobStore] | None = None,
) -> AsyncIterator[Member]:
    """Open this machine's membership of the group and, with a hosted cache,
    the shared backend in front of *origin* (*open_store* makes the blob
    store from the URL and its options, in a worker thread).

    GroupError (one line) when this machine is not a member of the group.
    """
    async with open_group(options.group, groups_dir=options.groups_dir) as group:
        content = ContentRecords(group, options.trust_content, block_size)
        shared = None
        if options.shared_cache is not None:
            assert open_store is not None
            store = await trio.to_thread.run_sync(
                partial(open_store, options.shared_cache, **options.shared_cache_options)
            )
            hosted = HostedCache(store, options.shared_cache)
            shared = SharedBackend(origin, hosted, content, block_size)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(content.serve)
                if shared is not None:
                    await nursery.start(shared.hosted.serve)
                yield Member(group, options, content, shared, shared or origin)
                nursery.cancel_scope.cancel()
        finally:
            if shared is not None:
                with trio.CancelScope(shield=True):
                    await shared.hosted.aclose()
