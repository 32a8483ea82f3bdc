"""Checks before mounting: the FUSE device, the mount point, the cache dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cachefs.control.protocol import mount_at
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


def check_fuse(device: str = "/dev/fuse", fusermount: str = "fusermount3") -> None:
    """ConfigError unless this machine can mount FUSE file systems."""
    if not os.path.exists(device):
        raise ConfigError(
            f"{device} is missing: install fuse3 (apt-get install fuse3), "
            "or give the container the device (--device /dev/fuse)"
        )
    if not os.access(device, os.R_OK | os.W_OK):
        raise ConfigError(f"no permission to open {device}: run as root or fix its mode")
    if os.geteuid() != 0 and shutil.which(fusermount) is None:
        raise ConfigError("fusermount3 is missing: install fuse3 (apt-get install fuse3)")


def check_mountpoint(path: Path) -> None:
    """ConfigError unless *path* is an empty directory that is not mounted on."""
    if mount_at(path) is not None:
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
