"""What the cache holds, in memory, and how it reaches the index.

The catalog is the in-memory mirror the hit path reads (one CachedFile per
file, a byte per block) and the only writer of the index.  Its rule: data
first, metadata second.  ``flush`` syncs every data file written since the
last commit before it commits the bitmaps, so a block marked present on disk
always has its bytes; a block counts as unsynced until that sync is done.
Eviction runs the other way round (clear, commit, then punch), which the
evictor does through ``unmark`` and ``flush``.

The data files most recently written or read keep their fd open after
their last holder lets go (a bounded LRU, a quarter of the fd limit at
most): opening a cached file again then needs no path lookup, and its
inode stays in memory when the kernel drops its caches.  The fd is a
version's own (a new version has a new data file), and is closed when the
version is retired, when it falls off the LRU, and at close.
"""

from __future__ import annotations

import logging
import resource
from array import array
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from cachefs.contract import FileAttrs, FileKind
from cachefs.engine.state.index import CachedFile, Index, block_count, row_of
from cachefs.engine.state.store import DataFile, sync_files

if TYPE_CHECKING:
    from cachefs.engine.state.crypto import CacheKey

log = logging.getLogger(__name__)

#: At most this many data files kept open (each may hold a second, O_DIRECT fd).
KEEP_OPEN = 4096


def keep_open_limit() -> int:
    """How many data files to keep open: KEEP_OPEN, or a quarter of the fd limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return KEEP_OPEN if soft == resource.RLIM_INFINITY else min(KEEP_OPEN, soft // 4)


class Catalog:
    def __init__(
        self,
        index: Index,
        data_dir: Path,
        block_size: int,
        files: list[CachedFile],
        external_error: str | None,
        on_invalidate: Callable[[str], None] | None,
        key: CacheKey | None = None,
        next_row: int = 1,
    ) -> None:
        self.index = index
        self.key = key
        self.data_dir = data_dir
        self.block_size = block_size
        self.files: dict[str, CachedFile] = {cf.file_id: cf for cf in files}
        self.other: dict[str, tuple[FileAttrs, float]] = {}
        # Per directory, when it was listed and the files it showed that have
        # no row yet (a stat spared each: a row is made when one is opened);
        # oldest listing first.
        self._listed: OrderedDict[str, tuple[float, dict[str, FileAttrs]]] = OrderedDict()
        #: Paths forgotten so far (a listing under way when one was is not kept).
        self.forgotten = 0
        # What a file's next version inherits from its last (error, pinned),
        # for files whose version was retired before the next was learned.
        self._carry: dict[str, tuple[str | None, bool]] = {}
        self.external_error = external_error
        self.dirty: set[CachedFile] = set()
        self._unsynced: set[DataFile] = set()
        self._deleted: list[int] = []
        # Row ids are never reused: a sealed block is bound to its row.
        self._next_row = max(next_row, max((cf.row_id for cf in files), default=0) + 1)
        self._on_invalidate = on_invalidate
        self._flush_lock = trio.Lock()
        self.cached_bytes = sum(self.present_bytes(cf) for cf in files)
        self.pinned_bytes = sum(cf.size for cf in files if cf.pinned)
        self.tick = 1  # LRU clock: one step per read
        # Data files kept open, least recently used first; each holds one acquire.
        self._kept: OrderedDict[DataFile, None] = OrderedDict()
        self.keep_limit = keep_open_limit()

    # -- versions -------------------------------------------------------------------

    def learn(self, file_id: str, attrs: FileAttrs, now: float) -> FileAttrs:
        """Record what the backend says *file_id* is; a new version drops the old one."""
        cf = self.files.get(file_id)
        self._unlist(file_id)
        if attrs.kind is not FileKind.FILE:
            if cf is not None:
                self.retire(cf)
            self.other[file_id] = (attrs, now)
            return attrs
        self.other.pop(file_id, None)
        if cf is None or cf.version != attrs.version or cf.size != attrs.size:
            if cf is not None:
                self.retire(cf)
            error, pinned = self._carry.pop(file_id, (None, False))
            cf = self._new_file(file_id, attrs, error, pinned)
        else:
            cf.mtime, cf.mode = attrs.mtime, attrs.mode
        cf.validated_at = now
        return cf.attrs

    def forget(self, file_id: str) -> None:
        """The path is gone from the source."""
        self.forgotten += 1
        self._unlist(file_id)
        if file_id in self.other or file_id in self._listed:  # a directory: and below it
            below = f"{file_id}/"
            for d in [d for d in self._listed if d == file_id or d.startswith(below)]:
                del self._listed[d]
            for p in [p for p in self.other if p.startswith(below)]:
                del self.other[p]
        self.other.pop(file_id, None)
        cf = self.files.get(file_id)
        if cf is not None:
            self.retire(cf)
        self._carry.pop(file_id, None)

    def note_listing(
        self, dir_id: str, when: float, files: dict[str, FileAttrs], ttl: float
    ) -> None:
        """*dir_id* was listed at *when* showing *files* (by name) that have no
        row: each stands in for a stat until *ttl* has passed."""
        self._listed.pop(dir_id, None)
        self._listed[dir_id] = (when, files)
        while self._listed:  # the expired ones, oldest first
            oldest = next(iter(self._listed.values()))
            if when - oldest[0] < ttl:
                break
            self._listed.popitem(last=False)

    def listed(self, file_id: str) -> tuple[FileAttrs, float] | None:
        """What the last listing of its directory showed of *file_id* (a file
        with no row), and when; None if it showed nothing of it."""
        parent, _, name = file_id.rpartition("/")
        got = self._listed.get(parent)
        if got is None:
            return None
        attrs = got[1].get(name)
        return None if attrs is None else (attrs, got[0])

    def _unlist(self, file_id: str) -> None:
        parent, _, name = file_id.rpartition("/")
        got = self._listed.get(parent)
        if got is not None:
            got[1].pop(name, None)

    def _new_file(
        self, file_id: str, attrs: FileAttrs, error: str | None, pinned: bool
    ) -> CachedFile:
        row_id, self._next_row = self._next_row, self._next_row + 1
        n = block_count(attrs.size, self.block_size)
        cf = CachedFile(
            row_id=row_id,
            file_id=file_id,
            version=attrs.version,
            size=attrs.size,
            mtime=attrs.mtime,
            mode=attrs.mode,
            present=bytearray(n),
            error=error,
            pinned=pinned,
        )
        cf.data = self.data_file(cf)
        self.files[file_id] = cf
        if pinned:
            self.pinned_bytes += cf.size
        if error is not None or pinned:
            self.dirty.add(cf)
        return cf

    def data_file(self, cf: CachedFile) -> DataFile:
        return DataFile(
            f"{self.data_dir}/{cf.row_id}",
            cf.size,
            self.block_size,
            self.key,
            cf.row_id,
            cf.version,
        )

    def retire(self, cf: CachedFile) -> None:
        """Drop this version (the source has another, or none): its row goes
        and its data file is unlinked; handles holding the file keep reading
        the blocks it has.  Its latch and pin pass to the next version."""
        if cf.retired:
            return
        cf.retired = True
        self.cached_bytes -= self.present_bytes(cf)
        if cf.pinned:
            self.pinned_bytes -= cf.size
        assert cf.data is not None
        cf.data.retire()
        if not cf.handles:  # else the last handle to close removes it
            cf.data.unlink()
        if cf.data in self._kept:
            del self._kept[cf.data]
            cf.data.release()
        self._deleted.append(cf.row_id)
        self.dirty.discard(cf)
        if self.files.get(cf.file_id) is cf:
            del self.files[cf.file_id]
            if cf.error is not None or cf.pinned:
                self._carry[cf.file_id] = (cf.error, cf.pinned)
        if self._on_invalidate is not None:
            self._on_invalidate(cf.file_id)

    def changed(self, file_id: str) -> None:
        """*file_id* changed through this mount (the write path): tell whoever
        listens, as for a dropped version."""
        if self._on_invalidate is not None:
            self._on_invalidate(file_id)

    def set_pinned(self, cf: CachedFile, pinned: bool) -> None:
        if cf.pinned != pinned:
            cf.pinned = pinned
            self.pinned_bytes += cf.size if pinned else -cf.size
            self.dirty.add(cf)

    # -- blocks ---------------------------------------------------------------------

    def mark(self, cf: CachedFile, b: int) -> None:
        if not cf.present[b]:
            cf.present[b] = 1
            self.touch(cf, b, b)  # a fresh block is recent: evict older ones first
            if cf.unsynced is None:
                cf.unsynced = set()
            cf.unsynced.add(b)
            self._keep(cf.data)
            self.cached_bytes += self.block_len(cf, b)
            self.dirty.add(cf)

    def unmark(self, cf: CachedFile, b: int) -> None:
        if cf.present[b]:
            cf.present[b] = 0
            cf.epoch += 1
            if cf.unsynced:
                cf.unsynced.discard(b)
            if cf.unhashed:
                cf.unhashed.pop(b, None)
            if not cf.retired:  # a retired version's bytes were counted out already
                self.cached_bytes -= self.block_len(cf, b)
                self.dirty.add(cf)

    def forget_eof(self, cf: CachedFile) -> None:
        """Forget where a RANGE_BEYOND_EOF said *cf* ends (its zeros are dropped)."""
        if cf.zero_from is not None:
            cf.zero_from = None
            self.dirty.add(cf)

    def forget_blocks(self, cf: CachedFile, first: int, last: int) -> None:
        """Blocks first..last of *cf* cannot be read back: fetch them again."""
        for b in range(first, last + 1):
            self.unmark(cf, b)

    def lost(self, cf: CachedFile, offset: int, end: int, why: str = "is short") -> None:
        """The data file cannot give bytes [offset, end) it should hold:
        forget their blocks (the next read fetches them again)."""
        log.warning("cache data of %s %s: fetching it again", cf.file_id, why)
        self.forget_blocks(cf, offset // self.block_size, (end - 1) // self.block_size)

    def hold_data(self, cf: CachedFile) -> int:
        """Acquire *cf*'s data file (release it with ``cf.data.release()``).

        A data file that was gone or cut short (someone else's doing) loses
        every block it was said to hold, so none is read back as zeros.
        Raises what opening it raises.
        """
        data = cf.data
        assert data is not None
        fd = data.acquire()
        if data.remade is not None:
            cut, data.remade = data.remade, None
            first = cut // self.block_size
            if cf.present.find(1, first) >= 0:
                self.lost(cf, first * self.block_size, cf.size, "was gone or cut short")
        self._keep(data)
        return fd

    def _keep(self, data: DataFile | None) -> None:
        """Keep *data*'s fd open, if it is open (see the module docstring)."""
        if data is None:
            return
        kept = self._kept
        if data in kept:
            kept.move_to_end(data)
            return
        if data.fd is None or data.retired or not self.keep_limit:
            return
        data.acquire()
        kept[data] = None
        if len(kept) > self.keep_limit:
            kept.popitem(last=False)[0].release()

    def close_kept(self) -> None:
        """Close the data files kept open (the cache is closing)."""
        kept, self._kept = self._kept, OrderedDict()
        for data in kept:
            data.release()

    def untrust_unsynced(self) -> None:
        """The cache disk may have lost what it was given since the last sync:
        forget those blocks, and check every other one again before serving it."""
        for cf in list(self.files.values()):
            for b in sorted(cf.unsynced or ()):
                self.unmark(cf, b)
            cf.verified = None

    def touch(self, cf: CachedFile, first: int, last: int) -> None:
        """Note a read of blocks first..last for LRU."""
        tick, self.tick = self.tick, self.tick + 1
        atime = cf.atime
        if atime is None:
            atime = cf.atime = array("Q", bytes(8 * len(cf.present)))
        if first == last:
            atime[first] = tick
        else:
            atime[first : last + 1] = array("Q", [tick]) * (last - first + 1)

    def block_len(self, cf: CachedFile, b: int) -> int:
        return min(self.block_size, cf.size - b * self.block_size)

    def present_bytes(self, cf: CachedFile) -> int:
        n = cf.present.count(1) * self.block_size
        if cf.present and cf.present[-1]:
            n -= len(cf.present) * self.block_size - cf.size
        return n

    def note_written(self, cf: CachedFile) -> None:
        assert cf.data is not None
        self._unsynced.add(cf.data)

    def file_errors(self) -> list[str]:
        return sorted(cf.file_id for cf in self.files.values() if cf.error is not None)

    # -- commits --------------------------------------------------------------------

    @property
    def needs_flush(self) -> bool:
        return bool(self.dirty or self._deleted)

    async def flush(self, disk_limiter: trio.CapacityLimiter) -> None:
        """Commit metadata: sync written data files first, then one SQLite batch."""
        async with self._flush_lock:
            dirty, self.dirty = self.dirty, set()
            unsynced, self._unsynced = self._unsynced, set()
            deleted, self._deleted = self._deleted, []
            # Everything marked so far was written before this sync starts. It
            # stays unsynced until its own data file is synced: a reader of it
            # from the cache disk meanwhile syncs first (hit/reader.py).
            marked: dict[DataFile | None, list[tuple[CachedFile, set[int], int]]] = {}
            for cf in dirty:
                if cf.unsynced:
                    marked.setdefault(cf.data, []).append((cf, set(cf.unsynced), cf.epoch))
            synced: set[DataFile] = set()

            def on_synced(data: DataFile) -> None:
                synced.add(data)
                _clear_synced(marked.pop(data, []))

            try:
                await sync_files(unsynced, disk_limiter, on_synced)
                # No sync vouched for the rest (a data file found gone or cut
                # short: acquire finds it remade): still unsynced, and synced
                # again by the next commit.
                self._unsynced |= {data for data in marked if data is not None}
                # Built now: what is still unsynced is committed as absent.
                rows = [row_of(cf, True, self.key) for cf in dirty if not cf.retired]
                async with self.index.lock:
                    await trio.to_thread.run_sync(self._write, rows, deleted, self.external_error)
            except BaseException:
                # What was synced is on disk; the rest is still to be trusted
                # only once synced (CacheDisk: a failed sync may have lost it).
                self.dirty |= {cf for cf in dirty if not cf.retired}
                self._unsynced |= unsynced - synced
                self._deleted += deleted
                raise

    async def commit_cleared(self, files: list[CachedFile]) -> None:
        """Commit the bitmaps of *files* now, without syncing data.

        For eviction: bits it cleared reach the index before the holes are
        punched; blocks not yet synced are written as absent (the next flush
        commits them properly).
        """
        async with self._flush_lock:
            rows = [row_of(cf, True, self.key) for cf in files if not cf.retired]
            async with self.index.lock:
                await trio.to_thread.run_sync(self._write, rows, [], self.external_error)

    def _write(self, rows: list[tuple], deleted: list[int], external: str | None) -> None:
        self.index.write_batch(rows, deleted)
        if external is not None and self.key is not None:  # it may name a file
            external = "sealed:" + self.key.seal(external.encode(), b"external_error").hex()
        self.index.set_meta("external_error", external)
        self.index.set_meta("next_row", str(self._next_row))


def _clear_synced(marked: list[tuple[CachedFile, set[int], int]]) -> None:
    """The *marked* blocks of each file are on disk now, unless a block of
    it was dropped since (its epoch moved): one dropped and written again
    while the sync ran may hold bytes the sync did not cover."""
    for cf, blocks, epoch in marked:
        if cf.unsynced and cf.epoch == epoch:
            cf.unsynced -= blocks
            if not cf.unsynced:
                cf.unsynced = None
