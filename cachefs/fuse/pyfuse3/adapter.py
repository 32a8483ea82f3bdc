"""pyfuse3's request handlers, answered by a cachefs.fuse.api.Operations.

Translation only: pyfuse3's arguments to the neutral calls, the neutral
replies to pyfuse3's (EntryAttributes, FileInfo, StatvfsData, readdir
tokens), cachefs.fuse.api.FUSEError to pyfuse3.FUSEError.  pyfuse3 ends
its main loop on any other exception, so anything else is logged and
answered EIO, as the native transport does.  Requests that change the
file system and have no method of their own (link, setxattr, removexattr)
go to ``Operations.change``, as there; none of them is interruptible.

Writes: libfuse 3.14 already takes 1 MiB WRITE requests (its buffer is
256 pages, the native transport's MAX_WRITE), big writes and
ATOMIC_O_TRUNC, and no write-back cache (``enable_writeback_cache``).
It also takes HANDLE_KILLPRIV, which pyfuse3 cannot turn off: the kernel
leaves clearing set-user-ID bits on write to the file system.  pyfuse3
answers a SETATTR to "now" (touch) with its own clock reading: it arrives
as that time, never as ``SetAttr.atime_now``/``mtime_now``.

INTERRUPT: libfuse takes the kernel's INTERRUPT itself and pyfuse3 tells
its handlers nothing of it.  So the rule the native transport applies on
INTERRUPT (cancel the read-only waits of a dying process: docs/SEMANTICS.md
rule 9) is applied here by looking: a request of that kind still running
after a look-around (``INTERRUPT_POLL``) is cancelled, and answered EINTR,
once its process is dying (cachefs.fuse.dying).  pyfuse3 gives READ and
READDIR no caller, so those are taken as their handle's opener's, and
only an opener seen with a fatal signal pending counts as dying (one that
is gone, say a thread or a parent that exited normally, does not: the read
may be another process's).  A process killed with a read of a child
sharing its open file still running cancels that read (which then fails
with EINTR).  A signal the process
handles cancels nothing, as on the native transport.
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from cachefs.fuse.api import DirReply, Entry, FUSEError, Opened, Operations, Payload, SetAttr
from cachefs.fuse.dying import dying
from cachefs.latency import Latencies

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often requests still running are checked for a dying caller, and how
#: long one runs before it is.
INTERRUPT_POLL = 0.2


def attributes(entry: Entry) -> pyfuse3.EntryAttributes:
    """*entry* as pyfuse3 answers LOOKUP, GETATTR and READDIRPLUS: the same
    fields and timeouts as the native transport sends."""
    attrs = pyfuse3.EntryAttributes()
    attrs.st_ino = entry.ino
    attrs.entry_timeout = entry.timeout
    attrs.attr_timeout = entry.timeout
    attrs.st_mode = entry.mode
    attrs.st_nlink = entry.nlink
    attrs.st_uid = entry.uid
    attrs.st_gid = entry.gid
    attrs.st_size = entry.size
    attrs.st_blksize = entry.blksize
    attrs.st_blocks = (entry.size + 511) // 512
    attrs.st_atime_ns = entry.mtime_ns
    attrs.st_mtime_ns = entry.mtime_ns
    attrs.st_ctime_ns = entry.mtime_ns
    return attrs


def file_info(opened: Opened) -> pyfuse3.FileInfo:
    """*opened* as pyfuse3 answers OPEN and CREATE (no backing id: libfuse cannot)."""
    return pyfuse3.FileInfo(fh=opened.fh, direct_io=opened.direct_io, keep_cache=opened.keep_cache)


def set_attr(
    attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields, fh: int | None
) -> SetAttr:
    """What a pyfuse3 SETATTR changes: the *fields* it names, read from *attr*."""
    return SetAttr(
        size=attr.st_size if fields.update_size else None,
        mode=stat.S_IMODE(attr.st_mode) if fields.update_mode else None,
        uid=attr.st_uid if fields.update_uid else None,
        gid=attr.st_gid if fields.update_gid else None,
        atime_ns=attr.st_atime_ns if fields.update_atime else None,
        mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        fh=fh,
    )


class _DirReply:
    """A READDIRPLUS answer (pyfuse3 answers every listing with attributes)."""

    __slots__ = ("_token",)

    def __init__(self, token: pyfuse3.ReaddirToken) -> None:
        self._token = token

    @property
    def plus(self) -> bool:
        return True

    def add(self, name: bytes, entry: Entry, next_offset: int) -> bool:
        return pyfuse3.readdir_reply(self._token, name, attributes(entry), next_offset)


class Adapter(pyfuse3.Operations):
    """pyfuse3's Operations, answered by *ops*."""

    #: As the native transport: no LOOKUP of "." and ".." (no NFS export).
    supports_dot_lookup = False
    #: Every write reaches the file system as it happens.
    enable_writeback_cache = False

    def __init__(self, ops: Operations, on_init: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self._ops = ops
        self._on_init = on_init
        # Who opened each handle (pyfuse3 tells READ and READDIR no caller).
        self._openers: dict[int, int] = {}
        # The interruptible requests running: their scope, caller, and
        # whether that caller is the handle's opener (the caller unknown).
        self._running: dict[trio.CancelScope, tuple[int, bool]] = {}
        self._wakeup = trio.Event()

    # -- translation ----------------------------------------------------------

    async def _plain(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        try:
            return await fn(*args)
        except FUSEError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in %s%r; answering EIO", fn.__name__, args)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def _interruptible(self, pid: int, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._cancellable(pid, False, fn, *args)

    async def _by_opener(self, fh: int, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return await self._cancellable(self._openers.get(fh, 0), True, fn, *args)

    async def _cancellable(
        self, pid: int, opener: bool, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        with trio.CancelScope() as scope:
            self._running[scope] = (pid, opener)
            if not self._wakeup.is_set():
                self._wakeup.set()
            try:
                return await self._plain(fn, *args)
            finally:
                del self._running[scope]
        log.debug("%s%r interrupted: its process is dying", fn.__name__, args)
        raise pyfuse3.FUSEError(errno.EINTR)

    async def watch_interrupts(self) -> None:
        """Cancel the interruptible requests of dying processes, until cancelled."""
        seen: set[trio.CancelScope] = set()
        while True:
            if not self._running:
                seen.clear()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            await trio.sleep(INTERRUPT_POLL)
            looked = 0
            for scope, (pid, opener) in list(self._running.items()):
                if scope in seen:
                    looked += 1
                    if dying(pid, gone=not opener):
                        scope.cancel()
            if looked:
                log.debug("looked at %d requests still running for a dying caller", looked)
            seen = set(self._running)

    # -- requests ----------------------------------------------------------------

    def init(self) -> None:
        try:
            self._on_init()
            self._ops.init()
        except Exception:
            log.exception("unexpected error in init")

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            self._ops.forget(inode_list)
        except Exception:
            log.exception("unexpected error in forget")

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return attributes(await self._interruptible(ctx.pid, self._ops.lookup, parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return attributes(await self._interruptible(ctx.pid, self._ops.getattr, inode))

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._interruptible(ctx.pid, self._ops.readlink, inode)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = await self._interruptible(ctx.pid, self._ops.statfs)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.bsize
        out.f_frsize = st.frsize
        out.f_blocks = st.blocks
        out.f_bfree = st.bfree
        out.f_bavail = st.bavail
        out.f_files = st.files
        out.f_ffree = st.ffree
        out.f_favail = st.ffree
        out.f_namemax = st.namelen
        return out

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._plain(self._ops.getxattr, inode, name)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._plain(self._ops.listxattr, inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        opened = await self._interruptible(ctx.pid, self._ops.open, inode, flags)
        self._openers[opened.fh] = ctx.pid
        return file_info(opened)

    async def read(self, fh: int, off: int, size: int) -> Payload:  # type: ignore[override]
        return await self._by_opener(fh, self._ops.read, fh, off, size)

    async def flush(self, fh: int) -> None:
        await self._plain(self._ops.flush, fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._plain(self._ops.fsync, fh, datasync)

    async def release(self, fh: int) -> None:
        self._openers.pop(fh, None)
        await self._plain(self._ops.release, fh)

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        opened = await self._interruptible(ctx.pid, self._ops.opendir, inode)
        self._openers[opened.fh] = ctx.pid
        return opened.fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        reply: DirReply = _DirReply(token)
        await self._by_opener(fh, self._ops.readdir, fh, start_id, reply)

    async def releasedir(self, fh: int) -> None:
        self._openers.pop(fh, None)
        await self._plain(self._ops.releasedir, fh)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    # -- changes ----------------------------------------------------------------

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        entry, opened = await self._plain(self._ops.create, parent_inode, name, mode, flags)
        self._openers[opened.fh] = ctx.pid
        return file_info(opened), attributes(entry)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return attributes(await self._plain(self._ops.mknod, parent_inode, name, mode, rdev))

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return attributes(await self._plain(self._ops.mkdir, parent_inode, name, mode))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return attributes(await self._plain(self._ops.symlink, parent_inode, name, target))

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._plain(self._ops.unlink, parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._plain(self._ops.rmdir, parent_inode, name)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self._plain(
            self._ops.rename, parent_inode_old, name_old, parent_inode_new, name_new, flags
        )

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return attributes(await self._plain(self._ops.setattr, inode, set_attr(attr, fields, fh)))

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self._plain(self._ops.write, fh, off, buf)

    async def _change(self, request: str) -> Any:
        await self._plain(self._ops.change, request)

    async def link(self, *args: Any) -> Any:
        return await self._change("link")

    async def setxattr(self, *args: Any) -> None:
        await self._change("setxattr")

    async def removexattr(self, *args: Any) -> None:
        await self._change("removexattr")


class TimedAdapter(Adapter):
    """An :class:`Adapter` that observes in *timer* how long each request's
    operation took, by its name (``lookup``, ``read``, ``readdir``...; a
    change by the request's: ``link``...).  forget and init are not timed,
    nor a request cancelled.  A subclass, so that an untimed mount pays
    nothing for it."""

    def __init__(
        self, ops: Operations, timer: Latencies, on_init: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__(ops, on_init)
        self._timer = timer

    async def _plain(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        name = args[0] if fn.__name__ == "change" else fn.__name__
        started = time.perf_counter()
        try:
            result = await super()._plain(fn, *args)
        except pyfuse3.FUSEError:  # answered with an errno: timed as well
            self._timer.observe(name, time.perf_counter() - started)
            raise
        self._timer.observe(name, time.perf_counter() - started)
        return result
