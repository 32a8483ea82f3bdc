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
* A file changed through the mount has a working copy, a version of its
  own ("local:N") whose content starts as the version it was made from.
  The inode of that version *carries on* as the working copy (``carry``):
  same number, attributes following the writes, since its pages are the
  copy's first content and every write after goes through it.  Once the
  copy is flushed and dropped, the source's new version is a new inode.
* Names made, removed or renamed through the mount change the table at
  once: a new entry is counted like a lookup and its directory listed
  again; a removed path loses its number (a later file of that name is a
  new inode; the kernel's references to the old one stay until forget);
  a renamed entry keeps its number, as does everything below a renamed
  directory, and the replaced target loses its own.
* The kernel's lookup count is kept per inode.  ``forget`` lowers it; at
  zero the inode's state (attributes, listing) is dropped.  Only the
  path -> number map outlives it.
* Attributes come from the engine, which revalidates them with the backend
  after its TTL.  Directory listings are cached here for the same TTL; a
  fresh listing also answers negative lookups without asking the backend.
  A directory whose names are looked up one by one (LIST_AFTER_LOOKUPS of
  them) is listed: one listing instead of a stat per name.  The listings of
  directories the kernel forgets (it dropped its caches) are kept for the
  rest of their TTL (the last KEPT_LISTINGS of them), so the next ``ls``
  does not list the source again.

No FUSE in this module: it speaks file ids, FileAttrs and NotFound, and the
FUSE layer translates.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

from cachefs.contract import DirEntry, FileAttrs, FileKind
from cachefs.engine import FileCache
from cachefs.errors import CacheFSError, NotFound

log = logging.getLogger(__name__)

ROOT_INODE = 1
#: Names looked up one by one in a directory before it is listed instead.
LIST_AFTER_LOOKUPS = 16
#: Listings kept, for their TTL, of directories the kernel forgot.
KEPT_LISTINGS = 256


class NewInode(Exception):
    """This open cannot be served on this inode (another version of the file,
    or, for passthrough, an O_DIRECT open): the file needs a new inode."""


def child_id(parent_id: str, name: str) -> str:
    """The file id of *name* inside the directory *parent_id*."""
    return f"{parent_id}/{name}" if parent_id else name


def parent_id(file_id: str) -> str:
    """The file id of the directory holding *file_id* (the root's own for the root)."""
    return file_id.rpartition("/")[0]


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
    #: The listing the kernel was last given to cache (FOPEN_CACHE_DIR), and
    #: its snapshot number (fs/operations.py).
    kernel_listing: list[DirEntry] | None = None
    kernel_gen: int = 0
    #: Handles open on this inode.
    opens: int = 0
    #: Names looked up in this directory since its listing went stale.
    unlisted_lookups: int = 0


#: What a path's number stands for: (inode number, kind, file version).
_Number = tuple[int, FileKind, str]


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
        self._numbers: dict[str, _Number] = {"": (ROOT_INODE, FileKind.DIR, "")}
        # Fresh listings of directories the kernel forgot (it dropped its
        # caches): a lookup of one again within the TTL finds it listed.
        self._kept: OrderedDict[str, tuple[list[DirEntry], float, frozenset[str]]] = OrderedDict()
        # directory path -> the paths right under it in _numbers (to move or
        # drop a subtree without scanning every path).
        self._children: dict[str, set[str]] = {}
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
        self._number(file_id, (ino, *stands_for))
        if known is not None:
            log.debug("%r is now %s %r: new inode %d", file_id, *stands_for, ino)
        return ino

    def _number(self, file_id: str, number: _Number) -> None:
        if file_id and file_id not in self._numbers:
            self._children.setdefault(parent_id(file_id), set()).add(file_id)
        self._numbers[file_id] = number

    def _unnumber(self, file_id: str) -> _Number | None:
        number = self._numbers.pop(file_id, None)
        if number is not None and file_id:
            parent = parent_id(file_id)
            siblings = self._children.get(parent)
            if siblings is not None:
                siblings.discard(file_id)
                if not siblings:
                    del self._children[parent]
        return number

    def _subtree(self, file_id: str) -> list[str]:
        """*file_id* and every path below it that has a number."""
        found, todo = [], [file_id]
        while todo:
            path = todo.pop()
            if path in self._numbers:
                found.append(path)
            todo.extend(self._children.get(path, ()))
        return found

    def listed(self, file_id: str, attrs: FileAttrs) -> FileAttrs:
        """The attributes to show for *file_id* listed with *attrs*: for a
        file, those of the version the engine knows now if it learned a newer
        one since the listing (a listing lives up to the TTL)."""
        if attrs.kind is FileKind.FILE:
            known = self._cache.shown_attrs(file_id)
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

    def open_inodes(self) -> list[tuple[int, str, int]]:
        """(inode number, file id, handles open) of each inode with handles
        open, for a state dump (cachefs.daemon.dump)."""
        return sorted((n.ino, n.file_id, n.opens) for n in self._nodes.values() if n.opens)

    def __len__(self) -> int:
        return len(self._nodes)

    # -- lookup counts --------------------------------------------------

    def remember(self, file_id: str, attrs: FileAttrs, ino: int | None = None) -> Node:
        """Count one more kernel reference to *file_id* as *attrs* show it (a
        lookup or readdirplus entry); *ino*: its :meth:`inode_number`, when
        the caller has just asked for it."""
        if ino is None:
            ino = self.inode_number(file_id, attrs)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = Node(ino, file_id, attrs.kind, attrs)
            kept = self._kept.pop(file_id, None)
            if kept is not None and attrs.kind is FileKind.DIR:
                node.listing, node.listed_at, node.names = kept
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
            known = self._numbers.get(node.file_id)  # not if its path is another's now
            if known is not None and known[0] == ino and self._fresh_listing(node):
                assert node.listing is not None
                self._kept[node.file_id] = (node.listing, node.listed_at, node.names)
                if len(self._kept) > KEPT_LISTINGS:
                    self._kept.popitem(last=False)

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
            if not self._fresh_listing(parent):
                # Names looked up one by one (paths given whole, not found by
                # listing): past a few, one listing answers them all, and
                # shows the order a walk of the directory follows (walks.py).
                parent.unlisted_lookups += 1
                if parent.unlisted_lookups == LIST_AFTER_LOOKUPS:  # once: the others stat
                    try:
                        await self.list_dir(parent_ino)
                    except CacheFSError as e:  # the name's own lookup says what fails
                        log.debug("listing %r for its lookups: %s", parent.file_id, e)
                        parent.unlisted_lookups = 0  # again after as many more
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
            node.unlisted_lookups = 0
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
            self._unnumber(node.file_id)

    def bind(self, ino: int, attrs: FileAttrs, continues: str | None = None) -> None:
        """A handle of *ino* opened the version of *attrs*: NewInode if the
        inode stands for another one.  Undo with :meth:`unbind`.

        *continues*: the handle is on a working copy made from that version;
        an inode standing for it, still its path's, carries on as the copy
        (:meth:`carry`).
        """
        node = self.node(ino)
        if _version(attrs) != _version(node.attrs):
            if continues is None or not self.carries(ino, continues):
                raise NewInode(f"inode {ino} stands for version {node.attrs.version!r}")
            self.carry(ino, attrs)
        node.opens += 1

    def carries(self, ino: int, version: str) -> bool:
        """Whether *ino* is its path's inode and stands for the file's *version*:
        a working copy made from that version may carry it on."""
        node = self.node(ino)
        return (
            node.kind is FileKind.FILE
            and node.attrs.version == version
            and self.live_inode(node.file_id) == ino
        )

    def carry(self, ino: int, attrs: FileAttrs) -> None:
        """*ino* goes on as the version of *attrs* (its file's working copy, or
        the same content under new attributes): same number, new attributes.
        The caller sees to it that the kernel's pages of *ino* are that
        version's."""
        node = self.node(ino)
        self._number(node.file_id, (ino, attrs.kind, _version(attrs)))
        node.attrs = attrs

    def unbind(self, ino: int) -> None:
        """A handle of *ino* was closed."""
        node = self._nodes.get(ino)
        if node is not None and node.opens:
            node.opens -= 1

    def invalidated(self, file_id: str) -> int | None:
        """The engine dropped *file_id*'s version: list it and its directory again.

        Returns the inode the kernel knows for *file_id*, if any.
        """
        for path in (file_id, parent_id(file_id)):
            self._relist(path)
        return self.live_inode(file_id)

    def _relist(self, dir_id: str) -> None:
        self._kept.pop(dir_id, None)
        ino = self.live_inode(dir_id)
        if ino is not None:
            self._nodes[ino].listing = None

    def _drop_kept(self, file_id: str) -> None:
        """Forget the kept listings of *file_id* and of the directories below it."""
        below = f"{file_id}/"
        for path in [p for p in self._kept if p == file_id or p.startswith(below)]:
            del self._kept[path]

    # -- changes made through the mount ---------------------------------

    def added(self, file_id: str, attrs: FileAttrs) -> Node:
        """*file_id* was made (create, mkdir, symlink) as *attrs* show it:
        count the kernel's reference to it; its directory is listed again."""
        self._kept.pop(file_id, None)
        self._relist(parent_id(file_id))
        return self.remember(file_id, attrs)

    def removed(self, file_id: str) -> None:
        """*file_id* is gone (unlink, rmdir): it and what was below it lose
        their numbers; its directory is listed again.  The kernel's nodes
        stay until it forgets them."""
        for path in self._subtree(file_id):
            self._unnumber(path)
        self._drop_kept(file_id)
        self._relist(parent_id(file_id))

    def renamed(self, old_id: str, new_id: str) -> None:
        """*old_id* is now *new_id*: it keeps its number, as does every path
        below it; what *new_id* was loses its number; both directories are
        listed again."""
        if old_id == new_id:
            return
        self._drop_kept(old_id)
        self._drop_kept(new_id)
        for path in self._subtree(new_id):
            self._unnumber(path)
        moved = [(path, self._unnumber(path)) for path in self._subtree(old_id)]
        for path, number in moved:
            assert number is not None
            to = new_id + path[len(old_id) :]
            self._number(to, number)
            node = self._nodes.get(number[0])
            if node is not None and node.file_id == path:
                node.file_id = to
        self._relist(parent_id(old_id))
        self._relist(parent_id(new_id))
