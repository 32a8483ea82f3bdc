"""The write path's front: changes to files and names, as the engine takes them.

Policy:

* File content is written back: a change lands in the file's working copy
  (write/copies.py) and is answered; the flusher (write/flusher.py) sends
  it later.  A working copy of an existing file is made whole from the
  version the cache serves (through the cache, so what it holds is not
  fetched again) before the first change is taken.
* Names are written through: mkdir, rmdir, unlink, rename, symlink and
  attribute changes are asked of the backend at once and answered with
  its result; only a file that exists as a working copy alone (created
  here, never flushed) changes in the cache without asking it.  While the
  storage is latched offline, those changes fail (EIO); content changes
  keep landing in the cache.
* A flushed copy is dropped once no handle has it open: the file is the
  source's again, and the engine asks the source for its new version.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field

import trio

from cachefs.contract import ChangeResult, FileAttrs, FileKind, RWResult, WriteCapability
from cachefs.engine.attrs import Attributes
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.write.copies import INLINE_IO, PAGE, CopyStore, WorkingCopy
from cachefs.engine.write.flusher import Flusher, WritableSource, WriteCounters
from cachefs.errors import (
    CacheDiskFailed,
    CacheFSError,
    ChangeRefused,
    NoSpace,
    NotFound,
    ReadOnly,
    StorageQuarantined,
    TransientFailure,
    WriteFailed,
)

log = logging.getLogger(__name__)

#: fill(wc, attrs): copy the version *attrs* names into *wc*, whole.
Fill = Callable[[WorkingCopy, FileAttrs], Awaitable[None]]


@dataclass(slots=True)
class FlushReport:
    flushed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class WriteStatistics:
    dirty_files: int
    dirty_bytes: int
    flushing: int
    flushed_files: int
    flushed_bytes: int
    conflicts: int
    write_failures: int
    write_data_calls: int
    latched: list[str]
    max_dirty: int
    write_back_delay: float
    read_only: bool


#: What an unknown parent directory is taken for while the storage is offline.
_SOME_DIR = FileAttrs(FileKind.DIR, 0, 0.0, "")


def _parent(file_id: str) -> str:
    return file_id.rpartition("/")[0]


def _disk_error(wc: WorkingCopy, e: OSError) -> CacheFSError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"{wc.file_id}: the cache disk is full: {e.strerror}")
    return CacheDiskFailed(f"{wc.file_id}: the cache disk failed: {e.strerror or e}")


class Writes:
    """Changes through the cache (see the module docstring).  ``backend`` is
    None on a read-only mount: every change then raises ReadOnly."""

    def __init__(
        self,
        backend: WritableSource | None,
        store: CopyStore,
        catalog: Catalog,
        attrs: Attributes,
        fill: Fill,
        write_back_delay: float,
        max_dirty: int,
        on_changed: Callable[[str], None],
        disk_limiter: trio.CapacityLimiter,
        read_only_reason: str = "the mount is read-only",
    ) -> None:
        self.backend = backend
        self.caps = backend.write_capabilities if backend is not None else WriteCapability(0)
        self.store = store
        self.copies = store.copies
        self._catalog = catalog
        self._attrs = attrs
        self._fill = fill
        self._on_changed = on_changed
        self._disk_limiter = disk_limiter
        self._read_only_reason = read_only_reason
        self._making: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.counters = WriteCounters()
        self.flusher: Flusher | None = None
        if backend is not None:
            self.flusher = Flusher(
                backend,
                store,
                catalog,
                self.counters,
                write_back_delay,
                max_dirty,
                self._flushed,
                disk_limiter,
            )
            self.flusher.on_clean = self._maybe_drop
            self.flusher.dirty_bytes = sum(wc.dirty_bytes for wc in store.copies.values())
        self.write_back_delay = write_back_delay
        self.max_dirty = max_dirty

    @property
    def writable(self) -> bool:
        return self.flusher is not None

    def _flusher(self) -> Flusher:
        if self.flusher is None:
            raise ReadOnly(self._read_only_reason)
        return self.flusher

    async def start(self, nursery: trio.Nursery) -> None:
        """Flush what a previous mount left dirty; drop what it left clean."""
        self._nursery = nursery
        for wc in list(self.copies.values()):
            if not wc.dirty and wc.header.error is None:
                await self._run(self.store.drop, wc)
        if self.flusher is not None:
            for wc in self.copies.values():
                if wc.dirty:
                    self.flusher.schedule(wc, 0)
            nursery.start_soon(self.flusher.serve)
        elif self.copies:
            log.warning(
                "%d changed files wait in the cache to be flushed; mount read-write to flush them",
                len(self.copies),
            )

    async def _run(self, fn: Callable[..., object], *args: object) -> object:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._disk_limiter)

    def disk_bytes(self) -> int:
        """What the working copies take on the cache disk (about)."""
        return sum(wc.disk_bytes for wc in self.copies.values())

    # -- copies ----------------------------------------------------------------------

    async def copy_of(self, file_id: str, truncate: bool) -> WorkingCopy:
        """The working copy of *file_id*, made now if it has none."""
        wc = self.copies.get(file_id)
        if wc is None:
            self._flusher()
            lock = self._making.setdefault(file_id, trio.Lock())
            try:
                async with lock:
                    wc = self.copies.get(file_id)
                    if wc is None:
                        return await self._make(file_id, truncate)
            finally:
                if not lock.statistics().tasks_waiting and self._making.get(file_id) is lock:
                    del self._making[file_id]
        if truncate and wc.size:
            await self.set_size(wc, 0)
        return wc

    async def _make(self, file_id: str, truncate: bool) -> WorkingCopy:
        attrs = await self._attrs.getattr(file_id)
        if attrs.kind is FileKind.DIR:
            raise ChangeRefused(f"{file_id}: is a directory", errno.EISDIR)
        if attrs.kind is not FileKind.FILE:
            raise ChangeRefused(f"{file_id}: not a regular file", errno.EINVAL)
        wc = await self._new(file_id, attrs.version, attrs.size, attrs.mode)
        try:
            if truncate or not attrs.size:
                if attrs.size:
                    wc.header.cut = 0
                    wc.header.changed = True
            else:
                await self._fill(wc, attrs)
            await self._run(self.store.ready, wc)
            if wc.header.changed and self.flusher is not None:  # cut by name (truncate)
                self.flusher.schedule(wc, self.flusher.delay)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._run(wc.remove_files)
            raise
        return wc

    async def _new(self, file_id: str, version: str, size: int, mode: int | None) -> WorkingCopy:
        try:
            made = await self._run(self.store.make, file_id, version, size, mode)
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise ChangeRefused(f"{file_id}: name too long", errno.ENAMETOOLONG) from None
            raise NoSpace(f"cannot make a working copy of {file_id}: {e.strerror}") from None
        assert isinstance(made, WorkingCopy)
        return made

    async def create(self, file_id: str, mode: int, exclusive: bool) -> tuple[WorkingCopy, bool]:
        """A new empty file, or the existing one cut to nothing (unless
        *exclusive*: EEXIST); (its copy, whether it is new)."""
        self._flusher()
        if file_id in self.copies:
            if exclusive:
                raise ChangeRefused(f"{file_id}: file exists", errno.EEXIST)
            return await self.copy_of(file_id, truncate=True), False
        # Offline, a name the cache knows nothing of is taken as free: if the
        # source has it after all, the flush finds it there (a conflict copy).
        existing = await self._lookup(file_id, offline=None)
        if existing is not None:
            if exclusive:
                raise ChangeRefused(f"{file_id}: file exists", errno.EEXIST)
            return await self.copy_of(file_id, truncate=True), False
        parent = await self._lookup(_parent(file_id), offline=_SOME_DIR)
        if parent is None:
            raise NotFound(f"{_parent(file_id) or '/'}: no such directory")
        if parent.kind is not FileKind.DIR:
            raise ChangeRefused(f"{_parent(file_id)}: not a directory", errno.ENOTDIR)
        lock = self._making.setdefault(file_id, trio.Lock())
        try:
            async with lock:
                if file_id in self.copies:  # made meanwhile
                    if exclusive:
                        raise ChangeRefused(f"{file_id}: file exists", errno.EEXIST)
                    return self.copies[file_id], False
                wc = await self._new(file_id, "", 0, mode)
                wc.header.changed = True
                await self._run(self.store.ready, wc)
        finally:
            if not lock.statistics().tasks_waiting and self._making.get(file_id) is lock:
                del self._making[file_id]
        self._on_changed(file_id)
        return wc, True

    async def _lookup(
        self, file_id: str, offline: FileAttrs | None | bool = False
    ) -> FileAttrs | None:
        """What *file_id* is (None: nothing); while the storage is offline and
        the cache knows nothing of it, *offline* unless that is False (raise)."""
        wc = self.copies.get(file_id)
        if wc is not None:
            return wc.attrs
        try:
            return await self._attrs.getattr(file_id)
        except NotFound:
            return None
        except StorageQuarantined:
            if offline is False:
                raise
            return offline if isinstance(offline, FileAttrs) else None

    def _online(self, file_id: str) -> None:
        """Raise unless the storage takes changes now (not latched offline)."""
        external = self._catalog.external_error
        if external is not None:
            raise StorageQuarantined(f"{file_id or '/'}: storage is offline: {external}")

    # -- content ---------------------------------------------------------------------

    async def read(self, wc: WorkingCopy, offset: int, length: int) -> bytes | bytearray:
        if offset >= wc.size:
            return b""
        try:
            if length <= INLINE_IO:
                return wc.read_at(offset, length)
            data = await self._run(wc.read_at, offset, length)
        except OSError as e:
            raise _disk_error(wc, e) from None
        assert isinstance(data, bytearray)
        return data

    async def write(self, wc: WorkingCopy, offset: int, data: bytes | memoryview) -> int:
        flusher = self._flusher()
        await flusher.room(len(data))
        async with wc.lock:
            if wc.dropped and wc.fd < 0:
                raise ChangeRefused(f"{wc.file_id}: the file was removed", errno.ESTALE)
            before = wc.changed_pages
            try:
                if len(data) <= INLINE_IO:
                    wc.write_at(offset, data)
                else:
                    await self._run(wc.write_at, offset, data)
                await self._changed(wc)
            except OSError as e:
                raise _disk_error(wc, e) from None
            finally:
                if not wc.dropped:  # an unlinked file's changes are never flushed
                    flusher.dirty_bytes += (wc.changed_pages - before) * PAGE
        return len(data)

    async def _changed(self, wc: WorkingCopy) -> None:
        wc.mtime = time.time()
        wc.generation += 1
        if not wc.header.changed:
            wc.header.changed = True
            wc.write_header()
        if not wc.writers and self.flusher is not None:  # a change by name (truncate)
            self.flusher.schedule(wc, self.flusher.delay)

    async def set_size(self, wc: WorkingCopy, size: int) -> FileAttrs:
        flusher = self._flusher()
        async with wc.lock:
            before = wc.changed_pages
            try:
                await self._run(wc.truncate, size)
                await self._changed(wc)
            except OSError as e:
                raise _disk_error(wc, e) from None
            finally:
                flusher.dirty_bytes += (wc.changed_pages - before) * PAGE
        return wc.attrs

    async def fsync(self, wc: WorkingCopy) -> None:
        """Durable in the cache, then flushed (WriteFailed if it was not).

        While the storage is latched offline, durable in the cache is all
        there can be: the change is flushed after reset-external-error.
        """
        flusher = self._flusher()
        if not wc.dirty:
            return
        if self._catalog.external_error is not None and wc.header.error is None:
            async with wc.lock:
                try:
                    await self._run(wc.sync)
                    if not wc.synced_dir:
                        await self._run(self.store.sync_dir)
                        wc.synced_dir = True
                except OSError as e:
                    raise _disk_error(wc, e) from None
            return
        name = wc.file_id
        conflict = await flusher.flush(wc)
        if conflict is not None:
            raise WriteFailed(
                f"{name} changed in the source since it was read: the changes made here"
                f" are kept as {conflict}"
            )

    def opened(self, wc: WorkingCopy, writer: bool) -> None:
        wc.handles += 1
        if writer:
            wc.writers += 1

    async def closed(self, wc: WorkingCopy, writer: bool) -> None:
        wc.handles -= 1
        if writer:
            wc.writers -= 1
        if wc.dropped:
            if not wc.handles:
                self._in_background(self._close_files, wc)
            return
        if wc.dirty:
            if not wc.writers and self.flusher is not None:
                self.flusher.schedule(wc, self.flusher.delay)
        else:
            self._maybe_drop(wc)

    def _maybe_drop(self, wc: WorkingCopy) -> None:
        if wc.handles or wc.dirty or wc.flushing or wc.header.error is not None or wc.dropped:
            return
        if wc.lock.locked() or wc.lock.statistics().tasks_waiting:
            return  # a change waits for it: dropped after, if still clean
        if self.copies.get(wc.file_id) is wc:
            del self.copies[wc.file_id]
        wc.dropped = True
        self._on_changed(wc.file_id)
        # Removing a large file can take seconds (discards): never on the loop.
        self._in_background(self._remove, wc)

    def _in_background(self, fn: Callable[[WorkingCopy], Awaitable[None]], wc: WorkingCopy) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, wc)

    async def _remove(self, wc: WorkingCopy) -> None:
        try:
            await self._run(wc.remove_files)
        except OSError as e:
            log.warning("cannot remove the working copy of %s: %s", wc.file_id, e)

    async def _close_files(self, wc: WorkingCopy) -> None:
        await self._run(wc.close_files)  # the last fd of an unlinked file frees it

    def _flushed(self, file_id: str) -> None:
        """A flush (or a conflict) changed *file_id* in the source: the cache
        asks it again, and the group hears of it."""
        self._catalog.forget(file_id)
        self._on_changed(file_id)

    async def flush_files(
        self,
        file_ids: Collection[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> FlushReport:
        """Flush *file_ids* (all changed files when None) now, FLUSHERS at once."""
        report = FlushReport()
        if self.flusher is None:
            return report
        flusher = self.flusher
        wanted = [
            wc
            for wc in list(self.copies.values())
            if wc.dirty and (file_ids is None or wc.file_id in file_ids)
        ]
        total = sum(wc.size for wc in wanted)
        done = 0
        before = len(self.counters.recent_conflicts)
        limiter = trio.CapacityLimiter(4)

        async def one(wc: WorkingCopy) -> None:
            nonlocal done
            async with limiter:
                name = wc.file_id
                try:
                    await flusher.flush(wc)
                except WriteFailed as e:
                    report.failed.append((name, str(e)))
                else:
                    if wc.file_id == name:
                        report.flushed.append(name)
                done += wc.size
                if progress is not None:
                    progress(done, total)

        async with trio.open_nursery() as nursery:
            for wc in wanted:
                nursery.start_soon(one, wc)
        report.conflicts = self.counters.recent_conflicts[before:]
        report.flushed.sort()
        report.failed.sort()
        return report

    def reset_latches(self, file_ids: Collection[str] | None) -> list[str]:
        """Lift the FILE_FAILURE latch of changed files: flushed again."""
        reset = []
        for wc in self.copies.values():
            if wc.header.error is not None and (file_ids is None or wc.file_id in file_ids):
                wc.header.error = None
                try:
                    wc.write_header()
                except OSError as e:
                    log.warning("working copy of %s: %s", wc.file_id, e)
                reset.append(wc.file_id)
                if self.flusher is not None:
                    self.flusher.schedule(wc, 0)
        return sorted(reset)

    def resume(self) -> None:
        """The storage latch was lifted: flush what waits."""
        if self.flusher is not None:
            for wc in self.copies.values():
                if wc.dirty:
                    self.flusher.schedule(wc, 0)

    def statistics(self) -> WriteStatistics:
        copies = list(self.copies.values())
        c = self.counters
        return WriteStatistics(
            dirty_files=sum(1 for wc in copies if wc.dirty),
            dirty_bytes=sum(wc.dirty_bytes for wc in copies),
            flushing=sum(1 for wc in copies if wc.flushing),
            flushed_files=c.flushed_files,
            flushed_bytes=c.flushed_bytes,
            conflicts=c.conflicts,
            write_failures=c.write_failures,
            write_data_calls=c.write_data_calls,
            latched=sorted(wc.file_id for wc in copies if wc.header.error is not None),
            max_dirty=self.max_dirty,
            write_back_delay=self.write_back_delay,
            read_only=self.flusher is None,
        )

    # -- names -----------------------------------------------------------------------

    def _backend(self, file_id: str) -> WritableSource:
        self._flusher()
        assert self.backend is not None
        self._online(file_id)
        return self.backend

    async def _ask(self, what: str, file_id: str, call: Awaitable[ChangeResult]) -> ChangeResult:
        try:
            result = await call
        except Exception as e:
            result = ChangeResult(RWResult.FAILURE, reason=str(e) or type(e).__name__)
        code = result.result_code
        if code is RWResult.SUCCESS:
            return result
        reason = result.reason or code.name
        if code is RWResult.FILE_FAILURE:
            raise ChangeRefused(f"{what} {file_id}: {reason}", result.error or errno.EIO)
        if code is RWResult.FILE_MODIFIED_EXTERNALLY:
            raise ChangeRefused(f"{what} {file_id}: changed in the source: {reason}", errno.ESTALE)
        if code is RWResult.PERMANENT_FAILURE:
            self._catalog.external_error = reason
            raise StorageQuarantined(f"{what} {file_id}: storage latched offline: {reason}")
        raise TransientFailure(f"{what} {file_id}: {reason}")

    async def _attrs_after(self, file_id: str, result: ChangeResult) -> FileAttrs:
        self._catalog.forget(file_id)
        self._on_changed(file_id)
        if result.attrs is not None:
            return result.attrs
        return await self._attrs.revalidate(file_id)

    async def make_dir(self, dir_id: str, mode: int) -> FileAttrs:
        backend = self._backend(dir_id)
        if await self._lookup(dir_id) is not None:
            raise ChangeRefused(f"{dir_id}: file exists", errno.EEXIST)
        result = await self._ask("mkdir", dir_id, backend.make_dir(dir_id, mode))
        return await self._attrs_after(dir_id, result)

    async def make_symlink(self, file_id: str, target: str) -> FileAttrs:
        backend = self._backend(file_id)
        if not self.caps & WriteCapability.SYMLINKS:
            raise ChangeRefused(f"{file_id}: the source has no symlinks", errno.EPERM)
        if await self._lookup(file_id) is not None:
            raise ChangeRefused(f"{file_id}: file exists", errno.EEXIST)
        result = await self._ask("symlink", file_id, backend.make_symlink(file_id, target))
        return await self._attrs_after(file_id, result)

    async def remove_file(self, file_id: str) -> None:
        wc = self.copies.get(file_id)
        if wc is None:
            await self._remove_in_source(file_id)
            return
        async with wc.lock:  # a flush of it (creating it, maybe) ends first
            if wc.dropped:  # flushed and let go meanwhile: the source's file now
                await self._remove_in_source(file_id)
                return
            if wc.header.base_version:  # the source has it: removed there too
                await self._remove_in_source(file_id)
            self._forget_copy(wc)
        self._on_changed(file_id)

    async def _remove_in_source(self, file_id: str) -> None:
        attrs = await self._attrs_or_none(file_id)
        if attrs is None:
            raise NotFound(f"{file_id}: no such file")
        if attrs.kind is FileKind.DIR:
            raise ChangeRefused(f"{file_id}: is a directory", errno.EISDIR)
        backend = self._backend(file_id)
        await self._ask("unlink", file_id, backend.remove_file(file_id, ""))
        self._catalog.forget(file_id)
        self._on_changed(file_id)

    async def _attrs_or_none(self, file_id: str) -> FileAttrs | None:
        try:
            return await self._attrs.getattr(file_id)
        except NotFound:
            return None

    def _forget_copy(self, wc: WorkingCopy) -> None:
        """The file of *wc* is gone: its copy with it; open handles keep its
        fds (and bytes) until they close.  The caller holds ``wc.lock``."""
        if wc.dropped:
            return
        if self.copies.get(wc.file_id) is wc:
            del self.copies[wc.file_id]
        if self.flusher is not None and wc.dirty:
            self.flusher.dirty_bytes -= wc.dirty_bytes
        wc.dropped = True
        wc.header.changed = False
        self._in_background(self._unlink_files, wc)

    async def _unlink_files(self, wc: WorkingCopy) -> None:
        await self._run(self._unlink_copy, wc)
        if not wc.handles:
            wc.close_files()

    @staticmethod
    def _unlink_copy(wc: WorkingCopy) -> None:
        """Remove *wc*'s files (in a thread: a large file can take seconds)."""
        for suffix in (".meta", ".data"):
            try:
                os.unlink(f"{wc.path}{suffix}")
            except FileNotFoundError:
                pass

    async def remove_dir(self, dir_id: str) -> None:
        prefix = f"{dir_id}/"
        if any(f.startswith(prefix) for f in self.copies):
            raise ChangeRefused(f"{dir_id}: directory not empty", errno.ENOTEMPTY)
        backend = self._backend(dir_id)
        await self._ask("rmdir", dir_id, backend.remove_dir(dir_id))
        self._catalog.forget(dir_id)
        self._on_changed(dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> None:
        if old_id == new_id:
            return
        if new_id.startswith(f"{old_id}/"):
            raise ChangeRefused(f"{old_id}: cannot move into itself", errno.EINVAL)
        self._flusher()
        source = await self._lookup(old_id)
        if source is None:
            raise NotFound(f"{old_id}: no such file or directory")
        target = await self._lookup(new_id)
        if target is not None:
            if not replace:
                raise ChangeRefused(f"{new_id}: file exists", errno.EEXIST)
            if target.kind is FileKind.DIR and source.kind is not FileKind.DIR:
                raise ChangeRefused(f"{new_id}: is a directory", errno.EISDIR)
            if source.kind is FileKind.DIR and target.kind is not FileKind.DIR:
                raise ChangeRefused(f"{new_id}: not a directory", errno.ENOTDIR)
            if target.kind is FileKind.DIR and any(f.startswith(f"{new_id}/") for f in self.copies):
                raise ChangeRefused(f"{new_id}: directory not empty", errno.ENOTEMPTY)
        # Every copy the rename touches is locked, in file id order (the one
        # lock order of this module), so no flush of one runs meanwhile.
        prefix = f"{old_id}/"
        touched = [
            c for f, c in self.copies.items() if f in (old_id, new_id) or f.startswith(prefix)
        ]
        async with contextlib.AsyncExitStack() as locks:
            for c in sorted(touched, key=lambda c: c.file_id):
                await locks.enter_async_context(c.lock)
            wc = self.copies.get(old_id)
            target_wc = self.copies.get(new_id)
            if wc is not None and not wc.header.base_version:
                self._rename_here(wc, target, target_wc, new_id)
            else:
                await self._rename_in_source(old_id, new_id, replace, source, target_wc)
        for f in (old_id, new_id):
            self._catalog.forget(f)
            self._on_changed(f)
        for f in [f for f in self._catalog.files if f.startswith(prefix)]:
            self._catalog.forget(f)

    def _rename_here(
        self,
        wc: WorkingCopy,
        target: FileAttrs | None,
        target_wc: WorkingCopy | None,
        new_id: str,
    ) -> None:
        """Rename a file only this mount has (never flushed): it takes the
        target's place in the source when it is flushed."""
        if target_wc is not None and target_wc.header.base_version:
            wc.header.base_version = target_wc.header.base_version
            wc.header.base_size = target_wc.header.base_size
            wc.header.cut = 0
        elif target is not None and target_wc is None:
            wc.header.base_version = target.version
            wc.header.base_size = target.size
            wc.header.cut = 0
        if target_wc is not None:
            self._forget_copy(target_wc)
        self.store.move(wc, new_id)

    async def _rename_in_source(
        self,
        old_id: str,
        new_id: str,
        replace: bool,
        source: FileAttrs,
        target_wc: WorkingCopy | None,
    ) -> None:
        if source.kind is FileKind.DIR and not self.caps & WriteCapability.RENAME_DIRS:
            raise ChangeRefused(f"{old_id}: the source cannot rename directories", errno.EXDEV)
        backend = self._backend(old_id)
        await self._ask("rename", old_id, backend.rename(old_id, new_id, replace))
        if target_wc is not None:
            self._forget_copy(target_wc)
        prefix = f"{old_id}/"
        moved = [c for f, c in list(self.copies.items()) if f == old_id or f.startswith(prefix)]
        for c in moved:
            new = new_id + c.file_id[len(old_id) :]
            if c.header.base_version:  # what the source calls it there (S3 copies anew)
                try:
                    now = await backend.stat(new)
                except Exception:
                    now = None
                if now is not None and now.kind is FileKind.FILE:
                    c.header.base_version = now.version
            await self._run(self.store.move, c, new)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> FileAttrs:
        wc = self.copies.get(file_id)
        if wc is not None:
            async with wc.lock:
                if mode is not None:
                    wc.header.mode = mode
                if mtime is not None:
                    wc.mtime = mtime
                    os.utime(wc.fd, (mtime, mtime))
                wc.header.changed = True
                await self._run(wc.write_header)
            if not wc.writers and self.flusher is not None:
                self.flusher.schedule(wc, self.flusher.delay)
            return wc.attrs
        backend = self._backend(file_id)
        result = await self._ask("setattr", file_id, backend.set_attrs(file_id, mode, mtime))
        return await self._attrs_after(file_id, result)
