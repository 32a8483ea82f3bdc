"""Serving present blocks from the data files: the hit path.

Plain and already checked, a hit is one read: a large one whose pages are
all in the page cache is handed over as a view of the mapped data file (see
:mod:`cachefs._linux.mapped`); a large one none of whose pages is there is
read by the disk straight into a lent buffer, and ahead of a sequential
reader (see :mod:`cachefs.engine.hit.direct`); otherwise it is read on the trio
loop when the page cache holds the bytes (RWF_NOWAIT), else through
io_uring (see :mod:`cachefs._linux.uring`) or, where there is none, in a
reader thread; either way readers of the cache disk run in parallel.
Not yet checked in this process, whole blocks are opened (encrypted) and
checked against their hashes in a reader thread first; encrypted with
nothing to check but the seals, only the 64 KiB chunks read are opened, on
the loop, once read like any hit.  A block that fails is dropped.
Encrypted with nothing to check but the seals, a large read none of whose
pages is cached goes direct too, its chunks opened in the buffer they were
read into.
"""

from __future__ import annotations

import trio

from cachefs._linux.fileio import pread_into, read_nowait
from cachefs._linux.mapped import MAP_MIN, map_range
from cachefs._linux.pagecache import cached_pages, pages_in
from cachefs._linux.uring import Ring
from cachefs.engine.hit.direct import DIRECT_MIN, DirectReader, Handle, NotDirect
from cachefs.engine.policy.content import Content
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import DataFile
from cachefs.threads import Workers


class HitReader:
    """Serves present blocks; :meth:`close` when the cache closes (its threads)."""

    def __init__(
        self,
        catalog: Catalog,
        content: Content,
        block_size: int,
        ring: Ring | None,
        nursery: trio.Nursery,
        disk: CacheDisk,
        disk_limiter: trio.CapacityLimiter,
    ) -> None:
        self._catalog = catalog
        self._content = content
        self._disk = disk
        self._disk_limiter = disk_limiter
        self._block_size = block_size
        self._readers = Workers(8, "cachefs-reader")
        self._ring = ring
        self.direct = DirectReader(
            catalog, content, block_size, ring, self._readers, self._read_buffered, nursery
        )

    @property
    def disk_reads(self) -> str:
        """How hits that miss the page cache reach the cache disk: io_uring or threads."""
        ring = self._ring
        return "io_uring" if ring is not None and ring.usable else "threads"

    def close(self) -> None:
        self._readers.close()

    def trim(self) -> None:
        """Let the direct-read buffers go if a whole period went by without one."""
        self.direct.slots.trim()

    def forget(self, fh: Handle) -> None:
        """*fh* is closed: drop what was read ahead for it."""
        self.direct.forget(fh)

    def _fd(self, fh: Handle, cf: CachedFile) -> int | None:
        """The fd of *fh*'s data file, held by the handle from its first hit
        on; None if the file lost what it held (its blocks are fetched again)."""
        data = fh.data
        if data is None:
            epoch = cf.epoch
            self._catalog.hold_data(cf)
            data = fh.data = cf.data
            assert data is not None
            if cf.epoch != epoch:
                return None
        assert data.fd is not None
        return data.fd

    async def serve(
        self, fh: Handle, cf: CachedFile, offset: int, end: int, sequential: bool = False
    ) -> bytearray | memoryview | None:
        """Bytes [offset, end) of present blocks from the data file, or None.

        Data in the page cache is served without blocking the loop (large
        reads as a view of the mapped file, to be used before the next
        await); what is only on disk goes through the ring or a reader
        thread (large reads into a lent buffer, held as long as the view).
        None means the blocks are gone (evicted meanwhile, or lost from the
        data file), or the cache disk failed to read them (latched): the
        caller fetches them.
        """
        try:
            return await self._serve(fh, cf, offset, end, sequential)
        except OSError as e:
            self._disk.failed(f"reading cached blocks of {cf.file_id}", e)
            if self._disk.counts(e):  # they are fetched (and stored) anew
                bs = self._block_size
                self._catalog.forget_blocks(cf, offset // bs, (end - 1) // bs)
            return None

    async def _serve(
        self, fh: Handle, cf: CachedFile, offset: int, end: int, sequential: bool
    ) -> bytearray | memoryview | None:
        bs = self._block_size
        first, last = offset // bs, (end - 1) // bs
        if self._content.must_check(cf, first, last):
            return await self._serve_checked(fh, cf, offset, end, sequential)
        n = end - offset
        fd = self._fd(fh, cf)
        if fd is None:
            return None
        data = fh.data
        assert data is not None
        if n >= MAP_MIN and data.key is None:
            cached = cached_pages(fd, offset, n)
            if cached is not None and cached >= pages_in(offset, n):
                view = map_range(fd, offset, end)
                if view is not None:
                    self._catalog.touch(cf, first, last)
                    return view
            elif self.direct.wants(data, n, offset, cached):
                if not await self._synced(cf, first, last):
                    return None
                lent = await self.direct.serve(fh, cf, offset, end, sequential)
                if not isinstance(lent, NotDirect):
                    return lent
        buf = bytearray(n)
        # With disk reads already in flight, the page cache is likely cold:
        # straight to the ring's kernel workers, keeping the disk's submission
        # cost off the loop.  Alone, a read tries the page cache first and is
        # issued inline: lower latency.
        ring = self._ring
        offload = ring is not None and ring.usable and ring.in_flight > 0
        got = 0 if offload else read_nowait(fd, buf, offset)
        if got < n:
            if not await self._synced(cf, first, last):
                return None
            epoch, data = cf.epoch, cf.data
            assert data is not None
            data.acquire()  # the fd outlives a version change during the read
            try:
                got += await self._read_disk(fd, buf, got, offset, offload)
            finally:
                data.release()
            if cf.epoch != epoch:
                return None
        if got < n:
            self._catalog.lost(cf, offset, end)
            return None
        self._catalog.touch(cf, first, last)
        return buf

    async def _synced(self, cf: CachedFile, first: int, last: int) -> bool:
        """Before blocks first..last are read back from the disk (not from the
        page cache): if any was written since the data file was last synced,
        sync it now.  A writeback the disk failed leaves pages that read back
        as holes, and only a sync tells; OSError then (the caller latches).
        False if the blocks are no longer all present afterwards."""
        pending = cf.unsynced
        data = cf.data
        if not pending or data is None or pending.isdisjoint(range(first, last + 1)):
            return True
        before = set(pending)
        if not await data.sync(self._disk_limiter):
            return False
        pending -= before  # on disk now (what was marked meanwhile is not)
        return cf.present.find(0, first, last + 1) < 0

    async def _read_disk(
        self, fd: int, buf: bytearray, got: int, offset: int, offload: bool
    ) -> int:
        """Fill buf[got:] from offset + got on the cache disk; how many bytes came."""
        ring = self._ring
        if ring is not None and ring.usable:
            try:
                if got == 0:
                    return await ring.pread(fd, buf, offset, offload)
                rest = bytearray(len(buf) - got)
                n = await ring.pread(fd, rest, offset + got, offload)
                buf[got : got + n] = rest[:n]
                return n
            except OSError:
                if ring.broken is None:
                    raise  # the read's own error
        return await self._readers.run(pread_into, fd, memoryview(buf)[got:], offset + got)

    async def _read_buffered(self, fd: int, buf: bytearray, offset: int) -> int:
        """Fill *buf* from *offset* of *fd* through the page cache; fewer bytes at the end."""
        got = read_nowait(fd, buf, offset)
        if got < len(buf):
            got += await self._read_disk(fd, buf, got, offset, False)
        return got

    async def _serve_checked(
        self, fh: Handle, cf: CachedFile, offset: int, end: int, sequential: bool
    ) -> bytearray | memoryview | None:
        """Like serve, reading whole blocks: opened (encrypted) and checked, or None.

        Encrypted with nothing to check but the seals, a large read none of
        whose pages is cached goes direct (the chunks are opened on the loop).
        """
        bs = self._block_size
        first, last = offset // bs, (end - 1) // bs
        expected = self._content.to_check(cf, first, last)
        fd = self._fd(fh, cf)
        if fd is None:
            return None
        epoch, data = cf.epoch, cf.data
        assert data is not None
        if expected is None and data.key is not None and end - offset >= DIRECT_MIN:
            n = end - offset
            if self.direct.wants(data, n, offset, cached_pages(fd, offset, n)):
                if not await self._synced(cf, first, last):
                    return None
                lent = await self.direct.serve(fh, cf, offset, end, sequential)
                if not isinstance(lent, NotDirect):
                    return lent
        if not await self._synced(cf, first, last):
            return None
        data.acquire()
        try:
            if expected is None and data.key is not None:  # open only what is read
                buf, bad = await self._open_range(data, fd, offset, end)
                lo = 0
            else:
                buf, bad = await self._readers.run(data.read_blocks, fd, first, last, expected)
                lo = offset - first * bs
        finally:
            data.release()
        if cf.epoch != epoch:
            return None
        if bad:
            self._content.failed(cf, bad)
            return None
        self._content.passed(cf, first, last)
        self._catalog.touch(cf, first, last)
        if lo == 0 and end - offset == len(buf):
            return buf
        return buf[lo : lo + end - offset]

    async def _open_range(
        self, data: DataFile, fd: int, offset: int, end: int
    ) -> tuple[bytearray | memoryview, list[int]]:
        """Encrypted: bytes [offset, end), opening only the chunks they lie in,
        and the blocks with a chunk that failed.

        The chunks and their seals are read as any hit is (the page cache
        without blocking, else the ring or a reader thread) and opened here,
        on the loop: a chunk opens in microseconds, and AES-GCM would hold
        the GIL in a thread anyway, with a thread hop and a lock hand-over on
        top.
        """
        chunk, bs = data.chunk, self._block_size
        start = offset // chunk * chunk
        stop = min(-(-end // chunk) * chunk, data.size)
        at, length = data.tags_of(start, stop)
        tags = bytearray(length)
        have_tags = await self._read_buffered(fd, tags, at)
        buf = bytearray(stop - start)
        got = await self._read_buffered(fd, buf, start)
        if stop - start <= chunk:  # one chunk (a small read): opened with a copy less
            c = start // chunk
            plain = data.open_chunk(c, buf, tags[:have_tags]) if got == len(buf) else None
            if plain is None:
                return bytearray(), [c * chunk // bs]
            return memoryview(plain)[offset - start : end - start], []
        failed = data.open_in_place(memoryview(buf), start, got, memoryview(tags)[:have_tags])
        bad = sorted({c * chunk // bs for c in failed})
        if offset == start and end == stop:
            return buf, bad
        return buf[offset - start : end - start], bad
