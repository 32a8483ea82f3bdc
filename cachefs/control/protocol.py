"""The control protocol: lines of JSON, and the typed messages they carry.

A client sends one JSON object per line, ``{"command": NAME, ...}``; the
mount answers each with one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE, "exit_code": N}``.  A long request (a
prefetch, a flush, an unmount flushing changed files) may first send any
number of ``{"progress": {...}}`` lines.

A line that is not such an object (not UTF-8, not JSON, NaN or a number
beyond 64 bits, arrays and objects nested deeper than MAX_DEPTH, longer
than MAX_LINE, an argument of the wrong type) is answered ``{"ok": false,
"error": "bad request: ...", "exit_code": 2}``.  The client takes answers
of up to MAX_REPLY bytes (the mount's answers may list thousands of files).

The requests a mount serves are the dataclasses below, one per command;
each names its reply type and checks a reply's shape (``reply``), so the
command line and the mount speak the same typed messages.  The server
(cachefs.control.server) and client (cachefs.control.client) move lines.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, ClassVar, Generic, TypedDict, TypeVar, cast

from cachefs.errors import ConfigError

#: Bytes in one request line, its newline not counted.
MAX_LINE = 1 << 20
#: How deep arrays and objects may nest in a request (real ones nest 2 deep).
MAX_DEPTH = 32
#: Bytes in one answer line the client takes.
MAX_REPLY = 256 << 20

#: A decoded line: a JSON object.
Message = dict[str, Any]

R = TypeVar("R")


# -- lines -------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """*message* as one line."""
    return json.dumps(message).encode() + b"\n"


def ok(result: object) -> Message:
    return {"ok": True, "result": result}


def failure(error: str, exit_code: int = 1) -> Message:
    return {"ok": False, "error": error, "exit_code": exit_code}


def bad_request(why: str) -> Message:
    return failure(f"bad request: {why}", 2)


def progress_report(fields: Message) -> Message:
    return {"progress": fields}


# A JSON string, or what is left of a line from an unterminated one.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))
_NESTING = [0] * 256
for _byte in b"[{":
    _NESTING[_byte] = 1
for _byte in b"]}":
    _NESTING[_byte] = -1
_INT_LIMIT = 1 << 63

#: The type of each argument the commands take, whichever command it comes with.
_ARGUMENTS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "file_ids": (
        "a list of strings",
        lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v),
    ),
    "file_id": ("a string", lambda v: isinstance(v, str)),
    "offset": ("an integer", lambda v: type(v) is int),
    "data": ("a string", lambda v: isinstance(v, str)),
    "trust": ("true or false", lambda v: isinstance(v, bool)),
    "keep_dirty": ("true or false", lambda v: isinstance(v, bool)),
}


def _too_deep(line: bytes) -> bool:
    """Whether arrays and objects nest deeper than MAX_DEPTH in JSON *line*;
    a few passes in C over the line, before any parsing."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return False
    brackets = _JSON_STRING.sub(b"", line).translate(None, _NOT_BRACKET)
    return max(accumulate(map(_NESTING.__getitem__, brackets)), default=0) > MAX_DEPTH


def _parse_int(text: str) -> int:
    n = int(text) if len(text) <= 20 else _INT_LIMIT  # int() is slow on long ones
    if not -_INT_LIMIT <= n < _INT_LIMIT:
        raise ValueError("a number beyond 64 bits")
    return n


def _parse_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError("a number too large for a float")
    return x


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_line(line: bytes) -> Message:
    """The request a line holds; ValueError, saying what is wrong, if it holds none."""
    try:
        text = line.decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 (byte {e.start})") from None
    if _too_deep(line):
        raise ValueError(f"arrays and objects nested deeper than {MAX_DEPTH}")
    try:
        request = json.loads(
            text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_no_constant
        )
    except RecursionError:  # cannot pass _too_deep; kept as the last guard
        raise ValueError("nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ValueError("a request is a JSON object with a 'command'")
    for name, value in request.items():
        if name in _ARGUMENTS and not _ARGUMENTS[name][1](value):
            raise ValueError(f"{name!r} must be {_ARGUMENTS[name][0]}")
    return request


def answer_problem(message: object) -> str | None:
    """What is wrong with answer or progress line *message*; None if nothing."""
    if not isinstance(message, dict):
        return f"an answer that is not an object: {str(message)[:100]}"
    if "progress" in message:
        return None if isinstance(message["progress"], dict) else "a malformed progress line"
    ok = message.get("ok")
    if ok is True:
        return None
    if (
        ok is False
        and isinstance(message.get("error"), str)
        and type(message.get("exit_code")) is int
        and 0 < message["exit_code"] < 256
    ):
        return None
    return f"a malformed answer: {json.dumps(message)[:100]}"


# -- replies -------------------------------------------------------------------------


class Failure(TypedDict):
    """One file a prefetch or pin could not do."""

    file: str
    error: str
    exit_code: int


class _WholeFiles(TypedDict):
    files: int
    succeeded: int
    bytes: int
    fetched: int
    failed: list[Failure]


class WholeFilesReply(_WholeFiles, total=False):
    warning: str


class WholeFilesProgress(TypedDict):
    scanning: bool
    done: int
    total: int
    files_done: int
    files: int
    failed: int


class UnpinReply(TypedDict):
    unpinned: list[str]
    not_pinned: list[str]


class _Purged(TypedDict):
    purged: int
    freed: int
    pinned: list[str]


class PurgeReply(_Purged, total=False):
    in_use: list[str]


class AddDataReply(TypedDict):
    accepted: int
    rejected: int
    pending: int


class FlushFailure(TypedDict):
    """One changed file a flush could not send: it stays in the cache dir."""

    file: str
    error: str


class Conflict(TypedDict):
    """A changed file whose source changed meanwhile: the changes went to *copy*."""

    file: str
    copy: str


class FlushReply(TypedDict):
    """What a flush did: *flushed* files of *bytes* in all reached the source."""

    flushed: int
    bytes: int
    failed: list[FlushFailure]
    conflicts: list[Conflict]


class _Unmounted(TypedDict):
    pid: int


class UnmountReply(_Unmounted, total=False):
    """The daemon to wait for; what its flush did (none with keep_dirty), and
    how many changed files stay in the cache dir for the next mount."""

    flush: FlushReply
    kept: int


#: The counters of a mount, by name (the engine's statistics and the mount's own).
StatsReply = dict[str, Any]


def _conforms(value: object, hint: Any) -> bool:
    """Whether JSON data *value* is of type *hint* (a reply's TypedDict, say)."""
    if hint is Any:
        return True
    if typing.is_typeddict(hint):
        if not isinstance(value, dict) or not hint.__required_keys__ <= value.keys():
            return False
        hints = typing.get_type_hints(hint)
        return all(_conforms(value[k], hints[k]) for k in hints.keys() & value.keys())
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(v, args[1]) for v in value.values())
    if hint is None:
        return value is None
    return type(value) is hint


# -- requests ------------------------------------------------------------------------


class Request(Generic[R]):
    """A request of one command; ``reply`` types what the mount answered
    (ValueError if the answer is not a *returns*)."""

    __slots__ = ()
    command: ClassVar[str]
    returns: ClassVar[Any]

    def arguments(self) -> Message:
        return {}

    def reply(self, result: object) -> R:
        if not _conforms(result, self.returns):
            raise ValueError(str(result)[:100])
        return cast(R, result)


@dataclass(frozen=True, slots=True)
class Stats(Request[StatsReply]):
    command: ClassVar[str] = "stats"
    returns: ClassVar[Any] = StatsReply


@dataclass(frozen=True, slots=True)
class Unmount(Request[UnmountReply]):
    """Flush every changed file (progress lines meanwhile), unless *keep_dirty*,
    then unmount and exit; the answer names the daemon, to wait for its exit."""

    command: ClassVar[str] = "unmount"
    returns: ClassVar[Any] = UnmountReply

    keep_dirty: bool = False

    def arguments(self) -> Message:
        return {"keep_dirty": True} if self.keep_dirty else {}


@dataclass(frozen=True, slots=True)
class ResetExternalError(Request[None]):
    command: ClassVar[str] = "reset-external-error"
    returns: ClassVar[Any] = None


@dataclass(frozen=True, slots=True)
class _Files(Request[R]):
    """A command on files: each file id, a directory meaning every file below it."""

    file_ids: tuple[str, ...]

    def arguments(self) -> Message:
        return {"file_ids": list(self.file_ids)}


@dataclass(frozen=True, slots=True)
class Prefetch(_Files[WholeFilesReply]):
    command: ClassVar[str] = "prefetch"
    returns: ClassVar[Any] = WholeFilesReply


@dataclass(frozen=True, slots=True)
class Pin(_Files[WholeFilesReply]):
    command: ClassVar[str] = "pin"
    returns: ClassVar[Any] = WholeFilesReply


@dataclass(frozen=True, slots=True)
class Unpin(_Files[UnpinReply]):
    command: ClassVar[str] = "unpin"
    returns: ClassVar[Any] = UnpinReply


@dataclass(frozen=True, slots=True)
class Purge(_Files[PurgeReply]):
    command: ClassVar[str] = "purge"
    returns: ClassVar[Any] = PurgeReply


@dataclass(frozen=True, slots=True)
class Flush(_Files[FlushReply]):
    """Send the changes below each file id to the source now."""

    command: ClassVar[str] = "flush"
    returns: ClassVar[Any] = FlushReply


@dataclass(frozen=True, slots=True)
class ResetFileErrors(_Files[list[str]]):
    """Answered with the file ids reset."""

    command: ClassVar[str] = "reset-file-errors"
    returns: ClassVar[Any] = list[str]


@dataclass(frozen=True, slots=True)
class AddData(Request[AddDataReply]):
    """Bytes of one file at *offset* (sent as base64)."""

    command: ClassVar[str] = "add-data"
    returns: ClassVar[Any] = AddDataReply

    file_id: str
    offset: int
    data: bytes
    trust: bool = False

    def arguments(self) -> Message:
        return {
            "file_id": self.file_id,
            "offset": self.offset,
            "data": base64.b64encode(self.data).decode(),
            "trust": self.trust,
        }


MountRequest = (
    Stats | Unmount | ResetExternalError | Prefetch | Pin | Unpin | Purge | ResetFileErrors
) | (Flush | AddData)

#: What a connection in a reserved place may ask: commands answered at once,
#: from memory (an unmount once it has flushed the changed files), so that a
#: busy mount can still be inspected and stopped.
RESERVED_COMMANDS = frozenset({Stats.command, Unmount.command})

_PLAIN: dict[str, Callable[[], MountRequest]] = {r.command: r for r in (Stats, ResetExternalError)}
_ON_FILES: dict[str, Callable[[tuple[str, ...]], MountRequest]] = {
    r.command: r for r in (Prefetch, Pin, Unpin, Purge, Flush, ResetFileErrors)
}


def decode_request(message: Message) -> MountRequest:
    """The mount's request in *message* (as decode_line returned it);
    ConfigError (exit 2) for an unknown command or missing arguments."""
    command = message["command"]
    if command in _PLAIN:
        return _PLAIN[command]()
    if command == Unmount.command:
        return Unmount(keep_dirty=message.get("keep_dirty") is True)
    if command in _ON_FILES:
        file_ids = message.get("file_ids")
        if not isinstance(file_ids, list) or not _conforms(file_ids, list[str]):
            raise ConfigError(f"{command} needs a list of file ids")
        return _ON_FILES[command](tuple(file_ids))
    if command == AddData.command:
        try:
            file_id, offset = message["file_id"], message["offset"]
            data = base64.b64decode(message["data"], validate=True)
        except (KeyError, ValueError, TypeError, binascii.Error) as e:
            raise ConfigError(f"malformed add-data request: {e}") from None
        if not isinstance(file_id, str) or type(offset) is not int:
            raise ConfigError("malformed add-data request: bad file_id or offset")
        return AddData(file_id, offset, data, trust=bool(message.get("trust")))
    raise ConfigError(f"unknown control command {command!r}")
