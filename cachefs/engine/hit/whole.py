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

from typing import TYPE_CHECKING

from cachefs.engine.policy.content import Content
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.index import CachedFile

if TYPE_CHECKING:
    from cachefs.engine.filecache import OpenFile


class WholeFiles:
    """Holds on whole files; ``held`` counts the handles holding one now."""

    def __init__(self, catalog: Catalog, content: Content) -> None:
        self._catalog = catalog
        self._content = content
        self.held = 0

    def qualifies(self, cf: CachedFile | None, version: str) -> bool:
        if cf is None or cf.retired or cf.version != version or cf.error is not None:
            return False
        if cf.size == 0 or cf.present.find(0) >= 0:
            return False
        if cf.unsynced:  # the kernel would read blocks a failed writeback lost as holes
            return False
        return not self._content.must_check(cf, 0, len(cf.present) - 1)

    def hold(self, fh: OpenFile) -> int | None:
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

    def release(self, fh: OpenFile) -> None:
        cf = fh.whole
        if cf is None:
            return
        fh.whole = None
        cf.held -= 1
        self.held -= 1
        self._catalog.touch(cf, 0, len(cf.present) - 1)
        assert cf.data is not None
        cf.data.release()
