"""The origin as a group mount reads it: the hosted cache first, verified.

:class:`SharedBackend` is the outermost backend of a mount in a group with
a hosted cache.  Policy:

- What a hosted-cache block must hash to (``info_for``): the origin's
  published content information when it has some for that version and
  the mount's block size (it always wins), else a content record of the group this mount trusts
  (cachefs.group.content).  The origin's answer is kept per version; a
  version without any is looked up again in the group's records after
  NEGATIVE_TTL, since a peer may publish one meanwhile.  The cache itself
  is given the origin's information only (``content_info``): a record
  decides which hosted blocks are used, never whether the origin's own
  bytes are accepted.
- A ReadData call on a version with content information, starting on a
  block boundary, asks the hosted cache for its blocks at once (each
  within the hosted cache's deadline) and serves the leading blocks that
  arrived and hash to what the content information says; the rest of the
  call goes to the origin in the same call.  A block that is absent or
  wrong in the hosted cache costs an origin read, never a wrong byte.
- Whole blocks read from the origin are offered to the hosted cache in the
  background (copied, hashed by its uploaders; checked against the
  content information when there is some).  Without content information
  their hashes are learned as they upload, and a version whose every block
  was learned is published as a content record.
- The origin is not asked to start a stream to the end of the file
  (CONTINUOUS_STARTED) for a version the hosted cache may serve, since its
  later calls would strand it.
- Errors: the origin's result codes pass through unchanged.  When the
  hosted cache served part of a call and the origin then fails, the call
  answers PARTIAL with the part served.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial

import trio

from cachefs.contract import (
    Backend,
    ContentInfo,
    ContentInfoSource,
    DirEntry,
    FileAttrs,
    PassesWrites,
    ReadData,
    RWEvent,
    RWResult,
)
from cachefs.group.content import ContentRecords, Tracker, Trackers
from cachefs.group.hosted import HostedCache

log = logging.getLogger(__name__)

NEGATIVE_TTL = 2.0
RECORD_TTL = 60.0
INFO_HASHES = 1 << 18  # block hashes of content information kept in memory, per kind
_DATA = (RWResult.SUCCESS, RWResult.PARTIAL)


class SharedBackend(PassesWrites):
    """*origin* with the hosted cache in front of it (see the module's policy).
    Writes go to the origin as they are."""

    def __init__(
        self,
        origin: Backend,
        hosted: HostedCache,
        records: ContentRecords,
        block_size: int,
    ) -> None:
        self.origin = origin
        self.pass_writes_to(origin)
        self.hosted = hosted
        self.records = records
        self._bs = block_size
        # what the origin published per version (kept), and trusted records'
        # information (kept until the time stored with it)
        self._origin = _Infos()
        self._records = _Infos()
        self.trackers = Trackers(block_size, records.max_blocks)

    def __repr__(self) -> str:
        return f"shared({self.hosted.url}, {self.origin!r})"

    # -- pass-through --------------------------------------------------------------

    async def stat(self, file_id: str) -> FileAttrs | None:
        return await self.origin.stat(file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        return await self.origin.list_dir(dir_id)

    async def open_file(self, file_id: str) -> object:
        return await self.origin.open_file(file_id)

    async def close_file(self, file_id: str, context: object) -> None:
        await self.origin.close_file(file_id, context)

    async def aclose(self) -> None:
        await self.origin.aclose()

    # -- content information -----------------------------------------------------------

    async def content_info(self, file_id: str) -> ContentInfo | None:
        """The origin's published information only: the cache adopts it as the
        authority on every block.  A content record never becomes that (a
        wrong one would make the origin's own bytes refused); it only decides
        which hosted-cache blocks may be used."""
        if not isinstance(self.origin, ContentInfoSource):
            return None
        info = await self.origin.content_info(file_id)
        if info is not None and info.block_size == self._bs:
            self._origin.keep((file_id, info.version), info, float("inf"))  # asked once
        return info

    async def info_for(self, file_id: str, version: str, size: int) -> ContentInfo | None:
        """What blocks of *file_id* at *version* from the hosted cache must hash
        to: the origin's published information for that version, else a
        trusted content record's; None if neither (then nothing is read from
        the hosted cache).  While the origin cannot say whether it has some,
        None: a record never stands in for what the origin may hold."""
        key = (file_id, version)
        if key not in self._origin:
            try:
                info = await self.content_info(file_id)
            except Exception as e:  # the engine asks too, and reports it
                log.debug("content information of %s: %s", file_id, e)
                return None
            usable = info is not None and info.version == version and info.block_size == self._bs
            self._origin.keep(key, info if usable else None, float("inf"))
        origin = self._origin.get(key)
        if origin is not None:
            return origin if origin.size == size else None
        return await self._record_info(file_id, version, size)

    async def _record_info(self, file_id: str, version: str, size: int) -> ContentInfo | None:
        """A trusted record's information for this version and size, looked up
        again after RECORD_TTL (a revoked signer's record stops being used)
        or, when there was none, after NEGATIVE_TTL (a peer may publish one)."""
        key = (file_id, version)
        now = trio.current_time()
        fresh, held = self._records.get_fresh(key, now)
        if fresh:
            return held
        info = await self.records.lookup(file_id, version, size)
        self._records.keep(key, info, now + (RECORD_TTL if info is not None else NEGATIVE_TTL))
        return info

    # -- reads ------------------------------------------------------------------------

    async def read_data(self, req: ReadData) -> None:
        served = 0
        info = None
        if req.bytes_to_read and not req.flags & RWEvent.CANCELED:
            info = await self.info_for(req.file_id, req.version, req.size)
            if (
                info is not None
                and info.size == req.size
                and req.position % self._bs == 0
                and self.hosted.usable()
            ):
                served = await self._from_hosted(req, info)
        if served == req.bytes_to_read and served:
            req.bytes_read, req.result_code = served, RWResult.SUCCESS
            return
        flags = req.flags
        if info is not None:
            # Later calls may come from the hosted cache: no stream to the end
            # of the file that they would strand at the origin.
            flags &= ~(RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED)
        sub = ReadData(
            file_id=req.file_id,
            size=req.size,
            position=req.position + served,
            flags=flags,
            buffer=req.buffer[served:],
            bytes_to_read=req.bytes_to_read - served,
            file_context=req.file_context,
            version=req.version,
        )
        try:
            await self.origin.read_data(sub)
        except Exception:
            if not served:
                raise
            log.exception("origin failed after the hosted cache served part of a call")
            req.bytes_read, req.result_code = served, RWResult.PARTIAL
            return
        n, rc = sub.bytes_read, sub.result_code
        good = type(n) is int and 0 <= n <= sub.bytes_to_read
        if served and (not good or rc not in (*_DATA, RWResult.RANGE_BEYOND_EOF)):
            req.bytes_read, req.result_code = served, RWResult.PARTIAL
            return
        req.bytes_read, req.result_code = (served + n if good else n), rc
        if good and n and rc in _DATA and req.bytes_to_read:
            self._offer(req, sub.position, n, info)

    async def _from_hosted(self, req: ReadData, info: ContentInfo) -> int:
        """Copy the leading blocks of *req* the hosted cache has (checked) into
        its buffer; the bytes served."""
        bs = self._bs
        first = req.position // bs
        end = req.position + req.bytes_to_read
        count = -(-req.bytes_to_read // bs)
        if end != req.size and req.bytes_to_read % bs:
            count -= 1  # a call ending inside a block: that block is the origin's
        if count <= 0:
            return 0
        got: list[bytes | None] = [None] * count

        async def one(i: int) -> None:
            b = first + i
            length = min(bs, req.size - b * bs)
            got[i] = await self.hosted.fetch(info.block_hashes[b], length)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                if first + i < len(info.block_hashes):
                    nursery.start_soon(one, i)
        served = 0
        for data in got:
            if data is None:
                break
            req.buffer[served : served + len(data)] = data
            served += len(data)
        return min(served, req.bytes_to_read)

    def _offer(self, req: ReadData, start: int, n: int, info: ContentInfo | None) -> None:
        """Offer the whole blocks in [start, start + n) of *req* (read from the origin)."""
        bs = self._bs
        b = -(-start // bs)
        tracker: Tracker | None = None
        if info is None:
            tracker = self.trackers.get(req.file_id, req.version, req.size)
        while True:
            pos = b * bs
            length = min(bs, req.size - pos)
            if length <= 0 or pos + length > start + n:
                return
            if info is not None and b >= len(info.block_hashes):
                return  # information that does not describe this call's blocks
            at = pos - req.position
            data = req.buffer[at : at + length]  # copied only if queued
            expected = info.block_hashes[b] if info is not None else None
            learn = None if tracker is None else partial(self._learned, tracker, b)
            if not self.hosted.offer_nowait(data, expected, learn) and tracker is not None:
                self.trackers.abandon(tracker)  # a hole: the cache's hashes will do
            b += 1

    def _learned(self, tracker: Tracker, block: int, digest: bytes) -> None:
        """An uploader hashed block *block* of the version *tracker* follows."""
        if tracker.learn(block, digest):
            self.trackers.finished(tracker)
            self.records.publish_nowait(tracker.file_id, tracker.info(self._bs))


class _Infos:
    """Content information by (file id, version), least recently used first,
    bounded by the block hashes held (INFO_HASHES); each kept until a time
    (``inf`` for ever)."""

    def __init__(self) -> None:
        self._held: OrderedDict[tuple[str, str], tuple[ContentInfo | None, float]] = OrderedDict()
        self._hashes = 0

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._held

    def get(self, key: tuple[str, str]) -> ContentInfo | None:
        held = self._held.get(key)
        return None if held is None else held[0]

    def get_fresh(self, key: tuple[str, str], now: float) -> tuple[bool, ContentInfo | None]:
        """(True, what is held for *key*) while it is fresh, else (False, None)."""
        held = self._held.get(key)
        if held is None or now >= held[1]:
            return False, None
        self._held.move_to_end(key)
        return True, held[0]

    def keep(self, key: tuple[str, str], info: ContentInfo | None, until: float) -> None:
        old = self._held.pop(key, None)
        if old is not None and old[0] is not None:
            self._hashes -= len(old[0].block_hashes)
        self._held[key] = (info, until)
        self._hashes += len(info.block_hashes) if info is not None else 0
        while self._hashes > INFO_HASHES or len(self._held) > INFO_HASHES:
            _, (gone, _) = self._held.popitem(last=False)
            if gone is not None:
                self._hashes -= len(gone.block_hashes)
