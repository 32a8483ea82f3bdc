"""Running every job under every condition against every target.

For each job, each target in turn is mounted fresh (empty cache) and
measured three times:

- cold: kernel caches dropped, nothing read yet through this mount;
- cache-hit: the job's files read once through the mount (the cachefs or
  rclone cache now holds them; for cachefs, once their blocks are hashed,
  which it does after the read), then kernel caches dropped;
- warm: the files read once more, so the page cache holds them; fio runs
  with ``--invalidate=0``.

For raw, cold and cache-hit are the same physical case (the file on disk,
page cache dropped); both are measured, as a check on the noise.  Jobs are
the outer loop so the targets of one job are measured close together.  A
target that measures only some jobs or conditions (``Target.measures``) is
not mounted for the others, and its results leave them out.

Where a goal's margin is within this VM's noise from one minute to the next
(``ROUNDS``), the targets it compares are measured again, in further rounds
after the first pass over all targets, alternating: raw, cachefs, raw,
cachefs, and so on.  The result is the median measurement (of an even count, the
worse of the middle two), with every round's figure beside it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dataset import Sizes
from bench.jobs import Job
from bench.system import BenchError, DaemonWatch, drop_caches
from bench.targets import Target

CONDITIONS = ("cold", "cache-hit", "warm")
COUNTERS = (
    "read_data_calls",
    "bytes_from_backend",
    "hit_bytes",
    "miss_bytes",
    "corrupt_from_backend",
    "corrupt_in_cache",
    "passthrough_opens",
)
# what a cachefs mount was measured with
MOUNT_MODE = ("encrypted", "verify")


@dataclass(frozen=True)
class Rounds:
    """Which targets and conditions of a job are measured in every round."""

    targets: frozenset[str]
    conditions: frozenset[str]


# The goals near their line that a round costs only seconds: seq 1M against raw
# (the disk alone reads at 0.85-2.5 GB/s from one minute to the next; a pass of
# raw, cachefs and the encrypted cachefs takes about 30 s), and the encrypted
# against the plain one, so that both sides of that ratio are medians too.
# Cache-hit rand 4k against rclone is near its line too, but a round of it
# costs 35 s of the 10 minutes.
ROUNDS = {
    "seq1m_j1": Rounds(frozenset({"raw", "cachefs", "cachefs-enc"}), frozenset(CONDITIONS)),
}


@dataclass
class Run:
    jobs: list[Job]
    targets: list[Target]
    sizes: Sizes
    drop: bool
    say: Callable[[str], None]
    rounds: dict[str, Rounds] = field(default_factory=lambda: dict(ROUNDS))


def _measure(target: Target, job: Job, run: Run, warm: bool) -> dict[str, Any]:
    before = target.counters()
    watch = DaemonWatch(target.pid)
    watch.start()
    started = time.perf_counter()
    figures = job.run(target.root, run.sizes, warm)
    wall = time.perf_counter() - started
    figures.update(watch.stop())
    figures["wall_s"] = round(wall, 3)
    after = target.counters()
    if after:
        figures["cachefs_counters"] = {k: after.get(k, 0) - before.get(k, 0) for k in COUNTERS}
        figures["cachefs_mount"] = {k: after.get(k) for k in MOUNT_MODE}
    return figures


def _job_on_target(
    job: Job, target: Target, conditions: list[str], run: Run, label: str
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    with target.fresh():
        for condition in conditions:
            if condition != "cold":
                job.fill(target.root, run.sizes)
                target.settle()
            if condition != "warm":
                drop_caches(run.drop, job.reads(run.sizes))
            figures = _measure(target, job, run, warm=condition == "warm")
            out[condition] = figures
            run.say(
                f"{job.key:<10} {condition:<9} {target.name:<11} {figures['value']} {job.unit}"
                f"{label}"
            )
    return out


def _conditions(job: Job, target: Target, round_no: int, run: Run) -> list[str]:
    """What *target* measures of *job* in round *round_no* (1: everything it measures)."""
    conditions = [c for c in CONDITIONS if target.measures(job.key, c)]
    if round_no == 1:
        return conditions
    rounds = run.rounds.get(job.key)
    if rounds is None or target.name not in rounds.targets:
        return []
    return [c for c in conditions if c in rounds.conditions]


def run_jobs(run: Run) -> dict[str, dict[str, dict[str, Any]]]:
    """``results[job][condition][target]``: the figures of one measurement, or its error.

    A target appears only under the jobs and conditions it measures.  A
    measurement taken in several rounds is the median one (see typical).
    """
    results: dict[str, dict[str, dict[str, Any]]] = {}
    count = run.sizes.rounds
    for job in run.jobs:
        taken: dict[str, dict[str, list[dict[str, Any]]]] = {c: {} for c in CONDITIONS}
        failed: set[str] = set()
        for round_no in range(1, count + 1):
            label = f"  (round {round_no} of {count})" if round_no > 1 else ""
            for target in run.targets:
                conditions = _conditions(job, target, round_no, run)
                if not conditions or target.name in failed:
                    continue
                try:
                    measured = _job_on_target(job, target, conditions, run, label)
                except BenchError as e:
                    run.say(f"{job.key:<10} {target.name}: FAILED: {e}{label}")
                    measured = {c: {"error": str(e)} for c in conditions}
                    failed.add(target.name)  # not measured again: it would fail again
                for condition, figures in measured.items():
                    taken[condition].setdefault(target.name, []).append(figures)
        results[job.key] = {
            condition: {name: typical(job, figures) for name, figures in per_target.items()}
            for condition, per_target in taken.items()
        }
    return results


def typical(job: Job, taken: list[dict[str, Any]]) -> dict[str, Any]:
    """One measurement for several rounds of it: the median by value (of an even
    count, the worse of the middle two), with ``rounds``, every round's value in
    the order measured, and ``round_errors`` if some rounds failed."""
    if len(taken) == 1:
        return taken[0]
    good = [f for f in taken if "error" not in f]
    if not good:
        return taken[0]
    worst_first = sorted(good, key=lambda f: f["value"], reverse=not job.higher_is_better)
    chosen = dict(worst_first[(len(good) - 1) // 2])
    chosen["rounds"] = [f["value"] for f in good]
    errors = [f["error"] for f in taken if "error" in f]
    if errors:
        chosen["round_errors"] = errors
    return chosen


def default_workdir() -> Path:
    return Path("/var/tmp/cachefs-bench")
