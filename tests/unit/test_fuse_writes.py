"""The requests that change the file system, as both FUSE transports hand them on.

Native: a SOCK_SEQPACKET socket pair stands in for /dev/fuse (one message a
request, one an answer, as the device reads and writes them); requests are
packed here from linux/fuse.h's layouts, independently of
cachefs.fuse.native.abi, and the answers unpacked the same way.  pyfuse3:
the adapter's handlers are called as pyfuse3 calls them, without a mount
(pyfuse3's SetattrFields cannot be made with fields set outside pyfuse3: a
stand-in with the same attributes takes its place).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from cachefs.fuse import DirReply, Entry, FUSEError, Opened, Statfs
from cachefs.fuse.api import RENAME_EXCHANGE, RENAME_NOREPLACE, SetAttr
from cachefs.fuse.native import Connection, Session
from cachefs.fuse.pyfuse3.adapter import Adapter

# -- linux/fuse.h ----------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
ENTRY_OUT = struct.Struct("<QQQQII")  # nodeid generation entry/attr valid, their nsec
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # ino size blocks times nsecs mode nlink uid gid ...
ATTR_OUT = struct.Struct("<QII")  # attr_valid attr_valid_nsec dummy, then the attr
OPEN_OUT = struct.Struct("<QIi")  # fh open_flags backing_id
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
MKNOD_IN = struct.Struct("<IIII")  # mode rdev umask padding
MKDIR_IN = struct.Struct("<II")  # mode umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir flags padding
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
WRITE_IN = struct.Struct("<QQIIQII")  # fh offset size write_flags lock_owner flags padding
WRITE_OUT = struct.Struct("<II")
FSYNC_IN = struct.Struct("<QII")  # fh fsync_flags padding
FLUSH_IN = struct.Struct("<QIIQ")  # fh unused padding lock_owner
INIT_IN = struct.Struct("<IIIIII")  # major minor max_readahead flags flags2 unused
INIT_OUT = struct.Struct("<IIIIHHIIHHII")  # ... max_write time_gran max_pages align flags2

FUSE_SETATTR, FUSE_SYMLINK, FUSE_MKNOD, FUSE_MKDIR, FUSE_UNLINK, FUSE_RMDIR = 4, 6, 8, 9, 10, 11
FUSE_RENAME, FUSE_LINK, FUSE_WRITE, FUSE_FSYNC, FUSE_FLUSH, FUSE_INIT = 12, 13, 16, 20, 25, 26
FUSE_CREATE, FUSE_RENAME2 = 35, 45
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 1 << 4, 1 << 5, 1 << 6
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_LOCKOWNER, FATTR_CTIME = 1 << 7, 1 << 8, 1 << 9, 1 << 10
FUSE_ATOMIC_O_TRUNC, FUSE_BIG_WRITES, FUSE_WRITEBACK_CACHE = 1 << 3, 1 << 5, 1 << 16
FUSE_HANDLE_KILLPRIV, FUSE_INIT_EXT, FUSE_MAX_PAGES = 1 << 19, 1 << 30, 1 << 22
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28

MiB = 1 << 20
MTIME_NS = 1_700_000_000_250_000_000
DEADLINE = 10.0


def _entry(ino: int, mode: int = stat.S_IFREG | 0o644, size: int = 0) -> Entry:
    return Entry(ino, mode, size, MTIME_NS, 1000, 1000)


class Recorder:
    """Operations that record the changes asked of them and answer them plainly."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.refuse: dict[str, int] = {}  # method -> errno
        self.second_write = trio.Event()

    def _call(self, *call: Any) -> None:
        self.calls.append(call)
        if call[0] in self.refuse:
            raise FUSEError(self.refuse[call[0]])

    def init(self) -> None:
        self._call("init")

    def forget(self, items: Sequence[tuple[int, int]]) -> None:
        pass

    async def lookup(self, parent: int, name: bytes) -> Entry:
        raise FUSEError(errno.ENOENT)

    async def getattr(self, ino: int) -> Entry:
        return _entry(ino)

    async def readlink(self, ino: int) -> bytes:
        raise FUSEError(errno.EINVAL)

    async def statfs(self) -> Statfs:
        return Statfs(4096, 4096, 1, 1, 1, 1)

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        raise FUSEError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[bytes]:
        return []

    async def open(self, ino: int, flags: int) -> Opened:
        return Opened(1)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        return b""

    async def release(self, fh: int) -> None:
        pass

    async def flush(self, fh: int) -> None:
        self._call("flush", fh)

    async def opendir(self, ino: int) -> Opened:
        return Opened(1)

    async def readdir(self, fh: int, offset: int, reply: DirReply) -> None:
        pass

    async def releasedir(self, fh: int) -> None:
        pass

    async def create(self, parent: int, name: bytes, mode: int, flags: int) -> tuple[Entry, Opened]:
        self._call("create", parent, name, mode, flags)
        return _entry(20, mode), Opened(77, keep_cache=True)

    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int) -> Entry:
        self._call("mknod", parent, name, mode, rdev)
        return _entry(21, mode)

    async def mkdir(self, parent: int, name: bytes, mode: int) -> Entry:
        self._call("mkdir", parent, name, mode)
        return _entry(22, mode)

    async def symlink(self, parent: int, name: bytes, target: bytes) -> Entry:
        self._call("symlink", parent, name, target)
        return _entry(23, stat.S_IFLNK | 0o777, len(target))

    async def unlink(self, parent: int, name: bytes) -> None:
        self._call("unlink", parent, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        self._call("rmdir", parent, name)

    async def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> None:
        self._call("rename", parent, name, new_parent, new_name, flags)

    async def setattr(self, ino: int, attr: SetAttr) -> Entry:
        self._call("setattr", ino, attr)
        return _entry(ino, size=attr.size or 0)

    async def write(self, fh: int, offset: int, data: bytes | memoryview) -> int:
        if offset == 0:  # held while the next request is read
            with trio.fail_after(DEADLINE):
                await self.second_write.wait()
        else:
            self.second_write.set()
        self._call("write", fh, offset, bytes(data))
        return len(data)

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._call("fsync", fh, datasync)

    async def change(self, request: str) -> None:
        self._call("change", request)
        raise FUSEError(errno.EPERM)


class Device:
    """The kernel's side of a native Session: requests in, answers out."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._unique = 0

    async def send(self, opcode: int, nodeid: int, body: bytes) -> int:
        self._unique += 1
        header = IN_HEADER.pack(
            IN_HEADER.size + len(body), opcode, self._unique, nodeid, 0, 0, 1, 0, 0
        )
        await self._sock.send(header + body)
        return self._unique

    async def answer(self) -> tuple[int, int, bytes]:
        """(unique, error, payload) of the next answer."""
        with trio.fail_after(DEADLINE):
            data = await self._sock.recv(2 * MiB)
        length, error, unique = OUT_HEADER.unpack_from(data)
        assert length == len(data)
        return unique, error, data[OUT_HEADER.size :]

    async def ask(self, opcode: int, nodeid: int, body: bytes) -> bytes:
        """The payload of a request's answer, which must succeed."""
        unique = await self.send(opcode, nodeid, body)
        got, error, payload = await self.answer()
        assert (got, error) == (unique, 0)
        return payload

    async def refused(self, opcode: int, nodeid: int, body: bytes) -> int:
        """The errno a request is answered with."""
        unique = await self.send(opcode, nodeid, body)
        got, error, payload = await self.answer()
        assert got == unique and error < 0 and payload == b""
        return -error


@asynccontextmanager
async def serving(ops: Recorder) -> AsyncIterator[Device]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)  # for 1 MiB writes
    theirs.setblocking(False)
    # Never closed through the Connection: that would unmount.
    session = Session(ops, Connection(theirs.fileno(), Path("/nowhere")), passthrough=False)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.serve)
            yield Device(trio.socket.from_stdlib_socket(ours))
            session.stop()
    finally:
        ours.close()
        theirs.close()


@pytest.fixture
def ops() -> Recorder:
    return Recorder()


def _fields(payload: bytes, at: int) -> tuple[int, ...]:
    """(ino, size, mode) of the fuse_attr at *at*."""
    attr = ATTR.unpack_from(payload, at)
    return attr[0], attr[1], attr[9]


# -- native ------------------------------------------------------------------------------


async def test_create_answers_the_entry_then_the_handle(ops: Recorder) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    body = CREATE_IN.pack(flags, stat.S_IFREG | 0o640, 0o022, 0) + b"new file\0"
    async with serving(ops) as dev:
        payload = await dev.ask(FUSE_CREATE, 1, body)
    assert ops.calls == [("create", 1, b"new file", stat.S_IFREG | 0o640, flags)]
    size = ENTRY_OUT.size + ATTR.size
    assert len(payload) == size + OPEN_OUT.size
    assert ENTRY_OUT.unpack_from(payload)[0] == 20  # nodeid
    assert _fields(payload, ENTRY_OUT.size) == (20, 0, stat.S_IFREG | 0o640)
    fh, open_flags, backing_id = OPEN_OUT.unpack_from(payload, size)
    assert (fh, open_flags, backing_id) == (77, 2, 0)  # FOPEN_KEEP_CACHE


async def test_mknod_and_mkdir_answer_an_entry(ops: Recorder) -> None:
    async with serving(ops) as dev:
        node = await dev.ask(
            FUSE_MKNOD, 1, MKNOD_IN.pack(stat.S_IFIFO | 0o600, 0, 0o022, 0) + b"p\0"
        )
        # The kernel sends mkdir's permission bits only; the type is added.
        made = await dev.ask(FUSE_MKDIR, 5, MKDIR_IN.pack(0o755, 0o022) + b"dir\0")
    assert ops.calls == [
        ("mknod", 1, b"p", stat.S_IFIFO | 0o600, 0),
        ("mkdir", 5, b"dir", stat.S_IFDIR | 0o755),
    ]
    assert len(node) == len(made) == ENTRY_OUT.size + ATTR.size
    assert _fields(made, ENTRY_OUT.size) == (22, 0, stat.S_IFDIR | 0o755)


async def test_symlink_takes_the_name_first_then_the_target(ops: Recorder) -> None:
    async with serving(ops) as dev:
        payload = await dev.ask(FUSE_SYMLINK, 3, b"link\0../some/target\0")
    assert ops.calls == [("symlink", 3, b"link", b"../some/target")]
    assert _fields(payload, ENTRY_OUT.size) == (23, len(b"../some/target"), stat.S_IFLNK | 0o777)


async def test_unlink_rmdir_and_renames(ops: Recorder) -> None:
    async with serving(ops) as dev:
        assert await dev.ask(FUSE_UNLINK, 1, b"gone\0") == b""
        assert await dev.ask(FUSE_RMDIR, 1, b"empty\0") == b""
        await dev.ask(FUSE_RENAME, 1, RENAME_IN.pack(9) + b"old\0new\0")
        await dev.ask(FUSE_RENAME2, 1, RENAME2_IN.pack(9, RENAME_NOREPLACE, 0) + b"a\0b\0")
        await dev.ask(FUSE_RENAME2, 2, RENAME2_IN.pack(2, RENAME_EXCHANGE, 0) + b"x\0y\0")
    assert ops.calls == [
        ("unlink", 1, b"gone"),
        ("rmdir", 1, b"empty"),
        ("rename", 1, b"old", 9, b"new", 0),
        ("rename", 1, b"a", 9, b"b", RENAME_NOREPLACE),
        ("rename", 2, b"x", 2, b"y", RENAME_EXCHANGE),
    ]


def _setattr(valid: int, **values: int) -> bytes:
    """A fuse_setattr_in with *valid* and the given fields (the rest 0, or junk)."""
    fields = dict(
        fh=0, size=0, lock_owner=0, atime=0, mtime=0, ctime=0, atimensec=0, mtimensec=0
    ) | dict(ctimensec=0, mode=0, uid=0, gid=0)
    fields |= values
    return SETATTR_IN.pack(
        valid,
        0,
        fields["fh"],
        fields["size"],
        fields["lock_owner"],
        fields["atime"],
        fields["mtime"],
        fields["ctime"],
        fields["atimensec"],
        fields["mtimensec"],
        fields["ctimensec"],
        fields["mode"],
        0,
        fields["uid"],
        fields["gid"],
        0,
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(  # ftruncate(fd, 5)
            _setattr(FATTR_SIZE | FATTR_FH | FATTR_LOCKOWNER, size=5, fh=9, lock_owner=3, uid=7),
            SetAttr(size=5, fh=9),
            id="ftruncate",
        ),
        pytest.param(  # truncate(path, 0): no handle
            _setattr(FATTR_SIZE, size=0, fh=9), SetAttr(size=0), id="truncate"
        ),
        pytest.param(  # chmod 4755: the kernel sends the type bits too
            _setattr(FATTR_MODE, mode=stat.S_IFREG | 0o4755), SetAttr(mode=0o4755), id="chmod"
        ),
        pytest.param(
            _setattr(FATTR_UID | FATTR_GID, uid=5, gid=6), SetAttr(uid=5, gid=6), id="chown"
        ),
        pytest.param(  # utimensat with both times, one before 1970
            _setattr(FATTR_ATIME | FATTR_MTIME, atime=-2, atimensec=5, mtime=3, mtimensec=7),
            SetAttr(atime_ns=-2 * 10**9 + 5, mtime_ns=3 * 10**9 + 7),
            id="utimens",
        ),
        pytest.param(  # touch: the kernel sends its clock with *_NOW
            _setattr(
                FATTR_ATIME | FATTR_ATIME_NOW | FATTR_MTIME | FATTR_MTIME_NOW, atime=4, mtime=4
            ),
            SetAttr(atime_now=True, mtime_now=True),
            id="touch",
        ),
        pytest.param(  # utimensat(UTIME_OMIT, UTIME_NOW)
            _setattr(FATTR_MTIME | FATTR_MTIME_NOW, mtime=4),
            SetAttr(mtime_now=True),
            id="mtime-now",
        ),
        pytest.param(_setattr(FATTR_CTIME, ctime=9), SetAttr(), id="ctime-only"),
    ],
)
async def test_setattr_fields(ops: Recorder, body: bytes, expected: SetAttr) -> None:
    async with serving(ops) as dev:
        payload = await dev.ask(FUSE_SETATTR, 4, body)
    assert ops.calls == [("setattr", 4, expected)]
    assert len(payload) == ATTR_OUT.size + ATTR.size
    assert _fields(payload, ATTR_OUT.size) == (4, expected.size or 0, stat.S_IFREG | 0o644)


@pytest.mark.skipif(
    int(Path("/proc/sys/net/core/wmem_max").read_text()) < 2 * MiB,
    reason="a 1 MiB request does not fit a socket buffer (net.core.wmem_max)",
)
async def test_a_write_keeps_its_data_while_the_next_request_is_read(ops: Recorder) -> None:
    first, second = os.urandom(MiB), os.urandom(MiB)  # 1 MiB: MAX_WRITE

    async def write(offset: int, data: bytes) -> int:
        return await dev.send(FUSE_WRITE, 2, WRITE_IN.pack(5, offset, len(data), 0, 0, 0, 0) + data)

    async with serving(ops) as dev:
        # The first write waits in the file system until the second is read.
        uniques = [await write(0, first), await write(MiB, second)]
        answers = sorted([await dev.answer(), await dev.answer()])
    assert answers == [(u, 0, WRITE_OUT.pack(MiB, 0)) for u in uniques]
    assert sorted(ops.calls) == [("write", 5, 0, first), ("write", 5, MiB, second)]


async def test_fsync_and_flush_are_told_apart(ops: Recorder) -> None:
    async with serving(ops) as dev:
        await dev.ask(FUSE_FSYNC, 2, FSYNC_IN.pack(5, 1, 0))  # fdatasync
        await dev.ask(FUSE_FSYNC, 2, FSYNC_IN.pack(5, 0, 0))  # fsync
        await dev.ask(FUSE_FLUSH, 2, FLUSH_IN.pack(5, 0, 0, 0))  # close
    assert ops.calls == [("fsync", 5, True), ("fsync", 5, False), ("flush", 5)]


async def test_refusals_and_the_other_changes(ops: Recorder) -> None:
    ops.refuse = {"mkdir": errno.EROFS, "unlink": errno.ENOENT, "write": errno.ENOSPC}
    async with serving(ops) as dev:
        assert await dev.refused(FUSE_MKDIR, 1, MKDIR_IN.pack(0o755, 0) + b"d\0") == errno.EROFS
        assert await dev.refused(FUSE_UNLINK, 1, b"f\0") == errno.ENOENT
        assert await dev.refused(FUSE_WRITE, 2, WRITE_IN.pack(5, 4, 1, 0, 0, 0, 0) + b"x") == (
            errno.ENOSPC
        )
        # LINK has no method of its own.
        assert await dev.refused(FUSE_LINK, 1, struct.pack("<Q", 3) + b"hard\0") == errno.EPERM
    assert ops.calls[-1] == ("change", "link")


async def test_init_takes_big_writes_and_atomic_truncate_not_the_write_back_cache(
    ops: Recorder,
) -> None:
    offered = (
        FUSE_ATOMIC_O_TRUNC
        | FUSE_BIG_WRITES
        | FUSE_WRITEBACK_CACHE
        | FUSE_HANDLE_KILLPRIV
        | FUSE_MAX_PAGES
        | FUSE_INIT_EXT
    )
    body = INIT_IN.pack(7, 45, 128 << 10, offered, FUSE_HANDLE_KILLPRIV_V2 >> 32, 0)
    async with serving(ops) as dev:
        payload = await dev.ask(FUSE_INIT, 0, body)
    out = INIT_OUT.unpack_from(payload)
    flags, max_write, max_pages, flags2 = out[3], out[6], out[8], out[10]
    assert flags & FUSE_ATOMIC_O_TRUNC and flags & FUSE_BIG_WRITES
    assert not flags & (FUSE_WRITEBACK_CACHE | FUSE_HANDLE_KILLPRIV)
    assert not (flags | flags2 << 32) & FUSE_HANDLE_KILLPRIV_V2
    assert (max_write, max_pages) == (MiB, 256)
    assert ops.calls == [("init",)]


# -- pyfuse3 -------------------------------------------------------------------------------


def _stat(**values: int) -> pyfuse3.EntryAttributes:
    attrs = pyfuse3.EntryAttributes()
    for name, value in values.items():
        setattr(attrs, name, value)
    return attrs


def _only(*names: str) -> Any:
    """A stand-in for pyfuse3.SetattrFields with *names* set."""
    every = ["update_atime", "update_mtime", "update_ctime", "update_mode"]
    every += ["update_uid", "update_gid", "update_size"]
    return SimpleNamespace(**{n: n in names for n in every})


ATTRS = dict(
    st_size=10,
    st_mode=stat.S_IFREG | 0o2750,
    st_uid=5,
    st_gid=6,
    st_atime_ns=-1_000_000_001,
    st_mtime_ns=MTIME_NS,
)


@pytest.mark.parametrize(
    ("fields", "fh", "expected"),
    [
        pytest.param(_only("update_size"), 3, SetAttr(size=10, fh=3), id="ftruncate"),
        pytest.param(_only("update_mode"), None, SetAttr(mode=0o2750), id="chmod"),
        pytest.param(_only("update_uid", "update_gid"), None, SetAttr(uid=5, gid=6), id="chown"),
        pytest.param(
            _only("update_atime", "update_mtime"),
            None,
            SetAttr(atime_ns=-1_000_000_001, mtime_ns=MTIME_NS),
            id="utimens",
        ),
        pytest.param(_only("update_ctime"), None, SetAttr(), id="ctime-only"),
    ],
)
async def test_pyfuse3_setattr_fields(
    ops: Recorder, fields: Any, fh: int | None, expected: SetAttr
) -> None:
    ctx: Any = SimpleNamespace(pid=1)  # pyfuse3 makes its RequestContexts itself
    got = await Adapter(ops).setattr(4, _stat(**ATTRS), fields, fh, ctx)
    assert ops.calls == [("setattr", 4, expected)]
    assert (got.st_ino, got.st_size, got.st_mtime_ns) == (4, expected.size or 0, MTIME_NS)


async def test_pyfuse3_handlers_hand_on_their_arguments(ops: Recorder) -> None:
    adapter = Adapter(ops)
    ctx: Any = SimpleNamespace(pid=os.getpid(), uid=0, gid=0, umask=0o022)  # a RequestContext
    info, attrs = await adapter.create(1, b"f", stat.S_IFREG | 0o600, os.O_RDWR | os.O_CREAT, ctx)
    assert (info.fh, info.keep_cache, info.direct_io) == (77, True, False)
    assert (attrs.st_ino, attrs.st_mode) == (20, stat.S_IFREG | 0o600)
    assert (await adapter.mknod(1, b"p", stat.S_IFIFO | 0o600, 0, ctx)).st_ino == 21
    assert (await adapter.mkdir(1, b"d", stat.S_IFDIR | 0o700, ctx)).st_ino == 22
    assert (await adapter.symlink(1, b"l", b"target", ctx)).st_size == len(b"target")
    await adapter.unlink(1, b"f", ctx)
    await adapter.rmdir(1, b"d", ctx)
    await adapter.rename(1, b"a", 2, b"b", RENAME_NOREPLACE, ctx)
    ops.second_write.set()
    assert await adapter.write(77, 4096, b"data") == 4
    await adapter.fsync(77, True)
    await adapter.flush(77)
    assert ops.calls == [
        ("create", 1, b"f", stat.S_IFREG | 0o600, os.O_RDWR | os.O_CREAT),
        ("mknod", 1, b"p", stat.S_IFIFO | 0o600, 0),
        ("mkdir", 1, b"d", stat.S_IFDIR | 0o700),
        ("symlink", 1, b"l", b"target"),
        ("unlink", 1, b"f"),
        ("rmdir", 1, b"d"),
        ("rename", 1, b"a", 2, b"b", RENAME_NOREPLACE),
        ("write", 77, 4096, b"data"),
        ("fsync", 77, True),
        ("flush", 77),
    ]


async def test_pyfuse3_refusals_are_pyfuse3_errors(ops: Recorder) -> None:
    adapter = Adapter(ops)
    ctx: Any = SimpleNamespace(pid=1)
    ops.refuse = {"create": errno.EROFS, "rename": errno.EXDEV}
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.create(1, b"f", stat.S_IFREG | 0o600, os.O_WRONLY, ctx)
    assert info.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.rename(1, b"a", 2, b"b", 0, ctx)
    assert info.value.errno == errno.EXDEV
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.link(3, 1, b"hard", ctx)
    assert info.value.errno == errno.EPERM
    assert ops.calls[-1] == ("change", "link")
