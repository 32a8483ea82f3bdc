"""Small files and listings through a real mount, on both transports.

The kernel is spared requests (no FLUSH for a read-only close, listings it
keeps) and files are fetched ahead of a reader walking a directory; what a
user sees must not change: every file read is the source's file as it is
when it is opened, whole, even when the source changes under the walk, and
a listing shows a change made through the mount at once and one made in
the source once the TTL has passed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from conftest import wait_for

if TYPE_CHECKING:
    from conftest import MountFactory


def corpus(root: Path, n: int) -> dict[str, bytes]:
    d = root / "corpus"
    d.mkdir(parents=True)
    files = {f"f{i:03d}": os.urandom(1000 + 97 * i) for i in range(n)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return files


def test_a_walk_reads_each_file_as_the_source_has_it_when_opened(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = corpus(src, 60)
    m = mount(src, "--ttl", "0")
    names = sorted(os.listdir(m / "corpus"))
    assert names == sorted(files)
    for i, name in enumerate(names):
        # The files just ahead of the reader change after they may have
        # been fetched ahead, some to another size, some to the same size.
        for later in names[i + 2 : i + 4]:
            if (i + len(later)) % 3 == 0:
                size = len(files[later]) + (i % 2) * 333
                files[later] = os.urandom(size)
                (src / "corpus" / later).write_bytes(files[later])
        assert (m / "corpus" / name).read_bytes() == files[name], name
    assert m.stats()["fetched_ahead"] > 0  # the walk was seen


def test_a_walk_by_eight_readers_reads_every_file_whole(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = corpus(src, 200)
    m = mount(src)
    names = sorted(files)
    shares = [names[k::8] for k in range(8)]  # interleaved walks of one directory
    bad: list[str] = []

    def read(share: list[str]) -> None:
        for name in share:
            if (m / "corpus" / name).read_bytes() != files[name]:
                bad.append(name)

    threads = [threading.Thread(target=read, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    assert bad == []
    assert m.stats()["bytes_from_backend"] == sum(map(len, files.values()))  # each fetched once


def test_a_listing_shows_changes_through_the_mount_at_once(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = corpus(src, 5)
    m = mount(src, "--ttl", "3600", "--write-back-delay", "3600")
    d = m / "corpus"
    assert sorted(os.listdir(d)) == sorted(files)
    assert sorted(os.listdir(d)) == sorted(files)  # the kernel may keep it now
    (d / "new").write_bytes(b"x")
    assert "new" in os.listdir(d)
    os.unlink(d / "f000")
    assert "f000" not in os.listdir(d)
    os.rename(d / "f001", d / "moved")
    assert sorted(os.listdir(d)) == ["f002", "f003", "f004", "moved", "new"]
    os.mkdir(d / "sub")
    assert "sub" in os.listdir(d)


def test_a_listing_shows_changes_in_the_source_once_the_ttl_passed(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = corpus(src, 5)
    m = mount(src, "--ttl", "1")
    d = m / "corpus"
    assert sorted(os.listdir(d)) == sorted(files)
    assert sorted(os.listdir(d)) == sorted(files)  # kept by the kernel
    (src / "corpus" / "added").write_bytes(b"new")
    (src / "corpus" / "f002").unlink()
    want = sorted({*files, "added"} - {"f002"})
    wait_for("the source's change in the listing", lambda: sorted(os.listdir(d)) == want)
    assert (d / "added").read_bytes() == b"new"
