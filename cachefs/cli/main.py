"""The ``cachefs`` command: mount, unmount, the cache commands, stats and the resets.

Every error a user can cause ends as one line, ``cachefs: error: ...``, on
stderr and the error's exit code (2 for bad input); a traceback appears only
with ``--log-level debug``.  The options are in cliparser.py, mount and
publish in mountcmd.py, the commands that talk to a mount in client.py.

The daemon of an encrypted mount (started by ``cachefs mount`` with a
readiness pipe, its stderr the log) writes no name in clear from its first
line: its log is sealed (cachefs.daemon.sealedlog), and an error that stops it is
logged by kind only, since its message already went to the mount command
through the pipe.  Output cut short by its reader (``| head``) ends the
command quietly, with 141 as a shell would give it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from cachefs.cli.mount import _daemon_argv, mount_options
from cachefs.cli.parser import build_parser
from cachefs.daemon.sealedlog import NameTags, describe, seal_log
from cachefs.errors import CacheFSError

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
    sealed = bool(getattr(args, "encrypt", False)) and getattr(args, "ready_fd", None) is not None
    if sealed:
        seal_log(NameTags())
    try:
        return args.run(args)
    except CacheFSError as e:
        log.debug("%s failed", args.command, exc_info=True)
        text = f"the mount failed: {describe(e)}" if sealed else " ".join(str(e).split())
        print(f"cachefs: error: {text}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output stopped reading: nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        log.debug("%s failed", args.command, exc_info=True)
        shown = describe(e) if sealed else repr(e)
        print(
            f"cachefs: error: internal error: {shown} (--log-level debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
