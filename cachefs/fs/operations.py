"""The FUSE request handlers: the one place that raises FUSEError.

Every handler goes through :func:`_handler`, which is the single translation
from the rest of cachefs to errno: a CacheFSError answers with its
``errno`` (NotFound -> ENOENT, ReadFailed -> EIO, ChangeRefused -> its own,
NoSpace -> ENOSPC, ReadOnly -> EROFS, ...); anything else is a bug, logged
with its traceback and answered with EIO, and the mount stays up.

Changes go to the engine: file content lands in the file's working copy
and is written back later, names and attributes are written through
(cachefs.engine.write).  On a read-only mount (``FileCache.writable``
False) every change answers EROFS and no mode shows a write bit.  What the
mount never does answers at once: hard links, owner changes and device,
fifo or socket nodes EPERM; extended attributes, fallocate,
copy_file_range and O_TMPFILE EOPNOTSUPP; an exchanging rename EINVAL.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, ParamSpec, TypeVar, cast

import trio

from cachefs.contract import DirEntry, FileAttrs, FileKind
from cachefs.engine import FileCache, OpenFile
from cachefs.errors import CacheFSError
from cachefs.fs.inodes import Namespace, NewInode, Node, child_id, parent_id
from cachefs.fs.invalidator import KernelInvalidator
from cachefs.fs.passthrough import OpenModes
from cachefs.fs.walks import Walks
from cachefs.fuse.api import (
    RENAME_NOREPLACE,
    DirReply,
    Entry,
    FUSEError,
    Kernel,
    Opened,
    Payload,
    SetAttr,
    Statfs,
)

__all__ = ["KernelInvalidator", "Operations"]

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

_KIND_BITS = {
    FileKind.FILE: stat.S_IFREG,
    FileKind.DIR: stat.S_IFDIR,
    FileKind.SYMLINK: stat.S_IFLNK,
}
#: The permission bits of an entry whose source has none (an object store).
_DEFAULT_PERMS = {FileKind.FILE: 0o444, FileKind.DIR: 0o555, FileKind.SYMLINK: 0o777}
_WRITABLE_PERMS = {FileKind.FILE: 0o644, FileKind.DIR: 0o755, FileKind.SYMLINK: 0o777}

#: What ``change`` answers on a writable mount.
_UNSUPPORTED = {"link": errno.EPERM}

#: The longest name a directory entry takes (statfs namelen), in bytes.
NAME_MAX = 255

#: Snapshot numbers wrap within 30 bits (offsets stay below 2**62).
GEN_MASK = (1 << 30) - 1

_DOT = FileAttrs(FileKind.DIR, size=0, mtime=0.0, version="")


@dataclass(slots=True)
class _OpenDir:
    ino: int
    parent_ino: int
    listing: list[DirEntry]
    #: The snapshot's number, in the high bits of each of its offsets.
    gen: int


class _Args:
    """A request's arguments in a log line, written only if the line is: data as its size."""

    __slots__ = ("args",)

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args

    def __str__(self) -> str:
        return ", ".join(
            f"<{len(a)} bytes>"
            if isinstance(a, (bytes, bytearray, memoryview)) and len(a) > 255
            else repr(a)
            for a in self.args
        )


def _handler(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Answer a request: translate every exception to a FUSEError.

    Typed as *fn*; called positionally only (no keyword dict per request).
    """

    call: Callable[..., Coroutine[Any, Any, T]] = fn

    @functools.wraps(fn)
    async def handle(self: Operations, *args: Any) -> T:
        try:
            return await call(self, *args)
        except FUSEError:
            raise
        except CacheFSError as e:
            log.debug("%s(%s): %s: %s", fn.__name__, _Args(args), type(e).__name__, e)
            raise FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in %s(%s); answering EIO", fn.__name__, _Args(args))
            raise FUSEError(errno.EIO) from None

    return cast(Callable[P, Coroutine[Any, Any, T]], handle)


class Operations:
    """The source as a file system, served through the engine (a
    cachefs.fuse.api.Operations).

    *kernel*: the mount's, whichever transport serves it.
    """

    def __init__(
        self,
        namespace: Namespace,
        cache: FileCache,
        kernel: Kernel,
        on_init: Callable[[], None] = lambda: None,
    ) -> None:
        self._on_init = on_init
        self._ns = namespace
        self._cache = cache
        self._ttl = namespace.ttl
        self._block_size = cache.config.block_size
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._handles = count(1)
        self._files: dict[int, OpenFile] = {}
        self._file_inodes: dict[int, int] = {}
        # Inodes with handles open on a working copy: how many, and one of them.
        self._copy_opens: dict[int, int] = {}
        self._copy_handle: dict[int, OpenFile] = {}
        self._modes = OpenModes(kernel, cache)
        self._dirs: dict[int, _OpenDir] = {}
        self._walks = Walks()
        self._gens = count(1)

    def init(self) -> None:
        """The kernel's INIT request: calls *on_init*.

        Called once the kernel has taken the INIT answer: a task woken by
        *on_init* sees the connection set up (settings the kernel takes from
        that answer, such as its readahead, are final by then).  Must not raise.
        """
        self._on_init()

    def _entry(self, ino: int, attrs: FileAttrs) -> Entry:
        # The source's own bits, so that the kernel refuses what the source
        # would (default_permissions); defaults where it has none.
        writable = self._cache.writable
        if attrs.mode is not None:
            perms = attrs.mode & 0o7777
        else:
            perms = (_WRITABLE_PERMS if writable else _DEFAULT_PERMS)[attrs.kind]
        if not writable and attrs.kind is not FileKind.SYMLINK:
            perms &= ~0o222
        if attrs.kind is FileKind.SYMLINK:
            size = len(os.fsencode(attrs.link_target or ""))
        else:
            size = attrs.size
        # Positional: one of these per entry of every listing.
        return Entry(
            ino,
            _KIND_BITS[attrs.kind] | perms,
            size,
            int(attrs.mtime * 1_000_000_000),
            self._uid,
            self._gid,
            2 if attrs.kind is FileKind.DIR else 1,
            self._block_size,
            self._ttl,
        )

    def _check_writable(self) -> None:
        if not self._cache.writable:
            raise FUSEError(errno.EROFS)

    def _child(self, parent_inode: int, name: bytes) -> str:
        """The file id of *name* in the directory *parent_inode*."""
        parent = self._ns.node(parent_inode)
        if parent.kind is not FileKind.DIR:
            raise FUSEError(errno.ENOTDIR)
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        return child_id(parent.file_id, os.fsdecode(name))

    # -- names and attributes -------------------------------------------

    @_handler
    async def lookup(self, parent_inode: int, name: bytes) -> Entry:
        if len(name) > NAME_MAX:
            raise FUSEError(errno.ENAMETOOLONG)
        node, attrs = await self._ns.lookup(parent_inode, os.fsdecode(name))
        return self._entry(node.ino, attrs)

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self._ns.forget(ino, nlookup)

    @_handler
    async def getattr(self, inode: int) -> Entry:
        handle = self._copy_handle.get(inode)
        if handle is not None:
            # Open on a working copy: the file those handles write, whatever
            # its name has become (unlinked, renamed, replaced).
            return self._entry(inode, self._cache.attrs_of(handle))
        node, attrs = await self._ns.getattr(inode)
        return self._entry(node.ino, attrs)

    @_handler
    async def readlink(self, inode: int) -> bytes:
        _, attrs = await self._ns.getattr(inode)
        if attrs.kind is not FileKind.SYMLINK or attrs.link_target is None:
            raise FUSEError(errno.EINVAL)
        return os.fsencode(attrs.link_target)

    @_handler
    async def statfs(self) -> Statfs:
        """The cache's room, in cache blocks: its limit, and what is left of
        it for new data (a file written needs room until it is flushed)."""
        limit, available = self._cache.space()
        bs = self._block_size
        return Statfs(
            bsize=bs,
            frsize=bs,
            blocks=limit // bs,
            bfree=available // bs,
            bavail=available // bs,
            files=len(self._ns),
        )

    @_handler
    async def getxattr(self, inode: int, name: bytes) -> bytes:
        # ENOSYS, not ENOATTR: the kernel then stops asking for the rest of the
        # mount (ls -l would ask twice per entry) and callers get EOPNOTSUPP,
        # which is true: the mirror has no extended attributes.
        raise FUSEError(errno.ENOSYS)

    @_handler
    async def listxattr(self, inode: int) -> list[bytes]:
        return []

    @_handler
    async def setattr(self, inode: int, attr: SetAttr) -> Entry:
        """Size, mode and modification time; the access time is not kept, and
        the owner is the mount's (a change of it: EPERM)."""
        self._check_writable()
        node = self._ns.node(inode)
        if attr.uid not in (None, self._uid) or attr.gid not in (None, self._gid):
            raise FUSEError(errno.EPERM)
        attrs: FileAttrs | None = None
        if attr.size is not None:
            if node.kind is not FileKind.FILE:
                raise FUSEError(errno.EISDIR if node.kind is FileKind.DIR else errno.EINVAL)
            base = await self._version_of(node)
            # ftruncate: the file of that handle, even unlinked or renamed since.
            handle = None if attr.fh is None else self._files.get(attr.fh)
            attrs = await self._cache.set_size(node.file_id, attr.size, handle)
            self._changed(node, base, attrs, content=True)
        mode = None if attr.mode is None else attr.mode & 0o7777
        if attr.mtime_now:
            mtime: float | None = time.time()
        elif attr.mtime_ns is not None:
            mtime = attr.mtime_ns / 1_000_000_000
        else:
            mtime = None
        if mode is not None or mtime is not None:
            base = await self._version_of(node)
            attrs = await self._cache.set_attrs(node.file_id, mode, mtime)
            self._changed(node, base, attrs, content=False)
        if attrs is None:  # the access time alone, or the owner as it is
            node, attrs = await self._ns.getattr(inode)
        return self._entry(node.ino, attrs)

    async def _version_of(self, node: Node) -> str:
        """The version of *node*'s file a change to it is made from."""
        if node.kind is not FileKind.FILE:
            return ""
        return (await self._cache.getattr(node.file_id)).version

    def _changed(self, node: Node, base: str, attrs: FileAttrs, *, content: bool) -> None:
        """A change through *node* made its file *attrs*, from the version
        *base*: the inode carries on as them if it stood for *base* (or
        already for them).  A size change of an inode the kernel reads with
        passthrough gives the file a new inode instead: those readers keep
        the bytes they had."""
        ino = node.ino
        if self._ns.live_inode(node.file_id) != ino or attrs.kind is not node.kind:
            return  # an inode its path no longer has: it stays as it was
        if node.kind is FileKind.FILE and node.attrs.version != attrs.version:
            if node.attrs.version != base:
                return
            if content and self._modes.has_backing(ino):
                self._ns.renumber(ino)
                return
        self._ns.carry(ino, attrs)

    # -- files ------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int) -> Opened:
        write = flags & os.O_ACCMODE != os.O_RDONLY
        truncate = bool(flags & os.O_TRUNC)
        if write or truncate:
            self._check_writable()
        node = self._ns.node(inode)
        if node.kind is not FileKind.FILE:
            raise FUSEError(errno.EISDIR if node.kind is FileKind.DIR else errno.ELOOP)
        fh_obj = await self._cache.open(node.file_id, write=write, truncate=truncate)
        working = write or truncate or self._cache.has_working_copy(node.file_id)
        fh = next(self._handles)
        try:
            opened = self._bind(inode, fh, fh_obj, flags, working=working)
        except NewInode as e:
            # This open cannot share the inode (another version of the file,
            # a cache file it must not read, or a change to a file the kernel
            # reads with passthrough): the file gets a new inode, which the
            # kernel looks up when told ESTALE, and opens instead (once;
            # open(2) sees nothing).
            log.debug("open of %r: %s: new inode", node.file_id, e)
            with trio.CancelScope(shield=True):  # an interrupted open leaves no handle
                await self._cache.close(fh_obj)
            self._ns.renumber(inode)
            raise FUSEError(errno.ESTALE) from None
        if not working:
            self._walked(node)
        return opened

    def _walked(self, node: Node) -> None:
        """*node* was opened to read: fetch ahead if its directory is being walked."""
        dir_id, _, name = node.file_id.rpartition("/")
        dir_ino = self._ns.live_inode(dir_id)
        if dir_ino is None:
            return
        listing = self._ns.node(dir_ino).listing
        if listing is None:
            return
        names = self._walks.opened(dir_ino, listing, name)
        if names:
            self._cache.fetch_ahead(child_id(dir_id, n) for n in names)

    def _bind(self, ino: int, fh: int, handle: OpenFile, flags: int, *, working: bool) -> Opened:
        """Record *handle* as *fh* of *ino*; how the kernel reads it.

        *working*: *handle* is on the file's working copy, which an inode
        standing for the version it was made from carries on as.  Raises
        NewInode (nothing recorded).
        """
        continues = None
        if working:
            if self._modes.has_backing(ino):
                raise NewInode(f"inode {ino} is read with passthrough, its file is being changed")
            continues = handle.continues
        self._ns.bind(ino, handle.attrs, continues)
        noflush = not self._cache.flushes_on_close(handle)  # one request less per close
        try:
            opened = self._modes.choose(ino, fh, handle, flags, working=working, noflush=noflush)
        except NewInode:
            self._ns.unbind(ino)
            raise
        self._files[fh] = handle
        self._file_inodes[fh] = ino
        if handle.wc is not None:
            self._copy_opens[ino] = self._copy_opens.get(ino, 0) + 1
            self._copy_handle[ino] = handle
        if opened is not None:  # the kernel reads the cached file itself, or reads uncached
            return opened
        # Warm re-reads never reach us: an inode's pages are of its one version,
        # or of its working copy, every write to which goes through them.
        return Opened(fh, keep_cache=True, noflush=noflush)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> Payload:
        return await self._cache.read(self._files[fh], off, size)

    @_handler
    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        return await self._cache.write(self._files[fh], offset, data)

    @_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self._cache.fsync(self._files[fh])

    @_handler
    async def flush(self, fh: int) -> None:
        handle = self._files.get(fh)
        if handle is not None:
            await self._cache.flush_on_close(handle)

    @_handler
    async def release(self, fh: int) -> None:
        self._modes.released(fh)
        ino = self._file_inodes.pop(fh)
        self._ns.unbind(ino)
        handle = self._files.pop(fh)
        if handle.wc is not None:
            left = self._copy_opens.get(ino, 1) - 1
            if left:
                self._copy_opens[ino] = left
            else:
                self._copy_opens.pop(ino, None)
                self._copy_handle.pop(ino, None)
        await self._cache.close(handle)

    @_handler
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int
    ) -> tuple[Entry, Opened]:
        node, handle = await self._make_file(parent_inode, name, mode, bool(flags & os.O_EXCL))
        fh = next(self._handles)
        try:
            opened = self._bind(node.ino, fh, handle, flags, working=True)
        except BaseException:  # only a bug gets here
            with trio.CancelScope(shield=True):
                await self._cache.close(handle)
            raise
        return self._entry(node.ino, handle.attrs), opened

    @_handler
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int) -> Entry:
        self._check_writable()
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise FUSEError(errno.EPERM)  # no devices, fifos or sockets in a mirror
        node, handle = await self._make_file(parent_inode, name, mode, True)
        with trio.CancelScope(shield=True):
            await self._cache.close(handle)
        return self._entry(node.ino, handle.attrs)

    async def _make_file(
        self, parent_inode: int, name: bytes, mode: int, exclusive: bool
    ) -> tuple[Node, OpenFile]:
        """A new file (or, unless *exclusive*, the existing one cut to nothing)
        and a handle writing it; the kernel's reference to it counted."""
        self._check_writable()
        file_id = self._child(parent_inode, name)
        handle = await self._cache.create(file_id, mode & 0o7777, exclusive=exclusive)
        # An inode of the file cut to nothing carries on as it, as on an open
        # with O_TRUNC (the kernel drops its pages when told the size).
        ino = self._ns.live_inode(file_id)
        if (
            ino is not None
            and handle.continues
            and not self._modes.has_backing(ino)
            and self._ns.carries(ino, handle.continues)
        ):
            self._ns.carry(ino, handle.attrs)
        return self._ns.added(file_id, handle.attrs), handle

    # -- directories ------------------------------------------------------

    @_handler
    async def opendir(self, inode: int) -> Opened:
        node = self._ns.node(inode)
        if node.kind is not FileKind.DIR:
            raise FUSEError(errno.ENOTDIR)
        listing = await self._ns.list_dir(inode)
        parent = self._ns.live_inode(parent_id(node.file_id)) if node.file_id else inode
        fh = next(self._handles)
        # The kernel caches what it reads of this snapshot, and keeps it while
        # the snapshot is the one it was given last: any change, through the
        # mount or seen in the source, makes a new snapshot.
        keep = node.kernel_listing is listing
        if not keep:
            node.kernel_listing, node.kernel_gen = listing, next(self._gens) & GEN_MASK
        # A snapshot per open directory keeps readdir offsets stable.
        self._dirs[fh] = _OpenDir(inode, parent or inode, listing, node.kernel_gen)
        return Opened(fh, keep_cache=keep, cache_dir=True)

    def _snapshot(self, d: _OpenDir, gen: int) -> None:
        """The kernel goes on reading *d* at an offset of snapshot *gen*: it
        served the start from its cache, filled from another open of the
        directory.  The rest comes from that snapshot, while one of the
        directory's opens still has it (else, rarely, from *d*'s own)."""
        for other in self._dirs.values():
            if other.gen == gen and other.ino == d.ino:
                d.listing, d.gen = other.listing, gen
                return
        node = self._ns.node(d.ino)
        if node.kernel_gen == gen and node.kernel_listing is not None:
            d.listing, d.gen = node.kernel_listing, gen

    @_handler
    async def readdir(self, fh: int, start_id: int, reply: DirReply) -> None:
        d = self._dirs[fh]
        dir_id = self._ns.node(d.ino).file_id  # where it is now, if it was moved
        # Offsets: 1 after ".", 2 after "..", 3 + i after listing[i], each
        # with the snapshot's number above bit 32: the kernel's cache of a
        # directory is shared by its opens, and an offset must say which
        # snapshot it counts in.
        gen = start_id >> 32
        if start_id and gen != d.gen:
            self._snapshot(d, gen)
        high = d.gen << 32
        for index in range(start_id & 0xFFFFFFFF, 2 + len(d.listing)):
            if index < 2:
                name, ino = (b".", d.ino) if index == 0 else (b"..", d.parent_ino)
                # The kernel takes no reference for these: no lookup count.
                if not reply.add(name, self._entry(ino, _DOT), high | (index + 1)):
                    return
                continue
            entry = d.listing[index - 2]
            file_id = child_id(dir_id, entry.name)
            shown = self._ns.listed(file_id, entry.attrs)
            ino = self._ns.inode_number(file_id, shown)
            if not reply.add(os.fsencode(entry.name), self._entry(ino, shown), high | (index + 1)):
                return
            if reply.plus:  # the kernel now holds a reference
                self._ns.remember(file_id, shown, ino)

    @_handler
    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @_handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int) -> Entry:
        self._check_writable()
        dir_id = self._child(parent_inode, name)
        attrs = await self._cache.make_dir(dir_id, mode & 0o7777)
        return self._entry(self._ns.added(dir_id, attrs).ino, attrs)

    @_handler
    async def symlink(self, parent_inode: int, name: bytes, target: bytes) -> Entry:
        self._check_writable()
        file_id = self._child(parent_inode, name)
        attrs = await self._cache.make_symlink(file_id, os.fsdecode(target))
        return self._entry(self._ns.added(file_id, attrs).ino, attrs)

    @_handler
    async def unlink(self, parent_inode: int, name: bytes) -> None:
        self._check_writable()
        file_id = self._child(parent_inode, name)
        await self._cache.remove_file(file_id)
        self._ns.removed(file_id)

    @_handler
    async def rmdir(self, parent_inode: int, name: bytes) -> None:
        self._check_writable()
        dir_id = self._child(parent_inode, name)
        await self._cache.remove_dir(dir_id)
        self._ns.removed(dir_id)

    @_handler
    async def rename(
        self, parent_inode: int, name: bytes, new_parent_inode: int, new_name: bytes, flags: int
    ) -> None:
        """Moves keep the inode (and a directory's, those of everything in it);
        open files stay open.  RENAME_EXCHANGE: EINVAL."""
        self._check_writable()
        if flags & ~RENAME_NOREPLACE:  # RENAME_EXCHANGE (or RENAME_WHITEOUT)
            raise FUSEError(errno.EINVAL)
        old_id = self._child(parent_inode, name)
        new_id = self._child(new_parent_inode, new_name)
        await self._cache.rename(old_id, new_id, replace=not flags & RENAME_NOREPLACE)
        self._ns.renamed(old_id, new_id)

    # -- the rest ---------------------------------------------------------

    @_handler
    async def change(self, request: str) -> None:
        """Changes the mount does not make (*request*: "link", "setxattr",
        "fallocate", ...): EROFS on a read-only mount, else EPERM for hard
        links (a mirror has none) and EOPNOTSUPP for the rest."""
        self._check_writable()
        raise FUSEError(_UNSUPPORTED.get(request, errno.EOPNOTSUPP))
