"""FileCache: reads served from the block cache, misses raised as ReadData.

Policy in short: a hit is a bitmap check and one pread (hit/); a miss plans
runs of missing blocks, fetches each run with ReadData calls (one fetcher
per block: other readers wait for it), writes whole blocks, then marks them
present (miss/).  Sequential readers get readahead.  The bitmap reaches
SQLite only after the data files are synced (Catalog.flush), so a crash
loses blocks, never trusts wrong ones.  A failing cache disk latches
(state/disk.py): reads go to the source uncached until it works again.

One version per handle (docs/SEMANTICS.md): an open binds the handle to the
version current at the last revalidation, and every read of the handle is
served from that version: its cached blocks (the handle holds the data file,
so they outlive a newer version), or the backend pinned to it.  A version
that is no longer current is read without storing.  When the backend says
the version is gone (FILE_MODIFIED_EXTERNALLY), what is not cached of it
fails with VersionGone, and the next open stats the file again.

FileCache is the front door; its collaborators are made in wiring.py, each
with the few others it needs, and the counters they share are one
:class:`~cachefs.engine.stats.Stats`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import cast

import trio

from cachefs.contract import (
    Backend,
    ContentInfo,
    DirEntry,
    FileAttrs,
    FileKind,
    WritableBackend,
)
from cachefs.engine.config import CacheConfig
from cachefs.engine.handle import OpenFile
from cachefs.engine.miss.ahead import Ahead
from cachefs.engine.miss.reads import MAX_REPLANS
from cachefs.engine.miss.supply import AddResult
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import NO_HASH
from cachefs.engine.stats import CacheStatistics
from cachefs.engine.wiring import wire
from cachefs.engine.write.copies import CopyStore, WorkingCopy
from cachefs.engine.write.flusher import WritableSource
from cachefs.engine.write.front import FlushReport, Writes, WriteStatistics
from cachefs.errors import (
    CacheDiskFailed,
    ChangeRefused,
    NotAFile,
    NotFound,
    PinLimitExceeded,
    ReadFailed,
    TransientFailure,
)

log = logging.getLogger(__name__)

#: How long closing the open handles may take when the cache closes, seconds.
CLOSE_DEADLINE = 5

__all__ = ["FileCache", "FlushReport", "OpenFile", "WriteStatistics"]

#: Bytes copied at a time into a working copy from the version it is made from.
FILL_STEP = 8 << 20


def read_only_reason(backend: Backend, config: CacheConfig, encrypted: bool) -> str | None:
    """Why a mount over *backend* takes no changes; None when it does."""
    if config.read_only:
        return "the mount is read-only (--read-only)"
    if not isinstance(backend, WritableBackend) or not backend.write_capabilities:
        return f"the source cannot be written ({backend!r})"
    if encrypted:
        return "writes to an encrypted cache are not supported yet"
    return None


class FileCache:
    """The read-through cache over one backend.  Create with
    :func:`~cachefs.engine.opening.open_file_cache`.

    Its background work (commits, trims, the disk probe, the hasher) runs
    in *nursery* from construction on, until that nursery is cancelled; call
    :meth:`aclose` first, which closes handles and commits.
    """

    def __init__(
        self,
        backend: Backend,
        cache_dir: Path,
        config: CacheConfig,
        catalog: Catalog,
        nursery: trio.Nursery,
        store: CopyStore | None = None,
    ) -> None:
        self.backend = backend
        self.cache_dir = cache_dir
        self.config = config
        self.catalog = catalog
        self._open: set[OpenFile] = set()
        self._handles: dict[tuple[str, str], int] = {}  # (file id, version) -> open handles
        parts = wire(
            backend, cache_dir, config, catalog, nursery, self._untrust, self._disk_recovered
        )
        self._stats = parts.stats
        self.disk = parts.disk
        self.evictor = parts.evictor
        self._committer = parts.committer
        self._attrs = parts.attrs
        self._content = parts.content
        self._hasher = parts.hasher
        self._hits = parts.hits
        self._whole = parts.whole
        self._source = parts.source
        self._misses = parts.misses
        self._supplier = parts.supplier
        self.max_fetch = parts.max_fetch
        self.max_readahead = parts.max_readahead
        if store is None:
            store = CopyStore(cache_dir / "dirty")
        self.read_only_reason = read_only_reason(backend, config, catalog.key is not None)
        writable = None if self.read_only_reason is not None else cast(WritableSource, backend)
        max_dirty = config.max_dirty if config.max_dirty is not None else self.evictor.limit // 2
        self._writes = Writes(
            writable,
            store,
            catalog,
            self._attrs,
            self._fill,
            config.write_back_delay,
            max_dirty,
            catalog.changed,
            trio.CapacityLimiter(4),
            self.read_only_reason or "",
        )
        self.evictor.outside = self._writes.disk_bytes
        self._ahead = Ahead(self.prefetch, nursery, self._stats)

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the write path: what a previous mount left changed is flushed."""
        await self._writes.start(nursery)

    @property
    def external_error(self) -> str | None:
        return self.catalog.external_error

    # -- attributes -----------------------------------------------------------------

    async def getattr(self, file_id: str) -> FileAttrs:
        """Attributes of *file_id*, asking the backend once the TTL has passed;
        those of its working copy while it has one."""
        wc = self._writes.copies.get(file_id)
        if wc is not None:
            return wc.attrs
        return await self._attrs.getattr(file_id)

    def known_attrs(self, file_id: str) -> FileAttrs | None:
        """The attributes of the version of *file_id* the cache serves now,
        without asking the backend; None if it holds none."""
        cf = self.catalog.files.get(file_id)
        return None if cf is None else cf.attrs

    def shown_attrs(self, file_id: str) -> FileAttrs | None:
        """What the mount shows of *file_id* now without asking the backend:
        its working copy's attributes while it is being changed, else
        :meth:`known_attrs`."""
        wc = self._writes.copies.get(file_id)
        return wc.attrs if wc is not None else self.known_attrs(file_id)

    async def revalidate(self, file_id: str) -> FileAttrs:
        """Ask the backend for *file_id* now, whatever the TTL (a group member
        heard it changed): a new version retires the cached one at once."""
        return await self._attrs.revalidate(file_id)

    def cached_bytes_of(self, file_id: str) -> int:
        """Bytes of the current version of *file_id* held in the cache."""
        cf = self.catalog.files.get(file_id)
        return 0 if cf is None else self.catalog.present_bytes(cf)

    def content_of(self, file_id: str) -> ContentInfo | None:
        """The content information of the version of *file_id* the cache holds
        whole, from the hashes it computed of the bytes it stored; None while a
        block is missing or its hash is still to come, or when a hash came with
        ``add-data --trust`` (it vouches for nothing)."""
        cf = self.catalog.files.get(file_id)
        if cf is None or cf.retired or cf.hashes is None or cf.unhashed:
            return None
        if cf.present.find(0) >= 0 or (cf.trusted is not None and cf.trusted.find(1) >= 0):
            return None
        hashes = bytes(cf.hashes)
        blocks = tuple(hashes[i : i + 32] for i in range(0, len(hashes), 32))
        if len(blocks) != len(cf.present) or NO_HASH in blocks:
            return None
        return ContentInfo(cf.version, cf.size, self.config.block_size, blocks)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        """The entries of *dir_id*; the last listing seen is served while offline.
        Files being changed show as their working copies, new ones included."""
        entries = await self._attrs.list_dir(dir_id)
        copies = self._writes.copies
        if not copies:
            return entries
        prefix = f"{dir_id}/" if dir_id else ""
        mine = {
            f[len(prefix) :]: wc
            for f, wc in copies.items()
            if f.startswith(prefix) and "/" not in f[len(prefix) :]
        }
        if not mine:
            return entries
        out = [DirEntry(e.name, mine.pop(e.name).attrs) if e.name in mine else e for e in entries]
        out += [DirEntry(name, wc.attrs) for name, wc in mine.items()]
        return out

    # -- reading --------------------------------------------------------------------

    async def open(self, file_id: str, *, write: bool = False, truncate: bool = False) -> OpenFile:
        """A handle reading the version of *file_id* current at its last
        revalidation (the backend is asked again past the TTL).

        Every read of the handle is of that version, or fails (VersionGone).
        While the file has a working copy (it is being changed), the handle
        reads it instead; *write* makes one (from the current version, whole;
        empty with *truncate*) and the handle may write it.  ReadOnly on a
        mount that takes no changes.
        """
        wc = self._writes.copies.get(file_id)
        if write or truncate:
            wc = await self._writes.copy_of(file_id, truncate)
        if wc is not None:
            # A truncating open changed the file: its close is a writer's.
            return self._wc_handle(wc, write or truncate)
        return await self._open_version(file_id)

    def _wc_handle(self, wc: WorkingCopy, write: bool) -> OpenFile:
        fh = OpenFile.of_copy(wc, write)
        self._writes.opened(wc, write)
        self._open.add(fh)
        # Handles already reading the version it was made from read it now
        # (a handle the kernel reads by itself cannot be turned: it keeps its version).
        if wc.header.base_version:
            for other in self._open:
                if (
                    other.wc is None
                    and other.file_id == wc.file_id
                    and other.whole is None
                    and other.cf.version == wc.header.base_version
                ):
                    other.wc = wc
                    self._writes.opened(wc, False)
        return fh

    def attrs_of(self, fh: OpenFile) -> FileAttrs:
        """What the file *fh* reads is now: its working copy's size and time
        (even once unlinked or renamed), or the version it was opened at."""
        return fh.wc.attrs if fh.wc is not None else fh.attrs

    def has_working_copy(self, file_id: str) -> bool:
        """Whether *file_id* is being changed (never open it with passthrough)."""
        return file_id in self._writes.copies

    async def _open_version(self, file_id: str) -> OpenFile:
        attrs = await self._attrs.getattr(file_id)
        if attrs.kind is not FileKind.FILE:
            raise NotAFile(f"{file_id or '/'}: not a regular file")
        cf = self._attrs.row(file_id, attrs)
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
        if fh.wc is not None:
            return None
        return self._whole.open_for_kernel(fh)

    def let_go_whole(self, fh: OpenFile) -> None:
        """Give back what :meth:`hold_whole` held for *fh* before it closes (unused)."""
        self._whole.let_go(fh)

    def held_whole(self) -> list[str]:
        """The files held whole for open handles (see :meth:`hold_whole`)."""
        return sorted(cf.file_id for cf in self.catalog.files.values() if cf.held)

    async def read(self, fh: OpenFile, offset: int, length: int) -> bytes | bytearray | memoryview:
        """Up to *length* bytes at *offset*; empty at or past the end of the file.

        A memoryview is a view of the cache's pages (_linux/mapped.py) or
        of a buffer lent to it (hit/direct.py): use it before the next
        await, or copy it.
        """
        wc = fh.wc
        if wc is not None:
            return await self._writes.read(wc, offset, length)
        cf = fh.cf
        end = min(offset + length, cf.size)
        if offset >= end:
            return b""
        if self._content.hashing and not cf.info_asked and cf.content_hash is None:
            await self._content.ensure_info(cf)  # once per version per process
        reader = fh.reader
        sequential, ended = reader.observe(offset, end)
        if ended is not None:
            await self._misses.end_run(cf, ended)
        bs = self.config.block_size
        first, last = offset // bs, (end - 1) // bs
        if sequential and reader.run_reads >= 2 and self.max_readahead:
            misses = self._misses
            if misses.storing(cf):
                misses.read_ahead(fh, cf, end)
        if cf.present.find(0, first, last + 1) < 0:
            data = await self._hits.serve(fh, cf, offset, end, sequential)
            if data is not None:
                self._stats.hit_bytes += len(data)
                return data
        self._stats.miss_bytes += end - offset
        return await self._misses.read(fh, offset, end, sequential)

    async def close(self, fh: OpenFile) -> None:
        """Release the handle; an unfinished continuous transfer is canceled,
        and what it fetched is committed soon (Committer.commit_soon)."""
        if fh.closed:
            return
        fh.closed = True
        self._open.discard(fh)
        if fh.wc is not None:
            await self._writes.closed(fh.wc, fh.writer)
            if fh.detached:
                return
        cf = fh.cf
        ended = fh.reader.detach()
        if ended is not None:
            await self._misses.end_run(cf, ended)
        self._hits.forget(fh)
        self._whole.release(fh)
        if fh.data is not None:
            fh.data.release()
            fh.data = None
        cf.handles -= 1
        if cf.retired and not cf.handles:
            assert cf.data is not None
            cf.data.unlink()
        elif cf.unsynced:
            # What it fetched is synced and committed soon, not at the next
            # flush interval: a read of it from the cache disk after the
            # page cache let it go would otherwise wait for a sync.
            self._committer.commit_soon()
        key = (cf.file_id, cf.version)
        left = self._handles.get(key, 1) - 1
        if left:
            self._handles[key] = left
            return
        self._handles.pop(key, None)
        await self._source.close_context(*key)

    # -- changes (engine/write/) ----------------------------------------------------

    @property
    def writable(self) -> bool:
        """Whether the mount takes changes (else every change raises ReadOnly)."""
        return self._writes.writable

    async def _fill(self, wc: WorkingCopy, attrs: FileAttrs) -> None:
        """Copy the version *attrs* names into *wc*, whole, through the cache."""
        fh = await self._open_version(wc.file_id)
        try:
            if fh.attrs.version != attrs.version:
                raise TransientFailure(f"{wc.file_id}: changed while being opened for writing")
            size, at = fh.attrs.size, 0
            while at < size:
                data = await self.read(fh, at, FILL_STEP)
                if not data:
                    raise ReadFailed(f"{wc.file_id}: the source ended at {at} of {size} bytes")
                chunk = bytes(data)
                await trio.to_thread.run_sync(wc.fill_at, at, chunk)
                at += len(chunk)
        finally:
            with trio.CancelScope(shield=True):
                await self.close(fh)

    async def create(self, file_id: str, mode: int, *, exclusive: bool) -> OpenFile:
        """A new empty file open for writing (or, unless *exclusive*, the
        existing one cut to nothing); ChangeRefused(EEXIST) when *exclusive*
        and it exists."""
        wc, _ = await self._writes.create(file_id, mode, exclusive)
        return self._wc_handle(wc, True)

    async def write(self, fh: OpenFile, offset: int, data: bytes | memoryview) -> int:
        """Store *data* at *offset* of the file of *fh* (a handle opened to write)."""
        if fh.wc is None or not fh.writer:
            raise ChangeRefused(f"{fh.file_id}: not open for writing", errno.EBADF)
        return await self._writes.write(fh.wc, offset, data)

    async def set_size(self, file_id: str, size: int, fh: OpenFile | None = None) -> FileAttrs:
        """Cut or extend *file_id* to *size* bytes; through *fh* (ftruncate),
        the file that handle writes, whatever its name now."""
        if fh is not None and fh.wc is not None and fh.writer:
            wc = fh.wc
        else:
            wc = await self._writes.copy_of(file_id, truncate=size == 0)
        if wc.size == size:
            return wc.attrs
        return await self._writes.set_size(wc, size)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> FileAttrs:
        """Change the mode (permission bits) and modification time of *file_id* (None: keep)."""
        return await self._writes.set_attrs(file_id, mode, mtime)

    async def fsync(self, fh: OpenFile) -> None:
        """Return once the backend has what was written to the file of *fh*
        (durable in the cache first); WriteFailed if it could not be sent."""
        if fh.wc is not None:
            await self._writes.fsync(fh.wc)

    def flushes_on_close(self, fh: OpenFile) -> bool:
        """Whether a close of *fh* has work for :meth:`flush_on_close`."""
        return fh.wc is not None and fh.writer and self.config.write_back_delay == 0

    async def flush_on_close(self, fh: OpenFile) -> None:
        """A close of *fh* (FUSE FLUSH): with write_back_delay 0 the changes
        are flushed before it returns."""
        if self.flushes_on_close(fh):
            assert fh.wc is not None
            await self._writes.fsync(fh.wc)

    async def make_dir(self, dir_id: str, mode: int) -> FileAttrs:
        return await self._writes.make_dir(dir_id, mode)

    async def make_symlink(self, file_id: str, target: str) -> FileAttrs:
        return await self._writes.make_symlink(file_id, target)

    async def remove_file(self, file_id: str) -> None:
        await self._writes.remove_file(file_id)

    async def remove_dir(self, dir_id: str) -> None:
        await self._writes.remove_dir(dir_id)

    async def rename(self, old_id: str, new_id: str, *, replace: bool = True) -> None:
        await self._writes.rename(old_id, new_id, replace)

    def space(self) -> tuple[int, int]:
        """(the cache's limit, bytes left for new data): what statfs shows."""
        limit = self.evictor.limit
        return limit, max(
            0,
            min(
                limit - self._writes.disk_bytes() - self.catalog.pinned_bytes,
                self.evictor.disk_free(),
            ),
        )

    async def flush_files(
        self,
        file_ids: Collection[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> FlushReport:
        """Flush the changes to *file_ids* (every changed file when None) now."""
        return await self._writes.flush_files(file_ids, progress)

    def changed_files(self) -> list[str]:
        """The files whose changes the source does not have yet (latched ones too)."""
        return sorted(f for f, wc in self._writes.copies.items() if wc.dirty)

    def write_statistics(self) -> WriteStatistics:
        return self._writes.statistics()

    def activity(self) -> dict[str, list[tuple[str, str]]]:
        """What the cache is busy with now, for a state dump of a mount that
        seems stuck (cachefs.daemon.dump): (file id, what) pairs under
        ``handles`` (each file's open handles), ``fetches`` (blocks held by a
        fetch, an eviction or a supply), ``writes`` (changed files, flushing
        or waiting) and ``queues`` (no file id).  Reads only; the texts hold
        no name but the file ids."""
        opened: dict[str, list[OpenFile]] = {}
        for fh in self._open:
            opened.setdefault(fh.file_id, []).append(fh)
        handles = [
            (
                file_id,
                f"handles={len(fhs)} versions={len({fh.cf.version for fh in fhs})}"
                f" writing={sum(fh.writer for fh in fhs)}"
                f" on_working_copy={sum(fh.wc is not None for fh in fhs)}"
                f" read_by_kernel={sum(fh.whole is not None for fh in fhs)}",
            )
            for file_id, fhs in sorted(opened.items())
        ]
        held = {id(cf): cf for cf in self.catalog.files.values() if cf.inflight}
        held.update((id(fh.cf), fh.cf) for fh in self._open if fh.cf.inflight)
        fetches = []
        for cf in held.values():
            runs = sorted({(f.first, f.last) for f in (cf.inflight or {}).values()})
            fetches.append((cf.file_id, "blocks " + ", ".join(f"{a}-{b}" for a, b in runs)))
        writes = [
            (
                wc.file_id,
                f"dirty_bytes={wc.dirty_bytes} "
                + ("flushing" if wc.flushing else "latched" if wc.header.error else "waiting"),
            )
            for wc in self._writes.copies.values()
            if wc.dirty or wc.flushing
        ]
        queues = [
            ("", f"blocks waiting for their hash: {self._hasher.backlog}"),
            ("", f"open handles: {len(self._open)}"),
        ]
        return {
            "handles": handles,
            "fetches": sorted(fetches),
            "writes": sorted(writes),
            "queues": queues,
        }

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
            fh = await self._open_version(file_id)  # the current version, stat again after a change
            try:
                if await self._misses.fetch_whole(fh.cf):
                    return
            finally:
                await self.close(fh)
        raise TransientFailure(f"{file_id}: the file kept changing while being fetched")

    def fetch_ahead(self, file_ids: Iterable[str]) -> None:
        """Fetch *file_ids* whole in the background, those the cache does not
        hold whole: a reader is expected to open them next (miss/ahead.py)."""
        files = self.catalog.files
        self._ahead.want(
            f
            for f in file_ids
            if (cf := files.get(f)) is None or cf.retired or cf.present.find(0) >= 0
        )

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

    def pinned(self) -> list[str]:
        return sorted(cf.file_id for cf in self.catalog.files.values() if cf.pinned)

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
        self.catalog.forget_eof(cf)
        if not cf.retired:
            self._content.forget_trusted(cf)
        return freed

    async def _drop_blocks(self, cf: CachedFile, first: int) -> int:
        """Drop the cached blocks of *cf* from block *first* on; the bytes freed."""
        if cf.unhashed:  # their hashes outlive them (add-data checks against them)
            await self._hasher.drain()
        return await self.evictor.drop_from(cf, first)

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
                self.catalog.forget_eof(cf)
                done = True
            if done:
                reset.append(cf.file_id)
        await self.commit_if_usable()
        reset += self._writes.reset_latches(file_ids)
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
        self._writes.resume()

    def statistics(self) -> CacheStatistics:
        errors = self.catalog.file_errors()
        stats = self._stats
        hits, misses = stats.hit_bytes, stats.miss_bytes
        return {
            **stats.as_dict(),
            "read_data_results": dict(stats.read_data_results),
            "read_data_seconds": stats.read_data_seconds.data(),
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
            "cache_disk_error": self.disk.error,
            "cache_disk_failures": self.disk.failures,
            "unhashed_blocks": self._hasher.backlog,
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
        await self._hasher.drain()
        await self.commit()

    async def commit(self) -> None:
        """Commit metadata now; CacheDiskFailed if the cache disk fails (or failed)."""
        await self._committer.commit()

    async def commit_if_usable(self) -> None:
        """Commit now, unless the cache disk is latched (its probe commits once
        it works again); blocks still waiting for their hash are committed
        later."""
        await self._committer.commit_if_usable()

    def _untrust(self) -> None:
        """The cache disk may have lost or damaged data (state/disk.py):
        blocks written since the last sync are dropped, every other one is
        checked against its hash before it is served again."""
        self.catalog.untrust_unsynced()
        self._disk_recovered(True)

    def _disk_recovered(self, suspect: bool) -> None:
        if suspect:  # what it returned before it failed is checked again
            for cf in {*self.catalog.files.values(), *(fh.cf for fh in self._open)}:
                cf.verified = None

    async def aclose(self) -> None:
        """Close the open handles, end their transfers and commit metadata;
        the background work stops with the nursery (:func:`open_file_cache`
        does all this on exit)."""
        try:
            # All at once: handles whose transfers hang (a source that stopped
            # answering) cost the deadline once, not once each.
            with trio.move_on_after(CLOSE_DEADLINE):
                async with trio.open_nursery() as nursery:
                    for fh in list(self._open):
                        nursery.start_soon(self.close, fh)
            await self._source.close_all_contexts()
            try:
                await self.flush()
            except CacheDiskFailed as e:
                log.error(
                    "cannot commit the cache index (%s): blocks fetched since its last commit"
                    " will be fetched again",
                    e,
                )
        finally:
            self.catalog.close_kept()
            self._hits.close()
            self._hasher.close()
