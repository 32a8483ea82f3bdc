"""A mount served by pyfuse3 (libfuse): its Kernel, its life, its mount function.

pyfuse3 keeps one FUSE session per process, in module globals: a process
serves at most one pyfuse3 mount at a time (the daemon serves one).

What libfuse does not let pyfuse3 say, and how this transport still does
what the native one does:

- passthrough: libfuse 3.14 cannot send a backing id, so the Kernel says
  passthrough is off and every file is read through READ answers (said
  once in the log when passthrough was asked for);
- the connection's max_background (sent in the native transport's INIT
  answer) is set through fusectl as root, before libfuse answers INIT.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from cachefs.fuse.api import (
    MAX_BACKGROUND,
    MAX_WORKERS,
    SPARE_WORKERS,
    UNSUPPORTED,
    Kernel,
    MountError,
    Operations,
)
from cachefs.fuse.pyfuse3.adapter import Adapter, TimedAdapter
from cachefs.latency import Latencies

log = logging.getLogger(__name__)

FUSECTL = Path("/sys/fs/fuse/connections")


class Pyfuse3Kernel:
    """The cachefs.fuse.api.Kernel of a pyfuse3 mount: no passthrough."""

    def __init__(self) -> None:
        self.open = False  # True between pyfuse3.init and pyfuse3.close

    @property
    def passthrough(self) -> bool:
        return False

    def open_backing(self, fd: int) -> int:
        raise OSError(UNSUPPORTED, "pyfuse3 cannot send a backing id")

    def close_backing(self, backing_id: int) -> None:
        raise OSError(UNSUPPORTED, "pyfuse3 cannot send a backing id")

    def invalidate_inode(self, ino: int) -> None:
        if not self.open:  # pyfuse3 has no session to send it on
            raise OSError(errno.ENOTCONN, "the mount is closed")
        pyfuse3.invalidate_inode(ino)

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None:
        if not self.open:
            raise OSError(errno.ENOTCONN, "the mount is closed")
        pyfuse3.invalidate_entry(parent_ino, name)


class Pyfuse3Mount:
    """A mounted pyfuse3 session (a cachefs.fuse.api.Mounted)."""

    def __init__(self, adapter: Adapter, kernel: Pyfuse3Kernel, mountpoint: Path) -> None:
        self._adapter = adapter
        self._kernel = kernel
        self._mountpoint = mountpoint
        self._serving = False
        self._stopping = False

    @property
    def kernel(self) -> Kernel:
        return self._kernel

    async def serve(self) -> None:
        if not self._kernel.open:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._adapter.watch_interrupts)
            self._serving = True
            try:
                if not self._stopping:
                    await pyfuse3.main(min_tasks=SPARE_WORKERS, max_tasks=MAX_WORKERS)
            finally:
                self._serving = False
                nursery.cancel_scope.cancel()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._serving:
            pyfuse3.terminate()

    def close(self) -> None:
        if not self._kernel.open:
            return
        self._kernel.open = False
        try:
            pyfuse3.close(unmount=True)
        except Exception as e:  # libfuse logs why itself
            log.warning("cannot unmount %s: %s", self._mountpoint, e)
        finally:
            _release()


_in_use = False


def _release() -> None:
    global _in_use
    _in_use = False


async def mount_fs(
    mountpoint: Path,
    fsname: str,
    subtype: str,
    make_ops: Callable[[Kernel], Operations],
    *,
    passthrough: bool,
    allow_other: bool = False,
    timer: Latencies | None = None,
) -> Pyfuse3Mount:
    """Mount on *mountpoint* through libfuse and return what serves *make_ops*'s
    operations there (the pyfuse3 cachefs.fuse.api.Transport).  Raises MountError.

    *passthrough*: asked for; pyfuse3 cannot, which is said once in the log.
    *timer*: requests are answered by a TimedAdapter.
    """
    global _in_use
    if _in_use:
        raise MountError(f"cannot mount on {mountpoint}: pyfuse3 serves one mount per process")
    kernel = Pyfuse3Kernel()
    ops, on_init = make_ops(kernel), partial(_tune, mountpoint)
    adapter = Adapter(ops, on_init) if timer is None else TimedAdapter(ops, timer, on_init)
    options = {
        "default_permissions",
        f"fsname={_escape(fsname)}",
        f"subtype={_escape(subtype)}",
        *(["allow_other"] if allow_other else []),
    }
    _in_use = True
    try:
        await trio.to_thread.run_sync(pyfuse3.init, adapter, str(mountpoint), options)
    except RuntimeError:  # libfuse printed why on stderr
        _release()
        raise MountError(f"cannot mount on {mountpoint}: libfuse refused (see above)") from None
    except BaseException:
        _release()
        raise
    kernel.open = True
    log.info(
        "pyfuse3 %s on libfuse; passthrough off%s",
        pyfuse3.__version__,
        " (libfuse cannot send a backing id): files are read through cachefs"
        if passthrough
        else "",
    )
    return Pyfuse3Mount(adapter, kernel, mountpoint)


def _escape(option: str) -> str:
    """A libfuse option value: commas and backslashes escaped."""
    return option.replace("\\", "\\\\").replace(",", "\\,")


def _tune(mountpoint: Path) -> None:
    """Give the connection the native transport's max_background, through
    fusectl (root only; libfuse's INIT answer leaves the kernel's default).

    Called while libfuse answers INIT: the mount itself must not be touched
    (a stat would wait for that answer), so it is found in mountinfo.
    """
    if os.geteuid() != 0:
        return
    dev = _device(mountpoint)
    if dev is None:
        log.debug("%s not in mountinfo: max_background left as it is", mountpoint)
        return
    conn = FUSECTL / str(dev)
    try:
        (conn / "max_background").write_text(f"{MAX_BACKGROUND}\n")
        (conn / "congestion_threshold").write_text(f"{MAX_BACKGROUND * 3 // 4}\n")
    except OSError as e:
        log.debug("cannot set max_background (%s): %s", conn, e.strerror)


def _device(mountpoint: Path) -> int | None:
    """The device number of the FUSE mount on *mountpoint*, as fusectl names it."""
    # Not the mount point itself: looking at it would wait for INIT.
    parent = os.path.realpath(os.path.dirname(os.path.abspath(mountpoint)))
    wanted = os.fsencode(os.path.join(parent, os.path.basename(mountpoint)))
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            point = fields[4].replace(b"\\040", b" ").replace(b"\\011", b"\t")
            point = point.replace(b"\\012", b"\n").replace(b"\\134", b"\\")
            if point == wanted and b"fuse" in line.split(b" - ", 1)[-1].split()[0]:
                major, minor = (int(n) for n in fields[2].split(b":"))
                found = (major << 20) | minor
    return found
