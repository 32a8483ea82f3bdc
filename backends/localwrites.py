"""WriteData transfers to a local source (backends.local).

Policy:

- A transfer acts in the directory of its file as found when it started,
  through an fd of it (backends.localfs.pin_parent): a directory swapped
  for a symlink meanwhile never takes a write outside the source.
- A transfer's state is its ``file_context`` (a :class:`Transfer`), made by
  the call that starts it (``*_STARTED``), which checks the precondition:
  the path holds ``req.version`` (backends.localfs.version_of, the tag
  ``stat`` shows), or nothing at all for version "".  Otherwise the call
  answers FILE_MODIFIED_EXTERNALLY and nothing is touched.
- A whole-file transfer (WHOLE_FILE, or any continuous one) writes a
  temporary file beside the target, ``.NAME.cachefs-XXXXXXXX`` (the backend
  never shows such names), which the finishing call cuts to ``req.size``,
  fsyncs and puts in place.  A new file (version "") is put there only if
  the name is still free (renameat2 RENAME_NOREPLACE, else link + unlink),
  so a file another process made meanwhile is never overwritten
  (FILE_MODIFIED_EXTERNALLY); an existing one is renamed over after its
  version is checked once more (a change between that check and the rename
  is lost: POSIX has no compare-and-swap rename).  Readers see the old
  content whole or the new one whole, never a mix.  The new file is a new
  inode: it keeps the old one's owner and permission bits where the daemon
  may give them (setuid and setgid only with the same owner and group),
  not its extended attributes or ACLs.  A new file gets 0666 less the
  daemon's umask (the cache sets the mode it shows afterwards).
- A random transfer (RANDOM_STARTED ... RANDOM_FINISHED) writes in place
  through an fd of the file, opened without following a symlink; readers
  may see a mix while it runs.  (With version "" it creates the file,
  O_EXCL.)  What it wrote before a failure stays written: the cache sends
  the transfer again.
- The finishing call (CONTINUOUS_FINISHED, RANDOM_FINISHED) fsyncs the file
  (and its directory when it put a new entry there) and sets
  ``req.new_version`` to the version of the file written, from an fstat
  after it was put in place.
- A CANCELED call, and any failure, closes the fd and removes the temporary
  file, or the file the transfer created; the target is as it was (but for
  a random transfer's writes).  Transfers still open when the backend
  closes are dropped the same way.
- Errors, by errno: ENOENT, ENOTDIR, ELOOP, EISDIR, ENXIO, ENODEV where a
  file at a version was expected -> FILE_MODIFIED_EXTERNALLY (it is gone or
  is something else now); EEXIST for a new file -> FILE_MODIFIED_EXTERNALLY;
  EACCES, EPERM, EROFS, ENAMETOOLONG, EFBIG, EINVAL, ETXTBSY, EXDEV, EMLINK,
  and the errnos above elsewhere (a new file's directory is missing) ->
  FILE_FAILURE (this file is refused: the cache latches it and keeps its
  data); ENOSPC, EDQUOT, EIO and anything else -> FAILURE (the cache keeps
  the data and tries again with backoff: space may be freed, a disk may
  come back).  A file id the backend refuses (outside the root, below a
  symlink, cachefs's own) -> FILE_FAILURE.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from backends.localfs import fsync_dir, link_noreplace, pin_parent, temp_name, version_of
from cachefs.contract import RWEvent, RWResult, WriteData

log = logging.getLogger(__name__)

_STARTING = RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED | RWEvent.RANDOM_STARTED
_FINISHING = RWEvent.CONTINUOUS_FINISHED | RWEvent.RANDOM_FINISHED
_WHOLE = RWEvent.WHOLE_FILE | RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED
# errnos meaning "the file expected at that path is gone or is something else"
_GONE = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENODEV}
)
# errnos refusing this one file (FILE_FAILURE); any other errno is FAILURE
_REFUSED = _GONE | {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EFBIG,
    errno.EINVAL,
    errno.ETXTBSY,
    errno.EXDEV,
    errno.EMLINK,
    errno.EEXIST,
}
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo put at the path must not block the open.
_EXISTING = os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_TEMP_TRIES = 5


class _Conflict(Exception):
    """The path does not hold the version the transfer was made against."""


class Transfer:
    """The file_context of one transfer: the fd written, the temporary file
    a whole-file transfer puts in place at its end (None for a random one),
    and whether the transfer created the file itself."""

    __slots__ = ("file_id", "path", "version", "fd", "temp", "created", "dir_fd")

    def __init__(
        self, file_id: str, path: str, version: str, fd: int, temp: str | None, created: bool
    ) -> None:
        self.file_id = file_id
        self.path = path
        self.version = version
        self.fd = fd
        self.temp = temp
        self.created = created
        self.dir_fd = -1  # the directory *path* is pinned to (localfs.pin_parent)

    def __repr__(self) -> str:
        kind = "whole" if self.temp is not None else "random"
        return f"Transfer({self.file_id!r}, {kind}, fd={self.fd})"

    def close(self) -> None:
        """Drop what the transfer made and did not finish: its temporary
        file, a file it created (if the path still names it), its fd."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if self.temp is not None:
                _unlink_quietly(self.temp)
            elif self.created and _names(self.path, fd):
                _unlink_quietly(self.path)
        finally:
            os.close(fd)
            if self.dir_fd >= 0:
                os.close(self.dir_fd)
                self.dir_fd = -1


class Transfers:
    """The transfers under way: :meth:`write` serves one call of one;
    :meth:`close_all` drops those the cache never ended (the backend closes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[Transfer] = set()

    def write(self, req: WriteData, path_of: Callable[[str], str]) -> None:
        """One WriteData call (blocking); see the module policy.  *path_of*
        is the backend's path of a file id (OSError if refused); the
        transfer acts in the directory it names as checked when it started
        (localfs.pin_parent), never in one swapped in there later."""
        ctx = req.file_context
        tr = ctx if isinstance(ctx, Transfer) else None
        if req.flags & RWEvent.CANCELED:
            if tr is not None:
                self._drop(tr)
            return
        try:
            if req.flags & _STARTING:
                if tr is not None:  # started again: the first attempt is void
                    self._drop(tr)
                tr = None
                dir_fd, path = pin_parent(path_of(req.file_id))
                try:
                    tr = _start(req, path)
                except BaseException:
                    os.close(dir_fd)
                    raise
                tr.dir_fd = dir_fd
                with self._lock:
                    self._open.add(tr)
                req.file_context = tr
            elif tr is None or tr.fd < 0:
                log.warning("write %s @%d: no transfer under way", req.file_id, req.position)
                req.bytes_written, req.result_code = 0, RWResult.FAILURE
                return
            data = req.buffer[: req.bytes_to_write]
            # A fresh temporary file reads as zeros where nothing was written:
            # zeros are skipped, so a sparse file stays sparse in the source.
            if tr.temp is None or not _all_zero(data):
                _pwrite_all(tr.fd, data, req.position)
            if req.flags & _FINISHING:
                req.new_version = _finish(tr, req.size)
                self._drop(tr)
        except _Conflict as e:
            self._fail(req, tr, RWResult.FILE_MODIFIED_EXTERNALLY, str(e))
        except OSError as e:
            code = RWResult.FILE_FAILURE if e.errno in _REFUSED else RWResult.FAILURE
            self._fail(req, tr, code, e.strerror or str(e))
        else:
            req.bytes_written, req.result_code = req.bytes_to_write, RWResult.SUCCESS

    def close_all(self) -> None:
        with self._lock:
            left, self._open = self._open, set()
        for tr in left:
            log.info("dropping the unfinished write of %s", tr.file_id)
            tr.close()

    def _drop(self, tr: Transfer) -> None:
        with self._lock:
            self._open.discard(tr)
        tr.close()

    def _fail(self, req: WriteData, tr: Transfer | None, code: RWResult, why: str) -> None:
        log.debug("write %s @%d: %s (%s)", req.file_id, req.position, code.name, why)
        req.bytes_written, req.result_code = 0, code
        if tr is not None:
            self._drop(tr)


_ZEROS = bytes(4 << 20)


def _all_zero(data: memoryview) -> bool:
    """Whether *data* holds only zeros (a look at three bytes rejects most data)."""
    n = len(data)
    if n and (data[0] or data[n // 2] or data[n - 1]):
        return False
    return bytes(data) == (_ZEROS if n == len(_ZEROS) else bytes(n))


def _start(req: WriteData, path: str) -> Transfer:
    if req.flags & _WHOLE:
        return _start_whole(req, path)
    if not req.version:
        try:
            fd = os.open(path, _NEW, 0o666)
        except FileExistsError:
            raise _Conflict("a new file's name is taken") from None
        return Transfer(req.file_id, path, "", fd, None, created=True)
    try:
        fd = os.open(path, _EXISTING)
    except OSError as e:
        if e.errno in _GONE:
            raise _Conflict(f"the file is gone: {e.strerror}") from None
        raise
    if version_of(os.fstat(fd)) != req.version:
        os.close(fd)
        raise _Conflict("the file is at another version")
    return Transfer(req.file_id, path, req.version, fd, None, created=False)


def _start_whole(req: WriteData, path: str) -> Transfer:
    parent, name = os.path.split(path)
    old = _at_version(path, req.version) if req.version else None
    if old is None and os.path.lexists(path):
        raise _Conflict("a new file's name is taken")
    temp, fd = _make_temp(parent, name, 0o600 if old is not None else 0o666)
    try:
        if old is not None:
            _take_over(fd, old)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    return Transfer(req.file_id, path, req.version, fd, temp, created=False)


def _finish(tr: Transfer, size: int) -> str:
    """Make what the transfer wrote durable and put it in place; its version."""
    if tr.temp is not None:
        os.ftruncate(tr.fd, size)
    os.fsync(tr.fd)
    new_entry = tr.created
    if tr.temp is not None:
        if tr.version:
            _at_version(tr.path, tr.version)
            os.rename(tr.temp, tr.path)
        else:
            try:
                link_noreplace(tr.temp, tr.path)
            except FileExistsError:
                raise _Conflict("a new file's name was taken meanwhile") from None
        tr.temp, new_entry = None, True
    tr.created = False  # in place: closing it now removes nothing
    if new_entry:
        fsync_dir(os.path.dirname(tr.path))
    return version_of(os.fstat(tr.fd))


def _at_version(path: str, version: str) -> os.stat_result:
    """The status of *path*; _Conflict unless it is at *version*."""
    try:
        s = os.lstat(path)
    except OSError as e:
        if e.errno in _GONE:
            raise _Conflict(f"the file is gone: {e.strerror}") from None
        raise
    if version_of(s) != version:
        raise _Conflict("the file is at another version")
    return s


def _make_temp(parent: str, name: str, mode: int) -> tuple[str, int]:
    for _ in range(_TEMP_TRIES):
        temp = os.path.join(parent, temp_name(name))
        try:
            return temp, os.open(temp, _NEW, mode)
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free temporary name", parent)


def _take_over(fd: int, old: os.stat_result) -> None:
    """Give the new file the owner and permission bits of the one it replaces,
    as far as the daemon may: setuid and setgid only where both stay the same."""
    try:
        os.fchown(fd, old.st_uid, old.st_gid)
    except PermissionError:
        pass
    now = os.fstat(fd)
    mode = old.st_mode & 0o7777
    if now.st_uid != old.st_uid or now.st_gid != old.st_gid:
        mode &= 0o1777
    os.fchmod(fd, mode)


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], position + done)
        if n <= 0:
            raise OSError(errno.EIO, "the file took no bytes")
        done += n


def _names(path: str, fd: int) -> bool:
    """Whether *path* still names the file open as *fd*."""
    try:
        s, mine = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (s.st_dev, s.st_ino) == (mine.st_dev, mine.st_ino)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove %s: %s", path, e.strerror)
