"""Fetching one run of blocks: the ReadData calls and how results are handled.

Result codes, as the cache reacts (README has the table):
SUCCESS caches what arrived; PARTIAL asks for the rest (three empty PARTIALs
in a row count as one FAILURE); RANGE_BEYOND_EOF zeroes the tail and never
asks past it again (for this version); FILE_MODIFIED_EXTERNALLY ends the
version (the caller drops it: its handles fail, new opens re-stat);
FILE_MODIFIED_LOCALLY re-plans; FAILURE retries with exponential backoff;
FILE_FAILURE latches the file; PERMANENT_FAILURE latches the storage.
Bytes that do not match the file's content information are not stored and
count as a FAILURE (retried, then EIO).

Every call is pinned to one version (``ReadData.version``) and made through
that version's own backend context, so a context opened on one version
(a local file's inode) is never moved to another.  A version no longer
current (retired) is read without storing: into the reader's buffer only.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
from typing import TYPE_CHECKING, Any

import trio

from cachefs._linux.hugepages import anonymous
from cachefs.contract import ReadData, RWResult
from cachefs.engine.attrs import denied
from cachefs.engine.miss.transfers import Kind, Transfer
from cachefs.engine.state.disk import DiskError
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import NO_HASH
from cachefs.errors import (
    CacheDiskFailed,
    CorruptData,
    FileQuarantined,
    ReadFailed,
    StorageQuarantined,
    TransientFailure,
)

if TYPE_CHECKING:
    from cachefs.engine.filecache import FileCache

log = logging.getLogger(__name__)

# Empty PARTIAL answers in a row that count as one FAILURE.
EMPTY_PARTIALS = 3


class Modified(Exception):
    """The backend no longer has this version: drop it; its readers fail."""


class Replan(Exception):
    """Stop this transfer and plan the read again against the current view."""


class Fetch:
    """Blocks first..last being fetched by one reader; others wait on ``done``.

    ``data`` holds the bytes from ``data_at`` to the end of the run when
    they could not be stored (the cache disk failed): its readers are
    served from it.
    """

    __slots__ = ("first", "last", "done", "error", "data", "data_at")

    def __init__(self, first: int, last: int) -> None:
        self.first = first
        self.last = last
        self.done = trio.Event()
        self.error: BaseException | None = None
        self.data: bytes | None = None
        self.data_at = 0

    def serves(self, offset: int, end: int) -> memoryview | None:
        """Bytes [offset, end) from ``data``, if it holds all of them."""
        data = self.data
        if data is None or offset < self.data_at or end > self.data_at + len(data):
            return None
        return memoryview(data)[offset - self.data_at : end - self.data_at]

    def finish(self, cf: CachedFile) -> None:
        cf.unhold(self.first, self.last, self)
        self.done.set()

    def raise_error(self) -> None:
        """In a waiter: fail like the fetcher did, or re-plan."""
        e = self.error
        if isinstance(e, ReadFailed):
            raise type(e)(str(e))
        if e is not None:
            raise Replan


class Buffers:
    """The fetch buffers: page-aligned, *size* bytes each, reused.

    A fresh buffer per fetch cost more than its bytes were worth: zeroed
    memory the kernel must find and clear for every byte read (cold seq 1
    MiB, A/B in the same minutes: 600-720 MiB/s and 2.0-2.4 s of CPU per GiB
    with a fresh mapping per fetch, 760-1,080 MiB/s and 1.3-1.8 s reused).
    Page alignment lets a local source read straight into them (O_DIRECT),
    and huge pages let the disk take such a read in few segments (see
    :mod:`cachefs._linux.hugepages`).

    At most one buffer per fetch in flight is kept (fetches are bounded by
    the fetch limiter); :meth:`trim`, called periodically, gives them all
    back once a whole period went by without a fetch.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._taken = False

    def take(self) -> mmap.mmap:
        self._taken = True
        if self._free:
            return self._free.pop()
        return anonymous(self.size)

    def give(self, buf: mmap.mmap) -> None:
        """Only once nothing can write into *buf* any more."""
        self._free.append(buf)

    def trim(self) -> None:
        """Let the kept buffers go if none was taken since the last trim.

        Dropped, not closed: a view of one that a backend kept (a trace, a
        test) keeps it mapped until that view goes too.
        """
        if not self._taken:
            self._free.clear()
        self._taken = False

    @property
    def kept(self) -> int:
        return len(self._free)


class FetchRunner:
    """Runs ReadData calls for the engine; owns the backend's file contexts,
    one per (file id, version)."""

    def __init__(self, cache: FileCache) -> None:
        self._cache = cache
        self._contexts: dict[tuple[str, str], Any] = {}
        self.buffers = Buffers(cache.max_fetch)

    def check_latches(self, cf: CachedFile) -> None:
        external = self._cache.catalog.external_error
        if external is not None:
            raise StorageQuarantined(f"{cf.file_id}: storage is offline: {external}")
        if cf.error is not None:
            raise FileQuarantined(
                f"{cf.file_id}: quarantined after {cf.error} (cachefs reset-file-errors lifts it)"
            )

    async def call(self, req: ReadData) -> tuple[RWResult, int]:
        """One ReadData call; a raising or lying backend answers FAILURE, 0 bytes."""
        c = self._cache
        c.counters["read_data_calls"] += 1
        try:
            await c.backend.read_data(req)
        except Exception:
            log.exception(
                "backend raised on ReadData(%s, position %d, %d bytes): treated as FAILURE",
                req.file_id,
                req.position,
                req.bytes_to_read,
            )
            return RWResult.FAILURE, 0
        n = req.bytes_read
        try:
            rc = RWResult(req.result_code)
        except ValueError:
            log.error("backend set unknown result code %r: treated as FAILURE", req.result_code)
            return RWResult.FAILURE, 0
        if type(n) is not int or not 0 <= n <= req.bytes_to_read:
            log.error(
                "backend bug: bytes_read %r for bytes_to_read %d on %s: treated as FAILURE",
                n,
                req.bytes_to_read,
                req.file_id,
            )
            return RWResult.FAILURE, 0
        if rc in (RWResult.SUCCESS, RWResult.PARTIAL, RWResult.RANGE_BEYOND_EOF):
            c.counters["bytes_from_backend"] += n
            return rc, n
        return rc, 0

    def context_of(self, cf: CachedFile) -> tuple[Any] | None:
        """(context,) when the backend has *cf*'s version open, else None."""
        key = (cf.file_id, cf.version)
        if key in self._contexts:
            return (self._contexts[key],)
        return None

    async def _context(self, cf: CachedFile) -> Any:
        contexts, key = self._contexts, (cf.file_id, cf.version)
        if key in contexts:
            return contexts[key]
        ctx = await self._cache.backend.open_file(cf.file_id)
        if key in contexts:  # another reader opened it meanwhile
            await self._close(cf.file_id, ctx)
        else:
            contexts[key] = ctx
        return contexts[key]

    async def close_context(self, file_id: str, version: str) -> None:
        contexts = self._contexts
        if (file_id, version) in contexts:
            await self._close(file_id, contexts.pop((file_id, version)))

    async def close_all_contexts(self) -> None:
        for file_id, version in list(self._contexts):
            with trio.move_on_after(5):
                await self.close_context(file_id, version)

    async def _close(self, file_id: str, ctx: Any) -> None:
        try:
            await self._cache.backend.close_file(file_id, ctx)
        except Exception as e:
            log.warning("backend close_file(%s) failed: %s", file_id, e)

    async def ensure(
        self, cf: CachedFile, first: int, last: int, transfer: Transfer
    ) -> list[Fetch]:
        """Make blocks first..last of *cf* present, fetching what no one else fetches.

        Returns the fetches of the range whose bytes could not be stored
        (they hold them: :meth:`Fetch.serves`); empty when every block is
        present.  Raises Modified / Replan for the caller to re-plan,
        ReadFailed to fail.
        """
        bs = self._cache.config.block_size
        limit = max(1, self._cache.max_fetch // bs)
        while True:
            if cf.retired:
                raise Replan
            b = cf.present.find(0, first, last + 1)
            if b < 0:
                return []
            self.check_latches(cf)
            runs: list[tuple[int, int]] = []
            waits: list[Fetch] = []
            while b <= last:
                if cf.present[b]:
                    b += 1
                elif (f := cf.busy(b)) is not None:
                    if not waits or waits[-1] is not f:
                        waits.append(f)
                    b += 1
                else:
                    s = b
                    while b <= last and b - s < limit and not cf.present[b]:
                        if cf.busy(b) is not None:
                            break
                        b += 1
                    runs.append((s, b - 1))
            if runs:
                if transfer.kind is Kind.RANDOM:
                    transfer.last_block = runs[-1][1]
                else:
                    transfer.last_block = max(runs[-1][1], cf.present.rfind(0, first))
            fetches = [Fetch(s, e) for s, e in runs]
            for f in fetches:
                cf.hold(f.first, f.last, f)
            # Held until the whole range is in: a reader's blocks are not
            # evicted between two of its runs (that could go on forever).
            try:
                for f in fetches:
                    await self.run(cf, f, transfer)
            finally:
                for f in fetches:
                    f.finish(cf)
            for f in waits:
                await f.done.wait()
                f.raise_error()
            unstored = [f for f in (*fetches, *waits) if f.data is not None]
            if unstored:
                return unstored

    async def fetch_whole(self, cf: CachedFile, transfer: Transfer) -> None:
        """One pass over every missing block of *cf*, max_fetches runs at a time."""
        c = self._cache
        per = max(1, c.max_fetch // c.config.block_size)
        last = len(cf.present) - 1
        chunks = iter(
            (a, min(last, a + per - 1))
            for a in range(0, last + 1, per)
            if cf.present.find(0, a, min(last, a + per - 1) + 1) >= 0
        )

        async def worker() -> None:
            for first, end in chunks:  # shared: each chunk goes to one worker
                if await self.ensure(cf, first, end, transfer):
                    raise c.disk.failure()  # fetched, but it cannot be kept

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(c.config.max_fetches):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def run(self, cf: CachedFile, fetch: Fetch, transfer: Transfer) -> None:
        """Fetch blocks fetch.first..fetch.last; at most max_fetches runs at once."""
        try:
            async with self._cache.fetch_limiter:
                await self._run(cf, fetch, transfer)
        except trio.Cancelled:
            raise
        except BaseException as e:
            fetch.error = e
            raise

    async def _run(self, cf: CachedFile, fetch: Fetch, transfer: Transfer) -> None:
        c = self._cache
        await c.content.ensure_info(cf)
        bs = c.config.block_size
        start = fetch.first * bs
        stop = min((fetch.last + 1) * bs, cf.size)
        buf = self.buffers.take()
        view = memoryview(buf)[: stop - start]
        unstored = await self._fill(cf, transfer, view, start, stop, store=True)
        if unstored < stop:
            fetch.data, fetch.data_at = bytes(view[unstored - start :]), unstored
        # Not on an exception: a backend call cut short may still hold it.
        self.buffers.give(buf)

    async def fetch_uncached(
        self, cf: CachedFile, transfer: Transfer, view: memoryview, start: int
    ) -> None:
        """Fetch [start, start + len(view)) of *cf* into *view*, storing nothing
        (a retired version, or a cache disk that failed).  Checked against
        content information where the range holds whole blocks."""
        async with self._cache.fetch_limiter:
            await self._fill(cf, transfer, view, start, start + len(view), store=False)

    async def _fill(
        self,
        cf: CachedFile,
        transfer: Transfer,
        view: memoryview,
        start: int,
        stop: int,
        store: bool,
    ) -> int:
        """Fetch [start, stop) of *cf* through *view*, block by block, storing
        each block unless *store* is False.  Returns where the stored bytes
        end: *stop*, or less when the cache disk failed (the rest is in
        *view*, checked like what is not stored)."""
        c = self._cache
        cat = c.catalog
        cfg = c.config
        bs = cfg.block_size
        pos = written = start
        unstored = stop if store else start
        failures = empty = corrupt = 0
        while pos < stop:
            self.check_latches(cf)
            if store and cf.retired:
                raise Replan
            if cf.zero_from is not None and pos >= cf.zero_from:
                # Known to read as zeros: the backend is not asked again.
                view[pos - start :] = bytes(stop - pos)
                rc, n = RWResult.SUCCESS, stop - pos
            else:
                rc, n = await self._call_for(cf, transfer, view[pos - start :], pos, stop)
                transfer.position = pos + n
            want = stop - pos
            if rc is RWResult.SUCCESS and n < want:
                rc = RWResult.PARTIAL
            if rc is RWResult.PARTIAL and n == want:
                rc = RWResult.SUCCESS
            if rc is RWResult.PARTIAL:
                empty = empty + 1 if n == 0 else 0
                if empty >= EMPTY_PARTIALS:
                    rc, empty = RWResult.FAILURE, 0
            pos += n
            if rc is RWResult.RANGE_BEYOND_EOF and cf.content_hash is not None:
                # The content information says the data is there: a backend
                # error, not the end of the file.
                log.warning(
                    "%s: RANGE_BEYOND_EOF at %d contradicts its content information",
                    cf.file_id,
                    pos,
                )
                rc = RWResult.FAILURE
            if rc is RWResult.RANGE_BEYOND_EOF:
                view[pos - start :] = bytes(stop - pos)
                cf.zero_from = pos if cf.zero_from is None else min(cf.zero_from, pos)
                cat.dirty.add(cf)
                pos = stop
            elif rc is RWResult.FILE_MODIFIED_EXTERNALLY:
                raise Modified
            elif rc is RWResult.FILE_MODIFIED_LOCALLY:
                raise Replan
            elif rc is RWResult.FILE_FAILURE:
                cf.error = f"FILE_FAILURE at offset {pos}"
                cat.dirty.add(cf)
                await c.commit_if_usable()
                self.check_latches(cf)
            elif rc is RWResult.PERMANENT_FAILURE:
                cat.external_error = f"PERMANENT_FAILURE reading {cf.file_id} at offset {pos}"
                await c.commit_if_usable()
                self.check_latches(cf)
            elif rc is RWResult.FAILURE:
                failures += 1
                if failures > cfg.retries:
                    raise TransientFailure(
                        f"{cf.file_id}: backend failed {failures} times at offset {pos}"
                    )
                await trio.sleep(min(cfg.retry_delay * 2 ** (failures - 1), cfg.retry_max_delay))
            complete = stop if pos >= stop else pos - pos % bs
            if complete > written:
                chunk = view[written - start : complete - start]
                if store:
                    try:
                        stored = await self.store(cf, written, chunk)
                    except CacheDiskFailed:
                        # The bytes are in hand: checked, they serve this
                        # fetch's readers from its buffer (Fetch.data).
                        store, unstored = False, written
                if not store:
                    stored = await self._check(cf, written, chunk)
                if stored < complete:
                    c.counters["corrupt_from_backend"] += 1
                    corrupt += 1
                    log.warning(
                        "block %d of %s from the backend does not match its content information",
                        stored // bs,
                        cf.file_id,
                    )
                    if corrupt > cfg.retries:
                        raise CorruptData(
                            f"{cf.file_id}: the backend returned damaged data"
                            f" {corrupt} times at offset {stored}"
                        )
                    pos = stored
                    await trio.sleep(min(cfg.retry_delay * 2 ** (corrupt - 1), cfg.retry_max_delay))
                written = stored
        return unstored

    async def _call_for(
        self, cf: CachedFile, transfer: Transfer, buffer: memoryview, pos: int, stop: int
    ) -> tuple[RWResult, int]:
        """One ReadData call for [pos, stop) (stopping short of known zeros)."""
        bs = self._cache.config.block_size
        if cf.zero_from is not None:
            stop = min(stop, cf.zero_from)
        try:
            ctx = await self._context(cf)
        except FileNotFoundError:
            raise Modified from None
        except PermissionError as e:  # its mode or owner: retrying will not help
            raise denied(cf.file_id, e) from None
        except Exception as e:
            log.warning("backend open_file(%s) failed: %s", cf.file_id, e)
            return RWResult.FAILURE, 0
        transfer.position = pos
        req = ReadData(
            file_id=cf.file_id,
            size=cf.size,
            position=pos,
            flags=transfer.flags_for((stop - 1) // bs),
            buffer=buffer[: stop - pos],
            bytes_to_read=stop - pos,
            file_context=ctx,
            version=cf.version,
        )
        rc, n = await self.call(req)
        if rc is RWResult.SUCCESS and n == stop - pos and len(buffer) > n:
            rc = RWResult.PARTIAL  # the rest is known zeros: the loop fills it
        return rc, n

    async def store(
        self, cf: CachedFile, offset: int, data: memoryview, trusted: bool = False
    ) -> int:
        """Check and write whole blocks at *offset*, then mark them present.

        Returns where the stored bytes end: short of ``offset + len(data)``
        when a block did not match the content information (it and the
        blocks after it are not stored).  CacheDiskFailed when the cache
        disk fails (or failed before): nothing more is marked.
        """
        c = self._cache
        if not c.disk.usable:
            raise c.disk.failure()
        try:
            return await self._store(cf, offset, data, trusted)
        except DiskError as e:
            raise c.disk.failed("storing fetched blocks", e) from None

    async def _store(self, cf: CachedFile, offset: int, data: memoryview, trusted: bool) -> int:
        c = self._cache
        cat = c.catalog
        bs = c.config.block_size
        first, last = offset // bs, (offset + len(data) - 1) // bs
        assert cf.data is not None
        await c.evictor.make_room(len(data))
        expected = c.content.expected(cf, first, last)
        # Hashed later, off this path, when nothing here needs the hash and
        # the hasher has room (engine/hasher.py).
        defer = c.content.hashing and c.content.may_defer(expected) and c.hasher.reserve()
        try:
            hashes, n = await cf.data.write_blocks(
                first, data, expected, c.content.hashing and not defer, c.disk_limiter
            )
            if cf.retired:
                raise Replan
            done = -(-n // bs)
            if defer:
                c.content.record_unhashed(cf, first, done)
                c.hasher.submit(cf, first, done)
                defer = False  # the reservation is used
            else:
                c.content.record(cf, first, hashes)
            c.content.note_origin(cf, first, done, trusted)
            for b in range(first, first + done):
                cat.mark(cf, b)
            if done and cf.present.find(0) < 0:
                c.commit_soon()  # synced, it may be read by the kernel itself
        finally:
            if defer:
                c.hasher.release()
            c.evictor.settle(len(data))
        cat.note_written(cf)
        return offset + n

    async def _check(self, cf: CachedFile, offset: int, data: memoryview) -> int:
        """Like :meth:`store` for bytes that are not stored: where the blocks
        that match the content information end (all of them without it)."""
        c = self._cache
        bs = c.config.block_size
        expected = c.content.expected(cf, offset // bs, (offset + len(data) - 1) // bs)
        if expected is None:
            return offset + len(data)
        good = await trio.to_thread.run_sync(
            matching_prefix, data, expected, bs, limiter=c.disk_limiter
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


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a nursery's group that is not a cancellation."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            e = first_error(e)
        if not isinstance(e, trio.Cancelled):
            return e
    return group.exceptions[0]
