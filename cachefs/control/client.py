"""The command line's end of the control socket: one request, its answer.

The client trusts its mount: it takes answers of up to MAX_REPLY bytes, and
an answer it cannot read, or of another shape than its request's reply, is
a MountUnreachable, never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from cachefs.control.mounts import MountEntry, connect
from cachefs.control.protocol import MAX_REPLY, Message, Request, answer_problem, encode
from cachefs.errors import MountBusy, MountUnreachable, RemoteError

R = TypeVar("R")
T = TypeVar("T")

#: Seconds each wait for a line may take, unless a caller says otherwise.
TIMEOUT = 30.0


def request(
    mount: MountEntry,
    req: Request[R],
    timeout: float = TIMEOUT,
    on_progress: Callable[[Message], None] | None = None,
) -> R:
    """Send *req* to *mount* and return its reply; raises on errors.

    Progress lines go to *on_progress*.  *timeout* (> 0) bounds each wait
    for a line, so a long request that keeps reporting progress never times
    out.  RemoteError for an error answer, MountBusy when turned away,
    MountUnreachable when the mount cannot be reached or its answer read.
    """
    result = call(mount, req.command, timeout, on_progress, **req.arguments())
    try:
        return req.reply(result)
    except ValueError as e:
        raise MountUnreachable(
            f"the mount at {mount.mountpoint} answered {req.command} with {e}"
        ) from None


def call(
    mount: MountEntry,
    command: str,
    timeout: float = TIMEOUT,
    on_progress: Callable[[Message], None] | None = None,
    **args: Any,
) -> object:
    """Send the request *command* with *args* and return its result as sent
    (``request`` types it); errors as ``request`` raises them."""
    path = mount.socket_path
    if path is None:
        raise MountUnreachable(f"cannot tell where the mount at {mount.mountpoint} keeps its cache")
    try:
        sock = connect(path, timeout)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise MountUnreachable(
            f"the mount at {mount.mountpoint} does not answer ({e.strerror}): "
            "is its daemon running?"
        ) from e
    except OSError as e:
        raise MountUnreachable(f"talking to the mount at {mount.mountpoint}: {e}") from e
    with sock, sock.makefile("rb") as replies:
        _talk(mount, sock.sendall, encode({"command": command, **args}))
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


def _reply(mount: MountEntry, line: bytes) -> Message:
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
            problem = answer_problem(message)
            if problem is None:
                checked: Message = message
                return checked
            why = problem
    raise MountUnreachable(f"the mount at {mount.mountpoint} sent {why}")


def _talk(mount: MountEntry, io: Callable[[T], R], arg: T) -> R:
    """One socket operation, its OSError as MountUnreachable."""
    try:
        return io(arg)
    except OSError as e:
        raise MountUnreachable(f"talking to the mount at {mount.mountpoint}: {e}") from e
