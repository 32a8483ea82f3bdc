"""A /dev/fuse connection attached to a directory, and what may be asked of it.

As root the connection is mounted with mount(2) and detached with
umount2(MNT_DETACH); otherwise fusermount3 (set-uid root, from the fuse3
package) does both, handing the opened /dev/fuse back over a socket.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
from pathlib import Path

from cachefs.fuse.api import MountError
from cachefs.fuse.native import abi

log = logging.getLogger(__name__)

FUSERMOUNT = "fusermount3"
#: fusermount3 answers at once; this bounds a wedged one.
FUSERMOUNT_DEADLINE = 30.0
_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class Connection:
    """A mounted FUSE connection: its /dev/fuse fd (non-blocking) and mount point.

    The file system's cachefs.fuse.api.Kernel.  ``passthrough`` is whether
    the kernel agreed, in INIT, to read files opened with a backing id by
    itself (set by the session serving it).
    """

    def __init__(self, fd: int, mountpoint: Path) -> None:
        self.fd = fd
        self.mountpoint = mountpoint
        self.passthrough = False
        self._closed = False

    def open_backing(self, fd: int) -> int:
        """Register *fd*'s file for passthrough; its id, for :class:`cachefs.fuse.api.Opened`.

        Raises OSError (EPERM without CAP_SYS_ADMIN).  Close the id once no
        file opened with it is open any more: the kernel takes it when it
        handles the OPEN answer, after the answer is written.
        """
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        return fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_OPEN, arg, True)

    def close_backing(self, backing_id: int) -> None:
        arg = bytearray(struct.pack("<I", backing_id))
        fcntl.ioctl(self.fd, abi.DEV_IOC_BACKING_CLOSE, arg, True)

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's pages and attributes of *ino*.  Blocking: call it
        from a thread (the kernel may wait on a request this process answers).

        OSError ENOENT: the kernel does not know *ino*.
        """
        out = abi.NOTIFY_INVAL_INODE_OUT.pack(ino, 0, 0)
        header = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(out), abi.NOTIFY_INVAL_INODE, 0)
        os.writev(self.fd, [header, out])

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None:
        """Make the kernel forget the entry *name* of directory *parent_ino*: its
        next use is looked up again.  Blocking: call it from a thread (the
        kernel waits for lookups in that directory this process answers).

        OSError ENOENT: the kernel does not know the directory or the entry.
        """
        out = abi.NOTIFY_INVAL_ENTRY_OUT.pack(parent_ino, len(name), 0)
        size = abi.OUT_HEADER.size + len(out) + len(name) + 1
        header = abi.OUT_HEADER.pack(size, abi.NOTIFY_INVAL_ENTRY, 0)
        os.writev(self.fd, [header, out, name, b"\0"])

    def close(self) -> None:
        """Unmount (lazily) and end the connection: open files then fail with ENOTCONN.

        Never raises: a mount that cannot be detached is logged, and ends
        with the connection anyway (its users get ENOTCONN).
        """
        if self._closed:
            return
        self._closed = True
        try:
            unmount(self.mountpoint)
        except (MountError, OSError, subprocess.SubprocessError) as e:
            log.warning("%s", e)
        finally:
            os.close(self.fd)


def mount(
    mountpoint: Path,
    fsname: str,
    subtype: str,
    options: list[str],
    fusermount: bool | None = None,
) -> Connection:
    """Mount a new FUSE connection on *mountpoint*.  Blocking.

    *options* are FUSE mount options (``default_permissions``, ``allow_other``).
    *fusermount*: mount through fusermount3 (default: unless root).
    """
    if fusermount is None:
        fusermount = os.geteuid() != 0
    if not fusermount:
        fd = _mount_as_root(mountpoint, fsname, subtype, options)
    else:
        fd = _mount_with_fusermount(mountpoint, fsname, subtype, options)
    os.set_blocking(fd, False)
    return Connection(fd, mountpoint)


def _mount_as_root(mountpoint: Path, fsname: str, subtype: str, options: list[str]) -> int:
    try:
        mode = stat.S_IFMT(os.stat(mountpoint).st_mode)
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot mount on {mountpoint}: {e.filename}: {e.strerror}") from None
    try:
        data = ",".join(
            [f"fd={fd}", f"rootmode={mode:o}", f"user_id={os.getuid()}", f"group_id={os.getgid()}"]
            + options
        )
        flags = _MS_NOSUID | _MS_NODEV
        if _libc.mount(
            os.fsencode(fsname),
            os.fsencode(mountpoint),
            f"fuse.{subtype}".encode(),
            flags,
            data.encode(),
        ):
            err = ctypes.get_errno()
            raise MountError(f"cannot mount on {mountpoint}: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_with_fusermount(mountpoint: Path, fsname: str, subtype: str, options: list[str]) -> int:
    """Mount through fusermount3, which sends the opened /dev/fuse back."""
    if shutil.which(FUSERMOUNT) is None:
        raise MountError(f"{FUSERMOUNT} is missing: install fuse3 (apt-get install fuse3)")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = ",".join([f"fsname={fsname}", f"subtype={subtype}", "nosuid", "nodev"] + options)
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            done = subprocess.run(
                [FUSERMOUNT, "-o", opts, "--", str(mountpoint)],
                pass_fds=(theirs.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=FUSERMOUNT_DEADLINE,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise MountError(
                f"{FUSERMOUNT} did not answer within {FUSERMOUNT_DEADLINE:.0f} s"
            ) from None
        theirs.close()
        if done.returncode != 0:
            why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
            raise MountError(f"cannot mount on {mountpoint}: {why}")
        ours.settimeout(FUSERMOUNT_DEADLINE)
        try:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
    finally:
        theirs.close()
        ours.close()
    if not fds:
        unmount(mountpoint)  # mounted, but nobody can serve it
        raise MountError(f"{FUSERMOUNT} mounted {mountpoint} but sent no connection")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: Path) -> None:
    """Detach the mount (lazily: open files keep it until closed); quiet if gone."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), _MNT_DETACH) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            return
        raise MountError(f"cannot unmount {mountpoint}: {os.strerror(err)}")
    done = subprocess.run(
        [FUSERMOUNT, "-u", "-z", "--", str(mountpoint)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=FUSERMOUNT_DEADLINE,
        check=False,
    )
    if done.returncode != 0 and "not found" not in done.stderr:
        raise MountError(f"cannot unmount {mountpoint}: {' '.join(done.stderr.split())}")
