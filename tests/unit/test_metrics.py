"""The metrics of a mount: ReadData calls counted by result code and timed,
what a scrape shows (Prometheus text that prometheus_client parses back,
every ``cachefs stats`` counter under its name), and the HTTP server that
serves it (404, 405, oversized heads, clients that say nothing, addresses it
cannot listen on)."""

from __future__ import annotations

import os
import socket
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from enginerig import BS, Rig, read_at
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cachefs import FileQuarantined
from cachefs.contract import ReadData
from cachefs.daemon import metrics
from cachefs.daemon.commands import ControlCommands
from cachefs.daemon.metrics import MetricsServer, exposition
from cachefs.errors import ConfigError
from cachefs.fs.inodes import Namespace
from cachefs.latency import Latencies

DATA = os.urandom(4 * BS)

#: Keys of ``cachefs stats`` that are not metrics: settings, names, lists
#: (exported as counts where they count something), and what Prometheus
#: computes itself (hit_ratio; read_data_calls: the sum over codes).
NOT_METRICS = {
    "read_data_calls",
    "hit_ratio",
    "block_size",
    "verify",
    "encrypted",
    "disk_reads",
    "ttl",
    "cache_dir",
    "write_back_delay",
    "max_readahead",
    "max_fetches",
    "source",
    "mountpoint",
    "pid",
    "read_only_reason",
    "file_errors",
    "short_files",
    "latched_writes",
    # the labelled families
    "read_data_results",
    "read_data_seconds",
    "corrupt_from_backend",
    "corrupt_in_cache",
    "add_data_accepted",
    "add_data_rejected",
    "group",
}


class Raising:
    """The memory backend of *rig*, raising on every ReadData of "bad"."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def read_data(self, req: ReadData) -> None:
        if req.file_id == "bad":
            raise RuntimeError("the backend's own bug")
        await self._inner.read_data(req)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Slow(Raising):
    """Every ReadData takes at least DELAY seconds."""

    DELAY = 0.06

    async def read_data(self, req: ReadData) -> None:
        await trio.sleep(self.DELAY)
        await self._inner.read_data(req)


def commands_of(cache: Any) -> ControlCommands:
    return ControlCommands(
        cache,
        Namespace(cache),
        source="memory://",
        mountpoint=Path("/mnt"),
        stop=lambda: None,
        invalidate=lambda file_id: None,
    )


def scrape(text: str) -> dict[str, Any]:
    """The families of an exposition by name (counters without ``_total``)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    samples: list[Sample] = families[name].samples
    (found,) = [s.value for s in samples if s.labels == labels]
    return found


# -- ReadData, as the engine counts it ----------------------------------------------


async def test_read_data_calls_are_counted_by_result_code(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"f": DATA, "latched": DATA, "bad": DATA})
    rig.backend = Raising(rig.backend)  # type: ignore[assignment]
    rig.faults(
        [
            {"file": "f", "result": "PARTIAL", "max_bytes": 1000, "count": 2},
            {"file": "latched", "result": "FILE_FAILURE"},
        ]
    )
    async with rig.engine(retries=0) as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        with pytest.raises(FileQuarantined):
            await read_at(cache, "latched", 0, 10)
        with pytest.raises(Exception, match="FAILURE|failed"):
            await read_at(cache, "bad", 0, 10)
        stats = cache.statistics()
    results = {code: n for code, n in stats["read_data_results"].items() if n}
    traced = Counter(c["result"] for c in rig.calls())  # what reached the backend
    assert results.pop("FAILURE") >= 1  # the raising backend, however often it was asked
    assert results == dict(traced) and results["PARTIAL"] == 2 and results["FILE_FAILURE"] == 1
    assert sum(stats["read_data_results"].values()) == stats["read_data_calls"]
    assert sum(stats["read_data_seconds"]["counts"]) == stats["read_data_calls"]


async def test_read_data_calls_are_timed(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    rig.backend = Slow(rig.backend)  # type: ignore[assignment]
    async with rig.engine() as cache:
        await read_at(cache, "f", 0, BS)
        await read_at(cache, "f", 2 * BS, BS)
        await read_at(cache, "f", 0, BS)  # a hit: no call
        stats = cache.statistics()
    seconds, calls = stats["read_data_seconds"], stats["read_data_calls"]
    assert sum(seconds["counts"]) == calls >= 2
    assert seconds["sum"] >= calls * Slow.DELAY
    bounds, counts = seconds["bounds"], seconds["counts"]
    assert not any(n for bound, n in zip(bounds, counts[:-1], strict=True) if bound < Slow.DELAY)


# -- what a scrape shows --------------------------------------------------------------


async def test_a_scrape_shows_every_counter_of_stats_under_its_name(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "result": "PARTIAL", "max_bytes": 1000, "count": 1}])
    fuse = Latencies()
    fuse.observe("read", 0.0001)
    fuse.observe("read", 0.003)
    fuse.observe("lookup", 0.00002)
    async with rig.engine() as cache:
        await read_at(cache, "f", 0, BS)
        await read_at(cache, "f", 0, 100)
        commands = commands_of(cache)
        stats = await commands.stats()
        families = scrape(exposition(stats, fuse).decode())

    assert value(families, "cachefs_hit_bytes") == stats["hit_bytes"] == 100
    assert value(families, "cachefs_miss_bytes") == stats["miss_bytes"] == BS
    assert value(families, "cachefs_backend_read_bytes") == stats["bytes_from_backend"] == BS
    assert value(families, "cachefs_cached_bytes") == stats["cached_bytes"]
    assert value(families, "cachefs_cache_limit_bytes") == stats["cache_limit"]
    for code, n in stats["read_data_results"].items():
        assert value(families, "cachefs_read_data_calls", code=code) == n
    assert value(families, "cachefs_read_data_calls", code="PARTIAL") == 1
    assert value(families, "cachefs_read_data_calls", code="PERMANENT_FAILURE") == 0
    assert value(families, "cachefs_verification_failures", where="backend") == 0
    assert value(families, "cachefs_external_error") == 0
    assert value(families, "cachefs_read_only") == 0
    assert families["cachefs_hit_bytes"].type == "counter"
    assert families["cachefs_cached_bytes"].type == "gauge"

    read_data = families["cachefs_read_data_duration_seconds"]
    assert read_data.type == "histogram"
    calls = sum(stats["read_data_results"].values())
    count = [s for s in read_data.samples if s.name.endswith("_count")]
    assert [s.value for s in count] == [calls] and calls >= 2
    inf = [s for s in read_data.samples if s.labels.get("le") == "+Inf"]
    assert [s.value for s in inf] == [calls]

    requests = families["cachefs_fuse_request_duration_seconds"]
    counts = {s.labels["op"]: s.value for s in requests.samples if s.name.endswith("_count")}
    assert counts == {"read": 2, "lookup": 1}
    read_buckets = {
        s.labels["le"]: s.value
        for s in requests.samples
        if s.name.endswith("_bucket") and s.labels["op"] == "read"
    }
    assert read_buckets["5e-05"] == 0 and read_buckets["0.0001"] == 1
    assert read_buckets["0.0025"] == 1 and read_buckets["0.005"] == 2

    exported = {*metrics.COUNTERS, *metrics.GAUGES, *metrics.FLAGS}
    numbers = {k for k, v in stats.items() if isinstance(v, int | float) or v is None}
    assert numbers - exported - NOT_METRICS == set(), "a counter of stats that is not exported"
    assert "group" not in stats and not any(n.startswith("cachefs_hosted") for n in families)


def test_a_group_mount_shows_its_group_and_hosted_cache_counters() -> None:
    from cachefs.group.member import GroupStatistics

    group: dict[str, Any] = {key: 0 for key in GroupStatistics.__annotations__}
    group.update(
        name="g",
        member="m",
        hosted_cache="s3://bucket",
        hosted_down="timed out",
        hosted_hits=5,
        offer_queue_bytes=4096,
        versions_applied=2,
        group_pins=[{"file": "a"}, {"file": "b"}],
    )
    families = scrape(exposition(stats_like(group=group), None).decode())
    assert value(families, "cachefs_hosted_hits") == 5
    assert value(families, "cachefs_hosted_down") == 1
    assert value(families, "cachefs_hosted_offer_queue_bytes") == 4096
    assert value(families, "cachefs_group_versions_applied") == 2
    assert value(families, "cachefs_group_pins") == 2
    counters = {k for k, v in group.items() if isinstance(v, int)}
    exported = {*metrics.GROUP_COUNTERS, "offer_queue_bytes"}
    assert counters - exported == set(), "a group counter of stats that is not exported"
    assert "cachefs_fuse_request_duration_seconds" not in families


def test_every_metric_is_in_the_documentation() -> None:
    from cachefs.group.member import GroupStatistics

    group: dict[str, Any] = {key: 0 for key in GroupStatistics.__annotations__}
    group.update(hosted_cache="s3://bucket", hosted_down=None, group_pins=[])
    fuse = Latencies()
    fuse.observe("read", 0.001)
    families = text_string_to_metric_families(exposition(stats_like(group=group), fuse).decode())
    page = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"`{name}" in page, name


def stats_like(**more: Any) -> dict[str, Any]:
    """A ``cachefs stats`` answer of a mount that did nothing."""
    return {
        **{key: 0 for key in (*metrics.COUNTERS, *metrics.GAUGES)},
        "external_error": None,
        "read_data_results": {"SUCCESS": 0},
        "read_data_seconds": {"bounds": [1.0], "counts": [0, 0], "sum": 0.0},
        "corrupt_from_backend": 0,
        "corrupt_in_cache": 0,
        "add_data_accepted": 0,
        "add_data_rejected": 0,
        **more,
    }


def test_a_latched_storage_shows_as_one() -> None:
    families = scrape(exposition(stats_like(external_error="PERMANENT_FAILURE"), None).decode())
    assert value(families, "cachefs_external_error") == 1


# -- the HTTP server ------------------------------------------------------------------


@asynccontextmanager
async def serving(stats: dict[str, Any] | None = None) -> AsyncIterator[int]:
    """A MetricsServer on a free port of 127.0.0.1; that port."""
    snapshot = stats_like() if stats is None else stats

    async def answer() -> dict[str, Any]:
        return snapshot

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(MetricsServer(answer).serve, ("127.0.0.1", 0))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def exchange(port: int, request: bytes) -> bytes:
    """Send *request*, read the answer to the end."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        got = b""
        while chunk := await stream.receive_some():
            got += chunk
    return got


def status_of(answer: bytes) -> str:
    return answer.split(b"\r\n", 1)[0].decode()


async def test_get_metrics_answers_the_exposition() -> None:
    async with serving() as port:
        answer = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert status_of(answer) == "HTTP/1.1 200 OK"
    head_lines, body = answer.split(b"\r\n\r\n", 1)
    assert b"Content-Type: text/plain; version=0.0.4" in head_lines
    assert f"Content-Length: {len(body)}".encode() in head_lines
    assert value(scrape(body.decode()), "cachefs_hit_bytes") == 0
    assert status_of(head) == "HTTP/1.1 200 OK" and head.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", "404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405 Method Not Allowed"),
        (b"hello\r\n\r\n", "400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "431"),
    ],
)
async def test_anything_but_get_metrics_is_refused(request_: bytes, status: str) -> None:
    async with serving() as port:
        answer = await exchange(port, request_)
    assert status_of(answer).startswith(f"HTTP/1.1 {status}")


async def test_a_client_that_says_nothing_holds_up_no_other() -> None:
    async with serving() as port:
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
        with trio.fail_after(5):
            answer = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status_of(answer) == "HTTP/1.1 200 OK"
        for stream in silent:
            await stream.aclose()


async def test_connections_beyond_the_limit_are_closed_and_silent_ones_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with serving() as port:
        silent = [
            await trio.open_tcp_stream("127.0.0.1", port) for _ in range(metrics.MAX_CONNECTIONS)
        ]
        await trio.testing.wait_all_tasks_blocked()
        assert await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""  # closed unanswered
        start = trio.current_time()
        for stream in silent:  # each closed at its deadline
            assert await stream.receive_some() == b""
            await stream.aclose()
        assert trio.current_time() - start == pytest.approx(metrics.REQUEST_DEADLINE, abs=1)
        answer = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status_of(answer) == "HTTP/1.1 200 OK"


async def test_an_address_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            await MetricsServer(lambda: None).serve(("127.0.0.1", port))  # type: ignore[arg-type]
    assert str(raised.value) == (
        f"--metrics 127.0.0.1:{port}: cannot listen: Address already in use"
    )
    assert raised.value.exit_code == 2


@pytest.mark.parametrize(
    ("address", "reason"),
    [(("nosuch.invalid", 9464), "nosuch.invalid:9464"), (("192.0.2.1", 9464), "assign")],
)
async def test_an_address_that_is_not_this_machines_is_one_line(
    address: tuple[str, int], reason: str
) -> None:
    with pytest.raises(ConfigError, match="^--metrics .*: cannot listen: ") as raised:
        await MetricsServer(lambda: None).serve(address)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value) and reason in str(raised.value)
