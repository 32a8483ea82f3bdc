"""``cachefs mount --metrics HOST:PORT`` for real: a scrape of a mount moves
with what is read through it, and an address the mount cannot listen on is
one line at mount time, nothing mounted."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import MountFactory, assert_one_line_error, pread_direct, run_cachefs
from prometheus_client.parser import text_string_to_metric_families
from redisserver import free_port

BIG = 3 * 64 * 1024 + 100  # four 64 KiB blocks, the last short


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "big.bin").write_bytes(os.urandom(BIG))
    (root / "small.txt").write_text("hello\n")
    return root


class Scrape:
    """One scrape of http://127.0.0.1:PORT/metrics, by sample."""

    def __init__(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            answer = conn.getresponse()
            assert answer.status == 200, answer.status
            text = answer.read().decode()
        finally:
            conn.close()
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[s.name, frozenset(s.labels.items())] = s.value

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def ops(self) -> set[str]:
        """The operations the FUSE histogram has seen."""
        return {
            dict(labels)["op"]
            for name, labels in self.samples
            if name == "cachefs_fuse_request_duration_seconds_count"
        }


def test_a_scrape_moves_with_what_is_read(mount: MountFactory, data: Path) -> None:
    port = free_port()
    m = mount(data, "--metrics", f"127.0.0.1:{port}", "--no-passthrough")
    before = Scrape(port)
    assert before("cachefs_miss_bytes_total") == 0

    assert (m / "dir" / "big.bin").read_bytes() == (data / "dir" / "big.bin").read_bytes()
    cold = Scrape(port)
    calls = cold("cachefs_read_data_calls_total", code="SUCCESS")
    assert cold("cachefs_miss_bytes_total") == BIG
    assert cold("cachefs_backend_read_bytes_total") == BIG
    assert cold("cachefs_cached_bytes") == BIG
    assert calls >= 1 and cold("cachefs_read_data_calls_total", code="FAILURE") == 0
    assert cold("cachefs_read_data_duration_seconds_count") == calls
    assert {"lookup", "open", "read"} <= cold.ops()
    reads = cold("cachefs_fuse_request_duration_seconds_count", op="read")
    assert reads >= 1
    assert cold("cachefs_fuse_request_duration_seconds_bucket", op="read", le="+Inf") == reads

    # Again past the page cache: every byte a hit, nothing asked of the source.
    assert pread_direct(m / "dir" / "big.bin", 0, BIG) == (data / "dir" / "big.bin").read_bytes()
    hit = Scrape(port)
    assert hit("cachefs_hit_bytes_total") == BIG
    assert hit("cachefs_miss_bytes_total") == BIG
    assert hit("cachefs_read_data_calls_total", code="SUCCESS") == calls
    assert hit("cachefs_read_data_duration_seconds_count") == calls
    assert hit("cachefs_fuse_request_duration_seconds_count", op="read") > reads

    # What `cachefs stats --json` shows, the scrape shows.
    stats = m.stats()
    assert stats["read_data_results"]["SUCCESS"] == calls
    assert Scrape(port)("cachefs_hit_bytes_total") == stats["hit_bytes"]
    table = run_cachefs("stats", m.mountpoint)
    assert table.returncode == 0, table.stderr
    assert re.search(rf"^  by result +SUCCESS {int(calls)}$", table.stdout, re.M), table.stdout
    m.unmount()


@pytest.mark.parametrize(
    "address",
    [
        lambda taken: f"127.0.0.1:{taken}",  # in use
        lambda taken: "nosuch.invalid:9464",  # no such host (not local: tests/unit)
    ],
    ids=["in-use", "unresolvable"],
)
def test_an_address_the_mount_cannot_listen_on_is_one_line(
    address: Callable[[int], str],
    data: Path,
    mnt: Path,
    tmp_path: Path,
    cachefs: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = address(taken.getsockname()[1])
        done = cachefs("mount", data, mnt, "--cache-dir", tmp_path / "cache", "--metrics", metrics)
    assert_one_line_error(done, f"--metrics {metrics}: cannot listen:")
    assert not os.path.ismount(mnt)


def test_metrics_that_are_no_address_are_one_line(
    data: Path, mnt: Path, tmp_path: Path, cachefs: Callable[..., Any]
) -> None:
    done = cachefs("mount", data, mnt, "--cache-dir", tmp_path / "cache", "--metrics", "nonsense")
    assert_one_line_error(done, "--metrics", "nonsense")
    assert not os.path.ismount(mnt)
