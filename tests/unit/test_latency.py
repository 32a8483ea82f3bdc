"""The latency histograms: which bucket an observation lands in, and the sums."""

from __future__ import annotations

import pytest

from cachefs.latency import BUCKETS, Histogram, Latencies


def test_an_observation_counts_in_the_first_bucket_whose_bound_it_does_not_exceed() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for seconds in (0.0, 0.0005, 0.001, 0.002, 0.01, 0.05, 0.1, 0.5, 7.0):
        h.observe(seconds)
    # <= 1 ms: 0, 0.5 ms, 1 ms; <= 10 ms: 2 ms, 10 ms; <= 100 ms: 50 ms, 100 ms; above: 0.5 s, 7 s
    assert h.counts == [3, 2, 2, 2]
    assert h.count == 9
    assert h.sum == pytest.approx(0.0005 + 0.001 + 0.002 + 0.01 + 0.05 + 0.1 + 0.5 + 7.0)


def test_the_default_buckets_run_from_50_microseconds_to_10_seconds() -> None:
    h = Histogram()
    h.observe(0.00003)  # a hit answered from memory
    h.observe(30.0)  # slower than every bound
    assert BUCKETS[0] == 0.00005 and BUCKETS[-1] == 10.0
    assert h.counts[0] == 1 and h.counts[-1] == 1 and h.count == 2


def test_data_is_a_copy_in_plain_types() -> None:
    h = Histogram((1.0, 2.0))
    h.observe(1.5)
    data = h.data()
    h.observe(1.5)
    assert data == {"bounds": [1.0, 2.0], "counts": [0, 1, 0], "sum": 1.5}


def test_bounds_must_rise() -> None:
    with pytest.raises(ValueError, match="must rise"):
        Histogram((0.1, 0.01))
    with pytest.raises(ValueError, match="must rise"):
        Histogram((0.1, 0.1))


def test_latencies_keep_one_histogram_per_operation_made_when_first_observed() -> None:
    by_op = Latencies((0.001, 1.0))
    assert list(by_op) == []
    by_op.observe("read", 0.0002)
    by_op.observe("lookup", 0.5)
    by_op.observe("read", 0.002)
    got = {op: (h.counts, h.sum) for op, h in by_op}
    assert list(got) == ["lookup", "read"]
    assert got["read"] == ([1, 1, 0], pytest.approx(0.0022))
    assert got["lookup"] == ([0, 1, 0], 0.5)
