"""An S3 bucket, or a prefix of one, as a cachefs source (scheme ``s3``).

Policy:

- ``s3://bucket[/prefix]``.  Objects under the prefix are files; "/"-delimited
  common prefixes are directories; a zero-byte ``dir/`` marker object, or the
  ``dir/.cachefs-dir`` marker a mkdir through the mount puts, makes its
  directory exist and is not shown (backends.s3names).  Where a key and a prefix share a
  name, the file is shown.  A key with an empty, ``.`` or ``..`` segment
  cannot be served, and makes its directory fail to list (obstore refuses it).
- The version tag of a file is its ETag.  Reads are ranged GETs pinned to the
  version the cache holds (If-Match on a strong ETag): the object changed
  (412) or vanished (404) -> FILE_MODIFIED_EXTERNALLY; the range reaches past
  the end -> RANGE_BEYOND_EOF with the bytes that exist.  Every response's
  own ETag is checked against that version too, so a server that ignores
  If-Match, or an object with a weak ETag (never sent as If-Match), cannot
  slip another version's bytes in.
- The first call of a continuous transfer opens one GET to the end of the
  file; later calls that start where it stands read on from it.  It is
  closed by the call that finishes the transfer, by close_file, by CANCELED
  (every stream of that file), and when another call has already fetched
  past it (readahead).
- Errors, after obstore's own bounded retries (backends.s3errors has the
  table): 5xx, 429/SlowDown, timeouts, a response broken off midway ->
  FAILURE; 403 or another 4xx on one object -> FILE_FAILURE; bucket missing,
  credentials rejected, wrong region, no connection -> PERMANENT_FAILURE.
  ``stat`` and ``list_dir`` raise OSError with a one-line reason instead (the
  engine then serves what it has cached).
- Credentials come from the environment as the AWS SDKs read it; profiles and
  the shared config files (``AWS_PROFILE``, ``~/.aws``) only when boto3 is
  installed.  ``open_backend`` lists the bucket once, within a deadline, so a
  missing bucket, rejected credentials or a dead endpoint fail the mount at
  start with one line.
- Content information (``cachefs publish``; backends.s3ci) is the object
  ``<prefix>/.cachefs-ci/<key relative to prefix>``, the record's JSON.
  ``.cachefs-ci`` is never shown, at any depth: it is left out of listings
  and everything below it is absent.  Whether a file has a record is read
  from a listing of its directory's records, trusted for a few seconds
  (backends.s3ci.Records), so a file without one costs no request of its
  own.  A missing record answers None; one that does not parse answers None
  with a warning naming the file; a failed request raises OSError with a
  one-line reason.
- Writable (WHOLE_FILE_ONLY | RENAME_DIRS): a flush uploads the whole file,
  conditional on the version it was made from (backends.s3writes); mkdir,
  unlink, rmdir and rename are backends.s3names.  Files show mode 0644 and
  directories 0755 (a read-only mount takes the write bits off); S3 keeps
  no mode or time (set_attrs changes nothing), no symlinks (EPERM), and
  cannot cut a file in place (set_size: EOPNOTSUPP; a flush rewrites it).
- Every request runs in a trio worker thread (obstore's synchronous API
  releases the GIL), at most ``max_threads`` at a time, each call on its own
  connection.
"""

from __future__ import annotations

import errno
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import obstore
import trio
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import GetOptions

from backends import s3ci, s3writes
from backends.s3config import Target, check, resolve
from backends.s3errors import describe, os_error, result_for
from backends.s3names import DIR_MARKER, Names, dir_attrs, file_attrs, servable
from backends.s3streams import S3File, Stream
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
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_STARTING = RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED
# Outcomes worth a warning; a changed or shorter object is routine.
_WARN = frozenset({RWResult.FAILURE, RWResult.FILE_FAILURE, RWResult.PERMANENT_FAILURE})


class OtherVersion(Exception):
    """The response is of another version of the object than the one asked for."""


class BrokenResponse(Exception):
    """A response broke off after its headers: FAILURE, whatever the cause."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


class S3Backend:
    """Serve *bucket* (under *prefix*) read-only through obstore.

    *store* serves metadata, ranged GETs and namespace changes; *stream_store*
    the long GETs of continuous transfers, uploads and copies (no overall
    timeout, a read timeout instead).  A file larger than *part_size* is
    uploaded in parts of that size (at least s3writes.MIN_PART_SIZE).
    """

    def __init__(
        self,
        target: Target,
        store: S3Store,
        stream_store: S3Store,
        *,
        max_threads: int = 16,
        part_size: int = s3writes.PART_SIZE,
    ) -> None:
        if part_size < s3writes.MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum part size")
        self.url = target.url
        self.endpoint = target.shown
        self._store = store
        self._stream_store = stream_store
        self._limiter = trio.CapacityLimiter(max_threads)
        self._part_size = part_size
        self._names = Names(store, stream_store)
        self._dir = dir_attrs()
        self._files: weakref.WeakSet[S3File] = weakref.WeakSet()
        self._records = s3ci.Records(self._list_records)
        kinds = ("heads", "lists", "gets", "streams", "stream_reads", "uploads", "changes")
        self._counts = dict.fromkeys((*kinds, "record_lists", "record_gets"), 0)

    def __repr__(self) -> str:
        return f"S3Backend({self.url!r} at {self.endpoint})"

    def statistics(self) -> dict[str, Any]:
        """Requests made so far by kind, and the streams open now."""
        open_streams = sum(f.open_streams() for f in list(self._files))
        return {**self._counts, "open_streams": open_streams}

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def _run_abandonable(self, fn: Callable[..., T], *args: object) -> T:
        """Like _run for calls that change nothing: a cancelled caller stops
        waiting at once; the thread finishes on its own (its slot in the
        limiter is held until then, so abandoned calls stay bounded)."""
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self._limiter, abandon_on_cancel=True
        )

    # -- metadata ----------------------------------------------------------

    def _head(self, file_id: str) -> FileAttrs | None:
        self._counts["heads"] += 1
        try:
            return file_attrs(obstore.head(self._store, file_id))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise os_error(e, f"HEAD {file_id}") from None

    def _has_children(self, dir_id: str) -> bool:
        self._counts["lists"] += 1
        try:
            for chunk in obstore.list(self._store, dir_id, chunk_size=1):
                return bool(chunk)
            return False
        except Exception as e:
            raise os_error(e, f"listing {dir_id}/") from None

    def _stat_sync(self, file_id: str) -> FileAttrs | None:
        if file_id == "":
            return self._dir
        if not servable(file_id):
            return None
        attrs = self._head(file_id)
        if attrs is None and self._has_children(file_id):
            return self._dir
        return attrs

    async def stat(self, file_id: str) -> FileAttrs | None:
        """HEAD the object; if there is none, one short listing for a directory."""
        return await self._run_abandonable(self._stat_sync, file_id)

    def _list_sync(self, dir_id: str) -> list[DirEntry]:
        if dir_id and not servable(dir_id):
            raise FileNotFoundError(f"invalid directory id {dir_id!r}")
        self._counts["lists"] += 1
        try:
            listing = obstore.list_with_delimiter(self._store, dir_id or None)
        except Exception as e:
            raise os_error(e, f"listing {dir_id}/") from None
        start = len(dir_id) + 1 if dir_id else 0
        entries: dict[str, FileAttrs] = {}
        marker = False
        for path in listing["common_prefixes"]:
            entries[path[start:]] = self._dir
        for meta in listing["objects"]:
            if meta["path"] == dir_id:
                marker = True  # the zero-byte "dir/" object
            else:
                entries[meta["path"][start:]] = file_attrs(meta)
        entries.pop(s3ci.CI_DIR, None)  # at any depth, as in a local source
        if entries.pop(DIR_MARKER, None) is not None:
            marker = True  # a directory made through the mount
        if dir_id and not entries and not marker:
            if self._head(dir_id) is not None:
                raise NotADirectoryError(f"not a directory: {dir_id!r}")
            raise FileNotFoundError(f"no such directory: {dir_id!r}")
        return [DirEntry(name, entries[name]) for name in sorted(entries)]

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        """One delimited listing (obstore follows its pages), sorted by name."""
        return await self._run_abandonable(self._list_sync, dir_id)

    # -- data --------------------------------------------------------------

    async def open_file(self, file_id: str) -> S3File:
        """No request: an object store has no open.  Reads find out what changed."""
        await trio.lowlevel.checkpoint()
        ctx = S3File(file_id)
        self._files.add(ctx)
        return ctx

    async def close_file(self, file_id: str, context: object) -> None:
        await trio.lowlevel.checkpoint()
        if isinstance(context, S3File):
            context.close()

    def _get(self, req: ReadData, store: S3Store, end: int) -> Any:
        options: GetOptions = {"range": (req.position, end)}
        if req.version.startswith('"'):  # a weak ETag (W/"...") never matches
            options["if_match"] = req.version
        result = obstore.get(store, req.file_id, options=options)
        if req.version:
            got = file_attrs(result.meta).version
            if got != req.version:
                raise OtherVersion(f"the response is of version {got}, not {req.version}")
        return result

    def _ranged(self, req: ReadData) -> int:
        self._counts["gets"] += 1
        response = self._get(req, self._store, req.position + req.bytes_to_read)
        try:
            data = response.bytes()
        except Exception as e:
            raise BrokenResponse(e) from e
        n = min(len(data), req.bytes_to_read)
        req.buffer[:n] = memoryview(data)[:n]
        return n

    def _open_stream(self, req: ReadData, generation: int) -> Stream | None:
        """A GET from the call's position to the end, or None if one is useless."""
        end = max(req.size, req.position + req.bytes_to_read)
        if not req.flags & _STARTING or req.flags & RWEvent.CONTINUOUS_FINISHED:
            return None
        if req.position + req.bytes_to_read >= end:
            return None
        self._counts["streams"] += 1
        return Stream(
            self._get(req, self._stream_store, end), req.position, req.version, generation
        )

    def _fetch(self, req: ReadData) -> int:
        """Bytes copied into ``req.buffer``, from the transfer's stream or a ranged GET."""
        ctx = req.file_context if isinstance(req.file_context, S3File) else None
        if ctx is None:
            return self._ranged(req)
        stream, generation = ctx.take(req.position, req.version)
        if stream is None:
            stream = self._open_stream(req, generation)
            if stream is None:
                return self._ranged(req)
        self._counts["stream_reads"] += 1
        try:
            n = stream.read_into(req.buffer[: req.bytes_to_read])
        except Exception as e:
            stream.close()
            raise BrokenResponse(e) from e
        if n == req.bytes_to_read and not req.flags & RWEvent.CONTINUOUS_FINISHED:
            ctx.keep(stream)
        else:
            stream.close()
        return n

    def _read_sync(self, req: ReadData) -> None:
        try:
            n = self._fetch(req)
        except BrokenResponse as e:
            # Whatever obstore's own retry met then, the engine's retry finds out.
            # What arrived is dropped: the retry is one ranged GET.
            self._failed(req, RWResult.FAILURE, f"response broken off: {describe(e.cause)}")
        except OtherVersion as e:
            self._failed(req, RWResult.FILE_MODIFIED_EXTERNALLY, str(e))
        except Exception as e:
            self._failed(req, *result_for(e))
        else:
            req.bytes_read = n
            if n < req.bytes_to_read:
                req.result_code = RWResult.RANGE_BEYOND_EOF
            else:
                req.result_code = RWResult.SUCCESS

    @staticmethod
    def _failed(req: ReadData, rc: RWResult, reason: str) -> None:
        level = logging.WARNING if rc in _WARN else logging.DEBUG
        log.log(level, "GET %s @%d: %s -> %s", req.file_id, req.position, reason, rc.name)
        req.bytes_read, req.result_code = 0, rc

    async def read_data(self, req: ReadData) -> None:
        """Fill ``req.buffer`` from a ranged GET or the transfer's stream."""
        if req.flags & RWEvent.CANCELED:
            if isinstance(req.file_context, S3File):
                req.file_context.close()
            await trio.lowlevel.checkpoint()
            return
        if req.bytes_to_read == 0:
            await trio.lowlevel.checkpoint()
            return
        if not servable(req.file_id):
            req.result_code = RWResult.FILE_MODIFIED_EXTERNALLY
            await trio.lowlevel.checkpoint()
            return
        await self._run_abandonable(self._read_sync, req)

    # -- writes ------------------------------------------------------------

    @property
    def write_capabilities(self) -> WriteCapability:
        """Whole objects only; a rename is a copy and a delete, not atomic."""
        return WriteCapability.WHOLE_FILE_ONLY | WriteCapability.RENAME_DIRS

    async def write_data(self, req: WriteData) -> None:
        """One call of a whole-file transfer: held, sent in parts, or stored (s3writes)."""
        if req.flags & RWEvent.CONTINUOUS_FINISHED and not req.flags & RWEvent.CANCELED:
            self._counts["uploads"] += 1
        await self._run(s3writes.write, req, self._store, self._stream_store, self._part_size)

    async def _change(self, fn: Callable[..., ChangeResult], *args: object) -> ChangeResult:
        self._counts["changes"] += 1
        return await self._run(fn, *args)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        """Put the empty ``dir_id/.cachefs-dir`` marker (the mode is not kept)."""
        return await self._change(self._names.make_dir, dir_id)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        return await self._change(self._names.remove_file, file_id, version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        return await self._change(self._names.remove_dir, dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        """Copy, then delete (every key of a directory): not atomic."""
        return await self._change(self._names.rename, old_id, new_id, replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return ChangeResult(
            RWResult.FILE_FAILURE, errno.EOPNOTSUPP, "S3 cannot resize an object in place"
        )

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        """Nothing to change: S3 keeps no mode, and sets an object's time itself."""
        await trio.lowlevel.checkpoint()
        return ChangeResult()

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        await trio.lowlevel.checkpoint()
        return ChangeResult(RWResult.FILE_FAILURE, errno.EPERM, "S3 has no symlinks")

    # -- content information ---------------------------------------------

    async def _list_records(self, dir_id: str, after: str) -> s3ci.Window:
        self._counts["record_lists"] += 1
        return await self._run_abandonable(s3ci.list_window, self._store, dir_id, after)

    async def content_info(self, file_id: str) -> ContentInfo | None:
        """The stored record of *file_id*, as stored; None if none or malformed.

        No GET unless the listing of the directory's records shows one."""
        if not s3ci.key_ok(file_id) or not await self._records.may_have(file_id):
            return None
        self._counts["record_gets"] += 1
        return await self._run_abandonable(s3ci.read, self._store, file_id)

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None:
        """Store *info* for *file_id* (one PUT: S3 replaces objects atomically)."""
        try:
            await self._run(s3ci.write, self._store, file_id, info.to_bytes())
        except BaseException:
            self._records.wrote(file_id, None)
            raise
        self._records.wrote(file_id, True)

    async def delete_content_info(self, file_id: str) -> None:
        """Remove the record of *file_id*, if any."""
        try:
            await self._run(s3ci.delete, self._store, file_id)
        except BaseException:
            self._records.wrote(file_id, None)
            raise
        self._records.wrote(file_id, False)

    async def content_info_ids(self) -> list[str]:
        """The file ids that have a stored record (for pruning)."""
        return await self._run(s3ci.file_ids, self._store)

    async def aclose(self) -> None:
        """Close every stream still open."""
        for ctx in list(self._files):
            ctx.close()
        await trio.lowlevel.checkpoint()


def open_backend(
    url: str,
    *,
    endpoint: str | None = None,
    anonymous: bool = False,
    path_style: bool | None = None,
    region: str | None = None,
    max_threads: int = 16,
    timeout: float = 30.0,
    connect_timeout: float = 5.0,
    retries: int = 3,
    check_timeout: float | None = 15.0,
    part_size: int = s3writes.PART_SIZE,
) -> S3Backend:
    """Open ``s3://bucket[/prefix]`` (see backends.s3config for the options' defaults).

    A request gives up after *timeout* seconds and is retried at most
    *retries* times within *timeout* seconds more.  Unless *check_timeout*
    is None, the bucket is listed once first: SourceError with the reason if
    it is missing, refuses the credentials, or does not answer in time.
    Files larger than *part_size* are uploaded in parts of that size.
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
    backend = S3Backend(
        target,
        target.store(timeout, retries, timeout),
        target.store(None, retries, timeout),
        max_threads=max_threads,
        part_size=part_size,
    )
    log.debug("%r: credentials from %s", backend, target.keys_from)
    if check_timeout is not None:
        check(target, check_timeout)
    return backend
