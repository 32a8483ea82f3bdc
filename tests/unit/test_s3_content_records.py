"""Content information in an S3 source: found by listing a directory's records.

A file without a record must cost S3 no request of its own (a cache hit
asks content information once per file and mount); a record published by
anyone must still be found once the listing that missed it is older than
backends.s3ci.FRESH, and this process's own changes at once.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
import trio.testing

from backends import s3ci
from cachefs.contract import ContentInfo

pytest_plugins = ["s3server"]

BS = 4096


def info_of(data: bytes, version: str) -> ContentInfo:
    return ContentInfo.of_bytes(data, version, BS)


def counts(backend: Any) -> tuple[int, int]:
    stats = backend.statistics()
    return stats["record_lists"], stats["record_gets"]


async def test_files_without_records_cost_one_listing_for_all_readers(s3_server: Any) -> None:
    files = {f"d/f{i:03d}": b"x" for i in range(40)}
    bucket = s3_server.new_bucket(files)
    backend = s3_server.open(bucket)
    try:
        answers: dict[str, ContentInfo | None] = {}

        async def ask(file_id: str) -> None:
            answers[file_id] = await backend.content_info(file_id)

        async with trio.open_nursery() as nursery:  # 8 readers at once, as `xargs -P 8`
            for file_id in files:
                nursery.start_soon(ask, file_id)
        assert answers == dict.fromkeys(files)
        assert counts(backend) == (1, 0)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("window", [3, 1000])
async def test_every_file_gets_its_own_record_in_any_order(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Records of a subdirectory sort between the directory's own names
    (``a/x`` after ``a.bin``, before ``a0``), and with a small window each
    listing covers only part of the directory."""
    monkeypatch.setattr(s3ci, "WINDOW", window)
    names = ["a.bin", "a", "a0", "b", "c.d", "é", "zz", "z"]
    files = {f"top/{n}": n.encode() for n in names} | {"top/a/x": b"x", "top/a/y": b"y"}
    bucket = s3_server.new_bucket(files)
    published = {"top/a.bin", "top/a0", "top/é", "top/z", "top/a/x"}
    for file_id in published:
        key = f".cachefs-ci/{file_id}"
        s3_server.put(bucket, key, info_of(files[file_id], file_id).to_bytes())
    backend = s3_server.open(bucket)
    try:
        order = sorted(files)
        random.Random(window).shuffle(order)
        for file_id in order:
            expected = info_of(files[file_id], file_id) if file_id in published else None
            assert await backend.content_info(file_id) == expected, file_id
        assert counts(backend)[1] == len(published)  # a GET for each record, none for the rest
    finally:
        await backend.aclose()


async def test_a_record_published_elsewhere_is_found_once_the_listing_is_stale(
    s3_server: Any, mock_clock: trio.testing.MockClock
) -> None:
    bucket = s3_server.new_bucket({"f": b"one", "g": b"two"})
    backend = s3_server.open(bucket)
    try:
        assert await backend.content_info("f") is None
        # The object changes and `cachefs publish` runs on another machine.
        version = s3_server.put(bucket, "f", b"ONE")
        s3_server.put(bucket, ".cachefs-ci/f", info_of(b"ONE", version).to_bytes())
        mock_clock.jump(s3ci.FRESH)
        assert await backend.content_info("f") == info_of(b"ONE", version)
        # ... and then removes it (the GET finds out at once, the listing later).
        s3_server.delete(bucket, ".cachefs-ci/f")
        assert await backend.content_info("f") is None
        mock_clock.jump(s3ci.FRESH)
        assert await backend.content_info("f") is None
    finally:
        await backend.aclose()


async def test_this_process_sees_its_own_records_at_once(
    s3_server: Any, mock_clock: trio.testing.MockClock
) -> None:
    bucket = s3_server.new_bucket({"d/f": b"one", "d/g": b"two"})
    backend = s3_server.open(bucket)
    try:
        assert await backend.content_info("d/f") is None
        await backend.put_content_info("d/f", info_of(b"one", "v1"))
        assert await backend.content_info("d/f") == info_of(b"one", "v1")
        await backend.delete_content_info("d/f")
        assert await backend.content_info("d/f") is None
        assert counts(backend)[0] == 1  # no new listing was needed
    finally:
        await backend.aclose()


async def test_a_record_stored_while_its_directory_is_listed_is_not_lost(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listing that began before this process stored a record is not kept."""
    bucket = s3_server.new_bucket({"f": b"one", "g": b"two"})
    backend = s3_server.open(bucket)
    listed = trio.Event()
    go_on = trio.Event()
    real = backend._list_records

    async def slow_listing(dir_id: str, after: str) -> s3ci.Window:
        window = await real(dir_id, after)
        listed.set()
        await go_on.wait()
        return window

    monkeypatch.setattr(backend._records, "_list", slow_listing)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.content_info, "g")
            await listed.wait()
            await backend.put_content_info("f", info_of(b"one", "v1"))
            go_on.set()
        assert await backend.content_info("f") == info_of(b"one", "v1")
    finally:
        await backend.aclose()


async def test_a_failed_listing_is_not_tried_again_by_every_waiter() -> None:
    """S3 refusing the listing (a timeout, no ListBucket): the readers asking
    at once all go on to their GET, with one listing tried, not one each."""
    tried: list[str] = []

    async def refuse(dir_id: str, after: str) -> Any:
        tried.append(dir_id)
        await trio.sleep(0.01)
        raise OSError("listing refused")

    records = s3ci.Records(refuse, fresh=60)
    answers: list[bool] = []

    async def ask(n: int) -> None:
        answers.append(await records.may_have(f"d/f{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(ask, n)
    assert answers == [True] * 40
    assert tried == ["d"]
