"""Hashing fetched blocks off the read path, at low priority.

With ``--verify once``, a block fetched from a source that publishes no
content information needs its SHA-256 only for later mounts (this process
trusts what it has just fetched).  Hashing it inline is a large share of
the cold read path's CPU, so such blocks are hashed afterwards, by one
thread at nice 19 that mostly runs while the cores would otherwise wait.

A file smaller than one block is hashed in the job that writes it
(miss/writer.py): for a small file a job of its own, and reading its bytes
back, cost more than the hash.

Until its hash is known a block is written to the index as absent
(``CachedFile.unhashed``): if the process ends first, a later mount fetches
it again; it never trusts a block without a hash.  The queue is bounded:
when it is full, blocks are hashed inline as before.  At unmount the
backlog is hashed before the last flush (and before any explicit one: pin,
reset), for at most ``DRAIN_SECONDS``; the periodic flush does not wait.

The hash is taken from the data file (the page cache, normally: read,
never mapped, see :func:`hash_run`), and a
block's hash is recorded only if the block still waits for this very run
(``CachedFile.unhashed`` maps each block to the run that stored it): an
eviction drops the block from there before it punches its space, and a
refetch makes it another run's, so it is the hash of the bytes that were
stored.  Other blocks of the file coming and going do not matter (a
file-wide counter of them, checked before, left a block unhashed, and
fetched again by the next mount, whenever four other blocks of its file
were evicted or failed their check while it waited).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass

import trio

from cachefs._linux.fileio import pread_into
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import DataFile
from cachefs.threads import Workers

log = logging.getLogger(__name__)

QUEUE = 64  # runs of blocks waiting (each at most one fetch: max_fetch bytes)
DRAIN_SECONDS = 30.0


@dataclass(eq=False)
class _Run:
    cf: CachedFile
    data: DataFile
    first: int
    count: int


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as e:  # not fatal: it just competes as an equal
        log.debug("cannot lower the hasher's priority: %s", e)


def hash_run(fd: int, start: int, end: int, block_size: int) -> list[bytes]:
    """SHA-256 of each block of bytes [start, end) of *fd* (the last may be short).

    Read, not mapped: a page the disk fails to read is then an OSError, where
    in a mapping it would kill the process (SIGBUS), and pages can leave the
    page cache while a thread at the lowest priority hashes.
    """
    buf = bytearray(end - start)
    view = memoryview(buf)
    if pread_into(fd, view, start) < len(buf):
        raise OSError("data file shorter than its blocks")
    return [
        hashlib.sha256(view[at : at + block_size]).digest()
        for at in range(0, len(view), block_size)
    ]


class Hasher:
    """Create inside trio; run :meth:`serve` in a nursery, :meth:`close` when done."""

    def __init__(self, catalog: Catalog, block_size: int, disk: CacheDisk) -> None:
        self._catalog = catalog
        self._block_size = block_size
        self._disk = disk
        self._send, self._recv = trio.open_memory_channel[_Run](QUEUE)
        self._reserved = 0
        self._thread = Workers(1, "cachefs-hasher", on_start=_lower_priority)
        self.backlog = 0  # blocks waiting for their hash
        self._progress = trio.lowlevel.ParkingLot()  # drain() waits here

    def reserve(self) -> bool:
        """Room for one more run?  Then it is held for :meth:`submit`."""
        if self._reserved >= QUEUE:
            return False
        self._reserved += 1
        return True

    def release(self) -> None:
        """Give back a reservation that will not be used."""
        self._reserved -= 1

    def submit(self, cf: CachedFile, first: int, count: int) -> None:
        """Blocks first..first+count-1 were stored unhashed (uses a reservation)."""
        assert cf.data is not None
        run = _Run(cf, cf.data, first, count)
        if cf.unhashed is None:
            cf.unhashed = {}
        for b in range(first, first + count):
            cf.unhashed[b] = run
        self.backlog += count
        self._send.send_nowait(run)

    async def serve(self) -> None:
        async for run in self._recv:
            try:
                await self._hash(run)
            finally:
                self._reserved -= 1

    async def drain(self) -> None:
        """Hash the backlog now (before an explicit flush), for at most DRAIN_SECONDS."""
        with trio.move_on_after(DRAIN_SECONDS):
            while self.backlog:
                try:
                    run = self._recv.receive_nowait()
                except trio.WouldBlock:  # the rest is being hashed by serve()
                    await self._progress.park()
                    continue
                try:
                    await self._hash(run, urgent=True)
                finally:
                    self._reserved -= 1
        if self.backlog:
            log.warning(
                "%d cached blocks not hashed in %g s: committed as absent for now",
                self.backlog,
                DRAIN_SECONDS,
            )

    async def _hash(self, run: _Run, urgent: bool = False) -> None:
        """Hash one run; *urgent* (a flush waits): at normal priority."""
        cf, data = run.cf, run.data
        blocks = range(run.first, run.first + run.count)
        try:
            if cf.retired or not self._waiting(run, blocks):
                return
            start, end = data.span(run.first, run.first + run.count - 1)
            fd = data.acquire()
            try:
                args = (fd, start, end, self._block_size)
                if urgent:
                    hashes = await trio.to_thread.run_sync(hash_run, *args)
                else:
                    hashes = await self._thread.run(hash_run, *args)
            finally:
                data.release()
            pending = cf.unhashed
            if cf.retired or pending is None:
                return
            mine = [b for b in blocks if pending.get(b) is run and cf.present[b]]
            if cf.content_hash is None:  # else the source's own hashes are the authority
                if cf.hashes is None:
                    cf.hashes = bytearray(32 * len(cf.present))
                for b in mine:
                    cf.hashes[32 * b : 32 * b + 32] = hashes[b - run.first]
            for b in mine:
                del pending[b]
            if not pending:
                cf.unhashed = None
            self._catalog.dirty.add(cf)
        except OSError as e:  # the blocks stay unhashed: absent for the next mount
            self._disk.failed(f"hashing cached blocks of {cf.file_id}", e)
        finally:
            self.backlog -= run.count
            self._progress.unpark_all()

    @staticmethod
    def _waiting(run: _Run, blocks: range) -> bool:
        """Does any block of *run* still wait for its hash from it?"""
        pending = run.cf.unhashed
        return pending is not None and any(pending.get(b) is run for b in blocks)

    def close(self) -> None:
        self._thread.close()
