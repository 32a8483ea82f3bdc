"""Flushing working copies to the backend with WriteData, and when.

Policy:

* A flush sends one state of the file: it holds the copy's lock, so no
  change lands while it runs.  The copy is synced to the cache disk first
  (data, then its page map), so what the backend is sent is durable here.
* Plan: a file the backend writes whole only (WHOLE_FILE_ONLY), a new file,
  or one cut to nothing and written again, is one WHOLE_FILE continuous
  transfer against the version it was made from ("" for a new file).
  Otherwise (RANDOM_WRITES) the source is cut where the file was cut, sized,
  and sent the changed pages as one random transfer.
* Result codes: PARTIAL -> the rest is sent; FILE_MODIFIED_LOCALLY -> the
  flush is planned again (at most MAX_REPLANS times); FILE_MODIFIED_EXTERNALLY
  -> a conflict: the copy becomes ``NAME.conflict-<UTC time>`` beside the
  file, flushed as a new file, and the source's version stays at NAME;
  FAILURE -> retried with backoff (RETRY_FIRST doubling to RETRY_MAX);
  FILE_FAILURE -> the copy is latched (kept, not flushed) until reset;
  PERMANENT_FAILURE -> the storage is latched (catalog.external_error):
  changes keep landing in the cache and are flushed after the reset.  A
  transfer abandoned midway ends with a zero-length CANCELED call.
* When: WRITE_BACK_DELAY after the last writer closed the file (the
  config's write_back_delay), at once for fsync, ``cachefs flush`` and
  unmount, and whenever dirty bytes pass max_dirty (writers then wait for
  room: NoSpace only when no flush can make progress).  FLUSHERS at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import trio

from cachefs.contract import (
    Backend,
    ChangeResult,
    FileKind,
    RWEvent,
    RWResult,
    WritableBackend,
    WriteCapability,
    WriteData,
)
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.write.copies import PAGE, CopyStore, WorkingCopy
from cachefs.errors import NoSpace, WriteFailed

log = logging.getLogger(__name__)

#: One WriteData call carries at most this much.
CHUNK = 4 << 20
FLUSHERS = 4
MAX_REPLANS = 3
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
#: How long a writer waits under max_dirty in all before ENOSPC.
ROOM_DEADLINE = 600.0
#: How long a writer waits under max_dirty for a flush to end before ENOSPC.
ROOM_WAIT = 60.0
#: A backend call (WriteData, set_size) not answered in this long is a FAILURE:
#: the copy's lock is held meanwhile, and its writers wait.
CALL_DEADLINE = 120.0
#: A PARTIAL answer that stores nothing, this many times in a row, is a FAILURE.
MAX_STALLS = 3


@dataclass(slots=True)
class WriteCounters:
    """Counters of the write path since the mount started."""

    write_data_calls: int = 0
    flushed_files: int = 0
    flushed_bytes: int = 0
    conflicts: int = 0
    write_failures: int = 0
    #: (file, conflict copy) of the latest conflicts, newest last.
    recent_conflicts: list[tuple[str, str]] = field(default_factory=list)


class WritableSource(Backend, WritableBackend, Protocol):
    """A backend the cache writes to (it reads from it too)."""


@dataclass(slots=True)
class _Transfer:
    """How far a flush got: whether the backend saw the first call of its
    transfer (and its context), and whether any change was applied."""

    started: bool = False
    context: object = None
    applied: bool = False


class _Outcome(Exception):
    """A flush ended with a result code other than SUCCESS."""

    def __init__(self, code: RWResult, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _whole_runs(size: int) -> list[tuple[int, int]]:
    """The calls of a whole-file transfer: CHUNK bytes each (one of 0 for an empty file)."""
    return [(at, min(CHUNK, size - at)) for at in range(0, size, CHUNK)] or [(0, 0)]


def conflict_name(file_id: str, taken: Callable[[str], bool]) -> str:
    """``NAME.conflict-<UTC time>`` beside *file_id*, not *taken*."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = f"{file_id}.conflict-{stamp}"
    n = 2
    while taken(name):
        name = f"{file_id}.conflict-{stamp}-{n}"
        n += 1
    return name


class Flusher:
    def __init__(
        self,
        backend: WritableSource,
        store: CopyStore,
        catalog: Catalog,
        counters: WriteCounters,
        write_back_delay: float,
        max_dirty: int,
        on_flushed: Callable[[str], None],
        disk_limiter: trio.CapacityLimiter,
    ) -> None:
        self._backend = backend
        self._caps = backend.write_capabilities
        self._store = store
        self._catalog = catalog
        self.counters = counters
        self.delay = write_back_delay
        self.max_dirty = max_dirty
        self._on_flushed = on_flushed
        self._disk_limiter = disk_limiter
        self._limiter = trio.CapacityLimiter(FLUSHERS)
        self._wake = trio.Event()
        self._progress = trio.Event()
        self.dirty_bytes = 0
        self.on_clean: Callable[[WorkingCopy], None] = lambda wc: None

    # -- scheduling ------------------------------------------------------------------

    def schedule(self, wc: WorkingCopy, delay: float) -> None:
        due = trio.current_time() + delay
        if wc.due is None or due < wc.due:
            wc.due = due
        self._wake.set()

    def wake(self) -> None:
        """Look again (a latch was lifted)."""
        self._wake.set()

    async def serve(self) -> None:
        """Flush copies as they come due, FLUSHERS at once, until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                self._wake = trio.Event()
                now = trio.current_time()
                nxt = float("inf")
                if self._catalog.external_error is None:
                    for wc in list(self._store.copies.values()):
                        if wc.due is None or wc.flushing or wc.header.error is not None:
                            continue
                        if not wc.dirty:
                            wc.due = None
                            continue
                        if wc.writers and not wc.urgent:
                            # Due from an earlier close, open for writing again:
                            # its next close sets the time.
                            wc.due = None
                            continue
                        if wc.due <= now:
                            wc.due = None
                            wc.flushing = True  # taken: not started twice
                            nursery.start_soon(self._background, wc)
                        else:
                            nxt = min(nxt, wc.due)
                with trio.move_on_at(nxt):
                    await self._wake.wait()

    async def _background(self, wc: WorkingCopy) -> None:
        try:
            async with self._limiter:
                await self.flush(wc, taken=True)
        except WriteFailed as e:
            log.debug("background flush of %s: %s", wc.file_id, e)

    async def room(self, nbytes: int) -> None:
        """Wait until *nbytes* more dirty bytes fit under max_dirty, flushing
        the largest copies; NoSpace when no flush can make room (the storage
        is offline, every changed file is latched, or no flush ends within
        ROOM_WAIT)."""
        if self.dirty_bytes + nbytes <= self.max_dirty or nbytes > self.max_dirty:
            return
        give_up = trio.current_time() + ROOM_DEADLINE
        while self.dirty_bytes + nbytes > self.max_dirty:
            if trio.current_time() > give_up:
                raise NoSpace(
                    f"{self.dirty_bytes} bytes wait to be flushed (max-dirty {self.max_dirty})"
                    f" and flushes have not made room in {ROOM_DEADLINE:.0f} s"
                )
            if self._catalog.external_error is not None:
                raise NoSpace(
                    f"{self.dirty_bytes} bytes wait to be flushed (max-dirty"
                    f" {self.max_dirty}) and the storage is offline:"
                    f" {self._catalog.external_error}"
                )
            copies = list(self._store.copies.values())
            flushable = [wc for wc in copies if wc.dirty and wc.header.error is None]
            if not flushable and not any(wc.flushing for wc in copies):
                # What is counted is latched, or a flush just ended: count again.
                self.dirty_bytes = sum(wc.dirty_bytes for wc in copies if wc.dirty)
                if self.dirty_bytes + nbytes <= self.max_dirty:
                    return
                raise NoSpace(
                    f"{self.dirty_bytes} bytes wait to be flushed (max-dirty {self.max_dirty})"
                    " and the source refused every one of them"
                )
            for wc in sorted(flushable, key=lambda w: -w.dirty_bytes)[:FLUSHERS]:
                if wc.retry_delay == 0:
                    wc.urgent = True  # even while it is being written
                    self.schedule(wc, 0)
            with trio.move_on_after(ROOM_WAIT) as waited:
                await self._progress.wait()  # a flush ended, one way or another
            if waited.cancelled_caught:
                raise NoSpace(
                    f"{self.dirty_bytes} bytes wait to be flushed (max-dirty {self.max_dirty})"
                    f" and no flush ended in {ROOM_WAIT:.0f} s"
                )

    # -- one flush -------------------------------------------------------------------

    async def flush(self, wc: WorkingCopy, taken: bool = False) -> str | None:
        """Send *wc* to the backend now; WriteFailed says why it did not reach it
        (the copy stays, and is flushed later unless latched).  Returns the
        name of the conflict copy the changes went to, if the source had changed."""
        if not taken:
            wc.flushing = True
        try:
            async with wc.lock:
                wc.urgent = False
                conflict = await self._flush_locked(wc)
        finally:
            wc.flushing = False
            progress, self._progress = self._progress, trio.Event()
            progress.set()
        if not wc.dirty:
            self.on_clean(wc)
        return conflict

    async def _flush_locked(self, wc: WorkingCopy) -> str | None:
        if wc.dropped or not wc.dirty:
            return None
        # Durable here first, whether or not it can be sent now.
        await trio.to_thread.run_sync(wc.sync, limiter=self._disk_limiter)
        if not wc.synced_dir:
            await trio.to_thread.run_sync(self._store.sync_dir, limiter=self._disk_limiter)
            wc.synced_dir = True
        if wc.header.error is not None:
            raise WriteFailed(f"{wc.file_id}: not flushed: {wc.header.error}")
        external = self._catalog.external_error
        if external is not None:
            raise WriteFailed(f"{wc.file_id}: the storage is offline: {external}")
        sent = 0
        for _ in range(MAX_REPLANS):
            redo = wc.header.flushing
            if not redo:  # before the source changes: a crash from here on is known
                wc.header.flushing = True
                await trio.to_thread.run_sync(wc.write_header, limiter=self._disk_limiter)
            attempt = _Transfer()
            try:
                version, sent = await self._send(wc, redo, attempt)
            except _Outcome as e:
                if not attempt.applied and not redo:  # the source said no to the first change
                    wc.header.flushing = False
                    await trio.to_thread.run_sync(wc.write_header, limiter=self._disk_limiter)
                if e.code is RWResult.FILE_MODIFIED_LOCALLY:
                    continue
                return await self._failed(wc, e)
            break
        else:
            return await self._failed(
                wc, _Outcome(RWResult.FAILURE, "the flush kept being re-planned")
            )
        await self._set_meta(wc)
        if not version or self._caps & (WriteCapability.MODES | WriteCapability.TIMES):
            version = await self._backend_stat(wc.file_id)  # setting them made a new one
        wc.header.base_version = version
        before = wc.changed_pages
        await trio.to_thread.run_sync(wc.mark_flushed, limiter=self._disk_limiter)
        self.dirty_bytes -= before * PAGE
        wc.retry_delay = 0.0
        self.counters.flushed_files += 1
        self.counters.flushed_bytes += sent
        log.info("flushed %s (%d bytes sent)", wc.file_id, sent)
        self._on_flushed(wc.file_id)
        return None

    async def _backend_stat(self, file_id: str) -> str:
        try:
            attrs = await self._backend.stat(file_id)
        except Exception as e:
            raise WriteFailed(f"{file_id}: flushed, but its new version is unknown: {e}") from e
        return "" if attrs is None else attrs.version

    async def _set_meta(self, wc: WorkingCopy) -> None:
        """Give the source the mode and modification time the mount shows."""
        mode = wc.header.mode if self._caps & WriteCapability.MODES else None
        mtime = wc.mtime if self._caps & WriteCapability.TIMES else None
        if mode is None and mtime is None:
            return
        try:
            result = await self._backend.set_attrs(wc.file_id, mode, mtime)
        except Exception as e:
            log.warning("%s: flushed, but its mode and time were not set: %s", wc.file_id, e)
            return
        if result.result_code is not RWResult.SUCCESS:
            log.warning(
                "%s: flushed, but its mode and time were not set: %s", wc.file_id, result.reason
            )

    async def _failed(self, wc: WorkingCopy, e: _Outcome) -> str:
        """Act on a failed flush: the conflict copy's name, or WriteFailed."""
        code = e.code
        if code is RWResult.FILE_MODIFIED_EXTERNALLY:
            return await self._conflict(wc, e.reason)
        self.counters.write_failures += 1
        if code is RWResult.PERMANENT_FAILURE:
            self._catalog.external_error = e.reason or "PERMANENT_FAILURE from a flush"
            log.error("flushing %s: storage latched offline: %s", wc.file_id, e.reason)
            raise WriteFailed(f"{wc.file_id}: the storage is offline: {e.reason}")
        if code is RWResult.FILE_FAILURE:
            wc.header.error = e.reason or "FILE_FAILURE"
            await trio.to_thread.run_sync(wc.write_header, limiter=self._disk_limiter)
            log.error("flushing %s failed; kept in the cache, latched: %s", wc.file_id, e.reason)
            raise WriteFailed(f"{wc.file_id}: the source refused it: {e.reason}")
        wc.retry_delay = min(RETRY_MAX, max(RETRY_FIRST, wc.retry_delay * 2))
        self.schedule(wc, wc.retry_delay)
        log.warning(
            "flushing %s failed (%s); again in %.0f s", wc.file_id, e.reason, wc.retry_delay
        )
        raise WriteFailed(f"{wc.file_id}: not flushed: {e.reason}")

    async def _conflict(self, wc: WorkingCopy, reason: str) -> str:
        original = wc.file_id
        copies = self._store.copies
        name = conflict_name(original, lambda n: n in copies or n in self._catalog.files)
        wc.header.base_version = ""
        wc.header.base_size = 0
        wc.header.cut = 0
        wc.header.changed = True
        wc.header.flushing = False
        await trio.to_thread.run_sync(self._store.move, wc, name, limiter=self._disk_limiter)
        self.counters.conflicts += 1
        recent = self.counters.recent_conflicts
        recent.append((original, name))
        del recent[:-20]
        log.warning(
            "conflict: %s changed in the source since it was read (%s); the changes made"
            " here are kept as %s",
            original,
            reason,
            name,
        )
        self._on_flushed(original)
        self._on_flushed(name)
        self.schedule(wc, 0)
        return name

    # -- transfers -------------------------------------------------------------------

    async def _send(self, wc: WorkingCopy, redo: bool, attempt: _Transfer) -> tuple[str, int]:
        """Run the planned transfer; (new version, bytes sent); _Outcome otherwise.

        *redo*: an earlier flush of this copy began changing the source and
        never ended well (the daemon was killed, or the source failed
        midway): the source's version now is taken to be of its making, and
        the file is sent whole against it (a random transfer would leave
        what the earlier one half did).  Should someone else have changed
        the file in that window, this overwrites it: the price of finishing
        a flush that was cut short (docs/writes.md).
        """
        h = wc.header
        whole_only = bool(self._caps & WriteCapability.WHOLE_FILE_ONLY)
        # A whole-file-only backend replaces a file in one step: a flush cut
        # short left the old version or the new one whole, and the backend
        # itself tells its own upload from another's (backends/s3writes.py).
        if redo and not whole_only:
            version = await self._current_version(wc.file_id)
            if version != h.base_version:
                log.warning("%s: finishing a flush that was cut short, the file whole", wc.file_id)
                return await self._transfer(wc, _whole_runs(wc.size), version, True, attempt)
        if whole_only or not h.base_version or (h.cut == 0 and h.base_size > 0):
            return await self._transfer(wc, _whole_runs(wc.size), h.base_version, True, attempt)
        version = h.base_version
        remote = h.base_size
        if h.cut < remote:
            version = await self._set_size(wc.file_id, h.cut, version, attempt)
            remote = h.cut
        if wc.size != remote:
            version = await self._set_size(wc.file_id, wc.size, version, attempt)
        runs = list(wc.changed_runs(CHUNK))
        if not runs:
            return version, 0
        return await self._transfer(wc, runs, version, False, attempt)

    async def _current_version(self, file_id: str) -> str:
        """The version the source has now ("" for none: the file is made)."""
        try:
            attrs = await self._backend.stat(file_id)
        except Exception as e:
            raise _Outcome(RWResult.FAILURE, f"stat before finishing a flush: {e}") from e
        if attrs is None:
            return ""
        if attrs.kind is not FileKind.FILE:
            raise _Outcome(RWResult.FILE_FAILURE, f"the source has a {attrs.kind.value} there")
        return attrs.version

    async def _set_size(self, file_id: str, size: int, version: str, attempt: _Transfer) -> str:
        try:
            with trio.fail_after(CALL_DEADLINE):
                result = await self._backend.set_size(file_id, size, version)
        except trio.TooSlowError:
            result = ChangeResult(RWResult.FAILURE, reason="set_size: no answer")
        except Exception as e:
            result = ChangeResult(RWResult.FAILURE, reason=f"set_size raised {e}")
        if result.result_code is not RWResult.SUCCESS:
            raise _Outcome(
                result.result_code, result.reason or f"set_size: {result.result_code.name}"
            )
        attempt.applied = True  # the source is cut or grown: no longer at the base
        if result.attrs is not None:
            return result.attrs.version
        return await self._backend_stat(file_id)

    async def _transfer(
        self,
        wc: WorkingCopy,
        runs: list[tuple[int, int]],
        version: str,
        whole: bool,
        state: _Transfer,
    ) -> tuple[str, int]:
        kind = RWEvent.WHOLE_FILE if whole else RWEvent(0)
        state.started, state.context = False, None  # the transfer's own calls
        try:
            return await self._calls(wc, runs, version, whole, kind, state)
        except _Outcome:
            raise  # the backend was told what it had to be
        except BaseException:
            if state.started:  # cancelled (the mount stops) or broken midway
                await self._cancel(wc, wc.size, version, state.context, kind)
            raise

    async def _calls(
        self,
        wc: WorkingCopy,
        runs: list[tuple[int, int]],
        version: str,
        whole: bool,
        kind: RWEvent,
        state: _Transfer,
    ) -> tuple[str, int]:
        size = wc.size
        sent = 0
        buf = bytearray(min(CHUNK, max((n for _, n in runs), default=0)))
        for i, (offset, length) in enumerate(runs):
            last_run = i == len(runs) - 1
            if length:
                data = await trio.to_thread.run_sync(
                    wc.read_at, offset, length, limiter=self._disk_limiter
                )
                if len(data) != length:
                    raise _Outcome(RWResult.FAILURE, f"working copy of {wc.file_id} is short")
                buf[:length] = data
            view = memoryview(buf)[:length].toreadonly()
            done = 0
            stalls = 0
            while True:
                rest = length - done
                flags = kind
                if not state.started:
                    flags |= RWEvent.CONTINUOUS_STARTED if whole else RWEvent.RANDOM_STARTED
                elif not last_run:
                    flags |= RWEvent.IN_PROGRESS
                if last_run:
                    flags |= RWEvent.CONTINUOUS_FINISHED if whole else RWEvent.RANDOM_FINISHED
                # A whole-file transfer runs to the end; a random run may stop before it.
                til_end = whole or offset + length >= size
                flags |= RWEvent.TIL_END if til_end else RWEvent.BEFORE_END
                req = WriteData(
                    wc.file_id,
                    size,
                    offset + done,
                    flags,
                    view[done:],
                    rest,
                    file_context=state.context,
                    version=version,
                )
                await self._call(req)
                state.started = True
                state.context = req.file_context
                code = req.result_code
                written = max(0, min(req.bytes_written, rest))
                if code is RWResult.SUCCESS and written < rest and rest:
                    code = RWResult.PARTIAL
                if code is RWResult.SUCCESS:
                    sent += rest
                    state.applied = True
                    break
                if code is RWResult.PARTIAL:
                    state.applied = state.applied or written > 0
                    done += written
                    sent += written
                    stalls = 0 if written else stalls + 1
                    if stalls >= MAX_STALLS:
                        await self._cancel(wc, size, version, state.context, kind)
                        raise _Outcome(RWResult.FAILURE, "the backend stored nothing, again")
                    if done >= length:
                        break
                    continue
                if not last_run:  # the backend holds a transfer that will not finish
                    await self._cancel(wc, size, version, state.context, kind)
                raise _Outcome(code, f"WriteData at {offset + done}: {code.name}")
            if last_run:
                return req.new_version, sent
        return version, sent

    async def _call(self, req: WriteData) -> None:
        self.counters.write_data_calls += 1
        try:
            with trio.fail_after(CALL_DEADLINE):
                await self._backend.write_data(req)
        except trio.TooSlowError:
            log.warning(
                "write_data of %s: no answer in %.0f s: FAILURE", req.file_id, CALL_DEADLINE
            )
            req.result_code = RWResult.FAILURE
        except Exception as e:
            log.warning("write_data of %s raised %s: FAILURE", req.file_id, e)
            req.result_code = RWResult.FAILURE

    async def _cancel(
        self, wc: WorkingCopy, size: int, version: str, context: object, kind: RWEvent
    ) -> None:
        req = WriteData(
            wc.file_id,
            size,
            0,
            kind | RWEvent.CANCELED,
            memoryview(b""),
            0,
            file_context=context,
            version=version,
        )
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await self._call(req)
