"""The command line, the control messages and the daemon's side of writes,
without a mount: the mount options for changes (checked once, handed to the
engine as they were given), ``flush`` and ``unmount`` through the mount's
ControlCommands over a memory-backed cache (the source has the bytes after
them; a file that cannot be sent is named and stays changed), the write
rows of ``stats``, what the two commands print and their exit codes, and
the daemon's flush on its way out."""

from __future__ import annotations

import argparse
import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from backends.memory import MemoryBackend
from cachefs.cli.flushing import report_flush
from cachefs.cli.main import main
from cachefs.cli.mount import mount_options
from cachefs.cli.parser import build_parser
from cachefs.cli.running import _report_unmount, format_stats
from cachefs.contract import RWResult, WriteData
from cachefs.control.mounts import MountEntry
from cachefs.control.protocol import (
    Flush,
    FlushReply,
    Unmount,
    UnmountReply,
    decode_line,
    decode_request,
    encode,
)
from cachefs.control.server import Progress
from cachefs.daemon.commands import ControlCommands
from cachefs.daemon.flushes import flush_on_exit
from cachefs.daemon.options import MountOptions
from cachefs.engine import CacheConfig, FileCache, open_file_cache
from cachefs.errors import ConfigError, ReadOnly
from cachefs.fs.inodes import Namespace

KB64 = 64 * 1024
#: Long enough that nothing is flushed in a test unless a command says so.
NEVER = 3600.0


# -- the mount options ------------------------------------------------------------------


def parse(tmp_path: Path, *options: str) -> argparse.Namespace:
    (tmp_path / "src").mkdir(exist_ok=True)
    argv = ["mount", str(tmp_path / "src"), str(tmp_path / "mnt"), *options]
    return build_parser().parse_args([*argv, "--cache-dir", str(tmp_path / "cache")])


def test_the_write_options_reach_the_engine_as_given(tmp_path: Path) -> None:
    config = mount_options(parse(tmp_path)).config
    assert (config.read_only, config.write_back_delay, config.max_dirty) == (False, 5.0, None)
    args = parse(tmp_path, "--read-only", "--write-back-delay", "0", "--max-dirty", "256M")
    opts = mount_options(args)
    assert opts.config.read_only is True
    assert opts.config.write_back_delay == 0.0
    assert opts.config.max_dirty == 256 << 20
    assert MountOptions.from_json(opts.to_json()) == opts  # handed to the daemon unchanged


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--max-dirty", "lots", "--max-dirty"),
        ("--max-dirty", "-1", "--max-dirty"),
        ("--max-dirty", "512K", "at least 1M"),
        ("--max-dirty", "2000P", "largest size"),
        ("--write-back-delay", "-1", "from 0 to 86400"),
        ("--write-back-delay", "nan", "from 0 to 86400"),
        ("--write-back-delay", "1e9", "from 0 to 86400"),
    ],
)
def test_a_bad_write_option_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, words: str
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(tmp_path, option, value)
    err = capsys.readouterr().err
    assert info.value.code == 2
    (line,) = err.splitlines()
    assert line.startswith("cachefs mount: error:") and option in line and words in line, line


def test_max_dirty_above_the_cache_size_is_refused_before_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="--max-dirty 2.0 GiB is more than --cache-size"):
        mount_options(parse(tmp_path, "--cache-size", "1G", "--max-dirty", "2G"))
    (tmp_path / "mnt").mkdir()
    argv = ["mount", str(tmp_path / "src"), str(tmp_path / "mnt"), "--foreground"]
    argv += ["--cache-dir", str(tmp_path / "cache"), "--cache-size", "1G", "--max-dirty", "2G"]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("cachefs: error: --max-dirty"), line
    assert not (tmp_path / "cache").exists()


def test_flush_and_keep_dirty_are_commands_with_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["unmount", "m", "--keep-dirty"]).keep_dirty is True
    assert parser.parse_args(["unmount", "m"]).keep_dirty is False
    assert parser.parse_args(["flush", "a", "b"]).paths == ["a", "b"]
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["flush", "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: cachefs flush")
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "send changed files to the source now" in capsys.readouterr().out


# -- the control messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_", [Flush(("a", "d/b")), Flush(("",)), Unmount(), Unmount(keep_dirty=True)]
)
def test_a_write_request_reaches_the_mount_as_sent(request_: Flush | Unmount) -> None:
    line = encode({"command": request_.command, **request_.arguments()})
    assert decode_request(decode_line(line[:-1])) == request_


def test_a_plain_unmount_is_the_line_it_always_was() -> None:
    assert Unmount().arguments() == {}
    with pytest.raises(ValueError, match="keep_dirty"):
        decode_line(b'{"command": "unmount", "keep_dirty": "yes"}')


def test_the_client_takes_flush_and_unmount_replies_of_their_shape() -> None:
    good: FlushReply = {
        "flushed": 1,
        "bytes": 5,
        "failed": [{"file": "b", "error": "b: refused"}],
        "conflicts": [{"file": "c", "copy": "c.conflict-20250101T000000Z"}],
    }
    assert Flush(("a",)).reply(good) == good
    for bad in ({**good, "failed": [{"file": "b"}]}, {"flushed": 1}, {**good, "bytes": "5"}):
        with pytest.raises(ValueError):
            Flush(("a",)).reply(bad)
    assert Unmount().reply({"pid": 7, "flush": good, "kept": 1})["kept"] == 1
    with pytest.raises(ValueError):
        Unmount().reply({"pid": 7, "flush": {"flushed": 1}})


# -- the mount's side, over a memory source ------------------------------------------------


class Progresses:
    """Stands for the control server's Progress: keeps the lines sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, fields: dict[str, Any]) -> None:
        self.sent.append(fields)


class Mount:
    """A cache over a memory source and the ControlCommands of its mount."""

    def __init__(self, cache: FileCache, memory: MemoryBackend) -> None:
        self.cache = cache
        self.memory = memory
        self.stops: list[str] = []
        self.progress = Progresses()
        self.commands = ControlCommands(
            cache,
            Namespace(cache),
            source="memory://",
            mountpoint=Path("/mnt"),
            stop=lambda: self.stops.append("stop"),
            invalidate=lambda file_id: None,
            keep_dirty=lambda: self.stops.append("keep dirty"),
        )

    async def ask(self, request: dict[str, Any]) -> Any:
        return await self.commands(request, cast(Progress, self.progress))

    async def write(self, file_id: str, data: bytes) -> None:
        fh = await self.cache.create(file_id, 0o644, exclusive=False)
        try:
            await self.cache.write(fh, 0, data)
        finally:
            await self.cache.close(fh)

    def source(self, file_id: str) -> bytes | None:
        f = self.memory._files.get(file_id)
        return None if f is None else bytes(f.data)


@asynccontextmanager
async def mounted(
    tmp_path: Path, memory: MemoryBackend | None = None, **config: Any
) -> AsyncIterator[Mount]:
    memory = memory or MemoryBackend({"d/old": b"old", "top": b"top"})
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(exist_ok=True)
    settings = CacheConfig(block_size=KB64, retry_delay=0, write_back_delay=NEVER, **config)
    async with open_file_cache(memory, cache_dir, settings) as cache:
        yield Mount(cache, memory)


async def test_flush_sends_the_changes_below_a_path_and_no_others(tmp_path: Path) -> None:
    async with mounted(tmp_path) as m:
        await m.write("d/new", b"new bytes")
        await m.write("d/old", b"changed")
        await m.write("top", b"top changed")
        stats = await m.ask({"command": "stats"})
        assert (stats["dirty_files"], stats["flushed_files"]) == (3, 0)
        assert stats["dirty_bytes"] > 0 and stats["read_only"] is False

        reply = await m.ask({"command": "flush", "file_ids": ["d"]})
        assert reply == {"flushed": 2, "bytes": 16, "failed": [], "conflicts": []}
        assert m.source("d/new") == b"new bytes" and m.source("d/old") == b"changed"
        assert m.source("top") == b"top"  # not below d: still waiting
        last = m.progress.sent[-1]
        assert (last["files_done"], last["files"], last["done"], last["total"]) == (2, 2, 16, 16)

        stats = await m.ask({"command": "stats"})
        assert (stats["dirty_files"], stats["flushed_files"]) == (1, 2)
        assert stats["flushed_bytes"] == 16 and stats["write_data_calls"] >= 2

        nothing = await m.ask({"command": "flush", "file_ids": ["d"]})
        assert nothing == {"flushed": 0, "bytes": 0, "failed": [], "conflicts": []}
        everything = await m.ask({"command": "flush", "file_ids": [""]})
        assert everything["flushed"] == 1 and m.source("top") == b"top changed"


async def test_unmount_flushes_every_change_then_stops(tmp_path: Path) -> None:
    async with mounted(tmp_path) as m:
        await m.write("d/new", b"new")
        reply = await m.ask({"command": "unmount"})
        assert reply["flush"]["flushed"] == 1 and reply["kept"] == 0
        assert m.source("d/new") == b"new"
        assert m.stops == ["stop"]


async def test_unmount_keeping_the_changes_sends_nothing(tmp_path: Path) -> None:
    async with mounted(tmp_path) as m:
        await m.write("d/new", b"new")
        reply = await m.ask({"command": "unmount", "keep_dirty": True})
        assert "flush" not in reply and reply["kept"] == 1
        assert m.source("d/new") is None
        assert m.stops == ["keep dirty", "stop"]


async def test_unmount_happens_even_when_its_flush_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with mounted(tmp_path) as m:
        await m.write("d/new", b"new")

        async def broken(*args: Any) -> None:
            raise OSError(errno.EIO, "the cache disk is on fire")

        monkeypatch.setattr(m.cache, "flush_files", broken)
        reply = await m.ask({"command": "unmount"})
        assert m.stops == ["stop"]
        assert "on fire" in reply["flush"]["failed"][0]["error"] and reply["kept"] == 1


class Refusing(MemoryBackend):
    """A source that refuses every write of one file (FILE_FAILURE)."""

    async def write_data(self, req: WriteData) -> None:
        if req.file_id == "d/refused":
            await trio.lowlevel.checkpoint()
            req.result_code = RWResult.FILE_FAILURE
            return
        await super().write_data(req)


async def test_a_file_the_source_refuses_is_named_latched_and_reset(tmp_path: Path) -> None:
    memory = Refusing({"d/old": b"old"})
    async with mounted(tmp_path, memory) as m:
        await m.write("d/refused", b"no")
        await m.write("d/new", b"yes")
        reply = await m.ask({"command": "flush", "file_ids": ["d"]})
        assert reply["flushed"] == 1 and m.source("d/new") == b"yes"
        assert [f["file"] for f in reply["failed"]] == ["d/refused"]
        assert "d/refused" in reply["failed"][0]["error"]
        stats = await m.ask({"command": "stats"})
        assert stats["latched_writes"] == ["d/refused"] and stats["files_in_error"] == 1
        assert stats["write_failures"] == 1 and stats["dirty_files"] == 1
        assert "  not flushed" in format_stats(stats)

        unmounted = await m.ask({"command": "unmount"})
        assert [f["file"] for f in unmounted["flush"]["failed"]] == ["d/refused"]
        assert unmounted["kept"] == 1  # stays in the cache dir

        assert await m.ask({"command": "reset-file-errors", "file_ids": ["d"]}) == ["d/refused"]
        stats = await m.ask({"command": "stats"})
        assert stats["latched_writes"] == [] and stats["files_in_error"] == 0


async def test_a_conflict_keeps_both_versions_and_is_named(tmp_path: Path) -> None:
    async with mounted(tmp_path) as m:
        await m.write("d/old", b"mine")
        m.memory.put("d/old", b"theirs")  # the source changed under the change
        reply = await m.ask({"command": "flush", "file_ids": ["d/old"]})
        assert reply["flushed"] == 0 and reply["failed"] == []
        ((file, copy),) = [(c["file"], c["copy"]) for c in reply["conflicts"]]
        assert file == "d/old" and copy.startswith("d/old.conflict-")
        assert m.source("d/old") == b"theirs" and m.source(copy) == b"mine"
        assert (await m.ask({"command": "stats"}))["write_conflicts"] == 1


async def test_a_read_only_mount_flushes_nothing(tmp_path: Path) -> None:
    async with mounted(tmp_path, read_only=True) as m:
        stats = await m.ask({"command": "stats"})
        assert stats["read_only"] is True and "--read-only" in stats["read_only_reason"]
        assert format_stats(stats).count("yes: the mount is read-only") == 1
        with pytest.raises(ReadOnly, match="nothing can be flushed"):
            await m.ask({"command": "flush", "file_ids": [""]})
        reply = await m.ask({"command": "unmount"})
        assert "flush" not in reply and reply["kept"] == 0
        assert m.stops == ["keep dirty", "stop"]  # changes wait for a mount that can write


# -- the daemon on its way out --------------------------------------------------------------


async def test_the_daemon_flushes_on_its_way_out(tmp_path: Path) -> None:
    async with mounted(tmp_path) as m:
        await m.write("d/new", b"new")
        await flush_on_exit(m.cache, 60)
        assert m.source("d/new") == b"new"
        assert m.cache.write_statistics().dirty_files == 0


class Hanging(MemoryBackend):
    async def write_data(self, req: WriteData) -> None:
        await trio.sleep_forever()


async def test_a_flush_on_the_way_out_gives_up_at_its_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with mounted(tmp_path, Hanging({"d/old": b"old"})) as m:
        await m.write("d/new", b"new")
        with caplog.at_level(logging.WARNING, "cachefs.daemon.flushes"):
            await flush_on_exit(m.cache, 0.2)
        assert m.cache.write_statistics().dirty_files == 1
        (record,) = [r for r in caplog.records if r.name == "cachefs.daemon.flushes"]
        assert "1 changed file not flushed within 0.2 s" in record.getMessage()
        assert str(tmp_path / "cache" / "dirty") in record.getMessage()


# -- what the commands print -----------------------------------------------------------------


def test_flush_report_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    clean: FlushReply = {"flushed": 2, "bytes": 3 << 20, "failed": [], "conflicts": []}
    assert report_flush(Path("/mnt"), clean, 1.25) == 0
    out, err = capsys.readouterr()
    assert out == "flushed 2 files (3.0 MiB) in 1.2 s\n" and err == ""

    bad: FlushReply = {
        "flushed": 1,
        "bytes": 10,
        "failed": [{"file": "a", "error": "a: the storage is offline: gone"}],
        "conflicts": [{"file": "b", "copy": "b.conflict-X"}],
    }
    assert report_flush(Path("/mnt"), bad, 0.1) == 1
    out, err = capsys.readouterr()
    assert out == "flushed 1 file (10 B) in 0.1 s; 1 not flushed; 1 conflict\n"
    assert err.splitlines() == [
        "cachefs: error: a: the storage is offline: gone",
        "cachefs: warning: /mnt/b changed in the source meanwhile: the changes made here are "
        "in /mnt/b.conflict-X",
    ]


def test_unmount_says_what_stays_in_the_cache_dir(capsys: pytest.CaptureFixture[str]) -> None:
    entry = MountEntry(Path("/mnt"), 0, 1, Path("/cache"))
    empty: FlushReply = {"flushed": 0, "bytes": 0, "failed": [], "conflicts": []}
    nothing: UnmountReply = {"pid": 1, "flush": empty}
    assert _report_unmount(entry, nothing, False, 0.0) == 0
    assert capsys.readouterr() == ("", "")  # an unmount with nothing changed says nothing

    kept: UnmountReply = {"pid": 1, "kept": 2}
    assert _report_unmount(entry, kept, True, 0.0) == 0
    out, err = capsys.readouterr()
    assert out == "2 changed files left in /cache: the next mount of it sends them to the source\n"

    refused: FlushReply = {**empty, "failed": [{"file": "a", "error": "a: no"}]}
    failed: UnmountReply = {"pid": 1, "flush": refused, "kept": 1}
    assert _report_unmount(entry, failed, False, 0.5) == 1
    out, err = capsys.readouterr()
    assert out.startswith("flushed 0 files (0 B) in 0.5 s; 1 not flushed")
    assert err.splitlines()[0] == "cachefs: error: a: no"
    assert "1 changed file not sent to the source stays in /cache" in err.splitlines()[1]


def test_the_stats_table_shows_the_write_rows() -> None:
    table = format_stats(
        {
            "source": "/srv",
            "files_in_error": 1,
            "file_errors": [],
            "latched_writes": ["d/refused"],
            "read_only": False,
            "read_only_reason": None,
            "write_back_delay": 5.0,
            "max_dirty": 512 << 20,
            "dirty_files": 2,
            "dirty_bytes": 3 << 20,
            "flushing_files": 1,
            "flushed_files": 4,
            "flushed_bytes": 1 << 20,
            "write_data_calls": 9,
            "write_failures": 1,
            "write_conflicts": 0,
        }
    )
    rows = [line.split("  ", 1) for line in table.splitlines() if not line.startswith(" ")]
    shown = {label.strip(): value.strip() for label, value in rows}
    assert shown["read-only"] == "no" and shown["write-back delay"] == "5 s"
    assert shown["max dirty"] == "512.0 MiB" and shown["dirty files"] == "2"
    assert shown["dirty"] == "3.0 MiB" and shown["flushed"] == "1.0 MiB"
    assert shown["WriteData calls"] == "9" and shown["write failures"] == "1"
    assert any(line.split() == ["not", "flushed", "d/refused"] for line in table.splitlines())
