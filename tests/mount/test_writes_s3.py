"""POSIX writes through a real mount of an S3 bucket (moto on 127.0.0.1).

S3 takes whole objects: after a flush the object holds exactly the bytes
the mount shows, whatever the change was (a write into the middle, a cut,
a sparse write, an overwrite), and replaces the old object whole.  Names
change at once: a directory made through the mount is a marker object, a
rename is a copy and a delete (a directory's keys one by one), an unlinked
object is gone, and a file never flushed never reaches the bucket.  What
S3 cannot do answers an errno: no symlinks (EPERM), no removal or rename
of a directory another tool made with a "dir/" marker (EPERM).  An object
replaced by another client under unflushed changes keeps both versions.

Fewer and larger tests than on a local directory: moto is slow.  Unless a
test says otherwise a mount sends changes --write-back-delay 3600 s after
their last close: whatever reaches the bucket does so because of the
command under test.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest
from conftest import pread_direct, run_cachefs

if TYPE_CHECKING:
    from conftest import Mount, MountFactory
    from s3server import MotoServer

pytest_plugins = ["s3server"]

LATER = ("--write-back-delay", "3600")
KB = 1024
PREFIX = "data"
BASE = os.urandom(300 * KB)
HELLO = b"hello\n"
#: Larger than one part (8 MiB): sent as a multipart upload.
BIG = os.urandom(9 << 20)
FILES = {
    "base.bin": BASE,
    "hello.txt": HELLO,
    "dir/a.txt": b"a\n",
    "dir/sub/b.txt": b"b\n",
    "other/target.txt": b"target\n",
}


class Bucket:
    """A bucket of the test's own holding FILES under PREFIX, seen as its owner sees it."""

    def __init__(self, server: MotoServer, files: dict[str, bytes]) -> None:
        self.server = server
        self.name = server.new_bucket({f"{PREFIX}/{k}": v for k, v in files.items()})
        self.url = f"s3://{self.name}/{PREFIX}"

    def get(self, key: str) -> bytes | None:
        """The object at *key* (below PREFIX), None if there is none."""
        try:
            answer = self.server.admin.get_object(Bucket=self.name, Key=f"{PREFIX}/{key}")
        except self.server.admin.exceptions.NoSuchKey:
            return None
        data: bytes = answer["Body"].read()
        return data

    def etag(self, key: str) -> str:
        answer = self.server.admin.head_object(Bucket=self.name, Key=f"{PREFIX}/{key}")
        return str(answer["ETag"])

    def put(self, key: str, data: bytes) -> None:
        self.server.put(self.name, f"{PREFIX}/{key}", data)

    def names(self) -> list[str]:
        """Every key below PREFIX, relative to it."""
        found: list[str] = []
        pages = self.server.admin.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.name, Prefix=f"{PREFIX}/"):
            found += [o["Key"][len(PREFIX) + 1 :] for o in page.get("Contents", [])]
        return sorted(found)

    def files(self) -> dict[str, bytes | None]:
        """Every object below PREFIX but the directory markers, with its bytes."""
        return {k: self.get(k) for k in self.names() if not k.endswith("/.cachefs-dir")}


def mount_bucket(mount: MountFactory, bucket: Bucket, *options: object) -> Mount:
    return mount(bucket.url, "--s3-endpoint", bucket.server.endpoint, *options)


def flush(*paths: object) -> subprocess.CompletedProcess[str]:
    done = run_cachefs("flush", *paths)
    assert done.returncode == 0, done.stderr
    return done


def errno_of(change: Callable[[], object]) -> int:
    with pytest.raises(OSError) as info:
        change()
    assert info.value.errno is not None
    return info.value.errno


def test_an_object_after_a_flush_holds_exactly_the_bytes_written(
    mount: MountFactory, s3_server: MotoServer
) -> None:
    bucket = Bucket(s3_server, {**FILES, "big.bin": BIG})
    m = mount_bucket(mount, bucket, *LATER)
    etag = bucket.etag("base.bin")
    new = os.urandom(100 * KB)
    (m / "new.bin").write_bytes(new)
    # A write into the middle of objects the cache holds none of: the rest
    # is fetched to send the whole object (one PUT; a multipart upload).
    with open(m / "base.bin", "r+b") as f:
        f.seek(150 * KB + 1)
        f.write(b"M" * 100)
    base = BASE[: 150 * KB + 1] + b"M" * 100 + BASE[150 * KB + 101 :]
    with open(m / "big.bin", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"middle")
    big = BIG[: 5 << 20] + b"middle" + BIG[(5 << 20) + 6 :]
    # An overwrite, shorter: the object is replaced whole.
    (m / "other" / "target.txt").write_bytes(b"t")
    # Cut down and grown again; a write far past the end; appends.
    os.truncate(m / "hello.txt", 2)
    os.truncate(m / "hello.txt", 5000)
    hello = HELLO[:2] + bytes(4998)
    with open(m / "sparse.bin", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    with open(m / "dir" / "a.txt", "ab") as f:
        f.write(b"more\n")
    expected = {
        "base.bin": base,
        "big.bin": big,
        "dir/a.txt": b"a\nmore\n",
        "dir/sub/b.txt": b"b\n",
        "hello.txt": hello,
        "new.bin": new,
        "other/target.txt": b"t",
        "sparse.bin": bytes(3 << 20) + b"end",
    }
    for name, data in expected.items():
        assert (m / name).stat().st_size == len(data), name
        assert (m / name).read_bytes() == data, name
    assert pread_direct(m / "big.bin", (5 << 20) - 2, 10) == big[(5 << 20) - 2 : (5 << 20) + 8]
    assert bucket.files() == {**FILES, "big.bin": BIG}  # nothing sent yet

    done = flush(m.mountpoint)
    assert done.stdout.startswith("flushed 7 files"), done.stdout
    assert bucket.files() == expected
    assert bucket.etag("base.bin") != etag
    for name, data in expected.items():
        assert (m / name).read_bytes() == data, name
    assert m.stats()["dirty_files"] == 0


def test_names_change_in_the_bucket(mount: MountFactory, s3_server: MotoServer) -> None:
    bucket = Bucket(s3_server, FILES)
    s3_server.put(bucket.name, f"{PREFIX}/console/", b"")  # "Create folder" of another tool
    m = mount_bucket(mount, bucket, *LATER)
    assert sorted(os.listdir(m.mountpoint)) == ["base.bin", "console", "dir", "hello.txt", "other"]

    # mkdir: a marker object, at once; an empty directory stays one.
    os.mkdir(m / "made")
    assert "made/.cachefs-dir" in bucket.names()
    assert os.listdir(m / "made") == []
    assert errno_of(lambda: os.mkdir(m / "made")) == errno.EEXIST
    assert errno_of(lambda: os.rmdir(m / "dir")) == errno.ENOTEMPTY
    # Renames: within a directory, across, over an existing object.
    os.rename(m / "hello.txt", m / "hello2.txt")
    os.rename(m / "dir" / "a.txt", m / "made" / "a.txt")
    os.rename(m / "base.bin", m / "other" / "target.txt")
    assert (m / "other" / "target.txt").read_bytes() == BASE
    assert (m / "made" / "a.txt").read_bytes() == b"a\n"
    assert bucket.get("other/target.txt") == BASE
    assert bucket.get("base.bin") is None and bucket.get("hello.txt") is None
    assert bucket.get("hello2.txt") == HELLO and bucket.get("made/a.txt") == b"a\n"
    # A directory with files: every key moves (not atomic on S3).
    (m / "dir" / "sub" / "new.txt").write_bytes(b"unflushed\n")
    with open(m / "dir" / "sub" / "b.txt", "ab") as f:  # changed, not flushed
        f.write(b"more\n")
    os.rename(m / "dir", m / "moved")
    assert sorted(os.listdir(m / "moved" / "sub")) == ["b.txt", "new.txt"]
    assert not (m / "dir").exists()
    assert (m / "moved" / "sub" / "b.txt").read_bytes() == b"b\nmore\n"
    assert bucket.get("moved/sub/b.txt") == b"b\n" and bucket.get("dir/sub/b.txt") is None
    # unlink: an object goes at once; a file never flushed never arrives.
    os.unlink(m / "hello2.txt")
    assert bucket.get("hello2.txt") is None
    (m / "gone.txt").write_bytes(b"never sent\n")
    os.unlink(m / "gone.txt")
    # A new file renamed over an object, before either is flushed.
    (m / "fresh.txt").write_bytes(b"fresh\n")
    os.rename(m / "fresh.txt", m / "other" / "target.txt")
    assert (m / "other" / "target.txt").read_bytes() == b"fresh\n"

    # What S3 cannot do.
    assert errno_of(lambda: os.symlink("moved", m / "link")) == errno.EPERM
    assert errno_of(lambda: os.rmdir(m / "console")) == errno.EPERM
    assert errno_of(lambda: os.rename(m / "console", m / "console2")) == errno.EPERM
    assert (m / "console").is_dir()

    flush(m.mountpoint)
    assert bucket.files() == {
        "console/": b"",
        "made/a.txt": b"a\n",
        "moved/sub/b.txt": b"b\nmore\n",
        "moved/sub/new.txt": b"unflushed\n",
        "other/target.txt": b"fresh\n",
    }
    assert bucket.names().count("made/.cachefs-dir") == 1
    os.unlink(m / "made" / "a.txt")
    os.rmdir(m / "made")
    assert not any(k.startswith("made/") for k in bucket.names())
    assert not (m / "made").exists()


def test_an_object_replaced_meanwhile_keeps_both_versions(
    mount: MountFactory, s3_server: MotoServer
) -> None:
    bucket = Bucket(s3_server, FILES)
    m = mount_bucket(mount, bucket, *LATER)
    with open(m / "hello.txt", "ab") as f:
        f.write(b"ours\n")
    (m / "dir" / "new.txt").write_bytes(b"ours, new\n")
    (m / "other" / "target.txt").write_bytes(b"ours, replaced\n")
    bucket.put("hello.txt", b"theirs\n")  # another client, meanwhile
    bucket.put("dir/new.txt", b"theirs, new\n")
    s3_server.delete(bucket.name, f"{PREFIX}/other/target.txt")

    done = run_cachefs("flush", m.mountpoint)
    assert done.returncode == 1, done
    assert done.stderr.count("changed in the source meanwhile") == 3, done.stderr
    assert bucket.get("hello.txt") == b"theirs\n"
    assert bucket.get("dir/new.txt") == b"theirs, new\n"
    (copy,) = [k for k in bucket.names() if k.startswith("hello.txt.conflict-")]
    assert bucket.get(copy) == HELLO + b"ours\n"
    (new_copy,) = [k for k in bucket.names() if k.startswith("dir/new.txt.conflict-")]
    assert bucket.get(new_copy) == b"ours, new\n"
    assert (m / copy).read_bytes() == HELLO + b"ours\n"
    assert (m / new_copy).read_bytes() == b"ours, new\n"
    (gone_copy,) = [k for k in bucket.names() if k.startswith("other/")]
    assert gone_copy.startswith("other/target.txt.conflict-")
    assert bucket.get(gone_copy) == b"ours, replaced\n"
    numbers = m.stats()
    assert numbers["write_conflicts"] == 3 and numbers["dirty_files"] == 0


def test_fio_with_write_back_delay_0(mount: MountFactory, s3_server: MotoServer) -> None:
    """fio lays out its files on an empty bucket and checks them; each file
    is an object of its size as soon as fio has closed it."""
    bucket = Bucket(s3_server, {})
    m = mount_bucket(mount, bucket, "--write-back-delay", "0")
    for name, rw, bs in [("seq", "write", "64k"), ("rand", "randwrite", "4k")]:
        done = subprocess.run(
            ["fio", f"--name={name}", f"--directory={m.mountpoint}", f"--rw={rw}"]
            + [
                "--size=4M",
                f"--bs={bs}",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_state_save=0",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    objects = bucket.files()
    assert {k: len(v or b"") for k, v in objects.items()} == {
        "seq.0.0": 4 << 20,
        "rand.0.0": 4 << 20,
    }
    for name, data in objects.items():
        assert (m / name).read_bytes() == data, name
    assert m.stats()["dirty_files"] == 0
