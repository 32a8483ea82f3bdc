"""Latency histograms with fixed buckets, cheap enough for the cache-hit path.

One trio loop is the only writer, so there is no lock: ``observe`` is a
bisect, a list increment and an addition.  A reader on the same loop (the
metrics endpoint) sees every histogram between two observations, never in
the middle of one.  Bounds are upper bounds in seconds, as Prometheus
buckets (``le``): an observation equal to a bound counts in its bucket.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TypedDict

#: 50 us to 10 s: a cache hit answered from memory takes tens of microseconds,
#: a slow remote read seconds.
BUCKETS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class HistogramData(TypedDict):
    """A histogram as plain data (JSON): ``counts[i]`` observations at most
    ``bounds[i]`` and above the bound before it; the last count, one more
    than the bounds, holds those above every bound."""

    bounds: list[float]
    counts: list[int]
    sum: float


class Histogram:
    """Observations in fixed buckets, and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must rise: {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def data(self) -> HistogramData:
        """A copy as plain data, for ``statistics()`` and the metrics endpoint."""
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


class Latencies:
    """Histograms by operation name, each made on first use."""

    __slots__ = ("_bounds", "_by_name")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self._bounds = bounds
        self._by_name: dict[str, Histogram] = {}

    def histogram(self, name: str) -> Histogram:
        """The histogram of *name*, made on first use (to observe into it
        without looking it up each time)."""
        histogram = self._by_name.get(name)
        if histogram is None:
            histogram = self._by_name[name] = Histogram(self._bounds)
        return histogram

    def observe(self, name: str, seconds: float) -> None:
        self.histogram(name).observe(seconds)

    def __iter__(self) -> Iterator[tuple[str, Histogram]]:
        """(name, histogram) of every operation observed, by name."""
        return iter(sorted(self._by_name.items()))
