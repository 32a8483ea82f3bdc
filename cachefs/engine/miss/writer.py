"""Storing fetched or supplied blocks: room made, checked, written, marked.

Policy: whole blocks only.  Each block is checked against the content
information where there is some (a block that does not match is not
stored, nor any after it in the run); its hash is recorded, or left to the
hasher when nothing in this process needs it and the file is not smaller
than a block (miss/hasher.py).  A block is
marked present only once its bytes are written, and a file that becomes
whole is committed soon (its data synced), so the kernel may read it by
itself.  The bytes of a cache disk that failed are checked the same way
but not stored.
"""

from __future__ import annotations

import hashlib

import trio

from cachefs.engine.miss.hasher import Hasher
from cachefs.engine.policy.content import Content
from cachefs.engine.policy.evict import Evictor
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.commits import Committer
from cachefs.engine.state.disk import CacheDisk, DiskError
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.inflight import Replan
from cachefs.engine.state.store import NO_HASH
from cachefs.errors import CacheDiskFailed


class BlockWriter:
    """Writes whole blocks into their version's data file."""

    def __init__(
        self,
        catalog: Catalog,
        content: Content,
        room: Evictor,
        hasher: Hasher,
        disk: CacheDisk,
        committer: Committer,
        disk_limiter: trio.CapacityLimiter,
    ) -> None:
        self._catalog = catalog
        self._content = content
        self._room = room
        self._hasher = hasher
        self._disk = disk
        self._committer = committer
        self._disk_limiter = disk_limiter
        self.block_size = catalog.block_size

    def refused(self) -> CacheDiskFailed:
        """The error for blocks that were fetched but cannot be kept."""
        return self._disk.failure()

    async def store(
        self, cf: CachedFile, offset: int, data: memoryview, trusted: bool = False
    ) -> int:
        """Check and write whole blocks at *offset*, then mark them present.

        Returns where the stored bytes end: short of ``offset + len(data)``
        when a block did not match the content information (it and the
        blocks after it are not stored).  CacheDiskFailed when the cache
        disk fails (or failed before): nothing more is marked.  Replan when
        the version was retired meanwhile.  *trusted*: the bytes came from
        add-data on trust (their hash vouches for nothing).
        """
        disk = self._disk
        if not disk.usable:
            raise disk.failure()
        try:
            return await self._store(cf, offset, data, trusted)
        except DiskError as e:
            raise disk.failed("storing fetched blocks", e) from None

    async def _store(self, cf: CachedFile, offset: int, data: memoryview, trusted: bool) -> int:
        cat, content, hasher = self._catalog, self._content, self._hasher
        bs = self.block_size
        first, last = offset // bs, (offset + len(data) - 1) // bs
        assert cf.data is not None
        await self._room.make_room(len(data))
        expected = content.expected(cf, first, last)
        # Hashed later, off this path, when nothing here needs the hash and
        # the hasher has room (miss/hasher.py); a file smaller than a block
        # is hashed in the job that writes it: its hash costs less than a
        # second job would.
        defer = (
            content.hashing and cf.size >= bs and content.may_defer(expected) and hasher.reserve()
        )
        try:
            hashes, n = await cf.data.write_blocks(
                first, data, expected, content.hashing and not defer, self._disk_limiter
            )
            if cf.retired:
                raise Replan
            done = -(-n // bs)
            if defer:
                content.record_unhashed(cf, first, done)
                hasher.submit(cf, first, done)
                defer = False  # the reservation is used
            else:
                content.record(cf, first, hashes)
            content.note_origin(cf, first, done, trusted)
            for b in range(first, first + done):
                cat.mark(cf, b)
            if done and cf.present.find(0) < 0:
                self._committer.commit_soon()  # synced, it may be read by the kernel itself
        finally:
            if defer:
                hasher.release()
            self._room.settle(len(data))
        cat.note_written(cf)
        return offset + n

    async def check(self, cf: CachedFile, offset: int, data: memoryview) -> int:
        """Like :meth:`store` for bytes that are not stored: where the blocks
        that match the content information end (all of them without it)."""
        bs = self.block_size
        expected = self._content.expected(cf, offset // bs, (offset + len(data) - 1) // bs)
        if expected is None:
            return offset + len(data)
        good = await trio.to_thread.run_sync(
            matching_prefix, data, expected, bs, limiter=self._disk_limiter
        )
        return offset + good


def matching_prefix(data: memoryview, expected: bytes, block_size: int) -> int:
    """How many bytes of *data*, block by block, match the SHA-256 hashes in
    *expected* (32 bytes per block; zeros: unknown, taken as matching)."""
    for i, at in enumerate(range(0, len(data), block_size)):
        want = expected[32 * i : 32 * i + 32]
        if want != NO_HASH and hashlib.sha256(data[at : at + block_size]).digest() != want:
            return at
    return len(data)
