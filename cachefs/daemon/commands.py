"""The mount's side of the control commands.

Policy:

* Paths arrive as file ids (relative to the mount, "" for the root).  A
  directory means every regular file below it; symlinks are not followed.
* ``prefetch`` and ``pin`` fetch whole files (WHOLE_FILE transfers), at most
  FETCH_CONCURRENCY files at a time over all requests, and report progress
  every PROGRESS_INTERVAL seconds.  A file that fails does not stop the
  others: the answer lists the failures.  A client that leaves cancels its
  request.
* Pinning several files is refused as a whole (PinLimitExceeded, nothing
  pinned) when they would not fit under the cache limit together.
* ``unpin`` and ``purge`` act on what the cache holds, without asking the
  source: they work while the source is offline.
* ``flush`` sends the changed files at or below each file id now (those
  a flush turns into a conflict copy: that copy too), progress as for
  ``prefetch``; a read-only mount refuses it (ReadOnly).  A file that
  cannot be sent stays changed in the cache dir and is named in the
  answer, as is every conflict.
* ``unmount`` flushes every changed file the same way, then stops the
  mount (a read-only one flushes nothing: its changes wait for a
  writable mount); with ``keep_dirty`` it stops at once and the changes
  stay in the cache dir for the next mount (the daemon does not flush
  them on its way out either).  A client that leaves during the flush
  cancels it: the mount stays.
* Files latched because the source refused their flush are files in error
  too: ``stats`` counts them there, ``reset-file-errors`` lifts them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, assert_never

import trio

from cachefs.contract import FileKind
from cachefs.control.protocol import (
    AddData,
    AddDataReply,
    Failure,
    Flush,
    FlushFailure,
    FlushReply,
    Message,
    Pin,
    Prefetch,
    Purge,
    PurgeReply,
    ResetExternalError,
    ResetFileErrors,
    Stats,
    StatsReply,
    Unmount,
    UnmountReply,
    Unpin,
    UnpinReply,
    WholeFilesProgress,
    WholeFilesReply,
    decode_request,
)
from cachefs.control.server import Progress
from cachefs.daemon.flushes import flush_files
from cachefs.engine import FileCache
from cachefs.engine.miss.fetch import first_error
from cachefs.errors import CacheFSError, NotFound, PinLimitExceeded, ReadOnly
from cachefs.fs.inodes import Namespace, child_id
from cachefs.units import format_size

if TYPE_CHECKING:  # the record store is loaded by mounts in a group only
    from cachefs.group.member import Member

log = logging.getLogger(__name__)

FETCH_CONCURRENCY = 4
PROGRESS_INTERVAL = 0.25


@dataclass(slots=True)
class _Batch:
    """One prefetch or pin request: its files and how far it got."""

    files: list[tuple[str, int]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    total: int = 0
    scanning: bool = True
    finished: int = 0
    finished_bytes: int = 0
    succeeded: int = 0
    fetched: int = 0
    active: set[str] = field(default_factory=set)
    failed: list[Failure] = field(default_factory=list)

    def add(self, file_id: str, size: int) -> None:
        if file_id not in self.seen:
            self.seen.add(file_id)
            self.files.append((file_id, size))
            self.total += size


class ControlCommands:
    """Answers control requests for one mount: ``await commands(request, progress)``."""

    def __init__(
        self,
        cache: FileCache,
        namespace: Namespace,
        *,
        source: str,
        mountpoint: Path,
        stop: Callable[[], None],
        invalidate: Callable[[str], None],
        member: Member | None = None,
        keep_dirty: Callable[[], None] = lambda: None,
    ) -> None:
        """*stop* ends the mount; *keep_dirty*, called before it by an unmount
        that keeps the changes, tells the daemon not to flush them on its way out."""
        self._cache = cache
        self._member = member
        self._namespace = namespace
        self._source = source
        self._mountpoint = mountpoint
        self._stop = stop
        self._keep_dirty = keep_dirty
        self._invalidate = invalidate
        self._fetch_limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)

    async def __call__(self, message: Message, progress: Progress) -> object:
        """Answer one request, as the control server decoded it."""
        request = decode_request(message)  # ConfigError: unknown, or arguments missing
        match request:
            case Stats():
                return await self.stats()
            case Prefetch(file_ids):
                return await self.prefetch(file_ids, progress)
            case Pin(file_ids):
                return await self.pin(file_ids, progress)
            case Unpin(file_ids):
                return await self.unpin(file_ids)
            case Purge(file_ids):
                return await self.purge(file_ids)
            case AddData():
                return await self.add_data(request)
            case Flush(file_ids):
                return await self.flush(file_ids, progress)
            case ResetFileErrors(file_ids):
                return await self.reset_file_errors(file_ids)
            case ResetExternalError():
                await self.reset_external_error()
                return None
            case Unmount(keep_dirty):
                return await self.unmount(keep_dirty, progress)
            case _:
                assert_never(request)

    # -- simple commands ------------------------------------------------------------

    async def stats(self) -> StatsReply:
        cache = self._cache
        statistics = cache.statistics()
        writes = cache.write_statistics()
        in_error = {*statistics["file_errors"], *writes.latched}
        return {
            **statistics,
            "files_in_error": len(in_error),
            "dirty_files": writes.dirty_files,
            "dirty_bytes": writes.dirty_bytes,
            "flushing_files": writes.flushing,
            "flushed_files": writes.flushed_files,
            "flushed_bytes": writes.flushed_bytes,
            "write_conflicts": writes.conflicts,
            "write_failures": writes.write_failures,
            "write_data_calls": writes.write_data_calls,
            "latched_writes": writes.latched,
            "max_dirty": writes.max_dirty,
            "write_back_delay": writes.write_back_delay,
            "read_only": writes.read_only,
            "read_only_reason": cache.read_only_reason,
            "pinned_files": len(cache.pinned()),
            "max_readahead": cache.config.max_readahead,
            "max_fetches": cache.config.max_fetches,
            "source": self._source,
            "mountpoint": str(self._mountpoint),
            "pid": os.getpid(),
            "inodes": len(self._namespace),
            **({"group": self._member.statistics()} if self._member is not None else {}),
        }

    async def reset_file_errors(self, file_ids: tuple[str, ...]) -> list[str]:
        """Reset the latched and the short files below the given file ids:
        latched by a read, or by a flush the source refused (then flushed again)."""
        cache = self._cache
        if "" in file_ids:
            reset = await cache.reset_file_errors(None)
        else:
            latched = cache.write_statistics().latched
            known = {*cache.file_errors(), *cache.short_files(), *latched}
            reset = await cache.reset_file_errors(set(_below(file_ids, known)))
        for file_id in reset:
            self._invalidate(file_id)  # the kernel's pages of the zeros go too
        return reset

    async def add_data(self, request: AddData) -> AddDataReply:
        """Supply bytes of one file at an offset; see FileCache.add_data."""
        got = await self._cache.add_data(
            request.file_id, request.offset, request.data, trust=request.trust
        )
        if self._member is not None and got.accepted and not request.trust:
            # AddData's rule: data added and verified is offered to the hosted cache too
            await self._member.offer_added(
                self._cache, request.file_id, request.offset, request.data
            )
        return {"accepted": got.accepted, "rejected": got.rejected, "pending": got.pending}

    async def reset_external_error(self) -> None:
        await self._cache.reset_external_error()

    async def unmount(self, keep_dirty: bool, progress: Progress) -> UnmountReply:
        """Flush the changed files (unless *keep_dirty*), then stop the mount,
        whatever the flush did.  ``kept``: the changed files left in the cache
        dir (the daemon tries those that failed once more on its way out, and
        flushes those changed meanwhile)."""
        cache = self._cache
        reply: UnmountReply = {"pid": os.getpid()}
        if keep_dirty or not cache.writable:  # read-only: changes wait for a writable mount
            log.info("unmount requested; changed files are kept for the next mount")
            self._keep_dirty()
            reply["kept"] = cache.write_statistics().dirty_files
        else:
            log.info("unmount requested")
            try:
                flushed = await flush_files(cache, cache.changed_files(), progress)
                kept = len(flushed["failed"])
            except Exception as e:  # the unmount happens all the same
                log.exception("flushing before the unmount failed")
                cause = first_error(e) if isinstance(e, ExceptionGroup) else e
                failure: FlushFailure = {"file": "", "error": f"flushing failed: {cause}"}
                flushed = {"flushed": 0, "bytes": 0, "failed": [failure], "conflicts": []}
                kept = cache.write_statistics().dirty_files
            reply["flush"] = flushed
            reply["kept"] = kept
        self._stop()
        return reply

    async def unpin(self, file_ids: tuple[str, ...]) -> UnpinReply:
        """Unpin every pinned file below the given file ids."""
        pinned = self._cache.pinned()
        unpinned = [f for f in _below(file_ids, pinned) if await self._cache.unpin(f)]
        return {"unpinned": unpinned, "not_pinned": _unmatched(file_ids, unpinned)}

    async def purge(self, file_ids: tuple[str, ...]) -> PurgeReply:
        """Drop the cached data of every unpinned file below the given file ids.

        Files open for the kernel to read by itself (passthrough) are kept too.
        """
        pinned = set(self._cache.pinned())
        held = set(self._cache.held_whole())
        purged: list[str] = []
        kept: list[str] = []
        in_use: list[str] = []
        freed = 0
        for file_id in _below(file_ids, self._cached_files()):
            if file_id in pinned:
                kept.append(file_id)
                continue
            if file_id in held:
                in_use.append(file_id)
                continue
            n = await self._cache.purge(file_id)
            if n:
                purged.append(file_id)
                freed += n
                self._invalidate(file_id)  # the kernel's pages of it go too
        return {"purged": len(purged), "freed": freed, "pinned": kept, "in_use": in_use}

    # -- flushing changed files ---------------------------------------------------

    async def flush(self, file_ids: tuple[str, ...], progress: Progress) -> FlushReply:
        """Flush every changed file at or below the given file ids; ReadOnly
        on a mount that takes no changes."""
        cache = self._cache
        if not cache.writable:
            reason = cache.read_only_reason or "the mount is read-only"
            raise ReadOnly(f"nothing can be flushed: {reason}")
        changed = cache.changed_files()
        for file_id in file_ids:  # a mistyped path is an error, not "nothing to flush"
            if file_id and file_id not in changed:
                await cache.getattr(file_id)  # NotFound names it
        return await flush_files(
            cache, changed if "" in file_ids else _below(file_ids, changed), progress
        )

    # -- whole files --------------------------------------------------------------

    async def prefetch(self, file_ids: tuple[str, ...], progress: Progress) -> WholeFilesReply:
        batch = await self._whole_files(file_ids, progress, self._cache.prefetch)
        result = _summary(batch)
        limit = self._cache.statistics()["cache_limit"]
        if result["bytes"] > limit:
            result["warning"] = (
                f"the files hold {format_size(result['bytes'])}, more than the cache limit of "
                f"{format_size(limit)}: only the most recently fetched part stays cached"
            )
        return result

    async def pin(self, file_ids: tuple[str, ...], progress: Progress) -> WholeFilesReply:
        return _summary(await self._whole_files(file_ids, progress, self._cache.pin, self._fits))

    def _fits(self, batch: _Batch) -> CacheFSError | None:
        """Refuse to pin several files that would not fit together."""
        stats = self._cache.statistics()
        pinned = set(self._cache.pinned())
        new = [size for f, size in batch.files if f not in pinned]
        total = stats["pinned_bytes"] + sum(new)
        if len(new) > 1 and total > stats["cache_limit"]:
            return PinLimitExceeded(
                f"cannot pin {len(new)} files: pinned files would hold {total} bytes,"
                f" more than the cache limit of {stats['cache_limit']} bytes"
            )
        return None

    async def _whole_files(
        self,
        file_ids: tuple[str, ...],
        progress: Progress,
        action: Callable[[str], Awaitable[None]],
        check: Callable[[_Batch], CacheFSError | None] = lambda batch: None,
    ) -> _Batch:
        """Find the files, check them, run *action* on each; progress all along."""
        batch = _Batch()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report, batch, progress)
            for root in file_ids:
                try:
                    await self._walk(root, batch)
                except CacheFSError as e:
                    batch.failed.append(_failure(root or "/", e))
            batch.scanning = False
            await self._send_progress(batch, progress)
            error = check(batch)
            if error is None:
                todo = iter(batch.files)
                async with trio.open_nursery() as workers:
                    for _ in range(min(FETCH_CONCURRENCY, len(batch.files))):
                        workers.start_soon(self._work, batch, todo, action)
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        await self._send_progress(batch, progress)
        return batch

    async def _work(
        self,
        batch: _Batch,
        todo: Iterator[tuple[str, int]],
        action: Callable[[str], Awaitable[None]],
    ) -> None:
        for file_id, size in todo:
            async with self._fetch_limiter:
                before = self._cached_bytes(file_id)
                batch.active.add(file_id)
                try:
                    await action(file_id)
                    batch.succeeded += 1
                except CacheFSError as e:
                    batch.failed.append(_failure(file_id, e))
                except Exception as e:
                    log.exception("%s of %s failed", action.__name__, file_id)
                    batch.failed.append(_failure(file_id, e))
                finally:
                    batch.active.discard(file_id)
                batch.fetched += max(0, self._cached_bytes(file_id) - before)
                batch.finished += 1
                batch.finished_bytes += size

    async def _report(self, batch: _Batch, progress: Progress) -> None:
        while True:
            await self._send_progress(batch, progress)
            await trio.sleep(PROGRESS_INTERVAL)

    async def _send_progress(self, batch: _Batch, progress: Progress) -> None:
        done = batch.finished_bytes + sum(self._cached_bytes(f) for f in batch.active)
        report: WholeFilesProgress = {
            "scanning": batch.scanning,
            "done": done,
            "total": batch.total,
            "files_done": batch.finished,
            "files": len(batch.files),
            "failed": len(batch.failed),
        }
        await progress.send(dict(report))

    async def _walk(self, root: str, batch: _Batch) -> None:
        """Add the regular files at or below *root* to *batch*."""
        attrs = await self._cache.getattr(root)
        if attrs.kind is FileKind.FILE:
            batch.add(root, attrs.size)
            return
        if attrs.kind is not FileKind.DIR:
            raise NotFound(f"{root}: not a regular file or a directory")
        dirs = [root]
        while dirs:
            dir_id = dirs.pop()
            for entry in sorted(await self._cache.list_dir(dir_id), key=lambda e: e.name):
                file_id = child_id(dir_id, entry.name)
                if entry.attrs.kind is FileKind.FILE:
                    batch.add(file_id, entry.attrs.size)
                elif entry.attrs.kind is FileKind.DIR:
                    dirs.append(file_id)

    # FileCache has no public per-file view of what it holds; these read its catalog.

    def _cached_files(self) -> list[str]:
        return list(self._cache.catalog.files)

    def _cached_bytes(self, file_id: str) -> int:
        catalog = self._cache.catalog
        cf = catalog.files.get(file_id)
        return 0 if cf is None else catalog.present_bytes(cf)


def _ancestors(file_id: str) -> Iterator[str]:
    """*file_id* and every directory above it, up to the root ("")."""
    yield file_id
    while file_id:
        file_id = file_id.rpartition("/")[0]
        yield file_id


def _below(roots: Iterable[str], file_ids: Iterable[str]) -> list[str]:
    """The file ids at or below any of *roots*, sorted.

    Linear in the file ids times their depth, whatever the number of roots:
    a request naming 100,000 paths must not hold the mount's loop.
    """
    wanted = set(roots)
    return sorted(f for f in file_ids if not wanted.isdisjoint(_ancestors(f)))


def _unmatched(roots: Iterable[str], file_ids: list[str]) -> list[str]:
    """The roots no file id lies at or below."""
    matched = {a for f in file_ids for a in _ancestors(f)}
    return [r for r in roots if r not in matched]


def _failure(file_id: str, error: Exception) -> Failure:
    message = " ".join(str(error).split()) or type(error).__name__
    if file_id not in message:
        message = f"{file_id}: {message}"
    return {"file": file_id, "error": message, "exit_code": getattr(error, "exit_code", 1)}


def _summary(batch: _Batch) -> WholeFilesReply:
    return {
        "files": len(batch.files),
        "succeeded": batch.succeeded,
        "bytes": batch.total,
        "fetched": batch.fetched,
        "failed": batch.failed,
    }
