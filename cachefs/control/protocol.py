"""Talking to a running mount: finding it, and its control socket.

Finding the mount for a PATH needs no request to the file system (so it
works on a hung mount): the longest mount point in /proc/self/mountinfo of
type ``fuse.cachefs`` that contains PATH.  The mount's fsname (the "source"
column of mountinfo, what ``df`` shows) is ``cachefs:<cache dir>``,
percent-encoded, which leads to the control socket.

The control socket is ``control.sock`` in the cache directory, mode 0600.
A client sends one JSON object per line, ``{"command": NAME, ...}``; the
mount answers each with one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE, "exit_code": N}``.  A long request (a
prefetch) may first send any number of ``{"progress": {...}}`` lines; if
the client leaves before the answer, the request is cancelled.

Every line gets its answer, and no client can take the mount down or hold
the socket.  A line that is not such an object (not UTF-8, not JSON, NaN or
a number beyond 64 bits, arrays and objects nested deeper than MAX_DEPTH,
an argument of the wrong type) is answered ``{"ok": false, "error": "bad
request: ...", "exit_code": 2}``; a command that fails unexpectedly,
"internal error: ..." (exit code 1, the cause in the mount's log).  Either
way the connection stays open.  The
mount closes a connection, after one last ``{"ok": false, ...}`` line that
says why, when its line runs past MAX_LINE bytes, when it sends no complete
request within IDLE_DEADLINE of connecting or of its last answer, or when
MAX_CLIENTS connections are open and it is the one idle longest.  A client
that does not take a line within SEND_DEADLINE is dropped, and its request
cancelled.

The mount can always be inspected and stopped: a connection that finds
MAX_CLIENTS others all in a request takes one of RESERVED_CLIENTS reserved
places (the one idle longest there makes room), where it may make only the
RESERVED_COMMANDS, answered at once.  Any other request there, or a
connection that finds the reserved places all in a request too, is told
``{"ok": false, "error": "the mount is busy ...", "exit_code": 1, "busy":
true}`` and closed.

The client trusts its mount: it takes answers of up to MAX_REPLY bytes, and
an answer it cannot read is a MountUnreachable, never a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import select
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import trio

from cachefs.errors import (
    CacheDirInUse,
    CacheFSError,
    MountBusy,
    MountUnreachable,
    NotInMount,
    RemoteError,
)

log = logging.getLogger(__name__)

FSTYPE = "fuse.cachefs"
SUBTYPE = "cachefs"
SOCKET_NAME = "control.sock"
_FSNAME_PREFIX = "cachefs:"
_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")

#: Bytes in one request line, its newline not counted.
MAX_LINE = 1 << 20
#: How deep arrays and objects may nest in a request (real ones nest 2 deep).
MAX_DEPTH = 32
#: Connections open at once.  When all are taken, the one idle longest
#: makes room for a new one.
MAX_CLIENTS = 64
#: Connections beyond MAX_CLIENTS, for the RESERVED_COMMANDS only.
RESERVED_CLIENTS = 8
#: What a reserved connection may ask: commands answered at once, from
#: memory, so that a mount busy with MAX_CLIENTS requests can still be
#: inspected and stopped.
RESERVED_COMMANDS = frozenset({"stats", "unmount"})
#: Seconds a client has to send a whole request line, after connecting and
#: after each answer.  The local clients send theirs at once.
IDLE_DEADLINE = 10.0
#: Seconds a client has to take each line sent to it (progress or answer).
SEND_DEADLINE = 10.0
#: Bytes in one answer line the client takes (the mount's answers may list
#: thousands of files).
MAX_REPLY = 256 << 20

Handler = Callable[[dict[str, Any], "Progress"], Awaitable[Any]]


# -- finding a mount ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: Path
    major: int
    minor: int
    cache_dir: Path | None
    #: The uid that made the mount (FUSE's ``user_id``): only it, and root, may unmount it.
    owner: int | None = field(default=None, compare=False)

    @property
    def socket_path(self) -> Path | None:
        return self.cache_dir / SOCKET_NAME if self.cache_dir else None

    def file_id(self, path: Path) -> str:
        """The file id of *path*, which lies inside this mount."""
        rel = os.path.relpath(path, self.mountpoint)
        return "" if rel == "." else rel


def fsname_for(cache_dir: Path) -> str:
    """The fsname that tells clients where the mount keeps its cache."""
    return _FSNAME_PREFIX + quote(os.fsencode(cache_dir), safe="/-_.~")


def _cache_dir_from_fsname(fsname: str) -> Path | None:
    if not fsname.startswith(_FSNAME_PREFIX):
        return None
    return Path(os.fsdecode(unquote_to_bytes(fsname[len(_FSNAME_PREFIX) :])))


def _unescape(raw: bytes) -> str:
    return os.fsdecode(_MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), raw))


def _owner(super_options: bytes) -> int | None:
    for option in super_options.split(b","):
        name, _, value = option.partition(b"=")
        if name == b"user_id" and value.isdigit():
            return int(value)
    return None


def cachefs_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[MountEntry]:
    """Every cachefs mount this process can see, in mount order."""
    mounts = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        if fields[sep + 1].decode(errors="replace") != FSTYPE:
            continue
        major, minor = (int(n) for n in fields[2].split(b":"))
        mounts.append(
            MountEntry(
                mountpoint=Path(_unescape(fields[4])),
                major=major,
                minor=minor,
                cache_dir=_cache_dir_from_fsname(_unescape(fields[sep + 2])),
                owner=_owner(fields[sep + 3]) if len(fields) > sep + 3 else None,
            )
        )
    return mounts


def _inside(path: Path, mountpoint: Path) -> bool:
    return path == mountpoint or mountpoint in path.parents


def find_mount(path: str | Path) -> MountEntry:
    """The innermost cachefs mount containing *path*; NotInMount if none."""
    mounts = cachefs_mounts()
    # abspath first: it needs no request to the (maybe hung) mount.
    for candidate in dict.fromkeys((Path(os.path.abspath(path)), Path(os.path.realpath(path)))):
        matching = [m for m in mounts if _inside(candidate, m.mountpoint)]
        if matching:
            return max(matching, key=lambda m: len(m.mountpoint.parts))
    raise NotInMount(f"{path} is not inside a cachefs mount")


def mount_at(mountpoint: str | Path) -> MountEntry | None:
    """The cachefs mount whose mount point is exactly *mountpoint*, if any."""
    target = Path(os.path.abspath(mountpoint))
    matching = [m for m in cachefs_mounts() if m.mountpoint == target]
    return matching[-1] if matching else None


def attached(mount: MountEntry) -> bool:
    """Whether *mount* (this mount, not a later one on its mount point) is still mounted."""
    return any(
        (m.mountpoint, m.major, m.minor) == (mount.mountpoint, mount.major, mount.minor)
        for m in cachefs_mounts()
    )


# -- the socket -----------------------------------------------------------------


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An AF_UNIX address for *path*, going through /proc for long paths."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _address(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _replace_stale(path: Path) -> None:
    """Remove a socket left by a crashed mount; CacheDirInUse if one answers."""
    if not os.path.lexists(path):
        return
    try:
        _connect(path, timeout=2.0).close()
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale control socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise CacheDirInUse(
            f"cache dir {path.parent} has a control socket that answers: {e}"
        ) from e
    raise CacheDirInUse(f"cache dir {path.parent} is in use by a running mount")


async def serve_control(
    cache_dir: Path,
    handle: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests on ``<cache_dir>/control.sock`` until cancelled.

    Each client is served in its own task, its requests one after another;
    a long request does not hold up others, and an idle client gives way
    (see the module's docstring for the limits).
    """
    path = cache_dir / SOCKET_NAME
    _replace_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        identity = os.stat(path).st_ino
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits to be accepted, not refused
    except BaseException:
        sock.close()
        raise
    clients = _Clients()
    try:
        task_status.started()
        await trio.serve_listeners(
            lambda stream: _serve_client(stream, handle, clients), [trio.SocketListener(sock)]
        )
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == identity:
                path.unlink()


class Progress:
    """Where a handler sends the progress lines of one request.

    ``send`` never raises: once the client has gone, or has not taken a
    line within SEND_DEADLINE, the request is cancelled (nobody waits for
    its answer) and further sends do nothing.
    """

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self._stream = stream
        self._scope = scope
        self._lock = trio.Lock()
        self.client_gone = False

    async def send(self, fields: dict[str, Any]) -> None:
        if self.client_gone:
            return
        async with self._lock:
            if not await _send(self._stream, _encode({"progress": fields})):
                self.client_gone = True
                self._scope.cancel()


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _failure(error: str, exit_code: int = 1) -> dict[str, Any]:
    return {"ok": False, "error": error, "exit_code": exit_code}


async def _send(stream: trio.SocketStream, data: bytes) -> bool:
    """Send *data* to a client; False if it has gone or did not take it in time."""
    with trio.move_on_after(SEND_DEADLINE):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
    log.info("a control client took no line for %g s: dropped", SEND_DEADLINE)
    return False


class _Client:
    """One connection: ``evicted`` once it had to make room for a newer one;
    ``reserved`` if it holds a reserved place (RESERVED_COMMANDS only)."""

    __slots__ = ("evicted", "reserved")

    def __init__(self, reserved: bool) -> None:
        self.evicted = False
        self.reserved = reserved


class _Places:
    """At most *limit* connections; the one idle longest makes room."""

    def __init__(self, limit: int, reserved: bool) -> None:
        self.limit = limit
        self._reserved = reserved
        self._open: set[_Client] = set()
        # Waiting for a request, in the order they started to wait.
        self._idle: dict[_Client, trio.CancelScope] = {}

    def admit(self) -> _Client | None:
        """A new connection, or None when every one open is in a request."""
        if len(self._open) >= self.limit:
            if not self._idle:
                return None
            oldest = next(iter(self._idle))
            oldest.evicted = True
            self._idle.pop(oldest).cancel()
            self._open.discard(oldest)
        client = _Client(self._reserved)
        self._open.add(client)
        return client

    def leave(self, client: _Client) -> None:
        self._open.discard(client)

    @contextlib.contextmanager
    def idle(self, client: _Client) -> Iterator[trio.CancelScope]:
        """A scope for waiting on *client*'s next request, cancelled at
        IDLE_DEADLINE or when the client has to make room."""
        with trio.CancelScope(deadline=trio.current_time() + IDLE_DEADLINE) as scope:
            self._idle[client] = scope
            try:
                yield scope
            finally:
                self._idle.pop(client, None)


class _Clients:
    """The MAX_CLIENTS places for any request, then the RESERVED_CLIENTS ones."""

    def __init__(self) -> None:
        self._any = _Places(MAX_CLIENTS, reserved=False)
        self._reserved = _Places(RESERVED_CLIENTS, reserved=True)

    def admit(self) -> _Client | None:
        """A new connection, or None when every place is in a request."""
        return self._any.admit() or self._reserved.admit()

    def places(self, client: _Client) -> _Places:
        return self._reserved if client.reserved else self._any


class _Goodbye(Exception):
    """The connection is over; *farewell*, if any, tells the client why."""

    def __init__(self, farewell: dict[str, Any] | None = None) -> None:
        super().__init__(farewell)
        self.farewell = farewell


def _busy() -> dict[str, Any]:
    busy = f"the mount is busy with {MAX_CLIENTS} control requests: try again later"
    return {**_failure(busy), "busy": True}


async def _serve_client(stream: trio.SocketStream, handle: Handler, clients: _Clients) -> None:
    """Serve one connection.  Nothing it does ends the others or the mount."""
    async with stream:
        client = clients.admit()
        if client is None:
            log.info("%d control requests at once: a new client is told to retry", MAX_CLIENTS)
            await _send(stream, _encode(_busy()))
            return
        places = clients.places(client)
        try:
            await _serve_requests(stream, handle, places, client)
            return
        except _Goodbye as e:
            farewell = e.farewell
        except Exception as e:
            log.exception("a control connection failed")
            farewell = _failure(f"internal error: {e!r}")
        finally:
            places.leave(client)
        if farewell is not None:
            await _send(stream, _encode(farewell))


async def _serve_requests(
    stream: trio.SocketStream, handle: Handler, places: _Places, client: _Client
) -> None:
    """Answer *client*'s requests until it leaves; _Goodbye when the mount ends it."""
    lines = _Lines(stream)
    while True:
        with places.idle(client) as idle:
            line = await lines.next()
        if idle.cancelled_caught or client.evicted:
            if client.evicted:
                log.info("%d control connections: closed the one idle longest", places.limit)
                why = f"{places.limit} control connections are open and this one was idle longest"
            else:
                why = f"no complete request within {IDLE_DEADLINE:g} s"
            raise _Goodbye(_failure(f"closed: {why}"))
        if line is None:
            return
        try:
            request = _decode_request(line)
        except ValueError as e:
            log.debug("bad control request: %s", e)
            answer = _encode(_bad_request(str(e)))
        else:
            if client.reserved and request["command"] not in RESERVED_COMMANDS:
                log.info("%d control requests at once: a new request is told to retry", MAX_CLIENTS)
                raise _Goodbye(_busy())
            with trio.CancelScope() as scope:
                answer = await _answer(request, handle, Progress(stream, scope))
            if scope.cancelled_caught:
                log.info("a control client left before its answer: its request was cancelled")
                return
        if not await _send(stream, answer):
            return


class _Lines:
    """The request lines of one connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._searched = 0  # no newline before this

    async def next(self) -> bytes | None:
        """The next line without its newline; None once the client has closed.

        _Goodbye, with a bad request answer, for a line longer than MAX_LINE
        and for a last line without its newline.
        """
        buffer = self._buffer
        while (end := buffer.find(b"\n", self._searched)) < 0:
            self._searched = len(buffer)
            if len(buffer) > MAX_LINE:
                raise _Goodbye(_bad_request(f"a line longer than {MAX_LINE} bytes"))
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Goodbye() from None
            if not data:
                raise _Goodbye(_bad_request("a line without its newline") if buffer else None)
            buffer += data
        if end > MAX_LINE:
            raise _Goodbye(_bad_request(f"a line longer than {MAX_LINE} bytes"))
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        self._searched = 0
        return line


def _bad_request(why: str) -> dict[str, Any]:
    return _failure(f"bad request: {why}", 2)


async def _answer(request: dict[str, Any], handle: Handler, progress: Progress) -> bytes:
    """The answer line to *request*."""
    try:
        return _encode({"ok": True, "result": await handle(request, progress)})
    except CacheFSError as e:
        return _encode(_failure(str(e), e.exit_code))
    except Exception as e:
        log.exception("control request %r failed", request["command"][:100])
        return _encode(_failure(f"internal error: {e!r}"))


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


def _decode_request(line: bytes) -> dict[str, Any]:
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


def request(
    mount: MountEntry,
    command: str,
    timeout: float = 30.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    **args: Any,
) -> Any:
    """Send one request to *mount* and return its result; raises on errors.

    Progress lines go to *on_progress*.  *timeout* (> 0) bounds each wait
    for a line, so a long request that keeps reporting progress never times
    out.  RemoteError for an error answer, MountBusy when turned away,
    MountUnreachable when the mount cannot be reached or its answer read.
    """
    path = mount.socket_path
    if path is None:
        raise MountUnreachable(f"cannot tell where the mount at {mount.mountpoint} keeps its cache")
    try:
        sock = _connect(path, timeout)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise MountUnreachable(
            f"the mount at {mount.mountpoint} does not answer ({e.strerror}): "
            "is its daemon running?"
        ) from e
    except OSError as e:
        raise MountUnreachable(f"talking to the mount at {mount.mountpoint}: {e}") from e
    with sock, sock.makefile("rb") as replies:
        _talk(mount, sock.sendall, _encode({"command": command, **args}))
        while True:
            answer = _reply(mount, _talk(mount, replies.readline, MAX_REPLY + 1))
            if "progress" not in answer:
                break
            if on_progress is not None:
                on_progress(answer["progress"])
    if answer["ok"]:
        return answer.get("result")
    if answer.get("busy") is True:
        raise MountBusy(answer["error"])
    raise RemoteError(answer["error"], answer["exit_code"])


def _reply(mount: MountEntry, line: bytes) -> dict[str, Any]:
    """The answer or progress line *line*, checked; MountUnreachable if it is neither."""
    if not line.endswith(b"\n"):
        if len(line) > MAX_REPLY:
            why = f"an answer longer than {MAX_REPLY} bytes"
        else:
            raise MountUnreachable(f"the mount at {mount.mountpoint} closed the connection")
    else:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            why = f"an answer that is not JSON ({e})"
        else:
            why = _malformed(message)
            if why is None:
                return message
    raise MountUnreachable(f"the mount at {mount.mountpoint} sent {why}")


def _malformed(message: Any) -> str | None:
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


def _talk(mount: MountEntry, io: Callable[[Any], Any], arg: Any) -> Any:
    """One socket operation, its OSError as MountUnreachable."""
    try:
        return io(arg)
    except OSError as e:
        raise MountUnreachable(f"talking to the mount at {mount.mountpoint}: {e}") from e


# -- stopping a mount --------------------------------------------------------------


#: fusermount3 answers at once; this bounds a wedged one.
UNMOUNT_DEADLINE = 30.0


def lazy_unmount(mount: MountEntry) -> bool:
    """Detach *mount* now (``fusermount3 -u -z``); the kernel lets go when it is idle.

    False if it was gone already (its daemon got there first): not an error.
    """
    if not attached(mount):
        return False
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", "-z", str(mount.mountpoint)]
    else:
        cmd = ["umount", "-l", str(mount.mountpoint)]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, check=False, timeout=UNMOUNT_DEADLINE
        )
    except subprocess.TimeoutExpired:
        raise CacheFSError(f"{cmd[0]} did not finish within {UNMOUNT_DEADLINE:g} s") from None
    if done.returncode == 0:
        return True
    if not attached(mount):
        return False
    raise CacheFSError(f"{' '.join(cmd)} failed: {' '.join(done.stderr.split())}")


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(mount: MountEntry, fusectl: Path = FUSECTL) -> bool:
    """Abort the mount's FUSE connection: every request waiting on its
    daemon, and every later one, fails at once (ECONNABORTED, ENOTCONN).

    Through fusectl's ``abort`` file (mounted here if it is not, as root).
    False, with the reason logged, where that cannot be done; False, and
    nothing logged, once the connection has ended.
    """
    # fusectl names a connection by its device number as the kernel encodes it.
    path = fusectl / str((mount.major << 20) | mount.minor) / "abort"
    if fusectl.is_dir() and not any(fusectl.iterdir()):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", str(fusectl)],
                capture_output=True,
                check=False,
                timeout=10,
            )
    try:
        path.write_text("1")
    except FileNotFoundError as e:
        if os.path.ismount(fusectl) and not attached(mount):
            return False  # the connection has ended: nothing to abort
        log.warning("cannot abort the FUSE connection of %s (%s): %s", mount.mountpoint, path, e)
        return False
    except OSError as e:
        log.warning("cannot abort the FUSE connection of %s (%s): %s", mount.mountpoint, path, e)
        return False
    return True


def daemon_pid(cache_dir: Path | None) -> int | None:
    """The pid of the live process that holds *cache_dir*'s lock, if any."""
    if cache_dir is None:
        return None
    try:
        fd = os.open(cache_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its holder wrote its pid in it
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once process *pid* has exited (zombies count), False after *timeout*."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
