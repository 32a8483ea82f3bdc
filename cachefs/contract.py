"""The ReadData contract: what a backend sees and what it must answer.

This is the only core module a backend imports.  A backend is any object
with the async methods of :class:`Backend`; wrappers (faulty, trace, …) keep
exactly these signatures so that they stack.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


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

    ``version`` identifies the content: an ETag, or mtime+size for a local
    file.  When it changes, the cache drops what it holds of that file.
    ``link_target`` is set for symlinks only.
    """

    kind: FileKind
    size: int
    mtime: float
    version: str
    mode: int = 0
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
    file_context: Any = None
    result_code: RWResult = RWResult.SUCCESS
    version: str = ""


@runtime_checkable
class Backend(Protocol):
    """What the cache asks of a storage.

    Errors: ``stat`` returns None for an absent path.  ``list_dir`` raises
    FileNotFoundError for an absent directory and NotADirectoryError for a
    file.  Any other exception from ``stat``, ``list_dir`` or ``open_file``
    is taken as a transient failure of the storage.  ``read_data`` reports
    through ``result_code`` and should not raise; if it does, the call is
    treated as FAILURE.
    """

    async def stat(self, file_id: str) -> FileAttrs | None: ...

    async def list_dir(self, dir_id: str) -> list[DirEntry]: ...

    async def open_file(self, file_id: str) -> Any: ...

    async def close_file(self, file_id: str, context: Any) -> None: ...

    async def read_data(self, req: ReadData) -> None: ...

    async def aclose(self) -> None: ...
