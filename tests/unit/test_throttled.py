"""The throttled wrapper: same bytes and answers, latency and bandwidth on trio's clock."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from backends.memory import MemoryBackend
from backends.throttled import MiB, ThrottledBackend, parse_throttle, throttle
from backends.trace import TraceBackend, read_trace
from cachefs.contract import Backend, FileKind, ReadData, RWEvent, RWResult
from cachefs.errors import ConfigError

DATA = bytes(range(256)) * (8 * 4096) + b"tail"  # 8 MiB + 4 bytes

LATENCY = 0.030
BANDWIDTH = 90 * MiB


def request(position: int, count: int, flags: RWEvent = RWEvent.RANDOM_STARTED) -> ReadData:
    return ReadData(
        file_id="dir/big.bin",
        size=len(DATA),
        position=position,
        flags=flags | RWEvent.BEFORE_END,
        buffer=memoryview(bytearray(count)),
        bytes_to_read=count,
    )


@pytest.fixture
def throttled() -> ThrottledBackend:
    return ThrottledBackend(MemoryBackend({"dir/big.bin": DATA}))


async def timed_read(backend: Backend, req: ReadData) -> float:
    start = trio.current_time()
    await backend.read_data(req)
    return trio.current_time() - start


async def test_bytes_and_results_are_the_wrapped_backends(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    plain = MemoryBackend({"dir/big.bin": DATA})
    for position, count in [(0, 4096), (12345, MiB), (len(DATA) - 100, 4096)]:
        slow, fast = request(position, count), request(position, count)
        await throttled.read_data(slow)
        await plain.read_data(fast)
        assert (slow.bytes_read, slow.result_code) == (fast.bytes_read, fast.result_code)
        assert bytes(slow.buffer[: slow.bytes_read]) == DATA[position : position + count]
    assert slow.result_code == RWResult.RANGE_BEYOND_EOF
    assert (await throttled.stat("dir/big.bin")).size == len(DATA)
    assert [e.name for e in await throttled.list_dir("dir")] == ["big.bin"]
    assert (await throttled.stat("dir")).kind is FileKind.DIR


async def test_a_read_takes_latency_plus_size_over_bandwidth(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    assert await timed_read(throttled, request(0, MiB)) == pytest.approx(LATENCY + 1 / 90)
    assert await timed_read(throttled, request(0, 4096)) == pytest.approx(
        LATENCY + 4096 / BANDWIDTH
    )


async def test_pacing_counts_the_bytes_read_not_the_bytes_asked(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    tail = request(len(DATA) - 4, MiB)
    assert await timed_read(throttled, tail) == pytest.approx(LATENCY + 4 / BANDWIDTH)
    assert tail.bytes_read == 4


async def test_a_single_stream_pays_latency_on_every_call(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    for i in range(8):
        await throttled.read_data(request(i * MiB, MiB, RWEvent.IN_PROGRESS))
    assert trio.current_time() - start == pytest.approx(8 * (LATENCY + 1 / 90))
    assert throttled.statistics()["bytes"] == 8 * MiB
    assert throttled.statistics()["peak_connections"] == 1


async def test_concurrent_reads_are_separate_connections(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(throttled.read_data, request(i * MiB, MiB))
    assert trio.current_time() - start == pytest.approx(LATENCY + 1 / 90)
    assert throttled.statistics()["peak_connections"] == 8
    assert throttled.statistics()["read_seconds"] == pytest.approx(8 * (LATENCY + 1 / 90))


async def test_max_connections_queues_the_rest(autojump_clock: trio.testing.MockClock) -> None:
    backend = ThrottledBackend(MemoryBackend({"dir/big.bin": DATA}), max_connections=2)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(backend.read_data, request(i * MiB, MiB))
    assert trio.current_time() - start == pytest.approx(4 * (LATENCY + 1 / 90))
    assert backend.statistics()["peak_connections"] == 2


async def test_metadata_requests_pay_latency_and_open_close_do_not(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    context = await throttled.open_file("dir/big.bin")
    await throttled.close_file("dir/big.bin", context)
    assert trio.current_time() == start
    await throttled.stat("dir/big.bin")
    await throttled.list_dir("dir")
    assert trio.current_time() - start == pytest.approx(2 * LATENCY)


async def test_canceled_notifications_pass_at_once(
    throttled: ThrottledBackend, autojump_clock: trio.testing.MockClock
) -> None:
    req = request(0, 0, RWEvent.CANCELED | RWEvent.CONTINUOUS_STARTED)
    assert await timed_read(throttled, req) == 0
    assert throttled.statistics()["requests"] == 0


async def test_it_stacks_under_trace(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    backend = TraceBackend(throttle(MemoryBackend({"dir/big.bin": DATA}), "5,1"), tmp_path / "t")
    assert isinstance(backend.inner, Backend)
    assert await timed_read(backend, request(0, MiB)) == pytest.approx(0.005 + 1.0)
    assert read_trace(tmp_path / "t")[0]["bytes_read"] == MiB
    await backend.aclose()


def test_parse_throttle() -> None:
    assert parse_throttle("30,90") == (0.030, 90 * MiB)
    assert parse_throttle("0,0.5") == (0.0, MiB / 2)
    for bad in ["30", "30,90,1", "a,90", "30,0", "-1,90", ""]:
        with pytest.raises(ConfigError, match="throttle"):
            parse_throttle(bad)
    with pytest.raises(ConfigError):
        ThrottledBackend(MemoryBackend(), max_connections=0)
