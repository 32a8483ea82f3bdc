"""Telling a real kernel, over each FUSE transport, that a name changed.

A small file system kept in memory is mounted in this process, and a file
of it gets a new version behind the kernel's back, as when a group member
learns one from another: the kernel trusts its entry for the mount's TTL
(an hour here) until KernelInvalidator.forget_entry makes it look the name
up again.  The daemon's own mount (tests/mount/test_mount.py) cannot be
made to forget a name from outside: the group's version events do that.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from conftest import FUSE_TRANSPORTS

from cachefs import fuse
from cachefs.control.mounts import mount_at
from cachefs.fs.operations import KernelInvalidator
from cachefs.fuse import DirReply, Entry, FUSEError, Kernel, Opened, Statfs

DEADLINE = 30.0
TTL = 3600.0
ROOT = 1

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


class OneFile:
    """/data, whose version (and so its inode and size) the test changes."""

    def __init__(self) -> None:
        self.version = 1
        self.lookups = 0

    def _entry(self, ino: int) -> Entry:
        if ino == ROOT:
            return Entry(ROOT, stat.S_IFDIR | 0o555, 0, 0, 0, 0, nlink=2, timeout=TTL)
        return Entry(ino, stat.S_IFREG | 0o444, 10 * (ino - 1), 0, 0, 0, timeout=TTL)

    def init(self) -> None:
        pass

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        pass

    async def lookup(self, parent: int, name: bytes) -> Entry:
        if parent != ROOT or name != b"data":
            raise FUSEError(errno.ENOENT)
        self.lookups += 1
        return self._entry(1 + self.version)  # a new version is a new inode

    async def getattr(self, ino: int) -> Entry:
        return self._entry(ino)

    async def readlink(self, ino: int) -> bytes:
        raise FUSEError(errno.EINVAL)

    async def statfs(self) -> Statfs:
        return Statfs(4096, 4096, 1000, 500, 400, 2)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FUSEError(errno.ENOSYS)

    async def listxattr(self, ino: int) -> list[bytes]:
        return []

    async def open(self, ino: int, flags: int) -> Opened:
        raise FUSEError(errno.EACCES)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        raise FUSEError(errno.EBADF)

    async def release(self, fh: int) -> None:
        pass

    async def flush(self, fh: int) -> None:
        pass

    async def opendir(self, ino: int) -> Opened:
        return Opened(1)

    async def readdir(self, fh: int, offset: int, reply: DirReply) -> None:
        pass

    async def releasedir(self, fh: int) -> None:
        pass

    async def change(self, request: str) -> None:
        raise FUSEError(errno.EROFS)


class RootOnly:
    """The namespace part KernelInvalidator uses: the kernel knows the root."""

    def invalidated(self, file_id: str) -> int | None:
        return None

    def live_inode(self, file_id: str) -> int | None:
        return ROOT if file_id == "" else None


@pytest.mark.parametrize("transport", FUSE_TRANSPORTS)
async def test_a_forgotten_name_is_looked_up_again_within_its_ttl(
    tmp_path: Path, transport: str
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ops = OneFile()
    kernels: list[Kernel] = []

    def make_ops(kernel: Kernel) -> OneFile:
        kernels.append(kernel)
        return ops

    mounted = await fuse.transport(transport)(
        mnt, "cachefs:/notify", "cachefs", make_ops, passthrough=False
    )
    told, hear = trio.open_memory_channel[None](1)

    def invalidate_entry(parent_ino: int, name: bytes) -> None:
        kernels[0].invalidate_entry(parent_ino, name)
        trio.from_thread.run_sync(told.send_nowait, None)

    async def stat_data() -> tuple[int, int]:
        st = await trio.to_thread.run_sync(os.stat, mnt / "data", abandon_on_cancel=True)
        return st.st_ino, st.st_size

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mounted.serve)
            try:
                with trio.fail_after(DEADLINE):
                    async with trio.open_nursery() as inner:
                        invalidator = KernelInvalidator()
                        await inner.start(
                            invalidator.serve,
                            RootOnly(),
                            kernels[0].invalidate_inode,
                            invalidate_entry,
                        )
                        assert await stat_data() == (2, 10)
                        ops.version = 2
                        # The kernel trusts its entry for the TTL: the old version.
                        assert await stat_data() == (2, 10)
                        assert ops.lookups == 1
                        invalidator.forget_entry("data")
                        await hear.receive()
                        assert await stat_data() == (3, 20)
                        assert ops.lookups == 2
                        inner.cancel_scope.cancel()
            finally:
                mounted.stop()
    finally:
        mounted.close()
    assert mount_at(mnt) is None
