"""The mount over S3: the core mount cases on a local directory and on a bucket
of a real S3 server (moto on 127.0.0.1), then what only a bucket does through
the mount: objects replaced or deleted behind the cache, the server killed and
brought back, and the mount refused with one line when the bucket is unusable.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import NATIVE_ONLY, assert_one_line_error, pread_direct, sha256, wait_for

from backends.trace import read_trace
from cachefs.cli.mount import mount_options
from cachefs.cli.parser import build_parser
from cachefs.cli.s3options import cache_identity
from cachefs.daemon.options import default_cache_dir
from cachefs.daemon.spawn import Orders

if TYPE_CHECKING:
    from conftest import MountFactory
    from s3server import MotoServer

pytest_plugins = ["s3server"]

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
KB64 = 64 * 1024
SIZES = {
    "empty": 0,
    "one": 1,
    "block-1": KB64 - 1,
    "block+1": KB64 + 1,
    "10blocks+7": 10 * KB64 + 7,
}
FILES = {f"{name}.bin": os.urandom(size) for name, size in SIZES.items()}
FILES["a/top.txt"] = b"top\n"
FILES["a/b/c/deep.txt"] = b"deep\n" * 1000
# What the mount shows: "a/" and "empty/" are zero-byte marker objects on S3.
WALK = {
    ".": (["a", "empty"], sorted(f for f in FILES if "/" not in f)),
    "a": (["b"], ["top.txt"]),
    "a/b": (["c"], []),
    "a/b/c": ([], ["deep.txt"]),
    "empty": ([], []),
}
PREFIX = "data"
DEADLINE = 20.0


@dataclass
class Served:
    """What ``cachefs mount`` is given, and the bytes it must serve."""

    source: Path | str
    options: tuple[str, ...] = field(default=())


@pytest.fixture(scope="module", params=["local", "s3"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Served:
    """FILES in a directory, or under a prefix of a bucket (with its "dir/" markers
    and an object beside the prefix that must not show)."""
    if request.param == "local":
        root = tmp_path_factory.mktemp("source")
        for path, data in FILES.items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(data)
        (root / "empty").mkdir()
        return Served(root)
    server: MotoServer = request.getfixturevalue("s3_server")
    bucket = server.new_bucket({"outside.txt": b"not under the prefix"})
    for key in ("", "a/", "empty/"):
        server.put(bucket, f"{PREFIX}/{key}", b"")
    for path, data in FILES.items():
        server.put(bucket, f"{PREFIX}/{path}", data)
    return Served(f"s3://{bucket}/{PREFIX}", ("--s3-endpoint", server.endpoint))


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def walk(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    return {
        os.path.relpath(d, root): (sorted(dirs), sorted(files)) for d, dirs, files in os.walk(root)
    }


def expect_eio(path: Path) -> None:
    with pytest.raises(OSError) as info:
        pread_direct(path, 0, KB64)
    assert info.value.errno == errno.EIO


# -- the core cases, on both kinds of source ------------------------------------------


def test_every_size_reads_back_exactly(mount: MountFactory, served: Served) -> None:
    m = mount(served.source, *served.options)
    for path, data in FILES.items():
        assert (m / path).stat().st_size == len(data), path
        assert sha256(m / path) == sha256_of(data), path
    data = FILES["10blocks+7.bin"]
    for offset, length in [(0, 1), (KB64 - 3, 10), (5 * KB64 + 100, 3 * KB64), (len(data) - 5, 99)]:
        got = pread_direct(m / "10blocks+7.bin", offset, length)
        assert got == data[offset : offset + length], (offset, length)


def test_nested_directories_and_no_markers(mount: MountFactory, served: Served) -> None:
    m = mount(served.source, *served.options)
    assert walk(m.mountpoint) == WALK
    assert (m / "a/b/c/deep.txt").read_bytes() == FILES["a/b/c/deep.txt"]
    with pytest.raises(FileNotFoundError):
        os.stat(m / "a/missing")


def test_remount_serves_every_byte_from_the_cache(
    mount: MountFactory, served: Served, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "shared-cache"
    first = mount(served.source, *served.options, cache_dir=cache_dir)
    for path in FILES:
        sha256(first / path)
    first.unmount()

    trace = tmp_path / "trace.jsonl"
    second = mount(served.source, *served.options, "--trace", trace, cache_dir=cache_dir)
    for path, data in FILES.items():
        assert sha256(second / path) == sha256_of(data), path
    second.unmount()
    assert read_trace(trace) == []


@NATIVE_ONLY
def test_stats(mount: MountFactory, served: Served, cachefs: Cachefs) -> None:
    m = mount(served.source, *served.options)
    sha256(m / "10blocks+7.bin")
    table = cachefs("stats", m / "a")
    assert table.returncode == 0, table.stderr
    assert str(served.source) in table.stdout
    numbers = m.stats()
    assert numbers["source"] == str(served.source)
    assert numbers["read_data_calls"] >= 1
    assert numbers["cached_bytes"] >= SIZES["10blocks+7"]
    assert numbers["external_error"] is None


# -- what only a bucket does ----------------------------------------------------------------


def test_a_replaced_or_deleted_object_is_seen_after_the_ttl(
    mount: MountFactory, s3_server: MotoServer
) -> None:
    bucket = s3_server.new_bucket({"v.txt": b"one"})
    m = mount(f"s3://{bucket}", "--s3-endpoint", s3_server.endpoint, "--ttl", "1")
    assert (m / "v.txt").read_bytes() == b"one"
    assert (m / "v.txt").read_bytes() == b"one"  # from the kernel's pages
    for new in (b"two, longer", b"TWO, LONGER"):  # the second: same size, new ETag
        s3_server.put(bucket, "v.txt", new)
        wait_for(f"reading {new!r}", lambda new=new: (m / "v.txt").read_bytes() == new)
    s3_server.delete(bucket, "v.txt")
    wait_for("v.txt gone", lambda: not (m / "v.txt").exists())
    assert os.listdir(m.mountpoint) == []


def test_a_killed_server_leaves_the_cache_readable_until_it_is_back(
    mount: MountFactory, own_s3_server: MotoServer, cachefs: Cachefs
) -> None:
    server = own_s3_server
    files = {"cached.bin": os.urandom(5 * KB64 + 3), "uncached.bin": os.urandom(3 * KB64)}
    bucket = server.new_bucket(files)
    # --ttl 0: every open asks the server, so the dead server is noticed at once.
    m = mount(f"s3://{bucket}", "--s3-endpoint", server.endpoint, "--ttl", "0")
    assert (m / "cached.bin").read_bytes() == files["cached.bin"]
    opened = os.open(m / "uncached.bin", os.O_RDONLY | os.O_DIRECT)
    try:
        server.kill()
        # Served at its cached version, although the server cannot say it is current.
        assert pread_direct(m / "cached.bin", 0, 8 * KB64) == files["cached.bin"]
        with pytest.raises(OSError) as info:
            os.pread(opened, KB64, 0)
        assert info.value.errno == errno.EIO
    finally:
        os.close(opened)
    assert pread_direct(m / "cached.bin", KB64, KB64) == files["cached.bin"][KB64 : 2 * KB64]
    numbers = m.stats()
    assert "PERMANENT_FAILURE" in numbers["external_error"]
    assert numbers["stale_served"] >= 1

    server.start()  # empty: the same objects again (same bytes, same ETags)
    server.admin.create_bucket(Bucket=bucket)
    for key, data in files.items():
        server.put(bucket, key, data)
    expect_eio(m / "uncached.bin")  # the storage is latched until reset
    done = cachefs("reset-external-error", m.mountpoint)
    assert done.returncode == 0, done.stderr
    assert (m / "uncached.bin").read_bytes() == files["uncached.bin"]
    assert m.stats()["external_error"] is None


# -- a mount refused, in one line ---------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_an_unusable_bucket_fails_the_mount_with_one_line(
    cachefs: Cachefs,
    s3_server: MotoServer,
    mnt: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    foreground: bool,
) -> None:
    def mount_s3(bucket: str, endpoint: str = s3_server.endpoint) -> subprocess.CompletedProcess:
        args = ["mount", f"s3://{bucket}", mnt, "--s3-endpoint", endpoint]
        args += ["--cache-dir", tmp_path / "cache"]
        return cachefs(*args, *(["--foreground"] if foreground else []))

    assert_one_line_error(mount_s3("no-such-bucket"), "has no bucket no-such-bucket")
    assert_one_line_error(
        mount_s3("some-bucket", f"http://127.0.0.1:{closed_port()}"), "cannot be reached"
    )
    bucket = s3_server.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with s3_server.iam_enforced():
        assert_one_line_error(mount_s3(bucket), "refused the credentials", "InvalidAccessKeyId")
    if not foreground:  # the bucket is checked before the cache dir is made
        assert not (tmp_path / "cache").exists()


def test_s3_options_are_checked_before_anything(cachefs: Cachefs, mnt: Path, tmp_path: Path):
    done = cachefs("mount", "s3://some-bucket", mnt, "--s3-endpoint", "notaurl")
    assert_one_line_error(done, "--s3-endpoint", "'notaurl'")
    done = cachefs("mount", tmp_path, mnt, "--s3-region", "eu-west-1", "--s3-anonymous")
    assert_one_line_error(done, "--s3-region, --s3-anonymous: only for s3:// sources")
    done = cachefs("mount", "s3://b", mnt, "--s3-path-style", "--s3-virtual-hosted")
    assert_one_line_error(done, "not allowed with argument")


@pytest.mark.parametrize(
    "given",
    [
        ["--s3-endpoint", "http://minio:9000", "--s3-region", "eu-west-1", "--s3-path-style"],
        ["--s3-anonymous", "--s3-virtual-hosted"],
        [],
    ],
)
def test_s3_options_reach_the_daemon(tmp_path: Path, given: list[str]) -> None:
    (tmp_path / "mnt").mkdir()
    args = [
        "mount",
        "s3://bucket/prefix",
        str(tmp_path / "mnt"),
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    opts = mount_options(build_parser().parse_args([*args, *given]))
    again = Orders.from_json(Orders(opts, "info").to_json()).options  # as the daemon reads them
    assert again == opts
    assert len(opts.backend_options) == len([g for g in given if g.startswith("--")])


def test_the_default_cache_dir_differs_per_bucket_prefix_and_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)

    def cache_dir(source: str, **options: str) -> Path:
        return default_cache_dir(cache_identity(source, options))

    minio = {"endpoint": "http://minio:9000"}
    dirs = {
        cache_dir("s3://bucket/data"),
        cache_dir("s3://bucket/other"),
        cache_dir("s3://bucket"),
        cache_dir("s3://bucket2/data"),
        cache_dir("s3://bucket/data", **minio),
        cache_dir("s3://bucket/data", endpoint="http://ceph:7480"),
    }
    assert len(dirs) == 6
    assert cache_dir("s3://bucket/data/") == cache_dir("s3://bucket/data")
    assert cache_dir("s3://bucket/data", endpoint="HTTP://MinIO:9000/") == cache_dir(
        "s3://bucket/data", **minio
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    assert cache_dir("s3://bucket/data") == cache_dir("s3://bucket/data", **minio)
    assert cache_dir("/srv/data") == default_cache_dir("/srv/data")  # local: as before
