"""The mount's end of the control socket: every line answered, no client able to
take the mount down or hold the socket.

The socket is ``control.sock`` in the cache directory, mode 0600 (a socket
left by a crashed mount is replaced; one that answers means the cache dir
is in use).  Each client is served in its own task, its requests one after
another; if it leaves before the answer, its request is cancelled.  A
request the handler fails on unexpectedly is answered "internal error:
..." (exit code 1, the cause in the mount's log); a bad line, "bad request:
..." (cachefs.control.protocol).  Either way the connection stays open.

The mount closes a connection, after one last ``{"ok": false, ...}`` line
that says why, when its line runs past MAX_LINE bytes, when it sends no
complete request within IDLE_DEADLINE of connecting or of its last answer,
or when MAX_CLIENTS connections are open and it is the one idle longest.  A
client that does not take a line within SEND_DEADLINE is dropped, and its
request cancelled.

The mount can always be inspected and stopped: a connection that finds
MAX_CLIENTS others all in a request takes one of RESERVED_CLIENTS reserved
places (the one idle longest there makes room), where it may make only the
RESERVED_COMMANDS, answered at once.  Any other request there, or a
connection that finds the reserved places all in a request too, is told
``{"ok": false, "error": "the mount is busy ...", "exit_code": 1, "busy":
true}`` and closed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import trio

from cachefs.control.mounts import SOCKET_NAME, connect, socket_address
from cachefs.control.protocol import (
    MAX_LINE,
    RESERVED_COMMANDS,
    Message,
    bad_request,
    decode_line,
    encode,
    failure,
    ok,
    progress_report,
)
from cachefs.errors import CacheDirInUse, CacheFSError

log = logging.getLogger(__name__)

#: Connections open at once.  When all are taken, the one idle longest
#: makes room for a new one.
MAX_CLIENTS = 64
#: Connections beyond MAX_CLIENTS, for the RESERVED_COMMANDS only.
RESERVED_CLIENTS = 8
#: Seconds a client has to send a whole request line, after connecting and
#: after each answer.  The local clients send theirs at once.
IDLE_DEADLINE = 10.0
#: Seconds a client has to take each line sent to it (progress or answer).
SEND_DEADLINE = 10.0

#: Answers one request (a decoded line), sending progress lines on the way.
Handler = Callable[[Message, "Progress"], Awaitable[object]]


def _replace_stale(path: Path) -> None:
    """Remove a socket left by a crashed mount; CacheDirInUse if one answers."""
    if not os.path.lexists(path):
        return
    try:
        connect(path, timeout=2.0).close()
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
        with socket_address(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        identity = os.stat(path).st_ino
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits to be accepted, not refused
    except BaseException:
        sock.close()
        raise
    clients = _Clients()

    async def serve(stream: trio.SocketStream) -> None:
        await _serve_client(stream, handle, clients)

    try:
        task_status.started()
        await trio.serve_listeners(serve, [trio.SocketListener(sock)])
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

    async def send(self, fields: Message) -> None:
        if self.client_gone:
            return
        async with self._lock:
            if not await _send(self._stream, encode(progress_report(fields))):
                self.client_gone = True
                self._scope.cancel()


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

    def __init__(self, farewell: Message | None = None) -> None:
        super().__init__(farewell)
        self.farewell = farewell


def _busy() -> Message:
    busy = f"the mount is busy with {MAX_CLIENTS} control requests: try again later"
    return {**failure(busy), "busy": True}


async def _serve_client(stream: trio.SocketStream, handle: Handler, clients: _Clients) -> None:
    """Serve one connection.  Nothing it does ends the others or the mount."""
    async with stream:
        client = clients.admit()
        if client is None:
            log.info("%d control requests at once: a new client is told to retry", MAX_CLIENTS)
            await _send(stream, encode(_busy()))
            return
        places = clients.places(client)
        try:
            await _serve_requests(stream, handle, places, client)
            return
        except _Goodbye as e:
            farewell = e.farewell
        except Exception as e:
            log.exception("a control connection failed")
            farewell = failure(f"internal error: {e!r}")
        finally:
            places.leave(client)
        if farewell is not None:
            await _send(stream, encode(farewell))


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
            raise _Goodbye(failure(f"closed: {why}"))
        if line is None:
            return
        try:
            request = decode_line(line)
        except ValueError as e:
            log.debug("bad control request: %s", e)
            answer = encode(bad_request(str(e)))
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
                raise _Goodbye(bad_request(f"a line longer than {MAX_LINE} bytes"))
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Goodbye() from None
            if not data:
                raise _Goodbye(bad_request("a line without its newline") if buffer else None)
            buffer += data
        if end > MAX_LINE:
            raise _Goodbye(bad_request(f"a line longer than {MAX_LINE} bytes"))
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        self._searched = 0
        return line


async def _answer(request: Message, handle: Handler, progress: Progress) -> bytes:
    """The answer line to *request*."""
    try:
        return encode(ok(await handle(request, progress)))
    except CacheFSError as e:
        return encode(failure(str(e), e.exit_code))
    except Exception as e:
        log.exception("control request %r failed", request["command"][:100])
        return encode(failure(f"internal error: {e!r}"))
