"""The log of a mount, as an operator reads it: where it is, one line per
event, capped and rotated, at the level asked for, and the state dump a
SIGUSR1 writes into it (cachefs.daemon.logs, cachefs.daemon.dump).

What is tested is the log's text and files, not the FUSE requests that
make it: over the native transport only.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import NATIVE_ONLY, REPO, assert_one_line_error, lazy_unmount, run_cachefs, wait_for

from cachefs.daemon.logs import ROTATE_ENV

if TYPE_CHECKING:
    from conftest import MountFactory

#: How every line of a log starts (an event), but a traceback's at debug level.
EVENT = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
# Opens a file and reads it with O_DIRECT: the read is this process's own request.
READ_DIRECT = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 16)
print("reading", flush=True)
os.preadv(fd, [buf], 0)
"""


def mount_daemon(
    src: Path, mnt: Path, cache: Path, *options: object, **env: str
) -> subprocess.CompletedProcess[str]:
    """``cachefs mount`` as users run it (a daemon), with *env* added; no core
    file if it crashes."""
    return subprocess.run(
        [sys.executable, "-m", "cachefs", "mount", src, mnt, "--cache-dir", cache, *options],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
    )


def daemon_pid(cache: Path) -> int:
    return int((cache / "lock").read_text())


def dump(pid: int, log: Path | list[Path]) -> str:
    """Send SIGUSR1 to *pid*; the text of the dump it logs (in *log*, or
    in any of the files of a rotated log)."""
    logs = log if isinstance(log, list) else [log]

    def text() -> str:
        return "".join(p.read_text(errors="replace") for p in logs if p.exists())

    before = text().count("state: dump ends")
    os.kill(pid, signal.SIGUSR1)
    wait_for("the state dump", lambda: text().count("state: dump ends") > before)
    return text().rpartition("state: dump begins")[2]


@pytest.fixture
def files(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    (root / "hello.txt").write_text("hello\n")
    (root / "slow.bin").write_bytes(os.urandom(256 << 10))
    return root


def test_a_daemon_logs_one_line_per_event_to_its_cache_dir(mnt: Path, tmp_path: Path) -> None:
    src = tmp_path / "src\nINFO forged"  # logged as the mount starts
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    cache = tmp_path / "cache"
    done = mount_daemon(src, mnt, cache)
    assert done.returncode == 0, done.stderr
    assert (mnt / "hello.txt").read_text() == "hello\n"
    assert run_cachefs("unmount", mnt).returncode == 0
    log = cache / "cachefs.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    lines = log.read_bytes().decode().split("\n")
    assert lines.pop() == ""
    assert [line for line in lines if not EVENT.match(line)] == []
    assert any(" INFO cachefs.daemon.session: mounted " in line for line in lines)
    assert any("src\\nINFO forged" in line for line in lines), lines


def test_log_level_debug_shows_debug_lines_in_the_daemon_log(
    src: Path, mnt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    done = mount_daemon(src, mnt, cache, "--log-level", "debug")
    assert done.returncode == 0, done.stderr
    assert (mnt / "hello.txt").read_text() == "hello\n"
    assert run_cachefs("unmount", mnt).returncode == 0
    assert " DEBUG " in (cache / "cachefs.log").read_text()


@NATIVE_ONLY
def test_log_level_warning_hides_info_but_not_a_state_dump(mount: MountFactory, src: Path) -> None:
    m = mount(src, "--log-level", "warning")  # after the factory's debug: it wins
    assert (m / "hello.txt").read_text() == "hello\n"
    assert "state: counters " in dump(m.proc.pid, m.log)
    m.unmount()
    assert " INFO " not in m.log_text() and " DEBUG " not in m.log_text()


def test_a_rotated_log_stays_under_its_cap_and_stray_writes_follow_it(
    src: Path, mnt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cap = 4000
    done = mount_daemon(src, mnt, cache, "--log-level", "debug", **{ROTATE_ENV: f"{cap},2"})
    assert done.returncode == 0, done.stderr
    log = cache / "cachefs.log"
    logs = [log, cache / "cachefs.log.1", cache / "cachefs.log.2"]
    pid = daemon_pid(cache)
    for _ in range(30):
        dump(pid, logs)
        if logs[2].exists():
            break
    dump(pid, logs)  # once more: the oldest is dropped, not kept as a .3
    assert logs[2].exists() and not (cache / "cachefs.log.3").exists()
    for path in logs:
        assert 0 < path.stat().st_size <= cap, path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # A crash writes its traceback (faulthandler) to fd 2: the current file.
    os.kill(pid, signal.SIGABRT)
    wait_for("the daemon to die", lambda: not Path(f"/proc/{pid}").exists())
    lazy_unmount(mnt)
    assert "Fatal Python error: Aborted" in log.read_text()
    assert all("Fatal Python error" not in p.read_text() for p in logs[1:])


def test_a_bad_rotation_setting_is_a_one_line_error(src: Path, mnt: Path, tmp_path: Path) -> None:
    done = mount_daemon(src, mnt, tmp_path / "cache", **{ROTATE_ENV: "10M,3"})
    assert_one_line_error(done, ROTATE_ENV, "BYTES,FILES")


@NATIVE_ONLY
def test_sigusr1_dumps_open_handles_and_a_hanging_fetch_and_the_mount_serves_on(
    mount: MountFactory, files: Path, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "slow.bin", "hang": True}]))
    m = mount(files, "--faults", rules)
    reader = subprocess.Popen(
        [sys.executable, "-c", READ_DIRECT, str(m / "slow.bin")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline() == "reading\n"
        with open(m / "hello.txt") as held:
            text = ""
            for _ in range(20):  # the read reaches the backend soon after "reading"
                text = dump(m.proc.pid, m.log)
                if "state: in flight 'slow.bin': blocks 0-" in text:
                    break
            assert "state: in flight 'slow.bin': blocks 0-" in text, text
            assert re.search(r"state: inode \d+ 'hello.txt': handles=1\n", text), text
            assert "state: open 'hello.txt': handles=1 versions=1 writing=0" in text, text
            assert re.search(r"state: task +\S*watch_signals \(writing this dump\)", text), text
            assert re.search(r"state: task .*, on trio\.", text), text
            assert re.search(r"state: counters .*read_data_calls=\d+", text), text
            assert held.read() == "hello\n"
    finally:
        reader.kill()
        reader.wait(timeout=30)
    assert (m / "hello.txt").read_text() == "hello\n"  # still serving
    m.unmount()


@NATIVE_ONLY
def test_the_dump_of_an_encrypted_mount_names_no_file(mount: MountFactory, tmp_path: Path) -> None:
    root = tmp_path / "src"
    root.mkdir()
    (root / "patient-alice.txt").write_text("alice\n")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    m = mount(root, "--encrypt", "--key-file", key)
    with open(m / "patient-alice.txt") as held:
        assert held.read() == "alice\n"
        text = dump(m.proc.pid, m.log)
    assert re.search(r"state: open \[sealed:\w+\]: handles=1", text), text
    assert "alice" not in text
    m.unmount()


@NATIVE_ONLY
def test_sigusr1_while_flushing_on_the_way_out_does_not_end_the_daemon(
    mount: MountFactory, files: Path, tmp_path: Path
) -> None:
    """Once unmounted the daemon still flushes (up to 60 s), when a stop looks
    stuck and a dump is asked for: SIGUSR1 must not kill it there."""
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "new.txt", "op": "write", "hang": True}]))
    m = mount(files, "--faults", rules, "--write-back-delay", "3600")
    (m / "new.txt").write_text("kept\n")
    m.proc.send_signal(signal.SIGTERM)  # unmounts, then flushes: the write hangs
    wait_for("the unmount", lambda: "unmounted " in m.log_text())
    m.proc.send_signal(signal.SIGUSR1)
    m.proc.send_signal(signal.SIGTERM)  # stops the flush
    assert m.proc.wait(timeout=30) == 0, m.log_text()
    assert "changed file not flushed: stopped by SIGTERM" in m.log_text()
    assert not (files / "new.txt").exists()
