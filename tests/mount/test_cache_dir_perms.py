"""The cache dir is its owner's alone: names, sizes and block hashes are in it.

A cache dir made by the user with mode 0755 is made 0700 by the mount (and
by the engine, opened without one), everything cachefs creates in it is
0600 (directories 0700), files left loose by older versions are tightened,
and a cache dir (or a symlink to one) of another user is refused.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import NATIVE_ONLY, assert_one_line_error, pread_direct
from enginerig import BS, Rig, read_sequential

from cachefs import CacheDirError

if TYPE_CHECKING:
    from conftest import MountFactory

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: another user's files")
#: An unprivileged user, with no group of root's.
NOBODY = 65534
DATA = os.urandom(3 * BS + 100)


def loose_entries(root: Path) -> list[str]:
    """Everything below *root* (and itself) that others could read or enter."""
    loose = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077 or (stat.S_ISDIR(st.st_mode) and mode != 0o700):
            loose.append(f"{path.relative_to(root.parent)} {mode:04o}")
    return loose


def loosen(root: Path) -> None:
    """What an older version left: the dir 0755, its subdirs 0755, its files 0644."""
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory any user can enter (tmp_path is root's alone), removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="cachefs-perms-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def read_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
    """``head -c 1 PATH`` as an unprivileged user."""
    return subprocess.run(
        ["head", "-c", "1", str(path)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


async def test_the_engine_makes_a_0755_cache_dir_owner_only(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"d/f": DATA, "s": b"small"})
    rig.cache_dir.chmod(0o755)
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        await cache.flush()
        assert (rig.cache_dir / "index.sqlite3-wal").exists()
        assert loose_entries(rig.cache_dir) == []
    assert loose_entries(rig.cache_dir) == []


async def test_loose_modes_left_by_an_older_version_are_tightened(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"d/f": DATA, "s": b"small"})
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
    assert rig.reads()
    (rig.cache_dir / "cachefs.log").write_text("an old log\n")
    loosen(rig.cache_dir)
    assert len(loose_entries(rig.cache_dir)) >= 5  # the dir, data/, a data file, index, log
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        assert loose_entries(rig.cache_dir) == []
    assert rig.calls() == []  # the cached data was kept


@needs_root
@NATIVE_ONLY
def test_a_mounted_cache_dir_is_owner_only_and_others_cannot_read_it(
    mount: MountFactory, tmp_path: Path, reachable: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("one.bin", "two.bin"):
        (src / name).write_bytes(DATA)
    cache = reachable / "cache"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)  # whatever the umask
    m = mount(src, cache_dir=cache)
    assert pread_direct(m / "one.bin", 0, len(DATA)) == DATA
    assert pread_direct(m / "two.bin", BS, 100) == DATA[BS : BS + 100]
    assert m.stats()["cached_bytes"] > 0
    assert loose_entries(cache) == []
    assert m.log_text().count("made it 0700") == 1
    refused = read_as_nobody(cache / "index.sqlite3")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    m.unmount()
    assert loose_entries(cache) == []


@needs_root
def test_a_cache_dir_of_another_user_is_refused(
    cachefs: Cachefs, tmp_path: Path, mnt: Path, reachable: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    theirs = reachable / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    done = cachefs("mount", src, mnt, "--cache-dir", theirs)
    assert_one_line_error(done, str(theirs), "another user")
    assert sorted(os.listdir(theirs)) == []


@needs_root
def test_a_symlink_of_another_user_is_refused(
    cachefs: Cachefs, tmp_path: Path, mnt: Path, reachable: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    link = reachable / "link"
    link.symlink_to(mine)
    os.lchown(link, NOBODY, NOBODY)
    done = cachefs("mount", src, mnt, "--cache-dir", link)
    assert_one_line_error(done, str(link), "symlink of another user")
    assert sorted(os.listdir(mine)) == []


@needs_root
async def test_the_engine_refuses_a_cache_dir_of_another_user(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"s": b"small"})
    os.chown(rig.cache_dir, NOBODY, NOBODY)
    with pytest.raises(CacheDirError, match="belongs to another user"):
        async with rig.engine():
            pass
    assert os.listdir(rig.cache_dir) == []


@pytest.mark.parametrize("name", ["cachefs.log", "lock"])
def test_a_link_planted_in_the_cache_dir_is_never_written_through(
    cachefs: Cachefs, tmp_path: Path, mnt: Path, name: str
) -> None:
    """In a cache dir others could write to, a symlink or hard link at the log
    or the lock would make the mount append to or truncate another file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f\n")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    cache.chmod(0o777)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (cache / name).symlink_to(victim)
    done = cachefs("mount", src, mnt, "--cache-dir", cache)
    assert_one_line_error(done, name, "symlink")
    (cache / name).unlink()
    os.link(victim, cache / name)
    done = cachefs("mount", src, mnt, "--cache-dir", cache)
    assert_one_line_error(done, name, "one link")
    assert victim.read_bytes() == b"precious\n"
    assert not os.path.ismount(mnt)
