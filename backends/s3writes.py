"""Whole-file uploads to an S3 source: how one WriteData transfer becomes one object.

Policy:

- S3 takes whole objects only (WHOLE_FILE_ONLY): a flush is one WHOLE_FILE
  continuous transfer from 0, its calls in order; its state (an ``Upload``)
  is the transfer's ``file_context``.  Another kind of transfer, or a call
  that is not the next bytes of the one under way, is refused.
- Readers never see a torn object: S3 makes an object visible only whole,
  by a PUT or by completing a multipart upload, so the key holds the old
  object or the new one.
- A file of at most one part (``part_size``, 8 MiB by default) is held in
  memory and sent by the call that finishes the transfer as one conditional
  PUT: ``If-None-Match: *`` for a new file (version ""), ``If-Match: <ETag>``
  to replace the version the cache's copy was made from.  S3 checks the
  condition as it stores the object: another client's object is never
  overwritten (412 -> FILE_MODIFIED_EXTERNALLY).
- A larger file is a multipart upload in parts of ``part_size`` (more when
  10,000 parts would not hold it), sent as the calls arrive, at most
  UPLOAD_CONCURRENCY parts at once, after a HEAD has found the key at the
  version (a conflict found then costs no upload).  obstore cannot put a condition on the
  completion of a multipart upload, so the call that finishes the transfer
  HEADs the object and completes the upload only if it is still at the
  version (or still absent): an object another client writes between that
  HEAD and the completion (the time it takes to send the last part and
  complete) is overwritten.  That window is the only one.
- A version that is not a strong ETag (a weak one, or none sent) cannot be
  an If-Match: it is checked by the same HEAD before the PUT.
- The new version is the ETag of the PUT's answer; for a multipart upload
  the ETag S3 computes (MD5 of the parts' MD5s) when a HEAD after completing
  shows it, else "" (the cache then asks).  A request that fails after the
  object landed (the answer was lost, the retry met 412) is taken as
  success when a HEAD shows the ETag these bytes have.
- CANCELED aborts the multipart upload (and drops what is held); any failure
  aborts it too.  An upload the server never heard the end of (the daemon
  was killed) stays as an incomplete multipart upload, invisible, until a
  lifecycle rule removes it (docs/s3.md).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import obstore
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import PutMode

from backends.s3errors import result_for
from backends.s3names import file_attrs, head, servable
from cachefs.contract import RWEvent, RWResult, WriteData

log = logging.getLogger(__name__)

PART_SIZE = 8 << 20
# S3 refuses smaller parts (but the last).
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000
UPLOAD_CONCURRENCY = 4

_STARTING = RWEvent.CONTINUOUS_STARTED | RWEvent.CONTINUOUS_RESTARTED
_MIB = 1 << 20


class Conflict(Exception):
    """The object is not at the version the transfer was made from."""


class Misplaced(Exception):
    """A call that does not continue the transfer under way."""


class Refused(Exception):
    """A transfer S3 cannot take at all (FILE_FAILURE)."""


class _Aborted(Exception):
    """Passed to the writer's __exit__: obstore then aborts the multipart upload."""


def _md5(data: Any = b"") -> Any:
    return hashlib.md5(data, usedforsecurity=False)


class Upload:
    """The file_context of one whole-file transfer: the bytes so far (one
    part or less), or the multipart upload under way and its parts' MD5s."""

    __slots__ = ("key", "version", "size", "written", "part", "_buffer", "_writer")

    def __init__(self, key: str, version: str, size: int, part_size: int, data: S3Store) -> None:
        self.key = key
        self.version = version
        self.size = size
        self.written = 0
        needed = -(-size // MAX_PARTS)
        self.part = max(part_size, -(-needed // _MIB) * _MIB)
        self._buffer: bytearray | None = None
        self._writer: _Parts | None = None
        if size <= self.part:
            self._buffer = bytearray()
        else:
            self._writer = _Parts(data, key, self.part)

    @property
    def multipart(self) -> bool:
        return self._writer is not None

    def add(self, data: memoryview) -> None:
        if self._buffer is not None:
            self._buffer += data
        elif self._writer is not None:
            self._writer.add(data)
        self.written += len(data)

    def finish(self, store: S3Store, data: S3Store) -> str:
        """Store the object if the key is still at the version; its new version."""
        if self._writer is not None:
            self.check(store)
            expected = self._writer.etag()
            try:
                self._writer.complete()
            except Exception:
                landed = self._landed(store, expected)
                if landed is None:
                    raise
                return landed
            landed = self._landed(store, expected)
            if landed is None:
                log.debug(
                    "%s: uploaded; its ETag is not %s: its version is not known", self.key, expected
                )
            return landed or ""
        body = self._buffer if self._buffer is not None else bytearray()
        expected = f'"{_md5(body).hexdigest()}"'
        mode = self._mode(store)
        try:
            result = obstore.put(data, self.key, body, mode=mode, use_multipart=False)
        except Exception:
            landed = self._landed(store, expected)
            if landed is None:
                raise
            return landed
        return result.get("e_tag") or ""

    def _mode(self, store: S3Store) -> PutMode:
        if not self.version:
            return "create"
        if self.version.startswith('"'):
            return {"e_tag": self.version}
        self.check(store)  # a weak ETag never matches an If-Match
        return "overwrite"

    def check(self, store: S3Store) -> None:
        """Conflict unless the key is at the version (absent for "")."""
        meta = head(store, self.key)
        if not self.version:
            if meta is not None:
                raise Conflict(f"{self.key} exists (version {file_attrs(meta).version})")
        elif meta is None:
            raise Conflict(f"{self.key} is gone")
        elif file_attrs(meta).version != self.version:
            now = file_attrs(meta).version
            raise Conflict(f"{self.key} is at version {now}, not {self.version}")

    def _landed(self, store: S3Store, expected: str) -> str | None:
        """The object's version if it holds what this transfer sent, else None."""
        try:
            meta = head(store, self.key)
        except Exception:
            return None
        if meta is None or meta.get("e_tag") != expected:
            return None
        return file_attrs(meta).version

    def abort(self) -> None:
        """Drop what is held; abort the multipart upload, if one was started."""
        self._buffer = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.abort()


class _Parts:
    """A multipart upload through obstore's writer, and the MD5 of each part
    (the writer cuts parts of exactly ``part`` bytes, the last shorter)."""

    __slots__ = ("key", "part", "_writer", "_digests", "_md5", "_filled")

    def __init__(self, store: S3Store, key: str, part: int) -> None:
        self.key = key
        self.part = part
        self._writer: Any = obstore.open_writer(
            store, key, buffer_size=part, max_concurrency=UPLOAD_CONCURRENCY
        )
        self._digests: list[bytes] = []
        self._md5 = _md5()
        self._filled = 0

    def add(self, data: memoryview) -> None:
        while data:
            n = min(len(data), self.part - self._filled)
            chunk = bytes(data[:n])  # the writer keeps it; the cache reuses its buffer
            self._md5.update(chunk)
            self._writer.write(chunk)
            self._filled += n
            data = data[n:]
            if self._filled == self.part:
                self._digests.append(self._md5.digest())
                self._md5, self._filled = _md5(), 0

    def etag(self) -> str:
        """The ETag S3 gives the completed upload (the MD5 of the parts' MD5s)."""
        digests = self._digests + ([self._md5.digest()] if self._filled else [])
        return f'"{_md5(b"".join(digests)).hexdigest()}-{len(digests)}"'

    def complete(self) -> None:
        """Send what is left as the last part and complete the upload."""
        self._writer.close()

    def abort(self) -> None:
        try:
            self._writer.__exit__(_Aborted, _Aborted(), None)
        except Exception as e:  # already closed, or the abort failed: a lifecycle rule's job
            log.debug("aborting the upload of %s: %s", self.key, e)


def write(req: WriteData, store: S3Store, data: S3Store, part_size: int) -> None:
    """Take one call of a whole-file transfer (in a worker thread).

    *store* answers HEADs; *data* carries the uploads (no overall deadline).
    """
    upload = req.file_context if isinstance(req.file_context, Upload) else None
    if req.flags & RWEvent.CANCELED:
        if upload is not None:
            upload.abort()
        req.file_context = None
        return
    try:
        upload = _upload_for(req, upload, store, data, part_size)
        req.file_context = upload
        upload.add(req.buffer[: req.bytes_to_write])
        if req.flags & RWEvent.CONTINUOUS_FINISHED:
            if upload.written != upload.size:
                raise Misplaced(f"the transfer ends at {upload.written}, not at {upload.size}")
            req.new_version = upload.finish(store, data)
            req.file_context = None
            log.debug(
                "PUT %s: %d bytes%s -> %s",
                req.file_id,
                upload.size,
                " in parts" if upload.multipart else "",
                req.new_version or "(version unknown)",
            )
    except Conflict as e:
        _failed(req, upload, RWResult.FILE_MODIFIED_EXTERNALLY, str(e))
    except Misplaced as e:
        _failed(req, upload, RWResult.FAILURE, str(e))
    except Refused as e:
        _failed(req, upload, RWResult.FILE_FAILURE, str(e))
    except Exception as e:
        _failed(req, upload, *result_for(e))
    else:
        req.bytes_written = req.bytes_to_write
        req.result_code = RWResult.SUCCESS


def _upload_for(
    req: WriteData, upload: Upload | None, store: S3Store, data: S3Store, part_size: int
) -> Upload:
    if not req.flags & RWEvent.WHOLE_FILE:
        raise Refused("S3 stores whole objects only: no random writes")
    if not servable(req.file_id):
        raise Refused(f"{req.file_id}: a name cachefs keeps for itself")
    if req.flags & _STARTING and req.position == 0:
        if upload is not None:
            upload.abort()
        upload = Upload(req.file_id, req.version, req.size, part_size, data)
        if upload.multipart:
            upload.check(store)  # a conflict found now costs no upload
    if upload is None:
        raise Misplaced(f"no upload of {req.file_id} is under way at {req.position}")
    if (upload.key, upload.written, upload.size) != (req.file_id, req.position, req.size):
        raise Misplaced(f"a call at {req.position} of {req.file_id} does not continue the upload")
    if req.position + req.bytes_to_write > req.size:
        raise Misplaced(f"a call past the end ({req.size}) of {req.file_id}")
    return upload


def _failed(req: WriteData, upload: Upload | None, rc: RWResult, reason: str) -> None:
    if upload is not None:
        upload.abort()
    req.file_context = None
    req.bytes_written, req.result_code = 0, rc
    level = logging.DEBUG if rc is RWResult.FILE_MODIFIED_EXTERNALLY else logging.WARNING
    log.log(level, "PUT %s: %s -> %s", req.file_id, reason, rc.name)
