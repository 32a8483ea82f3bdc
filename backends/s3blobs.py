"""An S3 bucket, or a prefix of one, as a blob store (scheme ``s3``): a hosted cache.

Policy:

- ``s3://bucket[/prefix]``; the endpoint, credentials, path style and region
  are found as for an S3 source (backends.s3config, same options).  The blob
  *name* is the object ``<prefix>/<name>``.
- A hosted cache is an optimisation, so it gives up quickly: each request
  has a short deadline (connect 2 s, the whole request 10 s) and is retried
  once.  Unless *check_timeout* is given, opening makes no request: a store
  that is missing or down shows in its first answers, and the caller skips
  it for a while.
- Absent is an answer: a 404 for the object (NoSuchKey) is None from
  ``get_blob`` and False from ``has_blob``.  A missing bucket is a failure
  wherever S3 says so (GET and PUT); a HEAD carries no error document, so
  ``has_blob`` answers False there and the ``put_blob`` that follows fails.
  Every other failure (no connection, refused credentials, a timeout, a 5xx
  after the retry) is an OSError with a one-line reason (backends.s3errors).
- A block is uploaded in one PUT, never as a multipart upload (nothing is
  left behind when it fails midway; S3 takes up to 5 GiB in one PUT).
- Every request runs in a trio worker thread, at most ``max_threads`` at a
  time.  A cancelled caller stops waiting at once; its thread finishes on
  its own, holding its slot until then, so abandoned requests stay bounded.
  An abandoned PUT may still land: names are the hash of their bytes, so it
  lands with the right bytes or not at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import obstore
import trio
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import GetOptions

from backends.blobnames import check_name
from backends.s3config import Target, check, resolve
from backends.s3errors import STORAGE_CODES, error_code, http_status, os_error

log = logging.getLogger(__name__)

T = TypeVar("T")


def _absent(e: Exception) -> bool:
    """Whether *e* says the object is not there (not that the bucket is missing)."""
    return isinstance(e, FileNotFoundError) and error_code(e) not in STORAGE_CODES


class S3Blobs:
    """Blobs as the objects under *target*'s prefix, through obstore's *store*."""

    def __init__(self, target: Target, store: S3Store, *, max_threads: int = 16) -> None:
        self.url = target.url
        self.endpoint = target.shown
        self._store = store
        self._limiter = trio.CapacityLimiter(max_threads)
        self._counts = dict.fromkeys(("gets", "found", "heads", "puts", "errors"), 0)

    def __repr__(self) -> str:
        return f"S3Blobs({self.url!r} at {self.endpoint})"

    def statistics(self) -> dict[str, int]:
        """Requests made so far by kind; ``found``: GETs that returned a blob;
        ``errors``: requests that raised OSError."""
        return dict(self._counts)

    async def _run(self, kind: str, fn: Callable[[], T]) -> T:
        self._counts[kind] += 1
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)
        except OSError:
            self._counts["errors"] += 1
            raise

    def _get(self, name: str, limit: int | None) -> bytes | None:
        try:
            if limit is None:
                return bytes(obstore.get(self._store, name).bytes())
            options: GetOptions = {"range": (0, limit + 1)}
            return bytes(obstore.get(self._store, name, options=options).bytes())
        except Exception as e:
            if _absent(e):
                return None
            if limit is not None and http_status(e) == 416:
                return b""  # an empty object: no range of it exists
            raise os_error(e, self.url) from None

    def _head(self, name: str) -> bool:
        try:
            obstore.head(self._store, name)
            return True
        except Exception as e:
            if _absent(e):
                return False
            raise os_error(e, self.url) from None

    def _put(self, name: str, data: bytes) -> None:
        try:
            obstore.put(self._store, name, data, use_multipart=False)
        except Exception as e:
            raise os_error(e, self.url) from None

    async def get_blob(self, name: str, limit: int | None = None) -> bytes | None:
        """The blob's bytes (at most *limit* + 1 of them); None if there is none."""
        check_name(name)
        data = await self._run("gets", lambda: self._get(name, limit))
        if data is not None:
            self._counts["found"] += 1
        return data

    async def has_blob(self, name: str) -> bool:
        """Whether the blob exists (one HEAD)."""
        check_name(name)
        return await self._run("heads", lambda: self._head(name))

    async def put_blob(self, name: str, data: bytes) -> None:
        """Store *data* as the blob (an existing one is overwritten)."""
        check_name(name)
        await self._run("puts", lambda: self._put(name, data))

    async def aclose(self) -> None:
        """Nothing to release: each request had its own connection."""
        await trio.lowlevel.checkpoint()


def open_blob_store(
    url: str,
    *,
    endpoint: str | None = None,
    anonymous: bool = False,
    path_style: bool | None = None,
    region: str | None = None,
    timeout: float = 10.0,
    connect_timeout: float = 2.0,
    retries: int = 1,
    check_timeout: float | None = None,
    max_threads: int = 16,
) -> S3Blobs:
    """Open ``s3://bucket[/prefix]`` as a blob store (backends.s3config reads the options).

    A request gives up after *timeout* seconds and is retried at most
    *retries* times within *timeout* seconds more.  SourceError (one line)
    for a malformed URL or endpoint; when *check_timeout* is given, also
    when the bucket is missing, refuses the credentials or does not answer
    in time.
    """
    target = resolve(
        url,
        endpoint=endpoint,
        anonymous=anonymous,
        path_style=path_style,
        region=region,
        connect_timeout=connect_timeout,
        read_timeout=timeout,
    )
    store = S3Blobs(target, target.store(timeout, retries, timeout), max_threads=max_threads)
    log.debug("%r: credentials from %s", store, target.keys_from)
    if check_timeout is not None:
        check(target, check_timeout)
    return store
