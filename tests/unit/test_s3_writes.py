"""Writing to the S3 backend against a real S3 HTTP server (moto on 127.0.0.1):
whole-file uploads, conditional on the version, and namespace changes."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
from obstore.exceptions import AlreadyExistsError, GenericError

from backends.s3 import S3Backend
from backends.s3errors import result_for
from backends.s3writes import MIN_PART_SIZE
from cachefs.contract import (
    ChangeResult,
    FileKind,
    RWEvent,
    RWResult,
    WritableBackend,
    WriteCapability,
    WriteData,
)

pytest_plugins = ["s3server"]

CHUNK = 1 << 20
SMALL = bytes(range(256)) * 300 + b"end"  # 76803 bytes: one PUT
BIG = os.urandom(MIN_PART_SIZE + 12345)  # two parts at the smallest part size


def calls(file_id: str, data: bytes, version: str, chunk: int) -> list[WriteData]:
    """The WriteData calls of one whole-file transfer of *data*, as the engine makes them."""
    pieces = [(p, data[p : p + chunk]) for p in range(0, len(data), chunk)] or [(0, b"")]
    out = []
    for i, (position, piece) in enumerate(pieces):
        flags = RWEvent.WHOLE_FILE | RWEvent.TIL_END
        flags |= RWEvent.CONTINUOUS_STARTED if i == 0 else RWEvent.IN_PROGRESS
        if i == len(pieces) - 1:
            flags |= RWEvent.CONTINUOUS_FINISHED
        view = memoryview(piece).toreadonly()
        out.append(
            WriteData(file_id, len(data), position, flags, view, len(piece), version=version)
        )
    return out


async def upload(
    backend: S3Backend, file_id: str, data: bytes, version: str = "", chunk: int = 30000
) -> WriteData:
    """Send every call (each carrying the context the last one left); the last call."""
    context: object = None
    for req in calls(file_id, data, version, chunk):
        req.file_context = context
        await backend.write_data(req)
        if req.result_code is not RWResult.SUCCESS:
            return req
        assert req.bytes_written == req.bytes_to_write
        context = req.file_context
    return req


async def cancel_midway(backend: S3Backend, file_id: str, data: bytes, version: str) -> None:
    """All but the last call of a transfer, then the CANCELED call."""
    context: object = None
    for req in calls(file_id, data, version, CHUNK)[:-1]:
        req.file_context = context
        await backend.write_data(req)
        assert req.result_code is RWResult.SUCCESS
        context = req.file_context
    cancel = WriteData(
        file_id,
        len(data),
        0,
        RWEvent.WHOLE_FILE | RWEvent.CANCELED,
        memoryview(b""),
        0,
        file_context=context,
        version=version,
    )
    await backend.write_data(cancel)
    assert cancel.result_code is RWResult.SUCCESS


def content(source: Any, key: str) -> bytes | None:
    try:
        return source.server.admin.get_object(Bucket=source.bucket, Key=key)["Body"].read()
    except source.server.admin.exceptions.NoSuchKey:
        return None


def incomplete_uploads(source: Any) -> list[str]:
    answer = source.server.admin.list_multipart_uploads(Bucket=source.bucket)
    return [u["Key"] for u in answer.get("Uploads", [])]


def refused(result: ChangeResult) -> tuple[RWResult, int]:
    return result.result_code, result.error


async def names(backend: S3Backend, dir_id: str) -> dict[str, FileKind]:
    return {e.name: e.attrs.kind for e in await backend.list_dir(dir_id)}


@pytest.fixture
def source(s3_server: Any) -> Any:
    s = s3_server.source({"old": b"old bytes"}, part_size=MIN_PART_SIZE)
    try:
        yield s
    finally:
        s.close()


# -- uploads ---------------------------------------------------------------------


async def test_the_backend_is_writable_whole_files_only(source) -> None:
    backend: S3Backend = source.backend
    assert isinstance(backend, WritableBackend)
    caps = backend.write_capabilities
    assert caps == WriteCapability.WHOLE_FILE_ONLY | WriteCapability.RENAME_DIRS
    assert refused(await backend.set_size("old", 3, "")) == (
        RWResult.FILE_FAILURE,
        errno.EOPNOTSUPP,
    )
    assert refused(await backend.make_symlink("l", "old")) == (RWResult.FILE_FAILURE, errno.EPERM)
    before = await backend.stat("old")
    assert (await backend.set_attrs("old", 0o600, 1.0)).result_code is RWResult.SUCCESS
    assert await backend.stat("old") == before  # nothing changed


@pytest.mark.parametrize("data", [SMALL, b""], ids=["several-calls", "empty"])
async def test_a_new_file_is_created_whole(source, data: bytes) -> None:
    req = await upload(source.backend, "d/new", data)
    assert req.result_code is RWResult.SUCCESS
    assert content(source, "d/new") == data
    attrs = await source.backend.stat("d/new")
    assert (attrs.kind, attrs.size, attrs.version) == (FileKind.FILE, len(data), req.new_version)
    assert await names(source.backend, "d") == {"new": FileKind.FILE}


async def test_creating_over_an_existing_object_is_a_conflict(source) -> None:
    req = await upload(source.backend, "old", SMALL)
    assert (req.result_code, req.bytes_written) == (RWResult.FILE_MODIFIED_EXTERNALLY, 0)
    assert content(source, "old") == b"old bytes"


async def test_a_create_that_finds_its_own_bytes_there_succeeds(source) -> None:
    """What a retry meets when the first PUT landed but its answer was lost."""
    source.put("same", SMALL)
    req = await upload(source.backend, "same", SMALL)
    assert req.result_code is RWResult.SUCCESS
    assert req.new_version == (await source.backend.stat("same")).version


async def test_replacing_the_version_read_stores_the_new_bytes(source) -> None:
    version = (await source.backend.stat("old")).version
    req = await upload(source.backend, "old", SMALL, version)
    assert req.result_code is RWResult.SUCCESS
    assert content(source, "old") == SMALL
    now = (await source.backend.stat("old")).version
    assert req.new_version == now != version


async def test_replacing_a_version_that_changed_meanwhile_is_a_conflict(source) -> None:
    version = (await source.backend.stat("old")).version
    source.put("old", b"theirs")
    req = await upload(source.backend, "old", SMALL, version)
    assert req.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert content(source, "old") == b"theirs"
    source.delete("old")
    req = await upload(source.backend, "old", SMALL, version)
    assert req.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert content(source, "old") is None


@pytest.mark.parametrize("chunk", [CHUNK, len(BIG)], ids=["several-calls", "one-call"])
async def test_a_large_file_goes_up_in_parts(source, chunk: int) -> None:
    req = await upload(source.backend, "big", BIG, chunk=chunk)
    assert req.result_code is RWResult.SUCCESS
    assert content(source, "big") == BIG
    assert req.new_version == (await source.backend.stat("big")).version
    assert req.new_version.endswith('-2"')  # the ETag of a two-part upload
    bigger = BIG + b"more"
    req = await upload(source.backend, "big", bigger, req.new_version, chunk=chunk)
    assert req.result_code is RWResult.SUCCESS
    assert content(source, "big") == bigger
    assert req.new_version == (await source.backend.stat("big")).version
    assert incomplete_uploads(source) == []


async def test_a_large_file_is_not_stored_over_a_version_that_changed(source) -> None:
    version = (await source.backend.stat("old")).version
    source.put("old", b"theirs")
    req = await upload(source.backend, "old", BIG, version, chunk=CHUNK)
    assert req.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert content(source, "old") == b"theirs"
    req = await upload(source.backend, "old", BIG, chunk=CHUNK)  # as a new file
    assert req.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert content(source, "old") == b"theirs"
    assert incomplete_uploads(source) == []


@pytest.mark.parametrize("version", ["read", ""], ids=["replace", "create"])
async def test_an_object_written_during_a_large_upload_is_not_overwritten(
    source, version: str
) -> None:
    if version:
        version = (await source.backend.stat("old")).version
    else:
        source.delete("old")
    *first, last = calls("old", BIG, version, CHUNK)
    context: object = None
    for req in first:
        req.file_context = context
        await source.backend.write_data(req)
        assert req.result_code is RWResult.SUCCESS
        context = req.file_context
    assert incomplete_uploads(source) == ["old"]  # parts are on their way
    source.put("old", b"theirs")
    last.file_context = context
    await source.backend.write_data(last)
    assert last.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert content(source, "old") == b"theirs"
    assert incomplete_uploads(source) == []


@pytest.mark.parametrize("data", [BIG, SMALL * 20], ids=["in-parts", "one-put"])
async def test_a_canceled_transfer_leaves_the_old_object(source, data: bytes) -> None:
    version = (await source.backend.stat("old")).version
    await cancel_midway(source.backend, "old", data, version)
    assert content(source, "old") == b"old bytes"
    assert (await source.backend.stat("old")).version == version
    assert incomplete_uploads(source) == []


async def test_a_call_that_does_not_continue_the_transfer_fails(source) -> None:
    first, second = calls("f", SMALL, "", 50000)
    await source.backend.write_data(first)
    second.position += 1  # a gap
    second.file_context = first.file_context
    await source.backend.write_data(second)
    assert (second.result_code, second.bytes_written) == (RWResult.FAILURE, 0)
    assert content(source, "f") is None
    (whole,) = calls("f", SMALL, "", len(SMALL))
    whole.flags &= ~RWEvent.WHOLE_FILE
    await source.backend.write_data(whole)
    assert whole.result_code is RWResult.FILE_FAILURE


@pytest.mark.parametrize("file_id", ["d/.cachefs-dir", ".cachefs-ci/old"])
async def test_names_cachefs_keeps_cannot_be_written(source, file_id: str) -> None:
    req = await upload(source.backend, file_id, SMALL)
    assert req.result_code is RWResult.FILE_FAILURE
    assert content(source, file_id) is None


# -- the namespace ---------------------------------------------------------------


async def test_mkdir_makes_a_directory_that_lists_empty_until_it_is_removed(source) -> None:
    backend = source.backend
    assert (await backend.make_dir("d", 0o755)).attrs.kind is FileKind.DIR
    assert await names(backend, "") == {"d": FileKind.DIR, "old": FileKind.FILE}
    assert await names(backend, "d") == {}
    assert (await backend.stat("d")).kind is FileKind.DIR
    assert await backend.stat("d/.cachefs-dir") is None
    for taken in ("d", "old"):
        assert refused(await backend.make_dir(taken, 0o755)) == (
            RWResult.FILE_FAILURE,
            errno.EEXIST,
        )
    assert (await upload(backend, "d/f", SMALL)).result_code is RWResult.SUCCESS
    assert await names(backend, "d") == {"f": FileKind.FILE}
    assert refused(await backend.remove_dir("d")) == (RWResult.FILE_FAILURE, errno.ENOTEMPTY)
    assert (await backend.remove_file("d/f", "")).result_code is RWResult.SUCCESS
    assert await names(backend, "d") == {}  # the marker keeps it
    assert (await backend.remove_dir("d")).result_code is RWResult.SUCCESS
    assert await backend.stat("d") is None
    assert await names(backend, "") == {"old": FileKind.FILE}
    assert refused(await backend.remove_dir("d")) == (RWResult.FILE_FAILURE, errno.ENOENT)
    assert refused(await backend.remove_dir("old")) == (RWResult.FILE_FAILURE, errno.ENOTDIR)


async def test_a_folder_another_tool_made_is_not_removed(source) -> None:
    source.put("folder/", b"")
    assert refused(await source.backend.remove_dir("folder")) == (
        RWResult.FILE_FAILURE,
        errno.EPERM,
    )
    assert content(source, "folder/") == b""


async def test_a_directory_holding_another_tools_folder_is_not_renamed(source) -> None:
    source.put("d/f", b"f")
    source.put("d/sub/", b"")
    result = await source.backend.rename("d", "e", True)
    assert refused(result) == (RWResult.FILE_FAILURE, errno.EPERM)
    assert (content(source, "d/f"), content(source, "e/f")) == (b"f", None)


async def test_remove_file_checks_the_version(source) -> None:
    backend = source.backend
    version = (await backend.stat("old")).version
    source.put("old", b"theirs")
    result = await backend.remove_file("old", version)
    assert result.result_code is RWResult.FILE_MODIFIED_EXTERNALLY
    assert content(source, "old") == b"theirs"
    now = (await backend.stat("old")).version
    assert (await backend.remove_file("old", now)).result_code is RWResult.SUCCESS
    assert content(source, "old") is None
    assert refused(await backend.remove_file("old", "")) == (RWResult.FILE_FAILURE, errno.ENOENT)
    source.put("d/f", b"f")
    assert refused(await backend.remove_file("d", "")) == (RWResult.FILE_FAILURE, errno.EISDIR)


async def test_rename_of_a_file_copies_then_deletes(source) -> None:
    backend = source.backend
    source.put("other", b"other bytes")
    result = await backend.rename("old", "other", False)
    assert refused(result) == (RWResult.FILE_FAILURE, errno.EEXIST)
    assert (content(source, "old"), content(source, "other")) == (b"old bytes", b"other bytes")
    assert (await backend.rename("old", "d/new", False)).result_code is RWResult.SUCCESS
    assert (content(source, "old"), content(source, "d/new")) == (None, b"old bytes")
    assert (await backend.rename("d/new", "other", True)).result_code is RWResult.SUCCESS
    assert (content(source, "d/new"), content(source, "other")) == (None, b"old bytes")
    assert refused(await backend.rename("nope", "x", True)) == (RWResult.FILE_FAILURE, errno.ENOENT)


async def test_rename_of_a_directory_moves_every_key(source) -> None:
    backend = source.backend
    for key, data in {"d/x": b"x", "d/sub/y": b"y", "e/z": b"z"}.items():
        source.put(key, data)
    assert (await backend.make_dir("d/empty", 0o755)).result_code is RWResult.SUCCESS
    result = await backend.rename("d", "e", True)
    assert refused(result) == (RWResult.FILE_FAILURE, errno.ENOTEMPTY)
    result = await backend.rename("d", "old", True)
    assert refused(result) == (RWResult.FILE_FAILURE, errno.ENOTDIR)
    assert (await backend.rename("d", "n/m", False)).result_code is RWResult.SUCCESS
    assert await backend.stat("d") is None
    assert await names(backend, "n/m") == {
        "empty": FileKind.DIR,
        "sub": FileKind.DIR,
        "x": FileKind.FILE,
    }
    assert await names(backend, "n/m/empty") == {}
    assert (content(source, "n/m/x"), content(source, "n/m/sub/y")) == (b"x", b"y")


def test_conditional_write_races_and_lost_uploads_are_retried() -> None:
    conflict = AlreadyExistsError(
        "PUT: Server returned non-2xx status code: 409 Conflict:"
        " <Error><Code>ConditionalRequestConflict</Code></Error>"
    )
    lost = GenericError(
        "Error performing POST http://h/b/k?uploadId=1 in 3ms - Server returned non-2xx"
        " status code: 404 Not Found: <Error><Code>NoSuchUpload</Code></Error>"
    )
    exists = AlreadyExistsError(
        "Error performing PUT http://h/b/k in 3ms - Server returned non-2xx status code:"
        " 412 Precondition Failed: <Error><Code>PreconditionFailed</Code></Error>"
    )
    assert result_for(conflict)[0] is RWResult.FAILURE
    assert result_for(lost)[0] is RWResult.FAILURE
    assert result_for(exists)[0] is RWResult.FILE_MODIFIED_EXTERNALLY
