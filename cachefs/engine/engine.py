"""FileCache: reads served from the block cache, misses raised as ReadData.

Policy in short: a hit is a bitmap check and one pread; a miss plans runs of
missing blocks, fetches each run with ReadData calls (one reader per block:
others wait for it), writes whole blocks, then marks them present.  The
bitmap reaches SQLite only after the data file is synced (see ``flush``), so
a crash loses blocks, never trusts wrong ones.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from cachefs.contract import Backend, DirEntry, FileAttrs, FileKind, ReadData
from cachefs.engine.cachedir import lock_cache_dir, open_index
from cachefs.engine.fetch import Fetch, FetchRunner, Modified, Replan
from cachefs.engine.index import CachedFile, Index, block_count, row_of
from cachefs.engine.store import DataFile
from cachefs.engine.transfers import Kind, ReaderState, Transfer
from cachefs.errors import (
    CacheFSError,
    InvalidBlockSize,
    NotAFile,
    NotFound,
    ReadFailed,
    StorageQuarantined,
    TransientFailure,
)

log = logging.getLogger(__name__)

MIN_BLOCK, MAX_BLOCK = 4 << 10, 64 << 20
# How many times one read may re-plan (version changes, FILE_MODIFIED_*) before it fails.
MAX_REPLANS = 4


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Tunables of the engine.  The defaults suit a local disk and S3 alike."""

    block_size: int = 1 << 20
    ttl: float = 60.0
    retries: int = 3
    retry_delay: float = 0.1
    retry_max_delay: float = 2.0
    max_fetch: int = 8 << 20
    flush_interval: float = 1.0

    def validate(self) -> None:
        bs = self.block_size
        if not (MIN_BLOCK <= bs <= MAX_BLOCK) or bs & (bs - 1):
            raise InvalidBlockSize(f"block size {bs} must be a power of two between 4K and 64M")
        for name in ("ttl", "retries", "retry_delay", "retry_max_delay"):
            if getattr(self, name) < 0:
                raise CacheFSError(f"{name} must not be negative")


class OpenFile:
    """A handle from :meth:`FileCache.open`; one reader's sequential state."""

    __slots__ = ("file_id", "attrs", "reader", "data", "closed")

    def __init__(self, file_id: str, attrs: FileAttrs) -> None:
        self.file_id = file_id
        self.attrs = attrs
        self.reader = ReaderState()
        self.data: DataFile | None = None
        self.closed = False


class FileCache:
    """The read-through cache over one backend.  Create with :func:`open_file_cache`."""

    def __init__(
        self,
        backend: Backend,
        cache_dir: Path,
        config: CacheConfig,
        index: Index,
        files: list[CachedFile],
        external_error: str | None,
        on_invalidate: Callable[[str], None] | None,
    ) -> None:
        self.backend = backend
        self.cache_dir = cache_dir
        self.config = config
        self._index = index
        self._data_dir = cache_dir / "data"
        self._on_invalidate = on_invalidate
        self._files: dict[str, CachedFile] = {cf.file_id: cf for cf in files}
        self._other: dict[str, tuple[FileAttrs, float]] = {}
        self._next_row = max((cf.row_id for cf in files), default=0) + 1
        self._dirty: set[CachedFile] = set()
        self._unsynced: set[DataFile] = set()
        self._deleted: list[int] = []
        self._handles: dict[str, int] = {}
        self._open: set[OpenFile] = set()
        self._contexts: dict[str, Any] = {}
        self._had_continuous: set[str] = set()
        self._flush_lock = trio.Lock()
        self.disk_limiter = trio.CapacityLimiter(8)
        self.external_error = external_error
        self.counters = {
            "read_data_calls": 0,
            "bytes_from_backend": 0,
            "hit_bytes": 0,
            "miss_bytes": 0,
            "stale_served": 0,
        }
        self.cached_bytes = sum(self._present_bytes(cf) for cf in files)
        self._runner = FetchRunner(self)

    # -- attributes -----------------------------------------------------------------

    async def getattr(self, file_id: str) -> FileAttrs:
        """Attributes of *file_id*, asking the backend once the TTL has passed."""
        now = trio.current_time()
        cf = self._files.get(file_id)
        if cf is not None and now - cf.validated_at < self.config.ttl:
            return cf.attrs
        other = self._other.get(file_id)
        if other is not None and now - other[1] < self.config.ttl:
            return other[0]
        return await self._revalidate(file_id)

    async def _revalidate(self, file_id: str) -> FileAttrs:
        cf = self._files.get(file_id)
        known = cf.attrs if cf is not None else self._other.get(file_id, (None, 0))[0]
        if self.external_error is not None:
            if known is None:
                raise StorageQuarantined(
                    f"{file_id or '/'}: storage is offline: {self.external_error}"
                )
            return known
        try:
            attrs = await self.backend.stat(file_id)
        except Exception as e:
            if known is None:
                raise TransientFailure(f"{file_id or '/'}: stat failed: {e}") from None
            log.warning("stat of %s failed (%s): serving the cached version", file_id, e)
            self.counters["stale_served"] += 1
            return known
        if attrs is None:
            self._forget(file_id)
            raise NotFound(f"{file_id or '/'}: no such file or directory")
        return self._learn(file_id, attrs)

    def _learn(self, file_id: str, attrs: FileAttrs) -> FileAttrs:
        now = trio.current_time()
        cf = self._files.get(file_id)
        if attrs.kind is not FileKind.FILE:
            if cf is not None:
                self._retire(cf)
            self._other[file_id] = (attrs, now)
            return attrs
        self._other.pop(file_id, None)
        if cf is None or cf.version != attrs.version or cf.size != attrs.size:
            error = None
            if cf is not None:
                error = cf.error
                self._retire(cf)
            cf = self._new_file(file_id, attrs, error)
        else:
            cf.mtime, cf.mode = attrs.mtime, attrs.mode
        cf.validated_at = now
        return cf.attrs

    def _forget(self, file_id: str) -> None:
        self._other.pop(file_id, None)
        cf = self._files.get(file_id)
        if cf is not None:
            self._retire(cf)

    def _new_file(self, file_id: str, attrs: FileAttrs, error: str | None) -> CachedFile:
        row_id, self._next_row = self._next_row, self._next_row + 1
        cf = CachedFile(
            row_id=row_id,
            file_id=file_id,
            version=attrs.version,
            size=attrs.size,
            mtime=attrs.mtime,
            mode=attrs.mode,
            present=bytearray(block_count(attrs.size, self.config.block_size)),
            error=error,
        )
        cf.data = DataFile(self._data_dir / str(row_id), attrs.size)
        self._files[file_id] = cf
        if error is not None:
            self._dirty.add(cf)
        return cf

    def _retire(self, cf: CachedFile) -> None:
        """Drop everything cached of this version (the source has another)."""
        if cf.retired:
            return
        cf.retired = True
        self.cached_bytes -= self._present_bytes(cf)
        assert cf.data is not None
        cf.data.retire()
        self._deleted.append(cf.row_id)
        self._dirty.discard(cf)
        if self._files.get(cf.file_id) is cf:
            del self._files[cf.file_id]
        if self._on_invalidate is not None:
            self._on_invalidate(cf.file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        """The entries of *dir_id*; their attributes refresh what the cache knows."""
        if self.external_error is not None:
            raise StorageQuarantined(f"{dir_id or '/'}: storage is offline: {self.external_error}")
        try:
            entries = await self.backend.list_dir(dir_id)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{dir_id or '/'}: no such directory") from None
        except Exception as e:
            raise TransientFailure(f"{dir_id or '/'}: listing failed: {e}") from None
        prefix = f"{dir_id}/" if dir_id else ""
        for entry in entries:
            file_id = prefix + entry.name
            if entry.attrs.kind is not FileKind.FILE or file_id in self._files:
                self._learn(file_id, entry.attrs)
        return entries

    # -- reading --------------------------------------------------------------------

    async def open(self, file_id: str) -> OpenFile:
        """A handle for reading *file_id*; revalidates its version past the TTL."""
        attrs = await self.getattr(file_id)
        if attrs.kind is not FileKind.FILE:
            raise NotAFile(f"{file_id or '/'}: not a regular file")
        fh = OpenFile(file_id, attrs)
        self._handles[file_id] = self._handles.get(file_id, 0) + 1
        self._open.add(fh)
        return fh

    async def read(self, fh: OpenFile, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset*; b"" at or past the end of the file."""
        cf = self._files.get(fh.file_id)
        if cf is None:
            cf = await self._current(fh.file_id)
        end = min(offset + length, cf.size)
        if offset >= end:
            return b""
        sequential, abandoned = fh.reader.observe(offset, end)
        if abandoned is not None:
            await self.cancel_transfer(cf, abandoned)
        bs = self.config.block_size
        if cf.present.find(0, offset // bs, (end - 1) // bs + 1) < 0:
            data = os.pread(self._fd(fh, cf), end - offset, offset)
            if len(data) == end - offset:
                self.counters["hit_bytes"] += len(data)
                return data
            self._lost(cf, offset, end)
        self.counters["miss_bytes"] += end - offset
        return await self._read_miss(fh, offset, end, sequential)

    async def prefetch(self, file_id: str) -> None:
        """Fetch every missing block of *file_id* in one WHOLE_FILE transfer."""
        fh = await self.open(file_id)
        try:
            for _ in range(MAX_REPLANS):
                cf = await self._current(file_id)
                last = len(cf.present) - 1
                if last < 0:
                    return
                transfer = Transfer(Kind.WHOLE, last, last)
                try:
                    await self.ensure(cf, 0, last, transfer)
                    return
                except Modified:
                    await self._revalidate_after_change(cf)
                except Replan:
                    pass
                finally:
                    if transfer.open and not cf.retired:
                        await self.cancel_transfer(cf, transfer)
            raise TransientFailure(f"{file_id}: the file kept changing while being fetched")
        finally:
            await self.close(fh)

    async def _current(self, file_id: str) -> CachedFile:
        attrs = await self.getattr(file_id)
        cf = self._files.get(file_id)
        if cf is None or attrs.kind is not FileKind.FILE:
            raise NotFound(f"{file_id}: no such file")
        return cf

    def _fd(self, fh: OpenFile, cf: CachedFile) -> int:
        data = cf.data
        assert data is not None
        if fh.data is not data:
            if fh.data is not None:
                fh.data.release()
            data.acquire()
            fh.data = data
        assert data.fd is not None
        return data.fd

    def _lost(self, cf: CachedFile, offset: int, end: int) -> None:
        """The data file lost bytes it should hold: forget those blocks."""
        bs = self.config.block_size
        log.warning("cache data of %s is short: refetching", cf.file_id)
        for b in range(offset // bs, (end - 1) // bs + 1):
            self._unmark(cf, b)

    async def _read_miss(self, fh: OpenFile, offset: int, end: int, sequential: bool) -> bytes:
        bs = self.config.block_size
        for _ in range(MAX_REPLANS):
            cf = await self._current(fh.file_id)
            stop = min(end, cf.size)
            if offset >= stop:
                return b""
            first, last = offset // bs, (stop - 1) // bs
            transfer = self._transfer_for(fh, cf, sequential, last)
            try:
                await self.ensure(cf, first, last, transfer)
            except (Modified, Replan) as e:
                await self._stop_transfer(fh, cf, transfer)
                if isinstance(e, Modified):
                    await self._revalidate_after_change(cf)
                continue
            except ReadFailed:
                if transfer.kind is Kind.RANDOM:
                    await self._stop_transfer(fh, cf, transfer)
                raise
            if cf.retired:
                continue
            data = os.pread(self._fd(fh, cf), stop - offset, offset)
            if len(data) == stop - offset:
                return data
            self._lost(cf, offset, stop)
        raise TransientFailure(f"{fh.file_id}: the file kept changing while being read")

    def _transfer_for(self, fh: OpenFile, cf: CachedFile, sequential: bool, last: int) -> Transfer:
        file_last = max(0, len(cf.present) - 1)
        if not sequential:
            return Transfer(Kind.RANDOM, last, file_last)
        t = fh.reader.continuous
        if t is None or t.finished:
            restarted = fh.reader.run_start == 0 and cf.file_id in self._had_continuous
            t = Transfer(Kind.CONTINUOUS, file_last, file_last, restarted)
            fh.reader.continuous = t
            self._had_continuous.add(cf.file_id)
        return t

    async def _stop_transfer(self, fh: OpenFile, cf: CachedFile, transfer: Transfer) -> None:
        if transfer.open:
            await self.cancel_transfer(cf, transfer)
        if fh.reader.continuous is transfer:
            fh.reader.continuous = None

    async def _revalidate_after_change(self, cf: CachedFile) -> None:
        """The backend said the file changed: drop its blocks and re-stat."""
        self._retire(cf)
        await self._revalidate(cf.file_id)

    async def ensure(self, cf: CachedFile, first: int, last: int, transfer: Transfer) -> None:
        """Make blocks first..last of *cf* present, fetching what no one else fetches.

        Raises Modified / Replan for the caller to re-plan, ReadFailed to fail.
        """
        bs = self.config.block_size
        while True:
            if cf.retired:
                raise Replan
            if cf.zero_from is not None:
                for b in range(max(first, -(-cf.zero_from // bs)), last + 1):
                    self.mark(cf, b)
            b = cf.present.find(0, first, last + 1)
            if b < 0:
                return
            self._runner.check_latches(cf)
            runs: list[tuple[int, int]] = []
            waits: list[Fetch] = []
            limit = max(1, self.config.max_fetch // bs)
            while b <= last:
                if cf.present[b]:
                    b += 1
                elif (f := cf.inflight.get(b)) is not None:
                    if not waits or waits[-1] is not f:
                        waits.append(f)  # type: ignore[arg-type]
                    b += 1
                else:
                    s = b
                    while (
                        b <= last and not cf.present[b] and b not in cf.inflight and b - s < limit
                    ):
                        b += 1
                    runs.append((s, b - 1))
            if runs:
                if transfer.kind is Kind.RANDOM:
                    transfer.last_block = runs[-1][1]
                else:
                    transfer.last_block = max(runs[-1][1], cf.present.rfind(0, first))
            fetches = [Fetch(s, e) for s, e in runs]
            for f in fetches:
                for blk in range(f.first, f.last + 1):
                    cf.inflight[blk] = f
            try:
                for f in fetches:
                    await self._runner.run(cf, f, transfer)
            finally:
                for f in fetches:
                    f.finish(cf)
            for f in waits:
                await f.done.wait()
                f.raise_error()

    def mark(self, cf: CachedFile, b: int) -> None:
        if not cf.present[b]:
            cf.present[b] = 1
            self.cached_bytes += self._block_len(cf, b)
            self._dirty.add(cf)

    def mark_dirty(self, cf: CachedFile) -> None:
        self._dirty.add(cf)

    def _unmark(self, cf: CachedFile, b: int) -> None:
        if cf.present[b]:
            cf.present[b] = 0
            self.cached_bytes -= self._block_len(cf, b)
            self._dirty.add(cf)

    def _block_len(self, cf: CachedFile, b: int) -> int:
        bs = self.config.block_size
        return min(bs, cf.size - b * bs)

    def _present_bytes(self, cf: CachedFile) -> int:
        n = cf.present.count(1) * self.config.block_size
        if cf.present and cf.present[-1]:
            n -= len(cf.present) * self.config.block_size - cf.size
        return n

    async def cancel_transfer(self, cf: CachedFile, transfer: Transfer) -> None:
        """Tell the backend a transfer with calls in flight ended early."""
        transfer.finished = True
        if self.external_error is not None or cf.error is not None:
            return
        if cf.file_id not in self._contexts:
            return
        req = ReadData(
            file_id=cf.file_id,
            size=cf.size,
            position=transfer.position,
            flags=transfer.cancel_flags(),
            buffer=memoryview(bytearray()),
            bytes_to_read=0,
            file_context=self._contexts[cf.file_id],
            version=cf.version,
        )
        await self._runner.call(req)

    async def close(self, fh: OpenFile) -> None:
        """Release the handle; an unfinished continuous transfer is canceled."""
        if fh.closed:
            return
        fh.closed = True
        self._open.discard(fh)
        t = fh.reader.continuous
        cf = self._files.get(fh.file_id)
        if t is not None and t.open and cf is not None:
            await self.cancel_transfer(cf, t)
        if fh.data is not None:
            fh.data.release()
            fh.data = None
        left = self._handles.get(fh.file_id, 1) - 1
        if left:
            self._handles[fh.file_id] = left
            return
        self._handles.pop(fh.file_id, None)
        await self._runner.close_context(fh.file_id)

    # -- latches and statistics ---------------------------------------------------

    async def reset_file_errors(self, file_id: str | None = None) -> list[str]:
        """Lift FILE_FAILURE latches (of one file, or all); returns the files reset."""
        reset = []
        for cf in list(self._files.values()):
            if cf.error is not None and file_id in (None, cf.file_id):
                cf.error = None
                self._dirty.add(cf)
                reset.append(cf.file_id)
        await self.flush()
        return reset

    async def reset_external_error(self) -> None:
        """Lift the PERMANENT_FAILURE latch: the backend is asked again."""
        self.external_error = None
        await self.flush()

    def file_errors(self) -> list[str]:
        return sorted(cf.file_id for cf in self._files.values() if cf.error is not None)

    def statistics(self) -> dict[str, Any]:
        errors = self.file_errors()
        return {
            **self.counters,
            "cached_bytes": self.cached_bytes,
            "files_in_error": len(errors),
            "file_errors": errors,
            "external_error": self.external_error,
            "block_size": self.config.block_size,
            "ttl": self.config.ttl,
            "cache_dir": str(self.cache_dir),
        }

    # -- persistence ----------------------------------------------------------------

    async def flush(self) -> None:
        """Commit metadata: sync written data files first, then one SQLite batch."""
        async with self._flush_lock:
            dirty, self._dirty = self._dirty, set()
            unsynced, self._unsynced = self._unsynced, set()
            deleted, self._deleted = self._deleted, []
            rows = [row_of(cf) for cf in dirty if not cf.retired]
            try:
                for data in unsynced:
                    await data.sync(self.disk_limiter)
                async with self._index.lock:
                    await trio.to_thread.run_sync(
                        self._write_index, rows, deleted, self.external_error
                    )
            except BaseException:
                self._dirty |= {cf for cf in dirty if not cf.retired}
                self._unsynced |= unsynced
                self._deleted += deleted
                raise

    def _write_index(self, rows: list[tuple], deleted: list[int], external: str | None) -> None:
        self._index.write_batch(rows, deleted)
        self._index.set_meta("external_error", external)

    def note_written(self, cf: CachedFile) -> None:
        assert cf.data is not None
        self._unsynced.add(cf.data)

    async def _serve_flusher(self) -> None:
        while True:
            await trio.sleep(self.config.flush_interval)
            if self._dirty or self._deleted:
                try:
                    await self.flush()
                except OSError as e:
                    log.error("cannot commit cache metadata: %s", e)

    async def _shutdown(self) -> None:
        for fh in list(self._open):
            with trio.move_on_after(5):
                await self.close(fh)
        await self._runner.close_all_contexts()
        await self.flush()


@asynccontextmanager
async def open_file_cache(
    backend: Backend,
    cache_dir: str | os.PathLike[str],
    config: CacheConfig = CacheConfig(),
    *,
    on_invalidate: Callable[[str], None] | None = None,
) -> AsyncIterator[FileCache]:
    """Open the cache in *cache_dir* (which must exist) over *backend*.

    Takes the directory's lock (CacheDirInUse if another live process holds
    it), loads or rebuilds the index, and runs the metadata flusher.  On exit
    open transfers are canceled and metadata is committed; the backend is
    left open (its owner closes it).
    """
    config.validate()
    path = Path(cache_dir).absolute()
    lock_fd = lock_cache_dir(path)
    try:
        index, files, external_error, repaired = await trio.to_thread.run_sync(
            open_index, path, config.block_size
        )
        try:
            cache = FileCache(backend, path, config, index, files, external_error, on_invalidate)
            cache._dirty.update(repaired)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cache._serve_flusher)
                try:
                    yield cache
                finally:
                    with trio.CancelScope(shield=True):
                        await cache._shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            index.close()
    finally:
        os.close(lock_fd)
