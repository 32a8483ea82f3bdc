"""Running the mount as a detached daemon, and its readiness pipe."""

from __future__ import annotations

import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import cachefs
from cachefs.engine.state.cachedir import open_own_file
from cachefs.errors import MountFailed

log = logging.getLogger(__name__)


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


def spawn_daemon(argv: list[str], log_path: Path, timeout: float) -> int:
    """Start ``cachefs <argv> --ready-fd N`` detached; return its pid once ready."""
    read_end, write_end = os.pipe()
    env = dict(os.environ)
    package_root = str(Path(cachefs.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        log_fd = open_own_file(log_path, os.O_WRONLY | os.O_APPEND)
        with open(log_fd, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cachefs", *argv, "--ready-fd", str(write_end)],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                cwd="/",
                env=env,
            )
    finally:
        os.close(write_end)
    try:
        line = _read_line(read_end, timeout)
    finally:
        os.close(read_end)
    if line == "ok":
        return proc.pid
    if line is None:
        proc.terminate()
        raise MountFailed(f"the mount was not ready within {timeout:.0f} s; see {log_path}")
    if line.startswith("error "):
        _, code, message = line.split(" ", 2)
        raise MountFailed(message, int(code))
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
    raise MountFailed(f"the mount daemon exited (status {status}); see {log_path}")


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from *fd*; "" on EOF; None if none came in time."""
    deadline = time.monotonic() + timeout
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
