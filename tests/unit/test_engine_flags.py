"""Flag rules, as the backend sees them (docs/contract.md: "Flags")."""

from __future__ import annotations

import os

import trio
import trio.testing
from enginerig import BS, Rig, read_at, read_sequential

DATA = os.urandom(10 * BS + 7)


def flags(call: dict) -> set[str]:
    return set(call["flags"])


async def test_sequential_read_is_one_continuous_transfer(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f", 3 * BS) == DATA
    calls = rig.calls()
    assert [c["position"] for c in calls] == [0, 3 * BS, 6 * BS, 9 * BS]
    assert flags(calls[0]) == {"CONTINUOUS_STARTED", "TIL_END"}
    assert flags(calls[1]) == flags(calls[2]) == {"IN_PROGRESS", "TIL_END"}
    assert flags(calls[3]) == {"IN_PROGRESS", "CONTINUOUS_FINISHED", "TIL_END"}


async def test_restart_at_zero_of_a_file_that_had_a_continuous_transfer(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        fh = await cache.open("f")
        await cache.read(fh, 0, BS)
        await cache.read(fh, BS, BS)
        await cache.close(fh)
        rig.calls()
        assert await read_sequential(cache, "f", 4 * BS) == DATA
    calls = rig.calls()
    assert calls[0]["position"] == 2 * BS
    assert flags(calls[0]) == {"CONTINUOUS_RESTARTED", "TIL_END"}
    assert "CONTINUOUS_FINISHED" in flags(calls[-1])


async def test_random_read_in_the_middle_is_one_call_started_and_finished(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 3 * BS + 5, 2 * BS) == DATA[3 * BS + 5 : 5 * BS + 5]
    (call,) = rig.calls()
    assert (call["position"], call["bytes_to_read"]) == (3 * BS, 3 * BS)
    assert flags(call) == {"RANDOM_STARTED", "RANDOM_FINISHED", "BEFORE_END"}


async def test_random_read_that_reaches_the_end_is_til_end(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 9 * BS, 2 * BS) == DATA[9 * BS :]
    (call,) = rig.calls()
    assert flags(call) == {"RANDOM_STARTED", "RANDOM_FINISHED", "TIL_END"}


async def test_random_read_around_a_cached_block_takes_two_calls(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        await read_at(cache, "f", 4 * BS, 1)
        rig.calls()
        assert await read_at(cache, "f", 3 * BS, 3 * BS) == DATA[3 * BS : 6 * BS]
    first, second = rig.calls()
    assert (first["position"], first["bytes_to_read"]) == (3 * BS, BS)
    assert flags(first) == {"RANDOM_STARTED", "BEFORE_END"}
    assert (second["position"], second["bytes_to_read"]) == (5 * BS, BS)
    assert flags(second) == {"IN_PROGRESS", "RANDOM_FINISHED", "BEFORE_END"}


async def test_prefetch_is_a_whole_file_transfer(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(max_fetch=4 * BS) as cache:
        await cache.prefetch("f")
        assert await read_sequential(cache, "f") == DATA
    # Chunks run in parallel: one call starts the transfer, the one that
    # fetches the last block finishes it.
    calls = sorted(rig.calls(), key=lambda c: c["position"])
    assert [c["position"] for c in calls] == [0, 4 * BS, 8 * BS]
    assert all({"WHOLE_FILE", "TIL_END"} <= flags(c) for c in calls)
    assert sum("CONTINUOUS_STARTED" in flags(c) for c in calls) == 1
    assert sum("IN_PROGRESS" in flags(c) for c in calls) == 2
    assert [c["position"] for c in calls if "CONTINUOUS_FINISHED" in flags(c)] == [8 * BS]


async def test_closing_a_reader_mid_transfer_sends_canceled(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        fh = await cache.open("f")
        await cache.read(fh, 0, BS)
        await cache.read(fh, BS, BS)
        await cache.close(fh)
    calls = rig.calls()
    assert len(calls) == 3
    cancel = calls[-1]
    assert cancel["flags"] == ["CANCELED"]
    assert (cancel["bytes_to_read"], cancel["position"]) == (0, 2 * BS)


async def test_seeking_away_cancels_the_continuous_transfer_first(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        fh = await cache.open("f")
        await cache.read(fh, 0, BS)
        assert await cache.read(fh, 7 * BS, 10) == DATA[7 * BS : 7 * BS + 10]
        await cache.close(fh)
    started, cancel, random = rig.calls()
    assert "CONTINUOUS_STARTED" in flags(started)
    assert flags(cancel) == {"CANCELED"}
    assert "RANDOM_STARTED" in flags(random)


async def test_a_transfer_that_finished_is_not_canceled(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert all("CANCELED" not in c["flags"] for c in rig.calls())


async def test_two_readers_missing_the_same_block_cause_one_call(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    gate = trio.Event()
    inner_read = rig.memory.read_data

    async def slow_read(req):
        await gate.wait()
        await inner_read(req)

    rig.memory.read_data = slow_read
    results = []
    async with rig.engine() as cache:

        async def reader():
            results.append(await read_at(cache, "f", BS + 1, 100))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert results == [DATA[BS + 1 : BS + 101]] * 4
    assert len(rig.calls()) == 1
