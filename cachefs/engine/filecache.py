"""FileCache: reads served from the block cache, misses raised as ReadData.

Policy in short: a hit is a bitmap check and one pread; a miss plans runs of
missing blocks, fetches each run with ReadData calls (one fetcher per block:
other readers wait for it), writes whole blocks, then marks them present.
Sequential readers get readahead.  The bitmap reaches SQLite only after the
data files are synced (Catalog.flush), so a crash loses blocks, never trusts
wrong ones.  A failing cache disk latches (engine/disk.py): reads go to the
source uncached until it works again.

One version per handle (docs/SEMANTICS.md): an open binds the handle to the
version current at the last revalidation, and every read of the handle is
served from that version: its cached blocks (the handle holds the data file,
so they outlive a newer version), or the backend pinned to it.  A version
that is no longer current is read without storing.  When the backend says
the version is gone (FILE_MODIFIED_EXTERNALLY), what is not cached of it
fails with VersionGone, and the next open stats the file again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from cachefs._linux.uring import open_ring
from cachefs.contract import Backend, DirEntry, FileAttrs, FileKind, ReadData
from cachefs.engine.attrs import Attributes
from cachefs.engine.config import CacheConfig
from cachefs.engine.hit.direct import Stream
from cachefs.engine.hit.reader import HitReader
from cachefs.engine.hit.whole import WholeFiles
from cachefs.engine.miss.fetch import FetchRunner, Modified, Replan
from cachefs.engine.miss.hasher import Hasher
from cachefs.engine.miss.readahead import Readahead
from cachefs.engine.miss.supply import AddResult, Supplier
from cachefs.engine.miss.transfers import Kind, ReaderState, Transfer
from cachefs.engine.policy.content import Content
from cachefs.engine.policy.evict import Evictor, evictable
from cachefs.engine.state.cachedir import lock_cache_dir, open_index
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk, DiskError, write_probe
from cachefs.engine.state.index import CachedFile, Index
from cachefs.engine.state.store import DataFile
from cachefs.errors import (
    CacheDiskFailed,
    NotAFile,
    NotFound,
    PinLimitExceeded,
    ReadFailed,
    TransientFailure,
    VersionGone,
)

log = logging.getLogger(__name__)

# How many times one read may re-plan (version changes, FILE_MODIFIED_*) before it fails.
MAX_REPLANS = 4
# Seconds an interrupted reader's CANCELED notification may take.
CANCEL_DEADLINE = 2.0


class OpenFile:
    """A handle from :meth:`FileCache.open`: the version it reads (``cf``,
    ``attrs``) and one reader's sequential state."""

    __slots__ = ("file_id", "attrs", "cf", "reader", "data", "direct", "whole", "closed")

    def __init__(self, cf: CachedFile) -> None:
        self.file_id = cf.file_id
        self.attrs = cf.attrs
        self.cf = cf
        self.reader = ReaderState()
        # The version's data file, held from the first hit on.
        self.data: DataFile | None = None
        self.direct: Stream | None = None  # large hits read direct, some ahead
        self.whole: CachedFile | None = None  # held whole for the kernel (engine/whole.py)
        self.closed = False


class FileCache:
    """The read-through cache over one backend.  Create with :func:`open_file_cache`."""

    def __init__(
        self,
        backend: Backend,
        cache_dir: Path,
        config: CacheConfig,
        catalog: Catalog,
        nursery: trio.Nursery,
    ) -> None:
        self.backend = backend
        self.cache_dir = cache_dir
        self.config = config
        self.catalog = catalog
        self._nursery = nursery
        self.disk_limiter = trio.CapacityLimiter(8)
        self.fetch_limiter = trio.CapacityLimiter(config.max_fetches)
        self.disk = CacheDisk(self._untrust)
        self.evictor = Evictor(
            catalog, cache_dir, config.cache_size, config.min_free, self.disk_limiter, self.disk
        )
        # What is in flight stays well inside the cache, or fills would evict
        # each other's blocks before their readers get them.
        bs, limit = config.block_size, self.evictor.limit
        share = limit // (4 * config.max_fetches)
        self.max_fetch = max(bs, min(config.max_fetch, share) // bs * bs)
        self.max_readahead = min(config.max_readahead, max(bs, limit // 4))
        self._runner = FetchRunner(self)
        self._handles: dict[tuple[str, str], int] = {}  # (file id, version) -> open handles
        self._commit_soon = trio.Event()
        self._open: set[OpenFile] = set()
        self._had_continuous: set[str] = set()
        self.counters = {
            "read_data_calls": 0,
            "bytes_from_backend": 0,
            "hit_bytes": 0,
            "miss_bytes": 0,
            "stale_served": 0,
            "passthrough_opens": 0,
            "version_gone_reads": 0,
        }
        self._attrs = Attributes(backend, catalog, config.ttl, self.counters)
        self.content = Content(
            backend, catalog, config.verify, catalog.key is not None, self.counters
        )
        self._supplier = Supplier(self)
        self.hasher = Hasher(catalog, config.block_size, self.disk)
        self._ring = open_ring() if config.io_uring else None
        self._hits = HitReader(
            catalog,
            self.content,
            config.block_size,
            self._ring,
            nursery,
            self.disk,
            self.disk_limiter,
        )
        self._whole = WholeFiles(catalog, self.content)

    @property
    def external_error(self) -> str | None:
        return self.catalog.external_error

    # -- attributes -----------------------------------------------------------------

    async def getattr(self, file_id: str) -> FileAttrs:
        """Attributes of *file_id*, asking the backend once the TTL has passed."""
        return await self._attrs.getattr(file_id)

    def known_attrs(self, file_id: str) -> FileAttrs | None:
        """The attributes of the version of *file_id* the cache serves now,
        without asking the backend; None if it holds none."""
        cf = self.catalog.files.get(file_id)
        return None if cf is None else cf.attrs

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        """The entries of *dir_id*; the last listing seen is served while offline."""
        return await self._attrs.list_dir(dir_id)

    # -- reading --------------------------------------------------------------------

    async def open(self, file_id: str) -> OpenFile:
        """A handle reading the version of *file_id* current at its last
        revalidation (the backend is asked again past the TTL).

        Every read of the handle is of that version, or fails (VersionGone).
        """
        attrs = await self.getattr(file_id)
        if attrs.kind is not FileKind.FILE:
            raise NotAFile(f"{file_id or '/'}: not a regular file")
        cf = self.catalog.files.get(file_id)
        if cf is None:  # getattr learned it; only a bug gets here
            raise NotFound(f"{file_id}: no such file")
        fh = OpenFile(cf)
        cf.handles += 1  # keeps a retired version's data file for it
        key = (file_id, cf.version)
        self._handles[key] = self._handles.get(key, 0) + 1
        self._open.add(fh)
        return fh

    def hold_whole(self, fh: OpenFile) -> int | None:
        """For FUSE passthrough: the fd of a data file holding all of *fh*'s
        version as plain, checked bytes, kept whole (never evicted or purged)
        until *fh* is closed; None if the file is not cached whole that way.

        The fd is the cache's: do not close it.
        """
        if not self.disk.usable:  # the kernel would meet its errors
            return None
        try:
            fd = self._whole.hold(fh)
        except OSError as e:
            self.disk.failed("opening a cache data file", e)
            return None
        if fd is not None:
            self.counters["passthrough_opens"] += 1
        return fd

    def let_go_whole(self, fh: OpenFile) -> None:
        """Give back what :meth:`hold_whole` held for *fh* before it closes (unused)."""
        if fh.whole is not None:
            self._whole.release(fh)
            self.counters["passthrough_opens"] -= 1

    def held_whole(self) -> list[str]:
        """The files held whole for open handles (see :meth:`hold_whole`)."""
        return sorted(cf.file_id for cf in self.catalog.files.values() if cf.held)

    async def read(self, fh: OpenFile, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Up to *length* bytes at *offset*; empty at or past the end of the file.

        A memoryview is a view of the cache's pages (engine/mapped.py) or
        of a buffer lent to it (engine/direct.py): use it before the next
        await, or copy it.
        """
        cf = fh.cf
        end = min(offset + length, cf.size)
        if offset >= end:
            return b""
        if self.content.hashing and not cf.info_asked and cf.content_hash is None:
            await self.content.ensure_info(cf)  # once per version per process
        reader = fh.reader
        sequential, ended = reader.observe(offset, end)
        if ended is not None:
            await self._end_run(cf, *ended)
        bs = self.config.block_size
        first, last = offset // bs, (end - 1) // bs
        if sequential and reader.run_reads >= 2 and self.max_readahead and self._storing(cf):
            self._read_ahead(fh, cf, end)
        if cf.present.find(0, first, last + 1) < 0:
            data = await self._hits.serve(fh, cf, offset, end, sequential)
            if data is not None:
                self.counters["hit_bytes"] += len(data)
                return data
        self.counters["miss_bytes"] += end - offset
        return await self._read_miss(fh, offset, end, sequential)

    def _storing(self, cf: CachedFile) -> bool:
        """Whether what is fetched of *cf* now is stored (else read uncached)."""
        return not cf.retired and self.disk.usable

    def _read_ahead(self, fh: OpenFile, cf: CachedFile, end: int) -> None:
        reader = fh.reader
        if reader.readahead is None:
            reader.readahead = Readahead(
                self._transfer_for(fh, cf, True),
                self.config.block_size,
                self.max_readahead,
                self.max_fetch,
                self._nursery,
                self._runner.ensure,
            )
        reader.readahead.extend(cf, end)

    async def _end_run(self, cf: CachedFile, transfer: Transfer | None, ahead: Any) -> None:
        """A sequential run ended: stop its readahead, cancel its transfer."""
        if ahead is not None:
            await ahead.stop()
        if transfer is not None and transfer.open:
            await self.cancel_transfer(cf, transfer)

    async def _read_miss(
        self, fh: OpenFile, offset: int, end: int, sequential: bool
    ) -> bytes | bytearray | memoryview:
        bs = self.config.block_size
        cf = fh.cf
        first, last = offset // bs, (end - 1) // bs
        for _ in range(MAX_REPLANS):
            if not self._storing(cf):
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
                    self._drop_version(cf)
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
            data = await self._hits.serve(fh, cf, offset, end)
            if data is not None:
                return data
        raise TransientFailure(f"{fh.file_id}: the file kept changing while being read")

    async def _read_uncached(
        self, fh: OpenFile, offset: int, end: int, sequential: bool
    ) -> bytes | bytearray | memoryview:
        """Bytes [offset, end) of *fh*'s version from the backend, not stored;
        whole blocks only where they are checked against content information."""
        cf = fh.cf
        bs = self.config.block_size
        start, stop = offset, end
        if self.content.expected(cf, offset // bs, (end - 1) // bs) is not None:
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
                    self._drop_version(cf)
                continue
            except ReadFailed:
                if transfer.kind is Kind.RANDOM:
                    await self._stop_transfer(fh, cf, transfer)
                raise
            if offset == start and end == stop:
                return buf
            return memoryview(buf)[offset - start : end - start]
        raise TransientFailure(f"{fh.file_id}: the read kept being re-planned")

    def _drop_version(self, cf: CachedFile) -> None:
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
        self.catalog.retire(cf)

    def _gone(self, cf: CachedFile) -> VersionGone:
        self.counters["version_gone_reads"] += 1
        return VersionGone(
            f"{cf.file_id}: the file changed at the source while open;"
            " open it again for the current version"
        )

    def _transfer_for(self, fh: OpenFile, cf: CachedFile, sequential: bool) -> Transfer:
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

    async def _stop_transfer(self, fh: OpenFile, cf: CachedFile, transfer: Transfer) -> None:
        if fh.reader.continuous is transfer:
            ended = fh.reader.detach()
            if ended is not None:
                await self._end_run(cf, *ended)
        elif transfer.open:
            await self.cancel_transfer(cf, transfer)

    def _abandon(self, fh: OpenFile, cf: CachedFile, transfer: Transfer) -> None:
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
        if self.catalog.external_error is not None or cf.error is not None:
            return
        context = self._runner.context_of(cf)
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
        await self._runner.call(req)

    async def close(self, fh: OpenFile) -> None:
        """Release the handle; an unfinished continuous transfer is canceled."""
        if fh.closed:
            return
        fh.closed = True
        self._open.discard(fh)
        cf = fh.cf
        ended = fh.reader.detach()
        if ended is not None:
            await self._end_run(cf, *ended)
        self._hits.forget(fh)
        self._whole.release(fh)
        if fh.data is not None:
            fh.data.release()
            fh.data = None
        cf.handles -= 1
        if cf.retired and not cf.handles:
            assert cf.data is not None
            cf.data.unlink()
        key = (cf.file_id, cf.version)
        left = self._handles.get(key, 1) - 1
        if left:
            self._handles[key] = left
            return
        self._handles.pop(key, None)
        await self._runner.close_context(*key)

    # -- content from elsewhere ---------------------------------------------------

    async def add_data(
        self, file_id: str, offset: int, data: bytes | memoryview, *, trust: bool = False
    ) -> AddResult:
        """Supply bytes of *file_id* at *offset* without asking the backend.

        A block becomes visible to readers only once it is complete and
        matches its hash (from content information, or recorded when the
        block was fetched before); a part of a block is held until the rest
        arrives.  Raises OutOfBounds past the end of the file, NoContentInfo
        for a block whose hash is unknown unless *trust*.
        """
        return await self._supplier.add(file_id, offset, data, trust)

    # -- whole files ----------------------------------------------------------------

    async def prefetch(self, file_id: str) -> None:
        """Fetch every missing block of *file_id* in one WHOLE_FILE transfer.

        One pass over the file, up to max_fetches calls in flight; a file
        larger than the cache is fetched once, not kept.
        """
        for _ in range(MAX_REPLANS):
            if not self.disk.usable:  # nothing fetched now would be kept
                raise self.disk.failure()
            fh = await self.open(file_id)  # the current version, stat again after a change
            cf = fh.cf
            try:
                last = len(cf.present) - 1
                if last < 0:
                    return
                transfer = Transfer(Kind.WHOLE, last, last)
                try:
                    await self._runner.fetch_whole(cf, transfer)
                    return
                except Modified:
                    self._drop_version(cf)
                except Replan:
                    pass
                finally:
                    if transfer.open:
                        await self.cancel_transfer(cf, transfer)
            finally:
                await self.close(fh)
        raise TransientFailure(f"{file_id}: the file kept changing while being fetched")

    async def pin(self, file_id: str) -> None:
        """Fetch *file_id* whole and keep it: eviction never touches a pinned file.

        Raises PinLimitExceeded if pinned files alone would pass the cache limit.
        """
        cf = await self._attrs.current(file_id)
        if not cf.pinned:
            total = self.catalog.pinned_bytes + cf.size
            if total > self.evictor.limit:
                raise PinLimitExceeded(
                    f"cannot pin {file_id}: pinned files would hold {total} bytes,"
                    f" more than the cache limit of {self.evictor.limit} bytes"
                )
            self.catalog.set_pinned(cf, True)
        await self.prefetch(file_id)
        await self.flush()

    async def unpin(self, file_id: str) -> bool:
        """Let *file_id* be evicted again; False if it was not pinned."""
        cf = self.catalog.files.get(file_id)
        if cf is None or not cf.pinned:
            return False
        self.catalog.set_pinned(cf, False)
        await self.commit_if_usable()
        return True

    async def purge(self, file_id: str) -> int:
        """Drop the cached data of *file_id* unless pinned or held whole
        (:meth:`hold_whole`), what a RANGE_BEYOND_EOF taught the cache about
        it, and the hashes that came with blocks taken on trust (add-data
        --trust): the owner's way back from wrong bytes.  Hashes recorded
        from the source stay (add-data checks against them); returns the
        bytes freed."""
        cf = self.catalog.files.get(file_id)
        if cf is None:
            return 0
        # Pieces of blocks held for add-data go too: the owner takes them back.
        self._supplier.forget(cf)
        if cf.pinned or cf.held:
            return 0
        freed = await self._drop_blocks(cf, 0)
        self._forget_eof(cf)
        if not cf.retired:
            self.content.forget_trusted(cf)
        return freed

    async def _drop_blocks(self, cf: CachedFile, first: int) -> int:
        """Drop the cached blocks of *cf* from block *first* on; the bytes freed."""
        if cf.unhashed:  # their hashes outlive them (add-data checks against them)
            await self.hasher.drain()
        if cf.retired:  # dropped meanwhile: nothing of it is counted any more
            return 0
        victims = [(cf, b) for b in evictable(cf) if b >= first]
        before = self.catalog.cached_bytes
        try:
            await self.evictor.drop(victims, count=False)
        except DiskError as e:
            raise self.disk.failed("dropping cached blocks", e) from None
        return before - self.catalog.cached_bytes

    def _forget_eof(self, cf: CachedFile) -> None:
        """Forget where a RANGE_BEYOND_EOF said *cf* ends (its zeros dropped)."""
        if cf.zero_from is not None:
            cf.zero_from = None
            self.catalog.dirty.add(cf)

    def pinned(self) -> list[str]:
        return sorted(cf.file_id for cf in self.catalog.files.values() if cf.pinned)

    # -- latches and statistics ---------------------------------------------------

    async def reset_file_errors(self, file_ids: Collection[str] | None = None) -> list[str]:
        """Lift FILE_FAILURE latches and forget early ends of file
        (RANGE_BEYOND_EOF), with the zeros cached for them, of *file_ids* (or
        all); returns the files reset.  An early end of a file open with
        passthrough, or while the cache disk is latched, stays until then
        (its zeros could not be dropped)."""
        reset = []
        for cf in list(self.catalog.files.values()):
            if file_ids is not None and cf.file_id not in file_ids:
                continue
            done = False
            if cf.error is not None:
                cf.error = None
                self.catalog.dirty.add(cf)
                done = True
            if cf.zero_from is not None and not cf.held and self.disk.usable:
                await self._drop_blocks(cf, cf.zero_from // self.config.block_size)
                self._forget_eof(cf)
                done = True
            if done:
                reset.append(cf.file_id)
        await self.commit_if_usable()
        return reset

    def file_errors(self) -> list[str]:
        return self.catalog.file_errors()

    def short_files(self) -> list[str]:
        """Files a RANGE_BEYOND_EOF said end before their size (zeros from there)."""
        return sorted(cf.file_id for cf in self.catalog.files.values() if cf.zero_from is not None)

    async def reset_external_error(self) -> None:
        """Lift the PERMANENT_FAILURE latch: the backend is asked again."""
        self.catalog.external_error = None
        await self.commit_if_usable()

    async def commit_if_usable(self) -> None:
        """Commit now, unless the cache disk is latched (its probe commits once
        it works again); blocks still waiting for their hash are committed
        later."""
        if self.disk.usable:
            try:
                await self.commit()
            except CacheDiskFailed:
                pass  # latched and logged

    def statistics(self) -> dict[str, Any]:
        errors = self.catalog.file_errors()
        hits, misses = self.counters["hit_bytes"], self.counters["miss_bytes"]
        return {
            **self.counters,
            "hit_ratio": hits / (hits + misses) if hits + misses else None,
            "cached_bytes": self.catalog.cached_bytes,
            "cache_limit": self.evictor.limit,
            "min_free": self.evictor.min_free,
            "pinned_bytes": self.catalog.pinned_bytes,
            "evicted_bytes": self.evictor.evicted_bytes,
            "files_in_error": len(errors),
            "file_errors": errors,
            "short_files": self.short_files(),
            "external_error": self.catalog.external_error,
            "block_size": self.config.block_size,
            "verify": self.config.verify,
            "encrypted": self.catalog.key is not None,
            "disk_reads": self._hits.disk_reads,
            "passthrough_files": self._whole.held,
            **self.disk.statistics(),
            "unhashed_blocks": self.hasher.backlog,
            "ttl": self.config.ttl,
            "cache_dir": str(self.cache_dir),
        }

    # -- persistence ----------------------------------------------------------------

    async def flush(self) -> None:
        """Commit metadata now, blocks waiting for their hash included (hashed first).

        Metadata is also committed every flush_interval seconds, without
        waiting for the hasher: blocks still unhashed show as absent.
        CacheDiskFailed while the cache disk is latched, or if it fails now.
        """
        await self.hasher.drain()
        await self.commit()

    async def commit(self) -> None:
        """Commit metadata now; CacheDiskFailed if the cache disk fails (or failed)."""
        if not self.disk.usable:
            raise self.disk.failure()
        try:
            await self.catalog.flush(self.disk_limiter)
        except DiskError as e:
            raise self.disk.failed("committing the cache index", e) from None

    async def _serve_flusher(self) -> None:
        while True:
            await trio.sleep(self.config.flush_interval)
            self._runner.buffers.trim()
            self._hits.trim()
            if self.catalog.needs_flush and self.disk.usable:
                try:
                    await self.commit()
                except CacheDiskFailed:
                    pass  # latched and logged: the probe commits once it works

    def commit_soon(self) -> None:
        """Have the index committed (and the data synced) now, not at the next
        flush interval: a file just became whole (engine/whole.py)."""
        self._commit_soon.set()

    async def _serve_early_commits(self) -> None:
        while True:
            await self._commit_soon.wait()
            self._commit_soon = trio.Event()
            await self.commit_if_usable()

    async def _probe_disk(self) -> None:
        """Whether the cache disk works again: a file written (as blocks are)
        and synced, the index committed, then room made for a fetch.  Raises
        what fails.  Nothing is evicted before the index can be committed
        (an eviction clears bits in it before it punches)."""
        await trio.to_thread.run_sync(
            write_probe, self.cache_dir / "data", limiter=self.disk_limiter
        )
        await self.catalog.flush(self.disk_limiter)
        room = self.max_fetch
        await self.evictor.make_room(room)
        self.evictor.settle(room)
        if self.catalog.cached_bytes + room > self.evictor.allowed():
            raise CacheDiskFailed("no room on the cache filesystem")

    def _untrust(self) -> None:
        """The cache disk may have lost or damaged data (engine/disk.py):
        blocks written since the last sync are dropped, every other one is
        checked against its hash before it is served again."""
        self.catalog.untrust_unsynced()
        self._disk_recovered(True)

    def _disk_recovered(self, suspect: bool) -> None:
        if suspect:  # what it returned before it failed is checked again
            for cf in {*self.catalog.files.values(), *(fh.cf for fh in self._open)}:
                cf.verified = None

    async def _shutdown(self) -> None:
        for fh in list(self._open):
            with trio.move_on_after(5):
                await self.close(fh)
        await self._runner.close_all_contexts()
        try:
            await self.flush()
        except CacheDiskFailed as e:
            log.error(
                "cannot commit the cache index (%s): blocks fetched since its last commit"
                " will be fetched again",
                e,
            )


@asynccontextmanager
async def open_file_cache(
    backend: Backend,
    cache_dir: str | os.PathLike[str],
    config: CacheConfig | None = None,
    *,
    on_invalidate: Callable[[str], None] | None = None,
    key_material: bytes | None = None,
) -> AsyncIterator[FileCache]:
    """Open the cache in *cache_dir* (which must exist) over *backend*.

    Takes the directory's lock (CacheDirInUse if another live process holds
    it), loads or rebuilds the index, and runs the flusher and the trimmer.
    On exit open transfers are canceled and metadata is committed; the
    backend is left open (its owner closes it).  With *key_material* the
    cache is encrypted at rest (BadKey if it is not the cache's key).
    """
    config = config or CacheConfig()
    config.validate()
    path = Path(cache_dir).absolute()
    lock_fd = lock_cache_dir(path)
    index: Index | None = None
    try:
        opened = await trio.to_thread.run_sync(open_index, path, config.block_size, key_material)
        index = opened.index
        catalog = Catalog(
            index,
            path / "data",
            config.block_size,
            opened.files,
            opened.external_error,
            on_invalidate,
            opened.key,
            opened.next_row,
        )
        catalog.dirty.update(opened.repaired)
        async with trio.open_nursery() as nursery:
            cache = FileCache(backend, path, config, catalog, nursery)
            nursery.start_soon(cache._serve_flusher)
            nursery.start_soon(cache._serve_early_commits)
            nursery.start_soon(
                cache.disk.serve_probe,
                cache._probe_disk,
                cache._disk_recovered,
                config.disk_probe_interval,
            )
            nursery.start_soon(cache.evictor.serve_trimmer)
            nursery.start_soon(cache.hasher.serve)
            if cache._ring is not None:
                nursery.start_soon(cache._ring.serve)
            try:
                yield cache
            finally:
                try:
                    with trio.CancelScope(shield=True):
                        await cache._shutdown()
                finally:
                    cache._hits.close()
                    cache.hasher.close()
                nursery.cancel_scope.cancel()
    finally:
        if index is not None:
            index.close()
        os.close(lock_fd)
