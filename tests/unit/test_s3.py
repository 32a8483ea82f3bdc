"""The S3 backend against a real S3 HTTP server (moto on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from typing import Any

import pytest
import trio
from enginerig import BS, Rig, read_at, read_request, read_sequential

import backends.s3
from backends.s3 import S3Backend, S3File, open_backend
from backends.s3config import resolve
from cachefs import FileQuarantined, StorageQuarantined
from cachefs.contract import FileKind, ReadData, RWEvent, RWResult
from cachefs.errors import SourceError
from cachefs.registry import open_backend as open_any

pytest_plugins = ["s3server"]

DATA = bytes(range(256)) * 96 + b"tail"  # every offset distinct mod 256
BIG = os.urandom(6 * BS + 5)
RANDOM = RWEvent.RANDOM_STARTED | RWEvent.RANDOM_FINISHED | RWEvent.BEFORE_END


# A read of this module's DATA, unless told otherwise.
request = partial(read_request, size=len(DATA), flags=RANDOM)


def got(req: ReadData) -> bytes:
    return bytes(req.buffer[: req.bytes_read])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the URL and the start-up check -------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "no bucket name"),
        ("s3:///prefix", "no bucket name"),
        ("s3://ab", "not a valid bucket name"),
        ("s3://Bucket", "not a valid bucket name"),
        ("s3://a..b", "not a valid bucket name"),
        ("s3://192.168.1.1", "not a valid bucket name"),
        ("s3://key:secret@bucket", "credentials do not belong in the URL"),
        ("s3://bucket/a/../b", "'..' part"),
        ("s3://bucket/a?versionId=1", "no query"),
    ],
)
def test_a_bad_url_is_a_one_line_source_error(url: str, message: str) -> None:
    with pytest.raises(SourceError, match=message) as e:
        open_backend(url, check_timeout=None)
    assert "\n" not in str(e.value)


def test_a_missing_bucket_fails_at_start(s3_server) -> None:
    with pytest.raises(SourceError, match="has no bucket no-such-bucket$"):
        s3_server.open("no-such-bucket")


def test_an_endpoint_that_refuses_connections_fails_at_start(s3_server) -> None:
    with pytest.raises(SourceError, match="cannot be reached: .*Connection refused") as e:
        s3_server.open("test-bucket", endpoint=f"http://127.0.0.1:{closed_port()}")
    assert "\n" not in str(e.value)


def test_an_endpoint_that_never_answers_fails_at_start_all_the_same(s3_server) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections are accepted by the kernel, never answered
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(SourceError, match="did not answer within 1 s|timed out"):
            s3_server.open("test-bucket", endpoint=endpoint, check_timeout=1, timeout=1)


def test_rejected_credentials_fail_at_start(s3_server, monkeypatch) -> None:
    bucket = s3_server.new_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    with s3_server.iam_enforced(), pytest.raises(SourceError) as e:
        s3_server.open(bucket)
    assert "refused the credentials from the environment" in str(e.value)
    assert "InvalidAccessKeyId" in str(e.value)


def test_a_profile_supplies_the_credentials(s3_server, monkeypatch, tmp_path) -> None:
    bucket = s3_server.new_bucket({"f": DATA})
    keys = s3_server.user([{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}])
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[reader]\naws_access_key_id = {keys['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {keys['AWS_SECRET_ACCESS_KEY']}\n"
        "[wrong]\naws_access_key_id = AKIANOSUCHKEY0000000\naws_secret_access_key = x\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    with s3_server.iam_enforced():
        monkeypatch.setenv("AWS_PROFILE", "reader")
        backend = s3_server.open(bucket)
        req = request("f", 0, 100)
        trio.run(backend.read_data, req)
        assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[:100])
        monkeypatch.setenv("AWS_PROFILE", "wrong")
        with pytest.raises(SourceError, match="refused the credentials from profile wrong"):
            s3_server.open(bucket)
        monkeypatch.setenv("AWS_PROFILE", "missing")
        with pytest.raises(SourceError, match="AWS profile missing: .*could not be found"):
            s3_server.open(bucket)


async def test_anonymous_requests_read_a_public_bucket(s3_server) -> None:
    bucket = s3_server.new_bucket()
    s3_server.admin.put_object(Bucket=bucket, Key="f", Body=DATA, ACL="public-read")
    s3_server.admin.put_bucket_acl(Bucket=bucket, ACL="public-read")
    backend = s3_server.open(bucket, anonymous=True)
    req = request("f", 5, 10)
    await backend.read_data(req)
    assert got(req) == DATA[5:15]


def test_the_registry_opens_s3_urls_with_the_endpoint_from_the_environment(
    s3_server, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    assert isinstance(open_any(f"s3://{s3_server.new_bucket()}/some/prefix"), S3Backend)


def test_requests_are_path_style_on_an_endpoint_virtual_hosted_on_aws(
    s3_server, monkeypatch
) -> None:  # s3_server: for its clean environment
    def target(url: str, **options: Any) -> dict[str, Any]:
        options = {
            "endpoint": None,
            "anonymous": False,
            "path_style": None,
            "region": None,
            **options,
        }
        return resolve(url, connect_timeout=1, read_timeout=1, **options).config

    assert target("s3://bucket")["virtual_hosted_style_request"] is True
    assert target("s3://my.bucket")["virtual_hosted_style_request"] is False
    on_minio = target("s3://bucket", endpoint="http://minio:9000/")
    assert on_minio["endpoint"] == "http://minio:9000"
    assert on_minio["virtual_hosted_style_request"] is False
    hosted = target("s3://bucket", endpoint="https://ceph.example", path_style=False)
    assert hosted["endpoint"] == "https://bucket.ceph.example"
    assert target("s3://bucket", anonymous=True, region="eu-west-3") == {
        "skip_signature": True,
        "region": "eu-west-3",
        "virtual_hosted_style_request": True,
    }
    monkeypatch.setenv("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false")
    monkeypatch.setenv("AWS_SKIP_SIGNATURE", "true")
    assert target("s3://bucket") == {"skip_signature": True, "virtual_hosted_style_request": False}


# -- the namespace ----------------------------------------------------------


async def test_objects_are_files_prefixes_directories_and_markers_hidden(s3_server) -> None:
    files = {"top": b"t", "d/": b"", "d/f": DATA, "d/sub/g": b"g", "empty/": b""}
    etag = {}
    bucket = s3_server.new_bucket()
    for key, data in files.items():
        etag[key] = s3_server.put(bucket, key, data)
    backend = s3_server.open(bucket)
    root = {e.name: e.attrs for e in await backend.list_dir("")}
    assert {n: a.kind for n, a in root.items()} == {
        "top": FileKind.FILE,
        "d": FileKind.DIR,
        "empty": FileKind.DIR,
    }
    assert [(e.name, e.attrs.kind) for e in await backend.list_dir("d")] == [
        ("f", FileKind.FILE),
        ("sub", FileKind.DIR),
    ]
    assert await backend.list_dir("empty") == []
    attrs = await backend.stat("d/f")
    assert (attrs.kind, attrs.size, attrs.version) == (FileKind.FILE, len(DATA), etag["d/f"])
    assert root["top"].version == etag["top"]
    for dir_id in ("", "d", "d/sub", "empty"):
        assert (await backend.stat(dir_id)).kind is FileKind.DIR
    for absent in ("nope", "d/nope", "d/f/x", "/top", "d//f", "d/../top"):
        assert await backend.stat(absent) is None
    with pytest.raises(FileNotFoundError):
        await backend.list_dir("nope")
    with pytest.raises(NotADirectoryError):
        await backend.list_dir("top")


async def test_a_prefix_of_the_bucket_is_the_root(s3_server) -> None:
    bucket = s3_server.new_bucket({"a/b/f": b"inner", "a/bx": b"beside", "top": b"out"})
    backend = s3_server.open(f"s3://{bucket}/a/b/")
    assert [e.name for e in await backend.list_dir("")] == ["f"]
    assert await backend.stat("top") is None
    req = request("f", 0, 10)
    await backend.read_data(req)
    assert got(req) == b"inner"


async def test_a_listing_follows_its_pages(s3_server) -> None:
    bucket = s3_server.new_bucket()
    names = [f"k{i:04d}" for i in range(250)]  # moto answers 100 keys a page here
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: s3_server.put(bucket, f"d/{n}", b"x"), names))
    backend = s3_server.open(bucket)
    assert [e.name for e in await backend.list_dir("d")] == names


# -- reads ------------------------------------------------------------------


async def test_reads_are_exact_and_stop_at_the_end_of_the_object(s3_server) -> None:
    backend = s3_server.open(s3_server.new_bucket({"f": DATA}))
    version = (await backend.stat("f")).version
    for position, count in [(0, 1), (1, 255), (4095, 2), (1000, 9000), (0, len(DATA))]:
        req = request("f", position, count, version=version)
        await backend.read_data(req)
        assert (req.result_code, got(req)) == (RWResult.SUCCESS, DATA[position : position + count])
    for position in (len(DATA) - 4, len(DATA), len(DATA) + 100):
        req = request("f", position, 100, version=version)
        await backend.read_data(req)
        assert (req.result_code, got(req)) == (RWResult.RANGE_BEYOND_EOF, DATA[position:])


async def test_a_changed_or_deleted_object_answers_modified_externally(s3_server) -> None:
    source = s3_server.source({"f": DATA, "g": DATA})
    old = (await source.backend.stat("f")).version
    source.put("f", b"new bytes")
    source.delete("g")
    for file_id in ("f", "g"):
        req = request(file_id, 0, 10, version=old)
        await source.backend.read_data(req)
        assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)


@pytest.mark.parametrize("flags", [RWEvent.RANDOM_STARTED, RWEvent.CONTINUOUS_STARTED])
async def test_a_server_that_ignores_if_match_still_cannot_mix_versions(
    s3_server, monkeypatch, flags
) -> None:
    source = s3_server.source({"f": DATA})
    old = (await source.backend.stat("f")).version
    source.put("f", bytes(len(DATA)))
    real_get = backends.s3.obstore.get

    def ignoring_if_match(store: Any, key: str, options: dict[str, Any]) -> Any:
        return real_get(store, key, options={k: v for k, v in options.items() if k != "if_match"})

    monkeypatch.setattr(backends.s3.obstore, "get", ignoring_if_match)
    ctx = await source.backend.open_file("f")
    req = request("f", 0, 1000, version=old, flags=flags | RWEvent.TIL_END, context=ctx)
    await source.backend.read_data(req)
    assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    weak = request("f", 0, 1000, version=f"W/{old}")  # never sent as If-Match
    await source.backend.read_data(weak)
    assert weak.result_code == RWResult.FILE_MODIFIED_EXTERNALLY


async def test_a_continuous_transfer_reads_on_from_one_stream(s3_server) -> None:
    backend = s3_server.open(s3_server.new_bucket({"f": DATA}))
    version = (await backend.stat("f")).version
    ctx = await backend.open_file("f")
    step = len(DATA) // 3 + 1
    out = bytearray()
    flags = [RWEvent.CONTINUOUS_STARTED, RWEvent.IN_PROGRESS, RWEvent.CONTINUOUS_FINISHED]
    for i, flag in enumerate(flags):
        req = request(
            "f", len(out), step, version=version, flags=flag | RWEvent.TIL_END, context=ctx
        )
        await backend.read_data(req)
        out += got(req)
        assert backend.statistics()["open_streams"] == (1 if i < 2 else 0)
    assert out == DATA
    stats = backend.statistics()
    assert (stats["streams"], stats["stream_reads"], stats["gets"]) == (1, 3, 0)


async def test_a_stream_that_another_call_overtook_is_closed(s3_server) -> None:
    backend = s3_server.open(s3_server.new_bucket({"f": DATA}))
    ctx = await backend.open_file("f")
    reqs = [
        request("f", 0, 100, flags=RWEvent.CONTINUOUS_STARTED | RWEvent.TIL_END, context=ctx),
        request("f", 200, 100, flags=RWEvent.IN_PROGRESS | RWEvent.TIL_END, context=ctx),
        request("f", 100, 100, flags=RWEvent.IN_PROGRESS | RWEvent.TIL_END, context=ctx),
    ]
    for req in reqs:  # as readahead may issue them: the call at 200 comes first
        await backend.read_data(req)
    assert [got(r) for r in reqs] == [DATA[0:100], DATA[200:300], DATA[100:200]]
    stats = backend.statistics()
    assert (stats["stream_reads"], stats["gets"], stats["open_streams"]) == (2, 1, 0)


async def test_a_sequential_read_through_the_engine_is_one_get(s3_server, tmp_path) -> None:
    rig = Rig(tmp_path, source=s3_server.source({"big": BIG}))
    async with rig.engine() as cache:
        assert await read_sequential(cache, "big") == BIG
    stats = rig.source.backend.statistics()
    assert (stats["streams"], stats["gets"], stats["open_streams"]) == (1, 0, 0)
    assert stats["stream_reads"] == len(rig.reads()) > 1


@pytest.mark.parametrize("release", ["canceled", "close_file"])
async def test_canceled_and_close_file_release_the_stream(s3_server, release: str) -> None:
    backend = s3_server.open(s3_server.new_bucket({"f": DATA}))
    ctx = await backend.open_file("f")
    req = request("f", 0, 100, flags=RWEvent.CONTINUOUS_STARTED | RWEvent.TIL_END, context=ctx)
    await backend.read_data(req)
    assert backend.statistics()["open_streams"] == 1
    if release == "canceled":
        await backend.read_data(request("f", 100, 0, flags=RWEvent.CANCELED, context=ctx))
    else:
        await backend.close_file("f", ctx)
    assert backend.statistics()["open_streams"] == 0


async def test_calls_in_flight_at_once_each_get_their_bytes(s3_server) -> None:
    backend = s3_server.open(s3_server.new_bucket({"f": DATA}))
    ctx: S3File = await backend.open_file("f")
    reqs = [request("f", i * 1000, 1000, context=ctx) for i in range(16)]
    async with trio.open_nursery() as nursery:
        for req in reqs:
            nursery.start_soon(backend.read_data, req)
    assert b"".join(got(r) for r in reqs) == DATA[:16000]


# -- failures, as the engine sees them --------------------------------------


async def test_403_on_one_object_quarantines_that_file_only(s3_server, tmp_path, monkeypatch):
    deny = {"Effect": "Deny", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::*/secret"}
    allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    for name, value in s3_server.user([allow, deny]).items():
        monkeypatch.setenv(name, value)
    rig = Rig(tmp_path, source=s3_server.source({"secret": BIG, "open": BIG}))
    async with rig.engine() as cache:
        assert await read_at(cache, "secret", 0, 10) == BIG[:10]
        with s3_server.iam_enforced():
            with pytest.raises(FileQuarantined):
                await read_at(cache, "secret", 4 * BS, 10)
            assert await read_at(cache, "secret", 0, 10) == BIG[:10]  # cached: still readable
            assert await read_at(cache, "open", 4 * BS, 10) == BIG[4 * BS : 4 * BS + 10]
        assert cache.statistics()["file_errors"] == ["secret"]
    assert "FILE_FAILURE" in [c["result"] for c in rig.reads()]


@pytest.mark.parametrize("fault", ["credentials", "bucket"])
async def test_rejected_credentials_or_a_deleted_bucket_latch_the_storage(
    s3_server, tmp_path, monkeypatch, fault: str
) -> None:
    if fault == "credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    rig = Rig(tmp_path, source=s3_server.source({"f": BIG}))
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, 10) == BIG[:10]
        if fault == "bucket":
            rig.source.delete("f")
            s3_server.admin.delete_bucket(Bucket=rig.source.bucket)
        with s3_server.iam_enforced() if fault == "credentials" else nullcontext():
            with pytest.raises(StorageQuarantined):
                await read_at(cache, "f", 4 * BS, 10)
            assert await read_at(cache, "f", 0, 10) == BIG[:10]
        assert "PERMANENT_FAILURE" in cache.statistics()["external_error"]
    assert rig.reads()[-1]["result"] == "PERMANENT_FAILURE"


async def test_a_server_killed_mid_read_fails_then_latches_and_comes_back(
    own_s3_server, tmp_path
) -> None:
    server = own_s3_server
    big, small = os.urandom(32 << 20), os.urandom(1000)
    rig = Rig(tmp_path, source=server.source({"big": big, "small": small}))
    chunk = 16 * BS
    async with rig.engine(ttl=0) as cache:
        assert await read_sequential(cache, "small") == small
        fh = await cache.open("big")
        assert await cache.read(fh, 0, chunk) == big[:chunk]  # a stream is open now
        server.kill()
        # The source is gone: the cached file is served at its cached version.
        assert await read_sequential(cache, "small") == small
        assert cache.statistics()["stale_served"] >= 1
        with pytest.raises(StorageQuarantined):
            offset = chunk
            while True:
                assert await cache.read(fh, offset, chunk) == big[offset : offset + chunk]
                offset += chunk
        await cache.close(fh)
        results = [c["result"] for c in rig.reads()]
        failed = results.index("FAILURE")  # the stream broke first ...
        assert set(results[:failed]) == {"SUCCESS"}
        assert results[failed + 1 :] == ["PERMANENT_FAILURE"]  # ... then nothing answered
        assert await read_at(cache, "big", 0, chunk) == big[:chunk]  # offline, from the cache
        server.start()  # empty: put the same objects back (same bytes, same ETags)
        server.admin.create_bucket(Bucket=rig.source.bucket)
        for key, data in (("big", big), ("small", small)):
            rig.source.put(key, data)
        with pytest.raises(StorageQuarantined):
            await read_at(cache, "big", 20 << 20, 10)
        await cache.reset_external_error()
        assert await read_sequential(cache, "big", 64 * BS) == big
