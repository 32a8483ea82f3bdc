"""Writes from the command line, through real mounts: the options that
govern them, ``cachefs unmount`` (flushing, or --keep-dirty for the next
mount), ``cachefs flush``, the write rows of ``cachefs stats``, and the
daemon flushing on its way out when stopped any other clean way.

Every mount here sends changes --write-back-delay 3600 s after their last
close unless a test says otherwise: whatever reaches the source does so
because of the command under test.  The command line does not depend on
the FUSE transport: these tests run over the native one.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import EXIT_DEADLINE, assert_one_line_error, run_on_a_terminal, wait_for

from cachefs.control.mounts import mount_at

if TYPE_CHECKING:
    from conftest import MountFactory

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
native = pytest.mark.parametrize("mount", ["native"], indirect=True)
LATER = ("--write-back-delay", "3600")
KEY = "ab" * 32


def has(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except FileNotFoundError:
        return False


@needs_fuse
@native
def test_unmount_flushes_the_changes_before_it_returns(
    mount: MountFactory, src: Path, cachefs: Cachefs
) -> None:
    m = mount(src, *LATER)
    (m / "new.txt").write_bytes(b"new\n")
    (m / "hello.txt").write_bytes(b"changed\n")
    assert not (src / "new.txt").exists()  # not yet: the delay is an hour
    done = cachefs("unmount", m.mountpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("flushed 2 files (12 B) in "), done.stdout
    assert done.stderr == ""
    assert (src / "new.txt").read_bytes() == b"new\n"
    assert (src / "hello.txt").read_bytes() == b"changed\n"
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    assert mount_at(m.mountpoint) is None


@needs_fuse
@native
def test_unmount_shows_its_flush_on_a_terminal(mount: MountFactory, src: Path) -> None:
    m = mount(src, *LATER)
    for i in range(4):
        (m / f"f{i}").write_bytes(bytes([i]) * 100_000)
    proc, text = run_on_a_terminal("unmount", m.mountpoint)
    assert proc.returncode == 0
    assert proc.stdout.startswith("flushed 4 files (390.6 KiB) in "), proc.stdout
    segments = text.split("\r")
    assert any(s.startswith("flushing ") and s.rstrip().endswith("files") for s in segments)
    assert segments[-1] == "" and segments[-2].strip() == ""  # the bar is erased at the end
    assert all((src / f"f{i}").read_bytes() == bytes([i]) * 100_000 for i in range(4))


@needs_fuse
@native
def test_keep_dirty_leaves_the_changes_to_the_next_mount(
    mount: MountFactory, src: Path, cachefs: Cachefs
) -> None:
    m = mount(src, *LATER)
    (m / "new.txt").write_bytes(b"kept\n")
    done = cachefs("unmount", m.mountpoint, "--keep-dirty")
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"1 changed file left in {m.cache_dir}: the next mount of it sends them to the source\n"
    )
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    assert mount_at(m.mountpoint) is None
    assert not (src / "new.txt").exists()  # not even on the daemon's way out

    again = mount(src, *LATER, cache_dir=m.cache_dir)
    assert (again / "new.txt").read_bytes() == b"kept\n"
    wait_for("the next mount sends it", lambda: has(src / "new.txt", b"kept\n"))
    assert again.stats()["dirty_files"] == 0


@needs_fuse
@native
def test_flush_sends_the_changes_below_a_path_now(
    mount: MountFactory, src: Path, cachefs: Cachefs
) -> None:
    m = mount(src, *LATER)
    (m / "d").mkdir()
    (m / "d" / "a").write_bytes(b"a" * 1000)
    (m / "d" / "b").write_bytes(b"b" * 3000)
    (m / "top").write_bytes(b"top")
    before = m.stats()
    assert (before["dirty_files"], before["flushed_files"], before["flushed_bytes"]) == (3, 0, 0)
    assert before["dirty_bytes"] >= 4003 and before["write_back_delay"] == 3600
    table = cachefs("stats", m.mountpoint).stdout
    assert any(line.split() == ["dirty", "files", "3"] for line in table.splitlines()), table

    done = cachefs("flush", m / "d")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("flushed 2 files (3.9 KiB) in "), done.stdout
    assert len(done.stdout.splitlines()) == 1 and done.stderr == ""
    assert (src / "d" / "a").read_bytes() == b"a" * 1000
    assert (src / "d" / "b").read_bytes() == b"b" * 3000
    assert not (src / "top").exists()  # not below d

    after = m.stats()
    assert (after["dirty_files"], after["flushed_files"], after["flushed_bytes"]) == (1, 2, 4000)
    assert after["write_data_calls"] >= 2
    again = cachefs("flush", m / "d")
    assert again.returncode == 0, again.stderr
    assert again.stdout == f"nothing to flush: no changed files at or below {m / 'd'}\n"

    done = cachefs("flush", m.mountpoint)
    assert done.returncode == 0 and done.stdout.startswith("flushed 1 file (3 B)"), done
    assert (src / "top").read_bytes() == b"top"


@needs_fuse
@native
def test_a_file_the_source_refuses_is_named_kept_and_sent_after_reset(
    mount: MountFactory, src: Path, tmp_path: Path, cachefs: Cachefs
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text('[{"file": "refused.txt", "op": "write", "result": "FILE_FAILURE"}]')
    m = mount(src, *LATER, "--faults", rules)
    (m / "refused.txt").write_bytes(b"refused\n")
    (m / "fine.txt").write_bytes(b"fine\n")
    done = cachefs("unmount", m.mountpoint)
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("flushed 1 file (5 B) in ") and "1 not flushed" in done.stdout
    error, warning = done.stderr.splitlines()
    assert error.startswith("cachefs: error: refused.txt: "), error
    assert f"1 changed file not sent to the source stays in {m.cache_dir}" in warning, warning
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    assert mount_at(m.mountpoint) is None  # gone all the same
    assert (src / "fine.txt").read_bytes() == b"fine\n" and not (src / "refused.txt").exists()

    rules.write_text("[]")
    again = mount(src, *LATER, "--faults", rules, cache_dir=m.cache_dir)
    assert (again / "refused.txt").read_bytes() == b"refused\n"  # kept in the cache dir
    numbers = again.stats()
    assert numbers["latched_writes"] == ["refused.txt"] and numbers["files_in_error"] == 1
    table = cachefs("stats", again.mountpoint).stdout
    assert any(line.split() == ["not", "flushed", "refused.txt"] for line in table.splitlines())
    done = cachefs("reset-file-errors", again / "refused.txt")
    assert done.returncode == 0 and "refused.txt" in done.stdout, done
    wait_for("the reset file is sent", lambda: has(src / "refused.txt", b"refused\n"))
    assert again.stats()["files_in_error"] == 0


@needs_fuse
@native
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3 -u"])
def test_a_daemon_stopped_otherwise_flushes_on_its_way_out(
    mount: MountFactory, src: Path, how: str
) -> None:
    m = mount(src, *LATER)
    (m / "new.txt").write_bytes(b"new\n")
    if how.startswith("SIG"):
        m.proc.send_signal(signal.Signals[how])
    else:
        subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True, timeout=30)
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    assert (src / "new.txt").read_bytes() == b"new\n"
    assert "not flushed" not in m.log_text()


@needs_fuse
@native
def test_write_back_delay_0_sends_a_file_when_it_is_closed(mount: MountFactory, src: Path) -> None:
    m = mount(src, "--write-back-delay", "0")
    with open(m / "new.txt", "wb") as f:
        f.write(b"at close\n")
    assert (src / "new.txt").read_bytes() == b"at close\n"
    assert m.stats()["write_back_delay"] == 0


@needs_fuse
@native
def test_a_read_only_mount_refuses_every_change(
    mount: MountFactory, src: Path, cachefs: Cachefs
) -> None:
    m = mount(src, "--read-only")
    for change in (
        lambda: (m / "new.txt").write_bytes(b"x"),
        lambda: open(m / "hello.txt", "r+b").close(),
        lambda: (m / "d").mkdir(),
        lambda: (m / "hello.txt").unlink(),
    ):
        with pytest.raises(OSError) as info:
            change()
        assert info.value.errno == errno.EROFS, info.value
    assert (m / "hello.txt").read_bytes() == b"hello\n"
    numbers = m.stats()
    assert numbers["read_only"] is True and "--read-only" in numbers["read_only_reason"]
    done = cachefs("flush", m.mountpoint)
    assert done.returncode == 1, done
    (line,) = done.stderr.splitlines()
    assert line.startswith("cachefs: error: nothing can be flushed: the mount is read-only")
    assert "mounted read-only:" not in m.log_text()  # it was asked for


@needs_fuse
@native
def test_an_encrypted_cache_mounts_read_only_and_says_so_once(
    mount: MountFactory, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHEFS_KEY", KEY)
    m = mount(src, "--encrypt")
    with pytest.raises(OSError) as info:
        (m / "new.txt").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    said = [line for line in m.log_text().splitlines() if "mounted read-only:" in line]
    assert len(said) == 1 and " INFO " in said[0], said
    assert m.stats()["read_only"] is True


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--max-dirty", "lots", ["--max-dirty", "lots"]),
        ("--max-dirty", "100K", ["--max-dirty", "at least 1M"]),
        ("--write-back-delay", "soon", ["--write-back-delay", "soon"]),
    ],
)
def test_a_bad_write_option_is_a_one_line_error(
    cachefs: Cachefs, src: Path, mnt: Path, tmp_path: Path, option: str, value: str,
    words: list[str],
) -> None:  # fmt: skip
    done = cachefs("mount", src, mnt, "--cache-dir", tmp_path / "c", option, value)
    assert_one_line_error(done, *words)
    assert not (tmp_path / "c").exists()
