"""The fetch buffers: page-aligned, reused from one fetch to the next.

A fresh buffer per fetch costs more than its bytes are worth: zeroed memory
the kernel must find and clear for every byte read.  Page alignment lets a
local source read straight into them (O_DIRECT), and huge pages let the
disk take such a read in few segments (see :mod:`cachefs._linux.hugepages`).

At most one buffer per fetch in flight is kept (fetches are bounded by the
fetch limiter); :meth:`Buffers.trim`, called periodically, gives them all
back once a whole period went by without a fetch.
"""

from __future__ import annotations

import mmap

from cachefs._linux.hugepages import anonymous


class Buffers:
    """Buffers of *size* bytes each, taken and given back by fetches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._taken = False

    def take(self) -> mmap.mmap:
        self._taken = True
        if self._free:
            return self._free.pop()
        return anonymous(self.size)

    def give(self, buf: mmap.mmap) -> None:
        """Only once nothing can write into *buf* any more."""
        self._free.append(buf)

    def trim(self) -> None:
        """Let the kept buffers go if none was taken since the last trim.

        Dropped, not closed: a view of one that a backend kept (a trace, a
        test) keeps it mapped until that view goes too.
        """
        if not self._taken:
            self._free.clear()
        self._taken = False

    @property
    def kept(self) -> int:
        return len(self._free)
