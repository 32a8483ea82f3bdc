"""Whole cached files the kernel may read by itself (FUSE passthrough).

A handle's file qualifies when every block of the version it opened is in
its data file as plain bytes that need no check before they are served
(checked in this mount, or ``--verify off``), synced to the cache disk (a
writeback the disk failed would read back as holes, and only the daemon's
sync tells; a file that becomes whole is synced at once), and no error
latch is set.
The data file is then the file byte for byte: block i at i * block_size,
its length the file's size.

While a handle holds it, eviction and purge leave the file's blocks alone,
so the kernel never reads a punched hole.  A new version retires the data
file (unlinked, its bytes intact): holders keep reading the version they
opened, as readers of a local file replaced by rename do.
"""

from __future__ import annotations

from typing import Protocol

from cachefs.contract import FileAttrs
from cachefs.engine.policy.content import Content
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.disk import CacheDisk
from cachefs.engine.state.index import CachedFile
from cachefs.engine.stats import Stats


class Handle(Protocol):
    """What a hold on a whole file needs of an open handle (engine.OpenFile)."""

    #: The version the handle reads, and its attributes at open.
    cf: CachedFile
    attrs: FileAttrs
    #: The file held whole for the handle, if it is.
    whole: CachedFile | None


class WholeFiles:
    """Holds on whole files; ``held`` counts the handles holding one now
    (``Stats.passthrough_opens`` those that the kernel was given)."""

    def __init__(self, catalog: Catalog, content: Content, disk: CacheDisk, stats: Stats) -> None:
        self._catalog = catalog
        self._content = content
        self._disk = disk
        self._stats = stats
        self.held = 0

    def qualifies(self, cf: CachedFile | None, version: str) -> bool:
        if cf is None or cf.retired or cf.version != version or cf.error is not None:
            return False
        if cf.size == 0 or cf.present.find(0) >= 0:
            return False
        if cf.unsynced:  # the kernel would read blocks a failed writeback lost as holes
            return False
        return not self._content.must_check(cf, 0, len(cf.present) - 1)

    def open_for_kernel(self, fh: Handle) -> int | None:
        """Like :meth:`hold`, counted in ``passthrough_opens``; None while the
        cache disk is latched (the kernel would meet its errors) or fails now."""
        if not self._disk.usable:
            return None
        try:
            fd = self.hold(fh)
        except OSError as e:
            self._disk.failed("opening a cache data file", e)
            return None
        if fd is not None:
            self._stats.passthrough_opens += 1
        return fd

    def let_go(self, fh: Handle) -> None:
        """Give back what :meth:`open_for_kernel` held for *fh* (unused)."""
        if fh.whole is not None:
            self.release(fh)
            self._stats.passthrough_opens -= 1

    def hold(self, fh: Handle) -> int | None:
        """The fd of the data file holding all of *fh*'s version, held until
        :meth:`release`; None if the file does not qualify."""
        if fh.whole is not None:
            assert fh.whole.data is not None
            return fh.whole.data.fd
        cf = fh.cf
        if not self.qualifies(cf, fh.attrs.version):
            return None
        assert cf.data is not None
        fd = self._catalog.hold_data(cf)
        if not self.qualifies(cf, fh.attrs.version):  # its data file had lost blocks
            cf.data.release()
            return None
        cf.held += 1
        fh.whole = cf
        self.held += 1
        # Read now, as far as eviction is concerned, and for as long as held.
        self._catalog.touch(cf, 0, len(cf.present) - 1)
        return fd

    def release(self, fh: Handle) -> None:
        cf = fh.whole
        if cf is None:
            return
        fh.whole = None
        cf.held -= 1
        self.held -= 1
        self._catalog.touch(cf, 0, len(cf.present) - 1)
        assert cf.data is not None
        cf.data.release()
