"""Content information and the verify-before-serve policy.

Policy:

* Every block that arrives (from the backend or from add_data) is hashed
  with SHA-256 before it is stored.  Where the source publishes content
  information for the version (``Backend.content_info``), a block that does
  not match it is never stored; otherwise its hash is recorded, so later
  reads from the cache disk can be checked against it.
* Reads from the cache disk are checked according to ``verify``: ``once``
  (the first read of each block in this process; blocks stored in this
  process were checked on arrival), ``always``, or ``off`` (no hashing at
  all, no content information asked).  A block that fails is dropped and
  refetched, never served.
* The backend is asked for content information once per file version per
  process, before its first read, fetch or add_data (again later if the
  request failed); what it answered is kept in the index with the blocks.
  Adopted, it clears what was cached unchecked: every cached block is
  checked against it on its next read, and a RANGE_BEYOND_EOF seen before
  is forgotten (the content information says how long the file is).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from cachefs.contract import Backend, ContentInfo, ContentInfoSource
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import NO_HASH
from cachefs.engine.stats import Stats

log = logging.getLogger(__name__)

VERIFY_MODES = ("once", "always", "off")
UNKNOWN = b"\xff" * 32  # no block hashes to this (as good as never)


class Content:
    """What is known of the blocks' hashes, and when a block must be checked.

    *backend* is asked for content information only if it offers it
    (:class:`~cachefs.contract.ContentInfoSource`, checked once here).
    """

    def __init__(
        self, backend: Backend, catalog: Catalog, verify: str, encrypted: bool, stats: Stats
    ) -> None:
        self._source: Callable[[str], Awaitable[ContentInfo | None]] | None = (
            backend.content_info if isinstance(backend, ContentInfoSource) else None
        )
        self._catalog = catalog
        self.verify = verify
        self.hashing = verify != "off"
        self._encrypted = encrypted
        self._stats = stats
        self._asking: dict[int, trio.Event] = {}

    # -- content information ------------------------------------------------------------

    async def ensure_info(self, cf: CachedFile) -> None:
        """Ask the backend once for *cf*'s content information and adopt it if it fits."""
        if not self.hashing or cf.content_hash is not None or cf.info_asked:
            return
        if self._catalog.external_error is not None:
            return  # the storage is offline: ask when it is back
        asking = self._asking.get(cf.row_id)
        if asking is not None:
            await asking.wait()
            return
        asking = self._asking[cf.row_id] = trio.Event()
        try:
            info = await self._ask(cf)
            if info is not None and not cf.retired:
                self._adopt(cf, info)
        finally:
            del self._asking[cf.row_id]
            asking.set()

    async def _ask(self, cf: CachedFile) -> ContentInfo | None:
        """The usable content information of *cf*; info_asked once there is an answer."""
        ask = self._source
        if ask is None:
            cf.info_asked = True
            return None
        try:
            info = await ask(cf.file_id)
        except Exception as e:
            # Not an answer: the next read or fetch asks again.
            log.warning("content information of %s is not available: %s", cf.file_id, e)
            return None
        cf.info_asked = True
        if info is None:
            return None
        bs = self._catalog.block_size
        if info.block_size != bs:
            log.warning(
                "content information of %s has block size %d, the cache uses %d: not used"
                " (publish with --block-size %d)",
                cf.file_id,
                info.block_size,
                bs,
                bs,
            )
            return None
        if info.version != cf.version or info.size != cf.size:
            log.info("content information of %s is for another version: not used", cf.file_id)
            return None
        hashes = info.block_hashes
        if len(hashes) != -(-info.size // bs) or any(len(h) != 32 for h in hashes):
            log.warning("content information of %s is malformed: not used", cf.file_id)
            return None
        return info

    def _adopt(self, cf: CachedFile, info: ContentInfo) -> None:
        cf.hashes = bytearray(b"".join(info.block_hashes))
        cf.content_hash = info.content_hash
        cf.trusted = None  # the source's word replaces the owner's
        cf.verified = None  # what is cached is checked against it on its next read
        cf.unhashed = None  # nothing left to hash: the source's hashes are the authority
        cf.zero_from = None  # the backend's early EOF, if any, is not believed
        self._catalog.dirty.add(cf)

    # -- blocks arriving -----------------------------------------------------------------

    def expected(self, cf: CachedFile, first: int, last: int) -> bytes | None:
        """The authoritative hashes of blocks first..last (content information), or None."""
        if cf.content_hash is None or cf.hashes is None:
            return None
        return bytes(cf.hashes[32 * first : 32 * (last + 1)])

    def may_defer(self, expected: bytes | None) -> bool:
        """Whether blocks arriving may be hashed later (engine/miss/hasher.py).

        Only with ``verify once``, plain, and no content information to
        compare them with: then nothing in this process needs their hash.
        """
        return self.verify == "once" and not self._encrypted and expected is None

    def note_origin(self, cf: CachedFile, first: int, count: int, trusted: bool) -> None:
        """Blocks first.. (count) were stored from the source, or from
        add-data taken on trust (their hash then vouches for nothing)."""
        if cf.content_hash is not None or (cf.trusted is None and not trusted):
            return
        if cf.trusted is None:
            cf.trusted = bytearray(len(cf.present))
        cf.trusted[first : first + count] = (b"\x01" if trusted else b"\x00") * count

    def forget_trusted(self, cf: CachedFile) -> None:
        """The hashes of trusted blocks no longer present are dropped (purge)."""
        t, hashes = cf.trusted, cf.hashes
        if t is None or hashes is None:
            return
        b = t.find(1)
        while b >= 0:
            if not cf.present[b]:
                hashes[32 * b : 32 * b + 32] = NO_HASH
                t[b] = 0
            b = t.find(1, b + 1)
        if t.find(1) < 0:
            cf.trusted = None
        self._catalog.dirty.add(cf)

    def record_unhashed(self, cf: CachedFile, first: int, count: int) -> None:
        """Blocks from *first* were stored from the source, hash to come: verified."""
        if cf.verified is None:
            cf.verified = bytearray(len(cf.present))
        cf.verified[first : first + count] = b"\x01" * count

    def record(self, cf: CachedFile, first: int, hashes: list[bytes]) -> None:
        """Blocks from *first* were stored with these hashes: they count as verified."""
        n = len(cf.present)
        if cf.verified is None:
            cf.verified = bytearray(n)
        if not hashes:
            return
        cf.verified[first : first + len(hashes)] = b"\x01" * len(hashes)
        if cf.content_hash is None:
            if cf.hashes is None:
                cf.hashes = bytearray(32 * n)
            cf.hashes[32 * first : 32 * (first + len(hashes))] = b"".join(hashes)

    # -- blocks read back ------------------------------------------------------------------

    def must_check(self, cf: CachedFile, first: int, last: int) -> bool:
        """Whether a read of blocks first..last goes through :meth:`to_check` (hot path)."""
        if self._encrypted:
            return True
        if not self.hashing:
            return False
        if self.verify == "always":
            return True
        v = cf.verified
        return v is None or v.find(0, first, last + 1) >= 0

    def to_check(self, cf: CachedFile, first: int, last: int) -> bytes | None:
        """What to compare blocks first..last with, 32 bytes each, or None.

        Zeros: no check (verified in this process).  A block with no hash
        at all (cached while verification was off, or a bitmap that claims
        more than was stored) gets one that cannot match: it is refetched.
        """
        if not self.hashing:
            return None
        n = last - first + 1
        hashes = cf.hashes
        want = (
            bytearray(32 * n) if hashes is None else bytearray(hashes[32 * first : 32 * (last + 1)])
        )
        v = cf.verified if self.verify == "once" else None
        for i in range(n):
            if v is not None and v[first + i]:
                want[32 * i : 32 * i + 32] = NO_HASH
            elif want[32 * i : 32 * i + 32] == NO_HASH:
                want[32 * i : 32 * i + 32] = UNKNOWN
        return None if want.count(0) == len(want) else bytes(want)

    def passed(self, cf: CachedFile, first: int, last: int) -> None:
        if not self.hashing:
            return
        if cf.verified is None:
            cf.verified = bytearray(len(cf.present))
        cf.verified[first : last + 1] = b"\x01" * (last - first + 1)

    def failed(self, cf: CachedFile, blocks: Iterable[int]) -> None:
        """Blocks read back from the cache disk did not check out: drop them."""
        for b in blocks:
            self._stats.corrupt_in_cache += 1
            log.warning(
                "cached block %d of %s is damaged: dropped, fetching it again", b, cf.file_id
            )
            self._catalog.unmark(cf, b)
            if cf.verified is not None:
                cf.verified[b] = 0
            if cf.content_hash is None and cf.hashes is not None:
                cf.hashes[32 * b : 32 * b + 32] = NO_HASH
                if cf.trusted is not None:
                    cf.trusted[b] = 0
