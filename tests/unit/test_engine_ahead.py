"""Files fetched ahead of a reader (FileCache.fetch_ahead, engine/miss/ahead.py).

What the backend is asked, what a reader then reads, and that a failure or
a change in the source while a file is fetched ahead costs the reader
nothing but the time it would have spent anyway.
"""

from __future__ import annotations

import os

import trio
from enginerig import BS, Rig, read_sequential

from cachefs.engine.miss.ahead import MAX_QUEUED


async def settled(cache, fetched: int) -> None:
    """Until *fetched* files were fetched ahead and nothing is on its way."""
    with trio.fail_after(20):
        while cache.statistics()["fetched_ahead"] < fetched or cache._ahead._queued:  # noqa: SLF001
            await trio.sleep(0.01)


async def test_files_fetched_ahead_are_read_without_a_call(tmp_path):
    files = {f"d/f{i}": os.urandom(3 * BS + i) for i in range(6)}
    rig = Rig(tmp_path, files)
    async with rig.engine() as cache:
        cache.fetch_ahead(files)
        await settled(cache, len(files))
        calls = rig.calls()
        assert sorted(c["file_id"] for c in calls) == sorted(files)  # one whole call each
        assert all("WHOLE_FILE" in c["flags"] for c in calls)
        for name, data in files.items():
            assert await read_sequential(cache, name) == data
        assert rig.calls() == []
        cache.fetch_ahead(files)  # held whole already: not fetched again
        await settled(cache, len(files))
        assert rig.calls() == []


async def test_a_file_that_fails_ahead_is_read_by_its_reader(tmp_path):
    files = {"a": os.urandom(BS), "b": os.urandom(BS), "c": os.urandom(BS)}
    rig = Rig(tmp_path, files)
    rig.faults([{"file": "b", "result": "FAILURE", "count": 1}])
    async with rig.engine(retries=0) as cache:
        cache.fetch_ahead(["a", "b", "c", "gone"])  # "gone" is not in the source
        await settled(cache, 2)
        assert cache.statistics()["fetched_ahead"] == 2
        for name, data in files.items():  # b's reader fetches it itself
            assert await read_sequential(cache, name) == data


async def test_a_file_changed_after_it_was_fetched_ahead_is_read_as_it_is_now(tmp_path):
    old, new = os.urandom(2 * BS), os.urandom(3 * BS + 7)
    rig = Rig(tmp_path, {"f": old})
    async with rig.engine(ttl=0) as cache:
        cache.fetch_ahead(["f"])
        await settled(cache, 1)
        rig.source.put("f", new)
        assert await read_sequential(cache, "f") == new


async def test_fetching_ahead_is_bounded(tmp_path):
    files = {f"f{i}": os.urandom(100) for i in range(MAX_QUEUED * 3)}
    rig = Rig(tmp_path, files)
    rig.faults([{"file": "*", "hang": True}])  # nothing finishes while we look
    async with rig.engine() as cache:
        cache.fetch_ahead(files)
        assert len(cache._ahead._queued) == MAX_QUEUED  # noqa: SLF001
        rig.faults([])
        cache.fetch_ahead(files)  # a full queue takes nothing more, even now the source answers
        assert len(cache._ahead._queued) == MAX_QUEUED  # noqa: SLF001
