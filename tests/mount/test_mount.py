"""The mount, for real: a local source served through FUSE in a subprocess.

Reads through the mount are compared with the source; --trace shows what
reached the backend; --faults makes the backend fail on demand.
"""

from __future__ import annotations

import errno
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import trio
from conftest import (
    FUSE_TRANSPORTS,
    NATIVE_ONLY,
    cached_pages,
    evict_page_cache,
    pread_direct,
    sha256,
)

from backends.trace import read_trace
from cachefs.contract import DirEntry, FileAttrs, FileKind
from cachefs.control.mounts import mount_at
from cachefs.engine import CacheConfig
from cachefs.errors import FileQuarantined, NotFound
from cachefs.fs.inodes import ROOT_INODE, Namespace, NewInode
from cachefs.fs.operations import Operations
from cachefs.fuse import FUSEError
from cachefs.fuse.native.session import MAX_BACKGROUND

if TYPE_CHECKING:
    from conftest import Mount, MountFactory

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
EXIT_DEADLINE = 30.0
KB64 = 64 * 1024
SMALL_SIZES = {
    "empty": 0,
    "one": 1,
    "block-1": KB64 - 1,
    "block": KB64,
    "block+1": KB64 + 1,
    "10blocks+7": 10 * KB64 + 7,
}
BIG = 64 << 20
FUSECTL = Path("/sys/fs/fuse/connections")


def write_rules(path: Path, rules: list[dict[str, object]]) -> None:
    """Replace the faults file atomically, as the faulty backend expects."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with every interesting size, nested dirs, symlinks and a big dir."""
    root = tmp_path_factory.mktemp("source")
    for name, size in SMALL_SIZES.items():
        (root / f"{name}.bin").write_bytes(os.urandom(size))
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "top.txt").write_text("top\n")
    (root / "a" / "b" / "c" / "deep.txt").write_text("deep\n" * 1000)
    (root / "a" / "b" / "c" / "empty-dir").mkdir()
    os.symlink("b/c/deep.txt", root / "a" / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("a/b", root / "dir-link")
    many = root / "many"
    many.mkdir()
    for i in range(2000):
        (many / f"entry-{i:04d}").write_text(str(i))
    return root


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    (root / "big.bin").write_bytes(os.urandom(BIG))
    return root


def all_files(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.is_symlink()
    )


# -- what reads return ---------------------------------------------------------------


def test_every_size_reads_back_exactly(mount: MountFactory, source: Path) -> None:
    m = mount(source)
    for name in SMALL_SIZES:
        assert sha256(m / f"{name}.bin") == sha256(source / f"{name}.bin"), name
        assert (m / f"{name}.bin").stat().st_size == SMALL_SIZES[name]
    # Unaligned reads served from the cache, bypassing the kernel's pages.
    data = (source / "10blocks+7.bin").read_bytes()
    for offset, length in [
        (0, 1),
        (KB64 - 3, 10),
        (5 * KB64 + 100, 3 * KB64),
        (len(data) - 5, 100),
    ]:
        got = pread_direct(m / "10blocks+7.bin", offset, length)
        assert got == data[offset : offset + length], (offset, length)


def test_64_mib_file_with_default_block_size(mount: MountFactory, big_source: Path) -> None:
    want = sha256(big_source / "big.bin")
    evict_page_cache(big_source)
    m = mount(big_source, block_size=None)
    assert sha256(m / "big.bin") == want
    # Read from the disk straight into the fetch buffers: the source's
    # bytes are not kept in RAM beside the cache's.
    assert cached_pages(big_source / "big.bin") == 0
    with open(big_source / "big.bin", "rb") as f:
        for offset in (0, (1 << 20) - 1, 17 * (1 << 20) + 12345, BIG - 4096):
            f.seek(offset)
            assert pread_direct(m / "big.bin", offset, 8192) == f.read(8192)


def test_readdir_of_2000_entries(mount: MountFactory, source: Path) -> None:
    m = mount(source)
    names = os.listdir(m / "many")
    assert sorted(names) == sorted(os.listdir(source / "many"))
    assert len(names) == 2000
    inodes = {e.name: e.inode() for e in os.scandir(m / "many")}
    assert len(set(inodes.values())) == 2000
    # Inode numbers are stable for the life of the mount.
    for name in ("entry-0000", "entry-1234", "entry-1999"):
        assert os.stat(m / "many" / name).st_ino == inodes[name]
        assert (m / "many" / name).read_text() == str(int(name[6:]))


def test_nested_directories_and_symlinks(mount: MountFactory, source: Path) -> None:
    m = mount(source)
    walked = {
        os.path.relpath(d, m.mountpoint): (sorted(dirs), sorted(files))
        for d, dirs, files in os.walk(m.mountpoint)
    }
    expected = {
        os.path.relpath(d, source): (sorted(dirs), sorted(files))
        for d, dirs, files in os.walk(source)
    }
    assert walked == expected
    assert (m / "a/b/c/deep.txt").read_text() == "deep\n" * 1000
    for link in ("a/rel-link", "abs-link", "dir-link"):
        assert (m / link).is_symlink()
        assert os.readlink(m / link) == os.readlink(source / link)
    assert (m / "a/rel-link").read_text() == "deep\n" * 1000
    assert sorted(os.listdir(m / "dir-link")) == ["c"]
    assert os.listdir(m / "a/b/c/empty-dir") == []
    with pytest.raises(FileNotFoundError):
        os.stat(m / "a/missing")


def test_read_only_and_other_operations(mount: MountFactory, source: Path) -> None:
    m = mount(source, "--read-only")
    for attempt in (
        lambda: os.open(m / "one.bin", os.O_RDWR),
        lambda: os.open(m / "new.txt", os.O_WRONLY | os.O_CREAT),
        lambda: os.mkdir(m / "d"),
        lambda: os.unlink(m / "one.bin"),
        lambda: os.rename(m / "one.bin", m / "two.bin"),
        lambda: os.symlink("x", m / "l"),
        lambda: os.chmod(m / "one.bin", 0o777),
        lambda: os.truncate(m / "one.bin", 0),
        lambda: os.setxattr(m / "one.bin", "user.x", b"1"),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    for path in (m / "one.bin", m.mountpoint):  # answered ENOSYS: "not supported"
        for name in ("user.x", "security.selinux"):
            with pytest.raises(OSError) as info:
                os.getxattr(path, name)
            assert info.value.errno == errno.EOPNOTSUPP, name
        with pytest.raises(OSError) as info:  # the kernel answers: no ACL
            os.getxattr(path, "system.posix_acl_access")
        assert info.value.errno == errno.ENODATA
    assert os.listxattr(m / "one.bin") == []
    st = os.statvfs(m.mountpoint)
    assert st.f_bsize == KB64 and st.f_blocks > 0


def test_a_changed_source_file_is_served_anew(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    path = src / "v.txt"
    path.write_bytes(b"one")
    m = mount(src, "--ttl", "0")
    assert (m / "v.txt").read_bytes() == b"one"
    assert (m / "v.txt").read_bytes() == b"one"  # from the kernel's pages
    path.write_bytes(b"two, longer")
    assert (m / "v.txt").read_bytes() == b"two, longer"
    # Same size, new mtime: the kernel's cached pages must go too.
    path.write_bytes(b"TWO, LONGER")
    os.utime(path, ns=(0, 1_000_000_000))
    assert (m / "v.txt").read_bytes() == b"TWO, LONGER"


def test_throttled_and_traced_reads_back_exactly(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.jsonl"
    m = mount(source, "--throttle", "1,1000", "--trace", trace)
    for name in SMALL_SIZES:
        assert sha256(m / f"{name}.bin") == sha256(source / f"{name}.bin"), name
    assert sum(r["bytes_read"] for r in read_trace(trace)) >= sum(SMALL_SIZES.values())
    assert "TraceBackend(ThrottledBackend(LocalBackend(" in m.log_text()


# -- the kernel's side of the mount ------------------------------------------------------


@pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0, reason="needs /dev/fuse and root"
)
@pytest.mark.parametrize("fuse", FUSE_TRANSPORTS)
def test_kernel_readahead_and_max_background_are_set(
    cachefs: Cachefs, source: Path, tmp_path: Path, fuse: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # In the background: `cachefs mount` returns once the mount is ready and tuned.
    done = cachefs(
        "mount", source, mnt, "--cache-dir", tmp_path / "c", "--readahead-kb", 2048, "--fuse", fuse
    )
    try:
        assert done.returncode == 0, done.stderr
        dev = os.stat(mnt).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        assert bdi.read_text().strip() == "2048"
        assert (mnt / "one.bin").read_bytes() == (source / "one.bin").read_bytes()
        assert bdi.read_text().strip() == "2048"  # it sticks
        # Set in the answer to the kernel's INIT; fusectl shows it.
        if not FUSECTL.joinpath(str(dev)).is_dir():
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(FUSECTL)], check=False)
        connection = FUSECTL / str(dev)
        assert (connection / "max_background").read_text().strip() == str(MAX_BACKGROUND)
        assert cachefs("unmount", mnt).returncode == 0
    finally:
        if mount_at(mnt) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


# -- persistence ----------------------------------------------------------------------


def stop_by_unmount(m: Mount) -> None:
    m.unmount()


def stop_by_sigterm(m: Mount) -> None:
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()


def stop_by_sigint(m: Mount) -> None:
    m.proc.send_signal(signal.SIGINT)
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()


def stop_by_fusermount(m: Mount) -> None:
    subprocess.run(["fusermount3", "-u", str(m.mountpoint)], check=True)
    assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()


@pytest.mark.parametrize(
    "stop", [stop_by_unmount, stop_by_sigterm, stop_by_sigint, stop_by_fusermount]
)
def test_remount_serves_every_byte_from_the_cache(
    mount: MountFactory, source: Path, tmp_path: Path, stop: object
) -> None:
    files = [f for f in all_files(source) if not f.startswith("many/")]
    cache_dir = tmp_path / "shared-cache"
    first = mount(source, cache_dir=cache_dir)
    for f in files:
        sha256(first / f)
    stop(first)  # type: ignore[operator]
    assert mount_at(first.mountpoint) is None

    trace = tmp_path / "trace.jsonl"
    second = mount(source, "--trace", trace, cache_dir=cache_dir)
    for f in files:
        assert sha256(second / f) == sha256(source / f), f
    second.unmount()
    assert read_trace(trace) == []


def test_a_crashed_mount_is_detached_and_its_cache_reused(
    mount: MountFactory, source: Path, tmp_path: Path, cachefs: Cachefs
) -> None:
    first = mount(source)
    expected = sha256(source / "10blocks+7.bin")
    assert sha256(first / "10blocks+7.bin") == expected
    first.proc.kill()
    first.proc.wait()
    assert (first.cache_dir / "control.sock").exists()  # left behind
    done = cachefs("unmount", first.mountpoint)
    assert done.returncode == 0, done.stderr
    assert mount_at(first.mountpoint) is None

    second = mount(source, cache_dir=first.cache_dir)  # the stale socket is replaced
    assert sha256(second / "10blocks+7.bin") == expected
    assert stats(cachefs, second)["source"] == str(source)


# -- result codes through the mount ------------------------------------------------------


@pytest.fixture
def faulty(mount: MountFactory, tmp_path: Path) -> tuple[Mount, Path, Path]:
    """A mount of 4 MiB files with an (empty) faults file; returns (mount, source, rules)."""
    src = tmp_path / "faulty-src"
    src.mkdir()
    for name in ("f.bin", "g.bin", "h.bin"):
        (src / name).write_bytes(os.urandom(4 << 20))
    rules = tmp_path / "rules.json"
    write_rules(rules, [])
    return mount(src, "--faults", rules, "--retries", "0"), src, rules


def expect_eio(path: Path, offset: int, length: int = KB64) -> None:
    with pytest.raises(OSError) as info:
        pread_direct(path, offset, length)
    assert info.value.errno == errno.EIO


def source_bytes(path: Path, offset: int, length: int = KB64) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def stats(cachefs: Cachefs, m: Mount) -> dict[str, object]:
    done = cachefs("stats", "--json", m.mountpoint)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_failure_gives_eio_and_nothing_sticks(
    faulty: tuple[Mount, Path, Path], cachefs: Cachefs
) -> None:
    m, src, rules = faulty
    write_rules(rules, [{"file": "f.bin", "result": "FAILURE"}])
    expect_eio(m / "f.bin", 3 << 20)
    assert pread_direct(m / "g.bin", 0, KB64) == source_bytes(src / "g.bin", 0)
    write_rules(rules, [])
    assert pread_direct(m / "f.bin", 3 << 20, KB64) == source_bytes(src / "f.bin", 3 << 20)
    assert stats(cachefs, m)["files_in_error"] == 0


def test_failure_is_retried(mount: MountFactory, tmp_path: Path, source: Path) -> None:
    rules = tmp_path / "rules.json"
    write_rules(rules, [{"file": "block+1.bin", "result": "FAILURE", "count": 1}])
    m = mount(source, "--faults", rules, "--retries", "1")
    assert sha256(m / "block+1.bin") == sha256(source / "block+1.bin")


def test_file_failure_latches_the_file_until_reset(
    faulty: tuple[Mount, Path, Path], cachefs: Cachefs
) -> None:
    m, src, rules = faulty
    cached = pread_direct(m / "f.bin", 0, KB64)
    assert cached == source_bytes(src / "f.bin", 0)
    write_rules(rules, [{"file": "f.bin", "result": "FILE_FAILURE"}])
    expect_eio(m / "f.bin", 3 << 20)
    assert pread_direct(m / "f.bin", 0, KB64) == cached  # cached parts stay readable
    assert pread_direct(m / "g.bin", 3 << 20) == source_bytes(src / "g.bin", 3 << 20)
    write_rules(rules, [])
    expect_eio(m / "f.bin", 3 << 20)  # latched: the backend is not asked
    assert stats(cachefs, m)["file_errors"] == ["f.bin"]

    done = cachefs("reset-file-errors", m / "f.bin")
    assert done.returncode == 0, done.stderr
    assert "f.bin" in done.stdout
    assert pread_direct(m / "f.bin", 3 << 20) == source_bytes(src / "f.bin", 3 << 20)
    assert stats(cachefs, m)["files_in_error"] == 0


def test_permanent_failure_serves_cached_data_until_reset(
    faulty: tuple[Mount, Path, Path], cachefs: Cachefs
) -> None:
    m, src, rules = faulty
    cached = pread_direct(m / "f.bin", 0, KB64)
    write_rules(rules, [{"file": "*", "result": "PERMANENT_FAILURE"}])
    expect_eio(m / "g.bin", 0)
    assert pread_direct(m / "f.bin", 0, KB64) == cached
    write_rules(rules, [])
    expect_eio(m / "h.bin", 0)  # latched: the backend is not asked
    assert stats(cachefs, m)["external_error"]

    done = cachefs("reset-external-error", m / "g.bin")
    assert done.returncode == 0, done.stderr
    assert pread_direct(m / "g.bin", 0) == source_bytes(src / "g.bin", 0)
    assert pread_direct(m / "h.bin", 0) == source_bytes(src / "h.bin", 0)
    assert stats(cachefs, m)["external_error"] is None


def test_recoverable_results_are_invisible_to_readers(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = {name: os.urandom(300_000) for name in ("partial", "modified", "local", "short")}
    for name, content in data.items():
        (src / name).write_bytes(content)
    rules = tmp_path / "rules.json"
    write_rules(
        rules,
        [
            {"file": "partial", "result": "PARTIAL", "max_bytes": 10_000},
            {"file": "modified", "result": "FILE_MODIFIED_EXTERNALLY", "count": 1},
            {"file": "local", "result": "FILE_MODIFIED_LOCALLY", "count": 1},
            {"file": "short", "eof": 200_000},
        ],
    )
    m = mount(src, "--faults", rules)
    for name in ("partial", "local"):
        assert (m / name).read_bytes() == data[name], name
    # RANGE_BEYOND_EOF: the reader gets zeros for the tail.
    assert (m / "short").read_bytes() == data["short"][:200_000] + bytes(100_000)
    # FILE_MODIFIED_EXTERNALLY: the version the reader opened is gone, so its
    # read fails (ESTALE) rather than go on in another; the next open reads
    # what the source has.
    with pytest.raises(OSError) as e:
        (m / "modified").read_bytes()
    assert e.value.errno == errno.ESTALE
    assert (m / "modified").read_bytes() == data["modified"]
    assert m.stats()["version_gone_reads"] >= 1


# -- the commands around a mount ---------------------------------------------------------


@NATIVE_ONLY
def test_stats_table_and_json(mount: MountFactory, source: Path, cachefs: Cachefs) -> None:
    m = mount(source)
    sha256(m / "10blocks+7.bin")
    table = cachefs("stats", m / "a" / "b")
    assert table.returncode == 0, table.stderr
    for label in ("source", "cache dir", "block size", "ReadData calls", "cached"):
        assert label in table.stdout
    assert str(source) in table.stdout
    numbers = stats(cachefs, m)
    assert numbers["source"] == str(source)
    assert numbers["cache_dir"] == str(m.cache_dir)
    assert numbers["block_size"] == KB64
    assert numbers["read_data_calls"] >= 1
    assert numbers["cached_bytes"] >= SMALL_SIZES["10blocks+7"]
    assert numbers["external_error"] is None


@pytest.mark.parametrize("options, disk_reads", [((), "io_uring"), (("--no-io-uring",), "threads")])
def test_hits_from_the_cache_disk_read_back_exactly(
    mount: MountFactory, source: Path, options: tuple[str, ...], disk_reads: str
) -> None:
    name = "10blocks+7.bin"
    size = SMALL_SIZES["10blocks+7"]
    m = mount(source, *options)
    assert sha256(m / name) == sha256(source / name)
    before = m.stats()
    evict_page_cache(m.cache_dir / "data")
    for offset in range(0, size, 4096):  # O_DIRECT: every read reaches cachefs
        assert pread_direct(m / name, offset, 4096) == source_bytes(source / name, offset, 4096)
    after = m.stats()
    assert after["disk_reads"] == disk_reads
    assert after["read_data_calls"] == before["read_data_calls"]  # hits, every one
    assert after["hit_bytes"] - before["hit_bytes"] == size
    m.unmount()


def test_concurrent_small_hits_from_the_cache_disk_read_back_exactly(
    mount: MountFactory, big_source: Path
) -> None:
    """Four readers at once: reads overlap in the ring (and go to its kernel workers)."""
    m = mount(big_source, block_size=None)
    name = "big.bin"
    size = (big_source / name).stat().st_size
    assert sha256(m / name) == sha256(big_source / name)
    before = m.stats()
    evict_page_cache(m.cache_dir / "data")
    expected = (big_source / name).read_bytes()
    rnd = random.Random(17)
    offsets = [rnd.randrange(size // 4096) * 4096 for _ in range(400)]
    bad: list[int] = []

    def reader(part: list[int]) -> None:
        fd = os.open(m / name, os.O_RDONLY | os.O_DIRECT)
        try:
            for offset in part:
                if os.pread(fd, 4096, offset) != expected[offset : offset + 4096]:
                    bad.append(offset)
        finally:
            os.close(fd)

    threads = [threading.Thread(target=reader, args=(offsets[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert bad == []
    after = m.stats()
    assert after["disk_reads"] == "io_uring"
    assert after["read_data_calls"] == before["read_data_calls"]
    m.unmount()


READER = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("reading", flush=True)
offset = 0
while True:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if not os.pread(fd, 1 << 20, offset):
        offset = 0
    offset += 1 << 20
"""


def test_unmount_with_an_active_reader_does_not_hang(
    mount: MountFactory, big_source: Path, cachefs: Cachefs
) -> None:
    m = mount(big_source, block_size=None)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(m / "big.bin")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert reader.stdout is not None
        ready, _, _ = select.select([reader.stdout], [], [], EXIT_DEADLINE)
        assert ready and reader.stdout.readline() == b"reading\n"
        done = cachefs("unmount", m.mountpoint, "--timeout", EXIT_DEADLINE, timeout=120)
        assert done.returncode == 0, done.stderr
        assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
        assert mount_at(m.mountpoint) is None
    finally:
        reader.kill()
        reader.wait()


def test_unmount_of_a_stopped_daemon_frees_its_blocked_readers(
    mount: MountFactory, big_source: Path, cachefs: Cachefs, tmp_path: Path
) -> None:
    m = mount(big_source, block_size=None)
    os.kill(m.proc.pid, signal.SIGSTOP)  # kill -STOP: the daemon answers nothing
    try:
        blocked = [
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for cmd in (["cat", str(m / "big.bin")], ["stat", str(m / "big.bin")])
        ]
        done = cachefs("unmount", m.mountpoint, "--timeout", "10", timeout=120)
        assert done.returncode == 0, done.stderr
        assert "aborted its FUSE connection" in done.stderr
        for proc in blocked:  # an error at once, not a wait for the daemon
            assert proc.wait(timeout=EXIT_DEADLINE) != 0
            assert proc.stderr is not None
            error = proc.stderr.read()
            assert b"connection abort" in error or b"not connected" in error, error
        assert mount_at(m.mountpoint) is None
        # Told to exit, and woken up to: it commits its index and leaves.
        assert m.proc.wait(timeout=EXIT_DEADLINE) == 0, m.log_text()
    finally:
        if m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGCONT)
    again = mount(big_source, cache_dir=m.cache_dir, block_size=None)
    assert sha256(again / "big.bin") == sha256(big_source / "big.bin")


# -- the inode table, in process -----------------------------------------------------------


class FakeCache:
    """What the namespace asks of the engine, over a dict of attributes."""

    def __init__(self, tree: dict[str, FileAttrs], ttl: float = 10.0) -> None:
        self.config = CacheConfig(ttl=ttl)
        self.cache_dir = Path("/")
        self.tree = tree
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}
        self.writable = False

    def shown_attrs(self, file_id: str) -> FileAttrs | None:
        return self.tree.get(file_id)

    async def getattr(self, file_id: str) -> FileAttrs:
        self.calls.append(("getattr", file_id))
        if file_id in self.fail:
            raise self.fail[file_id]
        if file_id not in self.tree:
            raise NotFound(file_id)
        return self.tree[file_id]

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        self.calls.append(("list_dir", dir_id))
        prefix = f"{dir_id}/" if dir_id else ""
        return [
            DirEntry(path[len(prefix) :], attrs)
            for path, attrs in self.tree.items()
            if path.startswith(prefix) and path and "/" not in path[len(prefix) :]
        ]


#: A connection whose kernel did not take passthrough.
NO_PASSTHROUGH = SimpleNamespace(passthrough=False)


def attrs(kind: FileKind = FileKind.FILE, version: str = "v1") -> FileAttrs:
    return FileAttrs(kind, size=3, mtime=0.0, version=version)


@pytest.fixture
def tree() -> dict[str, FileAttrs]:
    return {"": attrs(FileKind.DIR), "d": attrs(FileKind.DIR), "d/f": attrs(), "g": attrs()}


async def test_inode_numbers_are_stable_and_forget_is_honoured(
    tree: dict[str, FileAttrs],
) -> None:
    ns = Namespace(FakeCache(tree))  # type: ignore[arg-type]
    d, _ = await ns.lookup(ROOT_INODE, "d")
    f, _ = await ns.lookup(d.ino, "f")
    again, _ = await ns.lookup(d.ino, "f")
    assert again is f and f.lookups == 2 and f.file_id == "d/f"
    ns.forget(f.ino, 1)
    assert ns.node(f.ino) is f
    ns.forget(f.ino, 1)
    with pytest.raises(NotFound):
        ns.node(f.ino)
    assert (await ns.lookup(d.ino, "f"))[0].ino == f.ino  # same number after forget
    assert (await ns.lookup(d.ino, ".."))[0].ino == ROOT_INODE
    ns.forget(ROOT_INODE, 1)
    assert ns.node(ROOT_INODE).file_id == ""  # the root is never dropped


async def test_a_path_that_changes_kind_gets_a_new_inode(tree: dict[str, FileAttrs]) -> None:
    ns = Namespace(FakeCache(tree, ttl=0))  # type: ignore[arg-type]
    g, _ = await ns.lookup(ROOT_INODE, "g")
    tree["g"] = attrs(FileKind.DIR)
    g2, _ = await ns.lookup(ROOT_INODE, "g")
    assert g2.ino != g.ino and g2.kind is FileKind.DIR
    with pytest.raises(NotFound):
        await ns.getattr(g.ino)


async def test_listings_are_cached_for_the_ttl(
    tree: dict[str, FileAttrs], autojump_clock: object
) -> None:
    cache = FakeCache(tree, ttl=10.0)
    ns = Namespace(cache)  # type: ignore[arg-type]
    assert [e.name for e in await ns.list_dir(ROOT_INODE)] == ["d", "g"]
    tree["h"] = attrs()
    assert [e.name for e in await ns.list_dir(ROOT_INODE)] == ["d", "g"]
    with pytest.raises(NotFound):  # a fresh listing answers without asking
        await ns.lookup(ROOT_INODE, "nope")
    assert ("getattr", "nope") not in cache.calls
    await trio.sleep(10.0)
    assert [e.name for e in await ns.list_dir(ROOT_INODE)] == ["d", "g", "h"]
    assert cache.calls.count(("list_dir", "")) == 2


async def test_an_invalidated_file_and_its_directory_are_listed_again(
    tree: dict[str, FileAttrs],
) -> None:
    ns = Namespace(FakeCache(tree))  # type: ignore[arg-type]
    await ns.list_dir(ROOT_INODE)
    g, _ = await ns.lookup(ROOT_INODE, "g")
    assert ns.invalidated("g") == g.ino
    assert ns.node(ROOT_INODE).listing is None
    assert ns.invalidated("not-known") is None


async def test_an_inode_stands_for_one_version_of_its_file(
    tree: dict[str, FileAttrs],
) -> None:
    ns = Namespace(FakeCache(tree, ttl=0))  # type: ignore[arg-type]
    g, v1 = await ns.lookup(ROOT_INODE, "g")
    ns.bind(g.ino, v1)  # an open of v1
    tree["g"] = FileAttrs(FileKind.FILE, size=99, mtime=1.0, version="v2")
    # The kernel keeps one size and one page cache per inode: the inode is
    # v1's, open or not ...
    assert (await ns.getattr(g.ino))[1] == v1
    ns.unbind(g.ino)
    assert (await ns.getattr(g.ino))[1] == v1
    # ... and v2 is another inode, which a lookup or a listing shows.
    g2, v2 = await ns.lookup(ROOT_INODE, "g")
    assert g2.ino != g.ino and v2.size == 99
    listing = await ns.list_dir(ROOT_INODE)
    assert [ns.inode_number("g", e.attrs) for e in listing if e.name == "g"] == [g2.ino]
    # An open of v2 on the old inode would read v2 under v1's size and pages.
    with pytest.raises(NewInode):
        ns.bind(g.ino, v2)
    ns.bind(g2.ino, v2)
    # A directory keeps its number whatever happens inside it.
    d, _ = await ns.lookup(ROOT_INODE, "d")
    tree["d"] = FileAttrs(FileKind.DIR, size=0, mtime=5.0, version="changed")
    assert (await ns.lookup(ROOT_INODE, "d"))[0].ino == d.ino


async def test_a_listing_older_than_what_the_engine_knows_shows_the_newer_version(
    tree: dict[str, FileAttrs],
) -> None:
    ns = Namespace(FakeCache(tree, ttl=10))  # type: ignore[arg-type]
    listing = await ns.list_dir(ROOT_INODE)  # g at v1, kept for the TTL
    tree["g"] = FileAttrs(FileKind.FILE, size=99, mtime=1.0, version="v2")
    g, v2 = await ns.lookup(ROOT_INODE, "g")
    (listed,) = [e.attrs for e in listing if e.name == "g"]
    shown = ns.listed("g", listed)
    # Not an inode for v1 again, and the lookup after it keeps the same one.
    assert shown == v2 and ns.inode_number("g", shown) == g.ino
    assert (await ns.lookup(ROOT_INODE, "g"))[0].ino == g.ino


async def test_a_file_deleted_while_open_keeps_its_attributes_on_its_inode(
    tree: dict[str, FileAttrs],
) -> None:
    ns = Namespace(FakeCache(tree, ttl=0))  # type: ignore[arg-type]
    g, v1 = await ns.lookup(ROOT_INODE, "g")
    ns.bind(g.ino, v1)
    del tree["g"]
    assert (await ns.getattr(g.ino))[1] == v1  # fstat of an open file works
    ns.unbind(g.ino)
    with pytest.raises(NotFound):
        await ns.getattr(g.ino)


async def test_errors_become_errno_in_one_place(
    tree: dict[str, FileAttrs], caplog: pytest.LogCaptureFixture
) -> None:
    cache = FakeCache(tree, ttl=0)
    ns = Namespace(cache)  # type: ignore[arg-type]
    ops = Operations(ns, cache, NO_PASSTHROUGH)  # type: ignore[arg-type]
    entry = await ops.lookup(ROOT_INODE, b"g")
    for error, expected in [
        (NotFound("gone"), errno.ENOENT),
        (FileQuarantined("latched"), errno.EIO),
        (RuntimeError("a bug"), errno.EIO),
    ]:
        cache.fail["g"] = error
        with pytest.raises(FUSEError) as info:
            await ops.getattr(entry.ino)
        assert info.value.errno == expected
    assert "a bug" in caplog.text and "Traceback" in caplog.text
    del cache.fail["g"]
    assert (await ops.getattr(entry.ino)).size == 3  # still serving
    with pytest.raises(FUSEError) as info:
        await ops.change(9)  # MKDIR
    assert info.value.errno == errno.EROFS
