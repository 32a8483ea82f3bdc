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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
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
)
# what a cachefs mount was measured with
MOUNT_MODE = ("encrypted", "verify")


@dataclass
class Run:
    jobs: list[Job]
    targets: list[Target]
    sizes: Sizes
    drop: bool
    say: Callable[[str], None]


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
    job: Job, target: Target, conditions: list[str], run: Run
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
            run.say(f"{job.key:<10} {condition:<9} {target.name:<11} {figures['value']} {job.unit}")
    return out


def run_jobs(run: Run) -> dict[str, dict[str, dict[str, Any]]]:
    """``results[job][condition][target]``: the figures of one measurement, or its error.

    A target appears only under the jobs and conditions it measures.
    """
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for job in run.jobs:
        per_condition: dict[str, dict[str, Any]] = {c: {} for c in CONDITIONS}
        for target in run.targets:
            conditions = [c for c in CONDITIONS if target.measures(job.key, c)]
            if not conditions:
                continue
            try:
                measured = _job_on_target(job, target, conditions, run)
            except BenchError as e:
                run.say(f"{job.key:<10} {target.name}: FAILED: {e}")
                measured = {c: {"error": str(e)} for c in conditions}
            for condition, figures in measured.items():
                per_condition[condition][target.name] = figures
        results[job.key] = per_condition
    return results


def default_workdir() -> Path:
    return Path("/var/tmp/cachefs-bench")
