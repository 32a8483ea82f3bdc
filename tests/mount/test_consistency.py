"""One version or an error (docs/SEMANTICS.md), through real mounts.

Each test changes the source under a reader the way users do (a rewrite in
place, a replace by rename, a truncation, an object overwritten), at a point
the test chooses between two reads of one handle, and checks what the
reader got: the bytes of one version, whole, or a prefix of one version and
then an error; never bytes of two versions, never a clean end of file at a
length no version had.
"""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from churn import Churn, run_churn
from conftest import pread_direct

if TYPE_CHECKING:
    from conftest import Mount, MountFactory
    from s3server import MotoServer

pytest_plugins = ["s3server"]

MIB = 1 << 20
#: What a reader whose version is gone gets: ESTALE through O_DIRECT and most
#: buffered reads; EIO where the kernel's page cache reports the failed page.
GONE = (errno.ESTALE, errno.EIO)


class Reader:
    """One open handle on a file of a mount, read a piece at a time."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        self.got = bytearray()
        self.error: OSError | None = None
        self.eof = False

    def read(self, n: int | None = None) -> Reader:
        """Read on *n* bytes (to the end when None), stopping at EOF or an error."""
        want = len(self.got) + n if n is not None else None
        while not self.eof and self.error is None and (want is None or len(self.got) < want):
            size = MIB if want is None else min(MIB, want - len(self.got))
            try:
                chunk = os.read(self.fd, size)
            except OSError as e:
                self.error = e
                break
            if not chunk:
                self.eof = True
            self.got += chunk
        return self

    def close(self) -> None:
        os.close(self.fd)


def one_version(reader: Reader, *versions: bytes) -> int:
    """Which of *versions* the reader got: whole to a clean end of file, or a
    prefix of it and then an error.  Fails the test on anything else."""
    got = bytes(reader.got)
    for i, version in enumerate(versions):
        if got != version[: len(got)]:
            continue
        if reader.error is not None:
            assert reader.error.errno in GONE, reader.error
            return i
        if reader.eof and len(got) == len(version):
            return i
    where = {i: first_difference(got, v) for i, v in enumerate(versions)}
    pytest.fail(
        f"the reader got {len(got)} bytes (eof {reader.eof}, error {reader.error!r}) that are"
        f" no version the file had; first differing MiB per version: {where}"
    )


def first_difference(got: bytes, version: bytes) -> int | None:
    """The first MiB where *got* differs from *version*, if any."""
    for at in range(0, len(got), MIB):
        if got[at : at + MIB] != version[at : at + MIB]:
            return at // MIB
    return None


def local_source(tmp_path: Path, data: bytes) -> Path:
    """A source directory holding one file, ``f``."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(data)
    return src


def rewrite_in_place(path: Path, data: bytes) -> None:
    """``dd conv=notrunc``: the same inode, new bytes."""
    with open(path, "r+b") as f:
        f.write(data)


def replace_by_rename(path: Path, data: bytes) -> None:
    """``cp new tmp && mv tmp file``: a new inode at the path."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- a local source -----------------------------------------------------------------


def test_a_file_rewritten_in_place_within_the_ttl_is_never_mixed(
    mount: MountFactory, tmp_path: Path
) -> None:
    a, b = os.urandom(8 * MIB), os.urandom(8 * MIB)
    src = local_source(tmp_path, a)
    m = mount(src, "--ttl", "60", "--max-readahead", "0")
    assert pread_direct(m / "f", 0, MIB) == a[:MIB]  # 1 MiB cached, no kernel readahead
    rewrite_in_place(src / "f", b)
    again = Reader(m / "f").read()
    again.close()
    # Within the TTL the open is of the version cached: what is cached of it
    # reads, the rest cannot be had, and the reader is told so.
    assert one_version(again, a, b) == 0 and again.error is not None
    assert len(again.got) >= MIB
    # The next open stats the file and reads the new version whole.
    assert (m / "f").read_bytes() == b
    assert m.stats()["version_gone_reads"] >= 1


def test_a_reader_keeps_its_version_while_the_file_is_replaced_by_rename(
    mount: MountFactory, tmp_path: Path
) -> None:
    a, b = os.urandom(8 * MIB), os.urandom(9 * MIB)
    src = local_source(tmp_path, a)
    m = mount(src, "--ttl", "0", "--max-readahead", "256K")
    reader = Reader(m / "f").read(2 * MIB)
    replace_by_rename(src / "f", b)
    assert (m / "f").read_bytes() == b  # a new open: the new version
    assert os.fstat(reader.fd).st_size == len(a)
    reader.read()
    reader.close()
    # The inode it opened is still there: the whole old version, as a reader
    # of the local file itself gets.
    assert one_version(reader, a, b) == 0 and reader.error is None


def test_a_rewrite_with_the_mtime_put_back_is_seen(mount: MountFactory, tmp_path: Path) -> None:
    a, b = os.urandom(2 * MIB), os.urandom(2 * MIB)
    src = local_source(tmp_path, a)
    m = mount(src, "--ttl", "0")
    assert (m / "f").read_bytes() == a
    before = os.stat(src / "f")
    rewrite_in_place(src / "f", b)
    os.utime(src / "f", ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -d
    assert (m / "f").read_bytes() == b


def test_a_file_truncated_under_a_reader_gives_it_the_old_length_or_an_error(
    mount: MountFactory, tmp_path: Path
) -> None:
    a = os.urandom(8 * MIB)
    src = local_source(tmp_path, a)
    m = mount(src, "--ttl", "0", "--max-readahead", "0")
    reader = Reader(m / "f").read(3 * MIB)
    os.truncate(src / "f", 2 * MIB)
    assert os.fstat(reader.fd).st_size == len(a)  # the open inode is the old version's
    assert (m / "f").stat().st_size == 2 * MIB  # the path is the new one
    reader.read()
    reader.close()
    # Never a clean end of file at 2 MiB or anywhere short of 8 MiB.
    assert one_version(reader, a) == 0
    assert reader.error is not None  # what was not cached is gone
    assert (m / "f").read_bytes() == a[: 2 * MIB]


def test_a_file_appended_to_under_a_reader_gives_its_version_or_an_error_and_says_so(
    mount: MountFactory, tmp_path: Path
) -> None:
    a = os.urandom(8 * MIB)
    src = local_source(tmp_path, a)
    m = mount(src, "--ttl", "0", "--max-readahead", "0")
    reader = Reader(m / "f").read(2 * MIB)
    with open(src / "f", "ab") as log:  # a log file growing
        log.write(os.urandom(MIB))
    reader.read()
    reader.close()
    # Never the grown length, never bytes past the old end: the version it
    # opened, or a prefix of it and ESTALE (an append cannot be told from a
    # longer rewrite in place, docs/SEMANTICS.md).
    assert one_version(reader, a) == 0
    assert reader.error is not None  # the 6 MiB not cached cannot be had
    warnings = [line for line in m.log_text().splitlines() if " WARNING " in line]
    assert any("changed at the source while open" in line for line in warnings), warnings
    assert (m / "f").read_bytes() == (src / "f").read_bytes()


def test_a_deleted_file_stays_readable_through_a_handle_that_read_it(
    mount: MountFactory, tmp_path: Path
) -> None:
    a = os.urandom(4 * MIB)
    src = local_source(tmp_path, a)
    m = mount(src, "--ttl", "0", "--max-readahead", "0")
    reader = Reader(m / "f").read(MIB)
    os.unlink(src / "f")
    assert not (m / "f").exists()
    reader.read()
    reader.close()
    assert one_version(reader, a) == 0 and reader.error is None


# -- an S3 bucket -------------------------------------------------------------------


@pytest.fixture
def bucket(s3_server: MotoServer) -> str:
    return s3_server.new_bucket()


def s3_mount(mount: MountFactory, server: MotoServer, bucket: str, *options: str) -> Mount:
    return mount(f"s3://{bucket}", "--s3-endpoint", server.endpoint, *options)


def test_an_object_overwritten_within_the_ttl_is_never_mixed(
    mount: MountFactory, s3_server: MotoServer, bucket: str
) -> None:
    a, b = os.urandom(4 * MIB), os.urandom(4 * MIB)
    s3_server.put(bucket, "f", a)
    m = s3_mount(mount, s3_server, bucket, "--ttl", "60", "--max-readahead", "0")
    assert pread_direct(m / "f", 0, MIB) == a[:MIB]
    s3_server.put(bucket, "f", b)
    again = Reader(m / "f").read()
    again.close()
    assert one_version(again, a, b) == 0 and again.error is not None
    assert (m / "f").read_bytes() == b


def test_an_object_overwritten_under_a_slow_reader_is_never_mixed(
    mount: MountFactory, s3_server: MotoServer, bucket: str
) -> None:
    a, b = os.urandom(6 * MIB), os.urandom(6 * MIB)
    s3_server.put(bucket, "f", a)
    m = s3_mount(mount, s3_server, bucket, "--ttl", "0", "--max-readahead", "1M")
    reader = Reader(m / "f").read(2 * MIB)
    s3_server.put(bucket, "f", b)
    assert (m / "f").read_bytes() == b
    reader.read()
    reader.close()
    # The old object whole (its GET stream outlives the overwrite), or a
    # prefix of it and an error: a ranged GET pinned to its ETag gets 412.
    assert one_version(reader, a, b) == 0


def test_s3_streams_and_ranged_gets_are_pinned_to_the_version(
    mount: MountFactory, s3_server: MotoServer, bucket: str, tmp_path: Path
) -> None:
    a, b = os.urandom(3 * MIB), os.urandom(3 * MIB)
    s3_server.put(bucket, "f", a)
    m = s3_mount(mount, s3_server, bucket, "--ttl", "0", "--max-readahead", "0")
    fd = os.open(m / "f", os.O_RDONLY | os.O_DIRECT)  # every read reaches cachefs
    try:
        assert os.pread(fd, MIB, 0) == a[:MIB]
        s3_server.put(bucket, "f", b)
        with pytest.raises(OSError) as info:
            os.pread(fd, MIB, 2 * MIB)  # a random read: a ranged GET, If-Match
        assert info.value.errno == errno.ESTALE
        assert os.pread(fd, MIB, 0) == a[:MIB]  # what it cached still reads
    finally:
        os.close(fd)
    assert (m / "f").read_bytes() == b


# -- randomized: readers while the source keeps changing ---------------------------------

#: How many changes the randomized test makes (and whole readings it needs);
#: the crash suite makes more.
CHURN_MUTATIONS = int(os.environ.get("CACHEFS_CHURN_MUTATIONS", "30000"))
MAX_SIZE = 384 * 1024


def test_every_reading_is_of_one_version_while_the_source_churns(
    mount: MountFactory, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    churn = Churn(src, [f"f{i}" for i in range(4)], random.Random(17), MAX_SIZE)
    # A short TTL, a cache smaller than the files (eviction), some readahead.
    m = mount(
        src, "--ttl", "0.3", "--cache-size", "1M", "--min-free", "0", "--max-readahead", "256K"
    )
    # The second transport runs a third of them: the same requests, a shorter run.
    run_churn(m, churn, CHURN_MUTATIONS if m.fuse == "native" else CHURN_MUTATIONS // 3)
    m.unmount()
