"""The log's lines and files (cachefs.daemon.logs), the state dump's lines
(cachefs.daemon.dump) and ``cachefs --version``, without a mount."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.daemon.dump import MAX_ITEMS, state_lines, task_lines
from cachefs.daemon.logs import DAEMON_FORMAT, ROTATE_ENV, OneLine, RotatingLog, rotation
from cachefs.daemon.sealedlog import SealNames
from cachefs.engine.state.cachedir import open_own_file


def record(msg: str, *args: object, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if error is not None:
        try:
            raise error
        except BaseException as e:
            exc_info = (type(e), e, e.__traceback__)
    return logging.LogRecord("cachefs.x", logging.INFO, __file__, 1, msg, args, exc_info)


def test_a_message_with_line_breaks_is_one_line() -> None:
    text = OneLine(DAEMON_FORMAT, tracebacks=False).format(
        record("reading %s failed", "a\nb\r\x1b[2J\u2028c")
    )
    assert "\n" not in text and "\x1b" not in text and "\u2028" not in text
    assert text.endswith("reading a\\nb\\r\\x1b[2J\\u2028c failed")


def test_an_exception_ends_its_line_unless_tracebacks_are_asked_for() -> None:
    line = OneLine(DAEMON_FORMAT, tracebacks=False).format(
        record("it failed", error=ValueError("bad\nthing"))
    )
    assert line.endswith("it failed: ValueError: bad\\nthing")
    text = OneLine(DAEMON_FORMAT, tracebacks=True).format(
        record("it failed", error=ValueError("bad\nthing"))
    )
    first, *rest = text.split("\n")
    assert first.endswith("it failed")
    assert rest[0] == "    Traceback (most recent call last):"
    assert rest[-2:] == ["    ValueError: bad", "    thing"]  # every line indented


def test_the_rotation_of_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROTATE_ENV, "4096,2")
    assert rotation() == (4096, 2)
    for bad in ("4096", "0,2", "4096,0", "x,2", "-1,2", "4096,2,1"):
        monkeypatch.setenv(ROTATE_ENV, bad)
        with pytest.raises(ValueError, match=ROTATE_ENV):
            rotation()


@pytest.fixture
def log_fds(tmp_path: Path) -> Iterator[tuple[Path, tuple[int, int]]]:
    """A log file open twice, as a daemon's stderr and stdout would be."""
    path = tmp_path / "cachefs.log"
    first = open_own_file(path, os.O_WRONLY | os.O_APPEND)
    second = os.dup(first)
    try:
        yield path, (first, second)
    finally:
        os.close(first)
        os.close(second)


def test_a_rotated_log_keeps_its_cap_and_count_and_stray_writes_follow(
    log_fds: tuple[Path, tuple[int, int]],
) -> None:
    path, fds = log_fds
    handler = RotatingLog(path, 600, 2, fds)
    handler.setFormatter(OneLine(DAEMON_FORMAT, tracebacks=False))
    for n in range(100):
        handler.handle(record("line %d of the log", n))
    os.write(fds[1], b"stray\n")  # a C library writing to its stdout
    files = [path, path.with_name("cachefs.log.1"), path.with_name("cachefs.log.2")]
    for p in files:
        assert 0 < p.stat().st_size <= 600 + len(b"stray\n"), p
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not path.with_name("cachefs.log.3").exists()
    assert path.read_text().endswith("line 99 of the log\nstray\n")
    assert "line 98 of the log" in path.read_text() + files[1].read_text()


def test_a_dump_shows_numbers_and_names_as_the_log_does() -> None:
    activity = {
        "handles": [("dir/alice.txt", "handles=2")],
        "fetches": [("dir/alice.txt", "blocks 0-3")],
        "writes": [("bob.txt", "dirty_bytes=4096 flushing")],
        "queues": [("", "open handles: 2")],
    }
    counters = {"hit_bytes": 10, "hit_ratio": 0.25, "file_errors": ["dir/alice.txt"], "x": None}
    plain = state_lines(["root"], [(5, "dir/alice.txt", 2)], activity, counters, repr)
    assert plain == [
        "task root",
        "inode 5 'dir/alice.txt': handles=2",
        "open 'dir/alice.txt': handles=2",
        "in flight 'dir/alice.txt': blocks 0-3",
        "changed 'bob.txt': dirty_bytes=4096 flushing",
        "queue open handles: 2",
        "counters hit_bytes=10 hit_ratio=0.25",
    ]
    sealed = SealNames(lambda text: f"tag{len(text):04}" * 4).seal
    text = "\n".join(state_lines([], [(5, "dir/alice.txt", 2)], activity, counters, sealed))
    assert "alice" not in text and "bob" not in text
    assert "inode 5 [sealed:tag0013tag0013ta]: handles=2" in text


def test_the_task_tree_shows_each_task_and_what_it_waits_on() -> None:
    async def parked(event: trio.Event) -> None:
        await event.wait()

    async def main() -> list[str]:
        event = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parked, event)
            await trio.testing.wait_all_tasks_blocked()
            root = trio.lowlevel.current_root_task()
            assert root is not None
            lines = task_lines(root)
            assert len(task_lines(root, limit=2)) == 3  # two, then how many more
            event.set()
        return lines

    lines = trio.run(main)
    waiting = [line for line in lines if "parked" in line]
    assert len(waiting) == 1
    assert waiting[0].startswith("    ")  # <init> > main > parked
    assert ".parked line " in waiting[0]
    assert waiting[0].endswith(", on trio._sync.Event.wait")
    assert any(line.endswith("(writing this dump)") for line in lines)


def test_version_prints_the_installed_version() -> None:
    for flag in ("--version", "-V"):
        done = subprocess.run(
            [sys.executable, "-m", "cachefs", flag], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout, done.stderr) == (
            0,
            f"cachefs {version('cachefs')}\n",
            "",
        )


def test_a_log_file_deleted_meanwhile_is_started_again(
    log_fds: tuple[Path, tuple[int, int]],
) -> None:
    path, fds = log_fds
    handler = RotatingLog(path, 100, 2, fds)
    handler.setFormatter(OneLine("%(message)s", tracebacks=False))
    handler.handle(record("x" * 90))
    path.unlink()
    handler.handle(record("the next line"))
    assert path.read_text() == "the next line\n"
    assert not path.with_name("cachefs.log.1").exists()


def test_a_dump_of_a_busy_mount_is_capped_and_says_how_much_more() -> None:
    many = [(f"f{i}", "handles=1") for i in range(MAX_ITEMS + 5)]
    inodes = [(i, f"f{i}", 1) for i in range(MAX_ITEMS + 3)]
    lines = state_lines([], inodes, {"handles": many}, {}, repr)
    assert sum(line.startswith("open ") for line in lines) == MAX_ITEMS
    assert sum(line.startswith("inode ") for line in lines) == MAX_ITEMS
    assert "... and 5 more files open" in lines and "... and 3 more inodes" in lines
