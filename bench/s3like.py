"""S3-like cold reads: cachefs against a naive single stream, twice.

- Throttled: cachefs over ``throttle(local)``; the naive reader is what a
  program without a cache would do against one connection, a plain loop of
  sequential 1 MiB ReadData calls on the same throttled backend, in this
  process.
- moto: cachefs mounted on a bucket of a moto server that the suite starts
  on 127.0.0.1 (and always stops); the naive reader is a loop of 1 MiB
  ranged GETs (obstore), one after another, over the same object.

cachefs reads the file cold through a mount (fio, seq 1 MiB), so its
readahead may use many connections.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import obstore
import trio
from obstore.store import S3Store

from backends.local import LocalBackend
from backends.throttled import ThrottledBackend, parse_throttle
from bench.dataset import BIG, MiB, Sizes
from bench.jobs import fio
from bench.system import BenchError, DaemonWatch, drop_caches, free_port, serve_on
from bench.targets import CachefsTarget, ThrottledTarget
from cachefs.contract import ReadData, RWEvent, RWResult

MOTO_START_DEADLINE = 30.0
BUCKET = "cachefs-bench"
# moto checks no keys; these keep the user's own AWS settings out of the run.
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


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


def cold_read(target: Any, label: str, size: int, seconds: float, drop: bool) -> dict[str, Any]:
    """fio's cold sequential 1 MiB read of BIG through a fresh mount of *target*.

    Returns fio's figures, the daemon's CPU and peak RSS, and what the engine
    asked of its backend meanwhile.
    """
    with target.fresh():
        drop_caches(drop, size)
        before = target.counters()
        watch = DaemonWatch(target.pid)
        watch.start()
        figures = fio(
            label,
            False,
            seconds + 60,
            f"--filename={target.root / BIG}",
            "--rw=read",
            "--bs=1M",
            f"--size={size}",
            f"--runtime={seconds}",
        )
        result = {"value": figures["bw_mib_s"], **figures, **watch.stop()}
        after = target.counters()
    result["backend"] = {
        "read_data_calls": after["read_data_calls"] - before["read_data_calls"],
        "bytes": after["bytes_from_backend"] - before["bytes_from_backend"],
    }
    return result


def run_s3like(
    source: Path, workdir: Path, sizes: Sizes, spec: str, drop: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both reads, their ratio, and the moto-served bucket's status."""
    latency, bandwidth = parse_throttle(spec)
    out: dict[str, Any] = {
        "throttle": {"latency_ms": latency * 1000, "mib_s_per_connection": bandwidth / MiB},
    }
    drop_caches(drop, sizes.naive_bytes)
    out["naive"] = trio.run(_naive, source, spec, sizes.naive_bytes)
    say(f"naive single stream: {out['naive']['value']} MiB/s")
    out["cachefs"] = cold_read(
        ThrottledTarget(source, workdir, spec),
        "throttled",
        sizes.big,
        sizes.throttled_seconds,
        drop,
    )
    calls = out["cachefs"]["backend"]["read_data_calls"]
    fetched = out["cachefs"]["backend"]["bytes"]
    # Each call holds a connection for latency + bytes / bandwidth (the local
    # source is far faster than the throttle), so their summed time is known.
    busy = calls * latency + fetched / bandwidth
    out["cachefs"]["mean_connections"] = round(busy / out["cachefs"]["runtime_s"], 2)
    say(
        f"cachefs cold through the throttle: {out['cachefs']['value']} MiB/s, "
        f"{out['cachefs']['mean_connections']} connections in use on average"
    )
    out["ratio"] = round(out["cachefs"]["value"] / out["naive"]["value"], 2)
    return out


# -- on a moto-served bucket ------------------------------------------------------------


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A moto_server on 127.0.0.1 (a free port) while within; its endpoint."""
    exe = Path(sys.executable).with_name("moto_server")
    if not exe.exists():
        raise BenchError(f"{exe} is missing: pip install -e '.[test]' (moto[server])")
    port = free_port()
    with serve_on([str(exe), "-H", "127.0.0.1", "-p", str(port)], port, log, MOTO_START_DEADLINE):
        yield f"http://127.0.0.1:{port}"


@contextmanager
def moto_environment() -> Iterator[None]:
    """The mount's daemon inherits this environment: moto's keys, no other AWS_*."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    os.environ.update(MOTO_ENV)
    try:
        yield
    finally:
        for name in MOTO_ENV:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _store(endpoint: str) -> S3Store:
    config = {
        "endpoint": endpoint,
        "access_key_id": MOTO_ENV["AWS_ACCESS_KEY_ID"],
        "secret_access_key": MOTO_ENV["AWS_SECRET_ACCESS_KEY"],
        "region": MOTO_ENV["AWS_REGION"],
        "virtual_hosted_style_request": False,
    }
    return S3Store(BUCKET, config=config, client_options={"allow_http": True})  # type: ignore[arg-type]


def _upload(endpoint: str, store: S3Store, source: Path, size: int) -> None:
    """The bucket, and the first *size* bytes of the big file as object BIG."""
    request = urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise BenchError(f"creating the moto bucket: HTTP {response.status}")

    def chunks() -> Iterator[bytes]:
        with open(source / BIG, "rb") as f:
            left = size
            while left:
                chunk = f.read(min(8 * MiB, left))
                if not chunk:
                    raise BenchError(f"{source / BIG} is shorter than {size} bytes")
                left -= len(chunk)
                yield chunk

    obstore.put(store, BIG, chunks(), chunk_size=8 * MiB)


def _ranged_get_loop(store: S3Store, size: int, seconds: float) -> dict[str, Any]:
    """1 MiB ranged GETs, one after another, until the object ends or time is up."""
    position = requests = 0
    start = time.perf_counter()
    while position < size and time.perf_counter() - start < seconds:
        data = obstore.get_range(store, BIG, start=position, end=min(size, position + MiB))
        if len(data) == 0:
            raise BenchError(f"empty ranged GET at {position}")
        position += len(data)
        requests += 1
    elapsed = time.perf_counter() - start
    return {
        "value": round(position / MiB / elapsed, 1),
        "mib": round(position / MiB, 1),
        "seconds": round(elapsed, 3),
        "requests": requests,
    }


class MotoTarget(CachefsTarget):
    """``cachefs mount s3://BUCKET MNT --s3-endpoint URL``."""

    name = "cachefs-moto"

    def __init__(self, workdir: Path, endpoint: str) -> None:
        super().__init__(workdir, workdir)  # no local source: root is the mount or nothing
        self.endpoint = endpoint

    def source_arg(self) -> str:
        return f"s3://{BUCKET}"

    def mount_options(self) -> list[str]:
        return [f"--s3-endpoint={self.endpoint}"]


def run_moto(
    source: Path, workdir: Path, sizes: Sizes, drop: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Both reads of one object on a moto-served bucket, and their ratio."""
    size = sizes.moto_object
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"object_mib": size // MiB, "server": "moto_server on 127.0.0.1"}
    with moto_server(logs / "moto.log") as endpoint, moto_environment():
        store = _store(endpoint)
        started = time.perf_counter()
        _upload(endpoint, store, source, size)
        say(f"moto: {size // MiB} MiB object uploaded in {time.perf_counter() - started:.1f} s")
        out["naive"] = _ranged_get_loop(store, size, sizes.moto_seconds)
        say(f"moto: single-stream 1 MiB ranged GETs: {out['naive']['value']} MiB/s")
        out["cachefs"] = cold_read(
            MotoTarget(workdir, endpoint), "moto", size, sizes.moto_seconds, drop
        )
    out["ratio"] = round(out["cachefs"]["value"] / out["naive"]["value"], 2)
    say(
        f"moto: cachefs cold: {out['cachefs']['value']} MiB/s "
        f"({out['cachefs']['backend']['read_data_calls']} ReadData calls), "
        f"{out['ratio']} x the single stream"
    )
    return out
