"""Which opens the kernel reads by itself from the cache (FUSE passthrough).

The kernel reads an inode's open files either through its page cache (our
READ answers) or from one backing file, never both at once: an open whose
answer asks for the other way while one is in use fails with EIO.  So, per
inode:

- no open: a file the cache holds whole (``FileCache.hold_whole``) opens
  in passthrough, any other through the page cache;
- passthrough opens exist: every open must be passthrough too, from the
  same backing file, and shares their backing id (an inode's opens all read
  one version: the namespace sees to that); an O_DIRECT one raises
  NewInode: the caller gives the file a new inode and answers ESTALE, on
  which the kernel looks the name up again and opens the new inode;
- page-cache opens exist: through the page cache;
- an O_DIRECT open is answered direct_io: through us, with no alignment
  rules, as on a mount without passthrough (the cache disk refuses
  unaligned direct reads).  Its file is not opened with passthrough again
  in this mount, so that an O_DIRECT open never needs a second new inode;
- an open of a file being changed (a handle on its working copy, to write
  or to read) is never passthrough: the kernel's pages of the inode must
  see every write.  Where passthrough opens exist it raises NewInode (the
  caller checks :meth:`OpenModes.has_backing` before the inode carries on
  as the working copy).

A backing id is closed when the last passthrough open of its inode is
released; the cache keeps the data file whole until each handle is closed.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass

from cachefs.engine import FileCache, OpenFile
from cachefs.fs.inodes import NewInode
from cachefs.fuse.api import Kernel, Opened

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Backing:
    backing_id: int
    opens: int = 1


class OpenModes:
    def __init__(self, kernel: Kernel, cache: FileCache) -> None:
        self._kernel = kernel
        self._cache = cache
        self._backings: dict[int, _Backing] = {}
        self._cached: Counter[int] = Counter()
        self._modes: dict[int, tuple[int, str]] = {}  # fh -> (inode, "pass" | "cache" | "direct")
        self._direct_files: set[str] = set()  # opened O_DIRECT: no passthrough any more
        self._refused = False

    def has_backing(self, ino: int) -> bool:
        """Whether the kernel reads *ino*'s open files from a backing file."""
        return ino in self._backings

    def choose(
        self,
        ino: int,
        fh: int,
        handle: OpenFile,
        flags: int,
        *,
        working: bool = False,
        noflush: bool = False,
    ) -> Opened | None:
        """The answer for a passthrough or direct open; None: read through the
        page cache (the caller decides what the kernel keeps of it).
        *working*: *handle* is on a working copy (never passthrough).
        *noflush*: its close has nothing to flush (Opened.noflush).

        Raises NewInode (nothing recorded for *fh*).
        """
        backing = self._backings.get(ino)
        direct = self._kernel.passthrough and flags & os.O_DIRECT
        if direct:
            self._direct_files.add(handle.file_id)
        if backing is not None:
            if direct:
                raise NewInode(f"an O_DIRECT open of inode {ino}, read with passthrough")
            if working:
                raise NewInode(f"inode {ino} is read with passthrough, its file is being changed")
            # Held whole by the first opens, whether or not this one can hold it.
            self._cache.hold_whole(handle)
            backing.opens += 1
            self._modes[fh] = (ino, "pass")
            return Opened(fh, backing_id=backing.backing_id, noflush=noflush)
        if direct:
            self._modes[fh] = (ino, "direct")
            return Opened(fh, direct_io=True, noflush=noflush)
        if (
            self._kernel.passthrough
            and not working
            and not self._refused
            and not self._cached[ino]
            and handle.file_id not in self._direct_files
        ):
            fd = self._cache.hold_whole(handle)
            if fd is not None:
                try:
                    backing_id = self._kernel.open_backing(fd)
                except OSError as e:
                    # EPERM without CAP_SYS_ADMIN; the same for every file after.
                    log.warning("the kernel refused passthrough (%s): off for this mount", e)
                    self._refused = True
                    self._cache.let_go_whole(handle)
                else:
                    self._backings[ino] = _Backing(backing_id)
                    self._modes[fh] = (ino, "pass")
                    return Opened(fh, backing_id=backing_id, noflush=noflush)
        self._cached[ino] += 1
        self._modes[fh] = (ino, "cache")
        return None

    def released(self, fh: int) -> None:
        """*fh* was released (its cache handle is closed by the caller)."""
        ino, mode = self._modes.pop(fh)
        if mode == "cache":
            self._cached[ino] -= 1
            if not self._cached[ino]:
                del self._cached[ino]
        elif mode == "pass":
            backing = self._backings[ino]
            backing.opens -= 1
            if not backing.opens:
                del self._backings[ino]
                try:
                    self._kernel.close_backing(backing.backing_id)
                except OSError as e:
                    log.warning("cannot close backing id %d: %s", backing.backing_id, e)
