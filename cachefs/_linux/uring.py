"""Cache-disk reads through io_uring, completed on the trio loop.

A hit whose bytes are not in the page cache waits for the disk.  Through a
reader thread that wait costs two cross-thread wake-ups and a GIL hand-off
each way; through io_uring the loop submits the read itself and the ring's
eventfd wakes it when the read is done, at a fraction of the CPU per read.

Where the ring is not to be had (no liburing wheel, an old kernel, a
sandbox that refuses io_uring, ``kernel.io_uring_disabled``) :func:`open_ring`
returns None and hits keep using reader threads.

Policy: a read in flight is not cancelled (a pread is short, as in the
pool); its buffer stays referenced until the kernel has answered, so the
kernel never writes into memory Python has reused.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import outcome
import trio

log = logging.getLogger(__name__)

ENTRIES = 64  # reads in flight at most; the completion ring is twice this
IOSQE_ASYNC = 1 << 4  # <linux/io_uring.h>: straight to a kernel worker thread


class Ring:
    """One io_uring for preads, reaped by :meth:`serve` on the trio loop."""

    def __init__(self, lib: Any, entries: int = ENTRIES) -> None:
        self._lib = lib
        self._ring = lib.Ring()
        self._cqe = lib.Cqe()
        lib.io_uring_queue_init(entries, self._ring)
        try:
            self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            try:
                lib.io_uring_register_eventfd(self._ring, self._efd)
            except BaseException:
                os.close(self._efd)
                raise
        except BaseException:
            lib.io_uring_queue_exit(self._ring)
            raise
        self._entries = entries
        self._room = trio.lowlevel.ParkingLot()  # readers waiting for a free entry
        # user_data -> [waiting task or None, the buffer the kernel writes into]
        self._inflight: dict[int, list[Any]] = {}
        self._next = 0
        self.broken: OSError | None = None
        self._closed = False

    @property
    def usable(self) -> bool:
        return self.broken is None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def pread(self, fd: int, buf: bytearray, offset: int, offload: bool = False) -> int:
        """Fill *buf* from *offset* of *fd*; fewer bytes only at the end of the file.

        *offload*: the read goes to a kernel worker thread instead of being
        issued by this thread in its submit call; that keeps the disk's
        submission cost off the loop when several reads are in flight.
        """
        done = await self._read_once(fd, buf, offset, offload)
        while 0 < done < len(buf):  # short, not at the end: the rest (the binding takes
            rest = bytearray(len(buf) - done)  # whole bytearrays only)
            n = await self._read_once(fd, rest, offset + done, offload)
            if n == 0:
                break
            buf[done : done + n] = rest[:n]
            done += n
        return done

    async def read_into(self, fd: int, view: memoryview, offset: int) -> int:
        """One read of up to len(*view*) bytes at *offset* into *view*, issued by this thread.

        For direct reads into memory that outlives the read whatever happens
        to the awaiting task (the caller's lent buffers); how many bytes came.
        """
        iovec = self._lib.Iovec([view])
        return await self._submit_read(fd, iovec, offset, False, view)

    async def _read_once(self, fd: int, buf: bytearray, offset: int, offload: bool) -> int:
        return await self._submit_read(fd, buf, offset, offload, buf)

    async def _submit_read(
        self, fd: int, target: Any, offset: int, offload: bool, keep: Any
    ) -> int:
        """Queue a read into *target* (a bytearray, or an Iovec); *keep* stays
        referenced until the kernel has answered."""
        if self.broken is not None:
            raise self.broken
        # A ParkingLot rather than a Semaphore: nothing to pay while there is room.
        while len(self._inflight) >= self._entries:
            await self._room.park()
            if self.broken is not None:
                raise self.broken
        lib = self._lib
        sqe = lib.io_uring_get_sqe(self._ring)
        if sqe is None:  # cannot happen while at most `entries` are in flight
            raise OSError(errno.EBUSY, "io_uring submission queue full")
        if isinstance(target, bytearray):
            lib.io_uring_prep_read(sqe, fd, target, offset)
        else:
            lib.io_uring_prep_readv(sqe, fd, target, offset)
        self._next += 1
        key = self._next
        lib.io_uring_sqe_set_data64(sqe, key)
        if offload:
            sqe.flags = IOSQE_ASYNC
        task = trio.lowlevel.current_task()
        entry = [task, (target, keep)]
        self._inflight[key] = entry
        try:
            self._submit()
        except OSError as e:
            # The entry may still reach the kernel: it keeps its buffer,
            # and this read (and every later one) goes another way.
            entry[0] = None
            self.broken = e
            self._room.unpark_all()
            log.warning("io_uring submit failed (%s): disk reads go through threads", e)
            raise
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _submit(self) -> None:
        for _ in range(3):
            try:
                self._lib.io_uring_submit(self._ring)
                return
            except InterruptedError:
                continue
        raise OSError(errno.EINTR, "io_uring submit interrupted three times")

    async def serve(self) -> None:
        """Hand completed reads to their tasks until cancelled; then close the ring."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._efd)
                self._reap()
        finally:
            self._close()

    def _reap(self) -> None:
        try:
            os.eventfd_read(self._efd)  # before the ring: a later completion signals again
        except BlockingIOError:
            pass
        lib, ring, cqe = self._lib, self._ring, self._cqe
        while True:
            try:
                lib.io_uring_peek_cqe(ring, cqe)
            except BlockingIOError:
                return
            c = cqe[0]
            key = c.user_data
            try:
                result: outcome.Outcome = outcome.Value(c.res)
            except OSError as e:  # the read's negative result, as its errno
                result = outcome.Error(e)
            lib.io_uring_cq_advance(ring, 1)
            entry = self._inflight.pop(key, None)
            if entry is not None and entry[0] is not None:
                trio.lowlevel.reschedule(entry[0], result)
            if self._room:
                self._room.unpark()

    def _close(self) -> None:
        """Tear the ring down, unless reads are still in flight (then it is left to exit)."""
        if self._closed:
            return
        self._closed = True
        self.broken = OSError(errno.ESHUTDOWN, "io_uring closed")  # no read touches it again
        self._room.unpark_all()
        self._reap()
        if self._inflight:
            log.warning("%d cache-disk reads still in flight at shutdown", len(self._inflight))
            for entry in self._inflight.values():
                if entry[0] is not None:
                    trio.lowlevel.reschedule(
                        entry[0], outcome.Error(OSError(errno.EIO, "cache shut down"))
                    )
                    entry[0] = None
            return  # the buffers stay referenced; the ring goes with the process
        trio.lowlevel.notify_closing(self._efd)
        os.close(self._efd)
        self._lib.io_uring_queue_exit(self._ring)


def open_ring(entries: int = ENTRIES) -> Ring | None:
    """An io_uring for cache-disk reads, or None where this system offers none."""
    try:
        import liburing
    except ImportError as e:
        log.info("no io_uring (%s): cache-disk reads go through threads", e)
        return None
    try:
        return Ring(liburing, entries)
    except OSError as e:
        log.info("no io_uring (%s): cache-disk reads go through threads", e)
        return None
