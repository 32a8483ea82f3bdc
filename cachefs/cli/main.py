"""The ``cachefs`` command: mount, unmount, the cache commands, flush, stats and the resets.

Every error a user can cause ends as one line, ``cachefs: error: ...``, on
stderr and the error's exit code (2 for bad input); a traceback appears only
with ``--log-level debug``.  The commands are declared by family: mount and
publish in cachefs.cli.mount, the cache commands in cachefs.cli.cache,
flush in cachefs.cli.flushing, unmount, stats and the resets in
cachefs.cli.running; the options they share in cachefs.cli.options.
Output cut short by its reader (``| head``) ends the command quietly,
with 141 as a shell would give it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from cachefs.cli.parser import build_parser
from cachefs.daemon.logs import COMMAND_FORMAT, DAEMON_FORMAT, log_to_stderr
from cachefs.errors import CacheFSError

__all__ = ["build_parser", "main"]

log = logging.getLogger("cachefs")


def _configure_logging(level: str | None, foreground: bool) -> None:
    """A foreground mount logs as its daemon would, one line per event; any
    other command says only what went wrong, prefixed ``cachefs:``."""
    level = level or ("info" if foreground else "warning")
    log_to_stderr(level, DAEMON_FORMAT if foreground else COMMAND_FORMAT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one cachefs command; returns its exit code."""
    args = build_parser().parse_args(argv)
    command: str = args.command
    run: Callable[[argparse.Namespace], int] = args.run
    level: str | None = args.log_level
    foreground: bool = getattr(args, "foreground", False)
    _configure_logging(level, foreground)
    try:
        return run(args)
    except CacheFSError as e:
        log.debug("%s failed", command, exc_info=True)
        print(f"cachefs: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped reading: nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        log.debug("%s failed", command, exc_info=True)
        print(
            f"cachefs: error: internal error: {e!r} (--log-level debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
