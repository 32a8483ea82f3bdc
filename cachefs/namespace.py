"""The inode table: which inode number stands for which path of the source.

Policy:

* A path keeps its inode number for the life of the mount, even after the
  kernel forgot it, so tools that compare inode numbers (tar, rsync, find)
  see a stable tree.  A path whose kind changes (a file replaced by a
  directory) gets a new number: the kernel never sees an inode change type.
* The kernel's lookup count is kept per inode.  ``forget`` lowers it; at
  zero the inode's state (attributes, listing) is dropped.  Only the
  path -> number map outlives it.
* Attributes come from the engine, which revalidates them with the backend
  after its TTL.  Directory listings are cached here for the same TTL; a
  fresh listing also answers negative lookups without asking the backend.
* An inode shows one version of its file while it is open
  (docs/SEMANTICS.md): the kernel keeps one page cache and one size per
  inode, so the attributes it gets for an open inode are those of the
  version its handles read, even once the source has another; a lookup,
  listing or getattr that finds another version gives the path a new inode
  number, as a file replaced by rename has.  An open that would read
  another version than the kernel was last shown for the inode raises
  NewInode: the caller answers ESTALE and the kernel looks the name up again.

No FUSE in this module: it speaks file ids, FileAttrs and NotFound, and the
FUSE layer translates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio

from cachefs.contract import DirEntry, FileAttrs, FileKind
from cachefs.engine import FileCache
from cachefs.errors import CacheFSError, NotFound

log = logging.getLogger(__name__)

ROOT_INODE = 1


class NewInode(Exception):
    """This open cannot be served on this inode (another version of the file,
    or, for passthrough, an O_DIRECT open): the file needs a new inode."""


def child_id(parent_id: str, name: str) -> str:
    """The file id of *name* inside the directory *parent_id*."""
    return f"{parent_id}/{name}" if parent_id else name


@dataclass(slots=True, eq=False)
class Node:
    """One inode the kernel knows (lookup count > 0), or the root."""

    ino: int
    file_id: str
    kind: FileKind
    lookups: int = 0
    #: Version whose pages the kernel may hold (set when the file is opened).
    page_version: str | None = None
    listing: list[DirEntry] | None = None
    names: frozenset[str] = frozenset()
    listed_at: float = float("-inf")
    #: Version of the attributes the kernel was last given for this inode.
    shown: str | None = None
    #: Open handles of this inode, and the attributes of the version they read.
    opens: int = 0
    open_attrs: FileAttrs | None = None


class Namespace:
    """Inode numbers, lookup counts and directory listings of one mount."""

    def __init__(self, cache: FileCache, clock: Callable[[], float] = trio.current_time) -> None:
        self._cache = cache
        self._clock = clock
        self.ttl = cache.config.ttl
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "", FileKind.DIR, lookups=1),
        }
        # path -> (inode number, kind): outlives forgotten nodes.
        self._numbers: dict[str, tuple[int, FileKind]] = {"": (ROOT_INODE, FileKind.DIR)}
        self._next_ino = ROOT_INODE + 1

    # -- numbers --------------------------------------------------------

    def inode_number(self, file_id: str, kind: FileKind) -> int:
        """The inode number of *file_id* as a *kind*, allocated on first use."""
        known = self._numbers.get(file_id)
        if known is not None and known[1] is kind:
            return known[0]
        ino = self._next_ino
        self._next_ino += 1
        self._numbers[file_id] = (ino, kind)
        if known is not None:
            log.debug("%r changed from %s to %s: new inode %d", file_id, known[1], kind, ino)
        return ino

    def entry_inode(self, file_id: str, attrs: FileAttrs) -> int:
        """The inode number under which *file_id* is shown with *attrs*: a new
        one if its inode is open at another version."""
        known = self._numbers.get(file_id)
        if known is not None:
            node = self._nodes.get(known[0])
            open_attrs = None if node is None else node.open_attrs
            if node is not None and open_attrs is not None and open_attrs.version != attrs.version:
                self._detach(node)
        return self.inode_number(file_id, attrs.kind)

    def live_inode(self, file_id: str) -> int | None:
        """The inode of *file_id* if the kernel currently knows it."""
        known = self._numbers.get(file_id)
        if known is not None and known[0] in self._nodes:
            return known[0]
        return None

    def node(self, ino: int) -> Node:
        """The node of *ino*; NotFound if the kernel should not know it."""
        node = self._nodes.get(ino)
        if node is None:
            raise NotFound(f"unknown inode {ino}")
        return node

    def __len__(self) -> int:
        return len(self._nodes)

    # -- lookup counts --------------------------------------------------

    def remember(self, file_id: str, attrs: FileAttrs) -> Node:
        """Count one more kernel reference to *file_id*, shown with *attrs* (a
        lookup or readdirplus entry)."""
        ino = self.entry_inode(file_id, attrs)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, file_id, attrs.kind)
        node.lookups += 1
        node.shown = attrs.version
        return node

    def forget(self, ino: int, count: int) -> None:
        """Drop *count* kernel references to *ino*; at zero, drop its state."""
        node = self._nodes.get(ino)
        if node is None:
            log.warning("forget of unknown inode %d", ino)
            return
        node.lookups -= count
        if node.lookups < 0:
            log.warning("inode %d (%r) forgotten more often than looked up", ino, node.file_id)
            node.lookups = 0
        if node.lookups == 0 and ino != ROOT_INODE:
            del self._nodes[ino]

    # -- attributes and listings ----------------------------------------

    async def lookup(self, parent_ino: int, name: str) -> tuple[Node, FileAttrs]:
        """Find *name* in a directory and count the kernel's new reference."""
        parent = self.node(parent_ino)
        if name == ".":
            file_id = parent.file_id
        elif name == "..":
            file_id = parent.file_id.rpartition("/")[0]
        else:
            file_id = child_id(parent.file_id, name)
            if self._fresh_listing(parent) and name not in parent.names:
                raise NotFound(f"no such entry: {file_id!r}")
        attrs = await self._cache.getattr(file_id)
        return self.remember(file_id, attrs), attrs

    async def getattr(self, ino: int) -> tuple[Node, FileAttrs]:
        """Current attributes of *ino* (the engine revalidates after its TTL);
        while it is open, those of the version its handles read."""
        node = self.node(ino)
        pinned = node.open_attrs
        if pinned is not None:
            try:
                attrs: FileAttrs | None = await self._cache.getattr(node.file_id)
            except CacheFSError:  # gone, or not known now: the open version stands
                attrs = None
            if attrs is None or attrs.version != pinned.version:
                self._detach(node)  # the path's next lookup gets a new inode
            return node, pinned
        attrs = await self._cache.getattr(node.file_id)
        if attrs.kind is not node.kind:
            # The path now names something else; this inode is gone.
            raise NotFound(f"{node.file_id!r} is no longer a {node.kind.value}")
        node.shown = attrs.version
        return node, attrs

    async def list_dir(self, ino: int) -> list[DirEntry]:
        """The entries of directory *ino*, listed again once the TTL has passed."""
        node = self.node(ino)
        if node.listing is None or not self._fresh_listing(node):
            listed_at = self._clock()
            listing = sorted(await self._cache.list_dir(node.file_id), key=lambda e: e.name)
            node.listing, node.listed_at = listing, listed_at
            node.names = frozenset(e.name for e in listing)
        assert node.listing is not None
        return node.listing

    def _fresh_listing(self, node: Node) -> bool:
        return node.listing is not None and self._clock() - node.listed_at < self.ttl

    def renumber(self, ino: int) -> None:
        """Give the file of *ino* a new inode number from its next lookup on.

        The kernel then drops its entry for the old inode, whose open files
        stay as they are; the old node goes when the kernel forgets it.
        """
        node = self._nodes.get(ino)
        if node is not None:
            self._detach(node)

    def _detach(self, node: Node) -> None:
        known = self._numbers.get(node.file_id)
        if known is not None and known[0] == node.ino and node.ino != ROOT_INODE:
            del self._numbers[node.file_id]
            log.debug("%r: new inode from its next lookup on (was %d)", node.file_id, node.ino)

    def bind(self, ino: int, attrs: FileAttrs) -> None:
        """A handle of *ino* opened the version of *attrs*.

        NewInode if the inode is open at another version, or the kernel was
        last shown another version for it (its size and pages would not be
        this version's).  Undo with :meth:`unbind`.
        """
        node = self.node(ino)
        version = attrs.version
        if node.open_attrs is not None and node.open_attrs.version != version:
            raise NewInode(f"inode {ino} is open at version {node.open_attrs.version!r}")
        if node.shown is not None and node.shown != version:
            raise NewInode(f"inode {ino} was shown at version {node.shown!r}")
        node.opens += 1
        if node.open_attrs is None:
            node.open_attrs = attrs

    def unbind(self, ino: int) -> None:
        """A handle of *ino* was closed."""
        node = self._nodes.get(ino)
        if node is not None and node.opens:
            node.opens -= 1
            if not node.opens:
                node.open_attrs = None

    def opened(self, ino: int, version: str) -> bool:
        """Record that *ino* is open at *version*; True if the kernel's pages are still good."""
        node = self.node(ino)
        keep = node.page_version is None or node.page_version == version
        node.page_version = version
        return keep

    def invalidated(self, file_id: str) -> int | None:
        """The engine dropped *file_id*'s version: list it and its directory again.

        Returns the inode the kernel knows for *file_id*, if any.
        """
        for path in (file_id, file_id.rpartition("/")[0]):
            ino = self.live_inode(path)
            if ino is not None:
                self._nodes[ino].listing = None
        return self.live_inode(file_id)
