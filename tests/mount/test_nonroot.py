"""A user other than root mounts and unmounts their own directory with the
cachefs a wheel installs (tests/wheelrig.py), through fusermount3, with
passthrough off; others cannot look in unless the mount lets them
(``--allow-other``, which such a user may only ask for when /etc/fuse.conf
has ``user_allow_other``).  The README's quick start (./mount.sh) works for
that user when the packages are installed.

The tests run as root: they create the user (``cachefs-test``, kept if it
existed, removed at the end if they made it) and act as them, or as
``nobody``, with setpriv and an environment of their own.  /dev/fuse must
be open to every user, as distributions make it: where it is not (a bare
VM or container) it is for the duration, and /etc/fuse.conf is changed
only inside a test that needs it; both are restored exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXIT_DEADLINE, FUSE_TRANSPORTS, REPO, lazy_unmount, wait_for
from wheelrig import Installed

from cachefs.control.mounts import mount_at

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates a user and acts as them")

USER = "cachefs-test"
FUSE_DEVICE = Path("/dev/fuse")
FUSE_CONF = Path("/etc/fuse.conf")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path

    def run(self, env: dict[str, str], *args: object) -> subprocess.CompletedProcess[bytes]:
        """*args* as this user, in their home, with *env* and nothing else."""
        return subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]
            + ["env", "-i", *(f"{k}={v}" for k, v in env.items()), *map(str, args)],
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=EXIT_DEADLINE,
            check=False,
        )


@dataclass(frozen=True)
class Someone:
    """The user of the tests, with the installed venv on their PATH."""

    user: User
    installed: Installed

    def run(self, *args: object) -> subprocess.CompletedProcess[bytes]:
        return self.user.run(self.installed.env(self.user.home), *args)

    def cachefs(self, *args: object) -> subprocess.CompletedProcess[bytes]:
        return self.run(self.installed.bin("cachefs"), *args)


@pytest.fixture(scope="module")
def someone(installed: Installed) -> Iterator[Someone]:
    created = False
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--create-home", "--user-group"]
            + ["--shell", "/usr/sbin/nologin", USER],
            check=True,
            capture_output=True,
        )
        created = True
    entry = pwd.getpwnam(USER)
    try:
        with _fuse_open_to_all():
            yield Someone(User(USER, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)), installed)
    finally:
        if created:
            # a daemon just unmounted may still be on its way out; userdel refuses meanwhile
            wait_for(f"{USER}'s processes to end", lambda: not _processes_of(USER))
            subprocess.run(["userdel", "--remove", USER], check=True, capture_output=True)


@pytest.fixture
def nobody() -> User:
    entry = pwd.getpwnam("nobody")
    return User("nobody", entry.pw_uid, entry.pw_gid, Path("/"))


@dataclass(frozen=True)
class Dirs:
    src: Path
    mnt: Path
    data: bytes


@pytest.fixture
def dirs(someone: Someone) -> Iterator[Dirs]:
    """SOURCE (holding data.bin) and MOUNTPOINT, the user's, where every user
    may look (not their home: it may be private); unmounted and removed after."""
    user = someone.user
    top = Path(tempfile.mkdtemp(dir=someone.installed.root, prefix="test-"))
    top.chmod(0o755)
    src, mnt = top / "src", top / "mnt"
    data = os.urandom(300_000)
    src.mkdir()
    mnt.mkdir()
    (src / "data.bin").write_bytes(data)
    for path in (top, src, mnt, src / "data.bin"):
        os.chown(path, user.uid, user.gid)
    try:
        yield Dirs(src, mnt, data)
    finally:
        lazy_unmount(mnt)
        shutil.rmtree(top)


@pytest.mark.parametrize("fuse", FUSE_TRANSPORTS)
def test_a_user_mounts_reads_writes_and_unmounts(someone: Someone, dirs: Dirs, fuse: str) -> None:
    """The default cache dir (in ~/.cache), fusermount3 both ways, passthrough off."""
    cache_dir = None
    try:
        done = someone.cachefs("mount", dirs.src, dirs.mnt, "--fuse", fuse)
        assert done.returncode == 0, done.stderr
        assert done.stderr == b""
        assert someone.run("cat", dirs.mnt / "data.bin").stdout == dirs.data
        done = someone.cachefs("stats", "--json", dirs.mnt)
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        cache_dir = Path(stats["cache_dir"])
        assert cache_dir.is_relative_to(someone.user.home / ".cache" / "cachefs")
        assert stats["passthrough_opens"] == 0
        assert someone.cachefs("stats", dirs.mnt).returncode == 0
        log = (cache_dir / "cachefs.log").read_text()
        why = [line for line in log.splitlines() if "passthrough off" in line and "root" in line]
        assert len(why) == 1, log
        assert someone.run("sh", "-c", f"echo written > {dirs.mnt}/new.txt").returncode == 0
        done = someone.cachefs("unmount", dirs.mnt)
        assert done.returncode == 0, done.stderr
        assert mount_at(dirs.mnt) is None
        assert (dirs.src / "new.txt").read_text() == "written\n"
        assert (dirs.src / "new.txt").stat().st_uid == someone.user.uid
        assert "Traceback" not in (cache_dir / "cachefs.log").read_text()
    finally:
        lazy_unmount(dirs.mnt)
        if cache_dir is not None:
            shutil.rmtree(cache_dir)


def test_other_users_cannot_look_in(someone: Someone, dirs: Dirs, nobody: User) -> None:
    """Without --allow-other the kernel lets only the mounting user in."""
    (dirs.src / "data.bin").chmod(0o644)
    done = someone.cachefs("mount", dirs.src, dirs.mnt, "--cache-dir", dirs.mnt.parent / "cache")
    assert done.returncode == 0, done.stderr
    done = nobody.run({"PATH": "/usr/bin:/bin"}, "cat", dirs.mnt / "data.bin")
    assert done.returncode != 0
    assert b"Permission denied" in done.stderr
    assert someone.cachefs("unmount", dirs.mnt).returncode == 0


def test_a_private_dev_fuse_says_what_to_do(someone: Someone, dirs: Dirs) -> None:
    """/dev/fuse 0600, as a machine without udev leaves it (for a moment)."""
    mode = stat.S_IMODE(FUSE_DEVICE.stat().st_mode)
    FUSE_DEVICE.chmod(0o600)
    try:
        done = someone.cachefs("mount", dirs.src, dirs.mnt)
    finally:
        FUSE_DEVICE.chmod(mode)
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        "cachefs: error: no permission to open /dev/fuse: run as root, or as root let "
        "every user open it, as distributions do (chmod 0666 /dev/fuse)"
    ]
    assert mount_at(dirs.mnt) is None


@pytest.mark.parametrize("fuse", FUSE_TRANSPORTS)
def test_allow_other_needs_user_allow_other(someone: Someone, dirs: Dirs, fuse: str) -> None:
    with _fuse_conf(allow_other=False):
        done = someone.cachefs("mount", dirs.src, dirs.mnt, "--allow-other", "--fuse", fuse)
    assert done.returncode != 0
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("cachefs: error: ")
    for word in ("--allow-other", "user_allow_other", "/etc/fuse.conf"):
        assert word in lines[0], lines[0]
    assert mount_at(dirs.mnt) is None


def test_allow_other_shows_what_the_source_allows(
    someone: Someone, dirs: Dirs, nobody: User
) -> None:
    """Others see every file as the mounting user's, with the source's modes,
    and the kernel enforces them (default_permissions): a private file stays
    private."""
    (dirs.src / "data.bin").chmod(0o644)
    (dirs.src / "private").write_text("mine\n")
    os.chown(dirs.src / "private", someone.user.uid, someone.user.gid)
    (dirs.src / "private").chmod(0o600)
    try:
        with _fuse_conf(allow_other=True):
            done = someone.cachefs(
                "mount", dirs.src, dirs.mnt, "--allow-other", "--cache-dir", dirs.mnt.parent / "c"
            )
        assert done.returncode == 0, done.stderr
        env = {"PATH": "/usr/bin:/bin"}
        assert nobody.run(env, "cat", dirs.mnt / "data.bin").stdout == dirs.data
        done = nobody.run(env, "stat", "-c", "%u %a", dirs.mnt / "private")
        assert done.stdout.split() == [str(someone.user.uid).encode(), b"600"]
        done = nobody.run(env, "cat", dirs.mnt / "private")
        assert done.returncode != 0
        assert b"Permission denied" in done.stderr
        assert someone.cachefs("unmount", dirs.mnt).returncode == 0
    finally:
        lazy_unmount(dirs.mnt)


def test_the_quick_start_as_a_user(someone: Someone, dirs: Dirs) -> None:
    """./mount.sh with the packages and the venv in place: no apt-get, no sudo,
    no set-up line, a mount.  The clone is mount.sh, .ci/setup and
    pyproject.toml, its .venv the installed one (marked installed for this
    pyproject.toml, as set-up marks it): set-up has nothing to do."""
    user = someone.user
    clone = dirs.mnt.parent / "clone"
    (clone / ".ci").mkdir(parents=True)
    for name in ("mount.sh", ".ci/setup", "pyproject.toml"):
        shutil.copy2(REPO / name, clone / name)
    (clone / ".venv").symlink_to(someone.installed.venv)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    (someone.installed.venv / ".cachefs-install-stamp").write_text(f"{digest} mount\n")
    # would a step ask for root, it would leave a trace here
    traps = clone / "traps"
    traps.mkdir()
    for name in ("apt-get", "sudo"):
        (traps / name).write_text(f"#!/bin/sh\necho {name} >> {traps}/called\nexit 1\n")
        (traps / name).chmod(0o755)
    for path in (clone, clone / ".ci", traps, *clone.rglob("*")):
        os.lchown(path, user.uid, user.gid)
    env = {"HOME": str(user.home), "PATH": f"{traps}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    try:
        done = user.run(env, clone / "mount.sh", dirs.src, dirs.mnt, "--cache-dir", clone / "c")
        assert done.returncode == 0, done.stderr
        assert done.stderr == b""
        assert not (traps / "called").exists()
        assert someone.run("cat", dirs.mnt / "data.bin").stdout == dirs.data
        assert someone.cachefs("unmount", dirs.mnt).returncode == 0
    finally:
        lazy_unmount(dirs.mnt)


def _processes_of(user: str) -> bool:
    return subprocess.run(["pgrep", "-u", user], capture_output=True, check=False).returncode == 0


@contextmanager
def _fuse_open_to_all() -> Iterator[None]:
    """/dev/fuse readable and writable by all (0666, as udev makes it) meanwhile."""
    mode = stat.S_IMODE(FUSE_DEVICE.stat().st_mode)
    if mode & 0o006 == 0o006:
        yield
        return
    FUSE_DEVICE.chmod(0o666)
    try:
        yield
    finally:
        FUSE_DEVICE.chmod(mode)


@contextmanager
def _fuse_conf(allow_other: bool) -> Iterator[None]:
    """/etc/fuse.conf with or without the line ``user_allow_other`` meanwhile."""
    before = FUSE_CONF.read_bytes() if FUSE_CONF.exists() else None
    mode = stat.S_IMODE(FUSE_CONF.stat().st_mode) if before is not None else 0o644
    lines = [
        line
        for line in (before or b"").decode().splitlines()
        if line.split("#", 1)[0].strip() != "user_allow_other"
    ]
    if allow_other:
        lines.append("user_allow_other")
    try:
        FUSE_CONF.write_text("".join(f"{line}\n" for line in lines))
        FUSE_CONF.chmod(mode)
        yield
    finally:
        if before is None:
            FUSE_CONF.unlink()
        else:
            FUSE_CONF.write_bytes(before)
            FUSE_CONF.chmod(mode)
