"""Checks before mounting: the FUSE device, the mount point, the cache dir, and
that the mount does not reach into itself."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cachefs.contract import local_path
from cachefs.control.mounts import daemon_pid, mount_at
from cachefs.engine.state.cachedir import check_cache_dir
from cachefs.errors import CacheDirError, ConfigError


def prepare_cache_dir(path: Path) -> Path:
    """Create *path* (mode 0700) if needed; its absolute form.

    CacheDirError unless it is a directory of this user's (check_cache_dir);
    the mount makes it owner-only when it opens it.
    """
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # a dangling symlink, or a file: check_cache_dir says which
    except OSError as e:
        raise CacheDirError(f"cannot create cache dir {path}: {e.strerror}") from None
    check_cache_dir(path)
    return path


def check_fuse(
    allow_other: bool = False,
    device: str = "/dev/fuse",
    fusermount: str = "fusermount3",
    fuse_conf: str = "/etc/fuse.conf",
) -> None:
    """ConfigError unless this machine can mount FUSE file systems (with
    *allow_other*, for this user).

    A user other than root mounts through fusermount3, which needs
    /dev/fuse open to all (as distributions make it) and, for allow_other,
    the line ``user_allow_other`` in /etc/fuse.conf: said here in one line,
    rather than by fusermount3 in its own words mid-mount.
    """
    if not os.path.exists(device):
        raise ConfigError(
            f"{device} is missing: install fuse3 (apt-get install fuse3), "
            "or give the container the device (--device /dev/fuse)"
        )
    if not os.access(device, os.R_OK | os.W_OK):
        raise ConfigError(
            f"no permission to open {device}: run as root, or as root let every user "
            f"open it, as distributions do (chmod 0666 {device})"
        )
    if os.geteuid() == 0:
        return
    if shutil.which(fusermount) is None:
        raise ConfigError("fusermount3 is missing: install fuse3 (apt-get install fuse3)")
    if allow_other and not _users_may_allow_other(fuse_conf):
        raise ConfigError(
            f"--allow-other needs the line user_allow_other in {fuse_conf} when the "
            "mounting user is not root: add it as root, or mount without --allow-other"
        )


def _users_may_allow_other(fuse_conf: str) -> bool:
    """Whether *fuse_conf* has ``user_allow_other`` on a line by itself, as
    fusermount3 reads it: ``#`` starts a comment, blanks around are ignored
    (missing: no; unreadable by this user: maybe, which fusermount3, set-uid
    root, then judges)."""
    try:
        with open(fuse_conf) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def check_mountpoint(path: Path) -> None:
    """ConfigError unless *path* is an empty directory that is not mounted on."""
    entry = mount_at(path)
    if entry is not None:
        # Whether its daemon lives is known from its cache dir's lock: a stat of
        # the mount would hang on a daemon that is stuck.
        if entry.cache_dir is not None and daemon_pid(entry.cache_dir) is None:
            raise ConfigError(
                f"{path} is a cachefs mount whose daemon has gone; "
                f"detach it first: cachefs unmount {path} (or umount -l {path})"
            )
        raise ConfigError(f"{path} is already a cachefs mount point")
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise ConfigError(f"mount point {path} does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"mount point {path} is not a directory") from None
    except OSError as e:
        raise ConfigError(
            f"mount point {path} is unusable ({e.strerror}); "
            f"if it is a stale mount, run: fusermount3 -u -z {path}"
        ) from None
    if entries:
        raise ConfigError(f"mount point {path} is not empty")


def check_apart(source: str, mountpoint: Path, cache_dir: Path | None = None) -> None:
    """ConfigError if the mount would reach into itself, which deadlocks it.

    Refused: MOUNTPOINT is SOURCE, lies below it, or holds it; the cache dir
    lies at or below MOUNTPOINT.  Paths are compared with symlinks resolved,
    and as (device, inode), so a bind mount of SOURCE counts as SOURCE.  Only
    local sources have a path: an ``s3://`` source is never refused here.
    """
    mountpoint = Path(os.path.realpath(mountpoint))
    root = local_path(source)  # SourceError if malformed: as the backend reads it
    if root is not None:
        src = Path(os.path.realpath(root))
        if _at_or_below(mountpoint, src):
            where = "the source itself" if _same(mountpoint, src) else f"inside the source {src}"
            raise ConfigError(
                f"mount point {mountpoint} is {where}: the mount would read itself; "
                "choose a mount point outside the source"
            )
        if _at_or_below(src, mountpoint):
            raise ConfigError(f"source {src} is inside the mount point {mountpoint}")
    if cache_dir is not None and _at_or_below(Path(os.path.realpath(cache_dir)), mountpoint):
        raise ConfigError(f"cache dir {cache_dir} is inside the mount point {mountpoint}")


def check_shared_cache_apart(shared: str, source: str, mountpoint: Path, cache_dir: Path) -> None:
    """ConfigError if a hosted cache in a directory overlaps what the mount
    reads or writes: blocks would land in the source, go through the mount
    itself, or mix with the local cache."""
    where = local_path(shared)
    if where is None:
        return
    hosted = Path(os.path.realpath(where))
    root = local_path(source)
    if root is not None:
        src = Path(os.path.realpath(root))
        if _at_or_below(hosted, src) or _at_or_below(src, hosted):
            raise ConfigError(
                f"--shared-cache {hosted} overlaps the source {src}: blocks would be "
                "written into the source; choose a directory outside it"
            )
    for name, path in (("mount point", mountpoint), ("cache dir", cache_dir)):
        real = Path(os.path.realpath(path))
        if _at_or_below(hosted, real) or _at_or_below(real, hosted):
            raise ConfigError(f"--shared-cache {hosted} overlaps the {name} {real}")


def _at_or_below(path: Path, top: Path) -> bool:
    """Whether real path *path* is *top* or below it."""
    return any(_same(p, top) for p in (path, *path.parents))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
