"""OpenFile: the handle :meth:`FileCache.open` returns."""

from __future__ import annotations

from cachefs.contract import FileAttrs
from cachefs.engine.hit.direct import Stream
from cachefs.engine.miss.transfers import ReaderState
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import DataFile
from cachefs.engine.write.copies import WorkingCopy


class OpenFile:
    """A handle from :meth:`FileCache.open`: the version it reads (``cf``,
    ``attrs``) and one reader's sequential state, or the working copy it
    reads and writes (``wc``: the file is being changed).

    The hit path (hit/) and the miss path (miss/) each see it through a
    Protocol of the few fields they keep in it.
    """

    __slots__ = (
        "file_id",
        "attrs",
        "cf",
        "reader",
        "data",
        "direct",
        "whole",
        "closed",
        "wc",
        "writer",
        "detached",
        "continues",
    )

    def __init__(self, cf: CachedFile) -> None:
        self.file_id: str = cf.file_id
        self.attrs: FileAttrs = cf.attrs
        self.cf: CachedFile = cf
        self.reader: ReaderState = ReaderState()
        # The version's data file, held from the first hit on.
        self.data: DataFile | None = None
        self.direct: Stream | None = None  # large hits read direct, some ahead
        self.whole: CachedFile | None = None  # held whole for the kernel (hit/whole.py)
        self.closed = False
        # The working copy it reads (and, if writer, writes): the file is being changed.
        self.wc: WorkingCopy | None = None
        self.writer = False
        # Opened on a working copy: ``cf`` is a stand-in that no catalog holds.
        self.detached = False
        # The version the working copy was made from ("" if none, or a new file).
        self.continues = ""

    @classmethod
    def of_copy(cls, wc: WorkingCopy, writer: bool) -> OpenFile:
        """A handle on the working copy *wc*."""
        attrs = wc.attrs
        stand_in = CachedFile(
            row_id=0,
            file_id=wc.file_id,
            version=attrs.version,
            size=attrs.size,
            mtime=attrs.mtime,
            mode=attrs.mode,
            present=bytearray(),
        )
        fh = cls(stand_in)
        fh.wc = wc
        fh.writer = writer
        fh.detached = True
        fh.continues = wc.header.base_version
        return fh
