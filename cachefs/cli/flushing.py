"""``cachefs flush``, and how it and ``cachefs unmount`` report a flush.

A changed file reaches the source by itself --write-back-delay seconds
after it was last closed; ``flush`` sends the changed files below each
PATH now and returns once the source has them.  Both commands show a
progress bar on a terminal, then one summary line, then one line on
stderr per file that was not flushed or ran into a conflict.

Exit codes: 0 when every changed file reached the source as the mount
shows it; 1 when one did not: it could not be sent (it stays in the cache
dir and is flushed later, by the next mount at the latest), or the source
had changed meanwhile (a conflict: the changes went to NAME.conflict-TIME
beside it).  A read-only mount refuses ``flush`` (1).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from cachefs.cli.cache import by_mount
from cachefs.cli.options import AddCommand, paths_argument
from cachefs.cli.progress import ProgressBar
from cachefs.control.client import request
from cachefs.control.protocol import Flush, FlushReply
from cachefs.units import format_size


def add_flush(add: AddCommand) -> None:
    flush = add(
        "flush",
        "send changed files to the source now",
        "Send every changed file at or below each PATH (a file, a directory, or the mount "
        "point for all) to the source now, instead of --write-back-delay seconds after it "
        "was last closed, and return once the source has them. Shows a progress bar on a "
        "terminal and a summary line. A file that cannot be sent (the source offline, or "
        "refusing it) stays changed in the cache dir and is sent later; a file changed in "
        "the source meanwhile is a conflict: the changes made here go to "
        "NAME.conflict-<UTC time> beside it. Either is named on stderr, and the exit code "
        "is then 1.",
    )
    paths_argument(flush)
    flush.set_defaults(run=cmd_flush)


def progress_bar() -> ProgressBar | None:
    """The bar of a flush, on stderr when it is a terminal."""
    return ProgressBar("flushing", sys.stderr) if sys.stderr.isatty() else None


def report_flush(mountpoint: Path, reply: FlushReply, seconds: float) -> int:
    """Print what a flush did; 1 if a file did not reach the source as it is, else 0."""
    n = reply["flushed"]
    line = f"flushed {n} file{'s' * (n != 1)} ({format_size(reply['bytes'])}) in {seconds:.1f} s"
    failed, conflicts = len(reply["failed"]), len(reply["conflicts"])
    if failed:
        line += f"; {failed} not flushed"
    if conflicts:
        line += f"; {conflicts} conflict{'s' * (conflicts != 1)}"
    print(line, flush=True)
    for failure in reply["failed"]:
        print(f"cachefs: error: {failure['error']}", file=sys.stderr)
    for conflict in reply["conflicts"]:
        print(
            f"cachefs: warning: {mountpoint / conflict['file']} changed in the source "
            f"meanwhile: the changes made here are in {mountpoint / conflict['copy']}",
            file=sys.stderr,
        )
    return 1 if failed or conflicts else 0


def cmd_flush(args: argparse.Namespace) -> int:
    status = 0
    for entry, file_ids in by_mount(args.paths).items():
        started = time.monotonic()
        bar = progress_bar()
        try:
            on_progress = bar.update if bar is not None else None
            reply = request(entry, Flush(tuple(file_ids)), on_progress=on_progress)
        finally:
            if bar is not None:
                bar.close()
        if reply["flushed"] or reply["failed"] or reply["conflicts"]:
            done = report_flush(entry.mountpoint, reply, time.monotonic() - started)
            status = max(status, done)
        else:
            where = ", ".join(str(entry.mountpoint / f) for f in file_ids)
            print(f"nothing to flush: no changed files at or below {where}")
    return status
