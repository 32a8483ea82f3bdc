"""The mount as a detached daemon: started with its options as data, ready or not.

``spawn_daemon`` starts ``python -m cachefs.daemon MOUNTPOINT --ready-fd N``
in a session of its own, writes its :class:`Orders` (the checked
MountOptions and the log level, as one JSON document) to its stdin and
closes it, and returns once the daemon reports on its readiness pipe: one
line, ``ok`` or ``error EXIT_CODE MESSAGE``.  The daemon (``daemon_main``)
reads its orders to their end before it does anything else, mounts, and
reports.  MOUNTPOINT on its command line only names the mount for ``ps``:
it must equal the one in the orders.

The daemon's stdout and stderr are ``cachefs.log`` in the cache dir: its
log, one line per event, capped and rotated (cachefs.daemon.logs), and
whatever else is written there (a traceback of a crash: faulthandler is on).

The daemon of an encrypted mount writes no name in clear from its first
line: its log (its stderr) is sealed (cachefs.daemon.sealedlog), and an
error that stops it is logged by kind only, since its message already went
to the mount command through the pipe.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import select
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cachefs
from cachefs.daemon.logs import log_to_file
from cachefs.daemon.options import MountOptions
from cachefs.daemon.sealedlog import NameTags, describe, seal_log
from cachefs.daemon.serve import LOG_NAME, run_mount
from cachefs.engine.state.cachedir import open_own_file
from cachefs.errors import CacheFSError, MountFailed

log = logging.getLogger(__name__)

LOG_LEVELS = ("debug", "info", "warning", "error")
#: The orders are a few hundred bytes; a bigger document is not ours.
MAX_ORDERS = 1 << 20
#: The orders come at once from `cachefs mount`; this bounds a daemon run by hand.
ORDERS_DEADLINE = 10.0


@dataclass(frozen=True, slots=True)
class Orders:
    """What the daemon is handed: the mount, and how much to log."""

    options: MountOptions
    log_level: str = "info"

    def to_json(self) -> bytes:
        return json.dumps(
            {"log_level": self.log_level, "options": json.loads(self.options.to_json())}
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Orders:
        """ValueError if *data* holds anything but orders."""
        try:
            doc = json.loads(data)
        except RecursionError:
            raise ValueError("nested too deeply") from None
        if not isinstance(doc, dict) or set(doc) != {"log_level", "options"}:
            raise ValueError("expected an object with log_level and options")
        if doc["log_level"] not in LOG_LEVELS:
            raise ValueError(f"log_level: {doc['log_level']!r}")
        return cls(MountOptions.from_json(json.dumps(doc["options"])), doc["log_level"])


class Readiness:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # the parent gave up waiting
        finally:
            os.close(fd)

    def ready(self) -> None:
        self._send("ok\n")

    def failed(self, exit_code: int, message: str) -> None:
        self._send(f"error {exit_code} {' '.join(message.split())}\n")


def spawn_daemon(orders: Orders, log_path: Path, timeout: float) -> int:
    """Start the daemon with *orders*, detached; return its pid once it is ready.

    MountFailed with the daemon's own message (and exit code) if it fails,
    or if it gives no answer within *timeout* seconds.
    """
    read_end, write_end = os.pipe()
    env = dict(os.environ)
    package_root = str(Path(cachefs.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    mountpoint = str(orders.options.mountpoint)
    try:
        try:
            log_fd = open_own_file(log_path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            os.close(read_end)
            raise
        with open(log_fd, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cachefs.daemon", mountpoint, "--ready-fd", str(write_end)],
                pass_fds=(write_end,),
                stdin=subprocess.PIPE,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                cwd="/",
                env=env,
            )
    finally:
        os.close(write_end)
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdin is not None
        with proc.stdin:
            sent = _write_all(proc.stdin.fileno(), orders.to_json(), deadline)
        line = _read_line(read_end, deadline) if sent else None
    finally:
        os.close(read_end)
    if line == "ok":
        return proc.pid
    if line is None:
        proc.terminate()
        raise MountFailed(f"the mount was not ready within {timeout:.0f} s; see {log_path}")
    if line.startswith("error "):
        _, code, message = (line + " ").split(" ", 2)
        raise MountFailed(message.strip() or "the mount failed", int(code) if code.isdigit() else 1)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
    raise MountFailed(f"the mount daemon exited (status {status}); see {log_path}")


def _write_all(fd: int, data: bytes, deadline: float) -> bool:
    """Write *data* to pipe *fd*: True once written (or the reader has gone,
    which its readiness pipe then tells); False if it was not taken in time."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            return False
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            continue
        except BrokenPipeError:
            return True
    return True


def _read_line(fd: int, deadline: float) -> str | None:
    """One line from *fd*; "" on EOF; None if none came by *deadline*."""
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


# -- the daemon's side ---------------------------------------------------------------


def _ready_fd(text: str) -> int:
    """The readiness pipe: an open pipe, never stdin, stdout or stderr."""
    try:
        fd = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    try:
        is_pipe = fd >= 3 and stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (OSError, OverflowError):
        is_pipe = False
    if not is_pipe:
        raise argparse.ArgumentTypeError(f"{fd} is not an open pipe (from 3)")
    return fd


def _read_orders() -> Orders:
    """The orders on stdin, read to their end within ORDERS_DEADLINE; ValueError
    if they are not orders, or do not come in time."""
    if sys.stdin is None:
        raise ValueError("no stdin")
    fd = sys.stdin.fileno()
    data = b""
    deadline = time.monotonic() + ORDERS_DEADLINE
    while len(data) <= MAX_ORDERS:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise ValueError(f"none within {ORDERS_DEADLINE:.0f} s")
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_ORDERS:
        raise ValueError(f"more than {MAX_ORDERS} bytes")
    return Orders.from_json(data)


def daemon_main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon ``spawn_daemon`` started; its exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m cachefs.daemon",
        description="The daemon of one cachefs mount, started by `cachefs mount` with its "
        "options as JSON on stdin.",
    )
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="the mount it serves (for ps)")
    parser.add_argument("--ready-fd", type=_ready_fd, required=True, help="the readiness pipe")
    args = parser.parse_args(argv)
    readiness = Readiness(args.ready_fd)
    try:
        orders = _read_orders()
    except (OSError, ValueError) as e:
        message = f"internal error: the mount daemon got no options it can read ({e})"
        readiness.failed(1, message)
        print(f"cachefs: error: {message}", file=sys.stderr)
        return 1
    opts = orders.options
    try:
        log_to_file(orders.log_level, opts.cache_dir / LOG_NAME)
    except ValueError as e:
        readiness.failed(2, str(e))
        print(f"cachefs: error: {e}", file=sys.stderr)
        return 2
    # A crash of the interpreter (or of a C library in it) leaves its
    # Python traceback in the log too.
    faulthandler.enable()
    if opts.encrypt:
        seal_log(NameTags())
    try:
        if str(opts.mountpoint) != args.mountpoint:
            raise ValueError(f"MOUNTPOINT {args.mountpoint!r} is not the one in the options")
        run_mount(opts, on_ready=readiness.ready)
    except CacheFSError as e:
        readiness.failed(e.exit_code, str(e))
        log.debug("the mount failed", exc_info=True)
        text = f"the mount failed: {describe(e)}" if opts.encrypt else " ".join(str(e).split())
        print(f"cachefs: error: {text}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        readiness.failed(1, f"internal error: {e!r}")
        return 130
    except Exception as e:
        readiness.failed(1, f"internal error: {e!r}")
        log.debug("the mount failed", exc_info=True)
        shown = describe(e) if opts.encrypt else repr(e)
        print(
            f"cachefs: error: internal error: {shown} (--log-level debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0
