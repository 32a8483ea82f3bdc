"""A cache disk that fills up or dies under a real mount (engine/disk.py).

The cache dir is put on a filesystem of the test's own: a small tmpfs that
the test fills, or an ext4 image on a loop device that it shuts down the way
a dying disk goes (EXT4_IOC_SHUTDOWN).  Readers must get the source's bytes
all along, ``cachefs stats`` must name the latch, the log must hold no
traceback, the mount must recover by itself once the disk has room again,
and the cache dir must still serve correct bytes once the filesystem is
mounted again.  Mounting filesystems needs root (as CI runs).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import tmpfs, wait_for

if TYPE_CHECKING:
    from conftest import MountFactory

MIB = 1 << 20
DEADLINE = 30.0
# _IOR('X', 125, __u32); NOLOGFLUSH: stop at once, as a disk that dies does.
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a filesystem needs root")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextmanager
def ext4(path: Path, image: Path, size: int) -> Iterator[Path]:
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    path.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        umount(path)


def fill(fs: Path) -> Path:
    """Take every free byte of *fs*; the file that holds them."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(MIB))
                f.flush()
        except OSError:
            pass
    return filler


def read_direct(path: Path) -> bytes:
    """The whole file, every read reaching cachefs (no page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        out = bytearray()
        while chunk := os.pread(fd, MIB, len(out)):
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def test_a_cache_disk_that_fills_up_still_serves_and_recovers(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}": os.urandom(12 * MIB) for i in range(4)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    (src / "later").write_bytes(later := os.urandom(3 * MIB))
    with tmpfs(tmp_path / "small", "24m") as fs:
        m = mount(src, cache_dir=fs / "cache")
        filler = fill(fs)  # something else took the disk
        got: dict[str, bytes] = {}

        def reader(name: str) -> None:
            got[name] = (m / name).read_bytes()

        threads = [threading.Thread(target=reader, args=(n,)) for n in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert got == files  # four readers, every byte right
        numbers = m.stats()
        assert "No space left on device" in str(numbers["cache_disk_error"])
        assert "Traceback" not in m.log_text()
        filler.unlink()  # room again: the mount takes blocks again by itself
        wait_for("the latch lifted", lambda: m.stats()["cache_disk_error"] is None, DEADLINE)
        assert read_direct(m / "later") == later
        before = m.stats()["read_data_calls"]
        assert read_direct(m / "later") == later
        assert m.stats()["read_data_calls"] == before  # cached
        m.unmount()


@pytest.mark.serial
def test_a_cache_disk_that_dies_still_serves_from_the_source(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    cached, fresh = os.urandom(4 * MIB), os.urandom(4 * MIB)
    (src / "cached").write_bytes(cached)
    (src / "fresh").write_bytes(fresh)
    image = tmp_path / "disk.img"
    with ext4(tmp_path / "disk", image, 64 * MIB) as fs:
        cache_dir = fs / "cache"
        m = mount(src, cache_dir=cache_dir)
        assert read_direct(m / "cached") == cached
        m.unmount()  # committed: the cache holds "cached" whole
        m = mount(src, cache_dir=cache_dir)
        held = os.open(m / "cached", os.O_RDONLY | os.O_DIRECT)  # holds its data file
        try:
            assert os.pread(held, MIB, 0) == cached[:MIB]
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
            fd = os.open(fs, os.O_RDONLY)
            try:  # the disk dies
                fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
            finally:
                os.close(fd)
            # Cached blocks it cannot read back any more, and blocks it never
            # had: from the source, whole.
            assert os.pread(held, 4 * MIB, 0) == cached
        finally:
            os.close(held)
        assert read_direct(m / "cached") == cached
        assert read_direct(m / "fresh") == fresh
        assert (m / "fresh").read_bytes() == fresh
        assert m.stats()["cache_disk_error"] is not None
        assert "Traceback" not in m.log_text()
        m.unmount()  # the daemon exits cleanly, though it cannot commit
    # The filesystem back (mounted again): the cache dir serves the right bytes.
    with ext4_again(tmp_path / "disk", image) as fs:
        m = mount(src, cache_dir=fs / "cache")
        assert read_direct(m / "cached") == cached
        assert read_direct(m / "fresh") == fresh
        m.unmount()


@contextmanager
def ext4_again(path: Path, image: Path) -> Iterator[Path]:
    subprocess.run(["e2fsck", "-p", str(image)], check=False, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        umount(path)
