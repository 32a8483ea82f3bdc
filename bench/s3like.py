"""S3-like cold reads: cachefs over ``throttle(local)`` against a naive single stream.

The naive reader is what a program without a cache would do against one
connection: a plain loop of sequential 1 MiB ReadData calls on the same
throttled backend, in this process.  cachefs reads the same file cold
through a mount (fio, seq 1 MiB), so its readahead may use many connections.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from backends.local import LocalBackend
from backends.throttled import ThrottledBackend, parse_throttle
from bench.dataset import BIG, MiB, Sizes
from bench.jobs import fio
from bench.system import BenchError, DaemonWatch, drop_caches
from bench.targets import ThrottledTarget
from cachefs.contract import ReadData, RWEvent, RWResult


async def _naive(source: Path, spec: str, limit: int) -> dict[str, Any]:
    latency, bandwidth = parse_throttle(spec)
    backend = ThrottledBackend(LocalBackend(source), latency=latency, bandwidth=bandwidth)
    size = os.path.getsize(source / BIG)
    end = min(size, limit)
    buf = memoryview(bytearray(MiB))
    context = await backend.open_file(BIG)
    try:
        start = trio.current_time()
        position = 0
        flags = RWEvent.CONTINUOUS_STARTED
        while position < end:
            count = min(MiB, end - position)
            if position + count >= end:
                flags = RWEvent.CONTINUOUS_FINISHED
            req = ReadData(BIG, size, position, flags | RWEvent.TIL_END, buf, count)
            req.file_context = context
            await backend.read_data(req)
            if req.result_code != RWResult.SUCCESS or req.bytes_read == 0:
                raise BenchError(f"naive read at {position}: {req.result_code!r}")
            position += req.bytes_read
            flags = RWEvent.IN_PROGRESS
        elapsed = trio.current_time() - start
    finally:
        await backend.close_file(BIG, context)
        await backend.aclose()
    return {
        "value": round(position / MiB / elapsed, 1),
        "mib": round(position / MiB, 1),
        "seconds": round(elapsed, 3),
        "requests": backend.statistics()["requests"],
    }


def run_s3like(
    source: Path, workdir: Path, sizes: Sizes, spec: str, drop: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both reads, their ratio, and the moto-served bucket's status."""
    latency, bandwidth = parse_throttle(spec)
    out: dict[str, Any] = {
        "throttle": {"latency_ms": latency * 1000, "mib_s_per_connection": bandwidth / MiB},
    }
    drop_caches(drop)
    out["naive"] = trio.run(_naive, source, spec, sizes.naive_bytes)
    say(f"naive single stream: {out['naive']['value']} MiB/s")
    target = ThrottledTarget(source, workdir, spec)
    with target.fresh():
        drop_caches(drop)
        before = target.counters()
        watch = DaemonWatch(target.pid)
        watch.start()
        figures = fio(
            "throttled",
            False,
            sizes.throttled_seconds + 60,
            f"--filename={target.root / BIG}",
            "--rw=read",
            "--bs=1M",
            f"--size={sizes.big}",
            f"--runtime={sizes.throttled_seconds}",
        )
        out["cachefs"] = {"value": figures["bw_mib_s"], **figures, **watch.stop()}
        after = target.counters()
    calls = after["read_data_calls"] - before["read_data_calls"]
    fetched = after["bytes_from_backend"] - before["bytes_from_backend"]
    # Each call holds a connection for latency + bytes / bandwidth (the local
    # source is far faster than the throttle), so their summed time is known.
    busy = calls * latency + fetched / bandwidth
    out["cachefs"]["backend"] = {"read_data_calls": calls, "bytes": fetched}
    out["cachefs"]["mean_connections"] = round(busy / figures["runtime_s"], 2)
    say(
        f"cachefs cold through the throttle: {out['cachefs']['value']} MiB/s, "
        f"{out['cachefs']['mean_connections']} connections in use on average"
    )
    out["ratio"] = round(out["cachefs"]["value"] / out["naive"]["value"], 2)
    out["moto"] = _moto_status()
    return out


def _moto_status() -> str:
    from cachefs.registry import known_schemes

    if "s3" not in known_schemes():
        return "skipped: no s3 backend is installed yet"
    return "skipped: the s3 backend exists; the moto-served run is not written yet"
