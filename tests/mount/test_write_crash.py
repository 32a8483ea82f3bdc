"""kill -9 of the mount daemon while processes write through it, then a remount.

The promise under test (issue 22, Durability): once write or fsync returned,
a kill -9 of the daemon loses nothing; the next mount of the same cache dir
flushes what the killed one left, and then the source holds every byte
acknowledged, no torn object, no lost file, no wrong byte.

Each seeded round mounts a source (a directory, or a bucket of a real S3
server), runs fio (random 4k writes with fsyncs, as load) and the writer of
tests/writecrash.py (seeded writes, truncations and fsyncs to a few files,
logging what each call answered), kills the daemon at a seeded point (after
K acknowledged operations, anywhere or while the writer waits in fsync),
mounts the same cache dir again and waits until it flushed what was left.
Then every file of the writer in the source must be a state its
acknowledged operations allow (writecrash.History), every block fio wrote
its pattern or a hole, nothing else in the source (no conflict copy: nobody
else changed it).  The seed, the source and the FUSE transport are in the
test id; a failing round runs again alone with ``-k seed07``.  CI=true runs
the first CI_ROUNDS rounds, otherwise all ROUNDS; CACHEFS_WRITE_CRASH_ROUNDS=N
runs the first N.

Then the deterministic cases: fsync then kill; writes without fsync then
kill; a flush cut short by the kill (the backend slowed down with
--throttle so that the kill lands in it); a daemon stopped (SIGSTOP) while a
writer waits on it, then killed: the writer gets an error, never a hang.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pytest
from conftest import EXIT_DEADLINE, FUSE_TRANSPORTS, MountFactory, wait_for
from writecrash import DEAD_MOUNT, PAGE, History, Spec, initial, written

from backends.s3names import DIR_MARKER
from backends.trace import read_trace

if TYPE_CHECKING:
    from conftest import Mount
    from s3server import MotoServer

pytest_plugins = ["s3server"]

needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
WRITER = Path(__file__).resolve().parent.parent / "writecrash.py"
ROUNDS = 20
CI_ROUNDS = 3
_rounds_env = os.environ.get("CACHEFS_WRITE_CRASH_ROUNDS")
RUN_ROUNDS = int(_rounds_env or (CI_ROUNDS if os.environ.get("CI") == "true" else ROUNDS))
#: How long a round may take to reach its kill point, and the next mount to flush.
KILL_DEADLINE = 60.0
FLUSH_DEADLINE = 60.0
#: fio's writes: every block it writes holds this pattern.
FIO_PATTERN = bytes.fromhex("5a5aa5a5")
FIO_BLOCK = FIO_PATTERN * (PAGE // len(FIO_PATTERN))
FIO_FILE = "fio/load.0.0"
LATER = ("--write-back-delay", "3600")


# -- sources, read directly (not through the mount) -----------------------------------


class Source(Protocol):
    url: str
    options: tuple[str, ...]

    def put(self, name: str, data: bytes) -> None: ...
    def read(self, name: str) -> bytes | None: ...
    def names(self) -> set[str]:
        """The files it holds (not directories, nor S3's directory markers)."""
        ...


class LocalDir:
    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.root = root
        self.url = str(root)
        self.options: tuple[str, ...] = ()

    def put(self, name: str, data: bytes) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        (self.root / name).write_bytes(data)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def names(self) -> set[str]:
        return {
            os.path.relpath(os.path.join(d, f), self.root)
            for d, _, files in os.walk(self.root)
            for f in files
        }


class Bucket:
    def __init__(self, server: MotoServer) -> None:
        self.server = server
        self.bucket = server.new_bucket()
        self.url = f"s3://{self.bucket}"
        self.options: tuple[str, ...] = ("--s3-endpoint", server.endpoint)

    def put(self, name: str, data: bytes) -> None:
        self.server.put(self.bucket, name, data)

    def read(self, name: str) -> bytes | None:
        try:
            body = self.server.admin.get_object(Bucket=self.bucket, Key=name)["Body"]
        except self.server.admin.exceptions.NoSuchKey:
            return None
        data: bytes = body.read()
        return data

    def names(self) -> set[str]:
        pages = self.server.admin.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        keys = {o["Key"] for p in pages for o in p.get("Contents", [])}
        return {k for k in keys if not k.endswith("/") and k.rpartition("/")[2] != DIR_MARKER}


def make_source(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Source:
    if kind == "s3":
        return Bucket(request.getfixturevalue("s3_server"))
    return LocalDir(tmp_path / "src")


def differs(got: bytes | None, want: bytes) -> str | None:
    """None if *got* is *want*; else where it is not (a short message, not a dump)."""
    if got == want:
        return None
    if got is None:
        return f"missing, {len(want)} bytes expected"
    at = next((i for i, (x, y) in enumerate(zip(got, want, strict=False)) if x != y), None)
    if at is None:
        return f"{len(got)} bytes, {len(want)} expected"
    return f"wrong bytes from {at} (page {at // PAGE}) of {len(want)}"


def flushed(m: Mount) -> bool:
    stats = m.stats()
    return stats["dirty_files"] == 0 and stats["flushing_files"] == 0


def wait_flushed(m: Mount) -> None:
    """The next mount flushes what the killed one left, unasked."""
    wait_for("the next mount flushes the changes left", lambda: flushed(m), FLUSH_DEADLINE)


# -- processes writing through the mount ----------------------------------------------


class LogTail:
    """The writer's log as it grows: acknowledged operations, the last line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.acks = 0
        self.last = ""
        self._offset = 0
        self._partial = ""

    def poll(self) -> None:
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self.acks += line.startswith("A ")
            self.last = line

    def in_fsync(self) -> bool:
        return self.last.startswith("B ") and self.last.split()[2] == "fsync"


def start_writer(spec: Spec, tmp: Path) -> subprocess.Popen[bytes]:
    with open(tmp / "writer.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, str(WRITER), spec.dumps()],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )


def start_fio(directory: Path, size: int, tmp: Path) -> subprocess.Popen[bytes]:
    with open(tmp / "fio.out", "wb") as out:
        return subprocess.Popen(
            ["fio", "--name=load", f"--directory={directory}", "--rw=randwrite", "--bs=4k"]
            + [f"--size={size}", "--fsync=16", f"--buffer_pattern=0x{FIO_PATTERN.hex()}"]
            + ["--ioengine=psync", "--fallocate=none", "--time_based", "--runtime=600"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )


def size_of(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def blocked_in_fuse(pid: int) -> bool:
    """Whether process *pid* waits in the kernel for an answer of a FUSE daemon."""
    try:
        return "fuse" in Path(f"/proc/{pid}/stack").read_text()
    except OSError:
        return False


def ended(proc: subprocess.Popen[bytes], what: str, problems: list[str]) -> None:
    """*proc* must end by itself after the kill: an error, never a hang."""
    try:
        proc.wait(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        problems.append(f"{what} still runs {EXIT_DEADLINE:g} s after the kill: it hangs")
        proc.kill()
        proc.wait()


def fio_problems(source: Source, seen: int | None) -> list[str]:
    """fio's file: there if fio was seen writing it, at least the size then
    seen, every block its pattern or a hole."""
    data = source.read(FIO_FILE)
    if data is None:
        return [] if seen is None else [f"{FIO_FILE}: lost ({seen} bytes seen before the kill)"]
    problems = [] if seen is None or len(data) >= seen else [f"{FIO_FILE}: {len(data)} < {seen}"]
    for at in range(0, len(data), PAGE):
        block = data[at : at + PAGE]
        if block != FIO_BLOCK[: len(block)] and block.strip(b"\0"):
            problems.append(f"{FIO_FILE}: wrong bytes in the block at {at}")
            break
    return problems


# -- one round ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """When to kill: after *after* acknowledged operations of the writer,
    at once or (*in_fsync*) once it is in an fsync; *stop*: SIGSTOP the
    daemon first and kill it once the writer waits on it."""

    after: int
    in_fsync: bool = False
    stop: bool = False


@dataclass
class Outcome:
    history: History
    problems: list[str] = field(default_factory=list)
    #: What the source holds that neither process made (conflict copies...).
    extra: set[str] = field(default_factory=set)


def writer_files(rnd: random.Random, source: Source, seed: int) -> dict[str, int | None]:
    """The writer's files: some new, some in the source already (put there now)."""
    files: dict[str, int | None] = {"new0": None, "new1": None, "sub/new2": None}
    for name in ("old0", "sub/old1", "old2"):
        size = rnd.choice([0, 1, PAGE - 1, 100_000, 1 << 20])
        files[name] = size
        source.put(name, initial(seed, name, size))
    return files


def crash_round(
    factory: MountFactory,
    source: Source,
    options: tuple[str, ...],
    spec: Spec,
    kill: Kill,
    tmp: Path,
    fio_size: int | None = None,
) -> Outcome:
    """Write through a mount, kill it as *kill* says, mount the same cache
    dir again, wait for the flush and compare the source with the writer's log."""
    cache = tmp / "cache"
    m = factory(source.url, *source.options, *options, cache_dir=cache)
    spec.root = str(m.mountpoint)
    problems: list[str] = []
    procs = []
    fio_seen: int | None = None
    try:
        if fio_size is not None:
            (m / "fio").mkdir()
            procs.append(("fio", start_fio(m / "fio", fio_size, tmp)))
        writer = start_writer(spec, tmp)
        procs.append(("the writer", writer))
        tail = LogTail(Path(spec.log))
        deadline = time.monotonic() + KILL_DEADLINE
        fio_ready = fio_size is None
        polls = 0
        while not (
            fio_ready and tail.acks >= kill.after and (tail.in_fsync() or not kill.in_fsync)
        ):
            if writer.poll() is not None:
                problems.append(f"the writer stopped before the kill: {tail.last}")
                break
            if time.monotonic() > deadline:
                problems.append(f"no kill point in {KILL_DEADLINE:g} s: {tail.acks} acks")
                break
            time.sleep(0.001)
            tail.poll()
            polls += 1
            if not fio_ready and polls % 20 == 0:  # fio's file laid out: it writes at random
                fio_ready = size_of(m / FIO_FILE) == fio_size
        if fio_size is not None:
            fio_seen = size_of(m / FIO_FILE)
        if kill.stop:
            m.proc.send_signal(signal.SIGSTOP)
            wait_for("the writer waits on the stopped daemon", lambda: blocked_in_fuse(writer.pid))
        m.kill()
        for what, proc in procs:
            ended(proc, what, problems)
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    history = History.read(spec)
    if history.error not in DEAD_MOUNT:
        err = (tmp / "writer.err").read_text(errors="replace")
        problems.append(f"the writer ended with errno {history.error}, not ENOTCONN: {err}")
    outcome = Outcome(history, problems + history.problems)
    m = factory(source.url, *source.options, *options, cache_dir=cache)
    wait_flushed(m)
    check_source(source, history, outcome)
    if fio_size is not None:
        outcome.problems += fio_problems(source, fio_seen)
    for name in sorted(history.existing()):  # the mount serves what the source holds
        if (m / name).read_bytes() != source.read(name):
            outcome.problems.append(f"{name}: the mount and the source differ")
    m.unmount()
    return outcome


def check_source(source: Source, history: History, outcome: Outcome) -> None:
    for name in sorted(history.acked):
        why = history.explain(name, source.read(name))
        if why is not None:
            outcome.problems.append(why)
    outcome.extra = source.names() - set(history.acked) - {FIO_FILE}


# -- the seeded rounds --------------------------------------------------------------------


@dataclass(frozen=True)
class Round:
    seed: int
    source: str
    fuse: str

    def __str__(self) -> str:
        return f"{self.source}-{self.fuse}-seed{self.seed:02d}"


ROUND_LIST = [
    Round(seed, "s3" if seed % 3 == 0 else "local", FUSE_TRANSPORTS[seed % 2])
    for seed in range(1, RUN_ROUNDS + 1)
]


@needs_fuse
@pytest.mark.parametrize("r", ROUND_LIST, ids=str)
def test_kill_9_while_writing_loses_no_acknowledged_byte(
    r: Round, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    rnd = random.Random(r.seed)
    source = make_source(r.source, request, tmp_path)
    options: tuple[str, ...] = ("--write-back-delay", rnd.choice(["0", "0.2", "5"]))
    if rnd.random() < 0.3:
        options += ("--max-dirty", "1M")
    kill = Kill(after=rnd.randrange(50, 1500), in_fsync=rnd.random() < 0.5)
    spec = Spec("", str(tmp_path / "writer.log"), r.seed, writer_files(rnd, source, r.seed))
    factory = MountFactory(tmp_path, fuse=r.fuse)
    try:
        outcome = crash_round(
            factory, source, options, spec, kill, tmp_path, (1 if r.source == "s3" else 2) << 20
        )
    finally:
        factory.close()
    context = f"{options}, {kill}, pending {outcome.history.pending}"
    assert outcome.problems == [], context
    assert outcome.extra == set(), context
    assert outcome.history.acks >= kill.after


# -- the deterministic cases ------------------------------------------------------------


@pytest.fixture
def native(tmp_path: Path) -> Iterator[MountFactory]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (FUSE) on this machine")
    factory = MountFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()


def new_bytes(name: str, n: int) -> bytes:
    return initial(99, name, n)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_fsync_puts_the_bytes_in_the_source_and_kill_9_keeps_them(
    kind: str, native: MountFactory, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source = make_source(kind, request, tmp_path)
    old = new_bytes("old", 200_000)
    source.put("old.bin", old)
    cache = tmp_path / "cache"
    m = native(source.url, *source.options, *LATER, cache_dir=cache)
    data = new_bytes("new", 300_001)
    with open(m / "new.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        assert differs(source.read("new.bin"), data) is None  # fsync returned: the source has it
    expected = old[: 10 * PAGE] + b"x" * PAGE + old[11 * PAGE :]
    fd = os.open(m / "old.bin", os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * PAGE, 10 * PAGE)
        os.fsync(fd)
        assert differs(source.read("old.bin"), expected) is None
        m.kill()
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the mount died under it
            assert e.errno in DEAD_MOUNT
    m = native(source.url, *source.options, *LATER, cache_dir=cache)
    wait_flushed(m)
    assert differs(source.read("new.bin"), data) is None
    assert differs(source.read("old.bin"), expected) is None
    assert differs((m / "new.bin").read_bytes(), data) is None
    assert differs((m / "old.bin").read_bytes(), expected) is None
    assert source.names() == {"new.bin", "old.bin"}
    m.unmount()


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_writes_without_fsync_are_flushed_by_the_next_mount(
    kind: str, native: MountFactory, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """write() returned, no fsync, the write-back delay an hour away: the
    kill leaves it all in the cache dir and the next mount sends it."""
    source = make_source(kind, request, tmp_path)
    before = {"old.bin": new_bytes("old", 300_000), "cut.bin": new_bytes("cut", 100_000)}
    for name, data in before.items():
        source.put(name, data)
    cache = tmp_path / "cache"
    m = native(source.url, *source.options, *LATER, cache_dir=cache)
    want = {name: bytearray(data) for name, data in before.items()}
    want["new.bin"] = bytearray(new_bytes("new", 70_000))
    (m / "new.bin").write_bytes(want["new.bin"])
    (m / "sub").mkdir()
    want["sub/new.bin"] = bytearray(b"in a new directory\n")
    (m / "sub/new.bin").write_bytes(want["sub/new.bin"])
    with open(m / "old.bin", "r+b") as f:  # two runs in the middle, and past the end
        for at, n in [(3 * PAGE + 5, 100), (30 * PAGE, 2 * PAGE), (300_000, 5000)]:
            chunk = written(7, at, n)
            f.seek(at)
            f.write(chunk)
            want["old.bin"][at : at + n] = chunk
    with open(m / "cut.bin", "r+b") as f:  # cut, then a write past a hole
        f.truncate(5000)
        f.seek(20_000)
        f.write(b"after a hole")
    want["cut.bin"] = want["cut.bin"][:5000] + bytes(15_000) + b"after a hole"
    kept_open = os.open(m / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    want["open.bin"] = bytearray(new_bytes("open", 12_345))
    assert os.write(kept_open, want["open.bin"]) == len(want["open.bin"])
    try:
        assert all(source.read(n) == data for n, data in before.items())  # nothing flushed yet
        assert source.read("new.bin") is None
        m.kill()
    finally:
        try:
            os.close(kept_open)
        except OSError as e:
            assert e.errno in DEAD_MOUNT
    m = native(source.url, *source.options, *LATER, cache_dir=cache)
    wait_flushed(m)
    expected = {n: bytes(data) for n, data in want.items()}
    assert {n: differs(source.read(n), data) for n, data in expected.items()} == dict.fromkeys(
        expected
    )
    assert source.names() == set(want)
    for name, data in expected.items():
        assert differs((m / name).read_bytes(), data) is None, name
    m.unmount()


@pytest.mark.parametrize("case", ["local-in-place", "local-new", "s3"])
def test_a_flush_cut_short_by_kill_9_is_finished_by_the_next_mount(
    case: str, native: MountFactory, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The kill lands in a flush (--throttle holds each backend call up, so
    it lands there surely): the next mount sends the file again, whole, and
    no conflict is made of the flush's own work.

    local-in-place: two runs of an existing file, the kill after the first
    was written in place; local-new: a new file, killed once the backend put
    it in place but before the cache heard of it; s3: an object replaced,
    killed once the PUT was done but before the cache heard of it.
    """
    source = make_source("s3" if case == "s3" else "local", request, tmp_path)
    old = new_bytes("old", 256 << 10)
    source.put("f.bin", old)
    cache = tmp_path / "cache"
    trace = tmp_path / "trace"
    slow = ("--throttle", "300,0.25", "--trace", trace, *LATER)
    m = native(source.url, *source.options, *slow, cache_dir=cache)
    name = "new.bin" if case == "local-new" else "f.bin"
    want = bytearray(new_bytes("new", 200_000)) if case == "local-new" else bytearray(old)
    fd = os.open(m / name, os.O_RDWR | os.O_CREAT, 0o644)
    if case == "local-new":
        os.write(fd, want)
    else:
        for page in (0, 50):
            chunk = written(5, page, PAGE)
            os.pwrite(fd, chunk, page * PAGE)
            want[page * PAGE : (page + 1) * PAGE] = chunk
    expected = bytes(want)
    errors: list[OSError] = []

    def fsync() -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            errors.append(e)

    syncer = threading.Thread(target=fsync)
    syncer.start()
    try:
        if case == "local-in-place":  # the first run is in place, the second waits
            wait_for(
                "the first WriteData call",
                lambda: bool(read_trace(trace, "write")),
            )
            torn = source.read(name)
            assert torn is not None and torn[:PAGE] == expected[:PAGE]  # new
            assert torn[50 * PAGE : 51 * PAGE] == old[50 * PAGE : 51 * PAGE]  # still old
        else:  # the backend has it all; the throttle holds the answer up
            wait_for("the flush reaching the source", lambda: source.read(name) == expected)
        m.kill()
        syncer.join(EXIT_DEADLINE)
        assert not syncer.is_alive(), "fsync hangs after the kill"
        assert [e.errno in DEAD_MOUNT for e in errors] == [True]
    finally:
        try:
            os.close(fd)
        except OSError as e:
            assert e.errno in DEAD_MOUNT
    m = native(source.url, *source.options, *LATER, cache_dir=cache)
    wait_flushed(m)
    assert differs(source.read(name), expected) is None
    assert differs((m / name).read_bytes(), expected) is None
    assert source.names() == {"f.bin", name}, "a conflict copy of the flush's own work"
    assert m.stats()["write_conflicts"] == 0
    m.unmount()


@needs_fuse
@pytest.mark.parametrize("fuse", FUSE_TRANSPORTS)
def test_a_writer_waiting_on_a_stopped_daemon_gets_an_error_when_it_is_killed(
    fuse: str, tmp_path: Path
) -> None:
    """SIGSTOP while the writer waits in fsync (the backend slowed down so
    that it does), then kill -9: the writer's fsync fails (ENOTCONN), it
    does not hang; the next mount flushes what was acknowledged."""
    source = LocalDir(tmp_path / "src")
    files: dict[str, int | None] = {"new0": None, "new1": None}
    spec = Spec("", str(tmp_path / "writer.log"), 4242, files)
    factory = MountFactory(tmp_path, fuse=fuse)
    try:
        kill = Kill(after=12, in_fsync=True, stop=True)
        options = ("--throttle", "100,4", *LATER)
        outcome = crash_round(factory, source, options, spec, kill, tmp_path)
    finally:
        factory.close()
    assert outcome.problems == []
    assert outcome.extra == set()
    pending = outcome.history.pending
    assert pending is not None and pending.kind == "fsync"
    assert outcome.history.error in DEAD_MOUNT
