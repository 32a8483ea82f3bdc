"""Hostile users and a hostile machine against what running cachefs as a
service added (issue 24): the metrics endpoint, the state dump on SIGUSR1,
the rotated log, the mount(8) helper and sd_notify, all on real mounts.

Each test asserts what a user notices: the bytes read equal the source's,
exit codes, one-line errors, no traceback, the mount answering and
unmounting cleanly.  The metrics server, the log and the helper do not
depend on the FUSE transport: the mounts here are native only.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from conftest import (
    NATIVE_ONLY,
    REPO,
    MountFactory,
    lazy_unmount,
    pread_direct,
    run_cachefs,
    tmpfs,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from redisserver import free_port
from test_logs import EVENT, daemon_pid, mount_daemon

from cachefs.control.mounts import mount_at
from cachefs.daemon.logs import ROTATE_ENV

SIZE = 3 * 64 * 1024 + 777  # four blocks of 64 KiB, the last short
HELPER = REPO / ".venv" / "bin" / "mount.cachefs"
DEADLINE = 20.0
#: How long a mount may take to serve with a NOTIFY_SOCKET that takes nothing.
NOTIFY_DEADLINE = 10.0


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    root.mkdir()
    for n in range(8):
        (root / f"f{n}.bin").write_bytes(os.urandom(SIZE))
    (root / "hello.txt").write_text("hello\n")
    return root


class Reader:
    """Threads that read every file of *names* through the mount, past the
    page cache, until stopped; what they saw that the source did not hold."""

    def __init__(self, mountpoint: Path, source: Path, names: list[str], threads: int = 2) -> None:
        self._expected = {name: (source / name).read_bytes() for name in names}
        self._mountpoint = mountpoint
        self.stop = threading.Event()
        self.wrong: list[str] = []
        self.reads = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self.stop.is_set():
            for name, expected in self._expected.items():
                try:
                    got = pread_direct(self._mountpoint / name, 0, len(expected) + 1)
                except OSError as e:
                    self.wrong.append(f"{name}: {e}")
                    continue
                self.reads += 1
                if got != expected:
                    self.wrong.append(f"{name}: {len(got)} bytes, not the source's {len(expected)}")

    def __enter__(self) -> Reader:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=DEADLINE)
            assert not t.is_alive(), "a reader is stuck in the mount"


def exchange(port: int, request: bytes, shut: bool = True) -> bytes:
    """Send *request* raw, read until the server closes; what came back (a
    reset after the answer is not an error of the answer)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
        s.sendall(request)
        if shut:
            s.shutdown(socket.SHUT_WR)
        try:
            while chunk := s.recv(1 << 16):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def parse(answer: bytes, with_body: bool = True) -> tuple[str, int]:
    """The status line of an HTTP answer and its Content-Length; its body,
    if any, must be the Prometheus text format and parse."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    assert sep, answer[:200]
    lines = head.decode("ascii").split("\r\n")
    length = int(next(v for k, _, v in (h.partition(": ") for h in lines) if k == "Content-Length"))
    if with_body:
        assert len(body) == length, (len(body), length)
        if lines[0] == "HTTP/1.1 200 OK":
            families = list(text_string_to_metric_families(body.decode()))
            assert any(f.name == "cachefs_hit_bytes" for f in families), body[:200]
    else:
        assert body == b""
    return lines[0], length


def scrape_until_answered(port: int) -> str:
    """A GET /metrics, again until one is answered (the server may still be
    closing the connections of clients that left); its status line."""
    status = ""

    def answered() -> bool:
        nonlocal status
        try:
            answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", shut=False)
        except OSError:
            return False
        if not answer:
            return False  # closed at once: too many connections still
        status = parse(answer)[0]
        return True

    wait_for("an answered scrape", answered, DEADLINE)
    return status


def reset(s: socket.socket) -> None:
    """Close *s* with a RST, as a client that crashed."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


@NATIVE_ONLY
def test_hostile_metrics_clients_leave_reads_scrapes_and_the_mount_intact(
    mount: MountFactory, data: Path
) -> None:
    port = free_port()
    m = mount(data, "--metrics", f"127.0.0.1:{port}")
    names = sorted(p.name for p in data.iterdir())
    with Reader(m.mountpoint, data, names) as reader:
        # Many clients that connect and never send: more than are served at once.
        idle = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(40)]
        for s in idle:
            s.close()
        assert scrape_until_answered(port) == "HTTP/1.1 200 OK"

        # A request head of 1 MB, binary garbage, a NUL in the path, no HTTP at all.
        big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (1 << 20) + b"\r\n\r\n"
        assert parse(exchange(port, big))[0].startswith("HTTP/1.1 431 ")
        assert parse(exchange(port, bytes(range(256)) * 100))[0].startswith("HTTP/1.1 4")
        assert parse(exchange(port, b"\xff\xfe \x00 HTTP/\xff\n\n"))[0].startswith("HTTP/1.1 4")
        assert parse(exchange(port, b"GET /metrics\x00 HTTP/1.1\r\n\r\n"))[0].startswith(
            "HTTP/1.1 4"
        )
        assert exchange(port, b"GET /metrics\r\n") == b""  # never a whole head: closed

        # Pipelined requests, and one with a body: one answer, whole, that parses.
        pipelined = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 500
        assert parse(exchange(port, pipelined, shut=False))[0] == "HTTP/1.1 200 OK"
        body = b"GET /metrics HTTP/1.1\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000
        assert parse(exchange(port, body, shut=False))[0] == "HTTP/1.1 200 OK"

        # HEAD: the length of the answer GET would get, no body.
        status, length = parse(exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"), with_body=False)
        assert status == "HTTP/1.1 200 OK" and length > 0

        # Clients that reset before and in the middle of the answer.
        for n in range(30):
            s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
            s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            if n % 2:
                s.recv(1)
            reset(s)

        # Many scrapes at once: each one answered parses (those beyond 8 may be closed).
        answers: list[bytes] = []

        def scrape() -> None:
            try:
                answers.append(exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n", shut=False))
            except OSError:
                pass

        scrapers = [threading.Thread(target=scrape) for _ in range(24)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join(timeout=DEADLINE)
        for answer in answers:
            if answer:
                assert parse(answer)[0] == "HTTP/1.1 200 OK"
        assert scrape_until_answered(port) == "HTTP/1.1 200 OK"
    assert reader.wrong == [] and reader.reads > 0
    assert m.stats()["hit_bytes"] > 0
    m.unmount()
    assert "Traceback" not in m.log_text()


@NATIVE_ONLY
def test_a_reader_gets_one_version_of_a_file_replaced_under_it_while_scraped(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    versions = [os.urandom(SIZE + 4096 * n) for n in range(4)]
    (src / "moving.bin").write_bytes(versions[0])
    port = free_port()
    m = mount(src, "--metrics", f"127.0.0.1:{port}", "--ttl", "0")
    done = threading.Event()
    mixed: list[str] = []
    scrapes: list[str] = []

    def writer() -> None:
        n = 0
        while not done.is_set():
            n += 1
            tmp = src / ".moving.tmp"
            tmp.write_bytes(versions[n % len(versions)])
            os.replace(tmp, src / "moving.bin")

    def scraper() -> None:
        while not done.is_set():
            scrapes.append(parse(exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n", shut=False))[0])

    threads = [threading.Thread(target=writer), threading.Thread(target=scraper)]
    for t in threads:
        t.start()
    reads = errors = 0
    try:
        while reads + errors < 300:
            try:
                with open(m / "moving.bin", "rb") as f:
                    got = f.read()
            except OSError as e:  # an error is allowed: ESTALE, say
                assert e.errno in (errno.ESTALE, errno.EIO, errno.ENOENT), e
                errors += 1
                continue
            reads += 1
            if got not in versions:
                mixed.append(f"read {reads}: {len(got)} bytes, no version of the file")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=DEADLINE)
    assert mixed == [], mixed[:5]
    assert reads > 0 and set(scrapes) == {"HTTP/1.1 200 OK"}
    m.unmount()
    assert "Traceback" not in m.log_text()


@NATIVE_ONLY
@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_sigusr1_storm_while_reading_and_writing(
    encrypted: bool, mount: MountFactory, tmp_path: Path
) -> None:
    """An encrypted mount takes no changes (EROFS): there the writes are
    refused ones, whose errors are logged, and no name may show in clear."""
    src = tmp_path / "src"
    src.mkdir()
    secret = [f"patient-zelda-{n}.bin" for n in range(4)]
    for name in secret:
        (src / name).write_bytes(os.urandom(SIZE))
    options: list[object] = []
    if encrypted:
        key = tmp_path / "key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        options = ["--encrypt", "--key-file", key]
    m = mount(src, *options)
    wrote: list[str] = []
    tries = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal tries
        n = 0
        while not stop.is_set():
            tries += 1
            path = m / f"diagnosis-quentin-{n % 5}.txt"
            text = f"written {n}\n" * 100
            n += 1
            try:
                path.write_text(text)
            except OSError as e:
                if not (encrypted and e.errno == errno.EROFS):
                    wrote.append(f"{path.name}: {e}")
                continue
            if encrypted or path.read_text() != text:
                wrote.append(f"{path.name}: written, read back {path.read_text()[:20]!r}")

    with Reader(m.mountpoint, src, secret) as reader:
        t = threading.Thread(target=writer)
        t.start()
        try:
            for _ in range(300):
                os.kill(m.proc.pid, signal.SIGUSR1)
            before = m.log_text().count("state: dump ends")
            os.kill(m.proc.pid, signal.SIGUSR1)
            wait_for(
                "a dump after the storm",
                lambda: m.log_text().count("state: dump ends") > before,
                DEADLINE,
            )
        finally:
            stop.set()
            t.join(timeout=DEADLINE)
    assert m.proc.poll() is None, m.log_text()[-2000:]
    assert reader.wrong == [] and wrote == [] and tries > 0
    m.unmount()
    text = m.log_text()
    assert "Traceback" not in text
    lines = text.split("\n")
    assert lines.pop() == ""
    assert [line for line in lines if not (EVENT.match(line) or line.startswith("    "))] == []
    if encrypted:
        assert "zelda" not in text and "quentin" not in text


def test_a_tiny_rotated_log_at_debug_level_under_many_reads(
    data: Path, mnt: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cap, count = 2000, 2
    done = mount_daemon(data, mnt, cache, "--log-level", "debug", **{ROTATE_ENV: f"{cap},{count}"})
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in data.iterdir())
    for _ in range(3):
        for name in names:
            assert pread_direct(mnt / name, 0, SIZE + 1) == (data / name).read_bytes()
    os.kill(daemon_pid(cache), signal.SIGUSR1)
    assert run_cachefs("stats", mnt).returncode == 0
    unmounted = run_cachefs("unmount", mnt)
    assert unmounted.returncode == 0, unmounted.stderr
    logs = sorted(p.name for p in cache.iterdir() if p.name.startswith("cachefs.log"))
    assert logs == ["cachefs.log", "cachefs.log.1", "cachefs.log.2"]
    for name in logs:
        text = (cache / name).read_text()
        assert len(text.encode()) <= cap, (name, len(text))
        assert "Traceback" not in text


def fill(root: Path) -> None:
    """Fill the filesystem of *root* to the last byte."""
    with open(root / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    for n in range(1000):  # and its last inodes' worth of small space
        try:
            (root / f"filler{n}").write_bytes(b"x" * 512)
        except OSError:
            break


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_a_full_cache_filesystem_leaves_the_log_stuck_and_the_mount_serving(
    data: Path, mnt: Path, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "small", "4m") as small:
        cache = small / "cache"
        try:
            done = mount_daemon(
                data, mnt, cache, "--log-level", "debug", "--min-free", "0",
                **{ROTATE_ENV: "3000,2"},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            fill(small)
            for _ in range(2):
                for p in sorted(data.iterdir()):
                    assert pread_direct(mnt / p.name, 0, SIZE + 1) == p.read_bytes(), p.name
            os.kill(daemon_pid(cache), signal.SIGUSR1)
            assert run_cachefs("stats", mnt).returncode == 0
            unmounted = run_cachefs("unmount", mnt, "--timeout", "30")
            assert unmounted.returncode == 0, unmounted.stderr
            assert mount_at(mnt) is None
        finally:
            if mount_at(mnt) is not None:
                run_cachefs("unmount", mnt)
                lazy_unmount(mnt)


def helper(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run mount.cachefs as mount(8) would."""
    return subprocess.run(
        [str(HELPER), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


#: Command lines of the helper (S: source, M: mount point, C: a cache dir):
#: each either mounts, with its cache where it says, or is refused.
HELPER_CASES = {
    "spaces": (["S", "M", "-o", "cache-dir=C/with space"], "C/with space"),
    "equals": (["S", "M", "-o", "cache-dir=C/a=b"], "C/a=b"),
    # mount(8) lets a value be quoted (-o context="..."): a helper that kept
    # the quotes made the cache dir in the current directory, in a directory
    # named `"`, and the mount succeeded.
    "quoted": (["S", "M", "-o", 'cache-dir="C/q"'], "C/q"),
    "quoted-comma": (["S", "M", "-o", 'cache-dir="C/a,b"'], "C/a,b"),
    "flag-with-value": (["S", "M", "-o", "cache-dir=C/c,read-only=yes"], None),
    "foreground": (["S", "M", "-o", "cache-dir=C/c,foreground"], None),
    "help": (["S", "M", "-o", "cache-dir=C/c,help"], None),
    "version": (["S", "M", "-o", "cache-dir=C/c,version"], None),
    "empty-list": (["S", "M", "-o", "", "-o", "cache-dir=C/c"], "C/c"),
    "twice": (["S", "M", "-o", "cache-dir=C/c", "-o", "read-only,log-level=info"], "C/c"),
    "dashdash-before-o": (["--", "S", "M", "-o", "cache-dir=C/c"], None),
    "dashdash-after-o": (["-o", "cache-dir=C/c", "--", "S", "M"], "C/c"),
    # relative: the helper is run in the directory that holds them
    "source-dash": (["-o", "cache-dir=C/c", "--", "-src", "M"], "C/c"),
    "mountpoint-dash": (["-o", "cache-dir=C/c", "--", "S", "-mnt"], "C/c"),
    "value-is-a-flag": (["S", "M", "-o", "cache-dir=--foreground"], "--foreground"),
}


@pytest.mark.parametrize("case", list(HELPER_CASES))
def test_the_mount_helper_mounts_right_or_refuses_in_one_line(case: str, tmp_path: Path) -> None:
    args, cache = HELPER_CASES[case]
    cwd = tmp_path / "cwd"
    (cwd / "-src").mkdir(parents=True)
    (cwd / "-src" / "hello.txt").write_text("hello\n")
    (cwd / "-mnt").mkdir()
    source, mountpoint = cwd / "-src", cwd / "-mnt"
    names = {"S": str(source), "M": str(mountpoint)}
    given = [names.get(a, a).replace("C/", f"{tmp_path}/cache/") for a in args]
    before = set(os.listdir(cwd))
    done = helper(*given, cwd=cwd)
    try:
        assert "Traceback" not in done.stderr
        if done.returncode == 0:
            assert mount_at(mountpoint) is not None, (given, done.stdout, done.stderr)
            assert (mountpoint / "hello.txt").read_text() == "hello\n"
            assert cache is not None, f"mounted what must be refused: {given}"
            where = Path(cache.replace("C/", f"{tmp_path}/cache/"))
            if not where.is_absolute():
                where = cwd / where
            assert (where / "lock").exists(), (where, sorted(cwd.rglob("lock")))
            assert set(os.listdir(cwd)) - before <= {where.name}, os.listdir(cwd)
        else:
            assert done.returncode in (1, 32), (done.returncode, done.stderr)
            assert len(done.stderr.splitlines()) == 1, done.stderr
            assert "error:" in done.stderr
            assert mount_at(mountpoint) is None
    finally:
        if mount_at(mountpoint) is not None:
            unmounted = run_cachefs("unmount", mountpoint)
            lazy_unmount(mountpoint)
            assert unmounted.returncode == 0, unmounted.stderr


@contextmanager
def notify_socket(kind: str, tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """A $NOTIFY_SOCKET value of *kind*, and an event set when, NOTIFY_DEADLINE
    seconds on, what is behind it is closed: that wakes a daemon blocked
    sending to it.  Leaving the block stops the clock."""
    with ExitStack() as stack:
        s: socket.socket | None = None
        if kind == "missing":
            address = str(tmp_path / "no" / "such.sock")
        elif kind == "too-long":
            address = "/" + "x" * 300
        elif kind == "abstract-empty":
            address = "@"
        elif kind == "stream":
            address = str(tmp_path / "stream.sock")
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            s.bind(address)
            s.listen()
        else:  # "full": a datagram socket nobody reads, its queue full
            address = str(tmp_path / "full.sock")
            s = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            s.bind(address)
            w = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
            w.setblocking(False)
            try:
                while True:
                    w.sendto(b"x", address)
            except BlockingIOError:
                pass
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            if s is not None:
                s.close()

        timer = threading.Timer(NOTIFY_DEADLINE, expire)
        timer.start()
        stack.callback(timer.cancel)
        yield address, expired


@NATIVE_ONLY
@pytest.mark.parametrize("kind", ["missing", "too-long", "abstract-empty", "stream", "full"])
def test_a_foreground_mount_serves_whatever_notify_socket_says(
    kind: str, mount: MountFactory, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with notify_socket(kind, tmp_path) as (address, expired):
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        m = mount(src)
        monkeypatch.delenv("NOTIFY_SOCKET")
        got = pread_direct(m / "hello.txt", 0)
        # Kind "full": READY=1 is sent from the mount's loop; a blocking send
        # to a socket whose queue is full hung the mounted daemon, and every
        # request on it (a stat of the mount point too), until the socket went.
        assert not expired.is_set(), "the mount hung until NOTIFY_SOCKET was closed"
        assert got == b"hello\n"
    m.unmount()
    assert "Traceback" not in m.log_text()
