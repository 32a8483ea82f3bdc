"""A --faults rules file that is no rules file: a FIFO, a huge file, bad JSON.

At mount time the mount is refused (one line, exit 2) and no daemon stays
behind; while mounted, a bad replacement is logged once and the previous
rules stay in force, and the mount keeps serving and unmounts.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import EXIT_DEADLINE, NATIVE_ONLY, assert_one_line_error, wait_for

from backends.faulty import MAX_RULES, MAX_RULES_BYTES, FaultyBackend
from backends.memory import MemoryBackend
from cachefs.control.mounts import mount_at
from cachefs.errors import RulesError

if TYPE_CHECKING:
    from conftest import MountFactory

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
#: A refused mount answers at once; the daemon's own readiness deadline is 60 s.
MOUNT_DEADLINE = 30.0
KEPT = "keeping the last good rules"


def oversized(path: Path) -> Path:
    """Valid rules (none), padded past the size limit: refused for its size alone."""
    path.write_text("[]" + " " * MAX_RULES_BYTES)
    return path


def replace_with(rules: Path, kind: str) -> None:
    """Put a bad rules file of *kind* in place of *rules*, the way a user
    replaces it (make it aside, rename it over)."""
    tmp = rules.with_name("rules.new")
    if kind == "fifo":
        os.mkfifo(tmp)
    elif kind == "oversized":
        oversized(tmp)
    else:
        tmp.write_text("[{nope")
    os.replace(tmp, rules)


def processes_naming(path: Path) -> list[int]:
    """Pids of the processes with *path* in their command line."""
    needle = os.fsencode(os.path.realpath(path))
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if needle in argv:
            found.append(int(entry.name))
    return found


@pytest.fixture
def leftovers(mnt: Path) -> Iterator[Path]:
    """*mnt*; at the end, kills any daemon still naming it (the test has failed then)."""
    try:
        yield mnt
    finally:
        for pid in processes_naming(mnt):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def mount_refused(cachefs: Cachefs, tmp_path: Path, mnt: Path, rules: Path) -> None:
    """``cachefs mount --faults RULES`` fails at once with one line naming the file,
    and leaves no daemon and no mount behind."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a")
    try:
        done = cachefs(
            "mount",
            src,
            mnt,
            "--cache-dir",
            tmp_path / "cache",
            "--faults",
            rules,
            timeout=MOUNT_DEADLINE,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cachefs mount --faults {rules} did not return within {MOUNT_DEADLINE} s")
    assert_one_line_error(done, str(rules))
    assert mount_at(mnt) is None
    wait_for("the refused daemon exits", lambda: processes_naming(mnt) == [], EXIT_DEADLINE)


@needs_fuse
def test_a_fifo_as_rules_file_is_refused_at_mount(
    cachefs: Cachefs, tmp_path: Path, leftovers: Path
) -> None:
    fifo = tmp_path / "rules.fifo"
    os.mkfifo(fifo)
    mount_refused(cachefs, tmp_path, leftovers, fifo)


@needs_fuse
def test_an_oversized_rules_file_is_refused_at_mount(
    cachefs: Cachefs, tmp_path: Path, leftovers: Path
) -> None:
    mount_refused(cachefs, tmp_path, leftovers, oversized(tmp_path / "rules.json"))


def cat(path: Path) -> tuple[int, bytes]:
    """Read a file in another process: its exit status and what it read.

    A frozen mount fails the test at the deadline, without waiting for the
    reader: one whose request the daemon took cannot die before the daemon
    answers or dies (the mount fixture ends it).
    """
    proc = subprocess.Popen(["cat", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out, _ = proc.communicate(timeout=MOUNT_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"reading {path} did not finish within {MOUNT_DEADLINE} s: the mount froze")
    return proc.returncode, out


@pytest.mark.parametrize("kind", ["fifo", "oversized", "bad JSON"])
@NATIVE_ONLY
def test_a_bad_rules_file_renamed_over_keeps_the_previous_rules(
    mount: MountFactory, tmp_path: Path, kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in "abcd":
        (src / name).write_text(name * 1000)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "b", "result": "FAILURE"}]))
    m = mount(src, "--faults", rules, "--retries", "0")
    assert cat(m / "a") == (0, b"a" * 1000)
    assert cat(m / "b")[0] != 0

    replace_with(rules, kind)
    # Reads that reach the backend (files not cached yet, and the failing one).
    assert cat(m / "c") == (0, b"c" * 1000)
    assert cat(m / "b")[0] != 0, "the previous rules are no longer in force"
    assert cat(m / "d") == (0, b"d" * 1000)
    assert cat(m / "b")[0] != 0, "the previous rules are no longer in force"
    kept = [line for line in m.log_text().splitlines() if KEPT in line]
    assert len(kept) == 1, kept  # once per change, not per read
    assert str(rules) in kept[0]
    m.unmount()


# -- the limits, without a mount -----------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[]" + " " * MAX_RULES_BYTES, f"more than {MAX_RULES_BYTES}"),
        (json.dumps([{"file": "*", "result": "FAILURE"}] * (MAX_RULES + 1)), "rules, more than"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_rules_beyond_the_limits_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(content)
    with pytest.raises(RulesError) as info:
        FaultyBackend(MemoryBackend(), path)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"faults file {path}: ")
    assert message in text
