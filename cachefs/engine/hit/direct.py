"""Large cache hits none of whose pages is cached: read O_DIRECT, and ahead of the reader.

Why they bypass the page cache: the kernel keeps what it replies in the
FUSE file's own pages, so the data file's pages would be a second copy of
the same bytes, filled by a copy of its own, in fresh memory.  And the data
file's readahead is not the reader's: it keeps the disk at a low queue
depth.  Read direct, each request is a disk read of its own into a
huge-page buffer (:mod:`cachefs._linux.hugepages`) lent to the reply, and
comes back when the reply is done with it.

Why ahead: the kernel asks for a sequential reader's next window only once
the reader is into the current one, so the disk, which answers a window's
requests together, would sit idle while they are replied to and copied.  A
handle reading sequentially therefore keeps AHEAD bytes past the furthest
request read too; a request for bytes already on their way waits for that
read.

Encrypted, the same reads bring the ciphertext, and the chunks' nonces and
tags come from the table after the data (through the page cache: 28 bytes
per 64 KiB); the chunks are opened in place, on the loop, as soon as the
disk is done (AES-GCM holds the GIL whatever thread runs it).  A chunk that
does not open fails its block, which is fetched again.

Every direct read of a handle, asked for or ahead, is a :class:`_Read` in
its stream until a request claims it; one that no request will claim
(the reader went elsewhere, or closed) gives its buffer back once the disk
is done with it.  A read whose blocks were evicted meanwhile is not
served (the caller fetches the blocks again); one of a version retired
meanwhile is, from the data file the handle holds.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import trio

from cachefs._linux.fileio import page_end
from cachefs._linux.hugepages import Slots
from cachefs._linux.pagecache import PAGE, cached_pages
from cachefs._linux.uring import Ring
from cachefs.engine.policy.content import Content
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import DataFile
from cachefs.threads import Workers

# Hits from this size up (page-aligned, none of their pages cached) are read
# O_DIRECT: sequential readers' requests (the kernel's FUSE readahead sends
# 128 KiB-1 MiB).  Smaller ones stay buffered, where kernel readahead helps.
DIRECT_MIN = 128 << 10
# Read past the furthest request of a sequential handle.
AHEAD = 8 << 20
# Buffers: the requests in flight (the kernel's readahead keeps about twice
# read_ahead_kb out), AHEAD, and replies being sent; each as large as a
# FUSE request gets.
SLOTS, SLOT_SIZE = 32, 1 << 20


class NotDirect:
    """What serve answers when a read cannot go this way: serve it another way."""


NOT_DIRECT: Final = NotDirect()


class _Read:
    """One direct read of [offset, offset + n) of *data* into *slot*.

    Its slot belongs to the request that claimed it, or, once it is
    dropped, goes back when the disk is done; until either, to the stream.
    """

    __slots__ = ("offset", "n", "slot", "data", "epoch", "done", "got", "bad", "error", "dropped")

    def __init__(self, offset: int, n: int, slot: int, data: DataFile, epoch: int) -> None:
        self.offset = offset
        self.n = n
        self.slot = slot
        self.data = data
        self.epoch = epoch
        self.done = trio.Event()
        self.got = 0
        self.bad: list[int] = []  # encrypted: chunks that did not open
        self.error: OSError | None = None
        self.dropped = False


class Stream:
    """A handle's direct reads not yet claimed, by offset, and how far they reach."""

    __slots__ = ("reads", "frontier")

    def __init__(self) -> None:
        self.reads: dict[int, _Read] = {}
        self.frontier = 0


class Handle(Protocol):
    """What the hit path keeps in an open handle (engine.OpenFile)."""

    #: The version's data file, held from the handle's first hit on.
    data: DataFile | None
    #: Its direct reads, once it made one.
    direct: Stream | None


class DirectReader:
    def __init__(
        self,
        catalog: Catalog,
        content: Content,
        block_size: int,
        ring: Ring | None,
        readers: Workers,
        read_buffered: Callable[[int, bytearray, int], Awaitable[int]],
        nursery: trio.Nursery,
    ) -> None:
        self._catalog = catalog
        self._content = content
        self._block_size = block_size
        self._ring = ring
        self._readers = readers
        self._read_buffered = read_buffered
        self._nursery = nursery
        self.slots = Slots(SLOT_SIZE, SLOTS)

    def wants(self, data: DataFile, n: int, offset: int, cached: int | None) -> bool:
        """Whether a hit of *n* bytes at *offset* of *data* with *cached* pages
        goes here; the caller knows its blocks need no check but their seal."""
        if cached != 0 or not DIRECT_MIN <= n <= self.slots.size or offset % _align(data):
            return False
        end = offset + n
        return data.key is None or end % data.chunk == 0 or end == data.size

    async def serve(
        self, fh: Handle, cf: CachedFile, offset: int, end: int, sequential: bool
    ) -> memoryview | NotDirect | None:
        """Bytes [offset, end) in a lent buffer; None as for HitReader.serve;
        NOT_DIRECT when this read cannot go this way (no free buffer, no O_DIRECT)."""
        data = fh.data
        assert data is not None
        n = end - offset
        stream = fh.direct
        if stream is None:
            stream = fh.direct = Stream()
        read = stream.reads.pop(offset, None)
        if read is not None and (read.n != n or read.data is not data):
            self._drop(read)
            read = None
        if not sequential:
            self.forget(fh)  # the reader went elsewhere: what was read ahead is not wanted
        if read is None:
            read = self._start(cf, data, offset, n)
            if read is None:
                return NOT_DIRECT
        if sequential:
            self._read_ahead(fh, stream, cf, data, end, n)
        lent = False
        try:
            await read.done.wait()
            if read.error is not None:
                if read.error.errno != errno.EINVAL:  # EINVAL: this file refuses direct reads
                    raise read.error
                data.refuse_direct(read.error)
                return NOT_DIRECT
            if cf.epoch != read.epoch:
                return None
            if read.got < n:
                self._catalog.lost(cf, offset, end)
                return None
            bs = self._block_size
            if read.bad:
                self._content.failed(cf, sorted({c * data.chunk // bs for c in read.bad}))
                return None
            self._catalog.touch(cf, offset // bs, (end - 1) // bs)
            lent = True
            return self.slots.lend(read.slot, n)
        finally:
            if not lent:
                self._drop(read)  # cancelled while the disk reads: not given back yet

    def forget(self, fh: Handle) -> None:
        """Drop what *fh* read ahead (closed, or reading elsewhere)."""
        stream = fh.direct
        if stream is not None:
            for read in stream.reads.values():
                self._drop(read)
            stream.reads.clear()
            stream.frontier = 0

    def _read_ahead(
        self, fh: Handle, stream: Stream, cf: CachedFile, data: DataFile, end: int, n: int
    ) -> None:
        """Start reads of n bytes each from the stream's frontier to AHEAD past *end*."""
        if n % _align(data):
            return  # the reads after this one would not start on a page (or chunk)
        bs = self._block_size
        fd = data.fd
        assert fd is not None
        pos = max(stream.frontier, end)
        stop = min(end + AHEAD, cf.size)
        while pos + n <= stop:
            first, last = pos // bs, (pos + n - 1) // bs
            if (
                pos in stream.reads
                or cf.present.find(0, first, last + 1) >= 0
                or not self._unchecked(cf, data, first, last)
                or cached_pages(fd, pos, n) != 0
            ):
                break  # not (all) in the cache, or not to be read this way
            read = self._start(cf, data, pos, n)
            if read is None:
                break  # no buffer free
            stream.reads[pos] = read
            pos += n
        stream.frontier = pos

    def _start(self, cf: CachedFile, data: DataFile, offset: int, n: int) -> _Read | None:
        """Start reading [offset, offset + n) of *data*; None if no buffer is free."""
        direct = data.direct_fd()
        if direct < 0:
            return None
        slot = self.slots.take()
        if slot is None:
            return None
        read = _Read(offset, n, slot, data, cf.epoch)
        data.acquire()  # the fds outlive a version change during the read
        self._nursery.start_soon(self._run, read, direct)
        return read

    def _unchecked(self, cf: CachedFile, data: DataFile, first: int, last: int) -> bool:
        """Whether blocks first..last need no check but (encrypted) their seal."""
        if data.key is None:
            return not self._content.must_check(cf, first, last)
        return self._content.to_check(cf, first, last) is None

    async def _run(self, read: _Read, fd: int) -> None:
        try:
            data = read.data
            # Whole pages: past the end of the file the read is just short.
            buf = self.slots.buffer(read.slot)[: page_end(read.n)]
            if data.key is None:
                read.got = await self._read_into(fd, buf, read.offset)
            else:
                assert data.fd is not None
                at, length = data.tags_of(read.offset, read.offset + read.n)
                tags = bytearray(length)
                have_tags = await self._read_buffered(data.fd, tags, at)
                read.got = await self._read_into(fd, buf, read.offset)
                read.bad = data.open_in_place(
                    buf[: read.n], read.offset, read.got, memoryview(tags)[:have_tags]
                )
        except OSError as e:
            read.error = e
        finally:
            read.data.release()
            read.done.set()
            if read.dropped:
                self.slots.give(read.slot)

    def _drop(self, read: _Read) -> None:
        """Nobody will lend *read*'s buffer: it comes back once the disk is done with it."""
        read.dropped = True
        if read.done.is_set():
            self.slots.give(read.slot)

    async def _read_into(self, fd: int, buf: memoryview, offset: int) -> int:
        """Fill *buf* from *offset* of the O_DIRECT *fd*, through the ring or a
        reader thread; fewer bytes only at the end of the file."""
        ring = self._ring
        done = 0
        while done < len(buf):
            if ring is not None and ring.usable:
                try:
                    n = await ring.read_into(fd, buf[done:], offset + done)
                except OSError:
                    if ring.broken is None:
                        raise  # the read's own error
                    continue  # the ring broke: the rest through threads
            else:
                n = await self._readers.run(os.preadv, fd, [buf[done:]], offset + done)
            done += n
            # Stopping off a page boundary is the end of the file; asking
            # again from there would be an unaligned read, refused.
            if n == 0 or done % PAGE:
                break
        return done


def _align(data: DataFile) -> int:
    """What a direct read of *data* starts on: a page, and, encrypted, a chunk."""
    return PAGE if data.key is None else max(PAGE, data.chunk)
