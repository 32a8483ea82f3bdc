"""Sending the changed files to the source when the mount is told to: by
``cachefs flush`` and ``cachefs unmount`` (``flush_files``), and by the
daemon on its way out (``flush_on_exit``).

Policy:

* A flush asked for by a command reports progress as ``prefetch`` does,
  every PROGRESS_INTERVAL seconds, and answers with what it did: the files
  that reached the source (and their bytes, as their sizes were when it
  started), those that did not (they stay changed in the cache dir, to be
  flushed later: by the next mount at the latest), and the conflicts.  A
  conflict copy is flushed before the answer too.
* The daemon on its way out (the kernel already let go) flushes for at
  most its deadline, or until a signal says to stop, and logs how many
  changed files are left in the cache dir; the flusher logs each failure
  and conflict as it happens.
"""

from __future__ import annotations

import logging
import signal

import trio

from cachefs.control.protocol import Conflict, FlushFailure, FlushReply, WholeFilesProgress
from cachefs.control.server import Progress
from cachefs.engine import FileCache

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25


async def flush_files(cache: FileCache, file_ids: list[str], progress: Progress) -> FlushReply:
    """Flush *file_ids* (changed files) and the conflict copies they turn into."""
    if not file_ids:
        return {"flushed": 0, "bytes": 0, "failed": [], "conflicts": []}
    sizes = {f: attrs.size if (attrs := cache.shown_attrs(f)) else 0 for f in file_ids}
    report: WholeFilesProgress = {
        "scanning": False,
        "done": 0,
        "total": sum(sizes.values()),
        "files_done": 0,
        "files": len(file_ids),
        "failed": 0,
    }

    def advanced(done: int, total: int) -> None:
        report["done"], report["total"] = done, total
        report["files_done"] += 1

    async def keep_reporting() -> None:
        while True:
            await progress.send(dict(report))
            await trio.sleep(PROGRESS_INTERVAL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_reporting)
        done = await cache.flush_files(file_ids, advanced)
        failed = list(done.failed)
        # A conflict copy is flushed as a new file: now, not after the answer.
        copies = [copy for _, copy in done.conflicts]
        if copies:
            failed += (await cache.flush_files(copies)).failed
        nursery.cancel_scope.cancel()
    report["failed"] = len(failed)
    await progress.send(dict(report))
    return {
        "flushed": len(done.flushed),
        "bytes": sum(sizes.get(f, 0) for f in done.flushed),
        "failed": [_failure(f, why) for f, why in sorted(failed)],
        "conflicts": [Conflict(file=f, copy=c) for f, c in done.conflicts],
    }


def _failure(file_id: str, why: str) -> FlushFailure:
    message = " ".join(why.split()) or "not flushed"
    if file_id not in message:
        message = f"{file_id}: {message}"
    return {"file": file_id, "error": message}


async def flush_on_exit(cache: FileCache, deadline: float) -> None:
    """Flush every changed file, for at most *deadline* seconds, or until
    SIGTERM, SIGINT or SIGHUP says to stop; log what is left."""
    if not cache.writable or not cache.write_statistics().dirty_files:
        return
    why = "not flushed"
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                nonlocal why
                async for signum in signals:
                    why = f"not flushed: stopped by {signal.Signals(signum).name}"
                    nursery.cancel_scope.cancel()

            nursery.start_soon(stop_on_signal)
            with trio.move_on_after(deadline) as timer:
                report = await cache.flush_files()
                if report.flushed:
                    log.info("flushed %d changed files on the way out", len(report.flushed))
            if timer.cancelled_caught:
                why = f"not flushed within {deadline:g} s"
            nursery.cancel_scope.cancel()
    log_left(cache, why, logging.WARNING)


def log_left(cache: FileCache, why: str, level: int) -> None:
    """Say how many changed files wait in the cache dir, and why."""
    left = cache.write_statistics().dirty_files
    if left:
        log.log(
            level,
            "%d changed file%s %s: kept in %s, flushed by the next mount of it",
            left,
            "s" * (left != 1),
            why,
            cache.cache_dir / "dirty",
        )
