"""A FUSE session: the requests of one mount, answered by an Operations object.

Workers (trio tasks) take turns reading the next request from /dev/fuse and
each answers the request it read, so no request waits for another; a worker
is added whenever none is left waiting to read (up to MAX_WORKERS) and one
leaves when others are idle.  The fd is non-blocking: a request already
queued is read without a trip through the event loop.

Every request that expects an answer gets exactly one: the operation's, its
FUSEError's errno, or EIO (logged) for anything else.

Writes: the kernel is offered 1 MiB WRITE requests (MAX_WRITE, big writes)
and no write-back cache: every write(2) reaches the file system as it
happens (its dirty tracking and O_APPEND offsets depend on it), a
buffered writer's in requests of up to MAX_WRITE.  ATOMIC_O_TRUNC is
taken when offered: an open with O_TRUNC is one OPEN carrying O_TRUNC,
not a SETATTR to size 0 before it.  One buffer of MAX_WRITE and a header
holds the request being read (one worker reads at a time); each request
is copied out of it, so a WRITE's data stays the request's own while the
next one is read.

INTERRUPT (the kernel's word that the process waiting on a request got a
signal) cancels the request it names when that process is dying (a fatal
signal: ``kill -9``, or one it does not catch), the request is one of the
read-only waits in INTERRUPTIBLE and it is still running: its operation is
cancelled and the request answered EINTR, which nobody will read.  A
signal the process handles (SIGCHLD, SIGWINCH, a timer) does not cancel:
the kernel would hand EINTR to the program as the call's result, and
programs expect open, stat and read of a file not to fail that way.
Those operations change nothing before their last wait, so a cancelled one
leaves no trace.  An INTERRUPT for a request already answered is dropped.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from cachefs.fuse.api import (
    MAX_BACKGROUND,
    MAX_WORKERS,
    SPARE_WORKERS,
    FUSEError,
    Kernel,
    Operations,
    Payload,
)
from cachefs.fuse.dying import dying
from cachefs.fuse.native import abi, device
from cachefs.fuse.native.abi import DirReply
from cachefs.fuse.native.device import Connection
from cachefs.latency import Histogram, Latencies

log = logging.getLogger(__name__)

#: 1 MiB writes, as reads: a sequential writer sends one request per MiB.
MAX_WRITE = 1 << 20
#: 1 MiB reads and writes: one request per cache block.
MAX_PAGES = 256
#: Room for the header and fixed part of a request beyond its data (the
#: kernel wants a buffer of at least MAX_WRITE + 80 bytes).
REQUEST_ROOM = 4096
#: Requests an INTERRUPT cancels: they wait for the backend or the cache and
#: take nothing (an OPEN takes its handle after its last wait).  RELEASE is
#: not among them: the kernel gives a handle back once.
INTERRUPTIBLE = frozenset(
    {
        abi.LOOKUP,
        abi.GETATTR,
        abi.READLINK,
        abi.OPEN,
        abi.READ,
        abi.STATFS,
        abi.OPENDIR,
        abi.READDIR,
        abi.READDIRPLUS,
    }
)

Request = tuple[int, int, int, int, bytes]  # opcode, unique, nodeid, pid, body


class Session:
    """Serves the requests of one connection (see :func:`mount`) with *ops*
    (a cachefs.fuse.api.Mounted).

    *passthrough*: offer the kernel to read files straight from backing
    files (``Connection.open_backing``); ``connection.passthrough`` then
    says whether it took the offer.  *timer*: observe how long each request
    took, from its read to its answer, by operation: the name of its
    handler (``lookup``, ``read``, ``readdirplus``...) or of the change
    (``link``...).  FORGET, INTERRUPT and INIT are not timed, nor a request
    an INTERRUPT cancelled.  Without a timer, the one cost is an ``is None``
    test per request.
    """

    def __init__(
        self,
        ops: Operations,
        connection: Connection,
        passthrough: bool = True,
        timer: Latencies | None = None,
    ) -> None:
        self._ops = ops
        self.connection = connection
        self._fd = connection.fd
        self._offer_passthrough = passthrough
        self._buf = bytearray(MAX_WRITE + REQUEST_ROOM)
        self._view = memoryview(self._buf)
        self._reading = False
        self._readers = trio.lowlevel.ParkingLot()
        self._workers = 0
        self._idle = 0
        self._stopping = False
        self._nursery: trio.Nursery | None = None
        # The INTERRUPTIBLE requests being answered, by unique: the scope
        # that cancels it and the thread that waits for it.
        self._running: dict[int, tuple[trio.CancelScope, int]] = {}
        self._handlers: dict[int, Callable[[int, bytes], Awaitable[Payload]]] = {
            abi.LOOKUP: self._lookup,
            abi.GETATTR: self._getattr,
            abi.READLINK: self._readlink,
            abi.OPEN: self._open,
            abi.READ: self._read,
            abi.RELEASE: self._release,
            abi.FLUSH: self._flush,
            abi.FSYNC: self._fsync,
            abi.STATFS: self._statfs,
            abi.GETXATTR: self._getxattr,
            abi.LISTXATTR: self._listxattr,
            abi.OPENDIR: self._opendir,
            abi.READDIR: self._readdir,
            abi.READDIRPLUS: self._readdirplus,
            abi.RELEASEDIR: self._releasedir,
            abi.FSYNCDIR: self._fsyncdir,
            abi.DESTROY: self._destroy,
            abi.CREATE: self._create,
            abi.MKNOD: self._mknod,
            abi.MKDIR: self._mkdir,
            abi.SYMLINK: self._symlink,
            abi.UNLINK: self._unlink,
            abi.RMDIR: self._rmdir,
            abi.RENAME: self._rename,
            abi.RENAME2: self._rename2,
            abi.SETATTR: self._setattr,
            abi.WRITE: self._write,
        }
        self._timer = timer
        # opcode -> its histogram, made on the first request of that kind
        self._histograms: dict[int, Histogram] = {}

    @property
    def kernel(self) -> Kernel:
        return self.connection

    def close(self) -> None:
        """Unmount (lazily) and end the connection: open files then fail with ENOTCONN."""
        self.connection.close()

    # -- serving ----------------------------------------------------------------

    async def serve(self) -> None:
        """Answer requests until the connection ends or :meth:`stop` is called.

        Returns once every request read has been answered.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._add_worker()

    def stop(self) -> None:
        """Read no more requests; those being answered finish.  The mount stays
        until the connection is closed (requests meanwhile wait)."""
        if not self._stopping:
            self._stopping = True
            trio.lowlevel.notify_closing(self._fd)
            self._readers.unpark_all()

    def _add_worker(self) -> None:
        assert self._nursery is not None
        self._workers += 1
        self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        # One cancel scope serves a worker's requests until an INTERRUPT
        # cancels it (a scope per request cost the daemon-bound encrypted
        # cache hits about 10% of their IOPS).  It is cancelled only while
        # the request it was lent to is being answered (self._running).
        timer = self._timer
        try:
            while True:
                scope = trio.CancelScope()
                answering: int | None = None
                with scope:
                    while not scope.cancel_called:
                        request = await self._next_request()
                        if request is None:
                            return
                        if self._idle == 0 and self._workers < MAX_WORKERS:
                            self._add_worker()
                        answering = request[1]
                        if timer is None:
                            await self._answer(*request, scope)
                        else:
                            started = time.perf_counter()
                            await self._answer(*request, scope)
                            self._observe(request[0], time.perf_counter() - started)
                        answering = None
                        if self._idle > SPARE_WORKERS:
                            return
                if scope.cancelled_caught and answering is not None:
                    self._send(answering, -errno.EINTR, b"")
        finally:
            self._workers -= 1

    def _observe(self, opcode: int, seconds: float) -> None:
        histogram = self._histograms.get(opcode)
        if histogram is None:
            handler = self._handlers.get(opcode)
            name = abi.CHANGES.get(opcode) if handler is None else handler.__name__.lstrip("_")
            if name is None or self._timer is None:  # FORGET, INTERRUPT, INIT, unknown
                return
            histogram = self._histograms[opcode] = self._timer.histogram(name)
        histogram.observe(seconds)

    async def _next_request(self) -> Request | None:
        """(opcode, unique, nodeid, pid, body) of the next request; None to stop."""
        self._idle += 1
        try:
            while self._reading and not self._stopping:
                await self._readers.park()
            if self._stopping:
                return None
            self._reading = True
            try:
                return await self._read_request()
            finally:
                self._reading = False
                self._readers.unpark()
        finally:
            self._idle -= 1

    async def _read_request(self) -> Request | None:
        buf = self._buf
        while True:
            try:
                n = os.readv(self._fd, [buf])
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:  # stop()
                    return None
                continue
            except OSError as e:
                if e.errno in (errno.EINTR, errno.ENOENT):  # ENOENT: interrupted, dropped
                    continue
                if e.errno == errno.ENODEV:  # unmounted
                    log.debug("the kernel ended the connection")
                    return None
                raise
            _, opcode, unique, nodeid, _, _, pid, extlen, _ = abi.IN_HEADER.unpack_from(buf)
            # The body, copied once; extensions (8-byte units) are not ours.
            return (
                opcode,
                unique,
                nodeid,
                pid,
                bytes(self._view[abi.IN_HEADER.size : n - 8 * extlen]),
            )

    async def _answer(
        self,
        opcode: int,
        unique: int,
        nodeid: int,
        pid: int,
        body: bytes,
        scope: trio.CancelScope,
    ) -> None:
        if opcode in abi.NO_REPLY:
            if opcode == abi.FORGET:
                self._forget([(nodeid, abi.FORGET_IN.unpack_from(body)[0])])
            elif opcode == abi.BATCH_FORGET:
                count, _ = abi.BATCH_FORGET_IN.unpack_from(body)
                at = abi.BATCH_FORGET_IN.size
                items = [abi.FORGET_ONE.unpack_from(body, at + 16 * i) for i in range(count)]
                self._forget(items)
            elif opcode == abi.INTERRUPT:
                self._interrupt(abi.INTERRUPT_IN.unpack_from(body)[0])
            return
        if opcode == abi.INIT:
            self._init(unique, body)
            return
        handler = self._handlers.get(opcode)
        # Registered before the first checkpoint: an INTERRUPT, which the
        # kernel sends only once this request was read, always finds it.
        # Cancelled, the handler's Cancelled reaches the worker's scope,
        # which answers EINTR.
        if opcode in INTERRUPTIBLE:
            self._running[unique] = (scope, pid)
        try:
            if handler is not None:
                payload = await handler(nodeid, body)
            elif opcode in abi.CHANGES:
                await self._ops.change(abi.CHANGES[opcode])
                payload = b""
            else:
                raise FUSEError(errno.ENOSYS)
        except FUSEError as e:
            self._send(unique, -e.errno, b"")
        except Exception:
            log.exception("unexpected error answering request %d (opcode %d)", unique, opcode)
            self._send(unique, -errno.EIO, b"")
        else:
            self._send(unique, 0, payload)
        finally:
            self._running.pop(unique, None)

    def _interrupt(self, unique: int) -> None:
        running = self._running.get(unique)
        if running is None:
            return
        scope, pid = running
        if not dying(pid):
            log.debug("request %d: interrupted by a signal its process handles: answered", unique)
            return
        log.debug("request %d interrupted: its process is dying", unique)
        scope.cancel()

    def _send(self, unique: int, error: int, payload: Payload) -> None:
        header = abi.OUT_HEADER.pack(abi.OUT_HEADER.size + len(payload), error, unique)
        try:
            os.writev(self._fd, [header, payload] if payload else [header])
        except OSError as e:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("cannot answer request %d: %s", unique, e.strerror)

    def _forget(self, items: list[tuple[int, int]]) -> None:
        try:
            self._ops.forget(items)
        except Exception:
            log.exception("unexpected error in forget")

    def _init(self, unique: int, body: bytes) -> None:
        major, minor, max_readahead, flags = abi.INIT_IN.unpack_from(body)
        if major != abi.MAJOR:
            log.error("the kernel speaks FUSE %d.%d; cachefs needs 7.x", major, minor)
            self._send(unique, -errno.EPROTO, b"")
            return
        if flags & abi.INIT_EXT and len(body) >= abi.INIT_IN.size + 4:
            flags |= struct.unpack_from("<I", body, abi.INIT_IN.size)[0] << 32
        want = flags & (
            abi.ASYNC_READ
            | abi.AUTO_INVAL_DATA
            | abi.DO_READDIRPLUS
            | abi.ASYNC_DIO
            | abi.PARALLEL_DIROPS
            | abi.MAX_PAGES
            | abi.INIT_EXT
            | abi.BIG_WRITES
            | abi.ATOMIC_O_TRUNC
        )
        if self._offer_passthrough and flags & abi.PASSTHROUGH:
            want |= abi.PASSTHROUGH
        out = abi.INIT_OUT.pack(
            abi.MAJOR,
            abi.MINOR,
            max_readahead,
            want & 0xFFFFFFFF,
            MAX_BACKGROUND,
            MAX_BACKGROUND * 3 // 4,
            MAX_WRITE,
            1,
            MAX_PAGES,
            0,
            want >> 32,
            1 if want & abi.PASSTHROUGH else 0,
        )
        if minor < 23:  # kernels before 3.15 take the 7.22 layout only
            out = out[: abi.INIT_OUT_COMPAT_22]
        self._send(unique, 0, out)
        self.connection.passthrough = bool(want & abi.PASSTHROUGH)
        log.info(
            "kernel FUSE %d.%d; passthrough %s",
            major,
            minor,
            "on" if want & abi.PASSTHROUGH else "off",
        )
        self._ops.init()

    # -- requests ---------------------------------------------------------------

    async def _lookup(self, nodeid: int, body: bytes) -> Payload:
        name = body[: body.index(b"\0")] if b"\0" in body else body
        return abi.entry_out(await self._ops.lookup(nodeid, name))

    async def _getattr(self, nodeid: int, body: bytes) -> Payload:
        return abi.attr_out(await self._ops.getattr(nodeid))

    async def _readlink(self, nodeid: int, body: bytes) -> Payload:
        return await self._ops.readlink(nodeid)

    async def _open(self, nodeid: int, body: bytes) -> Payload:
        flags, _ = abi.OPEN_IN.unpack_from(body)
        return abi.open_out(await self._ops.open(nodeid, flags))

    async def _read(self, nodeid: int, body: bytes) -> Payload:
        fh, offset, size = abi.READ_IN.unpack_from(body)
        return await self._ops.read(fh, offset, size)

    async def _release(self, nodeid: int, body: bytes) -> Payload:
        await self._ops.release(abi.FH_IN.unpack_from(body)[0])
        return b""

    async def _flush(self, nodeid: int, body: bytes) -> Payload:
        await self._ops.flush(abi.FH_IN.unpack_from(body)[0])
        return b""

    async def _fsync(self, nodeid: int, body: bytes) -> Payload:
        fh, flags, _ = abi.FSYNC_IN.unpack_from(body)
        await self._ops.fsync(fh, bool(flags & abi.FSYNC_FDATASYNC))
        return b""

    async def _statfs(self, nodeid: int, body: bytes) -> Payload:
        return abi.statfs_out(await self._ops.statfs())

    async def _getxattr(self, nodeid: int, body: bytes) -> Payload:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        name = body[abi.GETXATTR_IN.size :].split(b"\0", 1)[0]
        return _sized(await self._ops.getxattr(nodeid, name), size)

    async def _listxattr(self, nodeid: int, body: bytes) -> Payload:
        size, _ = abi.GETXATTR_IN.unpack_from(body)
        names = await self._ops.listxattr(nodeid)
        return _sized(b"".join(n + b"\0" for n in names), size)

    async def _opendir(self, nodeid: int, body: bytes) -> Payload:
        return abi.open_out(await self._ops.opendir(nodeid))

    async def _readdir(self, nodeid: int, body: bytes) -> Payload:
        return await self._list(body, plus=False)

    async def _readdirplus(self, nodeid: int, body: bytes) -> Payload:
        return await self._list(body, plus=True)

    async def _list(self, body: bytes, plus: bool) -> Payload:
        fh, offset, size = abi.READ_IN.unpack_from(body)
        reply = DirReply(size, plus)
        await self._ops.readdir(fh, offset, reply)
        return reply.payload()

    async def _releasedir(self, nodeid: int, body: bytes) -> Payload:
        await self._ops.releasedir(abi.FH_IN.unpack_from(body)[0])
        return b""

    async def _fsyncdir(self, nodeid: int, body: bytes) -> Payload:
        return b""

    async def _destroy(self, nodeid: int, body: bytes) -> Payload:
        return b""

    # -- changes --------------------------------------------------------------------

    async def _create(self, nodeid: int, body: bytes) -> Payload:
        flags, mode, _, _ = abi.CREATE_IN.unpack_from(body)
        name = abi.name_in(body, abi.CREATE_IN.size)
        entry, opened = await self._ops.create(nodeid, name, mode, flags)
        return abi.create_out(entry, opened)

    async def _mknod(self, nodeid: int, body: bytes) -> Payload:
        mode, rdev, _, _ = abi.MKNOD_IN.unpack_from(body)
        name = abi.name_in(body, abi.MKNOD_IN.size)
        return abi.entry_out(await self._ops.mknod(nodeid, name, mode, rdev))

    async def _mkdir(self, nodeid: int, body: bytes) -> Payload:
        # The kernel sends the permission bits only; the type is said, as libfuse does.
        mode, _ = abi.MKDIR_IN.unpack_from(body)
        name = abi.name_in(body, abi.MKDIR_IN.size)
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        return abi.entry_out(await self._ops.mkdir(nodeid, name, mode))

    async def _symlink(self, nodeid: int, body: bytes) -> Payload:
        name, target = abi.names_in(body, 0)  # the link's name first, then its target
        return abi.entry_out(await self._ops.symlink(nodeid, name, target))

    async def _unlink(self, nodeid: int, body: bytes) -> Payload:
        await self._ops.unlink(nodeid, abi.name_in(body))
        return b""

    async def _rmdir(self, nodeid: int, body: bytes) -> Payload:
        await self._ops.rmdir(nodeid, abi.name_in(body))
        return b""

    async def _rename(self, nodeid: int, body: bytes) -> Payload:
        (new_parent,) = abi.RENAME_IN.unpack_from(body)
        name, new_name = abi.names_in(body, abi.RENAME_IN.size)
        await self._ops.rename(nodeid, name, new_parent, new_name, 0)
        return b""

    async def _rename2(self, nodeid: int, body: bytes) -> Payload:
        new_parent, flags, _ = abi.RENAME2_IN.unpack_from(body)
        name, new_name = abi.names_in(body, abi.RENAME2_IN.size)
        await self._ops.rename(nodeid, name, new_parent, new_name, flags)
        return b""

    async def _setattr(self, nodeid: int, body: bytes) -> Payload:
        return abi.attr_out(await self._ops.setattr(nodeid, abi.setattr_in(body)))

    async def _write(self, nodeid: int, body: bytes) -> Payload:
        fh, offset, size, _, _, _, _ = abi.WRITE_IN.unpack_from(body)
        at = abi.WRITE_IN.size
        data = memoryview(body)[at : at + size]  # the request's own copy
        return abi.write_out(await self._ops.write(fh, offset, data))


def _sized(value: bytes, size: int) -> Payload:
    """An xattr answer: its length when asked with size 0, ERANGE if it does not fit."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise FUSEError(errno.ERANGE)
    return value


async def mount(
    mountpoint: Path,
    fsname: str,
    subtype: str,
    *,
    options: list[str] | None = None,
    fusermount: bool | None = None,
) -> Connection:
    """Mount a FUSE connection on *mountpoint*; serve it with :class:`Session`.

    The kernel's INIT is the first request the session reads;
    ``Connection.close`` unmounts.  *fusermount*: mount through fusermount3
    (default: unless root).  Raises MountError.
    """
    opts = ["default_permissions", *(options or [])]
    return await trio.to_thread.run_sync(
        device.mount, mountpoint, fsname, subtype, opts, fusermount
    )


async def mount_fs(
    mountpoint: Path,
    fsname: str,
    subtype: str,
    make_ops: Callable[[Kernel], Operations],
    *,
    passthrough: bool,
    allow_other: bool = False,
    timer: Latencies | None = None,
) -> Session:
    """Mount on *mountpoint* and return the Session that serves *make_ops*'s
    operations there (the native cachefs.fuse.api.Transport).  Raises MountError."""
    connection = await mount(
        mountpoint, fsname, subtype, options=["allow_other"] if allow_other else None
    )
    try:
        return Session(make_ops(connection), connection, passthrough=passthrough, timer=timer)
    except BaseException:
        connection.close()
        raise
