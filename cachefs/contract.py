"""The ReadData / WriteData contract: what a backend sees and what it must answer.

This is the only core module a backend imports.  A backend is any object
with the async methods of :class:`Backend`; wrappers (faulty, trace, …) keep
exactly these signatures so that they stack.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import urllib.parse
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cachefs.errors import SourceError


class RWEvent(enum.IntFlag):
    """Flags of a ReadData call: which transfer it belongs to and where it is."""

    IN_PROGRESS = 0x1
    CANCELED = 0x2
    WHOLE_FILE = 0x4
    CONTINUOUS_STARTED = 0x10
    CONTINUOUS_RESTARTED = 0x20
    CONTINUOUS_FINISHED = 0x40
    RANDOM_STARTED = 0x100
    RANDOM_FINISHED = 0x200
    BEFORE_END = 0x1000
    TIL_END = 0x2000


class RWResult(enum.IntEnum):
    """What a backend reports back in ``ReadData.result_code``."""

    SUCCESS = 0x00
    PARTIAL = 0x80
    RANGE_BEYOND_EOF = 0x81
    FILE_MODIFIED_EXTERNALLY = 0x82
    FILE_MODIFIED_LOCALLY = 0x83
    FAILURE = 0x8D
    FILE_FAILURE = 0x8E
    PERMANENT_FAILURE = 0x8F


def flag_names(flags: int) -> list[str]:
    """The names of the RWEvent bits set in *flags*, lowest bit first."""
    return [f.name for f in RWEvent if f.name and flags & f]


class FileKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"


@dataclass(frozen=True, slots=True)
class FileAttrs:
    """Attributes of one entry of the source.

    ``version`` identifies the content: an ETag, or inode, mtime, size and
    ctime for a local file.  It must change with every change of the
    content the backend can see: the cache treats two reads with the same
    tag as reads of the same bytes.  When it changes, the cache drops what
    it holds of that file.
    ``mode`` holds the permission bits (``0o7777``) where the source has
    them, even 0 (nobody may read); None where it has none (an object
    store): the mount then shows read-only defaults.
    ``link_target`` is set for symlinks only.
    """

    kind: FileKind
    size: int
    mtime: float
    version: str
    mode: int | None = None
    link_target: str | None = None


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    attrs: FileAttrs


@dataclass(slots=True, eq=False)
class ReadData:
    """One request to fill ``buffer`` from ``position`` of ``file_id``.

    The backend copies at most ``bytes_to_read`` bytes into ``buffer``, sets
    ``bytes_read`` and, unless it copied everything, ``result_code``.
    ``buffer`` is the backend's only until ``read_data`` returns: the cache
    reuses it for later calls, so nothing may write into it afterwards.  The
    cache's fetch buffers are page-aligned and hold stale bytes: only the
    first ``bytes_read`` are used.
    ``version`` is the version tag the cache holds for the file: a backend
    that can pin a read to a version (If-Match) answers
    FILE_MODIFIED_EXTERNALLY when the source no longer has it.
    A call with CANCELED set has ``bytes_to_read == 0``: it only tells the
    backend that the transfer ended early, so it can release a stream.
    """

    file_id: str
    size: int
    position: int
    flags: RWEvent
    buffer: memoryview
    bytes_to_read: int
    bytes_read: int = 0
    file_context: object = None
    result_code: RWResult = RWResult.SUCCESS
    version: str = ""


@dataclass(slots=True, eq=False)
class WriteData:
    """One request to store ``buffer`` at ``position`` of ``file_id`` (a flush).

    A flush is a transfer of calls with the flags of ReadData: a file written
    whole (a backend with WHOLE_FILE_ONLY, or a new file) is one WHOLE_FILE
    continuous transfer from position 0 (CONTINUOUS_STARTED on the first
    call, CONTINUOUS_FINISHED on the last, TIL_END on each); the changed
    runs of a file a RANDOM_WRITES backend writes in place are a random
    transfer (RANDOM_STARTED ... RANDOM_FINISHED, BEFORE_END unless the run
    reaches the end).  ``size`` is the size the file has once the transfer
    ends.  A transfer abandoned midway gets a last call with CANCELED and
    ``bytes_to_write == 0``: a backend aborts what it started (a multipart
    upload) and leaves the file as it was.

    The backend stores up to ``bytes_to_write`` bytes of ``buffer`` (a
    read-only view, the cache's only until ``write_data`` returns), sets
    ``bytes_written`` and, unless it stored all, ``result_code``: PARTIAL
    (the cache writes the rest), FILE_MODIFIED_EXTERNALLY (the file is not
    at ``version`` any more: a conflict, nothing is overwritten),
    FILE_MODIFIED_LOCALLY (the cache re-plans the flush), FAILURE (retried
    with backoff), FILE_FAILURE (the file is latched, its data kept),
    PERMANENT_FAILURE (the storage is latched; writes stay in the cache).

    ``version`` is the version the cache's copy was made from: the backend
    refuses (FILE_MODIFIED_EXTERNALLY) when the file is at another; "" for
    a file that did not exist, which the backend creates and must not find
    there.  On the call that finishes the transfer the backend sets
    ``new_version`` to the version the file now has ("" if it cannot tell).
    """

    file_id: str
    size: int
    position: int
    flags: RWEvent
    buffer: memoryview
    bytes_to_write: int
    bytes_written: int = 0
    file_context: object = None
    result_code: RWResult = RWResult.SUCCESS
    version: str = ""
    new_version: str = ""


class WriteCapability(enum.IntFlag):
    """What a writable backend can do (after the vendor's capability flags);
    the cache plans its flushes and namespace changes by them.

    RANDOM_WRITES: the changed runs of a file are written in place and
    ``set_size`` cuts or extends it.  WHOLE_FILE_ONLY: a changed file is
    written whole (an object store); the cache holds all of it first.
    RENAME: a file is renamed in one atomic step (else copied then deleted:
    what the backend does, not the cache).  RENAME_DIRS: a directory can be
    renamed (atomically only with RENAME).  SYMLINKS, MODES, TIMES:
    ``make_symlink`` works, ``set_attrs`` keeps a mode, a modification time.
    EMPTY_DIRS: an empty directory exists (else a marker stands for it).
    """

    RANDOM_WRITES = 0x1
    WHOLE_FILE_ONLY = 0x2
    RENAME = 0x4
    RENAME_DIRS = 0x8
    SYMLINKS = 0x10
    MODES = 0x20
    TIMES = 0x40
    EMPTY_DIRS = 0x80
    #: All of them: what a local file system can do.
    POSIX = 0xFD


@dataclass(slots=True)
class ChangeResult:
    """What a backend answers to a namespace change.

    ``result_code`` as for WriteData: SUCCESS; FILE_MODIFIED_EXTERNALLY when
    the change's precondition failed (the file is not at the version given);
    FAILURE (transient), PERMANENT_FAILURE (the storage refuses us);
    FILE_FAILURE when the source refuses this change, with ``error`` the
    errno a local file system would give (ENOENT, EEXIST, ENOTEMPTY,
    ENOTDIR, EISDIR, EXDEV, EACCES, EPERM, ENAMETOOLONG, ENOSPC...).
    ``reason`` is one line for the log; ``attrs`` what the entry is after a
    successful change, where the backend can tell (a new mode, a new version).
    """

    result_code: RWResult = RWResult.SUCCESS
    error: int = 0
    reason: str = ""
    attrs: FileAttrs | None = None


CONTENT_INFO_FORMAT = "cachefs-content-info/1"


@dataclass(frozen=True, slots=True)
class ContentInfo:
    """What one version of a file must contain (after PeerDist content information).

    ``block_hashes`` holds the SHA-256 of each ``block_size`` block, the last
    one possibly shorter; the content hash is the SHA-256 of the hashes
    concatenated.  It describes the version ``version`` of size ``size`` and
    nothing else: the cache ignores it for any other version or block size.
    """

    version: str
    size: int
    block_size: int
    block_hashes: tuple[bytes, ...]

    @property
    def content_hash(self) -> bytes:
        return hashlib.sha256(b"".join(self.block_hashes)).digest()

    @classmethod
    def of_bytes(cls, data: bytes, version: str, block_size: int) -> ContentInfo:
        """The content information of *data* (a whole file) at *version*."""
        hashes = tuple(
            hashlib.sha256(data[i : i + block_size]).digest()
            for i in range(0, len(data), block_size)
        )
        return cls(version, len(data), block_size, hashes)

    def to_bytes(self) -> bytes:
        """The stored form: one JSON object, hashes in hex."""
        return json.dumps(
            {
                "format": CONTENT_INFO_FORMAT,
                "version": self.version,
                "size": self.size,
                "block_size": self.block_size,
                "content_hash": self.content_hash.hex(),
                "blocks": [h.hex() for h in self.block_hashes],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ContentInfo:
        """Parse the stored form; ValueError names what is wrong.

        The block hashes must match the content hash and their number must
        match size and block size, or the whole record is refused.
        """
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"not content information: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != CONTENT_INFO_FORMAT:
            raise ValueError(f"not content information in format {CONTENT_INFO_FORMAT}")
        try:
            version, size, bs = raw["version"], raw["size"], raw["block_size"]
            blocks, content_hash = raw["blocks"], bytes.fromhex(raw["content_hash"])
            hashes = tuple(bytes.fromhex(h) for h in blocks)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed content information: {e!r}") from None
        if not isinstance(version, str) or type(size) is not int or type(bs) is not int:
            raise ValueError("malformed content information: bad version, size or block_size")
        if size < 0 or bs <= 0 or len(hashes) != -(-size // bs):
            raise ValueError("content information: block count does not match size")
        if any(len(h) != 32 for h in hashes):
            raise ValueError("content information: a block hash is not SHA-256")
        ci = cls(version, size, bs, hashes)
        if ci.content_hash != content_hash:
            raise ValueError("content information: block hashes do not match the content hash")
        return ci


@runtime_checkable
class Backend(Protocol):
    """What the cache asks of a storage.

    Errors: ``stat`` returns None for an absent path.  ``list_dir`` raises
    FileNotFoundError for an absent directory and NotADirectoryError for a
    file.  Any other exception from ``stat``, ``list_dir`` or ``open_file``
    is taken as a transient failure of the storage.  ``read_data`` reports
    through ``result_code`` and should not raise; if it does, the call is
    treated as FAILURE.

    Optional capabilities are the Protocols below (:class:`ContentInfoSource`,
    :class:`ContentInfoStore`, :class:`WritableBackend`): a backend has one
    when it has its methods,
    and the cache checks that once, when it opens the backend.
    """

    async def stat(self, file_id: str) -> FileAttrs | None: ...

    async def list_dir(self, dir_id: str) -> list[DirEntry]: ...

    async def open_file(self, file_id: str) -> object: ...

    async def close_file(self, file_id: str, context: object) -> None: ...

    async def read_data(self, req: ReadData) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ContentInfoSource(Protocol):
    """A backend that publishes content information beside its files.

    ``content_info`` returns what the source holds for *file_id* (None if
    nothing).  The cache checks every block against it before serving it,
    and ignores it for any other version or block size.
    """

    async def content_info(self, file_id: str) -> ContentInfo | None: ...


@runtime_checkable
class ContentInfoStore(ContentInfoSource, Protocol):
    """A backend ``cachefs publish`` can write content information to.

    ``content_info_ids`` lists the file ids that have a record.
    """

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None: ...

    async def delete_content_info(self, file_id: str) -> None: ...

    async def content_info_ids(self) -> list[str]: ...


@runtime_checkable
class WritableBackend(Protocol):
    """A backend the cache can write to: WriteData and namespace changes.

    ``write_capabilities`` is read once, when the mount starts.  Every
    method reports through its result (``WriteData.result_code``,
    :class:`ChangeResult`) and should not raise; an exception is taken as
    FAILURE.  ``remove_file`` and ``set_size`` take the version the cache
    holds ("" for any): FILE_MODIFIED_EXTERNALLY if the file is at another.
    ``rename`` with *replace* False refuses (EEXIST) when *new_id* exists.
    ``set_attrs`` changes what it can of the mode and the modification time
    (None: leave it).
    """

    @property
    def write_capabilities(self) -> WriteCapability: ...

    async def write_data(self, req: WriteData) -> None: ...

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult: ...

    async def remove_file(self, file_id: str, version: str) -> ChangeResult: ...

    async def remove_dir(self, dir_id: str) -> ChangeResult: ...

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult: ...

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult: ...

    async def set_attrs(
        self, file_id: str, mode: int | None, mtime: float | None
    ) -> ChangeResult: ...

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult: ...


class PassesWrites:
    """The WritableBackend calls of a backend that stands in front of another
    (a wrapper): they go to *that* one when it is writable; otherwise its
    ``write_capabilities`` are empty (what the cache goes by) and every call
    raises NotImplementedError naming it.  Call :meth:`pass_writes_to` once."""

    _writes_to: WritableBackend | None = None
    _writes_name = ""

    def pass_writes_to(self, backend: object) -> None:
        self._writes_to = backend if isinstance(backend, WritableBackend) else None
        self._writes_name = repr(backend)

    @property
    def write_capabilities(self) -> WriteCapability:
        writer = self._writes_to
        return writer.write_capabilities if writer is not None else WriteCapability(0)

    def _writable(self) -> WritableBackend:
        if self._writes_to is None:
            raise NotImplementedError(f"{self._writes_name} is read-only: it cannot be written to")
        return self._writes_to

    async def write_data(self, req: WriteData) -> None:
        await self._writable().write_data(req)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        return await self._writable().make_dir(dir_id, mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        return await self._writable().remove_file(file_id, version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        return await self._writable().remove_dir(dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        return await self._writable().rename(old_id, new_id, replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        return await self._writable().set_size(file_id, size, version)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        return await self._writable().set_attrs(file_id, mode, mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        return await self._writable().make_symlink(file_id, target)


@runtime_checkable
class BlobStore(Protocol):
    """A flat store of immutable objects by name (a hosted cache's blocks).

    Names are ``[0-9a-z/._-]`` text without empty, ``.`` or ``..`` parts.
    ``get_blob`` returns None for an absent object; ``has_blob`` False.
    Every other failure (no connection, refused credentials, a timeout)
    raises OSError with a one-line reason: the caller treats the store as
    down for a while and never waits on it without a deadline.  ``put_blob``
    of a name that exists may overwrite it (the bytes are the same: names
    are their hash) or keep the old object.
    """

    async def get_blob(self, name: str, limit: int | None = None) -> bytes | None:
        """At most *limit* + 1 bytes are read (all without a limit): an object
        longer than the caller expects costs it no more memory than that."""
        ...

    async def has_blob(self, name: str) -> bool: ...

    async def put_blob(self, name: str, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


# -- source URLs ------------------------------------------------------------------

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def source_scheme(source: str) -> str:
    """The URL scheme of *source*, lower-cased; ``file`` for a plain path.

    A source is a URL only when its scheme is followed by ``//``: ``file:/x``
    is the relative path ``file:/x``.
    """
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else "file"


def local_path(source: str) -> str | None:
    """The directory a ``file`` source names; None for a source of another scheme.

    A plain path is returned as written; ``file:///abs/path`` (or
    ``file://localhost/abs/path``, the scheme in any case) as its
    percent-decoded path, bytes that are not UTF-8 kept as os.fsdecode keeps
    them.  SourceError, naming the problem, for a file URL that is malformed,
    names another host, has a query or fragment, or holds a NUL byte.  The
    local backend and the mount's checks both read a source through this.
    """
    if source_scheme(source) != "file":
        return None
    if "\0" in source:
        raise SourceError("bad source: it holds a NUL byte")
    if "://" not in source:
        return source
    expected = "expected file:///absolute/path"
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError as e:
        raise SourceError(f"bad file URL {source!r}: malformed ({e}); {expected}") from None
    if parts.netloc.lower() not in ("", "localhost") or not parts.path.startswith("/"):
        raise SourceError(f"bad file URL {source!r}: {expected}")
    if "?" in source or "#" in source:
        raise SourceError(
            f"bad file URL {source!r}: no query or fragment is allowed "
            "(write a '?' or '#' in a name as %3F or %23)"
        )
    path = urllib.parse.unquote(parts.path, errors="surrogateescape")
    if "\0" in path:
        raise SourceError(f"bad file URL {source!r}: it holds a NUL byte (%00)")
    return path
