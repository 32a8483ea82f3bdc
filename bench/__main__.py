"""``python -m bench``: the whole suite, then the report and the targets."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.dataset import FULL, QUICK, ensure_data
from bench.goals import check_goals
from bench.jobs import JOBS
from bench.report import ratios, write_outputs
from bench.s3like import run_moto, run_s3like
from bench.s3source import S3_JOBS, S3_TARGETS, serve_bucket
from bench.suite import Run, default_workdir, run_jobs
from bench.system import (
    REPO,
    BenchError,
    can_drop_caches,
    choose,
    host_takes_free_memory,
    machine,
    missing_tools,
    rounds_arg,
    run_main,
    set_memory_retouch,
)
from bench.targets import ENCRYPTED_JOBS, METRICS_JOBS, TARGETS, Target

# Memory touched after each drop of the caches, per byte the measurement reads
# (where the VM hands freed memory back to its host; see set_memory_retouch).
RETOUCH_FACTOR = 3
# a 1-minute load average above this at start means someone else is using the CPUs
BUSY_LOAD = 0.5
# each round of seq 1M (1 job) for raw, cachefs and cachefs-enc costs about 30 s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="fio, small files (1 and 8 readers), metadata (a tree, one big "
        "directory) and time to first byte through cachefs, "
        "against the raw source and rclone mount --vfs-cache-mode full, cold / cache-hit / "
        "warm; the 8 readers and the big directory also over an S3 bucket (hadro), cachefs "
        "against rclone; cachefs --encrypt against plain cachefs on cache hits and warm (seq "
        "1M, rand 4k); then cold reads through a throttled backend and from a moto-served S3 "
        "bucket. seq 1M (1 job) is measured three times (--quick: once) for raw, cachefs and "
        "cachefs-enc, alternating, and the median kept. Run as root (it drops kernel caches).",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs (< 2 min)")
    parser.add_argument(
        "--rounds",
        type=rounds_arg,
        metavar="N",
        help="how many times seq 1M (1 job) is measured for raw, cachefs and cachefs-enc, "
        "alternating; "
        f"the median is kept (default: {FULL.rounds}, with --quick {QUICK.rounds})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="data, mount points and caches (default: %(default)s)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=REPO / "bench" / "results",
        help="where the JSON, Markdown and PNG go (default: bench/results)",
    )
    parser.add_argument(
        "--targets",
        default=",".join([*TARGETS, *S3_TARGETS]),
        help="comma-separated subset of %(default)s (default: all; cachefs-enc, "
        f"cachefs --encrypt, measures only {','.join(sorted(ENCRYPTED_JOBS))} "
        "on cache hits and warm; cachefs-metrics, cachefs --metrics, measures only "
        f"{','.join(sorted(METRICS_JOBS))} on cache hits and warm; cachefs-s3 and "
        f"rclone-s3 mount a bucket of a hadro server and measure only {','.join(sorted(S3_JOBS))})",
    )
    parser.add_argument(
        "--jobs",
        default=",".join(j.key for j in JOBS),
        help="comma-separated subset of the jobs (default: all: %(default)s)",
    )
    parser.add_argument(
        "--throttle",
        default="30,90",
        metavar="LATENCY_MS,MIBPS",
        help="the throttled backend: first-byte latency and per-connection bandwidth "
        "(default: %(default)s)",
    )
    parser.add_argument("--no-throttled", action="store_true", help="skip the throttled read")
    parser.add_argument(
        "--no-moto", action="store_true", help="skip the read from a moto-served S3 bucket"
    )
    parser.add_argument(
        "--no-drop-caches",
        action="store_true",
        help="run without root: kernel caches are not dropped, so cold and cache-hit "
        "figures are not what they say (marked in the results)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_main("bench", _main, build_parser().parse_args(argv))


def _main(args: argparse.Namespace, say: Any, t0: float) -> int:
    names = choose(args.targets, [*TARGETS, *S3_TARGETS], "targets")
    job_keys = choose(args.jobs, [j.key for j in JOBS], "jobs")
    missing = missing_tools(names)
    if missing:
        raise BenchError(f"missing: {', '.join(missing)}")
    drop = not args.no_drop_caches
    if drop and not can_drop_caches():
        raise BenchError(
            "not root: cannot drop kernel caches (echo 3 > /proc/sys/vm/drop_caches); "
            "run as root, or pass --no-drop-caches and read cold figures as warm"
        )
    sizes = QUICK if args.quick else FULL
    if args.rounds is not None:
        sizes = replace(sizes, rounds=args.rounds)
    # --quick keeps to its 2 minutes without it (about 1 s per GiB touched).
    retouch = RETOUCH_FACTOR if drop and not args.quick and host_takes_free_memory() else 0
    set_memory_retouch(retouch)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    source = ensure_data(workdir, sizes, say)
    facts = machine(workdir)
    say(f"{facts['cpu']}, {facts['cores']} cores, {facts['memory_gib']} GiB, {facts['disk']}")
    load_before = os.getloadavg()[0]
    if load_before > BUSY_LOAD:
        say(f"the machine is busy (load {load_before:.2f}): figures will be noisy")
    jobs = [j for j in JOBS if j.key in job_keys]
    with ExitStack() as stack:
        targets: list[Target] = [TARGETS[n](source, workdir) for n in names if n in TARGETS]
        s3_names = [n for n in names if n in S3_TARGETS]
        if s3_names and any(j.key in S3_JOBS for j in jobs):
            try:
                bucket = stack.enter_context(serve_bucket(source, workdir, sizes, say))
            except BenchError as e:
                say(f"S3 source FAILED, {', '.join(s3_names)} left out: {e}")
            else:
                say(f"S3 source: hadro at {bucket.endpoint}, bucket {bucket.name}")
                targets += [S3_TARGETS[n](source, workdir, bucket) for n in s3_names]
        results = run_jobs(Run(jobs, targets, sizes, drop, say))
    s3like = None
    if not args.no_throttled:
        try:
            s3like = run_s3like(source, workdir, sizes, args.throttle, drop, say)
        except BenchError as e:
            say(f"throttled read FAILED: {e}")
    moto = None
    if not args.no_moto:
        try:
            moto = run_moto(source, workdir, sizes, drop, say)
        except BenchError as e:
            say(f"moto read FAILED: {e}")
            moto = {"error": str(e)}
    table = ratios(results)
    report: dict[str, Any] = {
        "started": started,
        "duration_s": round(time.monotonic() - t0, 1),
        "caches_dropped": drop,
        "memory_retouch_factor": retouch,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "machine": facts,
        "sizes": asdict(sizes),
        "workdir": str(workdir),
        "results": results,
        "s3like": s3like,
        "moto": moto,
        "ratios": table,
        "goals": check_goals(table, s3like),
    }
    paths = write_outputs(report, args.results, stamp)
    print()
    print("Goals, ratios from this run:")
    for g in report["goals"]:
        ratio = "–" if g["ratio"] is None else f"{g['ratio']:.3f}"
        print(f"  {g['verdict']:<4}  {ratio:>6}  {g['goal']}")
        if g.get("known_limit"):
            print(f"                known limit: {g['known_limit']} (README: What still limits)")
    print()
    print(f"{paths['md']}\n{paths['json']}\n{paths['png']}")
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
