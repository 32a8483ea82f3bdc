"""The cachefs command line: help, bad input, background mounts, the control socket."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from conftest import NATIVE_ONLY, assert_one_line_error

from cachefs.cli.main import build_parser
from cachefs.cli.mount import mount_options
from cachefs.cli.running import _daemon_of, format_stats
from cachefs.control.client import call
from cachefs.control.mounts import MountEntry, cachefs_mounts, fsname_for, mount_at
from cachefs.control.server import Progress, serve_control
from cachefs.daemon.checks import _users_may_allow_other, check_fuse
from cachefs.daemon.options import MountOptions, default_cache_dir
from cachefs.daemon.spawn import Orders
from cachefs.engine import CacheConfig
from cachefs.errors import CacheDirInUse, ConfigError, RemoteError

if TYPE_CHECKING:
    from conftest import MountFactory

Cachefs = Callable[..., subprocess.CompletedProcess[str]]

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
COMMANDS = [
    "mount",
    "unmount",
    "prefetch",
    "pin",
    "unpin",
    "purge",
    "stats",
    "reset-file-errors",
    "reset-external-error",
]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_on_every_command(cachefs: Cachefs, command: str | None) -> None:
    done = cachefs(*([command] if command else []), "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: cachefs {command or ''}".rstrip())
    if command is None:
        assert all(c in done.stdout for c in COMMANDS)


# -- bad input: exit 2, one line ---------------------------------------------------------


def test_usage_errors(cachefs: Cachefs) -> None:
    assert_one_line_error(cachefs("mount"), "required")
    assert_one_line_error(cachefs("frobnicate"), "invalid choice")
    assert_one_line_error(cachefs("mount", "a", "b", "--retries", "-1"), "--retries")


@needs_fuse
def test_missing_source(cachefs: Cachefs, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    done = cachefs("mount", tmp_path / "nope", tmp_path / "mnt", "--cache-dir", tmp_path / "c")
    assert_one_line_error(done, "nope", "does not exist")


@needs_fuse
def test_mountpoint_missing_or_not_empty(cachefs: Cachefs, tmp_path: Path, src: Path) -> None:
    cache = tmp_path / "c"
    assert_one_line_error(
        cachefs("mount", src, tmp_path / "nope", "--cache-dir", cache), "does not exist"
    )
    assert_one_line_error(cachefs("mount", src, src, "--cache-dir", cache), "not empty")


@needs_fuse
@pytest.mark.parametrize(
    ("size", "words"),
    [("3K", ["power of two"]), ("1G", ["power of two"]), ("12Q", ["invalid size", "12Q"])],
)
def test_bad_block_size(
    cachefs: Cachefs, tmp_path: Path, src: Path, size: str, words: list[str]
) -> None:
    (tmp_path / "mnt").mkdir()
    done = cachefs(
        "mount", src, tmp_path / "mnt", "--cache-dir", tmp_path / "c", "--block-size", size
    )
    assert_one_line_error(done, *words)


@needs_fuse
def test_malformed_faults_file(cachefs: Cachefs, tmp_path: Path, src: Path) -> None:
    (tmp_path / "mnt").mkdir()
    rules = tmp_path / "rules.json"
    rules.write_text('[{"file": "*", "result": "NO_SUCH_RESULT"}]')
    done = cachefs("mount", src, tmp_path / "mnt", "--cache-dir", tmp_path / "c", "--faults", rules)
    assert_one_line_error(done, "rules.json")
    assert mount_at(tmp_path / "mnt") is None


@pytest.mark.parametrize("spec", ["30", "30,90,1", "a,90", "30,0", "-1,90", "nan,90", "1,inf"])
def test_bad_throttle(cachefs: Cachefs, tmp_path: Path, src: Path, spec: str) -> None:
    (tmp_path / "mnt").mkdir()
    done = cachefs(
        "mount", src, tmp_path / "mnt", "--cache-dir", tmp_path / "c", f"--throttle={spec}"
    )
    assert_one_line_error(done, "--throttle", repr(spec))
    assert mount_at(tmp_path / "mnt") is None


def handed_over(opts: MountOptions) -> MountOptions:
    """What the daemon reads of *opts*: the orders cachefs mount writes to it."""
    orders = Orders.from_json(Orders(opts, "debug").to_json())
    assert orders.log_level == "debug"
    return orders.options


def test_mount_options_reach_the_daemon(
    tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rules.json").write_text('[{"file": "*", "result": "FAILURE"}]')
    given = ["mount", str(src), "mnt", "--cache-dir", "c", "--faults", "rules.json"]
    given += ["--throttle", "30,90", "--trace", "t.jsonl", "--readahead-kb", "2048"]
    given += ["--ttl", "0.1", "--min-free", "7M", "--no-passthrough", "--verify", "always"]
    opts = mount_options(build_parser().parse_args(given))
    assert opts.wrappers == (
        ("throttle", "30,90"),
        ("faults", str(tmp_path / "rules.json")),
        ("trace", str(tmp_path / "t.jsonl")),
    )
    assert opts.readahead_kb == 2048 and opts.cache_dir == tmp_path / "c"
    assert opts.mountpoint == tmp_path / "mnt"
    assert opts.config.ttl == 0.1 and opts.config.min_free == 7 << 20
    assert handed_over(opts) == opts


@pytest.mark.parametrize(
    "flags",
    [[], ["--no-io-uring"], ["--fuse", "pyfuse3", "--cache-size", "1G", "--retries", "0"]],
)
def test_every_choice_reaches_the_daemon(tmp_path: Path, src: Path, flags: list[str]) -> None:
    given = ["mount", str(src), str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"), *flags]
    opts = mount_options(build_parser().parse_args(given))
    assert opts.config.io_uring is ("--no-io-uring" not in flags)
    assert opts.fuse == ("pyfuse3" if "pyfuse3" in flags else "native")
    again = handed_over(opts)
    assert again == opts and type(again.config.ttl) is float


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["options"].pop("source"),
        lambda d: d["options"].update(mountpoint=7),
        lambda d: d["options"]["config"].update(block_size=3000),
        lambda d: d["options"]["config"].update(retries=True),
        lambda d: d["options"].update(wrappers=[["trace"]]),
        lambda d: d["options"].update(surprise=1),
        lambda d: d.update(log_level="loud"),
        # what the CLI refuses, the daemon refuses too
        lambda d: d["options"]["config"].update(block_size=3),
        lambda d: d["options"]["config"].update(ttl=float("nan")),
        lambda d: d["options"].update(mountpoint="relative/mnt"),
        lambda d: d["options"].update(readahead_kb=-5),
        lambda d: d["options"].update(fuse="bogus"),
    ],
)
def test_the_daemon_takes_only_orders(tmp_path: Path, damage: Callable[[dict], object]) -> None:
    opts = MountOptions("/src", tmp_path / "mnt", tmp_path / "c", CacheConfig())
    doc = json.loads(Orders(opts).to_json())
    damage(doc)
    with pytest.raises((ValueError, ConfigError)):
        Orders.from_json(json.dumps(doc).encode())


@pytest.mark.parametrize("stdin", ["not json", "closed"])
def test_a_daemon_without_orders_says_so_on_its_readiness_pipe(tmp_path: Path, stdin: str) -> None:
    read_end, write_end = os.pipe()
    given: dict[str, object] = (
        {"input": stdin.encode()} if stdin != "closed" else {"preexec_fn": lambda: os.close(0)}
    )
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cachefs.daemon", str(tmp_path), "--ready-fd", str(write_end)],
            capture_output=True,
            pass_fds=(write_end,),
            timeout=60,
            **given,  # type: ignore[arg-type]
        )
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            line = ready.read().decode()
    finally:
        with contextlib.suppress(OSError):
            os.close(write_end)
    assert done.returncode == 1
    assert line.startswith("error 1 internal error: the mount daemon got no options"), line
    assert line.count("\n") == 1 and "Traceback" not in done.stderr.decode()


@pytest.mark.parametrize("fd", ["1", "-1", "x", "2000"])
def test_a_daemon_needs_its_readiness_pipe(tmp_path: Path, fd: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cachefs.daemon", str(tmp_path), "--ready-fd", fd],
        input=b"",
        capture_output=True,
        text=False,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"--ready-fd" in done.stderr and b"Traceback" not in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["stats", "--json"],
        ["reset-file-errors"],
        ["reset-external-error"],
        ["unmount"],
        ["prefetch"],
        ["pin"],
        ["unpin"],
        ["purge"],
    ],
)
def test_path_not_in_a_mount(cachefs: Cachefs, tmp_path: Path, args: list[str]) -> None:
    assert_one_line_error(cachefs(*args, tmp_path), str(tmp_path), "not inside a cachefs mount")


@NATIVE_ONLY
def test_cache_dir_in_use(cachefs: Cachefs, mount: MountFactory, tmp_path: Path, src: Path) -> None:
    m = mount(src)
    (tmp_path / "other").mkdir()
    done = cachefs("mount", src, tmp_path / "other", "--cache-dir", m.cache_dir)
    assert_one_line_error(done, "in use")
    assert mount_at(tmp_path / "other") is None
    assert (m / "hello.txt").read_text() == "hello\n"  # the first mount is unharmed


def test_missing_fuse_names_the_package() -> None:
    with pytest.raises(ConfigError, match=r"apt-get install fuse3"):
        check_fuse(device="/nonexistent/fuse")


def test_allow_other_is_refused_up_front_only_where_fuse_conf_says_no(tmp_path: Path) -> None:
    """What /etc/fuse.conf allows, fusermount3 (set-uid root) decides: a file this
    user cannot read (here a directory) is left to it, not refused here."""
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    assert not _users_may_allow_other(str(conf))
    assert not _users_may_allow_other(str(tmp_path / "missing"))
    conf.write_text("  user_allow_other  # yes\n")
    assert _users_may_allow_other(str(conf))
    assert _users_may_allow_other(str(tmp_path))


# -- a background mount -------------------------------------------------------------------


@needs_fuse
def test_background_mount_returns_when_ready(cachefs: Cachefs, tmp_path: Path, src: Path) -> None:
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    done = cachefs("mount", src, mnt, "--cache-dir", cache, "--block-size", "64K")
    try:
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert (mnt / "hello.txt").read_text() == "hello\n"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        assert stat.S_IMODE((cache / "control.sock").stat().st_mode) == 0o600
        entry = mount_at(mnt)
        assert entry is not None and entry.cache_dir == cache
        done = cachefs("unmount", mnt)
        assert done.returncode == 0, done.stderr
        assert mount_at(mnt) is None
        assert not (cache / "control.sock").exists()
        assert "unmounted" in (cache / "cachefs.log").read_text()
    finally:
        if mount_at(mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    digest = hashlib.sha256(b"/srv/data").hexdigest()[:16]
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir("/srv/data") == tmp_path / "cachefs" / digest
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_cache_dir("/srv/data") == Path("/var/cache/cachefs") / digest


# -- finding mounts and the control socket (in process) -------------------------------------


def test_mountinfo_entries_lead_to_the_cache_dir(tmp_path: Path) -> None:
    cache = Path("/var/cache/a dir,with=odd chars/é")
    fsname = fsname_for(cache)
    assert fsname.isascii() and "," not in fsname and " " not in fsname
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        f"42 27 0:39 / /mnt/my\\040files rw,nosuid shared:5 - fuse.cachefs {fsname} rw,user_id=0\n"
        "43 27 0:40 / /mnt/other rw - fuse.sshfs host:/ rw\n"
    )
    assert cachefs_mounts(mountinfo) == [MountEntry(Path("/mnt/my files"), 0, 39, cache)]
    entry = cachefs_mounts(mountinfo)[0]
    assert entry.file_id(Path("/mnt/my files")) == ""
    assert entry.file_id(Path("/mnt/my files/a/b")) == "a/b"


async def _handler(req: dict[str, object], progress: Progress) -> object:
    if req["command"] == "echo":
        return req.get("value")
    if req["command"] == "count":
        for i in range(int(str(req["to"]))):
            await progress.send({"done": i})
        return "counted"
    raise ConfigError(f"unknown control command {req['command']!r}")


async def test_control_socket_with_a_long_path(tmp_path: Path) -> None:
    cache = tmp_path / ("long-" * 30)
    cache.mkdir()
    entry = MountEntry(Path("/mnt"), 0, 1, cache)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, cache, _handler)
        assert stat.S_IMODE((cache / "control.sock").stat().st_mode) == 0o600
        assert await trio.to_thread.run_sync(lambda: call(entry, "echo", value=[1])) == [1]
        with pytest.raises(RemoteError) as info:
            await trio.to_thread.run_sync(call, entry, "nope")
        assert info.value.exit_code == 2
        # A second server on the same cache dir refuses to start.
        with pytest.raises(CacheDirInUse):
            await serve_control(cache, _handler)
        nursery.cancel_scope.cancel()
    assert not (cache / "control.sock").exists()


async def test_stale_control_socket_is_replaced(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "control.sock"))
    stale.close()  # what a crashed mount leaves behind: connections are refused
    entry = MountEntry(Path("/mnt"), 0, 1, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, tmp_path, _handler)
        assert await trio.to_thread.run_sync(lambda: call(entry, "echo", value="x")) == "x"
        nursery.cancel_scope.cancel()


def test_stats_table() -> None:
    table = format_stats(
        {
            "source": "/srv/data",
            "block_size": 1 << 20,
            "ttl": 60.0,
            "read_data_calls": 3,
            "cached_bytes": 3 << 20,
            "files_in_error": 1,
            "file_errors": ["bad.bin"],
            "external_error": None,
            "stale_served": 0,
            "cache_limit": 10 << 30,
            "min_free": 5 << 30,
            "pinned_bytes": 1 << 20,
            "evicted_bytes": 0,
            "hit_ratio": 0.875,
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["source", "/srv/data"]
    assert "1.0 MiB" in table and "3.0 MiB" in table and "60 s" in table
    assert any(line.split()[-1] == "bad.bin" for line in lines)
    assert any(line.startswith("external error") and line.endswith("none") for line in lines)
    assert any(line.startswith("stale served") for line in lines)
    rows = {line[:14].strip(): line[14:].strip() for line in lines}
    assert rows["cache limit"] == "10.0 GiB" and rows["min free"] == "5.0 GiB"
    assert rows["pinned"] == "1.0 MiB" and rows["evicted"] == "0 B"
    assert rows["hit ratio"] == "87.5%"
    assert "n/a" in format_stats({"hit_ratio": None})


async def test_progress_lines_come_before_the_answer(tmp_path: Path) -> None:
    entry = MountEntry(Path("/mnt"), 0, 1, tmp_path)
    seen: list[object] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, tmp_path, _handler)
        answer = await trio.to_thread.run_sync(
            lambda: call(entry, "count", to=3, on_progress=seen.append)
        )
        assert answer == "counted"
        assert seen == [{"done": 0}, {"done": 1}, {"done": 2}]
        # A client that does not listen for progress gets just the answer.
        assert await trio.to_thread.run_sync(lambda: call(entry, "count", to=2)) == "counted"
        nursery.cancel_scope.cancel()


async def test_a_client_that_leaves_cancels_its_request(tmp_path: Path) -> None:
    cancelled = trio.Event()

    async def endless(req: dict[str, object], progress: Progress) -> object:
        try:
            while True:
                await progress.send({"tick": True})
                await trio.sleep(0.01)  # pacing, not synchronisation
        except trio.Cancelled:
            cancelled.set()
            raise

    def leave_after_first_line() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(tmp_path / "control.sock"))
            sock.sendall(b'{"command": "endless"}\n')
            assert sock.makefile("rb").readline().startswith(b'{"progress"')

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, tmp_path, endless)
        await trio.to_thread.run_sync(leave_after_first_line)
        with trio.fail_after(10):
            await cancelled.wait()
        nursery.cancel_scope.cancel()


@needs_fuse
@NATIVE_ONLY
def test_output_cut_short_by_its_reader_ends_quietly(mount: MountFactory, src: Path) -> None:
    m = mount(src)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachefs", "stats", str(m.mountpoint)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # as `| head` does, before anything was written
    assert proc.wait(timeout=60) == 141
    assert proc.stderr.read() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a process as uid 65534")
def test_unmount_signals_only_a_daemon_of_the_mounts_owner(tmp_path: Path) -> None:
    """The lock file names the daemon's pid; whoever can write there must not
    make root's unmount signal another process."""
    # Popen returns once sleep runs, as uid 65534 already (user= acts before exec).
    other = subprocess.Popen(["sleep", "600"], user=65534, group=65534, extra_groups=[])
    try:
        lock = tmp_path / "lock"
        lock.write_text(f"{other.pid}\n")
        with open(lock) as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # as a live daemon holds it
            entry = MountEntry(tmp_path / "mnt", 0, 0, tmp_path, owner=0)
            assert _daemon_of(entry) is None
            entry = MountEntry(tmp_path / "mnt", 0, 0, tmp_path, owner=65534)
            assert _daemon_of(entry) == other.pid
    finally:
        other.kill()
        other.wait()
