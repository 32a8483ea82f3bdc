"""The FUSE API the file system is written against, whichever transport drives it.

A file system (cachefs.fs) implements :class:`Operations`, answers with the
plain values below and raises :class:`FUSEError` for an errno; it reaches
the kernel only through :class:`Kernel`.  A transport (cachefs.fuse.native,
cachefs.fuse.pyfuse3) turns requests into calls of :class:`Operations` and
these values into its own replies; it mounts with a :class:`Transport`
function and is served and closed through :class:`Mounted`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cachefs.errors import CacheFSError
from cachefs.latency import Latencies

#: What a READ may be answered with.
Payload = bytes | bytearray | memoryview


class MountError(CacheFSError):
    """The kernel or fusermount3 refused the mount."""


class FUSEError(Exception):
    """Answer the request with this errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(os.strerror(errno_))
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Entry:
    """An inode as the kernel is told it (LOOKUP, GETATTR, READDIRPLUS).

    The kernel trusts the name and the attributes for *timeout* seconds.
    """

    ino: int
    mode: int
    size: int
    mtime_ns: int
    uid: int
    gid: int
    nlink: int = 1
    blksize: int = 4096
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class Opened:
    """The answer to OPEN: a handle, and how the kernel reads through it.

    *keep_cache*: the kernel keeps the pages it has of the file (of a
    directory: the listing it cached).  *backing_id* (from
    ``Kernel.open_backing``) sends reads straight to that file.
    *direct_io*: every read comes to the file system, none is cached.
    *noflush*: a close sends no FLUSH (it would do nothing).
    *cache_dir*: the kernel caches the directory's listing and serves the
    next opens that keep it without READDIR.  Transports that cannot say
    *noflush* or *cache_dir* leave them out: both only save requests.
    """

    fh: int
    keep_cache: bool = False
    direct_io: bool = False
    backing_id: int = 0
    noflush: bool = False
    cache_dir: bool = False


@dataclass(frozen=True, slots=True)
class Statfs:
    """STATFS: sizes in units of *frsize*."""

    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int = 0
    namelen: int = 255


@dataclass(frozen=True, slots=True)
class SetAttr:
    """What a SETATTR changes; None (or False) leaves it as it is.

    *mode* holds the permission bits only.  *fh* is the handle the change
    came through (ftruncate, futimens), if any.
    """

    size: int | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    atime_now: bool = False
    mtime_now: bool = False
    fh: int | None = None


#: rename flags (renameat2).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


class DirReply(Protocol):
    """The entries of one READDIR(PLUS) answer, filled by ``Operations.readdir``.

    With *plus* every entry carries its attributes and the kernel counts a
    lookup for each one added, except "." and "..".
    """

    @property
    def plus(self) -> bool: ...

    def add(self, name: bytes, entry: Entry, next_offset: int) -> bool:
        """Add one entry; False (nothing added) once the answer is full."""
        ...


class Operations(Protocol):
    """What a file system implements; only :class:`FUSEError` is answered as such.

    ``change`` answers the requests that change the file system and have
    no method of their own (*request* names it: "link", "fallocate", ...).
    ``init`` is called once the kernel's INIT is answered and must not raise.
    *mode* of create, mknod and mkdir carries the file-type bits as the
    kernel sends them, its umask applied; rename *flags* are RENAME_*.
    """

    def init(self) -> None: ...
    def forget(self, items: Sequence[tuple[int, int]]) -> None: ...
    async def lookup(self, parent: int, name: bytes) -> Entry: ...
    async def getattr(self, ino: int) -> Entry: ...
    async def readlink(self, ino: int) -> bytes: ...
    async def statfs(self) -> Statfs: ...
    async def getxattr(self, ino: int, name: bytes) -> bytes: ...
    async def listxattr(self, ino: int) -> list[bytes]: ...
    async def open(self, ino: int, flags: int) -> Opened: ...
    async def read(self, fh: int, offset: int, size: int) -> Payload: ...
    async def release(self, fh: int) -> None: ...
    async def flush(self, fh: int) -> None: ...
    async def opendir(self, ino: int) -> Opened: ...
    async def readdir(self, fh: int, offset: int, reply: DirReply) -> None: ...
    async def releasedir(self, fh: int) -> None: ...
    async def create(
        self, parent: int, name: bytes, mode: int, flags: int
    ) -> tuple[Entry, Opened]: ...
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int) -> Entry: ...
    async def mkdir(self, parent: int, name: bytes, mode: int) -> Entry: ...
    async def symlink(self, parent: int, name: bytes, target: bytes) -> Entry: ...
    async def unlink(self, parent: int, name: bytes) -> None: ...
    async def rmdir(self, parent: int, name: bytes) -> None: ...
    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None: ...
    async def setattr(self, ino: int, attr: SetAttr) -> Entry: ...
    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int: ...
    async def fsync(self, fh: int, datasync: bool) -> None: ...
    async def change(self, request: str) -> None: ...


#: errno of a Kernel that cannot do what was asked (a transport without passthrough).
UNSUPPORTED = errno.EOPNOTSUPP

# What every transport gives the kernel and its own workers:
#: requests served at once (trio tasks reading the next request);
MAX_WORKERS = 100
#: idle workers beyond this many leave;
SPARE_WORKERS = 2
#: the connection's max_background (the kernel's readahead and async reads in flight).
MAX_BACKGROUND = 64


class Kernel(Protocol):
    """What the file system may ask of the kernel, beyond answering requests.

    ``passthrough``: whether ``open_backing`` can work (the kernel agreed to
    read files by itself; False on transports that cannot send a backing id,
    whose ``open_backing`` raises OSError(UNSUPPORTED)).
    """

    @property
    def passthrough(self) -> bool: ...

    def open_backing(self, fd: int) -> int:
        """Register *fd*'s file for passthrough; its id, for :class:`Opened`.

        Raises OSError (EPERM without CAP_SYS_ADMIN; UNSUPPORTED).
        """
        ...

    def close_backing(self, backing_id: int) -> None: ...

    def invalidate_inode(self, ino: int) -> None:
        """Drop the kernel's pages and attributes of *ino*.  Blocking: call it
        from a thread (the kernel may wait on a request this process answers).

        OSError ENOENT: the kernel does not know *ino*.
        """
        ...

    def invalidate_entry(self, parent_ino: int, name: bytes) -> None:
        """Make the kernel forget the entry *name* of directory *parent_ino*,
        whatever its entry timeout: the name's next use is looked up again.
        Blocking: call it from a thread (the kernel waits for the requests in
        that directory this process answers).

        OSError ENOENT: the kernel does not know the directory or the entry.
        """
        ...


class Mounted(Protocol):
    """A mounted file system, ready to be served."""

    @property
    def kernel(self) -> Kernel: ...

    async def serve(self) -> None:
        """Answer requests until unmounted or :meth:`stop`; returns once every
        request read has been answered."""
        ...

    def stop(self) -> None:
        """Read no more requests; those being answered finish.  The mount stays
        until :meth:`close` (requests meanwhile wait)."""
        ...

    def close(self) -> None:
        """Unmount (lazily) and end the connection.  Never raises."""
        ...


class Transport(Protocol):
    """Mount a file system: ``await transport(mountpoint, fsname, subtype, make_ops,
    passthrough=...)``; *make_ops* builds the Operations from the mount's Kernel.

    *passthrough*: offer the kernel to read files straight from backing
    files.  *allow_other*: let users other than the mounting one in (each
    checked against the files' modes, ``default_permissions``).  *timer*:
    observe how long each request took to answer, by the name of its
    operation (``read``, ``lookup``...); without one nothing is timed, at
    no cost.  Raises MountError (cachefs.errors.CacheFSError) when refused.
    """

    async def __call__(
        self,
        mountpoint: Path,
        fsname: str,
        subtype: str,
        make_ops: Callable[[Kernel], Operations],
        *,
        passthrough: bool,
        allow_other: bool = False,
        timer: Latencies | None = None,
    ) -> Mounted: ...
