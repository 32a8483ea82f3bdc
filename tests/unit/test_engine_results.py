"""Result codes, as the cache reacts (docs/contract.md: "Result codes")."""

from __future__ import annotations

import logging
import os

import pytest
import trio
from enginerig import BS, Rig, read_at, read_sequential

from cachefs import (
    FileQuarantined,
    NotFound,
    StorageQuarantined,
    TransientFailure,
    VersionGone,
)

DATA = os.urandom(8 * BS + 123)
OTHER = os.urandom(3 * BS)


async def test_success_caches_what_arrived(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", BS, BS) == DATA[BS : 2 * BS]
        assert len(rig.calls()) == 1
        assert await read_at(cache, "f", BS + 10, 100) == DATA[BS + 10 : BS + 110]
        assert rig.calls() == []
        stats = cache.statistics()
    assert stats["cached_bytes"] == BS
    assert stats["hit_bytes"] == 100


async def test_partial_asks_for_the_rest_from_where_it_stopped(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "result": "PARTIAL", "max_bytes": 1000, "count": 2}])
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, 2 * BS) == DATA[: 2 * BS]
    calls = rig.reads()
    assert [(c["position"], c["result"], c["bytes_read"]) for c in calls] == [
        (0, "PARTIAL", 1000),
        (1000, "PARTIAL", 1000),
        (2000, "SUCCESS", 2 * BS - 2000),
    ]


async def test_three_empty_partials_count_as_a_failure(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "result": "PARTIAL"}])
    async with rig.engine(retries=0) as cache:
        with pytest.raises(TransientFailure):
            await read_at(cache, "f", 0, 10)
    assert [c["result"] for c in rig.reads()] == ["PARTIAL"] * 3


async def test_range_beyond_eof_zeroes_the_tail_and_never_asks_past_it(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    eof = 3 * BS + 100
    rig.faults([{"file": "f", "result": "SUCCESS", "eof": eof}])
    async with rig.engine() as cache:
        got = await read_sequential(cache, "f")
        assert got == DATA[:eof] + bytes(len(DATA) - eof)
        positions = [c["position"] for c in rig.calls()]
        assert max(positions) <= eof
        assert await read_at(cache, "f", 6 * BS, 10) == bytes(10)
        assert rig.calls() == []


@pytest.mark.parametrize("forget", ["purge", "reset_file_errors"])
async def test_what_an_early_end_of_file_taught_is_forgotten(tmp_path, forget):
    rig = Rig(tmp_path, {"f": DATA})
    eof = 3 * BS + 100
    rig.faults([{"file": "f", "eof": eof}])
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA[:eof] + bytes(len(DATA) - eof)
        assert cache.short_files() == ["f"]
        rig.faults([])  # the source ends where its size says again
        assert await read_sequential(cache, "f") == DATA[:eof] + bytes(len(DATA) - eof)
        if forget == "purge":
            await cache.purge("f")
        else:
            assert await cache.reset_file_errors(["f"]) == ["f"]
        assert cache.short_files() == []
        rig.calls()
        assert await read_sequential(cache, "f") == DATA
        asked = [c["position"] for c in rig.reads()]
        # A reset keeps what was fetched before the early end; a purge keeps nothing.
        assert min(asked) == (0 if forget == "purge" else 3 * BS)


async def test_an_early_end_of_file_is_remembered_across_remounts_until_reset(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    eof = 3 * BS + 100
    rig.faults([{"file": "f", "eof": eof}])
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA[:eof] + bytes(len(DATA) - eof)
    rig.faults([])
    async with rig.engine() as cache:  # a property of this version, kept with it
        assert await read_sequential(cache, "f") == DATA[:eof] + bytes(len(DATA) - eof)
        assert await cache.reset_file_errors() == ["f"]
        assert await read_sequential(cache, "f") == DATA


async def test_file_modified_externally_fails_the_old_version_and_new_opens_get_the_new(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(ttl=3600) as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        new = os.urandom(2 * BS + 1)
        rig.memory.put("f", new)
        # Within the TTL the cached version is trusted: an open reads it ...
        fh = await cache.open("f")
        assert await cache.read(fh, 0, 10) == DATA[:10]
        # ... until a miss reaches the backend, which no longer has it: the
        # handle fails rather than read the new version's bytes.
        with pytest.raises(VersionGone):
            await cache.read(fh, 5 * BS, 10)
        assert await cache.read(fh, 0, 10) == DATA[:10]  # what it had cached still reads
        with pytest.raises(VersionGone):
            await cache.read(fh, 2 * BS, 10)
        await cache.close(fh)
        # The next open stats the file again.
        assert await read_sequential(cache, "f") == new
        assert cache.statistics()["version_gone_reads"] == 2
    results = [c["result"] for c in rig.reads()]
    assert results.count("FILE_MODIFIED_EXTERNALLY") == 1


async def test_file_modified_externally_from_the_backend_drops_the_cached_version(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        rig.faults([{"file": "f", "result": "FILE_MODIFIED_EXTERNALLY", "count": 1}])
        rig.calls()
        with pytest.raises(VersionGone):
            await read_at(cache, "f", 2 * BS, BS)
        # The backend said the cached bytes are no longer the file's: the next
        # open stats it again and fetches what it reads.
        assert await read_at(cache, "f", 2 * BS, BS) == DATA[2 * BS : 3 * BS]
        assert cache.statistics()["cached_bytes"] == BS  # block 0 was dropped
    assert [c["result"] for c in rig.reads()] == ["FILE_MODIFIED_EXTERNALLY", "SUCCESS"]


async def test_file_modified_locally_replans_without_failing_the_reader(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "result": "FILE_MODIFIED_LOCALLY", "count": 1}])
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
    assert [c["result"] for c in rig.reads()] == ["FILE_MODIFIED_LOCALLY", "SUCCESS"]


async def test_failure_is_retried_then_succeeds(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "result": "FAILURE", "count": 3}])
    async with rig.engine(retries=3) as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
    assert [c["result"] for c in rig.reads()] == ["FAILURE"] * 3 + ["SUCCESS"]


async def test_failure_after_retries_fails_this_read_only(tmp_path):
    rig = Rig(tmp_path, {"f": DATA, "g": OTHER})
    rig.faults([{"file": "f", "result": "FAILURE"}])
    async with rig.engine(retries=2) as cache:
        with pytest.raises(TransientFailure):
            await read_at(cache, "f", 0, BS)
        assert [c["result"] for c in rig.reads()] == ["FAILURE"] * 3
        assert await read_sequential(cache, "g") == OTHER
        rig.faults([])
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]


async def test_backoff_between_retries_is_exponential_and_bounded(tmp_path, autojump_clock):
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "result": "FAILURE"}])
    async with rig.engine(retries=4, retry_delay=1.0, retry_max_delay=3.0) as cache:
        start = trio.current_time()
        with pytest.raises(TransientFailure):
            await read_at(cache, "f", 0, BS)
        assert trio.current_time() - start == pytest.approx(1 + 2 + 3 + 3)


async def test_file_failure_quarantines_the_file_until_reset(tmp_path):
    rig = Rig(tmp_path, {"f": DATA, "g": OTHER})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        rig.faults([{"file": "f", "result": "FILE_FAILURE"}])
        with pytest.raises(FileQuarantined):
            await read_at(cache, "f", 4 * BS, 10)
        rig.faults([])
        rig.calls()
        with pytest.raises(FileQuarantined):
            await read_at(cache, "f", 4 * BS, 10)
        assert rig.calls() == []  # failed at once, without asking the backend
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]  # cached parts stay readable
        assert await read_sequential(cache, "g") == OTHER
        assert cache.statistics()["files_in_error"] == 1
        assert await cache.reset_file_errors(["f"]) == ["f"]
        assert await read_at(cache, "f", 4 * BS, 10) == DATA[4 * BS : 4 * BS + 10]


async def test_permanent_failure_quarantines_the_storage_until_reset(tmp_path):
    rig = Rig(tmp_path, {"f": DATA, "g": OTHER})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        rig.faults([{"file": "g", "result": "PERMANENT_FAILURE"}])
        with pytest.raises(StorageQuarantined):
            await read_at(cache, "g", 0, 10)
        rig.faults([])
        rig.calls()
        with pytest.raises(StorageQuarantined):
            await read_at(cache, "f", 4 * BS, 10)
        assert rig.calls() == []
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]  # offline mode
        assert cache.statistics()["external_error"]
        await cache.reset_external_error()
        assert await read_at(cache, "g", 0, 10) == OTHER[:10]
        assert cache.statistics()["external_error"] is None


async def test_latches_survive_a_remount(tmp_path):
    rig = Rig(tmp_path, {"f": DATA, "g": OTHER})
    rig.faults([{"file": "f", "result": "FILE_FAILURE", "count": 1}])
    async with rig.engine() as cache:
        with pytest.raises(FileQuarantined):
            await read_at(cache, "f", 0, 10)
    async with rig.engine() as cache:
        assert cache.file_errors() == ["f"]
        with pytest.raises(FileQuarantined):
            await read_at(cache, "f", 0, 10)
        rig.faults([{"file": "g", "result": "PERMANENT_FAILURE", "count": 1}])
        with pytest.raises(StorageQuarantined):
            await read_at(cache, "g", 0, 10)
    async with rig.engine() as cache:
        stats = cache.statistics()
        assert stats["files_in_error"] == 1
        assert "PERMANENT_FAILURE" in stats["external_error"]


async def test_a_backend_that_raises_counts_as_failure_and_is_logged(tmp_path, caplog):
    rig = Rig(tmp_path, {"f": DATA})
    calls = 0
    inner_read = rig.memory.read_data

    async def broken(req):
        nonlocal calls
        calls += req.bytes_to_read > 0
        if calls == 1:
            raise RuntimeError("backend bug")
        await inner_read(req)

    rig.memory.read_data = broken
    with caplog.at_level(logging.ERROR, logger="cachefs"):
        async with rig.engine() as cache:
            assert await read_at(cache, "f", 0, 10) == DATA[:10]
    assert calls == 2
    assert any("RuntimeError: backend bug" in (r.exc_text or "") for r in caplog.records)


async def test_bytes_read_beyond_the_request_is_a_failure_and_nothing_is_cached(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})

    async def liar(req):
        req.buffer[:] = b"\xff" * req.bytes_to_read
        req.bytes_read = req.bytes_to_read + 1

    rig.memory.read_data = liar
    async with rig.engine(retries=1) as cache:
        with pytest.raises(TransientFailure):
            await read_at(cache, "f", 0, 10)
        assert cache.statistics()["cached_bytes"] == 0


async def test_a_file_deleted_while_open_fails_its_handle_and_is_not_found_after(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        fh = await cache.open("f")
        rig.memory.delete("f")
        with pytest.raises(VersionGone):
            await cache.read(fh, 0, 10)
        await cache.close(fh)
        with pytest.raises(NotFound):
            await cache.open("f")


async def test_ttl_bounds_how_long_a_version_is_trusted(tmp_path, mock_clock):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(ttl=60) as cache:
        assert (await cache.getattr("f")).size == len(DATA)
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        rig.memory.put("f", b"new content")
        mock_clock.jump(30)
        assert (await cache.getattr("f")).size == len(DATA)
        mock_clock.jump(31)
        assert (await cache.getattr("f")).size == len(b"new content")
        assert await read_at(cache, "f", 0, 100) == b"new content"
        assert cache.statistics()["cached_bytes"] == len(b"new content")


async def test_listings_stay_available_while_the_storage_is_quarantined(tmp_path):
    rig = Rig(tmp_path, {"d/f": DATA, "d/g": OTHER})
    async with rig.engine() as cache:
        assert sorted(e.name for e in await cache.list_dir("d")) == ["f", "g"]
        assert await read_at(cache, "d/f", 0, 10) == DATA[:10]
        rig.faults([{"file": "d/g", "result": "PERMANENT_FAILURE"}])
        with pytest.raises(StorageQuarantined):
            await read_at(cache, "d/g", 0, 10)
        assert sorted(e.name for e in await cache.list_dir("d")) == ["f", "g"]
        assert cache.statistics()["stale_served"] == 1
        with pytest.raises(StorageQuarantined):
            await cache.list_dir("")  # never listed: nothing to serve
