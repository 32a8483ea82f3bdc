"""Hostile tests of issue 23's speed changes through a real mount, on both
transports: no FLUSH on a close with nothing to flush, listings the kernel
keeps (FOPEN_CACHE_DIR) and the daemon keeps after the kernel forgets a
directory, listings standing in for stats, files fetched ahead of a walk,
and encrypted cache hits opened on the trio loop.

What a user notices is asserted: the source's bytes (one version whole)
when close returns with --write-back-delay 0, a listing that shows every
change made through the mount at once, never a stale one after the kernel
dropped its caches, a reader that gets one version whole or an errno.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import pread_direct, wait_for

if TYPE_CHECKING:
    from conftest import MountFactory

pytest_plugins = ["s3server"]

KB = 1024
LONG = ("--ttl", "3600", "--write-back-delay", "3600")


def drop_caches() -> None:
    """Make the kernel forget every inode and page it can (it sends FORGETs)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


# -- close with --write-back-delay 0: the source has the bytes -------------------


def test_close_of_every_kind_of_writer_waits_for_the_source(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    tree(src, {f"f{i}": b"old content\n" for i in range(8)})
    m = mount(src, "--ttl", "0", "--write-back-delay", "0")

    # O_WRONLY without O_TRUNC: a write into the middle of the file
    fd = os.open(m / "f0", os.O_WRONLY)
    os.pwrite(fd, b"NEW", 4)
    os.close(fd)
    assert (src / "f0").read_bytes() == b"old NEWtent\n"

    # O_RDWR
    fd = os.open(m / "f1", os.O_RDWR)
    assert os.read(fd, 3) == b"old"
    os.write(fd, b"+rw")
    os.close(fd)
    assert (src / "f1").read_bytes() == b"old+rwntent\n"

    # a dup'd fd: the first close flushes what was written so far, the last all
    fd = os.open(m / "f2", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"one\n")
    fd2 = os.dup(fd)
    os.close(fd2)
    assert (src / "f2").read_bytes() == b"old content\none\n"
    os.write(fd, b"two\n")
    os.close(fd)
    assert (src / "f2").read_bytes() == b"old content\none\ntwo\n"

    # a forked child closes its copy first, the parent writes on and closes
    fd = os.open(m / "f3", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"before fork\n")
    pid = os.fork()
    if pid == 0:
        os.close(fd)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert (src / "f3").read_bytes() == b"old content\nbefore fork\n"
    os.write(fd, b"after fork\n")
    os.close(fd)
    assert (src / "f3").read_bytes() == b"old content\nbefore fork\nafter fork\n"

    # a truncating open that writes nothing
    os.close(os.open(m / "f4", os.O_WRONLY | os.O_TRUNC))
    assert (src / "f4").read_bytes() == b""

    # a new file, written and closed
    (m / "new").write_bytes(b"created\n")
    assert (src / "new").read_bytes() == b"created\n"

    # a file opened to read first, then written by another open
    reader = os.open(m / "f5", os.O_RDONLY)
    assert os.read(reader, 3) == b"old"
    with open(m / "f5", "r+b") as f:
        f.write(b"NEW")
    assert (src / "f5").read_bytes() == b"NEW content\n"
    os.close(reader)


def test_a_read_only_open_that_truncates_reaches_the_source_on_close(
    mount: MountFactory, tmp_path: Path
) -> None:
    """open(O_RDONLY | O_TRUNC) empties the file on Linux: with
    --write-back-delay 0 the source is empty once close returns."""
    src = tmp_path / "src"
    tree(src, {"f": b"some content\n"})
    m = mount(src, "--ttl", "0", "--write-back-delay", "0")
    fd = os.open(m / "f", os.O_RDONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.close(fd)
    assert (m / "f").read_bytes() == b""
    assert (src / "f").read_bytes() == b""


# -- listings the kernel keeps: every change through the mount shows at once -----


def ls(d: Path) -> list[str]:
    return sorted(os.listdir(d))


def test_a_kept_listing_shows_every_kind_of_change_through_the_mount(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    tree(src, {"d/a": b"a", "d/b": b"b", "d/sub/x": b"x", "other/o": b"o", "other/p": b"p"})
    m = mount(src, *LONG)
    d, other = m / "d", m / "other"
    expect = {"a", "b", "sub"}
    expect_other = {"o", "p"}

    def check() -> None:
        assert ls(d) == sorted(expect)
        assert ls(d) == sorted(expect)  # served from what the kernel kept
        assert ls(other) == sorted(expect_other)
        assert ls(other) == sorted(expect_other)

    check()
    os.symlink("a", d / "link")
    expect.add("link")
    check()
    os.rename(other / "o", d / "o")  # in
    expect.add("o")
    expect_other.discard("o")
    check()
    os.rename(d / "b", other / "b")  # out
    expect.discard("b")
    expect_other.add("b")
    check()
    os.rename(d / "a", d / "o")  # over
    expect.discard("a")
    check()
    os.rename(d / "sub", other / "sub")  # a directory out
    expect.discard("sub")
    expect_other.add("sub")
    check()
    os.mkdir(d / "new")
    expect.add("new")
    check()
    os.rmdir(d / "new")
    expect.discard("new")
    check()
    os.unlink(d / "link")
    expect.discard("link")
    check()
    assert (d / "o").read_bytes() == b"a"
    assert ls(other / "sub") == ["x"]


def test_scandir_sizes_follow_writes_through_the_mount(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"d/a": b"a" * 10})
    m = mount(src, *LONG)
    assert {e.name: e.stat().st_size for e in os.scandir(m / "d")} == {"a": 10}
    with open(m / "d" / "a", "ab") as f:
        f.write(b"b" * 90)
    assert {e.name: e.stat().st_size for e in os.scandir(m / "d")} == {"a": 100}


def test_a_conflict_copy_shows_in_the_listing(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"d/f": b"source v1\n"})
    m = mount(src, *LONG)
    assert ls(m / "d") == ["f"]
    assert ls(m / "d") == ["f"]
    with open(m / "d" / "f", "ab") as f:
        f.write(b"mine\n")
    (src / "d" / "f").write_bytes(b"source v2, changed meanwhile\n")
    done = subprocess.run(
        [sys.executable, "-m", "cachefs", "flush", str(m / "d" / "f")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    copies = [n for n in os.listdir(src / "d") if n.startswith("f.conflict-")]
    assert len(copies) == 1, (done.returncode, done.stderr, os.listdir(src / "d"))
    wait_for("the conflict copy in the listing", lambda: ls(m / "d") == sorted(["f", *copies]), 5)
    assert (m / "d" / copies[0]).read_bytes() == b"source v1\nmine\n"


# -- listings kept after the kernel forgets a directory --------------------------


@pytest.mark.serial
def test_a_directory_renamed_over_a_listed_empty_one_shows_its_files_after_drop_caches(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    tree(src, {"a/f1": b"1", "a/f2": b"2"})
    (src / "d").mkdir()
    m = mount(src, *LONG)
    assert ls(m / "d") == []
    os.rename(m / "a", m / "d")  # over the empty directory, listed just before
    assert ls(m / "d") == ["f1", "f2"]
    drop_caches()
    assert ls(m / "d") == ["f1", "f2"]
    assert (m / "d" / "f2").read_bytes() == b"2"


@pytest.mark.serial
def test_a_directory_removed_while_open_and_made_again_shows_its_files_after_drop_caches(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    m = mount(src, *LONG)
    assert ls(m / "d") == []
    held = os.open(m / "d", os.O_RDONLY | os.O_DIRECTORY)
    os.rmdir(m / "d")
    os.mkdir(m / "d")
    (m / "d" / "new").write_bytes(b"new")
    os.close(held)  # the kernel forgets the removed directory now
    drop_caches()  # and the new one
    assert ls(m / "d") == ["new"]


@pytest.mark.serial
def test_drop_caches_between_changes_never_shows_a_stale_listing(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    tree(src, {"p/d/f": b"f", "p/d/sub/g": b"g", "q/h": b"h"})
    m = mount(src, *LONG)
    assert ls(m / "p" / "d") == ["f", "sub"]
    assert ls(m / "p" / "d" / "sub") == ["g"]
    assert ls(m / "q") == ["h"]
    drop_caches()
    os.rename(m / "p", m / "r")
    drop_caches()
    assert ls(m / "r" / "d") == ["f", "sub"]
    assert not (m / "p").exists()
    os.mkdir(m / "p")
    os.mkdir(m / "p" / "e")
    drop_caches()
    assert ls(m / "p" / "e") == []
    (m / "p" / "e" / "n").write_bytes(b"n")
    drop_caches()
    assert ls(m / "p" / "e") == ["n"]
    os.rename(m / "r" / "d" / "sub", m / "p" / "e" / "sub")
    drop_caches()
    assert ls(m / "p" / "e") == ["n", "sub"]
    assert ls(m / "r" / "d") == ["f"]
    assert ls(m / "p" / "e" / "sub") == ["g"]
    os.unlink(m / "q" / "h")
    drop_caches()
    assert ls(m / "q") == []
    os.rmdir(m / "q")
    os.rename(m / "r", m / "q")
    drop_caches()
    assert ls(m / "q") == ["d"]
    assert ls(m / "q" / "d") == ["f"]


def test_a_directory_made_again_where_one_was_renamed_away_is_empty(
    mount: MountFactory, tmp_path: Path
) -> None:
    """After ``mv p r; mkdir p``, ``mkdir p/d`` used to fail with EEXIST
    (older than issue 23): the engine still knew p/d."""
    src = tmp_path / "src"
    tree(src, {"p/d/f": b"f"})
    m = mount(src, *LONG)
    assert ls(m / "p" / "d") == ["f"]
    os.rename(m / "p", m / "r")
    os.mkdir(m / "p")
    assert ls(m / "p") == []
    os.mkdir(m / "p" / "d")
    assert ls(m / "p" / "d") == []
    assert ls(m / "r" / "d") == ["f"]


# -- listings standing in for stats ----------------------------------------------


def one_version_or_errno(path: Path, versions: list[bytes]) -> None:
    """A read of *path* through the mount gives one of *versions* whole, or fails."""
    try:
        got = path.read_bytes()
    except OSError as e:
        assert e.errno in (errno.EIO, errno.ENOENT, errno.ESTALE), e
        return
    assert got in versions, (len(got), [len(v) for v in versions])


@pytest.mark.parametrize("ttl", ["0", "3600"])
def test_a_file_changed_in_the_source_after_its_listing_reads_one_version(
    mount: MountFactory, tmp_path: Path, ttl: str
) -> None:
    src = tmp_path / "src"
    old = {f"f{i:02d}": os.urandom(3000 + 1000 * i) for i in range(12)}
    tree(src, {f"d/{n}": data for n, data in old.items()})
    m = mount(src, "--ttl", ttl)
    assert {e.name: e.stat().st_size for e in os.scandir(m / "d")} == {
        n: len(v) for n, v in old.items()
    }
    new: dict[str, bytes] = {}
    for i, name in enumerate(sorted(old)):
        kind = i % 4
        if kind == 0:  # longer, in place
            new[name] = os.urandom(len(old[name]) + 5000)
            (src / "d" / name).write_bytes(new[name])
        elif kind == 1:  # shorter, in place
            new[name] = os.urandom(len(old[name]) // 3)
            (src / "d" / name).write_bytes(new[name])
        elif kind == 2:  # same size, renamed over
            new[name] = os.urandom(len(old[name]))
            (src / "d" / "tmp").write_bytes(new[name])
            os.utime(src / "d" / "tmp", ns=(1, 1))
            os.rename(src / "d" / "tmp", src / "d" / name)
        else:  # gone
            (src / "d" / name).unlink()
    for name in sorted(old):
        versions = [new[name]] if name in new else []
        if ttl == "0":
            if name in new:
                assert (m / "d" / name).read_bytes() == new[name], name
            else:
                assert not (m / "d" / name).exists()
        else:
            one_version_or_errno(m / "d" / name, versions)


def test_a_listed_file_removed_through_the_mount_is_gone(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    tree(src, {f"d/f{i:02d}": b"x" * i for i in range(20)})
    m = mount(src, *LONG)
    assert len(ls(m / "d")) == 20
    os.unlink(m / "d" / "f05")
    with pytest.raises(FileNotFoundError):
        os.stat(m / "d" / "f05")
    with pytest.raises(FileNotFoundError):
        (m / "d" / "f05").read_bytes()
    assert "f05" not in ls(m / "d")
    assert not (src / "d" / "f05").exists()


def test_a_listed_file_that_became_a_directory(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {"d/x": b"file x\n", "d/y": b"file y\n"})
    m = mount(src, "--ttl", "1")
    assert ls(m / "d") == ["x", "y"]
    (src / "d" / "x").unlink()
    (src / "d" / "x").mkdir()
    (src / "d" / "x" / "inner").write_bytes(b"inner\n")
    one_version_or_errno(m / "d" / "x", [b"file x\n"])

    def seen() -> bool:
        try:
            return ls(m / "d" / "x") == ["inner"]
        except OSError:
            return False

    wait_for("x as a directory", seen)
    assert (m / "d" / "x" / "inner").read_bytes() == b"inner\n"
    with pytest.raises(IsADirectoryError):
        (m / "d" / "x").read_bytes()


@pytest.mark.parametrize("ttl", ["0", "1"])
def test_names_looked_up_one_by_one_then_a_new_one_in_the_source(
    mount: MountFactory, tmp_path: Path, ttl: str
) -> None:
    """Past 16 lookups a directory is listed; a file the source gains after
    that listing is found once the TTL has passed."""
    src = tmp_path / "src"
    files = {f"f{i:02d}": os.urandom(100 + i) for i in range(40)}
    tree(src, {f"d/{n}": v for n, v in files.items()})
    m = mount(src, "--ttl", ttl)
    for name, data in files.items():  # paths given whole, never listed
        assert (m / "d" / name).read_bytes() == data
    (src / "d" / "late").write_bytes(b"late\n")
    (src / "d" / "f03").unlink()
    wait_for("the late file", lambda: (m / "d" / "late").exists())
    assert (m / "d" / "late").read_bytes() == b"late\n"
    wait_for("f03 gone", lambda: not (m / "d" / "f03").exists())
    assert (m / "d" / "f04").read_bytes() == files["f04"]


# -- directory walks fetching ahead -----------------------------------------------


def small_corpus(root: Path, n: int, size: int = 3000) -> dict[str, bytes]:
    files = {f"f{i:03d}": os.urandom(size + 37 * i) for i in range(n)}
    tree(root, {f"corpus/{k}": v for k, v in files.items()})
    return files


def write_rules(path: Path, rules: list[dict[str, object]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rules))
    os.replace(tmp, path)


def test_a_walk_over_a_failing_source_fails_only_the_failing_files(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = small_corpus(src, 40)
    rules = tmp_path / "rules.json"
    write_rules(rules, [{"file": "corpus/f0[12]?", "result": "FAILURE"}])
    m = mount(src, "--faults", rules, "--retries", "0")
    names = ls(m / "corpus")
    for name in names:
        path = m / "corpus" / name
        if name[:3] == "f01" or name[:3] == "f02":
            with pytest.raises(OSError) as info:
                path.read_bytes()
            assert info.value.errno == errno.EIO
        else:
            assert path.read_bytes() == files[name], name
    write_rules(rules, [])
    for name in names:  # what failed ahead of the walk is not remembered as failed
        assert (m / "corpus" / name).read_bytes() == files[name], name


SHORT_READS = {
    "partial": {"file": "corpus/f01?", "result": "PARTIAL", "max_bytes": 4096},
    # Not a source that says a file ends early (RANGE_BEYOND_EOF): readers
    # then get zeros up to the known size, as docs/contract.md says.
}


@pytest.mark.parametrize("short", sorted(SHORT_READS))
def test_a_walk_over_short_reads_never_shows_a_wrong_byte(
    mount: MountFactory, tmp_path: Path, short: str
) -> None:
    src = tmp_path / "src"
    files = small_corpus(src, 40, size=70 * KB)
    rules = tmp_path / "rules.json"
    write_rules(rules, [SHORT_READS[short]])
    m = mount(src, "--faults", rules)
    for name in ls(m / "corpus"):
        one_version_or_errno(m / "corpus" / name, [files[name]])
    write_rules(rules, [])
    for name in ls(m / "corpus"):
        assert pread_direct(m / "corpus" / name, 0, 128 * KB) == files[name], name


def test_unmount_while_fetches_ahead_hang(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = small_corpus(src, 30)
    rules = tmp_path / "rules.json"
    write_rules(rules, [{"file": "corpus/f0[1-9]?", "op": "*", "hang": True}])
    m = mount(src, "--faults", rules)
    names = ls(m / "corpus")
    for name in names[:8]:  # the walk names f008..f015 ahead; those from f010 hang
        assert (m / "corpus" / name).read_bytes() == files[name]
    m.unmount()  # within its deadline, exit 0


def test_a_walk_through_a_cache_too_small_for_it(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = small_corpus(src, 150, size=40 * KB)  # ~7 MB through a 2 MB cache
    m = mount(src, "--cache-size", "2M")
    names = ls(m / "corpus")
    bad: list[str] = []

    def read(share: list[str]) -> None:
        for name in share:
            try:
                if (m / "corpus" / name).read_bytes() != files[name]:
                    bad.append(name)
            except OSError as e:
                bad.append(f"{name}: {e}")

    threads = [threading.Thread(target=read, args=(names[k::8],)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert bad == []
    for name in names[::7]:
        assert pread_direct(m / "corpus" / name, 0, 64 * KB) == files[name][: 64 * KB]


def test_kill_9_in_a_walk_then_remount_reads_everything(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = small_corpus(src, 120, size=20 * KB)
    m = mount(src, "--ttl", "0")
    names = ls(m / "corpus")
    for name in names[:40]:
        assert (m / "corpus" / name).read_bytes() == files[name]
    m.kill()  # fetches ahead of f040.. in flight
    for name in names[40:50:2]:  # changed while no mount ran
        files[name] = os.urandom(len(files[name]) + 11)
        (src / "corpus" / name).write_bytes(files[name])
    m2 = mount(src, "--ttl", "0", cache_dir=m.cache_dir)
    for name in names:
        assert (m2 / "corpus" / name).read_bytes() == files[name], name


def test_a_walk_with_files_truncated_and_deleted_just_ahead(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = small_corpus(src, 60, size=9 * KB)
    m = mount(src, "--ttl", "0")
    names = ls(m / "corpus")
    gone: set[str] = set()
    for i, name in enumerate(names):
        for later in names[i + 1 : i + 4]:
            if later in gone:
                continue
            k = (i + int(later[1:])) % 5
            if k == 0:
                os.truncate(src / "corpus" / later, len(files[later]) // 2)
                files[later] = files[later][: len(files[later]) // 2]
            elif k == 1 and i % 7 == 0:
                (src / "corpus" / later).unlink()
                gone.add(later)
        if name in gone:
            assert not (m / "corpus" / name).exists()
        else:
            assert (m / "corpus" / name).read_bytes() == files[name], name


# -- listings under concurrent readers -------------------------------------------


def test_telldir_seekdir_rewinddir_on_a_big_directory_that_changes(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    n = 2000
    tree(src, {f"big/e{i:05d}": b"" for i in range(n)})
    m = mount(src, "--ttl", "1", "--write-back-delay", "3600")
    big = m / "big"
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.rewinddir.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    name_at = 19  # offsetof(struct dirent64, d_name) on Linux

    def read_one(dirp: int) -> str | None:
        ent = libc.readdir(dirp)
        if not ent:
            return None
        return ctypes.string_at(ent + name_at).decode()

    def read_all(dirp: int) -> list[str]:
        out = []
        while (name := read_one(dirp)) is not None:
            out.append(name)
        return [x for x in out if x not in (".", "..")]

    assert len(ls(big)) == n
    dirp = libc.opendir(str(big).encode())
    assert dirp
    try:
        first = [read_one(dirp) for _ in range(700)]
        pos = libc.telldir(dirp)
        nxt = [read_one(dirp) for _ in range(5)]
        # changes through the mount and in the source while the handle is open
        for i in range(0, 300, 3):
            os.unlink(big / f"e{i:05d}")
        (big / "zz-new").write_bytes(b"")
        (src / "big" / "zz-src").write_bytes(b"")
        libc.seekdir(dirp, pos)
        assert [read_one(dirp) for _ in range(5)] == nxt
        rest = read_all(dirp)
        listed = [x for x in first + nxt + rest if x not in (".", "..", None)]
        assert len(listed) == len(set(listed)), "an entry twice in one pass"
        libc.rewinddir(dirp)
        again = read_all(dirp)
        assert len(again) == len(set(again))
    finally:
        libc.closedir(dirp)
    want = sorted(
        {f"e{i:05d}" for i in range(n)} - {f"e{i:05d}" for i in range(0, 300, 3)}
        | {"zz-new", "zz-src"}
    )
    wait_for("every change in a new listing", lambda: ls(big) == want)


def test_two_processes_listing_while_names_come_and_go(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tree(src, {f"d/base{i:03d}": b"" for i in range(300)})
    m = mount(src, *LONG)
    d = m / "d"
    base = {f"base{i:03d}" for i in range(300)}
    stop = threading.Event()
    bad: list[str] = []

    def lister() -> None:
        while not stop.is_set():
            names = os.listdir(d)
            if len(names) != len(set(names)) or not base <= set(names):
                twice = len(names) - len(set(names))
                bad.append(f"{twice} names twice, {len(base - set(names))} missing")

    threads = [threading.Thread(target=lister) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(150):
            (d / f"tmp{i}").write_bytes(b"")
            if i % 2:
                os.unlink(d / f"tmp{i - 1}")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert bad == []
    assert set(ls(d)) == base | {"tmp149"} | {f"tmp{i}" for i in range(1, 149, 2)}


# -- encrypted cache hits ---------------------------------------------------------


def test_an_encrypted_cache_tampered_while_mounted_gives_the_source_or_eio(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    data = os.urandom(5 * 64 * KB + 1234)
    tree(src, {"f": data, "small": b"tiny\n"})
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    m = mount(src, "--encrypt", "--key-file", key, "--no-passthrough")
    assert (m / "f").read_bytes() == data
    assert (m / "small").read_bytes() == b"tiny\n"
    m.unmount()
    m = mount(src, "--encrypt", "--key-file", key, "--no-passthrough", cache_dir=m.cache_dir)
    assert pread_direct(m / "f", 0, 4096) == data[:4096]  # a hit
    # flip bytes all over every data file: chunks, and the table behind them
    for path in (m.cache_dir / "data").iterdir():
        size = path.stat().st_size
        with open(path, "r+b") as f:
            for at in range(100, size, 20000):
                f.seek(at)
                b = f.read(1)
                f.seek(at)
                f.write(bytes([b[0] ^ 0x55]))
    end = len(data)
    reads = [(0, 4096), (65536 - 100, 200), (65536, 65536), (131000, 70000)]
    reads += [(end - 10, 4096), (end, 4096), (end + 5, 10), (3 * 65536 - 1, 2)]
    for off, size in reads:
        try:
            got = pread_direct(m / "f", off, size)
        except OSError as e:
            assert e.errno == errno.EIO
            continue
        assert got == data[off : off + size], (off, size)
    try:
        assert pread_direct(m / "small", 0, 4096) == b"tiny\n"
    except OSError as e:
        assert e.errno == errno.EIO


# -- S3: published content information read from a listing of records -----------

ODD = ["a b.txt", "ü-ñ.bin", "x+y=z&w.dat", "%41%2F.txt", "semi;colon,comma", "(paren)[br]"]


def test_s3_publish_and_unpublish_while_mounted_with_odd_names(
    mount: MountFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue("s3_server")
    files = {f"d/{name}": os.urandom(70 * KB + i) for i, name in enumerate(ODD)}
    files["top ü.bin"] = os.urandom(5000)
    bucket = server.new_bucket(files)
    source = f"s3://{bucket}"
    s3 = ("--s3-endpoint", server.endpoint)
    m = mount(source, *s3, "--ttl", "1")
    assert ls(m / "d") == sorted(ODD)
    for rel, data in files.items():
        assert (m / rel).read_bytes() == data, rel
    done = subprocess.run(
        [sys.executable, "-m", "cachefs", "publish", source, *s3, "--block-size", "64K"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert ls(m / "d") == sorted(ODD)  # the records never show
    changed = "d/" + ODD[1]
    files[changed] = os.urandom(80 * KB)
    server.put(bucket, changed, files[changed])  # a new version the records do not describe

    def all_read() -> bool:
        return all(pread_direct(m / rel, 0, 128 * KB) == data for rel, data in files.items())

    wait_for("every file as the bucket has it", all_read)
    m.unmount()
    m2 = mount(source, *s3, "--ttl", "1")  # a cold cache, with the records
    for rel, data in files.items():
        assert (m2 / rel).read_bytes() == data, rel
    client = server.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=".cachefs-ci/").get("Contents", []):
        client.delete_object(Bucket=bucket, Key=obj["Key"])  # unpublished while mounted
    files["d/" + ODD[0]] = os.urandom(100)
    server.put(bucket, "d/" + ODD[0], files["d/" + ODD[0]])
    wait_for(
        "every file as the bucket has it, unpublished",
        lambda: all(pread_direct(m2 / rel, 0, 128 * KB) == data for rel, data in files.items()),
    )
