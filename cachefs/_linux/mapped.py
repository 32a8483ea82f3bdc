"""Cache hits served from the page cache without a copy into Python.

A large hit of plain, already checked blocks whose pages are all in the
page cache is handed to the FUSE session as a memoryview of a read-only shared
mapping of the data file: the reply's writev copies from the page cache
straight into the kernel's FUSE pages.  That saves copying into a Python
buffer and zeroing that buffer first, a large share of the daemon's CPU on
large cache hits.

Whether every page is resident is asked of cachestat(2) (Linux 6.5) by
the hit path, so the reply never waits for the disk on the loop; where the
kernel has no cachestat (or a sandbox refuses it) hits are copied as
before.  A page reclaimed between the check and the reply is
read back in: slower, still the right bytes.

Why a view is safe to hand out:

* Present blocks are never punched: eviction clears a block's bit before it
  punches, and the session replies as soon as ``read()`` returns, with no await
  in between, so no eviction can start between the check and the copy.
* The data file is never shorter than the mapping: it is created sparse at
  its full size and cachefs never truncates it (someone else truncating a
  cache file under a mounted cache would kill the daemon with SIGBUS).
* A retired (unlinked) data file stays mapped until its last view is gone.
* Each view maps only its own bytes and is unmapped when dropped, so the
  daemon's resident set stays small (one mapping of the whole file would
  count every page cache page it served as the daemon's).
"""

from __future__ import annotations

import logging
import mmap

# Hits smaller than this are copied: for them the saving is lost in the
# extra syscall (cachestat) and the page faults of the reply.
MAP_MIN = 64 << 10

log = logging.getLogger(__name__)


def map_range(fd: int, offset: int, end: int) -> memoryview | None:
    """Bytes [offset, end) of *fd* as a view of a read-only shared mapping of just them.

    One mapping per view: it is unmapped as soon as the view is dropped (by
    the session, right after the reply), so the daemon's resident set does not
    grow with every file page it has ever served.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(fd, end - start, mmap.MAP_SHARED, mmap.PROT_READ, offset=start)
    except OSError as e:  # ENOMEM (vm.max_map_count), a filesystem that cannot map: copy
        log.debug("cannot map cache bytes (%s): copied", e)
        return None
    return memoryview(m)[offset - start :]
