"""POSIX writes through a real mount of a local directory, as a user sees them.

Content and sizes after every kind of change are checked twice: through
the mount at once (every reader of the mount sees a change before it is
sent), and in the source once the change is flushed (``cachefs flush``,
``cachefs unmount``, or close with --write-back-delay 0).  Namespace
changes on files the source holds reach it at once; a file that was never
flushed never reaches it if it is removed first.  No open reads stale
bytes, not even one the kernel reads from the cache file (passthrough).
Errors are checked by their errno: EROFS for every change of a read-only
mount, ENOSPC only when --max-dirty cannot be met because the source is
offline (over a healthy source writers wait instead), EEXIST, ENOTEMPTY,
EISDIR, ENOTDIR, EINVAL, EPERM and EXDEV where POSIX, or a mirror of a
source, says so.  A file changed in the source under unflushed changes
keeps both versions.  fio lays out its own files and checks them.

Unless a test says otherwise a mount sends changes --write-back-delay
3600 s after their last close: whatever reaches the source does so because
of the command under test.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import kernel_has_passthrough, pread_direct, run_cachefs, wait_for

if TYPE_CHECKING:
    from conftest import Mount, MountFactory

LATER = ("--write-back-delay", "3600")
KB = 1024
BASE = os.urandom(200 * KB)
HELLO = b"hello\n"
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """base.bin (200 KiB of noise), hello.txt, dir/a.txt, dir/sub/b.txt, other/target.txt."""
    root = tmp_path / "src"
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "base.bin").write_bytes(BASE)
    (root / "hello.txt").write_bytes(HELLO)
    (root / "dir" / "a.txt").write_bytes(b"a\n")
    (root / "dir" / "sub" / "b.txt").write_bytes(b"b\n")
    (root / "other" / "target.txt").write_bytes(b"target\n")
    return root


def flush(*paths: Path) -> str:
    """``cachefs flush PATHS``, which must succeed; its stdout."""
    done = run_cachefs("flush", *paths)
    assert done.returncode == 0, done.stderr
    return done.stdout


def cat(path: Path) -> bytes:
    """The file's content as another process reads it."""
    done = subprocess.run(["cat", str(path)], capture_output=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def errno_of(change: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        change()
    assert info.value.errno is not None
    return info.value.errno


def renameat2(old: Path, new: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old))


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes), symlink (its target) and directory ("dir") below *root*."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = os.readlink(path)
        elif path.is_dir():
            found[rel] = "dir"
        else:
            found[rel] = path.read_bytes()
    return found


# -- content and sizes -----------------------------------------------------------------


def test_a_write_is_seen_at_once_by_every_reader_and_sent_on_flush(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    # Readers of base.bin from before any change, its pages in the kernel's cache.
    early = os.open(m / "base.bin", os.O_RDONLY)
    later = -1
    try:
        assert os.pread(early, len(BASE) + 1, 0) == BASE
        later = os.open(m / "base.bin", os.O_RDONLY)
        assert os.pread(later, len(BASE), 0) == BASE

        data = os.urandom(100 * KB)
        fd = os.open(m / "new.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            assert os.write(fd, data) == len(data)
            # Still open, never flushed: every reader sees it.
            assert "new.bin" in os.listdir(m.mountpoint)
            assert (m / "new.bin").stat().st_size == len(data)
            assert (m / "new.bin").read_bytes() == data
            assert cat(m / "new.bin") == data
            os.fsync(fd)  # returns once the source has it
            assert (source / "new.bin").read_bytes() == data
            synced = data
            assert os.pwrite(fd, b"X" * 10, 50 * KB) == 10
            data = data[: 50 * KB] + b"X" * 10 + data[50 * KB + 10 :]
            assert (m / "new.bin").read_bytes() == data
            assert pread_direct(m / "new.bin", 0, len(data)) == data
        finally:
            os.close(fd)

        # A write into the middle of a file the source holds.
        with open(m / "base.bin", "r+b") as f:
            f.seek(70 * KB + 3)
            f.write(b"Y" * 5000)
        changed = BASE[: 70 * KB + 3] + b"Y" * 5000 + BASE[70 * KB + 3 + 5000 :]
        assert (m / "base.bin").stat().st_size == len(BASE)
        assert (m / "base.bin").read_bytes() == changed
        assert cat(m / "base.bin") == changed
        # The opens made before the change read it too, never stale bytes.
        assert os.pread(early, len(BASE), 0) == changed
        assert os.pread(later, len(BASE), 0) == changed
    finally:
        os.close(early)
        if later >= 0:
            os.close(later)

    assert (source / "new.bin").read_bytes() == synced  # the change after fsync waits
    assert (source / "base.bin").read_bytes() == BASE
    out = flush(m / "new.bin", m / "base.bin")
    assert out.startswith("flushed 2 files"), out
    assert (source / "new.bin").read_bytes() == data
    assert (source / "base.bin").read_bytes() == changed
    assert (m / "base.bin").read_bytes() == changed  # the source's own again
    assert m.stats()["dirty_files"] == 0


def open_as_the_kernel_reads_it(m: Mount, name: str) -> int:
    """An open of *name*, read whole before: on a mount that can, the kernel
    reads it from the cache file itself (passthrough; earlier opens must be
    released first, which the kernel tells the daemon only after close)."""
    assert (m / name).read_bytes()
    if m.fuse != "native" or not kernel_has_passthrough():
        return os.open(m / name, os.O_RDONLY)
    fds: list[int] = []

    def passthrough_open() -> bool:
        before = m.stats()["passthrough_opens"]
        fds.append(os.open(m / name, os.O_RDONLY))
        if m.stats()["passthrough_opens"] > before:
            return True
        os.close(fds.pop())
        return False

    wait_for(f"an open of {name} read by the kernel itself", passthrough_open)
    return fds[0]


def test_an_open_made_before_a_write_reads_the_new_bytes(mount: MountFactory, source: Path) -> None:
    """A file open for writing is never read stale through another open made
    through the daemon; one the kernel reads from the cache file itself
    (passthrough, opened before the writer) keeps the version it opened,
    whole: one version, never a mix (docs/writes.md)."""
    m = mount(source, *LATER)
    reader = open_as_the_kernel_reads_it(m, "base.bin")
    kernel_reads = m.fuse == "native" and kernel_has_passthrough()
    try:
        assert os.pread(reader, 10, 100) == BASE[100:110]
        with open(m / "base.bin", "r+b") as f:
            f.seek(100)
            f.write(b"Z" * 10)
            f.seek(len(BASE) + 1000)
            f.write(b"end")
        later = os.open(m / "base.bin", os.O_RDONLY)
        try:
            assert os.pread(later, 10, 100) == b"Z" * 10
            assert os.fstat(later).st_size == len(BASE) + 1003
        finally:
            os.close(later)
        if kernel_reads:
            assert os.fstat(reader).st_size == len(BASE)
            assert os.pread(reader, len(BASE), 0) == BASE
        else:
            assert os.pread(reader, 10, 100) == b"Z" * 10
            assert os.fstat(reader).st_size == len(BASE) + 1003
            assert os.pread(reader, 10, len(BASE) + 1000) == b"end"
    finally:
        os.close(reader)


def test_truncate_down_and_up_and_sparse_writes(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    # truncate(2) down then up, without an open: zeros in the gap.
    os.truncate(m / "base.bin", 1000)
    assert (m / "base.bin").stat().st_size == 1000
    os.truncate(m / "base.bin", 50 * KB)
    base = BASE[:1000] + bytes(50 * KB - 1000)
    assert (m / "base.bin").read_bytes() == base
    # ftruncate(2) through a handle that also writes.
    with open(m / "dir" / "a.txt", "r+b") as f:
        f.truncate(1)
        f.seek(10)
        f.write(b"end")
        f.flush()
        assert os.fstat(f.fileno()).st_size == 13
    a = b"a" + bytes(9) + b"end"
    assert (m / "dir" / "a.txt").read_bytes() == a
    # O_TRUNC of a file the source holds, then a shorter content: a handle
    # open from before sees the new size and bytes.
    reader = os.open(m / "other" / "target.txt", os.O_RDONLY)
    try:
        assert os.pread(reader, 100, 0) == b"target\n"
        (m / "other" / "target.txt").write_bytes(b"t")
        assert os.fstat(reader).st_size == 1
        assert os.pread(reader, 100, 0) == b"t"
    finally:
        os.close(reader)
    # Far past the end of a file the source holds, and of a new file.
    far = 16 << 20
    with open(m / "hello.txt", "r+b") as f:
        f.seek(far)
        f.write(b"tail")
    with open(m / "sparse.bin", "wb") as f:
        f.seek(far + 3)
        f.write(b"end")
    assert (m / "hello.txt").stat().st_size == far + 4
    assert pread_direct(m / "hello.txt", 0, 4096) == HELLO + bytes(4096 - len(HELLO))
    assert pread_direct(m / "hello.txt", far - 4096, 8192) == bytes(4096) + b"tail"
    assert (m / "sparse.bin").stat().st_size == far + 6
    assert pread_direct(m / "sparse.bin", 8 << 20, 4096) == bytes(4096)
    assert pread_direct(m / "sparse.bin", far, 4096) == bytes(3) + b"end"
    assert (source / "hello.txt").read_bytes() == HELLO
    assert (source / "base.bin").read_bytes() == BASE

    m.unmount()  # flushes
    assert (source / "base.bin").read_bytes() == base
    assert (source / "dir" / "a.txt").read_bytes() == a
    assert (source / "other" / "target.txt").read_bytes() == b"t"
    assert (source / "hello.txt").read_bytes() == HELLO + bytes(far - len(HELLO)) + b"tail"
    assert (source / "sparse.bin").read_bytes() == bytes(far + 3) + b"end"


def test_write_back_delay_0_sends_each_change_when_it_is_closed(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, "--write-back-delay", "0")
    data = os.urandom(300 * KB)
    with open(m / "new.bin", "wb") as f:
        f.write(data)
    assert (source / "new.bin").read_bytes() == data
    with open(m / "base.bin", "r+b") as f:
        f.seek(100 * KB)
        f.write(b"Z" * 100)
    base = BASE[: 100 * KB] + b"Z" * 100 + BASE[100 * KB + 100 :]
    assert (source / "base.bin").read_bytes() == base
    with open(m / "hello.txt", "ab") as f:
        f.write(b"more\n")
    assert (source / "hello.txt").read_bytes() == HELLO + b"more\n"
    with open(m / "new.bin", "r+b") as f:
        f.truncate(10)
    assert (source / "new.bin").read_bytes() == data[:10]
    # truncate(2) has no close: it is sent without one.
    os.truncate(m / "dir" / "a.txt", 1)
    wait_for("the cut file is sent", lambda: (source / "dir" / "a.txt").read_bytes() == b"a")
    assert m.stats()["dirty_files"] == 0


def test_mmap_o_direct_cp_and_the_write_back_delay(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    """Other ways to write, sent --write-back-delay 1 s after the last close
    with no command."""
    m = mount(source, "--write-back-delay", "1")
    with open(m / "base.bin", "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        mapped[1000:1005] = b"MMAP!"
        mapped.flush()
    base = BASE[:1000] + b"MMAP!" + BASE[1005:]
    assert (m / "base.bin").read_bytes() == base
    fd = os.open(m / "direct.bin", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        with mmap.mmap(-1, 8192) as aligned:
            aligned.write(b"D" * 8192)
            assert os.pwrite(fd, aligned, 0) == 8192
            aligned[:] = bytes(8192)
            assert os.preadv(fd, [aligned], 0) == 8192
            assert aligned[:] == b"D" * 8192
    finally:
        os.close(fd)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(os.urandom(300 * KB))
    subprocess.run(["cp", str(outside), str(m / "in.bin")], check=True)
    subprocess.run(["cp", str(m / "base.bin"), str(m / "dir" / "copy.bin")], check=True)
    expected = {
        "base.bin": base,
        "direct.bin": b"D" * 8192,
        "in.bin": outside.read_bytes(),
        "dir/copy.bin": base,
    }
    for name, data in expected.items():
        assert (m / name).read_bytes() == data, name

    def sent() -> bool:
        return all(
            (source / name).exists() and (source / name).read_bytes() == data
            for name, data in expected.items()
        )

    wait_for("the closed files are sent", sent)
    wait_for("nothing left to send", lambda: m.stats()["dirty_files"] == 0)


def test_o_append_from_two_handles_and_another_process(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    expected = bytearray(HELLO)
    one = os.open(m / "hello.txt", os.O_WRONLY | os.O_APPEND)
    two = os.open(m / "hello.txt", os.O_WRONLY | os.O_APPEND)
    new_one = os.open(m / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    new_two = os.open(m / "log.txt", os.O_WRONLY | os.O_APPEND)
    log = bytearray()
    try:
        for i in range(20):
            record = f"{i:03d}-{'a' * (i % 7)}\n".encode()
            fd = (one, two)[i % 2]
            assert os.write(fd, record) == len(record)
            expected += record
            assert os.write((new_one, new_two)[i % 2], record) == len(record)
            log += record
            if i % 5 == 4:
                subprocess.run(
                    ["sh", "-c", f'printf "shell{i}\\n" >> "{m / "hello.txt"}"'], check=True
                )
                expected += f"shell{i}\n".encode()
        # pwrite on O_APPEND appends too (Linux).
        os.pwrite(one, b"P\n", 0)
        expected += b"P\n"
        assert os.fstat(two).st_size == len(expected)
    finally:
        for fd in (one, two, new_one, new_two):
            os.close(fd)
    assert (m / "hello.txt").read_bytes() == bytes(expected)
    assert (m / "log.txt").read_bytes() == bytes(log)
    flush(m.mountpoint)
    assert (source / "hello.txt").read_bytes() == bytes(expected)
    assert (source / "log.txt").read_bytes() == bytes(log)


WRITER = """
import os, sys
path, start, size, chunk = sys.argv[1], *map(int, sys.argv[2:])
fd = os.open(path, os.O_WRONLY)
for offset in range(start + size - chunk, start - 1, -chunk):
    os.pwrite(fd, bytes([start // size + 1]) * chunk, offset)
os.close(fd)
"""


def test_many_writers_to_distinct_regions_of_one_file(mount: MountFactory, source: Path) -> None:
    """8 threads and 2 processes, each writing its own 128 KiB of one file
    (backwards, so that they keep extending it concurrently)."""
    m = mount(source, *LATER)
    region, chunk, threads, processes = 128 * KB, 4 * KB, 8, 2
    path = m / "shared.bin"
    path.write_bytes(b"")
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                for offset in range(n * region + region - chunk, n * region - 1, -chunk):
                    assert os.pwrite(fd, bytes([n + 1]) * chunk, offset) == chunk
            finally:
                os.close(fd)
        except BaseException as e:  # reported by the test below
            errors.append(e)

    workers = [threading.Thread(target=write, args=(n,)) for n in range(threads)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(n * region), str(region), str(chunk)]
        )
        for n in range(threads, threads + processes)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [p.wait(timeout=60) for p in procs] == [0] * processes
    assert errors == []
    expected = b"".join(bytes([n + 1]) * region for n in range(threads + processes))
    assert path.stat().st_size == len(expected)
    assert path.read_bytes() == expected
    assert cat(path) == expected
    flush(path)
    assert (source / "shared.bin").read_bytes() == expected


RECORD = 4 * KB
RECORDS = 300


def record(i: int) -> bytes:
    return struct.pack("<I", i) * (RECORD // 4)


def test_readers_during_appends_see_only_whole_records(mount: MountFactory, source: Path) -> None:
    """A writer appends fixed records; readers (one open from before the
    first record, one opening anew each time) never see a size that is not
    a whole number of records, nor a byte that is not that record's."""
    m = mount(source, *LATER)
    path = m / "records.bin"
    path.write_bytes(b"")
    final = RECORD * RECORDS
    seen: list[set[int]] = [set(), set()]
    errors: list[BaseException] = []

    def check(fd: int, sizes: set[int]) -> int:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        # A read may end short of what stat said while a write is in flight:
        # stat can show the size the daemon has already, the kernel bounds a
        # read by its own, which it updates when the write returns.
        assert size % RECORD == 0 and len(data) % RECORD == 0 and len(data) <= size, size
        for i in range(len(data) // RECORD):
            assert data[i * RECORD : (i + 1) * RECORD] == record(i), (size, i)
        sizes.add(len(data))
        return len(data)

    def read(n: int) -> None:
        try:
            if n == 0:
                while check(early, seen[0]) < final:
                    pass
            else:
                while True:
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        if check(fd, seen[1]) == final:
                            break
                    finally:
                        os.close(fd)
        except BaseException as e:  # reported by the test below
            errors.append(e)

    early = os.open(path, os.O_RDONLY)
    try:
        readers = [threading.Thread(target=read, args=(n,), daemon=True) for n in range(2)]
        for r in readers:
            r.start()
        with open(path, "ab", buffering=0) as f:
            for i in range(RECORDS):
                assert f.write(record(i)) == RECORD
        for r in readers:
            r.join(timeout=60)
            assert not r.is_alive(), "a reader never saw the final size"
    finally:
        os.close(early)
    assert errors == []
    assert all(final in sizes for sizes in seen)
    flush(path)
    assert (source / "records.bin").read_bytes() == b"".join(map(record, range(RECORDS)))


# -- the namespace ---------------------------------------------------------------------


def test_renames_of_files(mount: MountFactory, source: Path, tmp_path: Path) -> None:
    m = mount(source, *LATER)
    # Within a directory, across directories: the source follows at once.
    os.rename(m / "hello.txt", m / "hello2.txt")
    os.rename(m / "dir" / "a.txt", m / "other" / "a.txt")
    assert (m / "hello2.txt").read_bytes() == HELLO
    assert (m / "other" / "a.txt").read_bytes() == b"a\n"
    assert not (m / "hello.txt").exists() and not (m / "dir" / "a.txt").exists()
    assert (source / "hello2.txt").read_bytes() == HELLO
    assert (source / "other" / "a.txt").read_bytes() == b"a\n"
    assert not (source / "hello.txt").exists() and not (source / "dir" / "a.txt").exists()
    # Over an existing file: the old target is gone, its content replaced;
    # a handle open on the old target still reads it.
    old_target = os.open(m / "other" / "target.txt", os.O_RDONLY)
    try:
        assert os.pread(old_target, 100, 0) == b"target\n"
        os.rename(m / "base.bin", m / "other" / "target.txt")
        assert os.pread(old_target, 100, 0) == b"target\n"
    finally:
        os.close(old_target)
    assert (m / "other" / "target.txt").read_bytes() == BASE
    assert sorted(os.listdir(m / "other")) == ["a.txt", "target.txt"]
    assert (source / "other" / "target.txt").read_bytes() == BASE
    assert not (source / "base.bin").exists()

    # Files never flushed: renamed in the cache, sent under their last name.
    (m / "new.txt").write_bytes(b"new\n")
    os.rename(m / "new.txt", m / "dir" / "moved.txt")
    (m / "fresh.txt").write_bytes(b"fresh\n")
    os.rename(m / "fresh.txt", m / "hello2.txt")  # over a file the source holds
    assert (m / "hello2.txt").read_bytes() == b"fresh\n"
    assert (m / "dir" / "moved.txt").read_bytes() == b"new\n"
    # A file the source holds, changed and not flushed, then renamed.
    with open(m / "other" / "a.txt", "ab") as f:
        f.write(b"more\n")
    os.rename(m / "other" / "a.txt", m / "other" / "a2.txt")
    assert (m / "other" / "a2.txt").read_bytes() == b"a\nmore\n"
    # An open handle follows its file through a rename.
    with open(m / "dir" / "moved.txt", "r+b") as f:
        os.rename(m / "dir" / "moved.txt", m / "dir" / "moved2.txt")
        f.seek(0, os.SEEK_END)
        f.write(b"after\n")
    assert (m / "dir" / "moved2.txt").read_bytes() == b"new\nafter\n"

    # What cannot be done; out of the mount, EXDEV (mv copies then).
    hello2, target = m / "hello2.txt", m / "other" / "target.txt"
    assert errno_of(lambda: renameat2(hello2, target, RENAME_NOREPLACE)) == errno.EEXIST
    assert errno_of(lambda: renameat2(hello2, target, RENAME_EXCHANGE)) == errno.EINVAL
    assert errno_of(lambda: os.rename(hello2, m / "dir")) == errno.EISDIR
    assert errno_of(lambda: os.rename(m / "missing", m / "x")) == errno.ENOENT
    assert errno_of(lambda: os.rename(hello2, tmp_path / "out")) == errno.EXDEV
    renameat2(m / "hello2.txt", m / "hello3.txt", RENAME_NOREPLACE)  # to a free name: done
    assert (m / "hello3.txt").read_bytes() == b"fresh\n"

    flush(m.mountpoint)
    assert tree(source) == {
        "dir": "dir",
        "dir/moved2.txt": b"new\nafter\n",
        "dir/sub": "dir",
        "dir/sub/b.txt": b"b\n",
        "hello3.txt": b"fresh\n",
        "other": "dir",
        "other/a2.txt": b"a\nmore\n",
        "other/target.txt": BASE,
    }
    assert tree(m.mountpoint) == tree(source)


def test_renames_of_directories(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    # Changes not flushed move with their directory: a new file, a changed one.
    (m / "dir" / "sub" / "new.txt").write_bytes(b"unflushed\n")
    with open(m / "dir" / "a.txt", "ab") as f:
        f.write(b"more\n")
    os.rename(m / "dir", m / "other" / "moved")
    assert sorted(os.listdir(m / "other" / "moved")) == ["a.txt", "sub"]
    assert (m / "other" / "moved" / "sub" / "b.txt").read_bytes() == b"b\n"
    assert (m / "other" / "moved" / "sub" / "new.txt").read_bytes() == b"unflushed\n"
    assert not (m / "dir").exists()
    assert (source / "other" / "moved" / "sub" / "b.txt").read_bytes() == b"b\n"
    assert not (source / "dir").exists()
    # Over an empty directory; not over a file nor a full directory, not into itself.
    os.mkdir(m / "empty")
    os.rename(m / "other" / "moved", m / "empty")
    assert (m / "empty" / "a.txt").read_bytes() == b"a\nmore\n"
    assert errno_of(lambda: os.rename(m / "empty", m / "other")) in (errno.ENOTEMPTY, errno.EEXIST)
    assert errno_of(lambda: os.rename(m / "empty", m / "hello.txt")) == errno.ENOTDIR
    assert errno_of(lambda: os.rename(m / "empty", m / "empty" / "sub" / "in")) == errno.EINVAL

    flush(m.mountpoint)
    assert tree(source) == {
        "base.bin": BASE,
        "empty": "dir",
        "empty/a.txt": b"a\nmore\n",
        "empty/sub": "dir",
        "empty/sub/b.txt": b"b\n",
        "empty/sub/new.txt": b"unflushed\n",
        "hello.txt": HELLO,
        "other": "dir",
        "other/target.txt": b"target\n",
    }
    assert tree(m.mountpoint) == tree(source)


def test_directories_and_unlink(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    os.mkdir(m / "made")
    assert (source / "made").is_dir()  # at once
    assert errno_of(lambda: os.mkdir(m / "made")) == errno.EEXIST
    assert errno_of(lambda: os.mkdir(m / "hello.txt")) == errno.EEXIST
    assert errno_of(lambda: os.mkdir(m / "missing" / "x")) == errno.ENOENT
    (m / "made" / "inside.txt").write_bytes(b"inside\n")
    # Not empty in the source, or only in the cache: ENOTEMPTY.
    assert errno_of(lambda: os.rmdir(m / "dir")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(m / "made")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rmdir(m / "hello.txt")) == errno.ENOTDIR
    assert errno_of(lambda: os.unlink(m / "dir")) == errno.EISDIR
    assert errno_of(lambda: os.open(m / "hello.txt", os.O_CREAT | os.O_EXCL | os.O_WRONLY)) == (
        errno.EEXIST
    )

    # What a mirror of a source does not have, and what stands in for it.
    assert errno_of(lambda: os.link(m / "hello.txt", m / "hard")) == errno.EPERM
    assert errno_of(lambda: os.mkfifo(m / "fifo")) == errno.EPERM
    assert errno_of(lambda: os.setxattr(m / "hello.txt", "user.x", b"1")) == errno.EOPNOTSUPP
    os.mknod(m / "node", 0o644 | stat.S_IFREG)  # a regular file: made
    fd = os.open(m / "allocated", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 10_000)  # the C library writes zeros instead
        assert os.fstat(fd).st_size == 10_000
    finally:
        os.close(fd)

    # A file the source holds: gone from both at once.
    os.unlink(m / "dir" / "sub" / "b.txt")
    assert not (m / "dir" / "sub" / "b.txt").exists()
    assert not (source / "dir" / "sub" / "b.txt").exists()
    os.rmdir(m / "dir" / "sub")
    assert not (source / "dir" / "sub").exists()
    assert os.listdir(m / "dir") == ["a.txt"]

    # New files never flushed: the source never sees them.
    (m / "gone.txt").write_bytes(b"never sent\n")
    os.unlink(m / "gone.txt")
    os.unlink(m / "made" / "inside.txt")
    os.rmdir(m / "made")
    assert not (m / "made").exists() and not (source / "made").exists()
    # A source file changed, not flushed, then removed: neither version stays.
    with open(m / "base.bin", "r+b") as f:
        f.write(b"changed")
    os.unlink(m / "base.bin")
    assert not (source / "base.bin").exists()

    m.unmount()  # flushes
    assert tree(source) == {
        "allocated": bytes(10_000),
        "dir": "dir",
        "dir/a.txt": b"a\n",
        "hello.txt": HELLO,
        "node": b"",
        "other": "dir",
        "other/target.txt": b"target\n",
    }


def test_a_directory_holding_only_unflushed_files_is_not_empty(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    os.mkdir(m / "full")
    (m / "full" / "f").write_bytes(b"f")  # only in the cache
    os.mkdir(m / "empty")
    assert errno_of(lambda: os.rmdir(m / "full")) == errno.ENOTEMPTY
    assert errno_of(lambda: os.rename(m / "empty", m / "full")) in (errno.ENOTEMPTY, errno.EEXIST)
    assert sorted(os.listdir(m / "full")) == ["f"]
    assert (m / "empty").is_dir()
    flush(m.mountpoint)
    assert (source / "full" / "f").read_bytes() == b"f"
    assert os.listdir(source / "empty") == []


@pytest.mark.parametrize("kind", ["new", "source"])
def test_an_unlinked_file_stays_usable_through_its_open_handles(
    mount: MountFactory, source: Path, kind: str
) -> None:
    """A file never flushed (new), or one the source holds, unlinked while
    two handles are open on it: both still read it, and what one writes
    the other reads; nothing of it reaches the source."""
    m = mount(source, *LATER)
    path = m / ("open.txt" if kind == "new" else "hello.txt")
    first = b"open\n" if kind == "new" else HELLO
    if kind == "new":
        path.write_bytes(first)
    writer = os.open(path, os.O_RDWR)
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, 100, 0) == first
        os.unlink(path)
        assert not path.exists()
        assert path.name not in os.listdir(m.mountpoint)
        assert os.fstat(writer).st_size == len(first)
        assert os.pread(reader, 100, 0) == first
        assert os.pwrite(writer, b"still\n", len(first)) == 6
        assert os.fstat(reader).st_size == len(first) + 6
        assert os.pread(reader, 100, 0) == first + b"still\n"
        assert os.pread(writer, 100, 0) == first + b"still\n"
    finally:
        os.close(writer)
        os.close(reader)
    assert not path.exists()
    m.unmount()
    assert not (source / path.name).exists()


def test_symlink_chmod_and_utime(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    os.symlink("hello.txt", m / "link")
    os.symlink("/nowhere/at/all", m / "dir" / "dangling")
    assert os.readlink(m / "link") == "hello.txt"
    assert (m / "link").read_bytes() == HELLO
    assert os.readlink(m / "dir" / "dangling") == "/nowhere/at/all"
    assert stat.S_ISLNK(os.lstat(m / "link").st_mode)
    assert os.readlink(source / "link") == "hello.txt"  # at once
    assert os.readlink(source / "dir" / "dangling") == "/nowhere/at/all"
    assert errno_of(lambda: os.symlink("x", m / "hello.txt")) == errno.EEXIST

    # Modes given at creation.
    os.close(os.open(m / "private", os.O_WRONLY | os.O_CREAT, 0o600))
    os.mkdir(m / "pdir", 0o700)
    assert stat.S_IMODE((m / "private").stat().st_mode) == 0o600
    assert stat.S_IMODE((m / "pdir").stat().st_mode) == 0o700
    assert stat.S_IMODE((source / "pdir").stat().st_mode) == 0o700  # at once
    # A write makes the mtime new.
    os.utime(source / "other" / "target.txt", (1_000_000_000, 1_000_000_000))
    assert (m / "other" / "target.txt").stat().st_mtime == 1_000_000_000
    with open(m / "other" / "target.txt", "ab") as f:
        f.write(b"x")
    written = (m / "other" / "target.txt").stat().st_mtime
    assert written > 1_000_000_000

    # A file the source holds, with no change of content.
    os.chmod(m / "hello.txt", 0o600)
    os.utime(m / "hello.txt", (1_000_000_000, 1_100_000_000))
    st = (m / "hello.txt").stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_mtime == 1_100_000_000
    # A file written, then given its mode and times, as cp -p and tar do.
    (m / "new.txt").write_bytes(b"new\n")
    os.chmod(m / "new.txt", 0o640)
    os.utime(m / "new.txt", (1_200_000_000, 1_300_000_000.5))
    with open(m / "dir" / "a.txt", "ab") as f:
        f.write(b"more\n")
    os.utime(m / "dir" / "a.txt", (1_200_000_000, 1_250_000_000))
    os.chmod(m / "dir" / "a.txt", 0o751)
    for path, mode, mtime in [
        ("new.txt", 0o640, 1_300_000_000.5),
        ("dir/a.txt", 0o751, 1_250_000_000),
    ]:
        st = (m / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (mode, mtime), path
    assert errno_of(lambda: os.chown(m / "hello.txt", 12345, 12345)) == errno.EPERM

    flush(m.mountpoint)
    for path, mode, mtime in [
        ("private", 0o600, (m / "private").stat().st_mtime),
        ("other/target.txt", 0o644, written),
        ("hello.txt", 0o600, 1_100_000_000),
        ("new.txt", 0o640, 1_300_000_000.5),
        ("dir/a.txt", 0o751, 1_250_000_000),
    ]:
        st = (source / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (mode, mtime), path
        st = (m / path).stat()
        assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (mode, mtime), path
    assert (source / "new.txt").read_bytes() == b"new\n"
    assert (source / "dir" / "a.txt").read_bytes() == b"a\nmore\n"


# -- errors ---------------------------------------------------------------------------


def test_a_read_only_mount_refuses_every_change_with_erofs(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, "--read-only")
    before = tree(source)
    changes: dict[str, Callable[[], object]] = {
        "create": lambda: os.open(m / "new.txt", os.O_WRONLY | os.O_CREAT, 0o644),
        "open for writing": lambda: os.open(m / "hello.txt", os.O_WRONLY),
        "open read-write": lambda: os.open(m / "hello.txt", os.O_RDWR),
        "O_TRUNC": lambda: os.open(m / "hello.txt", os.O_RDONLY | os.O_TRUNC),
        "truncate": lambda: os.truncate(m / "hello.txt", 0),
        "mkdir": lambda: os.mkdir(m / "d"),
        "rmdir": lambda: os.rmdir(m / "other"),
        "unlink": lambda: os.unlink(m / "hello.txt"),
        "rename": lambda: os.rename(m / "hello.txt", m / "h"),
        "rename over": lambda: os.rename(m / "hello.txt", m / "other" / "target.txt"),
        "symlink": lambda: os.symlink("hello.txt", m / "l"),
        "link": lambda: os.link(m / "hello.txt", m / "l"),
        "chmod": lambda: os.chmod(m / "hello.txt", 0o600),
        "utime": lambda: os.utime(m / "hello.txt", (1, 1)),
        "mknod": lambda: os.mkfifo(m / "fifo"),
        "setxattr": lambda: os.setxattr(m / "hello.txt", "user.x", b"1"),
    }
    got = {name: errno_of(change) for name, change in changes.items()}
    assert got == dict.fromkeys(changes, errno.EROFS)
    assert (m / "hello.txt").read_bytes() == HELLO
    assert tree(source) == before
    numbers = m.stats()
    assert numbers["read_only"] is True and numbers["dirty_files"] == 0


def write_rules(path: Path, rules: list[dict[str, object]]) -> None:
    """Replace the faults file atomically, as the faulty backend expects."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, path)


def test_writers_wait_for_room_under_max_dirty_and_never_fail(
    mount: MountFactory, source: Path
) -> None:
    """Writers together far past --max-dirty, the source healthy: they wait
    while changed files are sent (backpressure), and every write succeeds."""
    m = mount(source, *LATER, "--max-dirty", "1M", block_size=None)
    data = os.urandom(4 << 20)
    errors: list[tuple[str, OSError]] = []

    def write(name: str) -> None:
        try:
            with open(m / name, "wb") as f:
                for offset in range(0, len(data), 64 * KB):
                    f.write(data[offset : offset + 64 * KB])
        except OSError as e:  # reported by the test below
            errors.append((name, e))

    rounds, together = 6, 4
    names = [f"w{round}-{n}.bin" for round in range(rounds) for n in range(together)]
    for round in range(rounds):
        batch = names[round * together : (round + 1) * together]
        writers = [threading.Thread(target=write, args=(name,)) for name in batch]
        for w in writers:
            w.start()
        for w in writers:
            w.join()
    assert errors == []
    for name in names:
        assert (m / name).read_bytes() == data, name
    flush(m.mountpoint)
    for name in names:
        assert (source / name).read_bytes() == data, name


def offline_mount(mount: MountFactory, source: Path, rules: Path, *options: object) -> Mount:
    """A mount whose source refuses every WriteData with PERMANENT_FAILURE,
    after it has listed the root and read hello.txt."""
    write_rules(rules, [{"file": "*", "op": "write", "result": "PERMANENT_FAILURE"}])
    m = mount(source, *LATER, "--faults", rules, *options)
    assert sorted(os.listdir(m.mountpoint)) == ["base.bin", "dir", "hello.txt", "other"]
    assert (m / "hello.txt").read_bytes() == HELLO
    return m


def go_offline(m: Mount, path: Path) -> None:
    """Flush *path* (changed) into the PERMANENT_FAILURE: the storage is latched."""
    done = run_cachefs("flush", path)
    assert done.returncode == 1, done
    assert "offline" in done.stderr, done.stderr
    assert m.stats()["external_error"]


def back_online(m: Mount, rules: Path) -> None:
    write_rules(rules, [])
    done = run_cachefs("reset-external-error", m.mountpoint)
    assert done.returncode == 0, done.stderr
    flush(m.mountpoint)
    assert m.stats()["dirty_files"] == 0


def test_enospc_when_the_source_is_offline_and_max_dirty_is_reached(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    """Offline writes land in the cache up to --max-dirty, then ENOSPC; after
    the reset they are sent."""
    rules = tmp_path / "rules.json"
    m = offline_mount(mount, source, rules, "--max-dirty", "1M")
    fd = os.open(m / "second.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        first = os.urandom(700 * KB)
        (m / "first.bin").write_bytes(first)
        go_offline(m, m / "first.bin")
        assert (m / "first.bin").read_bytes() == first  # still served from the cache
        with open(m / "hello.txt", "ab") as f:  # offline writes land in the cache
            f.write(b"offline\n")

        second = os.urandom(700 * KB)
        written = 0
        with pytest.raises(OSError) as info:
            while written < len(second):
                written += os.write(fd, second[written : written + 64 * KB])
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert 0 < written < len(second)
    assert (m / "second.bin").read_bytes() == second[:written]  # what was taken stays
    assert not (source / "first.bin").exists()

    back_online(m, rules)
    assert (source / "first.bin").read_bytes() == first
    assert (source / "second.bin").read_bytes() == second[:written]
    assert (source / "hello.txt").read_bytes() == HELLO + b"offline\n"


def test_a_file_made_while_the_source_is_offline_is_sent_after_the_reset(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.json"
    m = offline_mount(mount, source, rules)
    (m / "first.bin").write_bytes(b"first\n")
    os.listdir(m / "dir")  # listed while online: offline, a name it lacks is free
    go_offline(m, m / "first.bin")
    (m / "second.bin").write_bytes(b"second\n")  # a name the mount has not listed since
    (m / "dir" / "third.bin").write_bytes(b"third\n")
    (m / "dir" / "fourth.bin").write_bytes(b"fourth\n")  # a second one, in the same place
    assert (m / "second.bin").read_bytes() == b"second\n"
    # No file is made under a directory the mount cannot know offline.
    with pytest.raises(OSError) as info:
        (m / "dir" / "sub" / "x").write_bytes(b"x")
    assert info.value.errno in (errno.EIO, errno.ENOENT)
    back_online(m, rules)
    assert (source / "second.bin").read_bytes() == b"second\n"
    assert (source / "dir" / "third.bin").read_bytes() == b"third\n"
    assert (source / "dir" / "fourth.bin").read_bytes() == b"fourth\n"


# -- fio and conflicts -----------------------------------------------------------------


def fio(directory: Path, name: str, rw: str, *options: str) -> None:
    done = subprocess.run(
        ["fio", f"--name={name}", f"--directory={directory}", f"--rw={rw}", "--size=8M"]
        + ["--bs=64k", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0", *options],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify" not in done.stderr, done.stderr


def test_fio_lays_out_its_files_and_verifies_them(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    os.mkdir(m / "fio")
    fio(m / "fio", "seq", "write")
    fio(m / "fio", "rand", "randwrite", "--bs=4k", "--numjobs=2", "--end_fsync=1")
    made = {p.name: p.stat().st_size for p in (m / "fio").iterdir()}
    assert made == {"seq.0.0": 8 << 20, "rand.0.0": 8 << 20, "rand.1.0": 8 << 20}
    # What fio wrote reads back, and fio's own check of it passes on another pass.
    fio(m / "fio", "seq", "read", "--verify_only")
    fio(m / "fio", "rand", "randread", "--bs=4k", "--numjobs=2", "--verify_only")
    m.unmount()
    for name, size in made.items():
        assert (source / "fio" / name).stat().st_size == size
    again = mount(source, *LATER)
    fio(again / "fio", "seq", "read", "--verify_only")
    fio(again / "fio", "rand", "randread", "--bs=4k", "--numjobs=2", "--verify_only")


def test_a_file_changed_in_the_source_meanwhile_keeps_both_versions(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    with open(m / "hello.txt", "ab") as f:
        f.write(b"ours\n")
    (m / "dir" / "new.txt").write_bytes(b"ours, new\n")
    (m / "other" / "target.txt").write_bytes(b"ours, replaced\n")
    # Meanwhile, in the source itself.
    (source / "hello.txt").write_bytes(b"theirs, longer than ours\n")
    (source / "dir" / "new.txt").write_bytes(b"theirs, new\n")
    (source / "other" / "target.txt").unlink()

    done = run_cachefs("flush", m.mountpoint)
    assert done.returncode == 1, done
    assert done.stderr.count("changed in the source meanwhile") == 3, done.stderr
    assert (source / "hello.txt").read_bytes() == b"theirs, longer than ours\n"
    assert (source / "dir" / "new.txt").read_bytes() == b"theirs, new\n"
    (copy,) = source.glob("hello.txt.conflict-*")
    assert copy.read_bytes() == HELLO + b"ours\n"
    (new_copy,) = (source / "dir").glob("new.txt.conflict-*")
    assert new_copy.read_bytes() == b"ours, new\n"
    # The mount shows the same.
    assert (m / "hello.txt").read_bytes() == b"theirs, longer than ours\n"
    assert (m / copy.name).read_bytes() == HELLO + b"ours\n"
    assert (m / "dir" / new_copy.name).read_bytes() == b"ours, new\n"
    (gone_copy,) = (source / "other").glob("target.txt.conflict-*")
    assert gone_copy.read_bytes() == b"ours, replaced\n"
    assert sorted(os.listdir(m / "other")) == [gone_copy.name]
    numbers = m.stats()
    assert numbers["write_conflicts"] == 3 and numbers["dirty_files"] == 0
