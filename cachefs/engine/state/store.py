"""Block bytes on disk: one sparse data file per cached file version.

Block ``i`` lives at offset ``i * block_size`` of ``data/<row id>``; a block
that was never written is a hole and reads as zeros.  Encrypted, each block
is sealed in chunks of 64 KiB (AES-GCM; the associated data binds the row,
the version and the chunk's index in the file, hence its block and place).
The ciphertext lies where the plain bytes would (blocks stay page-aligned and
an evicted block's space is given back whole); each chunk's nonce and tag,
28 bytes, go in a table after the data, from the first page boundary past
``size``.  The hit path preads a kept-open fd on the trio loop (the measured
exception to "no blocking I/O on the loop"); writes and syncs run in worker
threads, and an fd is closed only when no thread uses it, so a number is
never reused under a writer.  A file no one holds open is opened, written
(or synced) and closed in one worker job: a cold small file costs the loop
no syscall for its data file.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Callable, Collection
from functools import partial
from typing import TypeVar

import trio

from cachefs._linux import fileio
from cachefs._linux.fileio import page_end, pread_into, punch_holes
from cachefs._linux.pagecache import open_direct
from cachefs.engine.state.crypto import NONCE_SIZE, OVERHEAD, TAG_SIZE, CacheKey

# What sealing adds to a chunk (nonce, then GCM tag): kept in the tag table.
NONCE, TAG = NONCE_SIZE, TAG_SIZE
# A block hash not known (or, to read_blocks, not to be checked).
NO_HASH = bytes(32)
# Encrypted blocks are sealed in chunks of this size (or the block size if
# smaller): a small read opens one chunk, not a whole block.
CHUNK = 64 << 10
# Encrypted blocks are written this much ciphertext at a time.
SEAL_RUN = 1 << 20

log = logging.getLogger(__name__)

T = TypeVar("T")


class DataFile:
    """One version's data file.  ``users`` counts holders of the fd.

    ``size`` is the source file's size; ``disk_size`` what the data file
    measures (more when blocks are sealed).
    """

    __slots__ = (
        "path",
        "size",
        "fd",
        "direct",
        "direct_refused",
        "users",
        "retired",
        "unlinked",
        "remade",
        "written",
        "block_size",
        "chunk",
        "tags_at",
        "disk_size",
        "key",
        "row_id",
        "version",
    )

    def __init__(
        self,
        path: str,
        size: int,
        block_size: int,
        key: CacheKey | None = None,
        row_id: int = 0,
        version: str = "",
    ) -> None:
        self.path = path
        self.size = size
        self.fd: int | None = None
        # The same file opened O_DIRECT, once asked for (hits that bypass the
        # page cache); closed with fd, as threads may be reading through it.
        self.direct = -1
        self.direct_refused = False
        self.users = 0
        self.retired = False
        self.unlinked = False
        self.remade: int | None = None
        # Blocks were written to it (in this mount, or before: the index says so).
        self.written = False
        self.block_size = block_size
        self.key = key
        self.row_id = row_id
        self.version = version
        self.chunk = min(block_size, CHUNK)
        self.tags_at = page_end(size)
        self.disk_size = size
        if key is not None:
            self.disk_size = self.tags_at + -(-size // self.chunk) * OVERHEAD

    def span(self, first: int, last: int) -> tuple[int, int]:
        """Where the bytes of blocks first..last lie in the data file: (start, end)."""
        return first * self.block_size, min((last + 1) * self.block_size, self.size)

    def acquire(self) -> int:
        """Open (creating a sparse file of the full size) and hold the fd.

        ``remade`` is set when a file that was ``written`` was not there at
        its full size (made anew, or cut short by someone): where what it
        was said to hold is gone from (0: all of it).
        On a read-only cache filesystem the file is opened for reading.
        FileNotFoundError once unlinked and closed: a file made anew would
        read as zeros where blocks are marked present.
        """
        if self.fd is None:
            if self.unlinked:
                raise FileNotFoundError(f"cache data file {self.path} was retired")
            fd, found = self._open_sized()
            self._note_found(found, self.written)
            self.fd = fd
        self.users += 1
        return self.fd

    def _open_sized(self) -> tuple[int, int]:
        """Open the file (creating it) and give it its full size.  Blocking.

        Returns the fd and the size the file had (-1 if not known).
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        found = -1
        try:
            found = os.fstat(fd).st_size
            if found != self.disk_size:
                os.ftruncate(fd, self.disk_size)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EBADF, errno.EINVAL):
                os.close(fd)
                raise
        except BaseException:
            os.close(fd)
            raise
        return fd, found

    def _note_found(self, found: int, written: bool) -> None:
        """The file was found *found* bytes long; *written*: it was said to hold blocks."""
        if found >= 0 and found != self.disk_size and written:  # else it is simply new
            # Encrypted, the seals lie after the data: all gone.
            cut = found if self.key is None else 0
            self.remade = cut if self.remade is None else min(cut, self.remade)

    async def _in_own_job(self, work: Callable[[int], T], limiter: trio.CapacityLimiter) -> T:
        """``work(fd)`` in a worker thread, on an fd that the same job opens
        (as :meth:`acquire` does) and closes: for a file no one holds open,
        this costs the loop no syscall.  Only for a file that holds no block
        yet (nothing it holds can be found gone).  A file retired meanwhile
        is removed again (the job may have made it anew after :meth:`unlink`)."""

        def job() -> T:
            fd, _ = self._open_sized()
            try:
                return work(fd)
            finally:
                os.close(fd)

        try:
            return await trio.to_thread.run_sync(job, limiter=limiter)
        finally:
            if self.unlinked:
                self._remove()

    def _sync_as_it_is(self) -> int:
        """fdatasync the file by its path, never making it anew nor resizing
        it; the size found (0: gone), synced only if the full size.  Blocking."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            size = os.fstat(fd).st_size
            if size == self.disk_size:
                os.fdatasync(fd)
            return size
        finally:
            os.close(fd)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.fd is not None:
            os.close(self.fd)
            self.fd = None
            if self.direct >= 0:
                os.close(self.direct)
                self.direct = -1

    def direct_fd(self) -> int:
        """The held fd's file opened again with O_DIRECT; negative if refused."""
        assert self.fd is not None
        if self.direct < 0 and not self.direct_refused:
            try:
                self.direct = open_direct(self.fd)
            except OSError as e:  # a filesystem without O_DIRECT, no /proc
                self.refuse_direct(e)
        return -1 if self.direct_refused else self.direct

    def refuse_direct(self, why: OSError) -> None:
        """Direct reads of this file fail (EINVAL, say): read it through the page cache."""
        if not self.direct_refused:
            log.info("cache data file %s: no direct reads: %s", self.path, why)
            self.direct_refused = True

    def retire(self) -> None:
        """No more blocks of this version are written, punched or synced;
        those written stay readable until :meth:`unlink`."""
        self.retired = True

    def unlink(self) -> None:
        """Remove the file (its fd, if held, stays readable until released).

        Never raises: a cache filesystem that refuses leaves the file to the
        next mount's check, which removes data files without a row.
        """
        if not self.unlinked:
            self.unlinked = True
            self._remove()

    def _remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cannot remove cache data file %s: %s", self.path, e)

    async def write_blocks(
        self,
        first: int,
        data: memoryview,
        expected: bytes | None,
        hash_them: bool,
        limiter: trio.CapacityLimiter,
    ) -> tuple[list[bytes], int]:
        """Check and store whole blocks from block *first* (the file's last may be short).

        With *hash_them*, each block's SHA-256 is computed and, where
        *expected* (32 bytes per block, zeros for unknown) knows it,
        compared: storing stops before the first block that does not
        match.  Returns the hashes of the blocks stored (empty without
        *hash_them*) and how many bytes were stored.
        """
        if self.retired:  # its bytes are no longer wanted; do not recreate the file
            return [], 0
        if self.fd is None and not self.unlinked and not self.written:
            # Only while it holds no block: a file said to hold some is
            # opened on the loop (acquire), so that one found gone or cut
            # short is known as remade before any reader opens it again.
            # Set only once written: a reader opening the file meanwhile
            # may find it still short, and must not take it for cut short.
            try:
                return await self._in_own_job(
                    partial(
                        self._write_blocks,
                        first=first,
                        data=data,
                        expected=expected,
                        hash_them=hash_them,
                    ),
                    limiter,
                )
            finally:
                self.written = True
        fd = self.acquire()
        try:
            self.written = True
            return await trio.to_thread.run_sync(
                partial(
                    self._write_blocks,
                    fd,
                    first=first,
                    data=data,
                    expected=expected,
                    hash_them=hash_them,
                ),
                limiter=limiter,
            )
        finally:
            self.release()

    def _write_blocks(
        self, fd: int, *, first: int, data: memoryview, expected: bytes | None, hash_them: bool
    ) -> tuple[list[bytes], int]:
        bs = self.block_size
        hashes: list[bytes] = []
        good = len(data)
        if hash_them:
            for i, at in enumerate(range(0, len(data), bs)):
                h = hashlib.sha256(data[at : at + bs]).digest()
                want = None if expected is None else expected[32 * i : 32 * i + 32]
                if want and want != NO_HASH and want != h:
                    good = at
                    break
                hashes.append(h)
        key = self.key
        if key is None:
            fileio.pwrite_all(fd, data[:good], first * bs)
        else:
            # Sealed chunk by chunk; the ciphertext is written a SEAL_RUN at a
            # time, then the nonces and tags in one write: a buffer as large
            # as the whole fetch would stay in the allocator's arenas, one per
            # writer thread.
            chunk = self.chunk
            run = max(chunk, SEAL_RUN // chunk * chunk)
            cipher = bytearray(min(run, good))
            tags = bytearray(-(-good // chunk) * OVERHEAD)
            first_chunk = first * bs // chunk
            for start in range(0, good, run):
                stop = min(start + run, good)
                for at in range(start, stop, chunk):
                    i = at // chunk
                    plain = data[at : min(at + chunk, stop)]
                    sealed = memoryview(
                        key.seal_block(self.row_id, self.version, first_chunk + i, plain)
                    )
                    cipher[at - start : at - start + len(plain)] = sealed[NONCE:-TAG]
                    tags[i * OVERHEAD : i * OVERHEAD + NONCE] = sealed[:NONCE]
                    tags[i * OVERHEAD + NONCE : (i + 1) * OVERHEAD] = sealed[-TAG:]
                fileio.pwrite_all(fd, memoryview(cipher)[: stop - start], first * bs + start)
            fileio.pwrite_all(fd, memoryview(tags), self.tags_at + first_chunk * OVERHEAD)
        return hashes, good

    def read_blocks(
        self, fd: int, first: int, last: int, expected: bytes | None
    ) -> tuple[bytearray, list[int]]:
        """Blocks first..last as plain bytes, and the blocks that failed their check.

        Blocking (run it in a thread).  A block fails when its seal does not
        open (encrypted), when it is short on disk, or when *expected* (32
        bytes per block, zeros for "do not check") has a hash it does not
        match.  Failed blocks read as zeros in the result.
        """
        bs = self.block_size
        start, stop = first * bs, min((last + 1) * bs, self.size)
        out = bytearray(stop - start)
        view = memoryview(out)
        bad: list[int] = []
        key = self.key
        if key is None:
            got = pread_into(fd, view, start)
            for b in range(first, last + 1):
                if b * bs + min(bs, self.size - b * bs) > start + got:
                    bad.append(b)
        else:
            for c in self._open_chunks(fd, start, stop, view):
                bad.append(c * self.chunk // bs)
        if expected is not None:
            for b in range(first, last + 1):
                i = b - first
                want = expected[32 * i : 32 * i + 32]
                if want == NO_HASH or b in bad:
                    continue
                block = view[b * bs - start : min((b + 1) * bs, stop) - start]
                if hashlib.sha256(block).digest() != want:
                    bad.append(b)
        return out, sorted(set(bad))

    def _open_chunks(self, fd: int, start: int, stop: int, view: memoryview) -> list[int]:
        """Decrypt the chunks of [start, stop) (chunk-aligned) into *view*; the failed ones."""
        at, length = self.tags_of(start, stop)
        tags = bytearray(length)
        got = pread_into(fd, memoryview(tags), at)
        # The ciphertext lies where the plain bytes go: one read for all of it.
        have = pread_into(fd, view[: stop - start], start)
        return self.open_in_place(view[: stop - start], start, have, memoryview(tags)[:got])

    def tags_of(self, start: int, stop: int) -> tuple[int, int]:
        """Where the nonces and tags of the chunks of [start, stop) lie: (offset, length)."""
        first, last = start // self.chunk, (stop - 1) // self.chunk
        return self.tags_at + first * OVERHEAD, (last - first + 1) * OVERHEAD

    def open_in_place(self, view: memoryview, start: int, have: int, tags: memoryview) -> list[int]:
        """Decrypt, in place, the ciphertext of the chunks *view* holds from *start*
        (chunk-aligned; the view ends on a chunk or at the end of the file).

        Only *have* bytes of it were read, and *tags* holds the chunks' nonces
        and tags as far as they were read.  Returns the chunks that failed
        (short, or not authentic): their bytes in *view* are not plain text.
        """
        key = self.key
        assert key is not None
        chunk = self.chunk
        first = start // chunk
        size = len(view)
        body = memoryview(bytearray(min(chunk, size) + TAG))  # one chunk's ciphertext, its tag
        failed = []
        for at in range(0, size, chunk):
            c = first + at // chunk
            n = min(chunk, size - at)
            t = at // chunk * OVERHEAD
            if len(tags) < t + OVERHEAD or have < at + n:
                failed.append(c)
                continue
            record = body[: n + TAG]
            record[:n] = view[at : at + n]
            record[n:] = tags[t + NONCE : t + OVERHEAD]
            nonce = tags[t : t + NONCE]
            if not key.open_chunk_into(
                self.row_id, self.version, c, nonce, record, view[at : at + n]
            ):
                failed.append(c)
        return failed

    def open_chunk(self, c: int, body: bytearray, tags: bytes | bytearray) -> bytes | None:
        """Chunk *c* as plain bytes, from *body* (its ciphertext as read) and
        *tags* (its nonce and tag as read); None when short or not authentic.

        *body* is the chunk's ciphertext, read whole: its tag is appended to
        it here, saving a copy of the chunk.
        """
        key = self.key
        assert key is not None
        n = min(self.chunk, self.size - c * self.chunk)
        if len(body) != n or len(tags) < OVERHEAD:
            return None
        body += tags[NONCE:OVERHEAD]
        return key.open_chunk(self.row_id, self.version, c, tags[:NONCE], body)

    async def punch(self, ranges: list[tuple[int, int]], limiter: trio.CapacityLimiter) -> None:
        """Give the space of (offset, length) *ranges* back to the filesystem."""
        if self.retired:
            return
        fd = self.acquire()
        try:
            await trio.to_thread.run_sync(punch_holes, fd, ranges, limiter=limiter)
        finally:
            self.release()

    async def sync(self, limiter: trio.CapacityLimiter) -> bool:
        """fdatasync; SyncFailed if the disk did not keep what was written.
        False if, not held, the file was found gone or cut short (noted in
        ``remade``: its blocks are not to be read)."""
        done: list[DataFile] = []
        await sync_files([self], limiter, done.append)
        return bool(done)


#: A commit syncs its data files in at most this many worker jobs at once.
SYNC_JOBS = 4


async def sync_files(
    files: Collection[DataFile],
    limiter: trio.CapacityLimiter,
    on_synced: Callable[[DataFile], None] | None = None,
) -> None:
    """fdatasync each of *files*, in at most SYNC_JOBS worker jobs rather than
    one thread hop per file: a commit of thousands of small files costs a few.

    *on_synced(data)* runs in the trio thread as soon as that file is synced
    (a retired one needs none).  SyncFailed for a file whose sync failed: the
    files after it in its job are not synced.
    """
    todo = []
    for data in files:
        if data.retired:
            if on_synced is not None:
                on_synced(data)
        else:
            todo.append(data)
    if not todo:
        return
    n = -(-len(todo) // SYNC_JOBS)
    batches = [todo[i : i + n] for i in range(0, len(todo), n)]
    failed: list[tuple[DataFile, OSError]] = []
    if len(batches) == 1:
        await _sync_batch(batches[0], limiter, on_synced, failed)
    else:
        async with trio.open_nursery() as nursery:
            for batch in batches:
                nursery.start_soon(_sync_batch, batch, limiter, on_synced, failed)
    if failed:
        data, e = failed[0]
        raise SyncFailed(e.errno, f"syncing {data.path}: {e.strerror}") from e


async def _sync_batch(
    batch: list[DataFile],
    limiter: trio.CapacityLimiter,
    on_synced: Callable[[DataFile], None] | None,
    failed: list[tuple[DataFile, OSError]],
) -> None:
    """Sync *batch* in one worker job, in order, up to the first failure (added to *failed*).

    A held fd is synced as it is; a file no one holds is opened, synced and
    closed in the job, as it is: never made anew nor resized there, so one
    found gone or cut short counts as not synced (its blocks stay unsynced)
    and is noted remade after the job, as :meth:`DataFile.acquire` would."""
    token = trio.lowlevel.current_trio_token()
    jobs: list[tuple[DataFile, int | None, bool]] = []  # data, held fd, written
    error: tuple[DataFile, OSError] | None = None
    for data in batch:
        if data.fd is None and not data.unlinked:
            jobs.append((data, None, data.written))
            continue
        try:
            jobs.append((data, data.acquire(), data.written))
        except OSError as e:
            error = (data, e)
            break

    def job() -> tuple[list[int], tuple[DataFile, OSError] | None]:
        found = []  # the size of each file opened here (-1: held)
        for data, fd, _ in jobs:
            try:
                if fd is None:
                    size = data._sync_as_it_is()
                    found.append(size)
                    if size != data.disk_size:
                        continue
                else:
                    found.append(-1)
                    os.fdatasync(fd)
            except OSError as e:
                return found, (data, e)
            if on_synced is not None:
                token.run_sync_soon(on_synced, data)
        return found, None

    try:
        found, job_error = await trio.to_thread.run_sync(job, limiter=limiter)
    finally:
        for data, fd, _ in jobs:
            if fd is not None:
                data.release()
    for (data, _, written), size in zip(jobs, found, strict=False):  # up to a failure
        data._note_found(size, written)
    error = job_error or error
    if error is not None:
        failed.append(error)


class SyncFailed(OSError):
    """A data file's sync failed: whatever errno (ENOSPC too, on thin
    storage), writes since the last good sync may be lost (the kernel
    reports a failed writeback once, then forgets it)."""
