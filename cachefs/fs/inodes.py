"""The inode table: which inode number stands for which path of the source.

Policy:

* An inode number stands for one path as one kind and, for a regular file,
  one version of it (docs/SEMANTICS.md).  The kernel keeps one size, one set
  of attributes and one page cache per inode, so an inode never changes
  version: it reads as the version it was created for, open or not, and a
  new version of the file is a new inode, as a file replaced by rename is.
  A path keeps its number for the life of the mount while its kind and
  version stay (even after the kernel forgot it), so tools that compare
  inode numbers (tar, rsync, find) see a stable tree; a directory or a
  symlink keeps it whatever changes inside it.
* An open that would read another version than its inode stands for raises
  NewInode: the caller answers ESTALE and the kernel looks the name up
  again, getting the new inode.  A getattr of an inode whose path now has
  another version answers the inode's own attributes and lets the path's
  next lookup find the new one.
* The kernel's lookup count is kept per inode.  ``forget`` lowers it; at
  zero the inode's state (attributes, listing) is dropped.  Only the
  path -> number map outlives it.
* Attributes come from the engine, which revalidates them with the backend
  after its TTL.  Directory listings are cached here for the same TTL; a
  fresh listing also answers negative lookups without asking the backend.

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
    #: The attributes of the version this inode stands for (files), or the last seen.
    attrs: FileAttrs
    lookups: int = 0
    listing: list[DirEntry] | None = None
    names: frozenset[str] = frozenset()
    listed_at: float = float("-inf")
    #: Handles open on this inode.
    opens: int = 0


def _version(attrs: FileAttrs) -> str:
    """What an inode number stands for beyond path and kind: a file's version."""
    return attrs.version if attrs.kind is FileKind.FILE else ""


class Namespace:
    """Inode numbers, lookup counts and directory listings of one mount."""

    def __init__(self, cache: FileCache, clock: Callable[[], float] = trio.current_time) -> None:
        self._cache = cache
        self._clock = clock
        self.ttl = cache.config.ttl
        root = FileAttrs(FileKind.DIR, 0, 0.0, "")
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "", FileKind.DIR, root, lookups=1),
        }
        # path -> (inode number, kind, file version): outlives forgotten nodes.
        self._numbers: dict[str, tuple[int, FileKind, str]] = {"": (ROOT_INODE, FileKind.DIR, "")}
        self._next_ino = ROOT_INODE + 1

    # -- numbers --------------------------------------------------------

    def inode_number(self, file_id: str, attrs: FileAttrs) -> int:
        """The inode number of *file_id* as *attrs* show it, allocated on first use."""
        known = self._numbers.get(file_id)
        stands_for = (attrs.kind, _version(attrs))
        if known is not None and known[1:] == stands_for:
            return known[0]
        ino = self._next_ino
        self._next_ino += 1
        self._numbers[file_id] = (ino, *stands_for)
        if known is not None:
            log.debug("%r is now %s %r: new inode %d", file_id, *stands_for, ino)
        return ino

    def listed(self, file_id: str, attrs: FileAttrs) -> FileAttrs:
        """The attributes to show for *file_id* listed with *attrs*: for a
        file, those of the version the engine knows now if it learned a newer
        one since the listing (a listing lives up to the TTL)."""
        if attrs.kind is FileKind.FILE:
            known = self._cache.known_attrs(file_id)
            if known is not None:
                return known
        return attrs

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
        """Count one more kernel reference to *file_id* as *attrs* show it (a
        lookup or readdirplus entry)."""
        ino = self.inode_number(file_id, attrs)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, file_id, attrs.kind, attrs)
        node.attrs = attrs
        node.lookups += 1
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
        for a file, those of the version the inode stands for, which its open
        handles read even once the path has another (or none)."""
        node = self.node(ino)
        try:
            attrs = await self._cache.getattr(node.file_id)
        except CacheFSError:
            if node.opens:  # fstat of an open file works, as on a local one
                return node, node.attrs
            raise
        if attrs.kind is not node.kind and not node.opens:
            # The path now names something else; this inode is gone.
            raise NotFound(f"{node.file_id!r} is no longer a {node.kind.value}")
        if attrs.kind is not node.kind or _version(attrs) != _version(node.attrs):
            return node, node.attrs  # the path's next lookup finds the new inode
        node.attrs = attrs
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
        if node is None or ino == ROOT_INODE:
            return
        known = self._numbers.get(node.file_id)
        if known is not None and known[0] == ino:
            del self._numbers[node.file_id]

    def bind(self, ino: int, attrs: FileAttrs) -> None:
        """A handle of *ino* opened the version of *attrs*: NewInode if the
        inode stands for another one.  Undo with :meth:`unbind`."""
        node = self.node(ino)
        if _version(attrs) != _version(node.attrs):
            raise NewInode(f"inode {ino} stands for version {node.attrs.version!r}")
        node.opens += 1

    def unbind(self, ino: int) -> None:
        """A handle of *ino* was closed."""
        node = self._nodes.get(ino)
        if node is not None and node.opens:
            node.opens -= 1

    def invalidated(self, file_id: str) -> int | None:
        """The engine dropped *file_id*'s version: list it and its directory again.

        Returns the inode the kernel knows for *file_id*, if any.
        """
        for path in (file_id, file_id.rpartition("/")[0]):
            ino = self.live_inode(path)
            if ino is not None:
                self._nodes[ino].listing = None
        return self.live_inode(file_id)
