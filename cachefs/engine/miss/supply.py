"""add_data: content supplied from elsewhere (a peer, a USB disk, another cache).

Policy (after PeerDistClientAddData): data is accepted block by block, and
only after it matched the block's hash; until then readers never see it.
A block covered only in part is held in memory until later calls complete
it (at most MAX_PENDING bytes; the oldest partial blocks go first).  An
offset or a length reaching past the end of the file is OUT_OF_BOUNDS.
Blocks whose hash is unknown (no content information, never fetched) are
refused unless the caller trusts the data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Protocol

import trio

from cachefs.contract import FileAttrs, FileKind
from cachefs.engine.miss.hasher import Hasher
from cachefs.engine.miss.writer import BlockWriter
from cachefs.engine.policy.content import Content
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.inflight import Fetch, Replan
from cachefs.engine.stats import Stats
from cachefs.errors import NoContentInfo, NotAFile, OutOfBounds

log = logging.getLogger(__name__)

MAX_PENDING = 64 << 20


@dataclass
class AddResult:
    """Blocks of one add_data call: accepted, rejected, and held incomplete (file-wide)."""

    accepted: int = 0
    rejected: int = 0
    pending: int = 0


class _Partial:
    """One block being assembled: its bytes and the byte ranges covered so far."""

    __slots__ = ("buf", "covered")

    def __init__(self, length: int) -> None:
        self.buf = bytearray(length)
        self.covered: list[tuple[int, int]] = []

    def add(self, at: int, data: bytes | memoryview) -> None:
        self.buf[at : at + len(data)] = data
        spans = sorted([*self.covered, (at, at + len(data))])
        merged = [spans[0]]
        for lo, hi in spans[1:]:
            if lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        self.covered = merged

    @property
    def complete(self) -> bool:
        return self.covered == [(0, len(self.buf))]


class Versions(Protocol):
    """Which version of a file the cache serves now (engine/attrs.py)."""

    async def getattr(self, file_id: str) -> FileAttrs: ...

    async def current(self, file_id: str) -> CachedFile: ...


class Supplier:
    """Takes blocks supplied with add_data into the cache once they check out."""

    def __init__(
        self,
        versions: Versions,
        content: Content,
        hasher: Hasher,
        writer: BlockWriter,
        disk_limiter: trio.CapacityLimiter,
        stats: Stats,
    ) -> None:
        self._versions = versions
        self._content = content
        self._hasher = hasher
        self._writer = writer
        self._disk_limiter = disk_limiter
        self._stats = stats
        self._block_size = writer.block_size
        # (row id, block) -> block being assembled, oldest first.
        self._pending: dict[tuple[int, int], _Partial] = {}

    async def add(
        self, file_id: str, offset: int, data: bytes | memoryview, trust: bool
    ) -> AddResult:
        attrs = await self._versions.getattr(file_id)
        if attrs.kind is not FileKind.FILE:
            raise NotAFile(f"{file_id or '/'}: not a regular file")
        cf = await self._versions.current(file_id)
        data = memoryview(data).cast("B")
        if offset < 0 or offset > cf.size or offset + len(data) > cf.size:
            raise OutOfBounds(
                f"{file_id}: {len(data)} bytes at offset {offset} reach beyond the end"
                f" of the file ({cf.size} bytes)"
            )
        await self._content.ensure_info(cf)
        if cf.unhashed:  # hashes of blocks fetched lately count too: take them first
            await self._hasher.drain()
        bs = self._block_size
        result = AddResult()
        if data:
            first, last = offset // bs, (offset + len(data) - 1) // bs
            if not trust:
                unknown = [b for b in range(first, last + 1) if cf.hash_of(b) is None]
                if unknown:
                    raise NoContentInfo(
                        f"{file_id}: no content information for block {unknown[0]}"
                        " to check the data against (--trust accepts it unchecked)"
                    )
            for b in range(first, last + 1):
                block = self._assemble(cf, b, offset, data)
                if block is not None:
                    if await self._offer(cf, b, block, trust):
                        result.accepted += 1
                    else:
                        result.rejected += 1
        self._bound()
        self._stats.add_data_accepted += result.accepted
        self._stats.add_data_rejected += result.rejected
        result.pending = sum(1 for row, _ in self._pending if row == cf.row_id)
        return result

    def _assemble(
        self, cf: CachedFile, b: int, offset: int, data: memoryview
    ) -> bytes | bytearray | memoryview | None:
        """Block *b* whole, from this call and what was held; None while incomplete."""
        bs = self._block_size
        start = b * bs
        length = min(bs, cf.size - start)
        lo, hi = max(offset, start), min(offset + len(data), start + length)
        piece = data[lo - offset : hi - offset]
        if lo == start and hi == start + length:
            self._pending.pop((cf.row_id, b), None)
            return piece
        partial = self._pending.pop((cf.row_id, b), None) or _Partial(length)
        partial.add(lo - start, piece)
        if partial.complete:
            return partial.buf
        self._pending[(cf.row_id, b)] = partial  # now the newest
        return None

    async def _offer(
        self, cf: CachedFile, b: int, block: bytes | bytearray | memoryview, trust: bool
    ) -> bool:
        """Check one whole block; store it if it is missing.  False: it does not match."""
        want = cf.hash_of(b)
        if want is not None:
            got = await trio.to_thread.run_sync(_sha256, block, limiter=self._disk_limiter)
            if got != want:
                log.warning("add-data: block %d of %s does not match its hash", b, cf.file_id)
                return False
        elif not trust:
            return False
        # Checked against a hash that itself came on trust, it is no better.
        if cf.present[b] or cf.busy(b) is not None or cf.retired:
            return True  # already there, or on its way from the backend
        hold = Fetch(b, b)
        cf.hold(hold)
        at = b * self._block_size
        try:
            stored = await self._writer.store(
                cf, at, memoryview(block), trusted=_taken_on_trust(cf, b)
            )
        except Replan:
            return True  # a new version appeared meanwhile: nothing to store
        finally:
            cf.finish(hold)
        return stored > at

    def forget(self, cf: CachedFile) -> int:
        """Drop the incomplete blocks held for *cf* (purge); how many."""
        keys = [key for key in self._pending if key[0] == cf.row_id]
        for key in keys:
            del self._pending[key]
        return len(keys)

    def _bound(self) -> None:
        held = sum(len(p.buf) for p in self._pending.values())
        while held > MAX_PENDING:
            key = next(iter(self._pending))
            held -= len(self._pending.pop(key).buf)
            log.info("add-data: dropped an incomplete block held too long (block %d)", key[1])


def _sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def _taken_on_trust(cf: CachedFile, b: int) -> bool:
    """Whether block *b* is vouched for by no hash from the source."""
    return cf.hash_of(b) is None or (cf.trusted is not None and bool(cf.trusted[b]))
