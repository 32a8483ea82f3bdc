"""Memory the disk writes into itself (O_DIRECT reads): in huge pages where the kernel gives them.

A direct read is handed to the disk as one segment per physically
contiguous piece of its buffer: in 4 KiB pages a 1 MiB read is 256 of
them.  A virtio disk without indirect descriptors (the Firecracker VMs the
benchmarks run on have none) then holds one such request at a time and
requeues the next until it is done (every block request issued twice).
In 2 MiB pages the same read is one segment and several are in flight.

MADV_HUGEPAGE asks for them where transparent huge pages are "madvise" or
"always".  Where they are "never", or no 2 MiB page is free, the kernel
gives small pages: slower, the same bytes.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import weakref

log = logging.getLogger(__name__)

HUGE = 2 << 20


def anonymous(size: int) -> mmap.mmap:
    """A private anonymous mapping of *size* bytes, in huge pages where the kernel will.

    Linux 6.7 and later start a mapping whose size is a multiple of 2 MiB on
    a 2 MiB boundary, so all of it can be huge pages; on older kernels the
    2 MiB stretches that happen to be aligned are.
    """
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= HUGE and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError as e:  # a kernel built without transparent huge pages
            log.debug("no huge pages for read buffers: %s", e)
    return m


class Slots:
    """*count* buffers of *size* bytes each, cut from one mapping made on first use.

    A slot is taken for a read and either given back (the read failed) or
    lent out as a view (:meth:`lend`).  A lent slot comes back when the last
    view of it is gone, whoever holds it and however it was sliced: every
    such view refers to one ctypes array made for the loan, and a finalizer
    on that array returns the slot.  So no read ever lands in bytes a reply
    or a caller still points at.
    """

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self.count = count
        self._map: mmap.mmap | None = None
        self._free: list[int] = []
        self._used = False  # taken since the last trim

    def take(self) -> int | None:
        """A free slot, or None when all are lent or being read into."""
        if self._map is None:
            self._map = anonymous(self.size * self.count)
            self._free = list(range(self.count - 1, -1, -1))
        self._used = True
        return self._free.pop() if self._free else None

    def buffer(self, slot: int) -> memoryview:
        """The whole of *slot*, writable: what a read fills."""
        assert self._map is not None
        start = slot * self.size
        return memoryview(self._map)[start : start + self.size]

    def give(self, slot: int) -> None:
        """*slot* was never lent: free again now."""
        self._free.append(slot)

    def lend(self, slot: int, n: int) -> memoryview:
        """The first *n* bytes of *slot*, read-only; the slot is free once they are dropped."""
        assert self._map is not None and n <= self.size
        loan = (ctypes.c_char * n).from_buffer(self._map, slot * self.size)
        done = weakref.finalize(loan, self._free.append, slot)
        done.atexit = False
        return memoryview(loan).cast("B").toreadonly()

    def trim(self) -> None:
        """Let the mapping go if no slot was taken since the last trim and none is out."""
        if not self._used and self._map is not None and len(self._free) == self.count:
            self._map = None  # unmapped once nothing refers to it
            self._free = []
        self._used = False

    @property
    def mapped(self) -> bool:
        return self._map is not None

    @property
    def out(self) -> int:
        """Slots lent or being read into."""
        return self.count - len(self._free) if self._map is not None else 0
