"""A directory as a blob store (scheme ``file``): for tests, or a shared filesystem.

Policy:

- A plain path or ``file:///abs/path`` (cachefs.contract.local_path) names
  a directory that must exist: it is never created, so a mistyped path or
  an unmounted share is a one-line SourceError, not a cache quietly kept on
  the local disk.
- The blob *name* is the file ``<dir>/<name>``; the directories above it are
  made as needed.  A name whose file is missing, or is a directory, is
  absent (None, False).
- ``put_blob`` writes a temporary file beside the blob and renames it into
  place: a reader sees the whole blob or none, never part of one.  Nothing
  is fsynced: a blob lost in a crash is fetched from the origin again.
- Every other failure is an OSError with a one-line reason.
- Every call runs in a trio worker thread, at most ``max_threads`` at a time;
  a cancelled caller stops waiting at once (the thread finishes on its own).
- The options of other blob stores (an S3 endpoint, timeouts) are accepted
  and ignored, so that the caller passes the same options whatever the URL.
"""

from __future__ import annotations

import errno
import os
import stat as st
import tempfile
from collections.abc import Callable
from typing import TypeVar

import trio

from backends.blobnames import check_name
from cachefs.contract import local_path
from cachefs.errors import SourceError

T = TypeVar("T")

_TMP_PREFIX = ".cachefs-tmp-"
# errnos meaning "there is no blob at that path"
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR})
# the options of backends.s3blobs.open_blob_store, meaningless here
_IGNORED = frozenset(
    {
        "endpoint",
        "anonymous",
        "path_style",
        "region",
        "timeout",
        "connect_timeout",
        "retries",
        "check_timeout",
    }
)


def _error(e: OSError, what: str) -> OSError:
    """A one-line OSError keeping *e*'s errno."""
    return OSError(e.errno, f"{what}: {e.strerror or e}")


class LocalBlobs:
    """Blobs as the files below *root* (an absolute path)."""

    def __init__(self, root: str, *, max_threads: int = 8) -> None:
        self.root = root
        self._limiter = trio.CapacityLimiter(max_threads)

    def __repr__(self) -> str:
        return f"LocalBlobs({self.root!r})"

    async def _run(self, fn: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def _get(self, path: str, name: str, limit: int | None) -> bytes | None:
        try:
            with open(path, "rb") as f:
                return f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            if e.errno in _ABSENT:
                return None
            raise _error(e, f"reading blob {name} in {self.root}") from None

    def _has(self, path: str, name: str) -> bool:
        try:
            return st.S_ISREG(os.stat(path).st_mode)
        except OSError as e:
            if e.errno in _ABSENT:
                return False
            raise _error(e, f"looking up blob {name} in {self.root}") from None

    def _put(self, path: str, name: str, data: bytes) -> None:
        parent = os.path.dirname(path)
        try:
            os.makedirs(parent, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=parent)
        except OSError as e:
            raise _error(e, f"writing blob {name} in {self.root}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(data)
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise _error(e, f"writing blob {name} in {self.root}") from None
            raise

    async def get_blob(self, name: str, limit: int | None = None) -> bytes | None:
        """The blob's bytes (at most *limit* + 1 of them); None if there is none."""
        path = self._path(name)
        return await self._run(lambda: self._get(path, name, limit))

    async def has_blob(self, name: str) -> bool:
        """Whether the blob exists."""
        path = self._path(name)
        return await self._run(lambda: self._has(path, name))

    async def put_blob(self, name: str, data: bytes) -> None:
        """Store *data* as the blob, replacing it atomically."""
        path = self._path(name)
        await self._run(lambda: self._put(path, name, data))

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def open_blob_store(url_or_path: str, *, max_threads: int = 8, **options: object) -> LocalBlobs:
    """Open the directory *url_or_path* as a blob store.

    SourceError (one line) when the URL is malformed or the directory is
    missing or not a directory; TypeError for an option no blob store knows.
    """
    unknown = sorted(set(options) - _IGNORED)
    if unknown:
        raise TypeError(f"open_blob_store() got unexpected keyword arguments: {unknown}")
    path = local_path(url_or_path)
    if path is None:
        raise SourceError(f"not a directory URL: {url_or_path!r}")
    root = os.path.abspath(path)
    if not os.path.exists(root):
        raise SourceError(f"blob store directory {root} does not exist")
    if not os.path.isdir(root):
        raise SourceError(f"blob store {root} is not a directory")
    return LocalBlobs(root, max_threads=max_threads)
