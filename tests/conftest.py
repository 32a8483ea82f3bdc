"""Fixtures for tests that really mount: ``mount(source, *options)`` starts
``python -m cachefs mount ... --foreground`` in a subprocess, waits (with a
deadline) until the mount point is mounted, and always unmounts at the end.
The ``mount`` fixture runs its test once per FUSE transport (test ids end in
``[native]`` / ``[pyfuse3]``; ``Mount.fuse`` says which); a test that does
not depend on the transport pins one with
``@pytest.mark.parametrize("mount", ["native"], indirect=True)``
(``NATIVE_ONLY``).
*source* is a directory or a URL (``s3://bucket``, with ``--s3-endpoint``
among the options); the daemon inherits this process's environment.
Also the helpers those tests share: reads that bypass the kernel's page
cache, pushing data files out of it, what a cache dir really occupies on
disk, a bare mount point, and the check of a one-line CLI error.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# the real redis-server of the group records tests (tests/records/), started per test
from redisserver import redis_server as redis_server
from wheelrig import installed as installed

from cachefs._linux import pagecache
from cachefs.control.client import request
from cachefs.control.mounts import find_mount, mount_at
from cachefs.control.protocol import Stats, Unmount
from cachefs.daemon.tuning import abort_connection
from cachefs.errors import CacheFSError

REPO = Path(__file__).resolve().parent.parent
#: The FUSE transports (``cachefs mount --fuse``) every mount test runs over.
FUSE_TRANSPORTS = ("native", "pyfuse3")
#: Runs a test of the ``mount`` fixture over the native transport only: for what
#: does not depend on the transport (a command's output, the control socket,
#: the cache dir), where the FUSE requests made are only a means.
NATIVE_ONLY = pytest.mark.parametrize("mount", ["native"], indirect=True)
MOUNT_DEADLINE = 20.0
EXIT_DEADLINE = 30.0
#: How long a daemon has to answer a request of the tests (cachefs unmount's own).
ANSWER_DEADLINE = 5.0


# Two workers share the two cores (.ci/test): how long an example took says
# nothing about the code under test, so no example has a deadline.
settings.register_profile("cachefs", deadline=None)
settings.load_profile("cachefs")

TIERS = {
    "unit": "no mount: engine, fs, cli, backends",
    "records": "group records, replicated through a real redis-server",
    "mount": "real FUSE mounts",
}


def pytest_configure(config: pytest.Config) -> None:
    for tier, what in TIERS.items():
        config.addinivalue_line("markers", f"{tier}: {what} (tests/{tier}/)")
    config.addinivalue_line(
        "markers",
        "serial: drops the kernel's caches, or depends on how fast the kernel answers, "
        "which tests running beside it would change: .ci/test runs these after the "
        "others, alone",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier, the directory it lives in: ``pytest -m unit``."""
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(tier)


def run_cachefs(*args: object, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run the cachefs command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "cachefs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def pread_direct(path: Path, offset: int, length: int = 64 * 1024) -> bytes:
    """One read that reaches cachefs as it is: no page cache, no kernel readahead."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def disk_usage(cache_dir: Path) -> int:
    """Bytes the cache's data files really occupy on disk (allocated blocks)."""
    total = 0
    for entry in os.scandir(cache_dir / "data"):
        try:
            total += entry.stat().st_blocks * 512
        except FileNotFoundError:  # retired meanwhile
            pass
    return total


def lazy_unmount(mountpoint: Path) -> None:
    if mount_at(mountpoint) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def evict_page_cache(root: Path) -> int:
    """Push every file below *root* out of the page cache (fsync, then DONTNEED); how many."""
    count = 0
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            count += 1
    return count


def cached_pages(path: Path, length: int | None = None) -> int:
    """How many pages of the file at *path* (of its first *length* bytes) are in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n = pagecache.cached_pages(fd, 0, max(1, length or path.stat().st_size))
    finally:
        os.close(fd)
    assert n is not None, "cachestat(2) is needed: Linux 6.5 or later"
    return n


def kernel_has_passthrough() -> bool:
    """Whether this kernel can read FUSE files from backing files (Linux 6.9+,
    CONFIG_FUSE_PASSTHROUGH); assumed where the kernel config is not exposed."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_FUSE_PASSTHROUGH=y\n" in f.read()
    except OSError:
        return True


def run_on_a_terminal(*args: object) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run ``cachefs ARGS`` with stderr on a pseudo-terminal (where progress
    lines are drawn); the finished process and what the terminal showed."""
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "cachefs", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=terminal,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            text=True,
            timeout=60,
            check=False,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal was closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    return proc, shown.decode()


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of *size* mounted on the new directory *where* (as root), gone afterwards."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fds_under(pid: int | str, directory: Path) -> list[str]:
    """Where process *pid*'s fds (``"self"``: this process) under *directory* point."""
    prefix = str(directory)
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(prefix):
            out.append(target)
    return out


def wait_for(what: str, check: Callable[[], bool], deadline: float = 20.0) -> None:
    """Poll *check* until it holds (a state the test cannot be told of);
    fail after *deadline* seconds."""
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline:g} s")
        time.sleep(0.05)


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit code 2 and one line of stderr, ``cachefs ... error: ...``, naming *words*."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cachefs") and "error:" in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A source directory holding hello.txt (modules that need more define their own)."""
    root = tmp_path / "src"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    return root


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    """A mount point for ``cachefs mount`` run as users do; unmounted whatever happens."""
    path = tmp_path / "mnt"
    path.mkdir()
    try:
        yield path
    finally:
        if mount_at(path) is not None:
            run_cachefs("unmount", path)
            lazy_unmount(path)


@dataclass
class Mount:
    source: Path | str
    mountpoint: Path
    cache_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]
    options: tuple[str, ...] = field(default=())
    #: the FUSE transport serving it
    fuse: str = "native"

    def __truediv__(self, rel: str) -> Path:
        return self.mountpoint / rel

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[str, Any]:
        """What ``cachefs stats --json`` of this mount prints: its request, made
        here (tests/mount/test_mount.py runs the command itself)."""
        stats: dict[str, Any] = json.loads(
            json.dumps(request(find_mount(self.mountpoint), Stats()))
        )
        return stats

    def kill(self) -> None:
        """kill -9 the daemon, then detach the dead mount (``fusermount3 -u -z``).

        A daemon that cannot die (a thread of it stuck in the kernel on its
        own mount) fails the test, after its connection is aborted so that
        nothing stays blocked.
        """
        self.proc.kill()
        try:
            self.proc.wait(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            entry = mount_at(self.mountpoint)
            if entry is not None:
                abort_connection(entry)
            self.proc.wait(timeout=EXIT_DEADLINE)
            pytest.fail(f"the daemon did not die of kill -9:\n{self.log_text()}")
        finally:
            lazy_unmount(self.mountpoint)

    def unmount(self) -> None:
        """Unmount cleanly with ``cachefs unmount``; the daemon must exit with 0."""
        done = run_cachefs("unmount", self.mountpoint, "--timeout", EXIT_DEADLINE)
        assert done.returncode == 0, done.stderr
        assert self.proc.wait(timeout=EXIT_DEADLINE) == 0, self.log_text()
        assert mount_at(self.mountpoint) is None

    def stop(self) -> None:
        """Whatever state it is in: unmounted, daemon gone (for finally).

        A daemon that answers is asked here, as ``cachefs unmount`` asks it
        (flush, then unmount); any other is left to ``cachefs unmount``
        (a busy, stopped or hung daemon: signalled, or aborted and detached).
        """
        try:
            entry = mount_at(self.mountpoint) if self.proc.poll() is None else None
            if entry is not None:
                try:
                    request(entry, Unmount(keep_dirty=False), timeout=ANSWER_DEADLINE)
                except CacheFSError:
                    run_cachefs("unmount", self.mountpoint, "--timeout", EXIT_DEADLINE)
            try:
                self.proc.wait(timeout=EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=EXIT_DEADLINE)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            lazy_unmount(self.mountpoint)


class MountFactory:
    def __init__(self, tmp_path: Path, fuse: str = "native") -> None:
        self._tmp = tmp_path
        #: the FUSE transport of every mount it makes
        self.fuse = fuse
        self._count = 0
        self.mounts: list[Mount] = []

    def __call__(
        self,
        source: Path | str,
        *options: object,
        cache_dir: Path | None = None,
        block_size: str | None = "64K",
        prefix: tuple[str, ...] = (),
    ) -> Mount:
        """*prefix*: a command the daemon runs under (``setpriv ...``)."""
        self._count += 1
        mountpoint = self._tmp / f"mnt{self._count}"
        mountpoint.mkdir()
        cache_dir = cache_dir or self._tmp / f"cache{self._count}"
        log = self._tmp / f"mount{self._count}.log"
        args = ["--fuse", self.fuse, *(str(o) for o in options)]
        if block_size is not None:
            args += ["--block-size", block_size]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "cachefs", "mount", str(source), str(mountpoint)]
                + ["--foreground", "--cache-dir", str(cache_dir), "--log-level", "debug", *args],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd=REPO,
            )
        mount = Mount(source, mountpoint, cache_dir, log, proc, tuple(args), self.fuse)
        self.mounts.append(mount)
        deadline = time.monotonic() + MOUNT_DEADLINE
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                pytest.fail(f"cachefs mount exited with {proc.returncode}:\n{mount.log_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not mounted after {MOUNT_DEADLINE} s:\n{mount.log_text()}")
            time.sleep(0.02)
        return mount

    def close(self) -> None:
        for mount in reversed(self.mounts):
            mount.stop()


@pytest.fixture
def cachefs() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run ``python -m cachefs ARGS...``; returns the CompletedProcess."""
    return run_cachefs


@pytest.fixture(params=FUSE_TRANSPORTS)
def mount(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MountFactory]:
    """Mount sources for one test, over each FUSE transport in turn; every
    mount is gone when the test ends.

    Skips the test when the machine has no /dev/fuse (never when it has one).
    """
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (FUSE) on this machine")
    factory = MountFactory(tmp_path, fuse=request.param)
    try:
        yield factory
    finally:
        factory.close()
