"""The ``cachefs`` command: mount, unmount, the cache commands, stats and the resets.

Every error a user can cause ends as one line, ``cachefs: error: ...``, on
stderr and the error's exit code (2 for bad input); a traceback appears only
with ``--log-level debug``.  The options are in cliparser.py, mount and
publish in mountcmd.py, the commands that talk to a mount in client.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cachefs.cliparser import build_parser
from cachefs.errors import CacheFSError
from cachefs.mountcmd import _daemon_argv, mount_options

__all__ = ["_daemon_argv", "build_parser", "main", "mount_options"]

log = logging.getLogger("cachefs")


def _configure_logging(args: argparse.Namespace) -> None:
    foreground = getattr(args, "foreground", False)
    level = args.log_level or ("info" if foreground else "warning")
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if foreground
        else "cachefs: %(levelname)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one cachefs command; returns its exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        return args.run(args)
    except CacheFSError as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"cachefs: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(
            f"cachefs: error: internal error: {e!r} (--log-level debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
