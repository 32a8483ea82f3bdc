"""``python -m bench.fuseuring``: FUSE over io_uring against /dev/fuse read/write.

Issue 23 asked whether answering through io_uring (FUSE_OVER_IO_URING)
beats a read and a write on /dev/fuse per request.  This probe keeps the
question re-measurable; cachefs does not use the ring (on this kernel and
machine it lost, see the log of issue 23).

The native Session serves a trivial file system (one 1 MiB file answered
from memory) once through /dev/fuse and once through a ring, alternating
rounds; client processes measure (a) 4 KiB preads of a direct-io file
(every read reaches the daemon), (b) open+close, (c) both again with 8
client processes.  Printed: µs per operation at the clients (wall time over
all operations) and the daemon's CPU per operation, medians of the rounds.

The ring side, as the kernel's fs/fuse/dev_uring.c wants it: INIT still
comes through /dev/fuse and the answer says FUSE_OVER_IO_URING; then each
ring entry (a header buffer: the in/out header, the operation's struct,
commit id and payload size; and a payload buffer of max_write) is offered
with FUSE_IO_URING_CMD_REGISTER, *depth* entries for each queue (the kernel
has one queue per possible CPU and puts a request on its caller's CPU's
queue).  A completion says an entry holds a request; the answer is written
into the same buffers and FUSE_IO_URING_CMD_COMMIT_AND_FETCH hands it over
and the entry back, in one io_uring_enter.  FORGET and INTERRUPT still come
through /dev/fuse.  The ring is driven through ctypes (liburing's Python
binding cannot fill an SQE's 80-byte command area); its stores are ordered
as written on x86-64 only.

Needs root (mount(2); enable_uring, set to Y for the run and put back after).
Not IORING_SETUP_DEFER_TASKRUN: the kernel then copies requests into the
entries only inside the daemon's own io_uring_enter, and a daemon thread
blocked on its own mount leaves requests no abort can end (an unkillable
process until reboot).  Known fault, cause not found: about one ring run in
four or five loses requests in the 8-client cases (the daemon waits on the
ring fd with nothing to reap, the clients wait for answers); the client
deadline then ends the connection and the run fails.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import logging
import mmap
import os
import platform
import signal
import stat
import statistics
import struct
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from cachefs.fuse import DirReply, Entry, FUSEError, Opened, Payload, Statfs
from cachefs.fuse.native import Session, abi, mount
from cachefs.fuse.native.device import Connection
from cachefs.fuse.native.session import MAX_PAGES, MAX_WRITE

log = logging.getLogger(__name__)

ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")
SIZE = 1 << 20
DATA = os.urandom(SIZE)
DEPTH = 8  # ring entries per queue
DEADLINE = 20.0  # for one client run
#: The kernel's payload size for the Session's INIT: max_write, or max_pages pages.
PAYLOAD = max(MAX_WRITE, MAX_PAGES * mmap.PAGESIZE)
OVER_IO_URING = 1 << 41  # INIT flag (flags2 bit 9)
INIT_OUT_FLAGS2 = 32  # offset of flags2 in fuse_init_out

# -- the ring ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_SYS_IO_URING_SETUP = 425  # the same number on every architecture
_SYS_IO_URING_ENTER = 426
_SETUP_COOP_TASKRUN = 1 << 8
_SETUP_TASKRUN_FLAG = 1 << 9
_SETUP_SQE128 = 1 << 10
_FEAT_SINGLE_MMAP = 1 << 0
_OFF_SQES = 0x10000000
_OP_URING_CMD = 46
CMD_REGISTER = 1
CMD_COMMIT_AND_FETCH = 2

#: io_uring_params: 10 u32 (sq_entries cq_entries flags ... features ...), then
#: the SQ and CQ ring offsets (8 u32 and a u64 each).
PARAMS = struct.Struct("<10I8IQ8IQ")
#: A 128-byte SQE for IORING_OP_URING_CMD: opcode flags ioprio fd, cmd_op pad,
#: addr, len, uring_cmd_flags, user_data, buf_index personality file_index,
#: then the command area: fuse_uring_cmd_req (flags commit_id qid).
SQE = struct.Struct("<BBHiIIQIIQHHiQQH6x56x")
CQE = struct.Struct("<QiI")  # user_data res flags
U32 = struct.Struct("<I")
#: fuse_uring_req_header: in_out[128] op_in[128] ring_ent_in_out.
HEADER_SIZE = 128 + 128 + 32
OP_IN = 128
ENT_IN_OUT = 256
ENT_IN_OUT_STRUCT = struct.Struct("<QQII")  # flags commit_id payload_sz padding
HEADER_STRIDE = 512


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def unpack_request(
    header: Any, payload: Any, at: int = 0, payload_at: int = 0
) -> tuple[int, int, int, int, int, bytes]:
    """(commit_id, opcode, unique, nodeid, pid, body) of the request an entry holds.

    The body as /dev/fuse gives it: the operation's struct (its size: the
    header's total length less the fixed header and the payload) then the
    payload, extensions left out.
    """
    length, opcode, unique, nodeid, _, _, pid, extlen, _ = abi.IN_HEADER.unpack_from(header, at)
    _, commit_id, payload_size, _ = ENT_IN_OUT_STRUCT.unpack_from(header, at + ENT_IN_OUT)
    op_size = length - abi.IN_HEADER.size - payload_size
    if not 0 <= op_size <= OP_IN or payload_size < 8 * extlen:
        raise ValueError(f"request {unique}: length {length}, payload {payload_size}")
    op = bytes(header[at + OP_IN : at + OP_IN + op_size])
    rest = payload[payload_at : payload_at + payload_size - 8 * extlen]
    return commit_id, opcode, unique, nodeid, pid, op + bytes(rest)


class FuseRing:
    """One io_uring carrying *depth* entries for each of *queues* FUSE queues of
    the connection on *fuse_fd*, each with a *payload_size* buffer.  One
    thread submits and reaps."""

    def __init__(
        self, fuse_fd: int, queues: int, depth: int, payload_size: int, coop: bool = False
    ) -> None:
        self._fuse_fd = fuse_fd
        self.queues = queues
        self.entries = queues * depth
        self._payload_size = payload_size
        flags = _SETUP_SQE128 | (_SETUP_COOP_TASKRUN | _SETUP_TASKRUN_FLAG if coop else 0)
        params = ctypes.create_string_buffer(PARAMS.size)
        U32.pack_into(params, 8, flags)
        size = 1 << (self.entries - 1).bit_length()
        fd = _libc.syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(size), params)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        fields = PARAMS.unpack(params.raw)
        sq_entries, cq_entries, features = fields[0], fields[1], fields[5]
        sq_head, sq_tail, sq_mask, _, _, _, sq_array = fields[10:17]
        cq_head, cq_tail, cq_mask, _, _, cqes = fields[19:25]
        try:
            if not features & _FEAT_SINGLE_MMAP:
                raise OSError(errno.ENOSYS, "io_uring without a single ring mapping")
            length = max(sq_array + 4 * sq_entries, cqes + 16 * cq_entries)
            self._rings = mmap.mmap(fd, length)
            self._sqes = mmap.mmap(fd, 128 * sq_entries, offset=_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        for i in range(sq_entries):  # SQ array slot i names SQE i
            U32.pack_into(self._rings, sq_array + 4 * i, i)
        # The offsets say where in the mapping each value lives.
        self._sq_tail, self._cq_head, self._cq_tail = sq_tail, cq_head, cq_tail
        self._sq_mask = U32.unpack_from(self._rings, sq_mask)[0]
        self._cq_mask = U32.unpack_from(self._rings, cq_mask)[0]
        self._cqes = cqes
        self._tail = U32.unpack_from(self._rings, sq_tail)[0]
        self._unsubmitted = 0
        # Buffers the kernel reads and writes: stable addresses, kept while
        # the process lives (the kernel may write until the ring is gone).
        self.headers = mmap.mmap(-1, HEADER_STRIDE * self.entries)
        self.payloads = mmap.mmap(-1, payload_size * self.entries)
        self._iovecs = (_Iovec * (2 * self.entries))()
        hbase = ctypes.addressof(ctypes.c_char.from_buffer(self.headers))
        pbase = ctypes.addressof(ctypes.c_char.from_buffer(self.payloads))
        for i in range(self.entries):
            self._iovecs[2 * i] = _Iovec(hbase + HEADER_STRIDE * i, HEADER_SIZE)
            self._iovecs[2 * i + 1] = _Iovec(pbase + payload_size * i, payload_size)

    def register(self) -> None:
        """Offer every entry to the kernel; it completes one when it holds a request."""
        base = ctypes.addressof(self._iovecs)
        for entry in range(self.entries):
            self._queue(CMD_REGISTER, entry, base + 2 * ctypes.sizeof(_Iovec) * entry, 2, 0)
        self.submit()

    def request(self, entry: int) -> tuple[int, int, int, int, int, bytes]:
        """(commit_id, opcode, unique, nodeid, pid, body) of the request *entry* holds."""
        return unpack_request(
            self.headers, self.payloads, HEADER_STRIDE * entry, self._payload_size * entry
        )

    def answer(self, entry: int, unique: int, commit_id: int, error: int, payload: Payload) -> None:
        """Write the answer into *entry* and queue its commit (see :meth:`submit`)."""
        at = HEADER_STRIDE * entry
        n = len(payload)
        abi.OUT_HEADER.pack_into(self.headers, at, abi.OUT_HEADER.size + n, error, unique)
        U32.pack_into(self.headers, at + ENT_IN_OUT + 16, n)
        if n:
            p = self._payload_size * entry
            self.payloads[p : p + n] = payload
        self._queue(CMD_COMMIT_AND_FETCH, entry, 0, 0, commit_id)

    def _queue(self, cmd: int, entry: int, addr: int, length: int, commit_id: int) -> None:
        qid = entry % self.queues
        slot = self._tail & self._sq_mask
        SQE.pack_into(
            self._sqes, 128 * slot, _OP_URING_CMD, 0, 0, self._fuse_fd, cmd, 0, addr, length,
            0, entry, 0, 0, 0, 0, commit_id, qid,
        )  # fmt: skip
        self._tail = (self._tail + 1) & 0xFFFFFFFF
        U32.pack_into(self._rings, self._sq_tail, self._tail)
        self._unsubmitted += 1

    def submit(self) -> None:
        """Hand the queued commands to the kernel."""
        while self._unsubmitted:
            n = _libc.syscall(_SYS_IO_URING_ENTER, self.fd, self._unsubmitted, 0, 0, None, 0)
            if n < 0:
                e = ctypes.get_errno()
                if e in (errno.EINTR, errno.EAGAIN, errno.EBUSY):
                    continue
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
            self._unsubmitted -= n

    def reap(self) -> tuple[int, int] | None:
        """(entry, result) of the next completion, or None if there is none yet."""
        rings = self._rings
        head = U32.unpack_from(rings, self._cq_head)[0]
        if head == U32.unpack_from(rings, self._cq_tail)[0]:
            return None
        entry, res, _ = CQE.unpack_from(rings, self._cqes + 16 * (head & self._cq_mask))
        U32.pack_into(rings, self._cq_head, (head + 1) & 0xFFFFFFFF)
        return entry, res

    def close(self) -> None:
        """Close the ring: the kernel cancels the entries it still holds."""
        self._rings.close()  # the mappings hold the ring too
        self._sqes.close()
        os.close(self.fd)


def possible_cpus() -> int:
    """The kernel's queue count: one per possible CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    return 1 + max(int(part.split("-")[-1]) for part in text.split(","))


# -- the session and the file system -------------------------------------------


class TinyOps:
    """/f: SIZE bytes, opened direct-io (each read reaches the daemon)."""

    def init(self) -> None:
        pass

    def forget(self, items: object) -> None:
        pass

    def _entry(self, ino: int) -> Entry:
        if ino == 1:
            return Entry(1, stat.S_IFDIR | 0o555, 0, 0, 0, 0, nlink=2, timeout=3600)
        return Entry(2, stat.S_IFREG | 0o444, SIZE, 0, 0, 0, timeout=3600)

    async def lookup(self, parent: int, name: bytes) -> Entry:
        if name != b"f":
            raise FUSEError(errno.ENOENT)
        return self._entry(2)

    async def getattr(self, ino: int) -> Entry:
        return self._entry(ino)

    async def open(self, ino: int, flags: int) -> Opened:
        return Opened(1, direct_io=True, noflush=True)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return DATA[offset : offset + size]

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, ino: int) -> Opened:
        return Opened(1)

    async def readdir(self, fh: int, offset: int, reply: DirReply) -> None:
        if offset == 0:
            reply.add(b"f", self._entry(2), 1)

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self) -> Statfs:
        raise FUSEError(errno.ENOSYS)

    def __getattr__(self, name: str) -> Any:  # every other operation: ENOSYS
        async def missing(*args: object) -> None:
            raise FUSEError(errno.ENOSYS)

        return missing


class RingSession(Session):
    """The native Session, answering through a FuseRing once INIT agreed to it."""

    def __init__(self, ops: Any, connection: Connection, coop: bool) -> None:
        super().__init__(ops, connection, passthrough=False)
        self.ring: FuseRing | None = None
        self._coop = coop
        self._commits: dict[int, tuple[int, int]] = {}  # unique -> (entry, commit_id)
        self._ended = False
        self._initing = False

    async def serve(self) -> None:
        request = await Session._read_request(self)  # INIT comes first
        assert request is not None and request[0] == abi.INIT
        body = request[4]
        flags = abi.INIT_IN.unpack_from(body)[3]
        flags |= U32.unpack_from(body, abi.INIT_IN.size)[0] << 32
        if not flags & OVER_IO_URING:
            raise RuntimeError("the kernel does not offer FUSE over io_uring")
        self._initing = True
        await self._answer(*request, trio.CancelScope())
        self._initing = False
        self.ring = FuseRing(self._fd, possible_cpus(), DEPTH, PAYLOAD, self._coop)
        self.ring.register()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._device)
            self._add_worker()

    async def _device(self) -> None:
        """FORGET and INTERRUPT still come through /dev/fuse; ENODEV ends the ring too."""
        while (request := await Session._read_request(self)) is not None:
            await self._answer(*request, trio.CancelScope())
        self._ended = True
        if self.ring is not None:
            trio.lowlevel.notify_closing(self.ring.fd)

    def stop(self) -> None:
        super().stop()
        if self.ring is not None:
            trio.lowlevel.notify_closing(self.ring.fd)

    async def _read_request(self) -> tuple[int, int, int, int, bytes] | None:
        ring = self.ring
        assert ring is not None
        while not self._ended:
            got = ring.reap()
            if got is None:
                try:
                    await trio.lowlevel.wait_readable(ring.fd)
                except trio.ClosedResourceError:
                    return None
                continue
            entry, res = got
            if res < 0:
                if -res in (errno.ENOTCONN, errno.ECANCELED):  # the connection or ring ends
                    self._ended = True
                    return None
                log.warning("ring entry %d lost: %s", entry, os.strerror(-res))
                continue
            commit_id, opcode, unique, nodeid, pid, body = ring.request(entry)
            self._commits[unique] = (entry, commit_id)
            return opcode, unique, nodeid, pid, body
        return None

    def _send(self, unique: int, error: int, payload: Payload) -> None:
        if self._initing:  # the INIT answer: say FUSE_OVER_IO_URING too
            out = bytearray(payload)
            U32.pack_into(out, INIT_OUT_FLAGS2, U32.unpack_from(out, INIT_OUT_FLAGS2)[0] | 1 << 9)
            payload = out
        commit = self._commits.pop(unique, None)
        if commit is None or self.ring is None:
            super()._send(unique, error, payload)
            return
        entry, commit_id = commit
        try:
            self.ring.answer(entry, unique, commit_id, error, payload)
            self.ring.submit()
        except OSError as e:
            log.error("cannot answer request %d: %s", unique, e)


# -- measuring -----------------------------------------------------------------

CLIENT = r"""
import os, sys, time
mode, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "read":
    fd = os.open(path, os.O_RDONLY)
    for i in range(n):
        os.pread(fd, 4096, (i * 4096) % (1 << 20))
    os.close(fd)
else:
    for i in range(n):
        os.close(os.open(path, os.O_RDONLY))
"""

CASES = [("pread 4k", "read", 1), ("open+close", "open", 1)]
CASES += [("pread 4k x8", "read", 8), ("open+close x8", "open", 8)]


async def _client(connection: Connection, mode: str, n: int, procs: int) -> float:
    """Seconds per operation over all client processes (wall time / operations).

    Past the deadline the connection ends first: a client waiting for an
    answer cannot be killed before.
    """
    argv = [sys.executable, "-c", CLIENT, mode, str(connection.mountpoint / "f"), str(n)]

    async def end(process: trio.Process) -> None:
        connection.close()
        process.kill()

    started = time.perf_counter()
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for _ in range(procs):
                nursery.start_soon(partial(trio.run_process, argv, deliver_cancel=end))
    return (time.perf_counter() - started) / (n * procs)


async def _round(ring: bool, coop: bool, n: int) -> dict[str, tuple[float, float]]:
    """{case: (µs per operation, daemon CPU µs per operation)} on one mount."""
    mnt = Path(tempfile.mkdtemp(prefix="fuseuring-"))
    figures = {}
    try:
        connection = await mount(mnt, "cachefs:/probe", "cachefs")
        ops = TinyOps()
        session = RingSession(ops, connection, coop) if ring else Session(ops, connection)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.serve)
                await _client(connection, "open", 50, 1)  # INIT, LOOKUP
                for case, mode, procs in CASES:
                    count = n if procs == 1 else n // 4
                    cpu = time.process_time()
                    per_op = await _client(connection, mode, count, procs)
                    cpu = (time.process_time() - cpu) / (count * procs)
                    figures[case] = (per_op * 1e6, cpu * 1e6)
                session.stop()
        finally:
            connection.close()
            if isinstance(session, RingSession) and session.ring is not None:
                session.ring.close()
    finally:
        os.rmdir(mnt)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", type=int, default=10000, help="operations per client")
    parser.add_argument("--only", choices=["devfuse", "uring"], help="one transport (to profile)")
    parser.add_argument(
        "--coop", action="store_true", help="ring with COOP_TASKRUN|TASKRUN_FLAG (no IPI)"
    )
    args = parser.parse_args()
    if os.geteuid() != 0 or platform.machine() != "x86_64" or not ENABLE_URING.exists():
        sys.exit("needs root, x86-64 and a kernel with CONFIG_FUSE_IO_URING")
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # restore enable_uring
    old = ENABLE_URING.read_text().strip()
    ENABLE_URING.write_text("Y")
    results: dict[str, dict[str, list[tuple[float, float]]]] = {"devfuse": {}, "uring": {}}
    try:
        for _ in range(args.rounds):
            for name in ("devfuse", "uring"):
                if args.only in (None, name):
                    figures = trio.run(_round, name == "uring", args.coop, args.n)
                    for case, fig in figures.items():
                        results[name].setdefault(case, []).append(fig)
    finally:
        ENABLE_URING.write_text(old)
    print(f"{'case':14} {'devfuse µs/op':>13} {'uring µs/op':>11} {'gain':>6}", end="")
    print(f" {'devfuse cpu µs':>14} {'uring cpu µs':>12}")
    for case, _, _ in CASES:
        d = results["devfuse"].get(case) or results["uring"][case]
        u = results["uring"].get(case) or d
        dt, ut = (statistics.median(f[0] for f in x) for x in (d, u))
        dc, uc = (statistics.median(f[1] for f in x) for x in (d, u))
        print(f"{case:14} {dt:13.1f} {ut:11.1f} {(dt - ut) / dt:6.0%} {dc:14.1f} {uc:12.1f}")


if __name__ == "__main__":
    main()
