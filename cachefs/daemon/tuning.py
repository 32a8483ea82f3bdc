"""The kernel's side of a mount: its bdi's readahead, tuned once FUSE INIT is
done, and its FUSE connection, aborted through fusectl when its daemon does
not answer."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

import trio

from cachefs.control.mounts import MountEntry, attached, mount_at
from cachefs.daemon.options import MountOptions

log = logging.getLogger(__name__)

#: The kernel sends INIT at once; this only bounds a broken mount's start.
INIT_DEADLINE = 10.0


async def tune_when_initialized(opts: MountOptions, initialized: trio.Event) -> None:
    """Tune the mount once the kernel has taken our answer to its INIT request.

    Not before: the kernel sets the mount's readahead from that answer, to at
    most what it offered at mount time (its 128 KiB default), and so undoes
    any earlier setting.
    """
    with trio.move_on_after(INIT_DEADLINE):
        await initialized.wait()
    if not initialized.is_set():
        log.warning("no FUSE INIT request within %.0f s: the mount is not tuned", INIT_DEADLINE)
        return
    entry = mount_at(opts.mountpoint)
    if entry is None:
        log.warning("%s is not in /proc/self/mountinfo: not tuned", opts.mountpoint)
        return
    await trio.to_thread.run_sync(tune, entry, opts.readahead_kb)


def tune(entry: MountEntry, readahead_kb: int) -> None:
    """Raise the mount's readahead; warn on failure (as root: a user may not,
    which is said at info level).

    Call it after the FUSE INIT handshake, or the kernel resets the readahead
    (to at most what it offered in INIT, its 128 KiB default).
    """
    # The mount's bdi is named after its st_dev, as mountinfo shows it.
    bdi = Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")
    try:
        bdi.write_text(f"{readahead_kb}\n")
    except OSError as e:
        level = logging.INFO if os.geteuid() != 0 else logging.WARNING
        log.log(level, "cannot set readahead (%s): %s", bdi, e.strerror)
    else:
        log.debug("%s: %s", bdi, bdi.read_text().strip())


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(mount: MountEntry, fusectl: Path = FUSECTL) -> bool:
    """Abort the mount's FUSE connection: every request waiting on its
    daemon, and every later one, fails at once (ECONNABORTED, ENOTCONN).

    Through fusectl's ``abort`` file (mounted here if it is not, as root).
    False, with the reason logged, where that cannot be done; False, and
    nothing logged, once the connection has ended.
    """
    # fusectl names a connection by its device number as the kernel encodes it,
    # and gives an ended connection's number to the next mount: a mount no
    # longer attached is not aborted, or another mount's connection would be.
    if not attached(mount):
        return False
    path = fusectl / str((mount.major << 20) | mount.minor) / "abort"
    if fusectl.is_dir() and not any(fusectl.iterdir()):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", str(fusectl)],
                capture_output=True,
                check=False,
                timeout=10,
            )
    try:
        path.write_text("1")
    except FileNotFoundError as e:
        if os.path.ismount(fusectl) and not attached(mount):
            return False  # the connection has ended: nothing to abort
        log.warning("cannot abort the FUSE connection of %s (%s): %s", mount.mountpoint, path, e)
        return False
    except OSError as e:
        log.warning("cannot abort the FUSE connection of %s (%s): %s", mount.mountpoint, path, e)
        return False
    return True
