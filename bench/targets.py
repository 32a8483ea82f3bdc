"""What the jobs run against: the raw source, a cachefs mount (plain or
encrypted), an rclone mount (the same over an S3 bucket: bench/s3source.py).

``fresh()`` of a mounted target mounts it with an empty cache and always
unmounts it on the way out (``fusermount3 -u -z`` as the last resort); the
daemon it started is always stopped and its cache dir removed.  While mounted, ``root`` is where the
data appears and ``pid`` is the daemon to account for.  ``measures()`` says
which jobs and conditions a target takes part in: every one, except for the
encrypted cachefs and the one with metrics on, which are there to be
compared with the plain one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.system import (
    REPO,
    BenchError,
    cachefs_cmd,
    is_mounted,
    lazy_unmount,
    stop_process,
    wait_mounted,
)

MOUNT_DEADLINE = 60.0
EXIT_DEADLINE = 30.0
SETTLE_DEADLINE = 120.0  # hashing a fill of a few GiB at nice 19
KEY_BYTES = 32  # a raw key: cachefs takes it as it is, no passphrase stretching
# where the encrypted cache is measured (job keys, conditions): its cost per byte
# shows in seq 1 MiB, its cost per call in rand 4 KiB, and both on cache hits; warm
# checks that nothing else got slower; cold is left out to keep the run short
ENCRYPTED_JOBS = frozenset({"seq1m_j1", "rand4k_j1", "rand4k_j4"})
ENCRYPTED_CONDITIONS = frozenset({"cache-hit", "warm"})
# where the metrics are measured: the jobs whose cache hits are many small
# requests (random 4 KiB, small files, the first byte of a file)
METRICS_JOBS = frozenset({"rand4k_j1", "rand4k_j4", "small", "small8", "ttfb"})
METRICS_CONDITIONS = frozenset({"cache-hit", "warm"})


class Target:
    """The raw source: fio directly on the directory (the physical limit)."""

    name = "raw"

    def __init__(self, source: Path, workdir: Path) -> None:
        self.source = source
        self.workdir = workdir
        self.root = source
        self.pid: int | None = None

    @contextmanager
    def fresh(self) -> Iterator[None]:
        yield

    def measures(self, job: str, condition: str) -> bool:
        """Whether this target is measured on *job* (a job key) under *condition*."""
        return True

    def counters(self) -> dict[str, Any]:
        return {}

    def settle(self) -> None:
        """Wait for work the target does after a read (nothing, by default)."""

    def _prepare(self, kind: str) -> tuple[Path, Path, Path]:
        """An unmounted empty mount point, an empty cache dir and a log file."""
        mnt = self.workdir / "mnt" / kind
        cache = self.workdir / "cache" / kind
        lazy_unmount(mnt)
        mnt.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        return mnt, cache, logs / f"{kind}.log"


class CachefsTarget(Target):
    """``cachefs mount SOURCE MNT --cache-dir DIR`` (the daemon of the CLI)."""

    name = "cachefs"

    @contextmanager
    def fresh(self) -> Iterator[None]:
        mnt, cache, log = self._prepare(self.name)
        done = subprocess.run(
            cachefs_cmd(
                "mount",
                self.source_arg(),
                str(mnt),
                "--cache-dir",
                str(cache),
                *self.mount_options(),
            ),
            capture_output=True,
            text=True,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            timeout=MOUNT_DEADLINE,
            check=False,
            env=self.environment(),
        )
        try:
            if done.returncode != 0:
                raise BenchError(f"cachefs mount failed: {done.stderr.strip()}")
            self.root = mnt
            self.pid = int(self.counters()["pid"])
            yield
        finally:
            self._unmount(mnt)
            _keep_log(cache / "cachefs.log", log)
            shutil.rmtree(cache, ignore_errors=True)
            self.root, self.pid = self.source, None

    def source_arg(self) -> str:
        """The SOURCE of ``cachefs mount``."""
        return str(self.source)

    def mount_options(self) -> list[str]:
        """Options of ``cachefs mount`` beyond the cache dir."""
        return []

    def environment(self) -> dict[str, str] | None:
        """The environment of ``cachefs mount`` (None: this process's)."""
        return None

    def counters(self) -> dict[str, Any]:
        from cachefs.control.client import request
        from cachefs.control.mounts import mount_at
        from cachefs.control.protocol import Stats

        entry = mount_at(self.root)
        return dict(request(entry, Stats(), timeout=10.0)) if entry is not None else {}

    def settle(self) -> None:
        """Wait until blocks just fetched are hashed (engine/miss/hasher.py): until then the
        cache commits them as absent, so they are not yet cached for good."""
        deadline = time.monotonic() + SETTLE_DEADLINE
        while self.counters().get("unhashed_blocks", 0):
            if time.monotonic() > deadline:
                raise BenchError(f"blocks still unhashed after {SETTLE_DEADLINE} s")
            time.sleep(0.05)

    def _unmount(self, mnt: Path) -> None:
        pid = self.pid
        try:
            if is_mounted(mnt):
                subprocess.run(
                    cachefs_cmd("unmount", str(mnt), "--timeout", str(EXIT_DEADLINE)),
                    capture_output=True,
                    cwd=REPO,
                    stdin=subprocess.DEVNULL,
                    timeout=EXIT_DEADLINE + 10,
                    check=False,
                )
        finally:
            lazy_unmount(mnt)
            if pid is not None:
                _end_daemon(pid)


class RcloneTarget(Target):
    """``rclone mount SOURCE MNT --vfs-cache-mode full`` with its own cache dir."""

    name = "rclone"

    @contextmanager
    def fresh(self) -> Iterator[None]:
        mnt, cache, log = self._prepare(self.name)
        cmd = ["rclone", "mount", self.remote(), str(mnt), "--vfs-cache-mode", "full"]
        cmd += ["--cache-dir", str(cache), "--config", "/dev/null"]
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                env=self.environment(),
            )
        try:
            wait_mounted(mnt, proc, log, MOUNT_DEADLINE)
            self.root, self.pid = mnt, proc.pid
            yield
        finally:
            try:
                if is_mounted(mnt):
                    subprocess.run(
                        ["fusermount3", "-u", str(mnt)], capture_output=True, check=False
                    )
                stop_process(proc)
            finally:
                lazy_unmount(mnt)
                shutil.rmtree(cache, ignore_errors=True)
                self.root, self.pid = self.source, None

    def remote(self) -> str:
        """What ``rclone mount`` mounts."""
        return str(self.source)

    def environment(self) -> dict[str, str] | None:
        """The environment of ``rclone mount`` (None: this process's)."""
        return None


class EncryptedTarget(CachefsTarget):
    """``cachefs mount ... --encrypt --key-file KEY``: the cache encrypted at rest.

    The key is 32 random bytes, written (mode 600) to the work dir for each
    mount and removed after it.  Measured only where encryption shows: the
    jobs of ``ENCRYPTED_JOBS``, on cache hits (every block opened from the
    cache disk) and warm (the page cache; nothing to open).
    """

    name = "cachefs-enc"

    def __init__(self, source: Path, workdir: Path) -> None:
        super().__init__(source, workdir)
        self.key_file = workdir / f"{self.name}.key"

    @contextmanager
    def fresh(self) -> Iterator[None]:
        _write_key(self.key_file)
        try:
            with super().fresh():
                if self.counters().get("encrypted") is not True:
                    raise BenchError("cachefs mount --encrypt: the mount says it is not encrypted")
                yield
        finally:
            self.key_file.unlink(missing_ok=True)

    def measures(self, job: str, condition: str) -> bool:
        return job in ENCRYPTED_JOBS and condition in ENCRYPTED_CONDITIONS

    def mount_options(self) -> list[str]:
        return ["--encrypt", f"--key-file={self.key_file}"]


class Pyfuse3Target(CachefsTarget):
    """``cachefs mount ... --fuse pyfuse3``: the same mount served through
    pyfuse3 (libfuse) instead of the native transport, so that the default
    stays a measured choice.  No passthrough: cache hits are read through
    cachefs."""

    name = "cachefs-pyfuse3"

    def mount_options(self) -> list[str]:
        return ["--fuse", "pyfuse3"]


class MetricsTarget(CachefsTarget):
    """``cachefs mount ... --metrics 127.0.0.1:PORT`` (a free port): the cost of
    the metrics on the cache-hit path, where timing each FUSE request weighs
    most, against the plain cachefs: ``METRICS_JOBS`` on cache hits and warm.
    Nothing scrapes it meanwhile."""

    name = "cachefs-metrics"

    def measures(self, job: str, condition: str) -> bool:
        return job in METRICS_JOBS and condition in METRICS_CONDITIONS

    def mount_options(self) -> list[str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return ["--metrics", f"127.0.0.1:{port}"]


class ThrottledTarget(CachefsTarget):
    """``cachefs mount ... --throttle SPEC``: cachefs over ``throttle(local)``."""

    name = "cachefs-throttled"

    def __init__(self, source: Path, workdir: Path, spec: str) -> None:
        super().__init__(source, workdir)
        self.spec = spec

    def mount_options(self) -> list[str]:
        return [f"--throttle={self.spec}"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _end_daemon(pid: int) -> None:
    """The daemon this suite started must be gone: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        end = time.monotonic() + EXIT_DEADLINE
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if not _alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def _write_key(path: Path) -> None:
    """A fresh random key of 32 raw bytes at *path*, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a file left by an earlier run keeps its mode otherwise
        os.write(fd, os.urandom(KEY_BYTES))
    finally:
        os.close(fd)


def _keep_log(src: Path, dst: Path) -> None:
    try:
        with open(src, "rb") as f, open(dst, "ab") as out:
            shutil.copyfileobj(f, out)
    except OSError:
        pass


TARGETS = {
    "raw": Target,
    "cachefs": CachefsTarget,
    "cachefs-pyfuse3": Pyfuse3Target,
    "cachefs-enc": EncryptedTarget,
    "cachefs-metrics": MetricsTarget,
    "rclone": RcloneTarget,
}
