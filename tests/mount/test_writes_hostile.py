"""Writes through a real mount as a demanding user makes them (issue 22).

Each test does what real programs do to a read-write mount (mmap, sqlite,
git, tar, races between processes, odd names, huge sparse offsets, changes
behind the mount's back) and checks what docs/writes.md promises: the mount
shows every change at once, the source holds it after ``cachefs flush``,
nothing hangs, an error is one line with a non-zero exit.

Unless a test says otherwise a mount sends changes --write-back-delay
3600 s after their last close: whatever reaches the source does so because
of the command under test.
"""

from __future__ import annotations

import errno
import mmap
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import run_cachefs, wait_for

if TYPE_CHECKING:
    from conftest import MountFactory

LATER = ("--write-back-delay", "3600")
KB = 1024
NATIVE = pytest.mark.parametrize("mount", ["native"], indirect=True)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """hello.txt and dir/a.txt."""
    root = tmp_path / "src"
    (root / "dir").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello\n")
    (root / "dir" / "a.txt").write_bytes(b"a\n")
    return root


def flush(*paths: Path) -> str:
    done = run_cachefs("flush", *paths)
    assert done.returncode == 0, done.stderr
    return done.stdout


@NATIVE
def test_mmap_shared_write_reaches_the_source(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    path = m / "mm.bin"
    path.write_bytes(b"\0" * (64 * KB))
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 64 * KB, mmap.MAP_SHARED)
        mm[4096:4101] = b"HELLO"
        mm[60000:60003] = b"END"
        mm.flush()
        mm.close()
    expected = bytearray(64 * KB)
    expected[4096:4101] = b"HELLO"
    expected[60000:60003] = b"END"
    assert path.read_bytes() == expected
    flush(m.mountpoint)
    assert (source / "mm.bin").read_bytes() == expected


@NATIVE
def test_empty_new_file_is_created_in_the_source(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    (m / "empty").touch()
    (m / "dir" / "empty2").write_bytes(b"")
    flush(m.mountpoint)
    assert (source / "empty").exists() and (source / "empty").stat().st_size == 0
    assert (source / "dir" / "empty2").read_bytes() == b""
    assert m.stats()["dirty_files"] == 0


@NATIVE
def test_truncating_an_existing_file_to_zero_reaches_the_source(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    with open(m / "hello.txt", "wb"):
        pass
    flush(m.mountpoint)
    assert (source / "hello.txt").read_bytes() == b""


ODD_NAMES = [
    "with space.txt",
    "unicodé-日本語.txt",
    "new\nline.txt",
    "x" * 255,
    "hello.txt.conflict-20260105T143000Z",
    "-dash",
    ".hidden",
    "trailing.",
]


@NATIVE
def test_odd_names_are_written_and_flushed(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    for i, name in enumerate(ODD_NAMES):
        (m / name).write_bytes(f"{i}\n".encode())
    assert set(ODD_NAMES) <= set(os.listdir(m.mountpoint))
    flush(m.mountpoint)
    for i, name in enumerate(ODD_NAMES):
        assert (source / name).read_bytes() == f"{i}\n".encode(), name


def test_a_name_of_256_bytes_is_enametoolong(mount: MountFactory, source: Path) -> None:
    """As on the source's own file system: ENAMETOOLONG, not EIO."""
    m = mount(source, *LATER)
    long = "y" * 256
    calls = {
        "stat": lambda: os.stat(m / long),
        "create": lambda: os.open(m / long, os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir": lambda: os.mkdir(m / long),
        "rename": lambda: os.rename(m / "hello.txt", m / long),
    }
    got = {}
    for what, call in calls.items():
        with pytest.raises(OSError) as info:
            call()
        got[what] = errno.errorcode.get(info.value.errno or 0)
    assert got == dict.fromkeys(calls, "ENAMETOOLONG")
    assert (source / "hello.txt").read_bytes() == b"hello\n"


@NATIVE
def test_sparse_write_near_2_to_the_40_then_truncate(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    far = 2**40
    fd = os.open(m / "sparse.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"tail", far) == 4
        assert os.fstat(fd).st_size == far + 4
        assert os.pread(fd, 4, far) == b"tail"
        assert os.pread(fd, 4, far - 4) == b"\0" * 4
        os.ftruncate(fd, 10)
        os.pwrite(fd, b"ab", 0)
    finally:
        os.close(fd)
    assert (m / "sparse.bin").read_bytes() == b"ab" + b"\0" * 8
    flush(m.mountpoint)
    assert (source / "sparse.bin").read_bytes() == b"ab" + b"\0" * 8


@NATIVE
def test_o_excl_race_between_processes_has_one_winner(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    script = (
        "import os, sys\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)\n"
        "except FileExistsError:\n"
        "    print('lost')\n"
        "else:\n"
        "    os.write(fd, sys.argv[2].encode())\n"
        "    os.close(fd)\n"
        "    print('won')\n"
    )
    for round_ in range(5):
        target = m / f"lock{round_}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, str(target), str(i)], stdout=subprocess.PIPE
            )
            for i in range(4)
        ]
        outs = [p.communicate(timeout=30)[0].decode().strip() for p in procs]
        assert sorted(outs) == ["lost"] * 3 + ["won"], outs
    flush(m.mountpoint)
    for round_ in range(5):
        assert (source / f"lock{round_}").read_bytes() in {b"0", b"1", b"2", b"3"}


@NATIVE
def test_write_after_rename_of_the_directory_holding_the_open_file(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    (m / "d1").mkdir()
    f = open(m / "d1" / "log.txt", "wb")  # noqa: SIM115
    try:
        f.write(b"one\n")
        f.flush()
        os.rename(m / "d1", m / "d2")
        f.write(b"two\n")
        f.flush()
    finally:
        f.close()
    assert (m / "d2" / "log.txt").read_bytes() == b"one\ntwo\n"
    flush(m.mountpoint)
    assert (source / "d2" / "log.txt").read_bytes() == b"one\ntwo\n"
    assert not (source / "d1").exists()


@NATIVE
def test_write_after_rename_of_an_existing_file_held_open(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    fd = os.open(m / "hello.txt", os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"one\n")
        subprocess.run(["mv", str(m / "hello.txt"), str(m / "moved.txt")], check=True)
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    assert (m / "moved.txt").read_bytes() == b"hello\none\ntwo\n"
    flush(m.mountpoint)
    assert (source / "moved.txt").read_bytes() == b"hello\none\ntwo\n"
    assert not (source / "hello.txt").exists()


@NATIVE
def test_write_after_another_process_truncates_by_name(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    fd = os.open(m / "hello.txt", os.O_RDWR)
    try:
        os.pwrite(fd, b"HELLO", 0)
        subprocess.run(["truncate", "-s", "2", str(m / "hello.txt")], check=True)
        assert os.fstat(fd).st_size == 2
        assert os.pread(fd, 10, 0) == b"HE"
        os.pwrite(fd, b"!", 4)
    finally:
        os.close(fd)
    assert (m / "hello.txt").read_bytes() == b"HE\0\0!"
    flush(m.mountpoint)
    assert (source / "hello.txt").read_bytes() == b"HE\0\0!"


@NATIVE
def test_chmod_000_then_write_through_an_fd_opened_before(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    fd = os.open(m / "hello.txt", os.O_WRONLY | os.O_APPEND)
    try:
        os.chmod(m / "hello.txt", 0)
        os.write(fd, b"more\n")
    finally:
        os.close(fd)
    assert (m / "hello.txt").stat().st_mode & 0o777 == 0
    out = run_cachefs("flush", m.mountpoint)
    assert out.returncode == 0, out.stderr
    assert (source / "hello.txt").stat().st_mode & 0o777 == 0
    os.chmod(source / "hello.txt", 0o644)
    assert (source / "hello.txt").read_bytes() == b"hello\nmore\n"


@NATIVE
def test_cp_a_and_tar_x_of_a_tree_then_diff(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    for i in range(30):
        (tree / "a" / f"f{i}").write_bytes(os.urandom(i * 997))
    (tree / "a" / "b" / "c" / "deep").write_text("deep\n")
    (tree / "a" / "b" / "link").symlink_to("../f3")
    (tree / "a" / "b" / "exe").write_text("#!/bin/sh\n")
    os.chmod(tree / "a" / "b" / "exe", 0o755)
    (tree / "a" / "empty_dir").mkdir()
    m = mount(source, *LATER)
    subprocess.run(["cp", "-a", str(tree), str(m / "copied")], check=True)
    archive = tmp_path / "t.tar"
    subprocess.run(["tar", "cf", str(archive), "-C", str(tree), "."], check=True)
    (m / "untarred").mkdir()
    subprocess.run(["tar", "xf", str(archive), "-C", str(m / "untarred")], check=True)
    for name in ("copied", "untarred"):
        done = subprocess.run(["diff", "-r", str(tree), str(m / name)], capture_output=True)
        assert done.returncode == 0, done.stdout
    flush(m.mountpoint)
    for name in ("copied", "untarred"):
        done = subprocess.run(["diff", "-r", str(tree), str(source / name)], capture_output=True)
        assert done.returncode == 0, done.stdout
        assert (source / name / "a" / "b" / "exe").stat().st_mode & 0o777 == 0o755
    assert m.stats()["dirty_files"] == 0


@NATIVE
def test_git_init_add_commit_inside_the_mount(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    m = mount(source, *LATER)
    repo = m / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(tmp_path),
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    for i in range(5):
        (repo / f"f{i}.txt").write_text(f"{i}\n")

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, (args, done.stderr)
        return done.stdout

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    (repo / "f0.txt").write_text("changed\n")
    git("commit", "-q", "-am", "two")
    git("fsck", "--strict")
    flush(m.mountpoint)
    done = subprocess.run(
        ["git", "-C", str(source / "repo"), "fsck", "--strict"], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    log = subprocess.run(
        ["git", "-C", str(source / "repo"), "log", "--format=%s"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert log.stdout.split() == ["two", "one"]


@NATIVE
def test_sqlite_database_survives_flush(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    db = sqlite3.connect(m / "db.sqlite")
    db.execute("create table t (i integer primary key, v blob)")
    for i in range(60):  # each commit fsyncs: each reaches the source
        with db:
            db.execute("insert into t (v) values (?)", (os.urandom(500),))
            if i % 10 == 0:
                db.execute("delete from t where i % 7 = 0")
    count = db.execute("select count(*) from t").fetchone()[0]
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    db.close()
    flush(m.mountpoint)
    copy = sqlite3.connect(f"file:{source / 'db.sqlite'}?mode=ro", uri=True)
    try:
        assert copy.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert copy.execute("select count(*) from t").fetchone()[0] == count
    finally:
        copy.close()


@NATIVE
def test_sqlite_wal_database_survives_flush(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    db = sqlite3.connect(m / "wal.sqlite")
    assert db.execute("pragma journal_mode=wal").fetchone()[0] == "wal"
    db.execute("create table t (i integer primary key, v text)")
    for i in range(100):
        with db:
            db.execute("insert into t (v) values (?)", (str(i) * 50,))
    db.execute("pragma wal_checkpoint(truncate)")
    db.close()
    flush(m.mountpoint)
    copy = sqlite3.connect(f"file:{source / 'wal.sqlite'}?mode=ro", uri=True)
    try:
        assert copy.execute("pragma integrity_check").fetchone()[0] == "ok"
        assert copy.execute("select count(*) from t").fetchone()[0] == 100
    finally:
        copy.close()


@NATIVE
def test_write_back_delay_0_many_small_files(mount: MountFactory, source: Path) -> None:
    m = mount(source, "--write-back-delay", "0")
    (m / "many").mkdir()
    for i in range(100):
        (m / "many" / f"f{i:03}").write_text(f"{i}\n")
        assert (source / "many" / f"f{i:03}").read_text() == f"{i}\n"
    stats = m.stats()
    assert (stats["dirty_files"], stats["dirty_bytes"]) == (0, 0)


@NATIVE
def test_unmount_while_a_writer_holds_the_file_open(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "f = open(sys.argv[1], 'w')\n"
            "f.write('held\\n'); f.flush()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n",
            str(m / "held.txt"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"ready\n"
        done = run_cachefs("unmount", m.mountpoint, "--timeout", "10", timeout=30)
        # busy: either it refuses (and says so), or it flushed first
        if done.returncode == 0:
            assert (source / "held.txt").read_text() == "held\n"
        else:
            assert len(done.stderr.splitlines()) == 1, done.stderr
            flush(m.mountpoint)
            assert (source / "held.txt").read_text() == "held\n"
    finally:
        writer.kill()
        writer.wait()


def test_flush_of_paths_outside_or_missing_is_a_one_line_error(
    mount: MountFactory, source: Path, tmp_path: Path
) -> None:
    mount(source, *LATER)
    for bad in (tmp_path, source / "hello.txt"):
        done = run_cachefs("flush", bad)
        assert done.returncode != 0, (bad, done.stdout)
        assert len(done.stderr.splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr


def test_flush_of_a_path_that_does_not_exist_is_an_error(mount: MountFactory, source: Path) -> None:
    """A typo must not look like success: as ``cachefs prefetch`` of a missing
    path, one line naming it and exit 1 (not "nothing to flush" and 0)."""
    m = mount(source, *LATER)
    (m / "report.csv").write_text("unsent\n")
    done = run_cachefs("flush", m / "reprot.csv")
    assert done.returncode != 0, done.stdout
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "reprot.csv" in done.stderr
    assert m.stats()["dirty_files"] == 1


SPARSE = 64 * 1024 * KB


@NATIVE
def test_a_sparse_new_file_is_flushed_without_its_holes(mount: MountFactory, source: Path) -> None:
    """One byte at 64 MiB: the source gets a sparse file, not 64 MiB of
    zeros (at 2**40, or a `truncate -s 100G disk.img`, it would fill the
    source's disk and the flush would never end)."""
    m = mount(source, *LATER)
    fd = os.open(m / "sparse.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"t", SPARSE)
    finally:
        os.close(fd)
    flush(m / "sparse.bin")
    st = os.stat(source / "sparse.bin")
    assert st.st_size == SPARSE + 1
    assert st.st_blocks * 512 < 1024 * KB, f"{st.st_blocks * 512} bytes allocated"


@NATIVE
def test_a_file_extended_by_truncate_is_flushed_without_its_holes(
    mount: MountFactory, source: Path
) -> None:
    """docs/writes.md: a file changed in place is "cut or extended to its new
    size", the changed pages written: not rewritten whole with zeros."""
    m = mount(source, *LATER)
    os.truncate(m / "hello.txt", SPARSE)
    flush(m / "hello.txt")
    st = os.stat(source / "hello.txt")
    assert st.st_size == SPARSE
    assert st.st_blocks * 512 < 1024 * KB, f"{st.st_blocks * 512} bytes allocated"
    with open(source / "hello.txt", "rb") as f:
        assert f.read(8) == b"hello\n\0\0"


@NATIVE
def test_holes_are_not_counted_as_dirty(mount: MountFactory, source: Path) -> None:
    """`dirty` (and --max-dirty) count the 4 KiB pages changed, not the
    size a truncate or a far write gives the file."""
    m = mount(source, *LATER)
    os.truncate(m / "hello.txt", SPARSE)
    fd = os.open(m / "far.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"t", SPARSE)
    finally:
        os.close(fd)
    stats = m.stats()
    assert stats["dirty_files"] == 2
    assert stats["dirty_bytes"] <= 4 * 4 * KB, stats["dirty_bytes"]


@NATIVE
def test_directory_removed_in_the_source_behind_the_mount(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, *LATER)
    (m / "gone").mkdir()
    (m / "gone" / "f.txt").write_text("keep me\n")
    (source / "gone").rmdir()  # the working copy is not in the source yet
    done = run_cachefs("flush", m.mountpoint, timeout=20)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "f.txt" in done.stderr
    assert (m / "gone" / "f.txt").read_text() == "keep me\n"
    assert m.stats()["dirty_files"] == 1


@NATIVE
def test_dirty_counters_return_to_zero(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    for i in range(10):
        (m / f"f{i}").write_bytes(os.urandom(10 * KB))
    with open(m / "hello.txt", "ab") as f:
        f.write(b"x")
    s = m.stats()
    assert s["dirty_files"] == 11
    flush(m.mountpoint)
    s = m.stats()
    dirty = {k: v for k, v in s.items() if k.startswith("dirty") and isinstance(v, int)}
    assert all(v == 0 for v in dirty.values()), dirty


@NATIVE
def test_unlink_while_another_process_writes(mount: MountFactory, source: Path) -> None:
    m = mount(source, *LATER)
    fd = os.open(m / "doomed", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * 5000)
        subprocess.run(["rm", str(m / "doomed")], check=True)
        os.write(fd, b"b" * 5000)
        assert os.pread(fd, 10000, 0) == b"a" * 5000 + b"b" * 5000
        os.fsync(fd)
    finally:
        os.close(fd)
    flush(m.mountpoint)
    assert not (source / "doomed").exists()
    assert not (m / "doomed").exists()
    wait_for("no dirty file", lambda: m.stats()["dirty_files"] == 0)
