"""A read that missed: its transfer, its readahead, re-planning, and what
happens when its version is gone.

Policy: a read plans the missing blocks of its range and fetches them
(miss/fetch.py), then serves them from the cache; bytes that could not be
stored are served from the fetch's buffer.  A read re-plans at most
MAX_REPLANS times (the version was retired meanwhile, FILE_MODIFIED_*, a
fetch it waited for failed) before it fails.  A version that is no longer
current, or a cache disk that is latched, is read uncached: into the
reader's buffer, checked against content information where whole blocks
are read.  When the backend says the version is gone
(FILE_MODIFIED_EXTERNALLY), what is not cached of it fails with
VersionGone, and the next open stats the file again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import trio

from cachefs.contract import ReadData
from cachefs.engine.miss.fetch import FetchRunner, Modified
from cachefs.engine.miss.readahead import Readahead
from cachefs.engine.miss.source import Source
from cachefs.engine.miss.transfers import Ended, Kind, ReaderState, Transfer
from cachefs.engine.policy.content import Content
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.inflight import Replan
from cachefs.engine.stats import Stats
from cachefs.errors import ReadFailed, TransientFailure, VersionGone

log = logging.getLogger(__name__)

# How many times one read may re-plan (version changes, FILE_MODIFIED_*) before it fails.
MAX_REPLANS = 4
# Seconds an interrupted reader's CANCELED notification may take.
CANCEL_DEADLINE = 2.0

Data = bytes | bytearray | memoryview


class Handle(Protocol):
    """What the miss path needs of an open handle (engine.OpenFile)."""

    file_id: str
    #: The version the handle reads.
    cf: CachedFile
    #: Its sequential state: the current run's transfer and readahead.
    reader: ReaderState


H = TypeVar("H", bound=Handle)


class MissReader(Generic[H]):
    """Reads of blocks not (all) in the cache, for handles of type *H*.

    *serve_present* reads present blocks back from the cache (the hit path)
    once they are fetched: None if they are gone again.
    """

    def __init__(
        self,
        runner: FetchRunner,
        source: Source,
        content: Content,
        disk: CacheDisk,
        catalog: Catalog,
        nursery: trio.Nursery,
        max_readahead: int,
        stats: Stats,
        serve_present: Callable[[H, CachedFile, int, int], Awaitable[Data | None]],
    ) -> None:
        self._runner = runner
        self._source = source
        self._content = content
        self._disk = disk
        self._catalog = catalog
        self._nursery = nursery
        self._block_size = catalog.block_size
        self._max_readahead = max_readahead
        self._stats = stats
        self._serve_present = serve_present
        self._had_continuous: set[str] = set()

    def storing(self, cf: CachedFile) -> bool:
        """Whether what is fetched of *cf* now is stored (else read uncached)."""
        return not cf.retired and self._disk.usable

    async def read(self, fh: H, offset: int, end: int, sequential: bool) -> Data:
        """Bytes [offset, end) of *fh*'s version, fetching what is missing."""
        bs = self._block_size
        cf = fh.cf
        first, last = offset // bs, (end - 1) // bs
        for _ in range(MAX_REPLANS):
            if not self.storing(cf):
                return await self._read_uncached(fh, offset, end, sequential)
            transfer = self._transfer_for(fh, cf, sequential)
            try:
                unstored = await self._runner.ensure(cf, first, last, transfer)
            except trio.Cancelled:
                self._abandon(fh, cf, transfer)
                raise
            except (Modified, Replan) as e:
                await self._stop_transfer(fh, cf, transfer)
                if isinstance(e, Modified):
                    self.drop_version(cf)
                    raise self._gone(cf) from None
                continue
            except ReadFailed:
                if transfer.kind is Kind.RANDOM:
                    await self._stop_transfer(fh, cf, transfer)
                raise
            for fetch in unstored:
                data = fetch.serves(offset, end)
                if data is not None:
                    return data
            if unstored:
                continue
            present = await self._serve_present(fh, cf, offset, end)
            if present is not None:
                return present
        raise TransientFailure(f"{fh.file_id}: the file kept changing while being read")

    async def _read_uncached(self, fh: H, offset: int, end: int, sequential: bool) -> Data:
        """Bytes [offset, end) of *fh*'s version from the backend, not stored;
        whole blocks only where they are checked against content information."""
        cf = fh.cf
        bs = self._block_size
        start, stop = offset, end
        if self._content.expected(cf, offset // bs, (end - 1) // bs) is not None:
            start, stop = offset // bs * bs, min(-(-end // bs) * bs, cf.size)
        buf = bytearray(stop - start)
        for _ in range(MAX_REPLANS):
            if cf.gone:
                raise self._gone(cf)
            transfer = self._transfer_for(fh, cf, sequential)
            try:
                await self._runner.fetch_uncached(cf, transfer, memoryview(buf), start)
            except trio.Cancelled:
                self._abandon(fh, cf, transfer)
                raise
            except (Modified, Replan) as e:
                await self._stop_transfer(fh, cf, transfer)
                if isinstance(e, Modified):
                    self.drop_version(cf)
                continue
            except ReadFailed:
                if transfer.kind is Kind.RANDOM:
                    await self._stop_transfer(fh, cf, transfer)
                raise
            if offset == start and end == stop:
                return buf
            return memoryview(buf)[offset - start : end - start]
        raise TransientFailure(f"{fh.file_id}: the read kept being re-planned")

    async def fetch_whole(self, cf: CachedFile) -> bool:
        """Fetch every missing block of *cf* in one WHOLE_FILE transfer.

        False if the version changed meanwhile (open the file again).
        """
        last = len(cf.present) - 1
        if last < 0:
            return True
        transfer = Transfer(Kind.WHOLE, last, last)
        try:
            await self._runner.fetch_whole(cf, transfer)
            return True
        except Modified:
            self.drop_version(cf)
        except Replan:
            pass
        finally:
            if transfer.open:
                await self.cancel_transfer(cf, transfer)
        return False

    # -- versions -------------------------------------------------------------------

    def drop_version(self, cf: CachedFile) -> None:
        """The backend no longer has *cf*'s version: drop it (the next open
        stats the file again); what is not cached of it cannot be read."""
        if not cf.gone:
            cf.gone = True
            if cf.handles:
                # Its readers are cut short (appended to, or written in place:
                # the source cannot tell which, so neither can the cache).
                log.warning(
                    "%s changed at the source while open: %d handle(s) of version %s get"
                    " ESTALE for what is not cached of it; a new open reads the new version",
                    cf.file_id,
                    cf.handles,
                    cf.version,
                )
            else:
                log.info("%s changed at the source: version %s is gone", cf.file_id, cf.version)
        self._catalog.retire(cf)

    def _gone(self, cf: CachedFile) -> VersionGone:
        self._stats.version_gone_reads += 1
        return VersionGone(
            f"{cf.file_id}: the file changed at the source while open;"
            " open it again for the current version"
        )

    # -- transfers and readahead ------------------------------------------------------

    def read_ahead(self, fh: H, cf: CachedFile, end: int) -> None:
        """The sequential reader of *fh* reached *end*: keep its readahead going."""
        reader = fh.reader
        ahead = reader.readahead
        if ahead is None:
            ahead = reader.readahead = Readahead(
                self._transfer_for(fh, cf, True),
                self._block_size,
                self._max_readahead,
                self._runner.max_fetch,
                self._nursery,
                self._runner.ensure,
            )
        ahead.extend(cf, end)

    async def end_run(self, cf: CachedFile, ended: Ended) -> None:
        """A sequential run ended: stop its readahead, cancel its transfer."""
        transfer, ahead = ended
        if ahead is not None:
            await ahead.stop()
        if transfer is not None and transfer.open:
            await self.cancel_transfer(cf, transfer)

    def _transfer_for(self, fh: H, cf: CachedFile, sequential: bool) -> Transfer:
        file_last = max(0, len(cf.present) - 1)
        if not sequential:
            return Transfer(Kind.RANDOM, file_last, file_last)
        t = fh.reader.continuous
        if t is None or t.finished:
            restarted = fh.reader.run_start == 0 and cf.file_id in self._had_continuous
            t = Transfer(Kind.CONTINUOUS, file_last, file_last, restarted)
            fh.reader.continuous = t
            self._had_continuous.add(cf.file_id)
        return t

    async def _stop_transfer(self, fh: H, cf: CachedFile, transfer: Transfer) -> None:
        if fh.reader.continuous is transfer:
            ended = fh.reader.detach()
            if ended is not None:
                await self.end_run(cf, ended)
        elif transfer.open:
            await self.cancel_transfer(cf, transfer)

    def _abandon(self, fh: H, cf: CachedFile, transfer: Transfer) -> None:
        """The reader stopped waiting (its request was interrupted): the
        backend call it waited for is abandoned, and its transfer ends with
        a CANCELED call made in the background (the reader is answered at
        once), within CANCEL_DEADLINE."""

        async def cancel() -> None:
            with trio.move_on_after(CANCEL_DEADLINE):
                await self._stop_transfer(fh, cf, transfer)

        try:
            self._nursery.start_soon(cancel)
        except RuntimeError:  # the cache is closing: it cancels open transfers itself
            pass

    async def cancel_transfer(self, cf: CachedFile, transfer: Transfer) -> None:
        """Tell the backend a transfer with calls made ended early."""
        transfer.finished = True
        source = self._source
        if source.latched(cf):
            return
        context = source.context_of(cf)
        if context is None:
            return
        req = ReadData(
            file_id=cf.file_id,
            size=cf.size,
            position=transfer.position,
            flags=transfer.cancel_flags(),
            buffer=memoryview(bytearray()),
            bytes_to_read=0,
            file_context=context[0],
            version=cf.version,
        )
        await source.call(req)
