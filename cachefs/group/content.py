"""Content records: the block hashes of a file version, published by a member
that fetched it whole from the origin, trusted as the mount says.

Policy:

- Trust (``--trust-content``): ``members`` takes a content record whose
  last signer is a member of the group in good standing now (not expired,
  not revoked); ``admins`` only one whose last signer is an administrator.
  This member's own records are always taken (it computed them from the
  origin's bytes).  A record that
  is not trusted, malformed, or names another file or version is not used
  and is counted in ``rejected_records`` once per record.
- The origin's published content information wins over any record
  (cachefs.group.shared asks it first).
- A version is published when this member has hashed every block of it
  from the origin's bytes (:class:`Tracker`), unless a record it trusts
  exists already.  When an offer was dropped (the hosted cache slower than
  the origin), the version is published later from the hashes the cache
  computed, once it holds the version whole (cachefs.group.member).
  Versions with more blocks than a record can hold (the group's max record
  size) are not tracked.  A record lives 30 days,
  or less when this member's credentials expire sooner.
- Lookups read the member's local database only, never the engine, within
  a short deadline: a stalled database costs a lookup, never a reader.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta

import trio

from cachefs.contract import ContentInfo
from cachefs.group.formats import content_record, decode_content, key_query, version_key
from cachefs.group.options import TRUST_MODES
from cachefs.records import Group, Record, RecordsError, Role

log = logging.getLogger(__name__)

LOOKUP_DEADLINE = 1.0
LIFETIME = timedelta(days=30)
TRACKED = 256  # versions being hashed at once
TRACKED_BLOCKS = 1 << 20  # and their blocks, in all (33 bytes each)
# JSON bytes per block hash in a record, and what the rest of it may take
_PER_BLOCK = 67
_OVERHEAD = 8192


@dataclass(slots=True)
class ContentCounters:
    content_published: int = 0
    content_used: int = 0
    rejected_records: int = 0


class ContentRecords:
    """Looks up and publishes the group's content records for one mount."""

    def __init__(self, group: Group, trust: str, block_size: int) -> None:
        if trust not in TRUST_MODES:
            raise ValueError(f"trust must be one of {', '.join(TRUST_MODES)}")
        self._group = group
        self._trust = trust
        self._me = group.identity.member_id
        self._block_size = block_size
        self.counters = ContentCounters()
        self._refused: OrderedDict[object, None] = OrderedDict()
        self.max_blocks = max(0, (group.records.max_record_size - _OVERHEAD) // _PER_BLOCK)
        self._publish_send, self._publish_receive = trio.open_memory_channel[
            tuple[str, ContentInfo]
        ](64)

    def trusted(self, record: Record) -> bool:
        """Whether *record*'s last signer may vouch for content, as the mount says."""
        if record.modified_by == self._me:
            return True
        records = self._group.records
        cred = records.trust.credential(record.modified_by, records.clock.now())
        if cred is None:
            return False
        return self._trust == "members" or cred.role is Role.ADMIN

    def _preference(self, record: Record) -> tuple[bool, float]:
        """This member's own records first, then the most recently signed."""
        when = record.modified or record.created
        return (record.modified_by != self._me, -(when.timestamp() if when else 0.0))

    def _refuse(self, record: Record, why: str) -> None:
        key = (record.id, record.version)
        if key in self._refused:
            return
        self._refused[key] = None
        if len(self._refused) > 4096:
            self._refused.popitem(last=False)
        self.counters.rejected_records += 1
        log.warning("content record %s not used: %s", record.id, why)

    async def lookup(self, file_id: str, version: str, size: int | None) -> ContentInfo | None:
        """A trusted content record's information for *file_id* at *version*
        (and *size*, unless None), or None."""
        info = await self._find(file_id, version, size)
        if info is not None:
            self.counters.content_used += 1
        return info

    async def _find(self, file_id: str, version: str, size: int | None) -> ContentInfo | None:
        found: list[Record] = []
        with trio.move_on_after(LOOKUP_DEADLINE):
            try:
                found = await self._group.records.search(key_query(version_key(file_id, version)))
            except RecordsError as e:
                log.warning("content records of %s: %s", file_id, e)
        found.sort(key=self._preference)
        for record in found:
            if not self.trusted(record):
                self._refuse(record, f"signed by {record.modified_by}, not trusted for content")
                continue
            try:
                fid, info = decode_content(record)
            except ValueError as e:
                self._refuse(record, str(e))
                continue
            if fid != file_id or info.version != version:
                continue  # another file whose key collides after case folding: not ours
            if info.block_size != self._block_size or size not in (None, info.size):
                continue  # another block size or a size that is not this version's
            return info
        return None

    # -- publishing ------------------------------------------------------------------

    def publish_nowait(self, file_id: str, info: ContentInfo) -> None:
        """Publish *info* in the background (dropped if many are waiting)."""
        try:
            self._publish_send.send_nowait((file_id, info))
        except trio.WouldBlock:
            log.debug("content record of %s not published: too many waiting", file_id)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for file_id, info in self._publish_receive:
            try:
                await self._publish(file_id, info)
            except RecordsError as e:
                log.warning("content record of %s not published: %s", file_id, e)

    async def _publish(self, file_id: str, info: ContentInfo) -> None:
        if await self._find(file_id, info.version, info.size) is not None:
            return  # a record this member trusts says it already
        records = self._group.records
        now = records.clock.now()
        cred = records.trust.credential(self._me, now)
        if cred is None:
            return  # not a member in good standing now: nothing to sign with
        expires = min(now + LIFETIME, cred.expires - timedelta(minutes=1))
        if expires <= now:
            return
        await records.add(content_record(file_id, info, expires), internal=True)
        self.counters.content_published += 1
        log.debug("published the content record of %s at %s", file_id, info.version)


class Tracker:
    """The block hashes of one version as they are learned from the origin."""

    __slots__ = ("file_id", "version", "size", "hashes", "known", "missing", "abandoned")

    def __init__(self, file_id: str, version: str, size: int, blocks: int) -> None:
        self.file_id = file_id
        self.version = version
        self.size = size
        self.hashes = bytearray(32 * blocks)
        self.known = bytearray(blocks)
        self.missing = blocks
        self.abandoned = False

    def abandon(self) -> None:
        """A block of the version will not be learned: it is not published."""
        self.abandoned = True

    def learn(self, block: int, digest: bytes) -> bool:
        """Record block *block*'s hash; True when this completed the version."""
        if self.abandoned or self.known[block]:
            return False
        self.known[block] = 1
        self.hashes[32 * block : 32 * block + 32] = digest
        self.missing -= 1
        return self.missing == 0

    def info(self, block_size: int) -> ContentInfo:
        n = len(self.known)
        hashes = tuple(bytes(self.hashes[32 * i : 32 * i + 32]) for i in range(n))
        return ContentInfo(self.version, self.size, block_size, hashes)


class Trackers:
    """The versions being learned, at most TRACKED (least recently used go)."""

    def __init__(self, block_size: int, max_blocks: int) -> None:
        self._block_size = block_size
        self._max_blocks = max_blocks
        self._tracked: OrderedDict[tuple[str, str], Tracker] = OrderedDict()
        self._blocks = 0
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        #: versions whose tracker lost a block: published from the cache's own
        #: hashes once it holds them whole (cachefs.group.member)
        self.holes: OrderedDict[tuple[str, str], None] = OrderedDict()

    def get(self, file_id: str, version: str, size: int) -> Tracker | None:
        key = (file_id, version)
        if key in self._done:
            return None
        tracker = self._tracked.get(key)
        if tracker is None:
            blocks = -(-size // self._block_size)
            if blocks == 0 or blocks > min(self._max_blocks, TRACKED_BLOCKS):
                return None
            tracker = self._tracked[key] = Tracker(file_id, version, size, blocks)
            self._blocks += blocks
            while len(self._tracked) > TRACKED or self._blocks > TRACKED_BLOCKS:
                _, gone = self._tracked.popitem(last=False)
                self._blocks -= len(gone.known)
        self._tracked.move_to_end(key)
        return tracker

    def abandon(self, tracker: Tracker) -> None:
        """A block of *tracker*'s version was not learned: no record from here."""
        if tracker.abandoned:
            return
        tracker.abandon()
        self.finished(tracker)
        self.holes[(tracker.file_id, tracker.version)] = None
        if len(self.holes) > TRACKED:
            self.holes.popitem(last=False)

    def take_holes(self) -> list[tuple[str, str]]:
        holes, self.holes = list(self.holes), OrderedDict()
        return holes

    def finished(self, tracker: Tracker) -> None:
        key = (tracker.file_id, tracker.version)
        if self._tracked.pop(key, None) is not None:
            self._blocks -= len(tracker.known)
        self._done[key] = None
        if len(self._done) > 4 * TRACKED:
            self._done.popitem(last=False)
