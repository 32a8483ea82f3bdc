"""The control socket's server under hostile and broken clients.

In process: serve_control with a fake handler (and once with the mount's
real one over a local source), clients on trio sockets.  Every line gets
exactly one answer (after any progress lines), a bad line a ``bad
request`` one; no client takes the server down or holds it, and a mount
busy with requests can still be inspected and stopped.  The client takes
any answer its mount sends, and one it cannot read is a one-line error.
Then through real mounts: the mount keeps serving reads, ``cachefs stats``
and ``cachefs unmount`` under a flood of requests; unmount with no time to
wait, and by another user.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
from conftest import EXIT_DEADLINE, NATIVE_ONLY, REPO, lazy_unmount, run_cachefs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.local import LocalBackend
from cachefs import CacheConfig, open_file_cache
from cachefs.cli import running as cachefs_client
from cachefs.cli.parser import build_parser
from cachefs.control import client as control_client
from cachefs.control import mounts, protocol
from cachefs.control import server as ctl
from cachefs.control.mounts import SOCKET_NAME, MountEntry, mount_at
from cachefs.control.protocol import MAX_DEPTH, MAX_LINE, RESERVED_COMMANDS
from cachefs.control.server import Progress, serve_control
from cachefs.daemon.commands import ControlCommands
from cachefs.daemon.tuning import abort_connection
from cachefs.errors import ConfigError, MountBusy, MountUnreachable
from cachefs.fs.inodes import Namespace

if TYPE_CHECKING:
    from conftest import MountFactory

#: Longest any one wait of a test may take (virtual time under autojump_clock).
WAIT = 10 * ctl.IDLE_DEADLINE
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


class FakeCommands:
    """A handler with a command for each way a request can behave."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.waiting = 0
        self.hold_reserved = False  # whether stats and unmount wait, as "wait" does
        self.cancelled = trio.Event()

    async def __call__(self, request: dict[str, Any], progress: Progress) -> Any:
        command = request["command"]
        if command == "echo":
            return request.get("value")
        if command == "ticks":  # a long request: a progress line every second
            for i in range(request["n"]):
                await progress.send({"tick": i})
                await trio.sleep(1)
            return "ticked"
        if command == "quiet":  # a long request without progress
            await trio.sleep(request["seconds"])
            return "done"
        if command == "wait" or (command in RESERVED_COMMANDS and self.hold_reserved):
            self.waiting += 1
            await self.release.wait()
            return "released"
        if command in RESERVED_COMMANDS:
            return command
        if command == "big":  # an answer of n bytes and a bit
            return "x" * request["n"]
        if command == "flood":  # progress as fast as the client takes it
            try:
                while True:
                    await progress.send({"filler": "x" * 65536})
                    await trio.sleep(0)
            except trio.Cancelled:
                self.cancelled.set()
                raise
        if command == "unjsonable":
            return object()
        if command == "crash":
            raise RuntimeError("a bug")
        raise ConfigError(f"unknown control command {command!r}")


class Client:
    """One connection to the control socket, read a line at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    @classmethod
    async def connect(cls, cache_dir: Path) -> Client:
        with trio.fail_after(WAIT):
            return cls(await trio.open_unix_socket(str(cache_dir / SOCKET_NAME)))

    async def send(self, data: bytes) -> None:
        with trio.fail_after(WAIT):
            await self.stream.send_all(data)

    async def send_until_closed(self, data: bytes) -> None:
        """Send *data*, or as much of it as the server reads before it closes."""
        try:
            await self.send(data)
        except trio.BrokenResourceError:
            pass

    async def drip(self, data: bytes) -> None:
        """Send *data* a byte a second until done or the server closes."""
        for i in range(len(data)):
            try:
                await self.send(data[i : i + 1])
            except trio.BrokenResourceError:
                return
            await trio.sleep(1)  # the client's pace, not a synchronisation

    async def line(self) -> bytes:
        """The next line, newline included; b"" once the server has closed."""
        with trio.fail_after(WAIT):
            while (end := self._buffer.find(b"\n")) < 0:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:  # ECONNRESET: it closed with our bytes unread
                    data = b""
                if not data:
                    assert not self._buffer, f"a partial line before the end: {self._buffer!r}"
                    return b""
                self._buffer += data
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line

    async def answer(self) -> dict[str, Any]:
        """The answer to the oldest request not yet answered (progress lines skipped)."""
        while True:
            line = await self.line()
            assert line, "the server closed the connection instead of answering"
            message = json.loads(line)
            if "progress" not in message:
                return check_answer(message)

    async def ask(self, request: bytes | dict[str, Any]) -> dict[str, Any]:
        if isinstance(request, dict):
            request = json.dumps(request).encode()
        await self.send(request + b"\n")
        return await self.answer()

    async def farewell(self) -> dict[str, Any]:
        """The last line the server sends before it closes the connection."""
        answer = await self.answer()
        assert await self.line() == b"", "the connection stayed open"
        return answer


def check_answer(message: Any) -> dict[str, Any]:
    """*message* has the shape of an answer."""
    assert isinstance(message, dict) and isinstance(message.get("ok"), bool), message
    if message["ok"]:
        assert "result" in message, message
    else:
        assert isinstance(message["error"], str) and "\n" not in message["error"], message
        assert type(message["exit_code"]) is int, message
    return message


def assert_bad_request(answer: dict[str, Any], *words: str) -> None:
    assert answer["ok"] is False and answer["exit_code"] == 2, answer
    assert answer["error"].startswith("bad request: "), answer
    for word in words:
        assert word in answer["error"], answer


@pytest.fixture
async def fake(tmp_path: Path, nursery: trio.Nursery) -> FakeCommands:
    """A control server on tmp_path, answering with FakeCommands."""
    commands = FakeCommands()
    await nursery.start(serve_control, tmp_path, commands)
    return commands


# -- bad requests --------------------------------------------------------------------


def nested(depth: int) -> bytes:
    """An echo request whose value nests *depth* - 1 lists: *depth* levels in all."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"command": "echo", "value": ' + inner + b"}"


@pytest.mark.parametrize(
    "line",
    [b"[" * 100_000, b'{"a": ' * 50_000, nested(MAX_DEPTH + 1)],
    ids=["100000 [", "50000 objects", "one too deep"],
)
async def test_deep_nesting_is_a_bad_request_and_the_server_goes_on(
    tmp_path: Path, fake: FakeCommands, line: bytes
) -> None:
    client = await Client.connect(tmp_path)
    assert_bad_request(await client.ask(line), "nested deeper than")
    assert (await client.ask(nested(MAX_DEPTH)))["ok"] is True
    other = await Client.connect(tmp_path)
    assert await other.ask({"command": "echo", "value": "still here"}) == {
        "ok": True,
        "result": "still here",
    }


async def test_each_malformed_line_gets_one_bad_request_answer(
    tmp_path: Path, fake: FakeCommands
) -> None:
    bad = {
        b"\xff\xfe{}": "not UTF-8",
        b'{"command": "echo", "value": NaN}': "NaN",
        b'{"command": "echo", "value": -Infinity}': "Infinity",
        b'{"command": "echo", "value": 1e999}': "too large",
        b'{"command": "echo", "value": 100000000000000000000}': "64 bits",
        b'{"command": "echo", "value": ' + b"9" * 5000 + b"}": "64 bits",
        b'{"command": "echo", "value": "unterminated}': "",
        b"": "",
        b"[]": "'command'",
        b'{"command": 7}': "'command'",
        b'{"command": "add-data", "file_id": "f", "offset": 0, "data": "", "trust": "no"}': (
            "'trust'"
        ),
        b'{"command": "purge", "file_ids": "/"}': "'file_ids'",
        b'{"command": "add-data", "file_id": "f", "offset": 1.5, "data": ""}': "'offset'",
    }
    client = await Client.connect(tmp_path)
    # All at once: answered one by one, in order, on the same connection.
    await client.send(b"".join(line + b"\n" for line in bad))
    for word in bad.values():
        assert_bad_request(await client.answer(), word)
    assert (await client.ask({"command": "echo", "value": [1, 2]}))["result"] == [1, 2]


async def test_a_line_over_the_limit_is_answered_then_closed(
    tmp_path: Path, fake: FakeCommands
) -> None:
    for line in (b"x" * (MAX_LINE + 1), b" " * (MAX_LINE + 1) + b"\n"):
        client = await Client.connect(tmp_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_until_closed, line)
            assert_bad_request(await client.farewell(), f"longer than {MAX_LINE} bytes")
    client = await Client.connect(tmp_path)
    line = b'{"command": "echo", "value": "' + b"x" * (MAX_LINE - 40) + b'"}'
    assert len(line) <= MAX_LINE and (await client.ask(line))["ok"] is True


async def test_a_last_line_without_its_newline_is_answered(
    tmp_path: Path, fake: FakeCommands
) -> None:
    client = await Client.connect(tmp_path)
    await client.send(b'{"command": "echo"}')
    await client.stream.send_eof()
    assert_bad_request(await client.farewell(), "without its newline")


async def test_a_handler_bug_is_an_internal_error_and_the_server_goes_on(
    tmp_path: Path, fake: FakeCommands, caplog: pytest.LogCaptureFixture
) -> None:
    client = await Client.connect(tmp_path)
    for command in ("unjsonable", "crash"):
        answer = await client.ask({"command": command})
        assert answer["ok"] is False and answer["exit_code"] == 1, answer
        assert answer["error"].startswith("internal error: "), answer
    assert (await client.ask({"command": "echo", "value": 1}))["result"] == 1
    failed = [r for r in caplog.records if r.name == "cachefs.control.server" and r.exc_info]
    assert len(failed) == 2, caplog.text


# -- connections that hold the server --------------------------------------------------


async def test_idle_connections_make_room_for_a_new_one(tmp_path: Path, fake: FakeCommands) -> None:
    idle = []
    for _ in range(ctl.MAX_CLIENTS + 4):
        idle.append(await Client.connect(tmp_path))
        await trio.testing.wait_all_tasks_blocked()  # the server is waiting on it
    fresh = await Client.connect(tmp_path)
    assert (await fresh.ask({"command": "echo", "value": "served"}))["result"] == "served"
    # The five idle longest made room, and were told so.
    for client in idle[:5]:
        farewell = await client.farewell()
        assert farewell["ok"] is False and "idle longest" in farewell["error"], farewell
    assert (await idle[5].ask({"command": "echo", "value": 5}))["result"] == 5
    assert (await idle[-1].ask({"command": "echo", "value": -1}))["result"] == -1


async def test_a_client_without_a_whole_request_is_closed_after_the_idle_deadline(
    tmp_path: Path, fake: FakeCommands, autojump_clock: trio.testing.MockClock
) -> None:
    silent = await Client.connect(tmp_path)
    partial = await Client.connect(tmp_path)
    await partial.send(b'{"command": ')
    answered = await Client.connect(tmp_path)
    assert (await answered.ask({"command": "echo"}))["ok"] is True
    for client in (silent, partial, answered):
        farewell = await client.farewell()
        assert farewell["ok"] is False, farewell
        assert f"no complete request within {ctl.IDLE_DEADLINE:g} s" in farewell["error"]
    # A byte a second does not keep a connection: the deadline is for the whole line.
    drip = await Client.connect(tmp_path)
    request = b'{"command": "echo", "value": "slowly"}\n'
    assert len(request) > 2 * ctl.IDLE_DEADLINE
    async with trio.open_nursery() as nursery:
        nursery.start_soon(drip.drip, request)
        assert "no complete request" in (await drip.farewell())["error"]


async def test_long_requests_are_not_idle(
    tmp_path: Path, fake: FakeCommands, autojump_clock: trio.testing.MockClock
) -> None:
    client = await Client.connect(tmp_path)
    assert (await client.ask({"command": "ticks", "n": 300}))["result"] == "ticked"
    quiet = 6 * ctl.IDLE_DEADLINE
    assert (await client.ask({"command": "quiet", "seconds": quiet}))["result"] == "done"


async def wait_until_waiting(fake: FakeCommands, n: int) -> None:
    """Until *n* requests are waiting in the handler."""
    with trio.fail_after(WAIT):
        while fake.waiting < n:
            await trio.testing.wait_all_tasks_blocked()


async def test_a_mount_busy_with_requests_still_answers_stats_and_unmount(
    tmp_path: Path, fake: FakeCommands
) -> None:
    busy = [await Client.connect(tmp_path) for _ in range(ctl.MAX_CLIENTS)]
    for client in busy:
        await client.send(b'{"command": "wait"}\n')  # and never read
    await wait_until_waiting(fake, ctl.MAX_CLIENTS)
    # A reserved place: the commands that see and stop the mount, and no others.
    late = await Client.connect(tmp_path)
    assert (await late.ask({"command": "stats"}))["result"] == "stats"
    assert (await late.ask({"command": "unmount"}))["result"] == "unmount"
    for command in ("echo", "wait"):
        refused = await Client.connect(tmp_path)
        await refused.send(json.dumps({"command": command}).encode() + b"\n")
        farewell = await refused.farewell()
        assert farewell["ok"] is False and farewell.get("busy") is True, farewell
        assert "busy" in farewell["error"], farewell
    # Idle reserved connections make room as the others do.
    idle = [await Client.connect(tmp_path) for _ in range(ctl.RESERVED_CLIENTS)]
    await trio.testing.wait_all_tasks_blocked()
    assert "idle longest" in (await late.farewell())["error"]
    assert (await idle[-1].ask({"command": "stats"}))["result"] == "stats"
    # Only when every reserved place is in a request too is a new client told busy.
    fake.hold_reserved = True
    for i, client in enumerate(idle):
        await client.send(json.dumps({"command": ("stats", "unmount")[i % 2]}).encode() + b"\n")
    await wait_until_waiting(fake, ctl.MAX_CLIENTS + ctl.RESERVED_CLIENTS)
    turned_away = await Client.connect(tmp_path)
    farewell = await turned_away.farewell()
    assert farewell["ok"] is False and farewell.get("busy") is True, farewell
    fake.release.set()
    for client in [*busy, *idle]:
        assert (await client.answer())["result"] == "released"
    assert (await (await Client.connect(tmp_path)).ask({"command": "echo"}))["ok"] is True


async def test_a_client_that_takes_no_lines_is_dropped_and_its_request_cancelled(
    tmp_path: Path, fake: FakeCommands, autojump_clock: trio.testing.MockClock
) -> None:
    client = await Client.connect(tmp_path)
    await client.send(b'{"command": "flood"}\n')  # and never reads
    with trio.fail_after(WAIT):
        await fake.cancelled.wait()
    assert (await (await Client.connect(tmp_path)).ask({"command": "echo"}))["ok"] is True


# -- the client ------------------------------------------------------------------------


def entry_for(cache_dir: Path) -> MountEntry:
    return MountEntry(Path("/mnt"), 0, 1, cache_dir)


async def test_the_client_takes_answers_far_over_a_mebibyte(
    tmp_path: Path, fake: FakeCommands
) -> None:
    n = 5 * MAX_LINE
    with trio.fail_after(WAIT):
        answer = await trio.to_thread.run_sync(
            lambda: control_client.call(entry_for(tmp_path), "big", timeout=WAIT, n=n)
        )
    assert answer == "x" * n


async def serve_replies(
    cache_dir: Path, replies: bytes, *, task_status: trio.TaskStatus[None]
) -> None:
    """A broken mount: every request is answered *replies*, then the connection closed."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(cache_dir / SOCKET_NAME))
    sock.listen()
    task_status.started()
    with sock:
        while True:
            conn, _ = await sock.accept()
            async with trio.SocketStream(conn) as stream:
                with trio.fail_after(WAIT):
                    request = b""
                    while not request.endswith(b"\n"):
                        if not (data := await stream.receive_some(65536)):
                            break
                        request += data
                    await stream.send_all(replies)


@pytest.mark.parametrize(
    "replies",
    [
        b"",
        b'{"ok": true, "result": 1}',
        b"not json\n",
        b"\xff\xfe\n",
        b'{"ok": true, "result": "' + b"x" * 100 + b"\n",
        b"[" * 100_000 + b"\n",
        b"[1, 2]\n",
        b"null\n",
        b'{"result": 1}\n',
        b'{"ok": "yes"}\n',
        b'{"ok": false}\n',
        b'{"ok": false, "error": ["a"], "exit_code": 1}\n',
        b'{"ok": false, "error": "e", "exit_code": "1"}\n',
        b'{"ok": false, "error": "e", "exit_code": 1e9}\n',
        b'{"progress": 5}\n{"ok": true}\n',
        b'{"progress": {}}\n',
    ],
)
async def test_an_answer_the_client_cannot_read_is_a_one_line_error(
    tmp_path: Path, nursery: trio.Nursery, replies: bytes
) -> None:
    await nursery.start(serve_replies, tmp_path, replies)
    seen: list[dict[str, Any]] = []
    with trio.fail_after(WAIT), pytest.raises(MountUnreachable) as info:
        await trio.to_thread.run_sync(
            lambda: control_client.request(
                entry_for(tmp_path), protocol.Stats(), timeout=WAIT, on_progress=seen.append
            )
        )
    message = str(info.value)
    assert message.startswith("the mount at /mnt ") and "\n" not in message, message
    assert len(message) < 300, message


def test_mountinfo_tells_who_made_a_mount(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    fsname = mounts.fsname_for(tmp_path / "cache")
    mountinfo.write_text(
        f"42 27 0:39 / /mnt/a rw - fuse.cachefs {fsname} rw,user_id=1000,group_id=100\n"
        f"43 27 0:40 / /mnt/b rw - fuse.cachefs {fsname} rw,user_id=0,group_id=0\n"
        f"44 27 0:41 / /mnt/c rw - fuse.cachefs {fsname} rw\n"
    )
    assert [m.owner for m in mounts.cachefs_mounts(mountinfo)] == [1000, 0, None]


# -- fuzzing ---------------------------------------------------------------------------


class BlockingClient:
    """A client for hypothesis, run in a thread: every socket wait has a deadline."""

    def __init__(self, cache_dir: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(cache_dir / SOCKET_NAME))
        self.lines = self.sock.makefile("rb")

    def answers(self, lines: list[bytes]) -> Iterator[dict[str, Any]]:
        """Send *lines*, yield the answer to each (progress lines skipped)."""
        self.sock.sendall(b"".join(line + b"\n" for line in lines))
        for _ in lines:
            while True:
                line = self.lines.readline()
                assert line.endswith(b"\n"), f"no whole answer line: {line!r}"
                message = json.loads(line)
                if "progress" not in message:
                    yield check_answer(message)
                    break

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def strict_request(line: bytes) -> dict[str, Any] | None:
    """The request in *line* if it is plainly a good one, else None."""
    try:
        value = json.loads(line.decode(), parse_constant=lambda name: math.nan)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("command"), str):
        return None
    return value


def finite(value: Any) -> bool:
    """No NaN, infinity or integer past 64 bits anywhere in *value*."""
    if isinstance(value, list):
        return all(finite(v) for v in value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        return -(1 << 63) <= value < 1 << 63
    return True


file_ids = st.sampled_from(["", "/", "..", "a", "d", "d/b", "no/such", "\x00", "\udcff"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | file_ids,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
deep = st.sampled_from([2, MAX_DEPTH, MAX_DEPTH + 1, 10_000]).map(lambda n: b"[" * n + b"]" * n)
raw_lines = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b""))


def request_lines(commands: list[str]) -> st.SearchStrategy[bytes]:
    """Lines as clients might send them: requests for *commands* (good, with
    odd values or with wrong argument types), other JSON, and bytes."""
    names = file_ids | st.text(max_size=10)
    good = st.fixed_dictionaries(
        {"command": st.sampled_from(commands)},
        optional={
            "file_ids": st.lists(names, max_size=4),
            "file_id": names,
            "offset": st.integers(-5, 200_000) | st.integers(-(1 << 63), (1 << 63) - 1),
            "data": st.sampled_from(["", "eHg=", "!", base64.b64encode(b"a" * 70_000).decode()]),
            "trust": st.booleans(),
        },
    )
    argument = st.sampled_from(["file_ids", "file_id", "offset", "data", "trust", "value", "x"])
    odd = st.fixed_dictionaries(
        {"command": st.sampled_from(commands) | json_values},
        optional={"file_ids": json_values, "file_id": json_values, "offset": json_values},
    ) | st.dictionaries(argument, json_values).map(
        lambda d: {"command": "stats", **d},
    )
    encoded = st.builds(
        lambda v, ascii: json.dumps(v, ensure_ascii=ascii).encode("utf-8", "surrogatepass"),
        st.sampled_from([good, good, odd, json_values]).flatmap(lambda s: s),
        st.booleans(),
    )
    deep_object = deep.map(lambda b: b"{" + b[1:-1] + b"}")
    # Three JSON lines for each line of garbage.
    return st.sampled_from([encoded] * 3 + [raw_lines | deep | deep_object]).flatmap(lambda s: s)


async def fuzz_in_thread(test: Any) -> None:
    with trio.fail_after(600):  # the thread's own waits are bounded; this bounds the whole
        await trio.to_thread.run_sync(test, abandon_on_cancel=True)


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


async def test_fuzz_every_line_gets_one_answer(tmp_path: Path, fake: FakeCommands) -> None:
    @FUZZ
    @given(st.lists(request_lines(["echo", "nope"]), min_size=1, max_size=5))
    def fuzz(lines: list[bytes]) -> None:
        client = BlockingClient(tmp_path)
        try:
            answers = list(client.answers([*lines, b'{"command": "echo", "value": "end"}']))
        finally:
            client.close()
        assert answers.pop() == {"ok": True, "result": "end"}  # and no answer too many
        for line, answer in zip(lines, answers, strict=True):
            request = strict_request(line)
            if request is None or not finite(request):
                assert_bad_request(answer)
            elif answer["ok"] and request["command"] in RESERVED_COMMANDS:
                assert answer["result"] == request["command"]
            elif answer["ok"]:
                assert request["command"] == "echo"
                assert answer["result"] == request.get("value")
            else:
                assert answer["exit_code"] == 2, (line, answer)

    await fuzz_in_thread(fuzz)


async def test_fuzz_the_mount_commands(tmp_path: Path, nursery: trio.Nursery) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(b"a" * 1000)
    (src / "d" / "b").write_bytes(b"b" * 70_000)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    config = CacheConfig(block_size=64 * 1024)
    cache = await nursery.start(_open_cache, LocalBackend(src), cache_dir, config)
    stops: list[str] = []
    commands = ControlCommands(
        cache,
        Namespace(cache),
        source=str(src),
        mountpoint=tmp_path / "mnt",
        stop=lambda: stops.append("unmount"),
        invalidate=lambda file_id: None,
    )
    await nursery.start(serve_control, tmp_path, commands)
    names = ["stats", "prefetch", "pin", "unpin", "purge", "add-data", "reset-file-errors"]
    names += ["reset-external-error", "unmount", "nope"]

    @FUZZ
    @given(st.lists(request_lines(names), min_size=1, max_size=4))
    def fuzz(lines: list[bytes]) -> None:
        client = BlockingClient(tmp_path)
        try:
            answers = list(client.answers([*lines, b'{"command": "stats"}']))
        finally:
            client.close()
        assert answers.pop()["result"]["pid"] == os.getpid()
        for line, answer in zip(lines, answers, strict=True):
            if not answer["ok"]:
                assert not answer["error"].startswith("internal error"), (line, answer)
            request = strict_request(line)
            if request is None or not finite(request) or _wrong_argument(request):
                assert_bad_request(answer)

    await fuzz_in_thread(fuzz)


def _wrong_argument(request: dict[str, Any]) -> bool:
    """Whether an argument of the mount's commands has the wrong type."""
    kinds = {"file_id": str, "data": str, "trust": bool}
    if any(k in request and type(request[k]) is not t for k, t in kinds.items()):
        return True
    if "offset" in request and type(request["offset"]) is not int:
        return True
    file_ids = request.get("file_ids", [])
    return not isinstance(file_ids, list) or not all(isinstance(f, str) for f in file_ids)


async def _open_cache(
    backend: LocalBackend,
    cache_dir: Path,
    config: CacheConfig,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_file_cache(backend, cache_dir, config) as cache:
        task_status.started(cache)
        await trio.sleep_forever()


# -- a real mount ----------------------------------------------------------------------


@needs_fuse
@NATIVE_ONLY
def test_a_mount_survives_nested_json_and_idle_connections(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    m = mount(src)
    sock_path = m.cache_dir / SOCKET_NAME
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(WAIT)
        sock.connect(str(sock_path))
        sock.sendall(b"[" * 100_000 + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    assert_bad_request(answer, "nested")
    assert (m / "f").read_bytes() == b"data" * 1000
    idle = []
    try:
        for _ in range(ctl.MAX_CLIENTS + 4):
            s = socket.socket(socket.AF_UNIX)
            idle.append(s)
            s.settimeout(WAIT)
            s.connect(str(sock_path))
        assert m.stats()["source"] == str(src)
        assert (m / "f").read_bytes() == b"data" * 1000
    finally:
        for s in idle:
            s.close()
    m.unmount()  # a clean exit: the daemon committed its index
    assert "Traceback" not in m.log_text()


def source_with_a_file(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 1000)
    return src


@needs_fuse
def test_a_mount_flooded_with_requests_still_answers_stats_and_unmount(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * (1 << 20))
    m = mount(src, "--throttle", "0,0.001")  # a prefetch of f takes 1000 s
    flood = []
    try:
        for _ in range(ctl.MAX_CLIENTS):
            sock = socket.socket(socket.AF_UNIX)
            flood.append(sock)
            sock.settimeout(WAIT)
            sock.connect(str(m.cache_dir / SOCKET_NAME))
            sock.sendall(b'{"command": "prefetch", "file_ids": ["f"]}\n')
        for sock in flood:  # each in its request once it reports progress; never read again
            assert "progress" in json.loads(sock.makefile("rb").readline())
        assert m.stats()["source"] == str(src)
        with socket.socket(socket.AF_UNIX) as sock:  # other commands are turned away
            sock.settimeout(WAIT)
            sock.connect(str(m.cache_dir / SOCKET_NAME))
            sock.sendall(b'{"command": "purge", "file_ids": ["f"]}\n')
            assert json.loads(sock.makefile("rb").readline()).get("busy") is True
        done = run_cachefs("unmount", m.mountpoint, "--timeout", EXIT_DEADLINE)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""  # asked, not forced
        assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
        assert mount_at(m.mountpoint) is None
    finally:
        for sock in flood:
            sock.close()


@needs_fuse
def test_unmount_with_a_busy_mount_asks_its_daemon_by_signal(
    mount: MountFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When even the reserved control places are taken (by stats answers
    nobody reads), unmount stops the daemon with SIGTERM, as gently."""
    m = mount(source_with_a_file(tmp_path))

    def busy(*args: Any, **kwargs: Any) -> Any:
        raise MountBusy("the mount is busy")

    monkeypatch.setattr(cachefs_client, "request", busy)
    args = build_parser().parse_args(["unmount", str(m.mountpoint), "--timeout", str(WAIT)])
    assert args.run(args) == 0
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    assert "SIGTERM: unmounting" in m.log_text()
    assert mount_at(m.mountpoint) is None


@needs_fuse
@pytest.mark.parametrize("timeout", ["0", "0.001", "0.01"])
def test_unmount_with_no_time_to_wait_detaches_and_exits_0(
    mount: MountFactory, tmp_path: Path, timeout: str
) -> None:
    m = mount(source_with_a_file(tmp_path))
    assert (m / "f").read_bytes() == b"data" * 1000
    done = run_cachefs("unmount", m.mountpoint, "--timeout", timeout)
    assert done.returncode == 0, done.stderr
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()  # and committed
    assert mount_at(m.mountpoint) is None
    # Nothing to say when the daemon detached its mount itself; one warning
    # when the command had to abort the connection and detach it first.
    warnings = done.stderr.splitlines()
    assert len(warnings) <= 1, done.stderr
    for line in warnings:
        assert line.startswith("cachefs: WARNING: ") and "aborted its FUSE connection" in line


@needs_fuse
def test_a_mount_its_daemon_has_detached_needs_no_abort_and_no_detaching(
    mount: MountFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = mount(source_with_a_file(tmp_path))
    entry = mount_at(m.mountpoint)
    assert entry is not None
    subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True, timeout=WAIT)
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    assert not mounts.attached(entry)
    assert abort_connection(entry) is False
    assert mounts.lazy_unmount(entry) is False
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@needs_fuse
def test_aborting_a_mount_that_ended_spares_the_mount_its_device_number_went_to(
    mount: MountFactory, tmp_path: Path
) -> None:
    """The kernel gives an ended FUSE connection's number to the next mount:
    an abort of the ended one (cachefs unmount's last resort) must not reach it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    gone = mount(source_with_a_file(tmp_path / "a"))
    ended = mount_at(gone.mountpoint)
    assert ended is not None
    subprocess.run(["fusermount3", "-u", str(gone.mountpoint)], check=True, timeout=WAIT)
    assert gone.proc.wait(timeout=EXIT_DEADLINE) == 0, gone.log_text()
    live = mount(source_with_a_file(tmp_path / "b"))
    now = mount_at(live.mountpoint)
    assert now is not None
    # As if the live mount had been given the ended one's number.
    reused = MountEntry(ended.mountpoint, now.major, now.minor, ended.cache_dir, ended.owner)
    assert abort_connection(reused) is False
    assert (live.mountpoint / "f").read_bytes() == b"data" * 1000


NOBODY = 65534


@needs_fuse
def test_another_user_may_not_unmount_a_mount(tmp_path: Path) -> None:
    top = Path(tempfile.mkdtemp(prefix="cachefs-test-", dir="/tmp"))
    top.chmod(0o755)  # the mount point is in reach of everyone, its cache dir of root only
    mnt = top / "mnt"
    mnt.mkdir()
    try:
        src = source_with_a_file(tmp_path)
        done = run_cachefs("mount", src, mnt, "--cache-dir", tmp_path / "cache")
        assert done.returncode == 0, done.stderr
        entry = mount_at(mnt)
        assert entry is not None
        nobody = subprocess.run(
            ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
            + [sys.executable, "-m", "cachefs", "unmount", str(mnt)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
        assert nobody.returncode == 1, nobody.stderr
        lines = nobody.stderr.splitlines()
        assert len(lines) == 1, nobody.stderr
        assert lines[0].startswith("cachefs: error: permission denied: "), lines[0]
        assert str(mnt) in lines[0] and "root" in lines[0], lines[0]
        # Untouched: still mounted, still served, and its owner unmounts it.
        assert mount_at(mnt) == entry
        assert (mnt / "f").read_bytes() == b"data" * 1000
        done = run_cachefs("unmount", mnt)
        assert done.returncode == 0, done.stderr
        assert mount_at(mnt) is None
    finally:
        if mount_at(mnt) is not None:
            run_cachefs("unmount", mnt, "--timeout", EXIT_DEADLINE)
            lazy_unmount(mnt)
        mnt.rmdir()
        top.rmdir()
