"""``python -m bench.writes``: fio writes through cachefs, against the raw disk and rclone.

Every job runs against three targets in one run, its targets one after the
other: **raw** (fio in a directory on the disk the others use), **cachefs**
(``cachefs mount SRC MNT``: read-write, write-back with the default delay)
and **rclone** (``rclone mount SRC MNT --vfs-cache-mode full``), SRC an
empty local directory on that same disk.

* Each measurement starts from the same state: an empty source and a fresh
  mount with an empty cache dir, the page cache written back (and, as
  root, dropped, then memory touched as the read bench does; see
  bench/system.py set_memory_retouch).  fio makes the files itself (its
  layout step), with ``--fallocate=none`` for every target alike (a FUSE
  mount takes no fallocate).
* Jobs: seq write 1M and rand write 4k, 1 job and 4 jobs (a file each),
  each without and with ``--end_fsync=1``.  The figure is fio's (MiB/s,
  IOPS) over the job's whole run, the final fsync included: cachefs's fsync
  returns when the source has the file, rclone's when its cache file is on
  disk (it uploads later).
* After each cachefs measurement the mount is flushed (``cachefs flush``,
  timed, not part of the figure) and the source must then hold every file
  at the size the mount shows: a write bench that lost writes is no bench.
* Goals (issue 22), judged per job on this run's ratios: write-back seq
  write (no fsync) at least 0.7 x raw and 2 x rclone; rand write 4k (with
  and without fsync) at least 1 x rclone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.dataset import MiB
from bench.suite import default_workdir
from bench.system import (
    REPO,
    BenchError,
    DaemonWatch,
    cachefs_cmd,
    can_drop_caches,
    choose,
    drop_caches,
    host_takes_free_memory,
    machine,
    rounds_arg,
    run_main,
    set_memory_retouch,
)
from bench.targets import CachefsTarget, RcloneTarget, Target
from bench.writejobs import FULL, JOBS, QUICK, WriteJob, WriteSizes, fio_write
from bench.writereport import check_goals, fmt, markdown, ratios
from cachefs.errors import CacheFSError

TARGET_NAMES = ("raw", "cachefs", "rclone")
# memory touched after each drop of the caches, per byte the job writes: a FUSE
# target fills the page cache twice (the mount's pages and its cache file's)
RETOUCH_FACTOR = 3
FLUSH_DEADLINE = 300.0
STATS_DEADLINE = 120.0  # a daemon busy in a blocking call does not answer meanwhile


# -- one measurement ------------------------------------------------------------------


def _empty(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _sizes_below(root: Path) -> dict[str, int]:
    return {e.name: e.stat().st_size for e in os.scandir(root) if e.is_file()}


def _counters(target: CachefsTarget) -> tuple[dict[str, Any], float]:
    """The mount's counters and how long its daemon took to answer for them (its
    loop answers nothing while it is stuck in a blocking call)."""
    started = time.monotonic()
    while True:
        try:
            return target.counters(), time.monotonic() - started
        except CacheFSError as e:
            if time.monotonic() - started > STATS_DEADLINE:
                raise BenchError(f"cachefs stats: {e}") from None
            time.sleep(0.1)


def _flush(target: CachefsTarget, before: dict[str, Any]) -> dict[str, Any]:
    """What cachefs flushed during the job, then a timed ``cachefs flush`` of all
    of it; BenchError unless the source then holds every file as the mount shows it."""
    during, unanswered = _counters(target)
    started = time.perf_counter()
    done = subprocess.run(
        cachefs_cmd("flush", str(target.root)),
        capture_output=True,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        timeout=FLUSH_DEADLINE,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise BenchError(f"cachefs flush failed: {done.stderr.strip()}")
    shown, held = _sizes_below(target.root), _sizes_below(target.source)
    if shown != held or _counters(target)[0].get("dirty_bytes"):
        raise BenchError(f"after cachefs flush the source holds {held}, the mount shows {shown}")
    return {
        "stats_answered_after_s": round(unanswered, 3),
        "flush_after_s": round(elapsed, 3),
        "flushed_during_mib": round(
            (during["flushed_bytes"] - before.get("flushed_bytes", 0)) / MiB, 1
        ),
        "write_data_calls_during": during["write_data_calls"] - before.get("write_data_calls", 0),
        "dirty_mib_at_end": round(during["dirty_bytes"] / MiB, 1),
    }


def measure(target: Target, job: WriteJob, sizes: WriteSizes, drop: bool) -> dict[str, Any]:
    """*job* on a fresh *target* over an empty source; the source emptied after."""
    _empty(target.source)
    drop_caches(drop, job.footprint(sizes))
    try:
        with target.fresh():
            before = _counters(target)[0] if isinstance(target, CachefsTarget) else {}
            watch = DaemonWatch(target.pid)
            watch.start()
            figures = fio_write(target.root, job, sizes)
            figures.update(watch.stop())
            if isinstance(target, CachefsTarget):
                figures.update(_flush(target, before))
        return figures
    finally:
        _empty(target.source)


def median(taken: list[dict[str, Any]]) -> dict[str, Any]:
    """The median measurement by value (of an even count, the worse of the middle
    two), with ``rounds``, every round's value, when there were several."""
    good = [f for f in taken if "error" not in f]
    if len(taken) == 1 or not good:
        return taken[0]
    chosen = dict(sorted(good, key=lambda f: f["value"])[(len(good) - 1) // 2])
    chosen["rounds"] = [f["value"] for f in good]
    return chosen


def run_jobs(
    jobs: list[WriteJob],
    targets: list[Target],
    sizes: WriteSizes,
    drop: bool,
    say: Callable[[str], None],
) -> dict[str, dict[str, dict[str, Any]]]:
    """``results[job][target]``: the figures of one measurement (the median of the
    rounds), or its error.  Rounds alternate the targets; a target that failed is
    not measured again in that job."""
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for job in jobs:
        taken: dict[str, list[dict[str, Any]]] = {}
        for round_no in range(1, sizes.rounds + 1):
            label = f"  (round {round_no} of {sizes.rounds})" if sizes.rounds > 1 else ""
            for target in targets:
                if any("error" in f for f in taken.get(target.name, [])):
                    continue
                try:
                    figures = measure(target, job, sizes, drop)
                    say(f"{job.key:<16} {target.name:<8} {figures['value']:,} {job.unit}{label}")
                except BenchError as e:
                    say(f"{job.key:<16} {target.name:<8} FAILED: {e}{label}")
                    figures = {"error": str(e)}
                taken.setdefault(target.name, []).append(figures)
        results[job.key] = {name: median(figures) for name, figures in taken.items()}
    return results


# -- command line ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.writes",
        description="fio seq write 1M and rand write 4k (1 and 4 jobs, with and without an "
        "fsync at the end) through cachefs (write-back), against the raw disk and rclone "
        "mount --vfs-cache-mode full, in one run; prints a Markdown table and the goals.",
    )
    parser.add_argument("--quick", action="store_true", help="small files, 1 s rand runs")
    parser.add_argument(
        "--rounds",
        type=rounds_arg,
        metavar="N",
        default=None,
        help="measure every job N times, the targets alternating, and keep the median "
        f"(default: {FULL.rounds})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="sources, mount points and caches go under WORKDIR/writes (default: %(default)s)",
    )
    parser.add_argument("--targets", default=",".join(TARGET_NAMES), help="default: %(default)s")
    parser.add_argument(
        "--jobs", default=",".join(j.key for j in JOBS), help="default: all: %(default)s"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    return parser


def _missing(names: list[str]) -> list[str]:
    tools = {"fio": "apt-get install fio", "fusermount3": "apt-get install fuse3"}
    if "rclone" in names:
        tools["rclone"] = "apt-get install rclone"
    missing = [f"{tool} ({how})" for tool, how in tools.items() if shutil.which(tool) is None]
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse (apt-get install fuse3, or --device /dev/fuse)")
    return missing


def make_targets(names: list[str], workdir: Path) -> list[Target]:
    made: dict[str, Callable[[], Target]] = {
        "raw": lambda: Target(workdir / "raw", workdir),
        "cachefs": lambda: CachefsTarget(workdir / "src-cachefs", workdir),
        "rclone": lambda: RcloneTarget(workdir / "src-rclone", workdir),
    }
    return [made[n]() for n in names]


def main(argv: list[str] | None = None) -> int:
    return run_main("bench.writes", _main, build_parser().parse_args(argv))


def _main(args: argparse.Namespace, say: Callable[[str], None], t0: float) -> int:
    names = choose(args.targets, list(TARGET_NAMES), "targets")
    keys = choose(args.jobs, [j.key for j in JOBS], "jobs")
    missing = _missing(names)
    if missing:
        raise BenchError(f"missing: {', '.join(missing)}")
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = WriteSizes(**{**asdict(sizes), "rounds": args.rounds})
    drop = can_drop_caches()
    retouch = RETOUCH_FACTOR if drop and not args.quick and host_takes_free_memory() else 0
    set_memory_retouch(retouch)
    workdir = args.workdir.resolve() / "writes"
    workdir.mkdir(parents=True, exist_ok=True)
    facts = machine(workdir)
    say(f"{facts['cpu']}, {facts['cores']} cores, {facts['disk']}; {facts['rclone']}")
    load_before = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    jobs = [j for j in JOBS if j.key in keys]
    results = run_jobs(jobs, make_targets(names, workdir), sizes, drop, say)
    table = ratios(results)
    report: dict[str, Any] = {
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "caches_dropped": drop,
        "memory_retouch_factor": retouch,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": facts,
        "sizes": asdict(sizes),
        "results": results,
        "ratios": table,
        "goals": check_goals(table),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    print("Goals, ratios from this run:")
    for g in report["goals"]:
        print(f"  {g['verdict']:<4}  {fmt(g['ratio'], 3):>6}  {g['job']}: {g['goal']}")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
