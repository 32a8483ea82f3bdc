"""Walks through a directory: which files to fetch before they are opened.

A reader that opens the files of a directory in the order of its listing
(by name, as ``ls``, globs, ``cp -r`` and ``tar`` give them) is seen here,
and the next FILES_AHEAD small files after the one it opened are named to
be fetched ahead (engine/miss/ahead.py).  Several readers may walk one
directory at once (``xargs -P 8``, a data loader's workers), each from its
own place: a directory keeps up to WALKS cursors, and an open just after a
cursor (at most GAP entries on) moves it along.  The second open in a row
of one cursor starts fetching ahead; one open alone fetches nothing.

Only files up to SMALL_FILE bytes are fetched ahead (a large file has its
own readahead inside it).  State is kept for the last DIRS directories.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass

from cachefs.contract import DirEntry, FileKind

#: Files named ahead of a walk's last open.
FILES_AHEAD = 8
#: Files larger than this are not fetched ahead.
SMALL_FILE = 2 << 20
#: Walks followed in one directory.
WALKS = 8
#: How far past a cursor an open still continues its walk (skipped entries:
#: directories, files another reader of the walk took).
GAP = 4
#: Directories whose walks are remembered.
DIRS = 64


@dataclass(slots=True)
class _Cursor:
    at: int  # index in the listing of the walk's last open
    named_to: int  # entries up to here were named already
    steps: int = 0


class Walks:
    """Follows the opens in each directory (by inode number)."""

    def __init__(self) -> None:
        self._dirs: OrderedDict[int, tuple[list[DirEntry], list[_Cursor]]] = OrderedDict()

    def opened(self, dir_ino: int, listing: list[DirEntry], name: str) -> list[str]:
        """*name* in *listing* (sorted by name) of directory *dir_ino* was
        opened: the names to fetch ahead of it (often none)."""
        i = bisect_left(listing, name, key=_name)
        if i == len(listing) or listing[i].name != name:
            return []
        known = self._dirs.get(dir_ino)
        if known is None or known[0] is not listing:  # a new listing: new walks
            known = (listing, [])
            self._dirs[dir_ino] = known
            if len(self._dirs) > DIRS:
                self._dirs.popitem(last=False)
        else:
            self._dirs.move_to_end(dir_ino)
        cursors = known[1]
        for c in cursors:
            if c.at < i <= c.at + GAP:
                c.at, c.steps = i, c.steps + 1
                break
        else:
            if len(cursors) >= WALKS:
                cursors.pop(0)
            cursors.append(_Cursor(i, i))
            return []
        cursors.remove(c)
        cursors.append(c)  # the most recently moved last
        start = max(c.named_to, i) + 1
        end = min(i + FILES_AHEAD, len(listing) - 1)
        c.named_to = max(c.named_to, end)
        return [
            e.name
            for e in listing[start : end + 1]
            if e.attrs.kind is FileKind.FILE and 0 < e.attrs.size <= SMALL_FILE
        ]


def _name(entry: DirEntry) -> str:
    return entry.name
