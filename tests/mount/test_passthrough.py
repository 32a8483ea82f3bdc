"""Files the cache holds whole, read by the kernel itself (FUSE passthrough).

First which opens get passthrough, in process (OpenModes over fakes); then
real mounts: the bytes the kernel reads from the cache file equal the
source's, and eviction, purge and a new version never change what an open
passthrough file reads.  The pyfuse3 transport cannot send a backing id: on
it the same reads come through cachefs, with no passthrough open at all.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import pytest
from conftest import evict_page_cache, kernel_has_passthrough, run_cachefs

from cachefs.contract import FileAttrs, FileKind
from cachefs.engine import OpenFile
from cachefs.fs.inodes import NewInode
from cachefs.fs.passthrough import OpenModes

if TYPE_CHECKING:
    from conftest import Mount, MountFactory

MIB = 1 << 20
RELEASE_DEADLINE = 10.0
needs_passthrough = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or os.geteuid() != 0 or not kernel_has_passthrough(),
    reason="passthrough needs /dev/fuse, root and a kernel with FUSE passthrough",
)


# -- which opens get passthrough --------------------------------------------------------


class FakeConnection:
    def __init__(self, passthrough: bool = True, refuse: bool = False) -> None:
        self.passthrough = passthrough
        self.refuse = refuse
        self.opened: list[int] = []  # fds registered
        self.live: set[int] = set()  # backing ids not closed yet
        self.closed: list[int] = []

    def open_backing(self, fd: int) -> int:
        if self.refuse:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        self.opened.append(fd)
        backing_id = len(self.opened)
        self.live.add(backing_id)
        return backing_id

    def close_backing(self, backing_id: int) -> None:
        self.live.remove(backing_id)
        self.closed.append(backing_id)


class FakeCache:
    """Files named in ``whole`` are held whole (fd 7)."""

    def __init__(self, *whole: str) -> None:
        self.whole = set(whole)
        self.holds: list[str] = []
        self.let_go: list[str] = []

    def hold_whole(self, handle: OpenFile) -> int | None:
        if handle.file_id not in self.whole:
            return None
        self.holds.append(handle.file_id)
        return 7

    def let_go_whole(self, handle: OpenFile) -> None:
        self.let_go.append(handle.file_id)


def handle(file_id: str = "f", version: str = "v1") -> OpenFile:
    attrs = FileAttrs(FileKind.FILE, size=10, mtime=0.0, version=version)
    return SimpleNamespace(file_id=file_id, attrs=attrs)  # type: ignore[return-value]


def modes(conn: FakeConnection, cache: FakeCache) -> OpenModes:
    return OpenModes(conn, cache)  # type: ignore[arg-type]


def test_opens_of_a_whole_file_share_one_backing_id_until_the_last_is_released() -> None:
    conn, cache = FakeConnection(), FakeCache("f")
    m = modes(conn, cache)
    first = m.choose(2, 1, handle(), os.O_RDONLY)
    second = m.choose(2, 2, handle(), os.O_RDONLY)
    assert first is not None and second is not None
    assert first.backing_id == second.backing_id == 1 and not first.direct_io
    assert conn.opened == [7]  # registered once
    m.released(1)
    assert conn.closed == []
    m.released(2)
    assert conn.closed == [1] and not conn.live
    assert cache.holds == ["f", "f"]


def test_an_inode_read_through_the_page_cache_stays_so_until_closed() -> None:
    conn, cache = FakeConnection(), FakeCache()
    m = modes(conn, cache)
    assert m.choose(2, 1, handle(), os.O_RDONLY) is None  # not cached whole yet
    cache.whole.add("f")  # read whole meanwhile
    assert m.choose(2, 2, handle(), os.O_RDONLY) is None  # the kernel would answer EIO
    assert cache.holds == []
    m.released(1)
    m.released(2)
    opened = m.choose(2, 3, handle(), os.O_RDONLY)
    assert opened is not None and opened.backing_id == 1


def test_o_direct_opens_read_through_us_and_end_passthrough_for_their_file() -> None:
    conn, cache = FakeConnection(), FakeCache("f", "g")
    m = modes(conn, cache)
    assert m.choose(2, 1, handle("f"), os.O_RDONLY) is not None  # passthrough
    # Every open of an inode in passthrough must be passthrough (else EIO),
    # and the cache disk would refuse unaligned direct reads: a new inode.
    with pytest.raises(NewInode):
        m.choose(2, 2, handle("f"), os.O_RDONLY | os.O_DIRECT)
    direct = m.choose(5, 3, handle("f"), os.O_RDONLY | os.O_DIRECT)  # the new inode
    assert direct is not None and direct.direct_io and not direct.backing_id
    # The file is read through us from now on: no second new inode is needed.
    assert m.choose(5, 4, handle("f"), os.O_RDONLY) is None
    assert m.choose(3, 5, handle("g"), os.O_RDONLY) is not None  # other files as before
    for fh in (1, 3, 4, 5):
        m.released(fh)
    assert conn.closed == [1, 2]


def test_without_passthrough_every_open_goes_through_the_page_cache() -> None:
    conn, cache = FakeConnection(passthrough=False), FakeCache("f")
    m = modes(conn, cache)
    assert m.choose(2, 1, handle(), os.O_RDONLY) is None
    assert m.choose(2, 2, handle(), os.O_RDONLY | os.O_DIRECT) is None  # as before passthrough
    assert cache.holds == [] and conn.opened == []


def test_a_kernel_that_refuses_backing_files_is_asked_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn, cache = FakeConnection(refuse=True), FakeCache("f")
    m = modes(conn, cache)
    with caplog.at_level(logging.WARNING):
        assert m.choose(2, 1, handle(), os.O_RDONLY) is None
        assert m.choose(3, 2, handle(), os.O_RDONLY) is None
    assert cache.holds == ["f"] and cache.let_go == ["f"]  # given back, not kept whole
    assert caplog.text.count("refused passthrough") == 1


# -- real mounts ---------------------------------------------------------------------------


def make_files(root: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    root.mkdir(exist_ok=True)
    data = {}
    for name, size in sizes.items():
        data[name] = os.urandom(size)
        (root / name).write_bytes(data[name])
    return data


def read_all(fd: int, size: int) -> bytes:
    return b"".join(os.pread(fd, MIB, off) for off in range(0, size, MIB))


def wait_until(what: Callable[[], Any], deadline: float = RELEASE_DEADLINE) -> Any:
    """The kernel tells the daemon of a close after close() returns: wait for it."""
    end = time.monotonic() + deadline
    while not (got := what()):
        assert time.monotonic() < end, "not within the deadline"
        time.sleep(0.02)
    return got


def passthrough_files(m: Mount) -> int:
    return int(m.stats()["passthrough_files"])


def has_passthrough(m: Mount) -> bool:
    """Whether *m*'s transport can read files with passthrough (pyfuse3 cannot)."""
    return m.fuse == "native"


def assert_held_with_passthrough(m: Mount) -> None:
    """An open file is read with passthrough; on pyfuse3, no file is."""
    if has_passthrough(m):
        assert passthrough_files(m) >= 1
    else:
        assert passthrough_files(m) == 0


def wait_for_passthrough(m: Mount, name: str) -> None:
    """Until a new open of *name* is passthrough: earlier opens through the
    page cache must be released first, which the kernel tells the daemon of
    only after close() returned.  On pyfuse3: an open of *name* that is not."""
    if not has_passthrough(m):
        with open(m / name, "rb"):
            pass
        assert m.stats()["passthrough_opens"] == 0
        return

    def passthrough_open() -> bool:
        before = m.stats()["passthrough_opens"]
        with open(m / name, "rb"):
            pass
        return bool(m.stats()["passthrough_opens"] > before)

    wait_until(passthrough_open)


@needs_passthrough
def test_a_file_cached_whole_is_read_by_the_kernel(mount: MountFactory, tmp_path: Path) -> None:
    data = make_files(tmp_path / "src", {"f": 3 * MIB + 123})["f"]
    m = mount(tmp_path / "src")
    assert (m / "f").read_bytes() == data  # cached whole on the way
    assert m.stats()["passthrough_opens"] == 0
    wait_for_passthrough(m, "f")
    evict_page_cache(m.cache_dir / "data")
    evict_page_cache(tmp_path / "src")
    before = m.stats()
    with open(m / "f", "rb") as f:
        assert_held_with_passthrough(m)
        if not has_passthrough(m):  # past the pages the kernel kept of the first read
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        assert f.read() == data
        f.seek(MIB - 7)
        assert f.read(100) == data[MIB - 7 : MIB + 93]
    after = m.stats()
    assert after["read_data_calls"] == before["read_data_calls"]  # not the source
    if has_passthrough(m):
        assert after["passthrough_opens"] == before["passthrough_opens"] + 1
        # The kernel read the cache file: no read reached cachefs.
        assert after["hit_bytes"] == before["hit_bytes"]
    else:  # the clean fallback: read through cachefs, from the cache; said once
        assert after["passthrough_opens"] == 0
        assert after["hit_bytes"] > before["hit_bytes"]
        assert m.log_text().count("passthrough off (libfuse cannot send a backing id)") == 1
    wait_until(lambda: passthrough_files(m) == 0)


@needs_passthrough
@pytest.mark.parametrize("mount", ["native"], indirect=True)  # pyfuse3: never passthrough
@pytest.mark.parametrize(
    "options",
    [("--no-passthrough",), ("--verify", "always"), ("--encrypt",)],
    ids=["no-passthrough", "verify-always", "encrypted"],
)
def test_reads_that_must_be_checked_or_opened_stay_with_cachefs(
    mount: MountFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: tuple[str, ...]
) -> None:
    monkeypatch.setenv("CACHEFS_KEY", "a passphrase for the test")
    data = make_files(tmp_path / "src", {"f": MIB + 5})["f"]
    m = mount(tmp_path / "src", *options)
    assert (m / "f").read_bytes() == data
    evict_page_cache(m.cache_dir / "data")
    hits = m.stats()["hit_bytes"]
    fd = os.open(m / "f", os.O_RDONLY)
    try:
        # Past the pages the kernel may still hold of the mount: these reach cachefs.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert read_all(fd, len(data)) == data
    finally:
        os.close(fd)
    stats = m.stats()
    assert stats["passthrough_opens"] == 0
    assert stats["hit_bytes"] > hits


@needs_passthrough
@pytest.mark.parametrize("mount", ["native"], indirect=True)  # pyfuse3: never passthrough
def test_an_open_passthrough_file_keeps_its_blocks_under_eviction_and_purge(
    mount: MountFactory, tmp_path: Path
) -> None:
    data = make_files(tmp_path / "src", {"held": 4 * MIB, "a": 4 * MIB, "b": 4 * MIB})
    m = mount(tmp_path / "src", "--cache-size", "6M", "--min-free", "0")
    assert (m / "held").read_bytes() == data["held"]
    wait_for_passthrough(m, "held")
    fd = os.open(m / "held", os.O_RDONLY)
    try:
        assert passthrough_files(m) >= 1
        # 8 MiB more through a 6 MiB cache: "held" is the least recently read.
        for name in ("a", "b"):
            assert (m / name).read_bytes() == data[name]
        assert m.stats()["evicted_bytes"] > 0
        done = run_cachefs("purge", m.mountpoint)
        assert done.returncode == 0, done.stderr
        assert "kept 1 file open with passthrough" in done.stdout
        evict_page_cache(m.cache_dir / "data")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert read_all(fd, 4 * MIB) == data["held"]  # never a punched hole's zeros
    finally:
        os.close(fd)
    wait_until(lambda: passthrough_files(m) == 0)
    done = run_cachefs("purge", m / "held")
    assert done.stdout.startswith("purged 1 file"), done.stdout


@needs_passthrough
def test_a_new_version_while_the_old_one_is_open(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    old = make_files(src, {"f": 2 * MIB})["f"]
    m = mount(src, "--ttl", "0")
    assert (m / "f").read_bytes() == old
    wait_for_passthrough(m, "f")
    fd_old = os.open(m / "f", os.O_RDONLY)
    try:
        assert_held_with_passthrough(m)
        new = os.urandom(2 * MIB + 10)
        (src / "f").write_bytes(new)
        os.utime(src / "f", (1, 1))  # another mtime: another version
        fd_new = os.open(m / "f", os.O_RDONLY)  # a new inode (ESTALE, looked up again)
        try:
            assert os.fstat(fd_new).st_ino != os.fstat(fd_old).st_ino
            assert read_all(fd_new, len(new)) == new
            assert read_all(fd_old, len(old)) == old  # the version it opened, whole
        finally:
            os.close(fd_new)
    finally:
        os.close(fd_old)
    wait_until(lambda: passthrough_files(m) == 0)
    wait_for_passthrough(m, "f")  # the new version, cached whole by fd_new
    assert (m / "f").read_bytes() == new


@needs_passthrough
def test_page_cache_and_direct_opens_beside_passthrough_ones(
    mount: MountFactory, tmp_path: Path
) -> None:
    data = make_files(tmp_path / "src", {"f": 2 * MIB + 1})["f"]
    m = mount(tmp_path / "src")
    first = os.open(m / "f", os.O_RDONLY)  # not cached yet: through the page cache
    try:
        assert read_all(first, len(data)) == data  # now cached whole
        second = os.open(m / "f", os.O_RDONLY)  # must not be passthrough: EIO
        try:
            assert read_all(second, len(data)) == data
        finally:
            os.close(second)
        assert m.stats()["passthrough_opens"] == 0
    finally:
        os.close(first)
    wait_for_passthrough(m, "f")
    held = os.open(m / "f", os.O_RDONLY)
    try:
        assert_held_with_passthrough(m)
        direct = os.open(m / "f", os.O_RDONLY | os.O_DIRECT)  # a new inode, through us
        try:  # unaligned direct reads, as without passthrough
            if has_passthrough(m):
                assert os.fstat(direct).st_ino != os.fstat(held).st_ino
            assert os.pread(direct, 10, 3) == data[3:13]
        finally:
            os.close(direct)
        assert read_all(held, len(data)) == data
    finally:
        os.close(held)
