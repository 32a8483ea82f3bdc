"""cachefs as a service, for real, as root: ``mount -t cachefs`` and fstab lines
through the mount.cachefs helper, ``umount``, and the systemd unit
docs/systemd/cachefs@.service run as systemd runs it.

These are properties of commands (mount(8), the helper, the unit's lines),
so the native transport only.  The helpers are installed in /sbin for the
test as symlinks to this environment's scripts, where none is installed.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EXIT_DEADLINE, MOUNT_DEADLINE, REPO, lazy_unmount, run_cachefs

from cachefs.control.mounts import daemon_pid, mount_at, wait_for_exit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) and the unit run as root")

UNIT = REPO / "docs" / "systemd" / "cachefs@.service"
HELPERS = ("mount.cachefs", "mount.fuse.cachefs")


@pytest.fixture(scope="module")
def helpers() -> Iterator[None]:
    """/sbin/mount.cachefs and /sbin/mount.fuse.cachefs, as pip's scripts linked there."""
    made = []
    try:
        for name in HELPERS:
            script = Path(sys.executable).parent / name
            assert script.exists(), f"{script} is missing: pip install -e . makes it"
            link = Path("/sbin") / name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(script)
                made.append(link)
        yield
    finally:
        for link in made:
            link.unlink()


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=60, check=False
    )


def unmount_and_check_flushed(mnt: Path, cache_dir: Path, src: Path) -> None:
    """``umount MNT`` (what systemd and shutdown do): the daemon flushes
    the change written through the mount to SRC and exits."""
    (mnt / "new.txt").write_text("written through the mount\n")
    pid = daemon_pid(cache_dir)
    assert pid is not None
    done = run("umount", mnt)
    assert done.returncode == 0, done.stderr
    assert mount_at(mnt) is None
    assert wait_for_exit(pid, EXIT_DEADLINE), (cache_dir / "cachefs.log").read_text()
    assert (src / "new.txt").read_text() == "written through the mount\n"
    assert daemon_pid(cache_dir) is None


@pytest.mark.parametrize("fstype", ["cachefs", "fuse.cachefs"])
def test_mount_t_mounts_ready_and_umount_flushes(
    helpers: None, src: Path, mnt: Path, tmp_path: Path, fstype: str
) -> None:
    cache_dir = tmp_path / "cache"
    # A long write-back delay: only the unmount sends the new file.
    options = f"cache-dir={cache_dir},cache-size=20M,write-back-delay=600"
    done = run("mount", "-t", fstype, src, mnt, "-o", options)
    assert done.returncode == 0, done.stderr
    assert mount_at(mnt) is not None  # usable once mount returns
    assert (mnt / "hello.txt").read_bytes() == (src / "hello.txt").read_bytes()
    unmount_and_check_flushed(mnt, cache_dir, src)


def test_fstab_line(helpers: None, src: Path, mnt: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"{src} {mnt} cachefs defaults,_netdev,cache-size=20M,cache-dir={cache_dir},"
        "write-back-delay=600 0 0\n"
    )
    done = run("mount", "-T", fstab, mnt)
    assert done.returncode == 0, done.stderr
    assert (mnt / "hello.txt").read_text() == "hello\n"
    unmount_and_check_flushed(mnt, cache_dir, src)


def test_unknown_option_is_refused_by_name(
    helpers: None, src: Path, mnt: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    done = run("mount", "-t", "cachefs", src, mnt, "-o", f"cache-dir={cache_dir},colour=blue")
    assert done.returncode == 1, done.stderr  # mount(8)'s "incorrect invocation"
    assert done.stderr.splitlines() == [
        "mount.cachefs: error: unknown option 'colour=blue' (see mount.cachefs --help)"
    ]
    assert mount_at(mnt) is None
    assert not cache_dir.exists()


def test_fake_checks_and_mounts_nothing(
    helpers: None, src: Path, mnt: Path, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    done = run("mount", "-f", "-v", "-t", "cachefs", src, mnt, "-o", f"cache-dir={cache_dir}")
    assert done.returncode == 0, done.stderr
    assert f"cachefs mount {src} {mnt} --cache-dir={cache_dir}" in done.stdout
    # -s drops what it does not know; a bad value is still the CLI's one-line error.
    assert run("mount", "-f", "-s", "-t", "cachefs", src, mnt, "-o", "colour").returncode == 0
    bad = run("mount", "-f", "-t", "cachefs", src, mnt, "-o", "cache-size=lots")
    assert bad.returncode == 1
    assert len(bad.stderr.splitlines()) == 1
    assert "--cache-size" in bad.stderr and "'lots'" in bad.stderr
    assert mount_at(mnt) is None
    assert not cache_dir.exists()


# -- the systemd unit ------------------------------------------------------------------------


def unit_setting(name: str) -> str:
    """The value of *name*= in the unit (each is set once)."""
    (value,) = re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)
    return value


def command_line(line: str, env: dict[str, str]) -> list[str]:
    """A unit's command line as systemd runs it: a leading ``-`` (failure
    ignored) dropped, ``${VAR}`` one word, ``$VAR`` split at whitespace,
    ``$$`` a dollar sign, ``cachefs`` this environment's."""
    words = []
    for word in shlex.split(line.removeprefix("-")):
        if re.fullmatch(r"\$[A-Z_]+", word):
            words += env[word[1:]].split()
        else:
            word = re.sub(r"\$\{([A-Z_]+)\}", lambda m: env[m[1]], word)
            words.append(word.replace("$$", "$"))
    if words[0].endswith("/cachefs"):
        words[:1] = [sys.executable, "-m", "cachefs"]
    return words


def test_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (no systemd as PID 1 needed), with the unit's
    cachefs path pointed at this environment's."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    start = unit_setting("ExecStart")
    cachefs = Path(sys.executable).parent / "cachefs"
    text = UNIT.read_text().replace(start.split()[0], str(cachefs))
    copy = tmp_path / "cachefs@verify.service"
    copy.write_text(text)
    done = run("systemd-analyze", "verify", copy)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


class Service:
    """The unit's instance over a temporary /etc/cachefs/NAME.conf, run as systemd runs it."""

    def __init__(self, tmp_path: Path, src: Path, mnt: Path) -> None:
        self.tmp_path = tmp_path
        self.cache_dir = tmp_path / "cache"
        config = tmp_path / "test.conf"
        config.write_text(
            f"SOURCE={src}\nMOUNTPOINT={mnt}\n"
            f"OPTIONS=--cache-dir {self.cache_dir} --cache-size 20M --write-back-delay 600\n"
        )
        assert unit_setting("EnvironmentFile") == "/etc/cachefs/%i.conf"
        self.env = dict(os.environ)
        for line in config.read_text().splitlines():
            name, _, value = line.partition("=")
            self.env[name] = value
        self.stop_timeout = float(unit_setting("TimeoutStopSec"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """ExecStartPre (its failure ignored), then ExecStart; returns at READY=1."""
        pre = subprocess.run(
            command_line(unit_setting("ExecStartPre"), self.env),
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert unit_setting("ExecStartPre").startswith("-") or pre.returncode == 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(self.tmp_path / "notify"))
            notify.settimeout(MOUNT_DEADLINE)
            with open(self.tmp_path / "journal", "ab") as journal:
                self.proc = subprocess.Popen(
                    command_line(unit_setting("ExecStart"), self.env),
                    env={**self.env, "NOTIFY_SOCKET": str(self.tmp_path / "notify")},
                    stdin=subprocess.DEVNULL,
                    stdout=journal,
                    stderr=journal,
                    cwd=REPO,
                )
            try:
                assert notify.recv(4096) == b"READY=1", self.journal()
            except TimeoutError:
                pytest.fail(f"no READY=1 within {MOUNT_DEADLINE:g} s:\n{self.journal()}")
            finally:
                os.unlink(self.tmp_path / "notify")

    def journal(self) -> str:
        return (self.tmp_path / "journal").read_text(errors="replace")

    def wait(self) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=self.stop_timeout)

    def close(self, mnt: Path) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_DEADLINE)
        lazy_unmount(mnt)


@pytest.fixture
def service(tmp_path: Path, src: Path, mnt: Path) -> Iterator[Service]:
    made = Service(tmp_path, src, mnt)
    try:
        yield made
    finally:
        made.close(mnt)


def test_unit_ready_then_stop_flushes(service: Service, src: Path, mnt: Path) -> None:
    service.start()
    assert mount_at(mnt) is not None  # ready means mounted, before anything used it
    assert (mnt / "hello.txt").read_text() == "hello\n"
    (mnt / "new.txt").write_text("written through the service\n")
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)  # systemctl stop
    assert service.wait() == 0, service.journal()
    assert mount_at(mnt) is None
    assert (src / "new.txt").read_text() == "written through the service\n"


def test_unit_restarts_over_a_crashed_mount(service: Service, src: Path, mnt: Path) -> None:
    """A crash leaves a dead mount (ENOTCONN); the restart detaches it and mounts."""
    service.start()
    assert service.proc is not None
    service.proc.kill()
    service.proc.wait(timeout=EXIT_DEADLINE)
    with pytest.raises(OSError) as dead:
        os.listdir(mnt)
    assert dead.value.errno == errno.ENOTCONN
    service.start()
    assert (mnt / "hello.txt").read_text() == "hello\n"
    service.proc.send_signal(signal.SIGTERM)
    assert service.wait() == 0, service.journal()
    assert mount_at(mnt) is None


def test_mounting_over_a_crashed_mount_says_how_to_detach_it(
    service: Service, src: Path, mnt: Path, tmp_path: Path
) -> None:
    """Without the unit's ExecStartPre, a dead mount is named as such, with the way out."""
    service.start()
    assert service.proc is not None
    service.proc.kill()
    service.proc.wait(timeout=EXIT_DEADLINE)
    again = run_cachefs("mount", src, mnt, "--cache-dir", tmp_path / "other-cache")
    assert again.returncode == 2, again.stderr
    assert again.stderr.count("\n") == 1 and "daemon has gone" in again.stderr, again.stderr
    assert f"cachefs unmount {mnt}" in again.stderr
    done = run_cachefs("unmount", mnt)
    assert done.returncode == 0, done.stderr
    assert mount_at(mnt) is None


def test_the_units_cleanup_leaves_a_live_mount_alone(service: Service, mnt: Path) -> None:
    """ExecStartPre detaches a dead mount only: a second start over a live one
    fails (exit 2, not retried) and the first keeps serving."""
    service.start()
    assert service.proc is not None
    first = service.proc
    pre = subprocess.run(
        command_line(unit_setting("ExecStartPre").lstrip("-"), service.env),
        env=service.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert pre.returncode != 0, pre  # grep found no dead mount: nothing detached
    assert mount_at(mnt) is not None
    assert (mnt / "hello.txt").read_text() == "hello\n"
    assert unit_setting("RestartPreventExitStatus") == "2"
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=EXIT_DEADLINE) == 0, service.journal()
