"""How a long command reports: a progress bar on a terminal, one summary line at the end.

The bar shows bytes done of the total, the rate over the last RATE_WINDOW
seconds, the time left at that rate, and files done.  It is redrawn in
place (carriage return) and erased before the summary is printed.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TextIO

from cachefs.control.protocol import WholeFilesReply
from cachefs.units import format_size

RATE_WINDOW = 5.0
BAR_MIN, BAR_MAX = 10, 40


def format_duration(seconds: float) -> str:
    """``0:07``, ``12:34``, ``1:02:03``."""
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def render(verb: str, report: dict[str, Any], rate: float | None, width: int) -> str:
    """The status line of a progress *report*, at most *width* columns."""
    done, total = int(report["done"]), int(report["total"])
    files = f"{report['files_done']}/{report['files']} files"
    if report.get("scanning"):
        line = f"{verb}: finding files... {report['files']} files, {format_size(total)}"
        return line[: max(0, width - 1)]
    fraction = min(1.0, done / total) if total else 1.0
    speed = f"{format_size(int(rate))}/s" if rate is not None else "--/s"
    eta = f"ETA {format_duration(max(0, total - done) / rate)}" if rate else "ETA --:--"
    head = f"{verb} {fraction:4.0%}"
    tail = f"{format_size(done)}/{format_size(total)} {speed} {eta} {files}"
    room = width - len(head) - len(tail) - 5
    if room >= BAR_MIN:
        n = min(BAR_MAX, room)
        filled = int(fraction * n)
        return f"{head} [{'#' * filled}{'-' * (n - filled)}] {tail}"
    return f"{head} {tail}"[: max(0, width - 1)]


class ProgressBar:
    """A status line redrawn on *stream* from a command's progress reports."""

    def __init__(
        self,
        verb: str,
        stream: TextIO,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self._verb = verb
        self._stream = stream
        self._clock = clock
        self._width = width
        self._samples: deque[tuple[float, int]] = deque()
        self._shown = 0

    def rate(self) -> float | None:
        """Bytes per second over the last RATE_WINDOW seconds; None until it can tell."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def update(self, report: dict[str, Any]) -> None:
        if not report.get("scanning"):
            now = self._clock()
            self._samples.append((now, int(report["done"])))
            while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
                self._samples.popleft()
        width = self._width or shutil.get_terminal_size().columns
        line = render(self._verb, report, self.rate(), width)
        self._stream.write("\r" + line.ljust(self._shown))
        self._stream.flush()
        self._shown = len(line)

    def close(self) -> None:
        """Erase the line."""
        if self._shown:
            self._stream.write("\r" + " " * self._shown + "\r")
            self._stream.flush()
            self._shown = 0


def summary(verb_past: str, result: WholeFilesReply, seconds: float) -> str:
    """``prefetched 40 files, 2.5 GiB (1.3 GiB from the source) in 30.1 s``."""
    files, ok, failed = result["files"], result["succeeded"], len(result["failed"])
    count = f"{ok} of {files} files" if ok != files else f"{files} file{'s' * (files != 1)}"
    line = (
        f"{verb_past} {count}, {format_size(result['bytes'])} "
        f"({format_size(result['fetched'])} from the source) in {seconds:.1f} s"
    )
    if failed:
        line += f"; {failed} failed"
    return line
