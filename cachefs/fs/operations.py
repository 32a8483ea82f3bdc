"""The FUSE request handlers: the one place that raises FUSEError.

Every handler goes through :func:`_handler`, which is the single translation
from the rest of cachefs to errno: a CacheFSError answers with its
``errno`` (NotFound -> ENOENT, ReadFailed -> EIO, ...); anything else is a
bug, logged with its traceback and answered with EIO, and the mount stays
up.  The file system is read-only: every change answers EROFS.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any, ParamSpec, TypeVar, cast

import trio

from cachefs.contract import DirEntry, FileAttrs, FileKind
from cachefs.engine import FileCache, OpenFile
from cachefs.errors import CacheFSError
from cachefs.fs.inodes import Namespace, NewInode, child_id
from cachefs.fs.passthrough import OpenModes
from cachefs.fuse.api import DirReply, Entry, FUSEError, Kernel, Opened, Payload, Statfs

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

_KIND_BITS = {
    FileKind.FILE: stat.S_IFREG,
    FileKind.DIR: stat.S_IFDIR,
    FileKind.SYMLINK: stat.S_IFLNK,
}
_DEFAULT_PERMS = {FileKind.FILE: 0o444, FileKind.DIR: 0o555, FileKind.SYMLINK: 0o777}


_DOT = FileAttrs(FileKind.DIR, size=0, mtime=0.0, version="")


@dataclass(frozen=True, slots=True)
class _OpenDir:
    file_id: str
    ino: int
    parent_ino: int
    listing: list[DirEntry]


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
            log.debug("%s%r: %s: %s", fn.__name__, args, type(e).__name__, e)
            raise FUSEError(e.errno) from None
        except Exception:
            log.exception("unexpected error in %s%r; answering EIO", fn.__name__, args)
            raise FUSEError(errno.EIO) from None

    return cast(Callable[P, Coroutine[Any, Any, T]], handle)


class Operations:
    """A read-only view of the source, served through the engine (a cachefs.fuse.api.Operations).

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
        self._modes = OpenModes(kernel, cache)
        self._dirs: dict[int, _OpenDir] = {}

    def init(self) -> None:
        """The kernel's INIT request: calls *on_init*.

        Called once the kernel has taken the INIT answer: a task woken by
        *on_init* sees the connection set up (settings the kernel takes from
        that answer, such as its readahead, are final by then).  Must not raise.
        """
        self._on_init()

    def _entry(self, ino: int, attrs: FileAttrs) -> Entry:
        # The source's own bits, so that the kernel refuses what the source
        # would (default_permissions); read-only defaults where it has none.
        perms = _DEFAULT_PERMS[attrs.kind] if attrs.mode is None else attrs.mode & 0o7777
        if attrs.kind is not FileKind.SYMLINK:
            perms &= ~0o222  # read-only
        if attrs.kind is FileKind.SYMLINK:
            size = len(os.fsencode(attrs.link_target or ""))
        else:
            size = attrs.size
        return Entry(
            ino=ino,
            mode=_KIND_BITS[attrs.kind] | perms,
            size=size,
            mtime_ns=int(attrs.mtime * 1_000_000_000),
            uid=self._uid,
            gid=self._gid,
            nlink=2 if attrs.kind is FileKind.DIR else 1,
            blksize=self._block_size,
            timeout=self._ttl,
        )

    # -- names and attributes -------------------------------------------

    @_handler
    async def lookup(self, parent_inode: int, name: bytes) -> Entry:
        node, attrs = await self._ns.lookup(parent_inode, os.fsdecode(name))
        return self._entry(node.ino, attrs)

    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, nlookup in inode_list:
            self._ns.forget(ino, nlookup)

    @_handler
    async def getattr(self, inode: int) -> Entry:
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
        """The space of the disk that holds the cache, in cache blocks."""
        disk = os.statvfs(self._cache.cache_dir)
        scale = disk.f_frsize / self._block_size
        return Statfs(
            bsize=self._block_size,
            frsize=self._block_size,
            blocks=int(disk.f_blocks * scale),
            bfree=int(disk.f_bfree * scale),
            bavail=int(disk.f_bavail * scale),
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

    # -- files ------------------------------------------------------------

    @_handler
    async def open(self, inode: int, flags: int) -> Opened:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FUSEError(errno.EROFS)
        node = self._ns.node(inode)
        if node.kind is not FileKind.FILE:
            raise FUSEError(errno.EISDIR if node.kind is FileKind.DIR else errno.ELOOP)
        fh_obj = await self._cache.open(node.file_id)
        fh = next(self._handles)
        try:
            self._ns.bind(inode, fh_obj.attrs)
            try:
                opened = self._modes.choose(inode, fh, fh_obj, flags)
            except NewInode:
                self._ns.unbind(inode)
                raise
        except NewInode as e:
            # This open cannot share the inode (another version of the file,
            # or a cache file it must not read): the file gets a new inode,
            # which the kernel looks up when told ESTALE, and opens instead
            # (once; open(2) sees nothing).
            log.debug("open of %r: %s: new inode", node.file_id, e)
            with trio.CancelScope(shield=True):  # an interrupted open leaves no handle
                await self._cache.close(fh_obj)
            self._ns.renumber(inode)
            raise FUSEError(errno.ESTALE) from None
        self._files[fh] = fh_obj
        self._file_inodes[fh] = inode
        if opened is not None:  # the kernel reads the cached file itself, or reads uncached
            return opened
        # Warm re-reads never reach us: an inode's pages are of its one version.
        return Opened(fh, keep_cache=True)

    @_handler
    async def read(self, fh: int, off: int, size: int) -> Payload:
        return await self._cache.read(self._files[fh], off, size)

    @_handler
    async def flush(self, fh: int) -> None:
        pass

    @_handler
    async def release(self, fh: int) -> None:
        self._modes.released(fh)
        self._ns.unbind(self._file_inodes.pop(fh))
        await self._cache.close(self._files.pop(fh))

    # -- directories ------------------------------------------------------

    @_handler
    async def opendir(self, inode: int) -> int:
        node = self._ns.node(inode)
        if node.kind is not FileKind.DIR:
            raise FUSEError(errno.ENOTDIR)
        listing = await self._ns.list_dir(inode)
        parent = self._ns.live_inode(node.file_id.rpartition("/")[0]) if node.file_id else inode
        fh = next(self._handles)
        # A snapshot per open directory keeps readdir offsets stable.
        self._dirs[fh] = _OpenDir(node.file_id, inode, parent or inode, listing)
        return fh

    @_handler
    async def readdir(self, fh: int, start_id: int, reply: DirReply) -> None:
        d = self._dirs[fh]
        # Offsets: 1 after ".", 2 after "..", 3 + i after listing[i].
        for index in range(start_id, 2 + len(d.listing)):
            if index < 2:
                name, ino = (b".", d.ino) if index == 0 else (b"..", d.parent_ino)
                # The kernel takes no reference for these: no lookup count.
                if not reply.add(name, self._entry(ino, _DOT), index + 1):
                    return
                continue
            entry = d.listing[index - 2]
            file_id = child_id(d.file_id, entry.name)
            shown = self._ns.listed(file_id, entry.attrs)
            ino = self._ns.inode_number(file_id, shown)
            if not reply.add(os.fsencode(entry.name), self._entry(ino, shown), index + 1):
                return
            if reply.plus:  # the kernel now holds a reference
                self._ns.remember(file_id, shown)

    @_handler
    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    # -- changes: read-only -----------------------------------------------

    async def change(self, request: str) -> None:
        """Writes, creation, removal, renames and attribute changes: read-only."""
        raise FUSEError(errno.EROFS)


class KernelInvalidator:
    """Tells the namespace, and where asked the kernel, that a file changed.

    ``notify`` is the engine's ``on_invalidate`` callback (called on the trio
    thread; never blocks): a version of the file was dropped, so its
    directory is listed again.  The kernel needs no word of it: a new
    version is a new inode (cachefs.fs.inodes), and the old inode's pages
    are still the old version's.  ``drop_pages`` asks the kernel to drop
    the pages of the file's inode too (after ``cachefs purge`` and
    ``reset-file-errors``).  ``forget_entry`` asks it to forget the file's
    name, so that its next use is looked up again although the kernel's
    entry timeout (the mount's TTL) has not run out: for a new version
    learned from elsewhere (a group member), which the kernel would
    otherwise find only once that timeout ends.

    The kernel is told from a worker thread, since it may wait for requests
    this process must answer, and abandoned at unmount, since it may wait
    for requests this process no longer answers.  Pending file ids are
    sets, so the queue is bounded by the number of files.
    """

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._pages: set[str] = set()
        self._entries: set[str] = set()
        self._wakeup = trio.Event()

    def notify(self, file_id: str) -> None:
        self._pending.add(file_id)
        self._wakeup.set()

    def drop_pages(self, file_id: str) -> None:
        self._pages.add(file_id)
        self.notify(file_id)

    def forget_entry(self, file_id: str) -> None:
        self._entries.add(file_id)
        self.notify(file_id)

    async def serve(
        self,
        namespace: Namespace,
        invalidate_inode: Callable[[int], None],
        invalidate_entry: Callable[[int, bytes], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Tell the kernel with *invalidate_inode* and *invalidate_entry* (a
        cachefs.fuse.api.Kernel's; blocking, run in a thread) until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            pending, self._pending = self._pending, set()
            pages, self._pages = self._pages, set()
            entries, self._entries = self._entries, set()
            for file_id in sorted(pending):
                ino = namespace.invalidated(file_id)
                if ino is not None and file_id in pages:
                    try:
                        await trio.to_thread.run_sync(invalidate_inode, ino, abandon_on_cancel=True)
                    except OSError as e:  # ENOENT: the kernel had already let it go
                        if e.errno != errno.ENOENT:
                            log.warning("could not invalidate inode %d (%r): %s", ino, file_id, e)
                parent_id, _, name = file_id.rpartition("/")
                parent = namespace.live_inode(parent_id) if file_id in entries and name else None
                if parent is not None:
                    try:
                        await trio.to_thread.run_sync(
                            invalidate_entry, parent, os.fsencode(name), abandon_on_cancel=True
                        )
                    except OSError as e:  # ENOENT: the kernel had already let it go
                        if e.errno != errno.ENOENT:
                            log.warning("could not invalidate the entry %r: %s", file_id, e)
