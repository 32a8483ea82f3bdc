"""The blob stores behind a group's hosted cache: an S3 bucket (moto) and a directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from backends.localblobs import LocalBlobs
from backends.s3blobs import S3Blobs
from cachefs.contract import BlobStore
from cachefs.errors import SourceError, UnknownBackend
from cachefs.registry import open_blob_store

pytest_plugins = ["s3server"]

DATA = os.urandom(100_000)
NAME = f"blocks/{hashlib.sha256(DATA).hexdigest()}"


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """An empty blob store of each kind, opened through the registry."""
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        url = f"s3://{server.new_bucket()}/hosted"
        opened = open_blob_store(url, endpoint=server.endpoint)
    else:
        opened = open_blob_store(str(tmp_path))
    try:
        yield opened
    finally:
        await opened.aclose()


async def test_a_blob_put_is_there_to_get(store: BlobStore) -> None:
    assert await store.get_blob(NAME) is None
    assert await store.has_blob(NAME) is False
    await store.put_blob(NAME, DATA)
    assert await store.has_blob(NAME) is True
    assert await store.get_blob(NAME) == DATA
    await store.put_blob(NAME, DATA)  # again: still the same blob
    assert await store.get_blob(NAME) == DATA
    assert await store.get_blob(NAME + "0") is None


async def test_an_empty_blob_is_a_blob(store: BlobStore) -> None:
    await store.put_blob("empty", b"")
    assert await store.has_blob("empty") is True
    assert await store.get_blob("empty") == b""
    assert await store.get_blob("empty", 10) == b""


async def test_a_limit_reads_no_more_than_one_byte_past_it(store: BlobStore) -> None:
    """A blob longer than the caller expects (planted to exhaust its memory)
    is read only as far as the limit and one byte more."""
    await store.put_blob(NAME, DATA)
    assert await store.get_blob(NAME, 4) == DATA[:5]
    assert await store.get_blob(NAME, len(DATA)) == DATA
    assert await store.get_blob(NAME, len(DATA) + 100) == DATA
    assert await store.get_blob(NAME + "0", 4) is None


@pytest.mark.parametrize(
    "name",
    ["", "/blocks/a", "blocks/", "blocks//a", "./a", "blocks/../a", "..", "Blocks", "a b", "é"],
)
async def test_a_bad_name_is_a_value_error(store: BlobStore, name: str) -> None:
    with pytest.raises(ValueError, match="bad blob name"):
        await store.get_blob(name)
    with pytest.raises(ValueError, match="bad blob name"):
        await store.has_blob(name)
    with pytest.raises(ValueError, match="bad blob name"):
        await store.put_blob(name, DATA)


# -- S3 ----------------------------------------------------------------------------


async def test_a_blob_is_the_object_below_the_prefix(s3_server) -> None:
    bucket = s3_server.new_bucket()
    store = open_blob_store(f"s3://{bucket}/group/hosted", endpoint=s3_server.endpoint)
    assert isinstance(store, S3Blobs)
    assert repr(store) == f"S3Blobs('s3://{bucket}/group/hosted' at {s3_server.endpoint})"
    await store.put_blob(NAME, DATA)
    got = s3_server.admin.get_object(Bucket=bucket, Key=f"group/hosted/{NAME}")
    assert got["Body"].read() == DATA
    s3_server.put(bucket, "group/hosted/blocks/other", b"put by someone else")
    assert await store.get_blob("blocks/other") == b"put by someone else"
    assert store.statistics()["found"] == 1


async def test_a_missing_bucket_is_an_os_error(s3_server) -> None:
    store = open_blob_store("s3://no-such-bucket/hosted", endpoint=s3_server.endpoint)
    with pytest.raises(OSError, match="NoSuchBucket") as e:
        await store.get_blob(NAME)
    assert "\n" not in str(e.value)
    with pytest.raises(OSError, match="NoSuchBucket"):
        await store.put_blob(NAME, DATA)
    assert store.statistics()["errors"] == 2


async def test_a_missing_bucket_fails_at_open_when_checked(s3_server) -> None:
    with pytest.raises(SourceError, match="has no bucket no-such-bucket$"):
        open_blob_store("s3://no-such-bucket", endpoint=s3_server.endpoint, check_timeout=10.0)


async def test_a_stopped_server_is_an_os_error(own_s3_server) -> None:
    server = own_s3_server
    store = open_blob_store(f"s3://{server.new_bucket()}", endpoint=server.endpoint)
    assert isinstance(store, S3Blobs)
    await store.put_blob(NAME, DATA)
    server.stop()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get_blob(NAME),
        lambda: store.has_blob(NAME),
        lambda: store.put_blob(NAME, DATA),
    ]
    for call in calls:
        with pytest.raises(OSError) as e:
            await call()
        assert str(e.value).startswith(f"{store.url}: ")
        assert "\n" not in str(e.value)


async def test_a_caller_deadline_frees_it_from_a_hung_server(own_s3_server) -> None:
    server = own_s3_server
    store = open_blob_store(f"s3://{server.new_bucket()}", endpoint=server.endpoint)
    server.pause()
    try:
        with trio.move_on_after(0.2) as scope:
            await store.get_blob(NAME)
        assert scope.cancelled_caught
    finally:
        server.resume()


# -- a directory -------------------------------------------------------------------


async def test_a_blob_is_the_file_below_the_directory(tmp_path: Path) -> None:
    store = open_blob_store(f"file://{tmp_path}")
    assert isinstance(store, LocalBlobs)
    await store.put_blob(NAME, DATA)
    assert (tmp_path / NAME).read_bytes() == DATA
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == [NAME.split("/")[1]]
    (tmp_path / "blocks" / "other").write_bytes(b"put by someone else")
    assert await store.get_blob("blocks/other") == b"put by someone else"
    assert await store.get_blob("blocks") is None  # a directory is no blob
    assert await store.has_blob("blocks") is False


async def test_a_directory_store_ignores_the_s3_options(tmp_path: Path) -> None:
    store = open_blob_store(str(tmp_path), endpoint="http://127.0.0.1:1", timeout=1.0)
    await store.put_blob("a", b"x")
    assert await store.get_blob("a") == b"x"


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_directory_store_needs_a_directory(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "store"
    if kind == "file":
        path.write_bytes(b"")
    with pytest.raises(SourceError, match=f"{path} (does not exist|is not a directory)$"):
        open_blob_store(str(path))


async def test_a_directory_store_that_cannot_be_written_is_an_os_error(tmp_path: Path) -> None:
    store = open_blob_store(str(tmp_path))
    (tmp_path / "blocks").write_bytes(b"a file where a directory should be")
    with pytest.raises(OSError, match=f"writing blob {NAME} in {tmp_path}: ") as e:
        await store.put_blob(NAME, DATA)
    assert "\n" not in str(e.value)
    assert await store.get_blob(NAME) is None


# -- the registry ------------------------------------------------------------------


def test_an_unknown_scheme_is_refused_in_one_line() -> None:
    with pytest.raises(UnknownBackend, match="'gs'.*known schemes are file, s3$") as e:
        open_blob_store("gs://bucket/hosted")
    assert "\n" not in str(e.value)


def test_every_store_is_a_blob_store(s3_server, tmp_path: Path) -> None:
    for url in (str(tmp_path), f"file://{tmp_path}", "s3://any-bucket/x"):
        assert isinstance(open_blob_store(url, endpoint=s3_server.endpoint), BlobStore)
