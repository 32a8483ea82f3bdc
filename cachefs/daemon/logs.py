"""Where cachefs logs, and how: one line per event, to stderr or to a capped, rotated file.

Policy:

* One line per event.  Control characters in a message (the newline of
  an exception's text, a file name holding one, a terminal escape) are
  written escaped (``\\n``, ``\\x1b``), so that a line is an event and a
  file name cannot forge one.  An exception logged with an event ends
  its line (``: TYPE: MESSAGE``).  The one exception: at ``--log-level
  debug`` the traceback follows its event, every line of it indented by
  four spaces, so that a line that starts with a space continues the
  event above it.
* In the foreground (and for every command but the daemon), the log goes
  to stderr.  The daemon of ``cachefs mount`` logs to ``cachefs.log`` in
  its cache dir, which is also its stdout and stderr (cachefs.daemon.spawn).
  Before a line would take the file past LOG_MAX_BYTES it is renamed
  ``cachefs.log.1`` (``.1`` to ``.2``, and so on; the oldest beyond
  LOG_BACKUPS is dropped) and a new file is made, owner-only like every
  file of the cache dir.  The new file is put on fds 1 and 2, so that what
  writes there directly (a C library, faulthandler, a traceback of a
  crash) lands in the current file, not in one already rotated.
* ``CACHEFS_LOG_ROTATE=BYTES,FILES`` (for tests) sets the cap and the
  number of old files kept.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from cachefs.engine.state.cachedir import open_own_file
from cachefs.errors import CacheFSError

#: A log file is rotated before a line would take it past this size.
LOG_MAX_BYTES = 10 << 20
#: Rotated files kept: cachefs.log.1 (the newest) to cachefs.log.3.
LOG_BACKUPS = 3
#: For tests only: ``BYTES,FILES`` in place of LOG_MAX_BYTES, LOG_BACKUPS.
ROTATE_ENV = "CACHEFS_LOG_ROTATE"

DAEMON_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
COMMAND_FORMAT = "cachefs: %(levelname)s: %(message)s"

# What would end a line in a text reader: C0 and C1 controls, DEL, and the
# Unicode line and paragraph separators.
_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def one_line(text: str) -> str:
    """*text* with every control character escaped, as ``repr`` would."""
    return _BREAKS.sub(lambda m: _NAMED.get(m[0]) or repr(m[0])[1:-1], text)


class OneLine(logging.Formatter):
    """Formats a record as one line; with *tracebacks*, its traceback follows,
    indented (see the module docstring)."""

    def __init__(self, fmt: str, tracebacks: bool) -> None:
        super().__init__(fmt)
        self._tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        record.message = one_line(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        more = []
        if record.exc_info and record.exc_info[1] is not None:
            e = record.exc_info[1]
            if self._tracebacks:
                more.append(self.formatException(record.exc_info))
            else:
                line += ": " + one_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        if record.stack_info and self._tracebacks:
            more.append(self.formatStack(record.stack_info))
        for text in more:
            line += "".join(f"\n    {part}" for part in text.splitlines())
        return line


def rotation() -> tuple[int, int]:
    """(cap in bytes, old files kept): the constants, or ROTATE_ENV's values.
    ValueError if ROTATE_ENV is set to anything but two numbers from 1."""
    text = os.environ.get(ROTATE_ENV)
    if text is None:
        return LOG_MAX_BYTES, LOG_BACKUPS
    size, sep, count = text.partition(",")
    if not (sep and size.isdigit() and count.isdigit() and int(size) > 0 and int(count) > 0):
        raise ValueError(f"{ROTATE_ENV}={text!r}: expected BYTES,FILES (whole numbers from 1)")
    return int(size), int(count)


class RotatingLog(logging.Handler):
    """Writes lines to *path*, already open as *fds* (the first is written),
    rotating it as the module docstring says.

    If rotating fails (a full disk, a file put in the way), the lines go on
    to the current file, which then grows past the cap.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int, fds: tuple[int, ...]) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fds = fds

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            size = os.fstat(self._fds[0]).st_size
            if size and size + len(data) > self.max_bytes:
                self._rotate()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fds[0], view) :]
        except Exception:
            self.handleError(record)

    def _rotate(self) -> None:
        """Called with the handler's lock held, as emit is.  A log file
        someone moved or deleted is not renamed: a new one is started."""
        try:
            if _same_file(self._fds[0], self.path):
                for n in range(self.backups - 1, 0, -1):
                    older = self._numbered(n)
                    if older.exists():
                        older.rename(self._numbered(n + 1))
                self.path.rename(self._numbered(1))
            fd = open_own_file(self.path, os.O_WRONLY | os.O_APPEND)
        except (OSError, CacheFSError):
            return
        try:
            for target in self._fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)

    def _numbered(self, n: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{n}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def log_to_stderr(level: str, fmt: str = DAEMON_FORMAT) -> None:
    """Log at *level* (a --log-level) to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    _install(handler, level, fmt)


def log_to_file(level: str, path: Path) -> None:
    """Log at *level* to *path*, when it is this process's stderr (as
    ``cachefs mount`` starts its daemon): capped and rotated.  Otherwise
    (a daemon started by hand) to stderr as it is.

    ValueError if ROTATE_ENV is set wrong.
    """
    max_bytes, backups = rotation()
    if not _same_file(2, path):
        log_to_stderr(level)
        return
    _install(RotatingLog(path, max_bytes, backups, (2, 1)), level, DAEMON_FORMAT)


def _install(handler: logging.Handler, level: str, fmt: str) -> None:
    handler.setFormatter(OneLine(fmt, tracebacks=level == "debug"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
