"""Hostile tests of the data files the cache keeps open between opens
(engine/state/catalog.py), through a real mount, on both transports.

What a user notices is asserted: a reader gets one version of a file whole
or an errno while the source replaces it with versions of other sizes; the
daemon's open files stay bounded (a quarter of its fd limit) and a replaced
version's data file is let go (no fd on a deleted data file once nothing
reads it); purge, a cache too small for the files, and kill -9 with a
remount all read the source's bytes.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import fds_under, wait_for

from cachefs.control.mounts import daemon_pid

if TYPE_CHECKING:
    from collections.abc import Callable
    from subprocess import CompletedProcess

    from conftest import Mount, MountFactory

KB = 1024
#: The daemon runs with this fd limit: it keeps at most a quarter of it open.
NOFILE = 256
LIMITED = ("prlimit", f"--nofile={NOFILE}:{NOFILE}")


def corpus(root: Path, n: int, size: int) -> dict[str, bytes]:
    root.mkdir(parents=True, exist_ok=True)
    files = {f"f{i:03d}": os.urandom(size + 97 * i) for i in range(n)}
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


def replace(path: Path, data: bytes) -> None:
    """Give *path* a new version at once (renamed over), as a user's tool does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.rename(tmp, path)


def data_fds(m: Mount) -> list[str]:
    """Where the daemon's fds on cache data files point."""
    pid = daemon_pid(m.cache_dir)
    assert pid is not None
    return fds_under(pid, m.cache_dir / "data")


def kept_at_most(m: Mount, limit: int) -> None:
    """The daemon's fds on data files come down to *limit* once the files
    just read are released and the commit after them has synced."""
    wait_for(f"at most {limit} data files open", lambda: len(data_fds(m)) <= limit)


def test_versions_replaced_under_readers_give_one_version_and_free_old_data_files(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = corpus(src / "d", 24, 5 * KB)
    versions = {name: [data] for name, data in files.items()}
    m = mount(src, "--ttl", "0", prefix=LIMITED)
    for name, data in files.items():  # cached, and kept open
        assert (m / "d" / name).read_bytes() == data
    done = threading.Event()
    bad: list[str] = []

    def read() -> None:
        while not done.is_set():
            for name in files:
                try:
                    got = (m / "d" / name).read_bytes()
                except OSError as e:
                    if e.errno not in (errno.EIO, errno.ENOENT, errno.ESTALE):
                        bad.append(f"{name}: {e}")
                    continue
                if got not in versions[name]:
                    bad.append(f"{name}: {len(got)} bytes, of no version")

    readers = [threading.Thread(target=read) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(150):
            name = f"f{i * 7 % len(files):03d}"
            data = os.urandom((i * 3001) % (40 * KB) + 1)  # a size of its own
            versions[name].append(data)
            replace(src / "d" / name, data)
    finally:
        done.set()
        for t in readers:
            t.join(timeout=60)
    assert not any(t.is_alive() for t in readers)
    assert bad == []
    for name, seen in versions.items():
        assert (m / "d" / name).read_bytes() == seen[-1], name
    # No fd is left on a replaced version's (deleted) data file once its
    # readers are gone (the kernel releases a file soon after its close).
    wait_for(
        "no fd on a replaced version's data file",
        lambda: not [t for t in data_fds(m) if t.endswith(" (deleted)")],
    )


def test_data_files_kept_open_stay_bounded(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = corpus(src / "d", 3 * NOFILE // 4, 3 * KB)  # more than it may keep
    m = mount(src, prefix=LIMITED)
    for _ in range(2):
        for name, data in files.items():
            assert (m / "d" / name).read_bytes() == data
        kept_at_most(m, NOFILE // 4)


def test_purge_and_a_small_cache_while_data_files_are_kept_open(
    mount: MountFactory, tmp_path: Path, cachefs: Callable[..., CompletedProcess[str]]
) -> None:
    src = tmp_path / "src"
    files = corpus(src / "d", 40, 60 * KB)  # 2.4 MB through a 1 MB cache
    m = mount(src, "--ttl", "0", "--cache-size", "1M", "--min-free", "0", prefix=LIMITED)
    for _ in range(2):
        for name, data in files.items():
            assert (m / "d" / name).read_bytes() == data
    assert m.stats()["evicted_bytes"] > 0
    done = cachefs("purge", m / "d")
    assert done.returncode == 0, done.stderr
    for name in list(files)[::3]:  # same size, new bytes
        files[name] = os.urandom(len(files[name]))
        replace(src / "d" / name, files[name])
    for name, data in files.items():
        assert (m / "d" / name).read_bytes() == data, name
    kept_at_most(m, NOFILE // 4)


def test_kill_9_with_data_files_kept_open_then_remount(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = corpus(src / "d", 30, 20 * KB)
    m = mount(src, "--ttl", "0")
    for name, data in files.items():
        assert (m / "d" / name).read_bytes() == data
    m.kill()
    for name in list(files)[::2]:  # changed while no mount ran, some to other sizes
        files[name] = os.urandom(len(files[name]) + (11 if name.endswith(("0", "4")) else 0))
        replace(src / "d" / name, files[name])
    m2 = mount(src, "--ttl", "0", cache_dir=m.cache_dir)
    for name, data in files.items():
        assert (m2 / "d" / name).read_bytes() == data, name
