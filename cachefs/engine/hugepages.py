"""Memory the disk writes into itself (O_DIRECT reads): in huge pages where the kernel gives them.

A direct read is handed to the disk as one segment per physically
contiguous piece of its buffer: in 4 KiB pages a 1 MiB read is 256 of
them.  A virtio disk without indirect descriptors (the Firecracker VMs the
benchmarks run on have none) then holds one such request at a time and
requeues the next until it is done (ftrace: every block request issued
twice, queue depth 1.0-1.3).  In 2 MiB pages the same read is one segment
and several are in flight (queue depth 2.5-3); cold sequential reads went
from 0.89-1.08 to 1.19-1.30 GB/s, A/B in the same minutes.

MADV_HUGEPAGE asks for them where transparent huge pages are "madvise" or
"always".  Where they are "never", or no 2 MiB page is free, the kernel
gives small pages: slower, the same bytes.
"""

from __future__ import annotations

import logging
import mmap

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
