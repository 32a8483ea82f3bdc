"""The native FUSE transport (cachefs.fuse.native) on its own: a real mount served in this
process by a small file system kept in memory, read from threads as any
program would read it.  Mounted through fusermount3, the way users who are
not root mount (as root, cachefs mounts with mount(2): the other tests).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from cachefs.control.mounts import mount_at
from cachefs.daemon.checks import prepare_cache_dir
from cachefs.daemon.options import MountOptions
from cachefs.daemon.serve import run_mount
from cachefs.engine import CacheConfig
from cachefs.fuse import DirReply, Entry, FUSEError, MountError, Opened, Statfs
from cachefs.fuse.native import Session, device, mount

T = TypeVar("T")
DATA = os.urandom(3 * (1 << 20) + 5)
NAMES = [f"entry-{i:04d}".encode() for i in range(700)]
DEADLINE = 30.0

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def _entry(ino: int) -> Entry:
    if ino == 1:
        return Entry(1, stat.S_IFDIR | 0o555, 0, 0, 0, 0, nlink=2)
    size = {2: len(DATA), 3: 10}.get(ino, 0)
    return Entry(ino, stat.S_IFREG | 0o444, size, 1_500_000_000_123_456_789, 0, 0)


class MemoryOps:
    """/data (DATA), /bug (every read fails with a bug), /entry-NNNN (empty)."""

    def __init__(self) -> None:
        self.initialized = False
        self.forgotten = 0
        self.opens: dict[int, int] = {}

    def init(self) -> None:
        self.initialized = True

    def forget(self, items: list[tuple[int, int]]) -> None:
        self.forgotten += sum(n for _, n in items)

    async def lookup(self, parent: int, name: bytes) -> Entry:
        if name == b"data":
            return _entry(2)
        if name == b"bug":
            return _entry(3)
        if name in NAMES:
            return _entry(10 + NAMES.index(name))
        raise FUSEError(errno.ENOENT)

    async def getattr(self, ino: int) -> Entry:
        return _entry(ino)

    async def readlink(self, ino: int) -> bytes:
        raise FUSEError(errno.EINVAL)

    async def statfs(self) -> Statfs:
        return Statfs(4096, 4096, 1000, 500, 400, 7)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if name == b"user.colour":
            return b"blue"
        raise FUSEError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[bytes]:
        return [b"user.colour"]

    async def open(self, ino: int, flags: int) -> Opened:
        fh = len(self.opens) + 1
        self.opens[fh] = ino
        return Opened(fh, keep_cache=False)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        if self.opens[fh] == 3:
            raise RuntimeError("a bug in the file system")
        await trio.sleep(0)  # others' requests run meanwhile
        return DATA[offset : offset + size]

    async def release(self, fh: int) -> None:
        del self.opens[fh]

    async def flush(self, fh: int) -> None:
        pass

    async def opendir(self, ino: int) -> Opened:
        return Opened(1)

    async def readdir(self, fh: int, offset: int, reply: DirReply) -> None:
        names = [b".", b"..", b"data", b"bug", *NAMES]
        for i in range(offset, len(names)):
            ino = 1 if i < 2 else 2 if i == 2 else 3 if i == 3 else 10 + i - 4
            if not reply.add(names[i], _entry(ino), i + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def change(self, request: str) -> None:
        raise FUSEError(errno.EROFS)

    async def create(self, parent: int, name: bytes, mode: int, flags: int) -> Any:
        raise FUSEError(errno.EROFS)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int) -> Any:
        raise FUSEError(errno.EROFS)

    async def mkdir(self, parent: int, name: bytes, mode: int) -> Any:
        raise FUSEError(errno.EROFS)

    async def symlink(self, parent: int, name: bytes, target: bytes) -> Any:
        raise FUSEError(errno.EROFS)

    async def unlink(self, parent: int, name: bytes) -> None:
        raise FUSEError(errno.EROFS)

    async def rmdir(self, parent: int, name: bytes) -> None:
        raise FUSEError(errno.EROFS)

    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        raise FUSEError(errno.EROFS)

    async def setattr(self, ino: int, attr: Any) -> Any:
        raise FUSEError(errno.EROFS)

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        raise FUSEError(errno.EROFS)

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass


async def _serving(
    tmp_path: Path, client: Callable[[Path], T], ops: MemoryOps | None = None
) -> tuple[T, MemoryOps]:
    """Mount MemoryOps through fusermount3, run *client* in a thread, unmount."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ops = ops or MemoryOps()
    connection = await mount(mnt, "cachefs:/memory", "cachefs", fusermount=True)
    try:
        async with trio.open_nursery() as nursery:
            session = Session(ops, connection, passthrough=False)
            nursery.start_soon(session.serve)
            with trio.fail_after(DEADLINE):
                result = await trio.to_thread.run_sync(client, mnt, abandon_on_cancel=True)
            session.stop()
    finally:
        connection.close()  # a client stuck on the mount gets ENOTCONN
    assert mount_at(mnt) is None
    return result, ops


async def test_files_read_back_exactly_from_many_threads(tmp_path: Path) -> None:
    def client(mnt: Path) -> list[bytes]:
        assert mount_at(mnt) is not None  # fsname and type as cachefs's own
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda _: (mnt / "data").read_bytes(), range(8)))

    reads, ops = await _serving(tmp_path, client)
    assert ops.initialized
    assert all(r == DATA for r in reads)
    assert not ops.opens  # every open was released


async def test_unaligned_reads_and_attributes(tmp_path: Path) -> None:
    def client(mnt: Path) -> tuple[list[bytes], os.stat_result, os.statvfs_result]:
        fd = os.open(mnt / "data", os.O_RDONLY | os.O_DIRECT)  # every read reaches us
        try:
            reads = [os.pread(fd, n, off) for off, n in [(0, 1), (4093, 10), (len(DATA) - 3, 9)]]
        finally:
            os.close(fd)
        return reads, os.stat(mnt / "data"), os.statvfs(mnt)

    (reads, st, vfs), _ = await _serving(tmp_path, client)
    assert reads == [DATA[:1], DATA[4093:4103], DATA[-3:]]
    assert st.st_size == len(DATA) and stat.S_ISREG(st.st_mode) and st.st_ino == 2
    assert st.st_mtime_ns == 1_500_000_000_123_456_789
    assert (vfs.f_blocks, vfs.f_bfree, vfs.f_bavail, vfs.f_files) == (1000, 500, 400, 7)


async def test_a_directory_larger_than_one_answer(tmp_path: Path) -> None:
    def client(mnt: Path) -> tuple[list[str], dict[str, int]]:
        entries = {e.name: e.inode() for e in os.scandir(mnt)}
        return sorted(os.listdir(mnt)), entries

    (names, inodes), ops = await _serving(tmp_path, client)
    assert names == sorted(["data", "bug", *(n.decode() for n in NAMES)])
    assert inodes["entry-0699"] == 10 + 699


async def test_errors_reach_the_caller_as_errno(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def client(mnt: Path) -> dict[str, int]:
        got = {}
        for what, call in [
            ("missing", lambda: os.stat(mnt / "nope")),
            ("bug", lambda: (mnt / "bug").read_bytes()),
            ("write", lambda: os.open(mnt / "new", os.O_WRONLY | os.O_CREAT)),
            ("mkdir", lambda: os.mkdir(mnt / "d")),
            ("xattr", lambda: os.getxattr(mnt / "data", "user.other")),
        ]:
            try:
                call()
            except OSError as e:
                got[what] = e.errno
        got["colour"] = os.getxattr(mnt / "data", "user.colour") == b"blue"
        got["listed"] = os.listxattr(mnt / "data") == ["user.colour"]
        return got

    with caplog.at_level(logging.ERROR, logger="cachefs.fuse"):
        got, _ = await _serving(tmp_path, client)
    assert got == {
        "missing": errno.ENOENT,
        "bug": errno.EIO,
        "write": errno.EROFS,
        "mkdir": errno.EROFS,
        "xattr": errno.ENODATA,
        "colour": True,
        "listed": True,
    }
    assert "a bug in the file system" in caplog.text  # logged with its traceback


def test_a_refused_mount_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        trio.run(mount, tmp_path / "missing", "cachefs:/x", "cachefs")
    assert str(info.value).startswith(f"cannot mount on {tmp_path / 'missing'}")
    assert "\n" not in str(info.value)
    with pytest.raises(MountError, match="cannot mount on"):
        trio.run(lambda: mount(tmp_path / "missing", "cachefs:/x", "cachefs", fusermount=True))


def test_a_refused_mount_leaves_run_mount_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not as the exception group of the nurseries it was raised in: the CLI
    prints a CacheFSError in one line, anything else as an internal error."""

    def refuse(*args: object) -> None:
        raise MountError("cannot mount on X: refused")

    monkeypatch.setattr(device, "mount", refuse)
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    opts = MountOptions(
        source=str(tmp_path / "src"),
        mountpoint=tmp_path / "mnt",
        cache_dir=prepare_cache_dir(tmp_path / "cache"),
        config=CacheConfig(),
    )
    with pytest.raises(MountError, match="refused"):
        run_mount(opts)
