"""The hosted cache: blocks named by their SHA-256, in a blob store the group shares.

Policy:

- A block is the object ``blocks/<sha256 hex>``: identical blocks of any
  file or version are stored once.
- ``fetch`` answers a block's bytes only if they hash to the name asked
  for and have the length expected; anything else is None ("not from
  here": the caller goes to the origin).  A block with other bytes is
  counted (``rejected_blocks``) and reported once per name; it is never
  served nor cached.  ``fetch`` never raises and never waits longer than
  ``fetch_deadline``.
- Down: a failure or a deadline passed marks the store down for a backoff
  (1 s, doubling up to 30 s).  While it is down, fetches answer None at
  once and offers are dropped; after the backoff one request at a time
  tries it again, and a success ends it.  A fetch that waited for one of
  this process's FETCHES slots rather than for the store does not count
  against it.
- Offers are queued without waiting: the queue holds at most
  ``queue_bytes`` bytes, past that an offer is dropped (counted); a few
  uploaders empty it, each block hashed in a worker thread (its expected
  hash, when given, must match or it is not uploaded), skipped when it is
  known to be there (fetched from or uploaded to the store in this
  process, or ``has_blob`` says so), else uploaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from cachefs.contract import BlobStore

log = logging.getLogger(__name__)

FETCH_DEADLINE = 3.0
OFFER_DEADLINE = 30.0
QUEUE_BYTES = 64 << 20
UPLOADERS = 4
FETCHES = 16
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
KNOWN = 65536  # names remembered as present
REPORTED = 4096  # names remembered as reported bad

#: Told the hash of an offered block once an uploader hashed it.
OnHashed = Callable[[bytes], None]


def block_name(digest: bytes) -> str:
    return f"blocks/{digest.hex()}"


@dataclass(slots=True)
class HostedCounters:
    hits: int = 0
    misses: int = 0
    bytes: int = 0
    errors: int = 0
    rejected_blocks: int = 0
    offered: int = 0
    uploaded: int = 0
    already_there: int = 0
    dropped_offers: int = 0
    mismatched_offers: int = 0


@dataclass(slots=True)
class _Offer:
    data: bytes
    expected: bytes | None
    on_hashed: OnHashed | None


class HostedCache:
    """Verified reads from, and background offers to, the group's blob store."""

    def __init__(
        self,
        store: BlobStore,
        url: str,
        *,
        fetch_deadline: float = FETCH_DEADLINE,
        queue_bytes: int = QUEUE_BYTES,
        uploaders: int = UPLOADERS,
    ) -> None:
        self.store = store
        self.url = url
        self._counters = HostedCounters()
        self._deadline = fetch_deadline
        self._queue_limit = queue_bytes
        self._uploaders = uploaders
        self.queue_bytes = 0
        self._send, self._receive = trio.open_memory_channel[_Offer](1 << 20)
        self._fetches = trio.CapacityLimiter(FETCHES)
        self._known: OrderedDict[bytes, None] = OrderedDict()
        self._uploading: set[bytes] = set()  # at most one upload per name at a time
        self._reported: OrderedDict[bytes, None] = OrderedDict()
        self._down_until = 0.0
        self._backoff = BACKOFF_FIRST
        self._probing = False
        #: why the store is down, None while it answers
        self.down: str | None = None

    def statistics(self) -> HostedCounters:
        """A copy of the counters."""
        return dataclasses.replace(self._counters)

    # -- up and down -----------------------------------------------------------------

    def usable(self) -> bool:
        """False while the store is down and its backoff has not passed, and
        while one request tries whether it is back (one at a time)."""
        if self.down is None:
            return True
        return not self._probing and trio.current_time() >= self._down_until

    def _failed(self, why: str) -> None:
        self._counters.errors += 1
        now = trio.current_time()
        if self.down is None:
            log.warning("hosted cache %s is down (%s): reading from the origin", self.url, why)
        elif now < self._down_until:
            return  # a try made before the outage was seen: the same retry, no longer backoff
        else:
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self.down = why
        self._down_until = now + self._backoff

    def _answered(self) -> None:
        if self.down is not None:
            log.info("hosted cache %s answers again", self.url)
        self.down = None
        self._backoff = BACKOFF_FIRST

    def _remember(self, digest: bytes) -> None:
        known = self._known
        known[digest] = None
        known.move_to_end(digest)
        if len(known) > KNOWN:
            known.popitem(last=False)

    # -- reads -----------------------------------------------------------------------

    async def fetch(self, digest: bytes, length: int) -> bytes | None:
        """The block named *digest*, *length* bytes long and checked; None otherwise."""
        if not self.usable():
            return None
        probe = self._probing = self.down is not None
        try:
            return await self._fetch(digest, length)
        finally:
            if probe:
                self._probing = False

    async def _fetch(self, digest: bytes, length: int) -> bytes | None:
        name = block_name(digest)
        data: bytes | None = None
        asked = False
        with trio.move_on_after(self._deadline) as scope:
            async with self._fetches:
                asked = True
                try:
                    data = await self.store.get_blob(name, length)
                except OSError as e:
                    self._failed(str(e))
                    return None
        if scope.cancelled_caught:
            if asked:  # the store was too slow; else too many fetches here: not its fault
                self._failed(f"no answer within {self._deadline:g} s")
            return None
        self._answered()
        if data is None:
            self._counters.misses += 1
            self._known.pop(digest, None)  # deleted meanwhile (a lifecycle rule): offer it again
            return None
        if len(data) != length or await trio.to_thread.run_sync(_sha256, data) != digest:
            self._counters.rejected_blocks += 1
            if digest not in self._reported:
                self._reported[digest] = None
                if len(self._reported) > REPORTED:
                    self._reported.popitem(last=False)
                log.warning(
                    "hosted cache %s: %s holds other bytes than its name says: not used,"
                    " reading the origin",
                    self.url,
                    name,
                )
            return None
        self._counters.hits += 1
        self._counters.bytes += length
        self._remember(digest)
        return data

    # -- offers ----------------------------------------------------------------------

    def offer_nowait(
        self,
        data: bytes | memoryview,
        expected: bytes | None = None,
        on_hashed: OnHashed | None = None,
    ) -> bool:
        """Queue a copy of *data* (a whole block) for upload, copied only when
        it is queued; False if dropped (queue full, or the store down).  *on_hashed* is told
        its hash once an uploader computed it (not when *expected* is known
        to be there already)."""
        self._counters.offered += 1
        if expected is not None and expected in self._known:
            self._counters.already_there += 1
            return True
        if not self.usable() or self.queue_bytes + len(data) > self._queue_limit:
            self._counters.dropped_offers += 1
            return False
        self.queue_bytes += len(data)
        self._send.send_nowait(_Offer(bytes(data), expected, on_hashed))
        return True

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the uploaders until cancelled."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._uploaders):
                nursery.start_soon(self._upload_loop)
            task_status.started()

    async def _upload_loop(self) -> None:
        async for offer in self._receive:
            try:
                await self._upload(offer)
            finally:
                self.queue_bytes -= len(offer.data)

    async def _upload(self, offer: _Offer) -> None:
        digest = await trio.to_thread.run_sync(_sha256, offer.data)
        if offer.expected is not None and digest != offer.expected:
            self._counters.mismatched_offers += 1
            if self._counters.mismatched_offers == 1:
                log.warning(
                    "an offered block does not match its content information: not uploaded"
                    " (counted as mismatched_offers; this is said once)"
                )
            return
        if offer.on_hashed is not None:
            offer.on_hashed(digest)
        if digest in self._known or digest in self._uploading:
            self._counters.already_there += 1  # or about to be: not uploaded twice
            return
        if not self.usable():
            self._counters.dropped_offers += 1
            return
        probe = self._probing = self.down is not None
        self._uploading.add(digest)
        try:
            await self._put(digest, offer.data)
        finally:
            self._uploading.discard(digest)
            if probe:
                self._probing = False

    async def _put(self, digest: bytes, data: bytes) -> None:
        name = block_name(digest)
        with trio.move_on_after(OFFER_DEADLINE) as scope:
            try:
                if await self.store.has_blob(name):
                    self._counters.already_there += 1
                else:
                    await self.store.put_blob(name, data)
                    self._counters.uploaded += 1
            except OSError as e:
                self._failed(str(e))
                self._counters.dropped_offers += 1
                return
        if scope.cancelled_caught:
            self._failed(f"an upload took more than {OFFER_DEADLINE:g} s")
            self._counters.dropped_offers += 1
            return
        self._answered()
        self._remember(digest)

    async def aclose(self) -> None:
        await self.store.aclose()


def _sha256(data: bytes | memoryview) -> bytes:
    return hashlib.sha256(data).digest()
