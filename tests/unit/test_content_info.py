"""Content information: the record, where backends keep it, and the wrappers over it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from enginerig import Bare

from backends.faulty import FaultyBackend
from backends.local import LocalBackend
from backends.memory import MemoryBackend
from backends.throttled import ThrottledBackend
from backends.trace import TraceBackend, read_trace
from backends.wrapper import Wrapper
from cachefs.contract import ContentInfo, ReadData, RWEvent, RWResult
from cachefs.errors import RulesError

pytest_plugins = ["s3server"]

BS = 4096
DATA = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: two whole blocks and a short one
INFO = ContentInfo.of_bytes(DATA, "v1", BS)


def request(file_id: str, position: int, count: int, **kw: Any) -> ReadData:
    return ReadData(
        file_id=file_id,
        size=len(DATA),
        position=position,
        flags=kw.pop("flags", RWEvent.RANDOM_STARTED | RWEvent.BEFORE_END),
        buffer=memoryview(bytearray(count)),
        bytes_to_read=count,
        **kw,
    )


def got(req: ReadData) -> bytes:
    return bytes(req.buffer[: req.bytes_read])


def tampered(**changes: Any) -> bytes:
    record = json.loads(INFO.to_bytes())
    record.update(changes)
    return json.dumps(record).encode()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- the record ------------------------------------------------------------------


def test_record_round_trip() -> None:
    assert len(INFO.block_hashes) == 3
    assert INFO.size == len(DATA) and INFO.block_size == BS
    assert ContentInfo.from_bytes(INFO.to_bytes()) == INFO
    empty = ContentInfo.of_bytes(b"", "v0", BS)
    assert empty.block_hashes == () and ContentInfo.from_bytes(empty.to_bytes()) == empty


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (tampered(blocks=[INFO.block_hashes[1].hex()] * 3), "do not match the content hash"),
        (tampered(content_hash="00" * 32), "do not match the content hash"),
        (tampered(blocks=[h.hex() for h in INFO.block_hashes[:2]]), "block count"),
        (tampered(size=len(DATA) + BS), "block count"),
        (tampered(blocks=["abcd"] * 3), "not SHA-256"),
        (tampered(format="something-else/1"), "not content information"),
        (tampered(size="10244"), "bad version, size or block_size"),
        (b"{not json", "not content information"),
        (b"[]", "not content information"),
    ],
)
def test_a_tampered_record_is_refused(record: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ContentInfo.from_bytes(record)


# -- local -----------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(DATA)
    (src / "sub" / "b.bin").write_bytes(b"b")
    return src


async def test_local_stores_records_beside_the_files(root: Path) -> None:
    local = LocalBackend(root)
    assert await local.content_info("sub/b.bin") is None
    await local.put_content_info("sub/b.bin", INFO)
    record = root / ".cachefs-ci" / "sub" / "b.bin"
    assert record.read_bytes() == INFO.to_bytes()
    assert await local.content_info("sub/b.bin") == INFO
    # Replaced whole; no temporary file is left behind.
    other = ContentInfo.of_bytes(b"b", "v2", BS)
    await local.put_content_info("sub/b.bin", other)
    assert await local.content_info("sub/b.bin") == other
    assert os.listdir(record.parent) == ["b.bin"]
    await local.put_content_info("a.bin", INFO)
    assert await local.content_info_ids() == ["a.bin", "sub/b.bin"]
    # Deleting drops the directories it leaves empty, and is quiet when nothing is there.
    await local.delete_content_info("sub/b.bin")
    await local.delete_content_info("sub/b.bin")
    assert not (root / ".cachefs-ci" / "sub").exists()
    assert await local.content_info_ids() == ["a.bin"]
    assert await local.content_info("sub/b.bin") is None


async def test_local_hides_its_records(root: Path) -> None:
    local = LocalBackend(root)
    await local.put_content_info("a.bin", INFO)
    assert sorted(e.name for e in await local.list_dir("")) == ["a.bin", "sub"]
    for hidden in (".cachefs-ci", ".cachefs-ci/a.bin"):
        assert await local.stat(hidden) is None
        with pytest.raises(FileNotFoundError):
            await local.open_file(hidden)
        req = request(hidden, 0, 10)
        await local.read_data(req)
        assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    with pytest.raises(FileNotFoundError):
        await local.list_dir(".cachefs-ci")
    # At any depth: a subtree may have been published on its own.
    (root / "sub" / ".cachefs-ci").mkdir()
    (root / "sub" / ".cachefs-ci" / "x").write_bytes(b"record")
    assert ".cachefs-ci" not in {e.name for e in await local.list_dir("sub")}
    assert await local.stat("sub/.cachefs-ci/x") is None


async def test_local_malformed_record_is_none_with_one_warning(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = LocalBackend(root)
    (root / ".cachefs-ci").mkdir()
    (root / ".cachefs-ci" / "a.bin").write_bytes(tampered(content_hash="00" * 32))
    caplog.set_level(logging.WARNING)
    assert await local.content_info("a.bin") is None
    assert len(warnings_of(caplog)) == 1
    assert "a.bin" in warnings_of(caplog)[0]
    # A directory where a record would be is no record, and no warning.
    (root / ".cachefs-ci" / "sub").mkdir()
    assert await local.content_info("sub") is None
    assert len(warnings_of(caplog)) == 1


async def test_local_records_never_leave_the_root(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.bin").write_bytes(INFO.to_bytes())
    (root / ".cachefs-ci").symlink_to(outside)
    local = LocalBackend(root)
    assert await local.content_info("a.bin") is None
    with pytest.raises(FileNotFoundError):
        await local.put_content_info("sub/b.bin", INFO)
    assert os.listdir(outside) == ["a.bin"]
    assert await local.content_info_ids() == []
    for bad in ("", "../x", "/etc/passwd", "a/./b"):
        assert await local.content_info(bad) is None


# -- S3 --------------------------------------------------------------------------


async def test_s3_stores_records_below_the_prefix(s3_server: Any) -> None:
    bucket = s3_server.new_bucket({"data/a.bin": DATA, "data/sub/b.bin": b"b", "other": b"o"})
    backend = s3_server.open(f"s3://{bucket}/data")
    try:
        assert await backend.content_info("a.bin") is None
        await backend.put_content_info("a.bin", INFO)
        await backend.put_content_info("sub/b.bin", INFO)
        body = s3_server.admin.get_object(Bucket=bucket, Key="data/.cachefs-ci/a.bin")["Body"]
        assert body.read() == INFO.to_bytes()
        assert await backend.content_info("a.bin") == INFO
        assert await backend.content_info_ids() == ["a.bin", "sub/b.bin"]
        await backend.delete_content_info("sub/b.bin")
        await backend.delete_content_info("sub/b.bin")
        assert await backend.content_info_ids() == ["a.bin"]
        assert await backend.content_info("sub/b.bin") is None
    finally:
        await backend.aclose()


async def test_s3_hides_its_records(s3_server: Any) -> None:
    bucket = s3_server.new_bucket({"a.bin": DATA})
    backend = s3_server.open(bucket)
    try:
        await backend.put_content_info("a.bin", INFO)
        assert [e.name for e in await backend.list_dir("")] == ["a.bin"]
        for hidden in (".cachefs-ci", ".cachefs-ci/a.bin"):
            assert await backend.stat(hidden) is None
            req = request(hidden, 0, 10, file_context=await backend.open_file(hidden))
            await backend.read_data(req)
            assert (req.result_code, req.bytes_read) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
        with pytest.raises(FileNotFoundError):
            await backend.list_dir(".cachefs-ci")
    finally:
        await backend.aclose()


async def test_s3_malformed_record_is_none_with_one_warning(
    s3_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3_server.new_bucket({"a.bin": DATA})
    s3_server.put(bucket, ".cachefs-ci/a.bin", tampered(blocks=[]))
    backend = s3_server.open(bucket)
    try:
        caplog.set_level(logging.WARNING)
        assert await backend.content_info("a.bin") is None
        assert len(warnings_of(caplog)) == 1
        assert "a.bin" in warnings_of(caplog)[0]
    finally:
        await backend.aclose()


async def test_s3_storage_errors_raise(own_s3_server: Any) -> None:
    bucket = own_s3_server.new_bucket({"a.bin": DATA})
    backend = own_s3_server.open(bucket, timeout=2.0)
    try:
        own_s3_server.kill()
        with pytest.raises(OSError, match=r"\.cachefs-ci/a\.bin"):
            await backend.content_info("a.bin")
        with pytest.raises(OSError):
            await backend.put_content_info("a.bin", INFO)
    finally:
        await backend.aclose()


# -- memory and the wrappers ------------------------------------------------------


async def test_memory_publish_and_put() -> None:
    mem = MemoryBackend({"d/f": DATA})
    info = mem.publish("d/f", BS)
    version = (await mem.stat("d/f")).version
    assert info == ContentInfo.of_bytes(DATA, version, BS)
    assert await mem.content_info("d/f") == info
    await mem.put_content_info("other", INFO)
    assert await mem.content_info_ids() == ["d/f", "other"]
    await mem.delete_content_info("other")
    assert await mem.content_info("other") is None
    with pytest.raises(FileNotFoundError):
        mem.publish("nope", BS)


async def test_wrappers_pass_content_information_through(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "*", "result": "FAILURE"}]))
    mem = MemoryBackend({"f": DATA})
    stack = ThrottledBackend(
        TraceBackend(FaultyBackend(mem, rules), tmp_path / "trace.jsonl"), latency=0
    )
    await stack.put_content_info("f", INFO)
    assert await mem.content_info("f") == INFO
    assert await stack.content_info("f") == INFO
    assert await stack.content_info_ids() == ["f"]
    await stack.delete_content_info("f")
    assert await stack.content_info("f") is None
    assert read_trace(tmp_path / "trace.jsonl") == []


async def test_a_wrapper_over_a_backend_without_them() -> None:
    wrapped = Wrapper(Bare({"f": DATA}))  # type: ignore[arg-type]
    assert await wrapped.content_info("f") is None
    with pytest.raises(NotImplementedError, match="Bare.. cannot store content information"):
        await wrapped.put_content_info("f", INFO)
    with pytest.raises(NotImplementedError):
        await wrapped.content_info_ids()


# -- the faulty backend's "corrupt" rule --------------------------------------------


def corrupted(data: bytes) -> bytes:
    out = bytearray(data)
    for i in range(0, len(out), 4096):
        out[i] ^= 0xFF
    return bytes(out)


def faulty(tmp_path: Path, rules: object) -> FaultyBackend:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    return FaultyBackend(MemoryBackend({"a.bin": DATA, "b.bin": DATA}), path)


async def test_corrupt_flips_the_first_byte_of_every_4k(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "a.bin", "corrupt": True, "count": 2}])
    req = request("a.bin", 0, len(DATA))
    await fb.read_data(req)
    assert req.result_code == RWResult.SUCCESS
    assert got(req) == corrupted(DATA)
    assert sum(x != y for x, y in zip(got(req), DATA, strict=True)) == 3
    # The offsets count from the call's first byte; the result code is the real one.
    req = request("a.bin", 100, len(DATA))
    await fb.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.RANGE_BEYOND_EOF, corrupted(DATA[100:]))
    # count: two calls only; other files untouched.
    req = request("a.bin", 0, 10)
    await fb.read_data(req)
    assert got(req) == DATA[:10]
    req = request("b.bin", 0, 10)
    await fb.read_data(req)
    assert got(req) == DATA[:10]


async def test_corrupt_false_is_no_corruption(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "*", "corrupt": False, "result": "PARTIAL", "max_bytes": 4}])
    req = request("a.bin", 0, 10)
    await fb.read_data(req)
    assert (req.result_code, got(req)) == (RWResult.PARTIAL, DATA[:4])


async def test_corrupt_leaves_canceled_calls_alone(tmp_path: Path) -> None:
    fb = faulty(tmp_path, [{"file": "*", "corrupt": True, "count": 1}])
    await fb.read_data(request("a.bin", 0, 0, flags=RWEvent.CANCELED))
    req = request("a.bin", 0, 10)
    await fb.read_data(req)
    assert got(req) == corrupted(DATA[:10])


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"corrupt": 1}, "corrupt must be true or false, got 1"),
        ({"corrupt": "yes"}, 'corrupt must be true or false, got "yes"'),
        ({"corrupt": True, "result": "FAILURE"}, "'corrupt' cannot be combined with 'result'"),
        ({"corrupt": True, "max_bytes": 4}, "'corrupt' cannot be combined with 'max_bytes'"),
        ({"corrupt": True, "eof": 4}, "'corrupt' cannot be combined with 'eof'"),
        ({"corrupt": True, "count": -1}, "count must not be negative"),
        ({"corrupt": False}, "missing key 'result'"),
    ],
)
def test_corrupt_rules_are_checked(tmp_path: Path, rule: dict[str, Any], message: str) -> None:
    with pytest.raises(RulesError) as info:
        faulty(tmp_path, [{"file": "*", **rule}])
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"faults file {tmp_path / 'rules.json'}: rule 1: ")
    assert message in text
