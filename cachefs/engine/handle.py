"""OpenFile: the handle :meth:`FileCache.open` returns."""

from __future__ import annotations

from cachefs.contract import FileAttrs
from cachefs.engine.hit.direct import Stream
from cachefs.engine.miss.transfers import ReaderState
from cachefs.engine.state.index import CachedFile
from cachefs.engine.state.store import DataFile


class OpenFile:
    """A handle from :meth:`FileCache.open`: the version it reads (``cf``,
    ``attrs``) and one reader's sequential state.

    The hit path (hit/) and the miss path (miss/) each see it through a
    Protocol of the few fields they keep in it.
    """

    __slots__ = ("file_id", "attrs", "cf", "reader", "data", "direct", "whole", "closed")

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
