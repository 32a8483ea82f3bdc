"""Kernel tuning of a mount once FUSE INIT is done: the bdi's readahead."""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from cachefs.control.protocol import MountEntry, mount_at
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
    """Raise the mount's readahead; warn on failure.

    Call it after the FUSE INIT handshake, or the kernel resets the readahead
    (to at most what it offered in INIT, its 128 KiB default).
    """
    # The mount's bdi is named after its st_dev, as mountinfo shows it.
    bdi = Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")
    try:
        bdi.write_text(f"{readahead_kb}\n")
    except OSError as e:
        log.warning("cannot set readahead (%s): %s", bdi, e.strerror)
    else:
        log.debug("%s: %s", bdi, bdi.read_text().strip())
