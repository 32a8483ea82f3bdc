"""Where the cachefs mounts are, how to reach one, and how to detach one.

Finding the mount for a PATH needs no request to the file system (so it
works on a hung mount): the longest mount point in /proc/self/mountinfo of
type ``fuse.cachefs`` that contains PATH.  The mount's fsname (the "source"
column of mountinfo, what ``df`` shows) is ``cachefs:<cache dir>``,
percent-encoded, which leads to the control socket: ``control.sock`` in
the cache directory, mode 0600.  The lock file of the cache dir names the
daemon that serves it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote_to_bytes

from cachefs.errors import CacheFSError, NotInMount

FSTYPE = "fuse.cachefs"
SUBTYPE = "cachefs"
SOCKET_NAME = "control.sock"
_FSNAME_PREFIX = "cachefs:"
_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: Path
    major: int
    minor: int
    cache_dir: Path | None
    #: The uid that made the mount (FUSE's ``user_id``): only it, and root, may unmount it.
    owner: int | None = field(default=None, compare=False)

    @property
    def socket_path(self) -> Path | None:
        return self.cache_dir / SOCKET_NAME if self.cache_dir else None

    def file_id(self, path: Path) -> str:
        """The file id of *path*, which lies inside this mount."""
        rel = os.path.relpath(path, self.mountpoint)
        return "" if rel == "." else rel


def fsname_for(cache_dir: Path) -> str:
    """The fsname that tells clients where the mount keeps its cache."""
    return _FSNAME_PREFIX + quote(os.fsencode(cache_dir), safe="/-_.~")


def _cache_dir_from_fsname(fsname: str) -> Path | None:
    if not fsname.startswith(_FSNAME_PREFIX):
        return None
    return Path(os.fsdecode(unquote_to_bytes(fsname[len(_FSNAME_PREFIX) :])))


def _unescape(raw: bytes) -> str:
    return os.fsdecode(_MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), raw))


def _owner(super_options: bytes) -> int | None:
    for option in super_options.split(b","):
        name, _, value = option.partition(b"=")
        if name == b"user_id" and value.isdigit():
            return int(value)
    return None


def cachefs_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[MountEntry]:
    """Every cachefs mount this process can see, in mount order."""
    mounts = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        if fields[sep + 1].decode(errors="replace") != FSTYPE:
            continue
        major, minor = (int(n) for n in fields[2].split(b":"))
        mounts.append(
            MountEntry(
                mountpoint=Path(_unescape(fields[4])),
                major=major,
                minor=minor,
                cache_dir=_cache_dir_from_fsname(_unescape(fields[sep + 2])),
                owner=_owner(fields[sep + 3]) if len(fields) > sep + 3 else None,
            )
        )
    return mounts


def _inside(path: Path, mountpoint: Path) -> bool:
    return path == mountpoint or mountpoint in path.parents


def find_mount(path: str | Path) -> MountEntry:
    """The innermost cachefs mount containing *path*; NotInMount if none."""
    mounts = cachefs_mounts()
    # abspath first: it needs no request to the (maybe hung) mount.
    for candidate in dict.fromkeys((Path(os.path.abspath(path)), Path(os.path.realpath(path)))):
        matching = [m for m in mounts if _inside(candidate, m.mountpoint)]
        if matching:
            return max(matching, key=lambda m: len(m.mountpoint.parts))
    raise NotInMount(f"{path} is not inside a cachefs mount")


def mount_at(mountpoint: str | Path) -> MountEntry | None:
    """The cachefs mount whose mount point is exactly *mountpoint*, if any."""
    target = Path(os.path.abspath(mountpoint))
    matching = [m for m in cachefs_mounts() if m.mountpoint == target]
    return matching[-1] if matching else None


def attached(mount: MountEntry) -> bool:
    """Whether *mount* (this mount, not a later one on its mount point) is still mounted."""
    return any(
        (m.mountpoint, m.major, m.minor) == (mount.mountpoint, mount.major, mount.minor)
        for m in cachefs_mounts()
    )


# -- reaching its control socket ----------------------------------------------


@contextlib.contextmanager
def socket_address(path: Path) -> Iterator[str]:
    """An AF_UNIX address for *path*, going through /proc for long paths."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with socket_address(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


# -- detaching it, and its daemon --------------------------------------------------


#: fusermount3 answers at once; this bounds a wedged one.
UNMOUNT_DEADLINE = 30.0


def lazy_unmount(mount: MountEntry) -> bool:
    """Detach *mount* now (``fusermount3 -u -z``); the kernel lets go when it is idle.

    False if it was gone already (its daemon got there first): not an error.
    """
    if not attached(mount):
        return False
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", "-z", str(mount.mountpoint)]
    else:
        cmd = ["umount", "-l", str(mount.mountpoint)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=UNMOUNT_DEADLINE
        )
    except subprocess.TimeoutExpired:
        raise CacheFSError(f"{cmd[0]} did not finish within {UNMOUNT_DEADLINE:g} s") from None
    if done.returncode == 0:
        return True
    if not attached(mount):
        return False
    raise CacheFSError(f"{' '.join(cmd)} failed: {' '.join(done.stderr.split())}")


def daemon_pid(cache_dir: Path | None) -> int | None:
    """The pid of the live process that holds *cache_dir*'s lock, if any."""
    if cache_dir is None:
        return None
    try:
        fd = os.open(cache_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its holder wrote its pid in it
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once process *pid* has exited (zombies count), False after *timeout*."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
