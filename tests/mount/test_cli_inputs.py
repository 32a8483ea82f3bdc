"""Bad input to the command line: one line on stderr naming the problem, exit 2.

Never a traceback, a hang, a daemon left behind or a mount.  Mount point
and source nested in each other, key files that are devices, FIFOs or
huge, numbers that are not finite or out of range, trace files planted as
symlinks or in missing directories, S3 endpoints with credentials or
malformed.  At the end every option of every command is fuzzed in this
process (the daemon is not started: the orders it would be handed are
read back instead).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import resource
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, MountFactory, assert_one_line_error, lazy_unmount
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachefs.cli.mount
from backends import local
from backends.trace import open_trace, read_trace
from cachefs.cli.main import build_parser, main
from cachefs.control.mounts import cachefs_mounts
from cachefs.daemon.checks import check_apart
from cachefs.daemon.spawn import Orders
from cachefs.engine.state.crypto import CacheKey
from cachefs.errors import ConfigError, SourceError

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
#: What the CLI of a refused mount may take; on bad input it answers at once.
DEADLINE = 30.0
#: Address space of a CLI run: reading /dev/zero whole fails instead of filling the machine.
MEMORY_LIMIT = 2 << 30
KEY = "correct horse battery staple"


def run(
    *args: object,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    timeout: float = DEADLINE,
) -> subprocess.CompletedProcess[str]:
    """``python -m cachefs ARGS`` with bounded memory; fails the test if it hangs."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        os.umask(0o022)

    try:
        return subprocess.run(
            [sys.executable, "-m", "cachefs", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            preexec_fn=limit,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"cachefs {' '.join(map(str, args))}: no answer within {timeout:g} s")


def daemons(tmp_path: Path) -> list[int]:
    """Live processes whose command line names *tmp_path* (our mounts' daemons)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path).encode() in cmdline and b"cachefs" in cmdline:
            found.append(int(entry.name))
    return found


def mounts_below(tmp_path: Path) -> list[Path]:
    return [m.mountpoint for m in cachefs_mounts() if tmp_path in m.mountpoint.parents]


@pytest.fixture(autouse=True)
def nothing_left(tmp_path: Path) -> Iterator[None]:
    """Whatever a test did (or the code before the fix did): no mount, no daemon after it."""
    try:
        yield
    finally:
        for mountpoint in mounts_below(tmp_path):
            run("unmount", mountpoint, "--timeout", 10)
            lazy_unmount(mountpoint)
        for pid in daemons(tmp_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mountpoint in mounts_below(tmp_path):  # of a daemon killed just now
            lazy_unmount(mountpoint)


def refused(done: subprocess.CompletedProcess[str], tmp_path: Path, *words: str) -> None:
    """Exit 2, one line naming *words*, no traceback; nothing mounted, no daemon alive."""
    assert "Traceback" not in done.stderr, done.stderr
    assert_one_line_error(done, *words)
    assert mounts_below(tmp_path) == []
    assert daemons(tmp_path) == []


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line the parser prints for *argv*, which it must refuse with exit 2."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(list(argv))
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# -- 2: a mount that would read itself ------------------------------------------------------


@needs_fuse
def test_mount_point_inside_the_source(tmp_path: Path, src: Path) -> None:
    (src / "mnt").mkdir()
    done = run("mount", src, src / "mnt", "--cache-dir", tmp_path / "c")
    refused(done, tmp_path, f"mount point {src / 'mnt'} is inside the source {src}")


@needs_fuse
@pytest.mark.parametrize("foreground", [False, True])
def test_mount_point_is_the_source(tmp_path: Path, foreground: bool) -> None:
    empty = tmp_path / "d"
    empty.mkdir()
    args = ["--foreground"] if foreground else []
    done = run("mount", empty, empty, "--cache-dir", tmp_path / "c", *args)
    refused(done, tmp_path, f"mount point {empty} is the source itself")


@needs_fuse
def test_mount_point_is_a_symlink_to_the_source(tmp_path: Path) -> None:
    empty = tmp_path / "d"
    empty.mkdir()
    (tmp_path / "link").symlink_to(empty)
    done = run("mount", empty, tmp_path / "link", "--cache-dir", tmp_path / "c")
    refused(done, tmp_path, "is the source itself")


@needs_fuse
def test_file_url_source_holding_the_mount_point(tmp_path: Path, src: Path) -> None:
    (src / "mnt").mkdir()
    done = run("mount", f"file://{src}", src / "mnt", "--cache-dir", tmp_path / "c")
    refused(done, tmp_path, "inside the source")


@needs_fuse
def test_cache_dir_is_the_mount_point(tmp_path: Path, src: Path, mnt: Path) -> None:
    done = run("mount", src, mnt, "--cache-dir", mnt, "--foreground")
    refused(done, tmp_path, f"cache dir {mnt} is inside the mount point {mnt}")


@needs_fuse
@pytest.mark.parametrize("foreground", [False, True])
def test_cache_dir_inside_the_mount_point_is_not_made(
    tmp_path: Path, src: Path, mnt: Path, foreground: bool
) -> None:
    args = ["--foreground"] if foreground else []
    done = run("mount", src, mnt, "--cache-dir", mnt / "c", *args)
    refused(done, tmp_path, f"cache dir {mnt / 'c'} is inside the mount point {mnt}")
    assert list(mnt.iterdir()) == []  # nothing made: the mount point is still empty
    _mount_read_unmount(tmp_path, src, mnt)


def test_source_inside_the_mount_point_is_refused(tmp_path: Path) -> None:
    # Through the command line the mount point is "not empty" first; the
    # check itself also stands alone (a foreground mount runs only it).
    (tmp_path / "mnt" / "src").mkdir(parents=True)
    with pytest.raises(ConfigError, match="inside the mount point"):
        check_apart(str(tmp_path / "mnt" / "src"), tmp_path / "mnt")
    check_apart("s3://bucket", tmp_path / "mnt")  # no local path: not refused


@pytest.mark.parametrize(
    "url", ["FILE://{src}", "File://{src}", "file://LOCALHOST{src}", "fIlE://localhost{src}"]
)
def test_file_url_scheme_in_any_case(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    # The backend and the check that a mount stays out of its source read a
    # URL alike: not as the relative path "FILE:/...", planted here in the cwd.
    source = url.format(src=src)
    cwd = tmp_path / "cwd"
    (cwd / source).mkdir(parents=True)  # "FILE:/tmp/...": the URL read as a relative path
    (src / "mnt").mkdir()
    monkeypatch.chdir(cwd)
    backend = local.open_backend(source)
    assert backend.root == str(src)
    with pytest.raises(ConfigError, match="inside the source"):
        check_apart(source, src / "mnt")


@needs_fuse
@pytest.mark.parametrize("scheme", ["FILE", "File"])
def test_mount_a_file_url_in_capitals(tmp_path: Path, src: Path, mnt: Path, scheme: str) -> None:
    cwd = tmp_path / "cwd"
    planted = cwd / f"{scheme}:{src}"  # what "FILE:///..." named before: not served
    planted.mkdir(parents=True)
    (planted / "hello.txt").write_text("planted\n")
    done = run("mount", f"{scheme}://{src}", mnt, "--cache-dir", tmp_path / "c", cwd=cwd)
    assert done.returncode == 0, done.stderr
    try:
        assert (mnt / "hello.txt").read_text() == "hello\n"
    finally:
        assert run("unmount", mnt).returncode == 0


@pytest.mark.parametrize("command", ["mount", "publish"])
@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("file:///tmp/x%00y", ["bad file URL", "NUL byte"]),
        ("file://[::1/x", ["bad file URL", "malformed", "Invalid IPv6 URL"]),
        ("FILE://[::1/x", ["bad file URL", "malformed"]),
        ("file:///tmp/x?y", ["bad file URL", "no query or fragment"]),
        ("file:///tmp/x#y", ["bad file URL", "no query or fragment"]),
        ("file://host/tmp/x", ["bad file URL", "expected file:///absolute/path"]),
    ],
)
def test_malformed_file_url(
    tmp_path: Path, mnt: Path, command: str, url: str, words: list[str]
) -> None:
    if command == "mount" and not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    extra = [mnt, "--cache-dir", tmp_path / "c"] if command == "mount" else []
    done = run(command, url, *extra)
    refused(done, tmp_path, *words)
    assert not (tmp_path / "c").exists()


def test_malformed_file_url_in_the_mount_check() -> None:
    # the check reads a file URL as the backend does: the same one-line error
    with pytest.raises(SourceError, match="NUL byte"):
        check_apart("file:///tmp/x%00y", Path("/tmp/mnt"))


@needs_fuse
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["mount", "", "mnt"], ["SOURCE", "must not be empty"]),
        (["mount", "src", ""], ["MOUNTPOINT", "must not be empty"]),
        (["publish", ""], ["SOURCE", "must not be empty"]),
    ],
)
def test_empty_paths(tmp_path: Path, src: Path, mnt: Path, args: list[str], words: list[str]):
    # run from an empty dir: an empty path read as "." would mount or publish it
    cwd = tmp_path / "cwd"
    (cwd / "mnt").mkdir(parents=True)
    (cwd / "src").symlink_to(src)
    extra = ["--cache-dir", tmp_path / "c"] if args[0] == "mount" else []
    done = run(*args, *extra, cwd=cwd)
    refused(done, tmp_path, *words)
    assert not (cwd / ".cachefs-ci").exists()


# -- 3: key files -----------------------------------------------------------------------------


@needs_fuse
@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("/dev/zero", ["key file /dev/zero", "a device", "regular file"]),
        ("/dev/urandom", ["key file /dev/urandom", "a device"]),
        ("fifo", ["fifo is a FIFO", "regular file"]),
        ("huge", ["huge holds more than 4096 bytes"]),
        ("just-too-big", ["just-too-big holds more than 4096 bytes"]),
    ],
)
def test_key_file_that_is_no_key(
    tmp_path: Path, src: Path, mnt: Path, name: str, words: list[str]
) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    with open(tmp_path / "huge", "wb") as f:
        f.truncate(100 << 20)  # 100 MB of a passphrase
    (tmp_path / "just-too-big").write_bytes(b"k" * 4097)
    key_file = name if name.startswith("/") else tmp_path / name
    cache = tmp_path / "c"
    done = run("mount", src, mnt, "--cache-dir", cache, "--encrypt", "--key-file", key_file)
    refused(done, tmp_path, *words)
    assert not cache.exists()  # refused before anything was made


@needs_fuse
def test_key_file_refused_by_the_daemon_too(tmp_path: Path, src: Path, mnt: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    done = run(
        "mount", src, mnt, "--cache-dir", tmp_path / "c", "--encrypt",
        "--key-file", tmp_path / "fifo", "--foreground",
    )  # fmt: skip
    refused(done, tmp_path, "is a FIFO")


@needs_fuse
def test_huge_key_in_the_environment(tmp_path: Path, src: Path, mnt: Path) -> None:
    done = run(
        "mount", src, mnt, "--cache-dir", tmp_path / "c", "--encrypt",
        env={"CACHEFS_KEY": "k" * 5000},
    )  # fmt: skip
    refused(done, tmp_path, "CACHEFS_KEY holds more than 4096 bytes")


@needs_fuse
@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"])
def test_empty_key_file_open_to_others(
    tmp_path: Path, src: Path, mnt: Path, content: bytes
) -> None:
    # the error alone: no warning about the mode of a key that is not used
    key_file = tmp_path / "key"
    key_file.write_bytes(content)
    key_file.chmod(0o644)
    cache = tmp_path / "c"
    done = run("mount", src, mnt, "--cache-dir", cache, "--encrypt", "--key-file", key_file)
    refused(done, tmp_path, f"key file {key_file} is empty")
    assert not cache.exists()


# -- 5: numbers ------------------------------------------------------------------------------

BAD_NUMBERS = [
    (["--ttl", "nan"], "--ttl", "from 0 to 31536000"),
    (["--ttl", "inf"], "--ttl", "from 0 to 31536000"),
    (["--ttl", "2e19"], "--ttl", "from 0 to 31536000"),
    (["--ttl", "1e400"], "--ttl", "from 0 to 31536000"),
    (["--retries", "1000000000"], "--retries", "from 0 to 100"),
    (["--max-fetches", "100000000"], "--max-fetches", "from 1 to 1024"),
    (["--readahead-kb", "99999999999"], "--readahead-kb", "from 0 to 1048576"),
    (["--cache-size", "2000P"], "--cache-size", "1024P"),
    (["--min-free", "99999999P"], "--min-free", "1024P"),
    (["--max-readahead", "2000P"], "--max-readahead", "1024P"),
    (["--block-size", "3K"], "--block-size", "power of two from 4K to 64M"),
    (["--throttle", "1e9,90"], "--throttle", "from 0 to 60000 ms"),
    (["--throttle", "30,1e-300"], "--throttle", "from 0.001 to 1000000 MiB/s"),
]


@pytest.mark.parametrize(("args", "option", "allowed"), BAD_NUMBERS)
def test_mount_numbers_out_of_range(
    capsys: pytest.CaptureFixture[str], args: list[str], option: str, allowed: str
) -> None:
    line = parse_error(capsys, "mount", "src", "mnt", *args)
    assert option in line and allowed in line and repr(args[1]) in line


@pytest.mark.parametrize(
    ("argv", "option", "allowed"),
    [
        (["unmount", "m", "--timeout", "nan"], "--timeout", "from 0 to 86400"),
        (["unmount", "m", "--timeout", "inf"], "--timeout", "from 0 to 86400"),
        (["add-data", "p", "--offset", str(2**64)], "--offset", "9223372036854775807"),
        (["publish", "s", "--block-size", "3K"], "--block-size", "power of two"),
        (["publish", "s", "--block-size", "1G"], "--block-size", "power of two"),
    ],
)
def test_other_numbers_out_of_range(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str, allowed: str
) -> None:
    line = parse_error(capsys, *argv)
    assert option in line and allowed in line


@needs_fuse
def test_nan_ttl_is_refused_before_anything(tmp_path: Path, src: Path, mnt: Path) -> None:
    done = run("mount", src, mnt, "--cache-dir", tmp_path / "c", "--ttl", "nan")
    refused(done, tmp_path, "--ttl", "'nan'", "from 0 to 31536000")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("option", ["--ttl", "--max-fetches", "--trace", "--verify"])
def test_an_option_given_as_a_double_dash(capsys: pytest.CaptureFixture[str], option: str):
    line = parse_error(capsys, "mount", "src", "mnt", f"{option}=--")
    assert f"argument {option}: expected one argument" in line


def test_a_usage_error_is_one_line_whatever_the_input(capsys: pytest.CaptureFixture[str]):
    line = parse_error(capsys, "stats", "p", "two\nlines")
    assert "two lines" in line


# -- 6 and 8: the trace file -------------------------------------------------------------------


@needs_fuse
def test_trace_through_a_planted_symlink_is_refused(tmp_path: Path, src: Path, mnt: Path):
    target = tmp_path / "root-owned"
    target.write_text("precious\n")
    target.chmod(0o644)
    trace = tmp_path / "trace.jsonl"
    trace.symlink_to(target)
    done = run("mount", src, mnt, "--cache-dir", tmp_path / "c", "--trace", trace)
    if done.returncode == 0:  # the code before the fix: let it write what it writes
        (mnt / "hello.txt").read_text()
        run("unmount", mnt)
    assert target.read_text() == "precious\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    refused(done, tmp_path, f"trace file {trace} is a symbolic link")


@needs_fuse
@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("missing/dir/trace.jsonl", ["missing/dir/trace.jsonl", "directory does not exist"]),
        ("a-file/trace.jsonl", ["a-file/trace.jsonl", "Not a directory"]),
        ("/sys/cachefs-trace.jsonl", ["/sys/cachefs-trace.jsonl", "cannot be opened"]),
        ("fifo", ["fifo is not a regular file"]),
        ("shared", ["shared is open to other users (mode 644)"]),
    ],
)
def test_unusable_trace_file(
    tmp_path: Path, src: Path, mnt: Path, where: str, words: list[str]
) -> None:
    if where.startswith("/sys/"):
        try:
            os.close(os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError:
            pass  # as it should be: nobody creates files in sysfs
        else:
            os.unlink(where)
            pytest.skip("/sys takes new files here")
    (tmp_path / "a-file").write_text("")
    os.mkfifo(tmp_path / "fifo", 0o600)
    (tmp_path / "shared").write_text("")
    (tmp_path / "shared").chmod(0o644)
    cache = tmp_path / "c"
    done = run("mount", src, mnt, "--cache-dir", cache, "--trace", tmp_path / where)
    refused(done, tmp_path, "trace file", *words)
    assert not cache.exists()  # refused before anything was made


@needs_fuse
@pytest.mark.parametrize("trace", ["/proc/self/clear_refs", "/proc/sys/vm/drop_caches"])
def test_trace_file_on_procfs(tmp_path: Path, src: Path, mnt: Path, trace: str) -> None:
    # /proc/sys/vm/drop_caches is root's, mode 200, one link: only its filesystem tells
    if trace == "/proc/sys/vm/drop_caches" and os.geteuid() != 0:
        pytest.skip("only root may open it for writing")
    done = run("mount", src, mnt, "--cache-dir", tmp_path / "c", "--trace", trace)
    refused(done, tmp_path, f"trace file {trace} is on procfs", "kernel interface")


KERNEL_FILES = [
    ("/sys/bus/pci/rescan", "sysfs"),
    ("/sys/fs/cgroup/cgroup.procs", "cgroup2"),
    ("/sys/fs/cgroup/unified/cgroup.procs", "cgroup2"),
    ("/sys/fs/cgroup/pids/cgroup.procs", "cgroup"),
    ("/sys/kernel/debug/clear_warn_once", "debugfs"),
]


# Only files this machine has: nothing is ever created there.
@pytest.mark.parametrize(
    ("trace", "filesystem"), [(t, f) for t, f in KERNEL_FILES if os.path.isfile(t)]
)
def test_trace_file_on_a_kernel_filesystem(trace: str, filesystem: str) -> None:
    with pytest.raises(ConfigError, match=f"is on {filesystem}, a kernel interface"):
        open_trace(trace).close()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs, full but for what a test writes before filling it (fill())."""
    path = tmp_path / "small"
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:  # lazily: a daemon that failed to stop may still hold the trace open
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write into the filesystem of *path* until it is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with pytest.raises(OSError) as info:
            while True:
                os.write(fd, bytes(4096))
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_trace_disk_never_fails_a_read(
    tmp_path: Path, src: Path, small_tmpfs: Path, mount: MountFactory
) -> None:
    trace = small_tmpfs / "trace.jsonl"
    first = json.dumps({"note": "a page, to the byte"})
    trace.write_text(first + " " * (4096 - len(first) - 1) + "\n")  # the next line needs a page
    trace.chmod(0o600)
    fill(small_tmpfs)
    files = {f"f{i}.bin": os.urandom(100_000 + i) for i in range(3)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    m = mount(src, "--trace", trace)
    assert (m / "hello.txt").read_text() == "hello\n"
    for name, data in files.items():
        assert (m / name).read_bytes() == data
    m.unmount()
    assert m.log_text().count("tracing stopped") == 1, m.log_text()
    assert read_trace(trace) == [{"note": "a page, to the byte"}]


def _mount_read_unmount(tmp_path: Path, src: Path, mnt: Path, *args: object) -> None:
    done = run("mount", src, mnt, "--cache-dir", tmp_path / "c", *args)
    assert done.returncode == 0, done.stderr
    try:
        assert (mnt / "hello.txt").read_text() == "hello\n"
    finally:
        done = run("unmount", mnt)
    assert done.returncode == 0, done.stderr


@needs_fuse
def test_a_new_trace_file_is_private(tmp_path: Path, src: Path, mnt: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    _mount_read_unmount(tmp_path, src, mnt, "--trace", trace)
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600
    assert {r["file_id"] for r in read_trace(trace)} == {"hello.txt"}
    _mount_read_unmount(tmp_path, src, mnt, "--trace", trace)  # ours, private: appended to


@needs_fuse
def test_encrypted_trace_names_no_file(tmp_path: Path, src: Path, mnt: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    trace = tmp_path / "trace.jsonl"
    _mount_read_unmount(tmp_path, src, mnt, "--trace", trace, "--encrypt", "--key-file", key_file)
    text = trace.read_text()
    assert "hello" not in text
    with contextlib.closing(sqlite3.connect(tmp_path / "c" / "index.sqlite3")) as db:
        (meta,) = db.execute("SELECT value FROM meta WHERE key='encryption'").fetchone()
    key = CacheKey.derive(KEY.encode(), bytes.fromhex(json.loads(meta)["salt"]))
    assert {r["file_id"] for r in read_trace(trace)} == {key.name_tag("hello.txt")}


# -- 13: S3 endpoints and URLs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint", ["http://user:sekrit@host", "https://AKIAX:sekrit@minio:9000", "http://:sekrit@h"]
)
def test_credentials_in_the_endpoint(capsys: pytest.CaptureFixture[str], endpoint: str):
    line = parse_error(capsys, "mount", "s3://bucket", "mnt", "--s3-endpoint", endpoint)
    assert "--s3-endpoint" in line and "credentials" in line and "AWS_ACCESS_KEY_ID" in line
    assert "sekrit" not in line


@pytest.mark.parametrize(
    ("endpoint", "words"),
    [
        ("http://[::1", ["malformed", "Invalid IPv6 URL"]),
        ("http://host:99999", ["malformed", "Port out of range"]),
        ("http://host:port", ["malformed"]),
        ("http://[::1@x", ["malformed"]),
        ("http://ho st", ["spaces or control characters"]),
        ("http://:9000", ["expected http(s)://host[:port]"]),
    ],
)
def test_malformed_endpoint(capsys: pytest.CaptureFixture[str], endpoint: str, words: list[str]):
    line = parse_error(capsys, "mount", "s3://bucket", "mnt", "--s3-endpoint", endpoint)
    assert "argument --s3-endpoint:" in line and "_endpoint" not in line
    for word in words:
        assert word in line
    if "@" in endpoint:  # it may hold a secret: never repeated
        assert endpoint not in line


@pytest.mark.parametrize(
    ("endpoint", "what"),
    [
        ("http://h:9000/?token=sekrit", "a query"),
        ("http://h:9000?token=sekrit", "a query"),
        ("http://h:9000?", "a query"),
        ("http://h:9000/sekrit", "a path"),
        ("https://h/sekrit/", "a path"),
        ("http://h:9000#sekrit", "a fragment"),
        ("http://h:9000/#sekrit", "a fragment"),
        ("http://h/sekrit?token=sekrit", "a path, a query"),
    ],
)
def test_endpoint_with_a_path_query_or_fragment(
    capsys: pytest.CaptureFixture[str], endpoint: str, what: str
) -> None:
    line = parse_error(capsys, "mount", "s3://bucket", "mnt", "--s3-endpoint", endpoint)
    assert "argument --s3-endpoint:" in line and f"it has {what}" in line
    assert "expected http(s)://host[:port]" in line and "sekrit" not in line


@pytest.mark.parametrize("endpoint", ["http://h:9000", "http://h:9000/", "HTTPS://h"])
def test_endpoint_with_a_slash(endpoint: str) -> None:
    args = build_parser().parse_args(["mount", "s3://b", "m", "--s3-endpoint", endpoint])
    assert args.s3_endpoint == endpoint


@pytest.mark.parametrize("command", ["mount", "publish"])
@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_endpoint_environment_with_a_path_or_query(
    tmp_path: Path, mnt: Path, variable: str, command: str
) -> None:
    if command == "mount" and not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    env = {"AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_S3": ""}
    env[variable] = "http://127.0.0.1:1/sekrit?token=sekrit"
    extra = [mnt, "--cache-dir", tmp_path / "c"] if command == "mount" else []
    done = run(command, "s3://some-bucket", *extra, "--s3-anonymous", env=env)
    refused(done, tmp_path, variable, "bad S3 endpoint 'http://127.0.0.1:1'", "path, query")
    assert "sekrit" not in done.stderr
    assert not (tmp_path / "c").exists()


@needs_fuse
@pytest.mark.parametrize("foreground", [False, True])
@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_credentials_in_the_endpoint_environment(
    tmp_path: Path, mnt: Path, variable: str, foreground: bool
) -> None:
    env = {variable: "http://user:sekrit@127.0.0.1:1"}
    args = ["--s3-anonymous", "--cache-dir", tmp_path / "c", *(["--foreground"] * foreground)]
    done = run("mount", "s3://some-bucket", mnt, *args, env=env)
    refused(done, tmp_path, variable, "credentials in the S3 endpoint")
    assert "sekrit" not in done.stderr


@needs_fuse
@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("s3://key:sekrit@bucket", ["credentials do not belong in the URL"]),
        ("s3://key:sekrit@[bucket", ["bad S3 URL", "malformed"]),
        ("s3://[bucket", ["bad S3 URL", "malformed"]),
    ],
)
def test_bad_s3_url(tmp_path: Path, mnt: Path, url: str, words: list[str]) -> None:
    done = run("mount", url, mnt, "--cache-dir", tmp_path / "c", "--s3-anonymous")
    refused(done, tmp_path, *words)
    assert "sekrit" not in done.stderr


# -- every option of every command, fuzzed ------------------------------------------------------

#: Per run of the command; it answers bad input at once, this only catches a hang.
FUZZ_DEADLINE = 20
SPECIAL = [
    "", " ", "0", "1", "-1", "nan", "-nan", "inf", "-inf", "1e400", "2e19", "1e-320",
    "9" * 30, str(2**63), str(2**64), "0x10", "1_000", "١٢", "4K", "1M", "64M", "1024P",
    "1025P", "5%", "100%", "nan%", "30,90", "1e9,1", "nan,90", "30,0", "once", "debug",
    "http://h:9000", "http://u:p@h", "http://[::1", "s3://b", "file:///", "é", "\t", "\x1b[31m",
    "a\nb", "--", "-", "/dev/zero", "/dev/urandom", "/dev/null", "/proc/self/mem",
]  # fmt: skip
CONTROL = "".join(map(chr, range(1, 32))) + "\x7f"


class Hang(Exception):
    pass


def _names() -> st.SearchStrategy[str]:
    """A file name in the fuzz's own cwd: no ``/``, never ``.`` or ``..``."""
    chars = st.characters(codec="utf-8", exclude_characters="\0/")
    texts = st.text(chars, max_size=20) | st.text(st.sampled_from(CONTROL + "09.-e,%KMnf"))
    return texts.filter(lambda s: s.strip(".") != "" or s == "")


def _values(tmp_path: Path) -> st.SearchStrategy[str]:
    """Option values: the special ones, paths of this test's FIFO and files, anything."""
    paths = [str(tmp_path / p) for p in ("fifo", "key", "dir", "missing/x", "link")]
    return st.one_of(
        st.sampled_from(SPECIAL + paths),
        _names(),
        st.integers(-(2**70), 2**70).map(str),
        st.floats().map(repr),
    )


def _publish_sources(tmp_path: Path) -> st.SearchStrategy[str]:
    """What ``publish`` may be pointed at: it writes there, so only below *tmp_path*."""
    paths = [str(tmp_path / p) for p in ("fifo", "dir", "missing/x")]
    return st.sampled_from(["", "/dev/zero", *paths]) | _names()


def _options() -> list[tuple[str, str]]:
    """(command, option) for every option that takes a value, straight from the parser."""
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a.choices, dict)]
    found = []
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.nargs != 0:
                found.append((name, action.option_strings[0]))
            elif not action.option_strings:
                found.append((name, action.dest))  # a positional
    return found


OPTIONS = _options()
CHECK_SOURCE = cachefs.cli.mount._check_source


@pytest.fixture
def fuzz_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A place to run the CLI in this process: cwd, the source, and no daemon."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_text("f\n")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "dir").mkdir()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "key").write_text(KEY)
    (tmp_path / "key").chmod(0o600)
    (tmp_path / "link").symlink_to(tmp_path / "key")
    os.mkfifo(tmp_path / "fifo", 0o600)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("CACHEFS_KEY", raising=False)
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _argv(command: str, option: str, value: str, joined: bool, tmp: Path) -> list[str]:
    """A command line with *value* for *option* (or a positional), all else valid."""
    file = str(tmp / "src" / "f")
    positionals = {
        "mount": {"source": str(tmp / "src"), "mountpoint": str(tmp / "mnt")},
        "unmount": {"mountpoint": str(tmp / "mnt")},
        "publish": {"source": str(tmp / "missing-source")},
        "add-data": {"path": file},
        "stats": {"path": file},
        "reset-external-error": {"path": file},
    }.get(command, {"paths": str(tmp / "src")})
    if option in positionals:
        positionals[option] = value
    argv = [command, *positionals.values()]
    if option.startswith("--"):
        argv += [f"{option}={value}"] if joined else [option, value]
    if command == "mount":
        if option != "--cache-dir":
            argv += ["--cache-dir", str(tmp / "cache")]
        if option == "--key-file":
            argv.append("--encrypt")
        if option.startswith("--s3-"):
            argv[1] = "s3://fuzz-bucket"
    if command == "add-data" and option != "--offset":
        argv += ["--offset", "0"]
    return argv


def _run_in_process(argv: list[str]) -> tuple[int, str]:
    """main(argv) here, with its exit code and stderr; Hang if it takes too long."""

    def hang(signum: int, frame: Any) -> None:
        raise Hang(f"cachefs {argv}: no answer within {FUZZ_DEADLINE} s")

    err = io.StringIO()
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(FUZZ_DEADLINE)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


@pytest.mark.parametrize(("command", "option"), OPTIONS)
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), joined=st.booleans())
def test_fuzz_every_option(
    fuzz_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    option: str,
    data: st.DataObject,
    joined: bool,
) -> None:
    """Exit 0 or 2, no traceback, an answer in time; a mount the CLI accepts is one the
    daemon is handed as it was checked (its orders are read back instead of started)."""
    daemon_errors: list[str] = []

    def spawn(orders: Orders, log_path: Path, timeout: float) -> int:
        try:
            if Orders.from_json(orders.to_json()) != orders:
                daemon_errors.append(f"{orders}: not handed over as checked")
        except BaseException as e:
            daemon_errors.append(f"{orders}: {e!r}")
        return 0

    monkeypatch.setattr(cachefs.cli.mount, "spawn_daemon", spawn)

    def check_local_source(source: str, options: dict[str, Any]) -> None:
        if not source.startswith("s3://"):  # a bucket is not asked: no network here
            CHECK_SOURCE(source, options)

    monkeypatch.setattr(cachefs.cli.mount, "_check_source", check_local_source)
    if (command, option) == ("publish", "source"):
        value = data.draw(_publish_sources(fuzz_dir))
    else:
        value = data.draw(_values(fuzz_dir))
    argv = _argv(command, option, value, joined, fuzz_dir)
    code, err = _run_in_process(argv)
    assert "Traceback" not in err, err
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    assert daemon_errors == []
    assert mounts_below(fuzz_dir) == []


@pytest.mark.parametrize("foreground", [False, True])
def test_fuse_pyfuse3_without_the_extra_is_refused_before_anything(
    tmp_path: Path,
    src: Path,
    mnt: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    foreground: bool,
) -> None:
    monkeypatch.setitem(sys.modules, "pyfuse3", None)  # import pyfuse3 fails, as uninstalled
    args = ["--foreground"] if foreground else []
    argv = ["mount", str(src), str(mnt), "--cache-dir", str(tmp_path / "c"), "--fuse", "pyfuse3"]
    assert main([*argv, *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "pip install 'cachefs[pyfuse3]'" in lines[0], lines
    assert not (tmp_path / "c").exists() and mounts_below(tmp_path) == []
