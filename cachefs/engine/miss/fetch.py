"""Fetching one run of blocks: the ReadData calls and how results are handled.

Result codes, as the cache reacts (docs/contract.md has the table):
SUCCESS caches what arrived; PARTIAL asks for the rest (three empty PARTIALs
in a row count as one FAILURE); RANGE_BEYOND_EOF zeroes the tail and never
asks past it again (for this version); FILE_MODIFIED_EXTERNALLY ends the
version (the caller drops it: its handles fail, new opens re-stat);
FILE_MODIFIED_LOCALLY re-plans; FAILURE retries with exponential backoff;
FILE_FAILURE latches the file; PERMANENT_FAILURE latches the storage.
Bytes that do not match the file's content information are not stored and
count as a FAILURE (retried, then EIO).

Calls go through :class:`~cachefs.engine.miss.source.Source` (one backend
context per version), blocks into the cache through
:class:`~cachefs.engine.miss.writer.BlockWriter`.  A version no longer
current (retired) is read without storing: into the reader's buffer only.
"""

from __future__ import annotations

import logging

import trio

from cachefs.contract import ReadData, RWResult
from cachefs.engine.attrs import denied
from cachefs.engine.config import CacheConfig
from cachefs.engine.miss.buffers import Buffers
from cachefs.engine.miss.source import Source
from cachefs.engine.miss.transfers import Kind, Transfer
from cachefs.engine.miss.writer import BlockWriter
from cachefs.engine.policy.content import Content
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.inflight import Fetch, Replan
from cachefs.engine.stats import Stats
from cachefs.errors import CacheDiskFailed, CorruptData, TransientFailure

log = logging.getLogger(__name__)

# Empty PARTIAL answers in a row that count as one FAILURE.
EMPTY_PARTIALS = 3


class Modified(Exception):
    """The backend no longer has this version: drop it; its readers fail."""


class FetchRunner:
    """Fetches runs of missing blocks: at most ``max_fetches`` runs in flight
    (*fetch_limiter*), each of at most *max_fetch* bytes, one buffer each."""

    def __init__(
        self,
        source: Source,
        writer: BlockWriter,
        content: Content,
        config: CacheConfig,
        max_fetch: int,
        fetch_limiter: trio.CapacityLimiter,
        stats: Stats,
    ) -> None:
        self._source = source
        self._writer = writer
        self._content = content
        self._config = config
        self._block_size = config.block_size
        self.max_fetch = max_fetch
        self._fetch_limiter = fetch_limiter
        self._stats = stats
        self.buffers = Buffers(max_fetch)

    async def ensure(
        self, cf: CachedFile, first: int, last: int, transfer: Transfer
    ) -> list[Fetch]:
        """Make blocks first..last of *cf* present, fetching what no one else fetches.

        Returns the fetches of the range whose bytes could not be stored
        (they hold them: :meth:`Fetch.serves`); empty when every block is
        present.  Raises Modified / Replan for the caller to re-plan,
        ReadFailed to fail.
        """
        bs = self._block_size
        limit = max(1, self.max_fetch // bs)
        while True:
            if cf.retired:
                raise Replan
            b = cf.present.find(0, first, last + 1)
            if b < 0:
                return []
            self._source.check_latches(cf)
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
                cf.hold(f)
            # Held until the whole range is in: a reader's blocks are not
            # evicted between two of its runs (that could go on forever).
            try:
                for f in fetches:
                    await self.run(cf, f, transfer)
            finally:
                for f in fetches:
                    cf.finish(f)
            for f in waits:
                await f.done.wait()
                f.raise_error()
            unstored = [f for f in (*fetches, *waits) if f.data is not None]
            if unstored:
                return unstored

    async def fetch_whole(self, cf: CachedFile, transfer: Transfer) -> None:
        """One pass over every missing block of *cf*, max_fetches runs at a time."""
        per = max(1, self.max_fetch // self._block_size)
        last = len(cf.present) - 1
        missing = [
            (a, min(last, a + per - 1))
            for a in range(0, last + 1, per)
            if cf.present.find(0, a, min(last, a + per - 1) + 1) >= 0
        ]
        chunks = iter(missing)

        async def worker() -> None:
            for first, end in chunks:  # shared: each chunk goes to one worker
                if await self.ensure(cf, first, end, transfer):
                    raise self._writer.refused()  # fetched, but it cannot be kept

        workers = min(self._config.max_fetches, len(missing))
        if workers <= 1:  # a small file: no nursery, no task of its own
            await worker()
            return
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def run(self, cf: CachedFile, fetch: Fetch, transfer: Transfer) -> None:
        """Fetch blocks fetch.first..fetch.last; at most max_fetches runs at once."""
        try:
            async with self._fetch_limiter:
                await self._run(cf, fetch, transfer)
        except trio.Cancelled:
            raise
        except BaseException as e:
            fetch.error = e
            raise

    async def _run(self, cf: CachedFile, fetch: Fetch, transfer: Transfer) -> None:
        await self._content.ensure_info(cf)
        bs = self._block_size
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
        async with self._fetch_limiter:
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
        source = self._source
        cfg = self._config
        bs = self._block_size
        pos = written = start
        unstored = stop if store else start
        failures = empty = corrupt = 0
        while pos < stop:
            source.check_latches(cf)
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
                source.note_eof(cf, pos)
                pos = stop
            elif rc is RWResult.FILE_MODIFIED_EXTERNALLY:
                raise Modified
            elif rc is RWResult.FILE_MODIFIED_LOCALLY:
                raise Replan
            elif rc is RWResult.FILE_FAILURE:
                await source.latch_file(cf, pos)
            elif rc is RWResult.PERMANENT_FAILURE:
                await source.latch_storage(cf, pos)
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
                        stored = await self._writer.store(cf, written, chunk)
                    except CacheDiskFailed:
                        # The bytes are in hand: checked, they serve this
                        # fetch's readers from its buffer (Fetch.data).
                        store, unstored = False, written
                if not store:
                    stored = await self._writer.check(cf, written, chunk)
                if stored < complete:
                    self._stats.corrupt_from_backend += 1
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
        bs = self._block_size
        if cf.zero_from is not None:
            stop = min(stop, cf.zero_from)
        try:
            ctx = await self._source.context(cf)
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
        rc, n = await self._source.call(req)
        if rc is RWResult.SUCCESS and n == stop - pos and len(buffer) > n:
            rc = RWResult.PARTIAL  # the rest is known zeros: the loop fills it
        return rc, n


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first exception of a nursery's group that is not a cancellation."""
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            e = first_error(e)
        if not isinstance(e, trio.Cancelled):
            return e
    return group.exceptions[0]
