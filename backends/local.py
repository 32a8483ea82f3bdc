"""A local directory as a cachefs source (scheme ``file``).

Policy:

- A file_id is the POSIX path relative to the root, without a leading slash;
  ``""`` is the root.  Nothing outside the root is ever reached: a file_id
  that is absolute, contains ``..``, ``.`` or empty components, or whose
  parent directories pass through a symlink is treated as absent, checked
  by the same kernel walk that acts on it (backends.localfs: no swap of a
  directory for a symlink between a check and the act).  Symlinks are
  shown as symlinks (``lstat``, ``O_NOFOLLOW``), never followed.
- Only regular files, directories and symlinks are shown; fifos, sockets and
  devices are absent (opening a fifo would block a worker thread forever).
- The version tag of an entry is ``"{st_ino}-{st_mtime_ns}-{st_size}-{st_ctime_ns}"``:
  the ctime changes with every write, truncation and rename-over, and no
  user can set it, so restoring an mtime (``touch -d``) cannot hide a change
  (a chmod or chown changes it too: the file is fetched again).  A read is
  checked after the fact: when the open file no longer has ``req.version``
  (its bytes may be of another version), the path is re-opened once: if the
  path now has that version the read is served from it, otherwise it
  answers FILE_MODIFIED_EXTERNALLY.  The engine keeps one context per
  version, so a reader of a file replaced by rename (or deleted) keeps
  reading the inode it opened: unlinking changes an inode's ctime, not its
  bytes, so an inode no longer linked anywhere is compared without it.
- Read errors: a path that vanished or became something else than a regular
  file answers FILE_MODIFIED_EXTERNALLY; any other OSError answers FAILURE.
- Every blocking call runs in a worker thread (cachefs.threads), at most
  ``max_threads`` at a time; a ReadData call is exactly one thread hop.
- A read of whole pages none of which is in the page cache, into a
  page-aligned buffer (the cache's fetch buffers are), bypasses the page
  cache (O_DIRECT, on a second fd of the same inode): the cache keeps its
  own copy, so the source's would be a second one, and filling it costs a
  copy and fresh memory for every byte.  A file whose filesystem refuses
  O_DIRECT is read through the page cache.
- Content information (``cachefs publish``; backends.localci) is stored as
  ``<root>/.cachefs-ci/<file_id>``, the record's JSON, replaced atomically
  (temporary file, fsync, rename).  ``.cachefs-ci`` is never shown, at any
  depth (a subtree may have been published on its own): it is left out of
  listings and everything below it is absent.  A
  record that is missing answers None; one that does not parse answers None
  with a warning naming the file; any other OSError is raised.
- Writes: every WriteCapability but WHOLE_FILE_ONLY (none when the root's
  file system is mounted read-only).  WriteData transfers as
  backends.localwrites says: a whole file is written beside its target as
  ``.NAME.cachefs-XXXXXXXX`` and renamed over it; such names are never
  shown and are absent, like ``.cachefs-ci``.  Namespace changes as
  backends.localchanges says.  The file ids of a change are checked as a
  read's (both of a rename, a symlink's name; a symlink's target is stored
  as given, it is never followed); the root is never made, removed or
  moved (EBUSY).  Changes run in worker threads that are never abandoned.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as st
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from backends import localchanges, localci
from backends.localci import CI_DIR
from backends.localfs import (
    attrs_of,
    has_version,
    is_temp,
    open_no_symlinks,
    open_parent,
    pin_parent,
    version_of,
)
from backends.localreads import OpenFile, pread_into, read_into
from backends.localwrites import Transfers
from cachefs.contract import (
    ChangeResult,
    ContentInfo,
    DirEntry,
    FileAttrs,
    ReadData,
    RWEvent,
    RWResult,
    WriteCapability,
    WriteData,
    local_path,
)
from cachefs.errors import SourceError
from cachefs.threads import Workers

log = logging.getLogger(__name__)

T = TypeVar("T")

# O_NONBLOCK: opening a fifo must not block; it is then refused by fstat.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# errnos meaning "the file the cache knows is no longer at that path"
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENODEV})
WRITE_CAPABILITIES = WriteCapability.POSIX


class LocalBackend:
    """Serve the directory *root* (which must exist), writable unless its
    file system is mounted read-only."""

    def __init__(self, root: str | Path, *, max_threads: int = 16) -> None:
        self.root = os.path.realpath(root)
        self._jobs = Workers(max_threads, "cachefs-local")
        self._transfers = Transfers()
        self._caps = WRITE_CAPABILITIES
        if os.statvfs(self.root).f_flag & os.ST_RDONLY:
            self._caps = WriteCapability(0)

    def __repr__(self) -> str:
        return f"LocalBackend({self.root!r})"

    # -- paths -------------------------------------------------------------

    def _joined(self, file_id: str) -> str:
        """The absolute path of *file_id*, its directories not checked for
        symlinks; FileNotFoundError if it would leave the root."""
        if file_id == "":
            return self.root
        parts = _parts(file_id)
        if CI_DIR in parts or is_temp(parts[-1]):  # at any depth: a source may hold a
            # published subtree; a temporary file is a whole file being written
            raise FileNotFoundError(errno.ENOENT, f"{file_id!r} is cachefs's own")
        return os.path.join(self.root, *parts)

    def _open(self, file_id: str, flags: int) -> int:
        """Open *file_id* with *flags* (O_NOFOLLOW among them) by one walk
        that follows no symlink: FileNotFoundError if a directory above it
        is a symlink, ELOOP if it is one itself.  Never a second walk by
        path: a directory swapped for a symlink in between cannot lead out."""
        path = self._joined(file_id)
        try:
            return open_no_symlinks(path, flags)
        except OSError as e:
            if e.errno != errno.ELOOP or not file_id:
                raise
        # Which symlink: one above it makes it absent, itself is ELOOP.
        dir_fd = open_parent(path)
        try:
            return os.open(os.path.basename(path), flags, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _ci_path(self, file_id: str) -> str:
        """Where the content information of *file_id* is kept, checked by real
        path before localci.write makes the directories above it."""
        return self._below(os.path.join(self.root, CI_DIR), _parts(file_id))

    @staticmethod
    def _below(top: str, parts: list[str]) -> str:
        path = os.path.join(top, *parts)
        parent = os.path.dirname(path)
        if os.path.realpath(parent) != parent:
            raise FileNotFoundError(errno.ENOENT, f"{'/'.join(parts)!r} is below a symlink")
        return path

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._jobs.run(fn, *args)

    async def _run_abandonable(self, fn: Callable[..., T], *args: object) -> T:
        """Like _run for calls that change nothing: a cancelled caller stops
        waiting at once; the thread finishes on its own (cachefs.threads)."""
        return await self._jobs.run(fn, *args, abandonable=True)

    # -- metadata ----------------------------------------------------------

    def _stat_sync(self, file_id: str) -> FileAttrs | None:
        try:
            if not file_id:
                return attrs_of(os.lstat(self.root))
            path = self._joined(file_id)
            name = os.path.basename(path)
            dir_fd = open_parent(path)  # the entry is read in the directory checked
            try:
                s = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                target = os.readlink(name, dir_fd=dir_fd) if st.S_ISLNK(s.st_mode) else None
            finally:
                os.close(dir_fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return attrs_of(s, target)

    async def stat(self, file_id: str) -> FileAttrs | None:
        return await self._run_abandonable(self._stat_sync, file_id)

    def _list_dir_sync(self, dir_id: str) -> list[DirEntry]:
        try:
            dir_fd = self._open(dir_id, _DIR_FLAGS)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise NotADirectoryError(e.errno, f"not a directory: {dir_id!r}") from None
            raise
        try:
            out: list[DirEntry] = []
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if entry.name == CI_DIR or is_temp(entry.name):
                        continue
                    try:
                        s = entry.stat(follow_symlinks=False)
                        target = None
                        if st.S_ISLNK(s.st_mode):
                            target = os.readlink(entry.name, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue  # removed while listing
                    attrs = attrs_of(s, target)
                    if attrs is not None:
                        out.append(DirEntry(entry.name, attrs))
            return out
        finally:
            os.close(dir_fd)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        return await self._run_abandonable(self._list_dir_sync, dir_id)

    # -- data --------------------------------------------------------------

    def _open_sync(self, file_id: str) -> int:
        fd = self._open(file_id, _OPEN_FLAGS)
        try:
            mode = os.fstat(fd).st_mode
            if st.S_ISDIR(mode):
                raise IsADirectoryError(errno.EISDIR, f"is a directory: {file_id!r}")
            if not st.S_ISREG(mode):
                raise OSError(errno.ENODEV, f"not a regular file: {file_id!r}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def open_file(self, file_id: str) -> OpenFile:
        """Open *file_id* for reading; FileNotFoundError if it is absent."""
        return OpenFile(file_id, await self._run(self._open_sync, file_id))

    async def close_file(self, file_id: str, context: object) -> None:
        if isinstance(context, OpenFile):
            await self._run(context.close)

    def _read_sync(self, req: ReadData) -> None:
        ctx = req.file_context if isinstance(req.file_context, OpenFile) else None
        own = ctx is None
        if ctx is not None:
            ctx.enter()
        try:
            if ctx is None:
                ctx = OpenFile(req.file_id, self._open_sync(req.file_id))
            fd = ctx.fd
            done = read_into(ctx, fd, req.buffer, req.position, req.bytes_to_read)
            if req.version and not has_version(os.fstat(fd), req.version):
                # The open file changed; the path may have gone back to (or
                # been renamed to) the version the cache asks for.
                fd = self._open_sync(req.file_id)
                if version_of(os.fstat(fd)) != req.version:
                    os.close(fd)
                    req.bytes_read = 0
                    req.result_code = RWResult.FILE_MODIFIED_EXTERNALLY
                    return
                ctx.replace(fd)
                done = pread_into(fd, req.buffer, req.position, req.bytes_to_read)
            req.bytes_read = done
            if done < req.bytes_to_read:
                req.result_code = RWResult.RANGE_BEYOND_EOF
            else:
                req.result_code = RWResult.SUCCESS
        except OSError as e:
            log.debug("read %r @%d: %s", req.file_id, req.position, e)
            req.bytes_read = 0
            if e.errno in _GONE:
                req.result_code = RWResult.FILE_MODIFIED_EXTERNALLY
            else:
                req.result_code = RWResult.FAILURE
        finally:
            if own and ctx is not None:
                ctx.close()
            elif ctx is not None:
                ctx.leave()

    async def read_data(self, req: ReadData) -> None:
        """Fill ``req.buffer`` straight from the file; see the module policy."""
        if req.bytes_to_read == 0 or req.flags & RWEvent.CANCELED:
            return
        await self._run_abandonable(self._read_sync, req)

    # -- content information (backends.localci) ---------------------------

    def _ci_joined(self, file_id: str) -> str | None:
        """Where the record of *file_id* would be, its directories not checked
        (localci reads and deletes in the directory found holding it, with
        no symlink on the way); None for a name no file can have."""
        try:
            return os.path.join(self.root, CI_DIR, *_parts(file_id))
        except FileNotFoundError:
            return None

    def _read_ci_sync(self, file_id: str) -> ContentInfo | None:
        path = self._ci_joined(file_id)
        return None if path is None else localci.read(path, file_id)

    async def content_info(self, file_id: str) -> ContentInfo | None:
        """The stored record of *file_id*, as stored; None if none or malformed."""
        return await self._run_abandonable(self._read_ci_sync, file_id)

    def _write_ci_sync(self, file_id: str, data: bytes) -> None:
        localci.write(self._ci_path(file_id), data)

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None:
        """Store *info* for *file_id*, replacing any record atomically."""
        await self._run(self._write_ci_sync, file_id, info.to_bytes())

    def _delete_ci_sync(self, file_id: str) -> None:
        path = self._ci_joined(file_id)
        if path is not None:
            localci.delete(path, os.path.join(self.root, CI_DIR))

    async def delete_content_info(self, file_id: str) -> None:
        """Remove the record of *file_id*, if any."""
        await self._run(self._delete_ci_sync, file_id)

    async def content_info_ids(self) -> list[str]:
        """The file ids that have a stored record (for pruning)."""
        return await self._run(localci.file_ids, os.path.join(self.root, CI_DIR))

    # -- writes (backends.localwrites, backends.localchanges) ------------

    @property
    def write_capabilities(self) -> WriteCapability:
        """Everything but WHOLE_FILE_ONLY; nothing on a read-only file system."""
        return self._caps

    async def write_data(self, req: WriteData) -> None:
        """One call of a transfer; see backends.localwrites."""
        await self._run(self._transfers.write, req, self._file_path)

    def _file_path(self, file_id: str) -> str:
        """The path of a file to write; the transfer pins its directory
        (localfs.pin_parent), which checks it for symlinks."""
        if not file_id:
            raise IsADirectoryError(errno.EISDIR, "the root of the source is no file")
        return self._joined(file_id)

    def _change_sync(
        self, fn: Callable[..., ChangeResult], ids: tuple[str, ...], args: tuple[object, ...]
    ) -> ChangeResult:
        what = f"{fn.__name__} {' -> '.join(map(repr, ids))}"
        dir_fds: list[int] = []
        try:
            if "" in ids:  # the root is the mount's: never made, removed or moved
                raise OSError(errno.EBUSY, "the root of the source")
            paths = []
            for file_id in ids:  # each acted on in the directory checked
                dir_fd, path = pin_parent(self._joined(file_id))
                dir_fds.append(dir_fd)
                paths.append(path)
            return fn(*paths, *args)
        except OSError as e:
            return localchanges.refused(e, what)
        finally:
            for dir_fd in dir_fds:
                os.close(dir_fd)

    async def _change(
        self, fn: Callable[..., ChangeResult], ids: tuple[str, ...], *args: object
    ) -> ChangeResult:
        return await self._run(self._change_sync, fn, ids, args)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        return await self._change(localchanges.make_dir, (dir_id,), mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        return await self._change(localchanges.remove_file, (file_id,), version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        return await self._change(localchanges.remove_dir, (dir_id,))

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        return await self._change(localchanges.rename, (old_id, new_id), replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        return await self._change(localchanges.set_size, (file_id,), size, version)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        return await self._change(localchanges.set_attrs, (file_id,), mode, mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        return await self._change(localchanges.make_symlink, (file_id,), target)

    async def aclose(self) -> None:
        """Drop the transfers the cache left unfinished (their temporary files)."""
        await self._run(self._transfers.close_all)


def _parts(file_id: str) -> list[str]:
    """The components of a file id; FileNotFoundError if one is unusable."""
    parts = file_id.split("/")
    if file_id.startswith("/") or "\0" in file_id or any(p in ("", ".", "..") for p in parts):
        raise FileNotFoundError(errno.ENOENT, f"invalid file id {file_id!r}")
    return parts


def _root_of(url: str) -> str:
    root = local_path(url)  # the same reading as the mount's own checks
    if root is None:
        raise SourceError(f"{url!r} is not a local source: expected a path or file:///abs/path")
    return root


def open_backend(url: str, *, max_threads: int = 16) -> LocalBackend:
    """Open a directory given as a plain path or ``file:///abs/path``
    (cachefs.contract.local_path: the scheme in any case).

    Raises SourceError when the URL is malformed, or the directory is
    missing or not a directory.
    """
    root = _root_of(url)
    if not os.path.exists(root):
        raise SourceError(f"source directory {root} does not exist")
    if not os.path.isdir(root):
        raise SourceError(f"source {root} is not a directory")
    return LocalBackend(root, max_threads=max_threads)
