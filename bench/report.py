"""Ratios, and the JSON / Markdown / PNG outputs (the goals: bench/goals.py).

A ratio is always "how many times as fast as": for a time (time to first
byte) the other target's time is divided by cachefs's, so > 1 means cachefs
is faster everywhere.  ``cachefs-enc/cachefs`` is the encrypted cache against
the plain one (> 1: encrypted faster), where the encrypted one was measured;
``cachefs-pyfuse3/cachefs`` the pyfuse3 transport against the native one
(> 1: pyfuse3 faster); ``cachefs-s3/...`` cachefs over the S3 bucket against
rclone over it, against cachefs over the local source, and against raw.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bench.goals import ENC_RATIO, ENC_RAW, S3_LOCAL, S3_RAW, S3_RCLONE
from bench.jobs import JOBS, Job
from bench.suite import CONDITIONS

ENCRYPTED = "cachefs-enc"
PYFUSE3 = "cachefs-pyfuse3"
PYFUSE3_RATIO = f"{PYFUSE3}/cachefs"
METRICS = "cachefs-metrics"
METRICS_RATIO = f"{METRICS}/cachefs"
S3_CACHEFS, S3_RCLONE_TARGET = "cachefs-s3", "rclone-s3"
# the ratios of every row: key, the target measured against, the other
RATIOS = (
    ("cachefs/raw", "cachefs", "raw"),
    ("cachefs/rclone", "cachefs", "rclone"),
    ("rclone/raw", "rclone", "raw"),
    (ENC_RATIO, ENCRYPTED, "cachefs"),
    (ENC_RAW, ENCRYPTED, "raw"),
    (PYFUSE3_RATIO, PYFUSE3, "cachefs"),
    (METRICS_RATIO, METRICS, "cachefs"),
    (S3_RCLONE, S3_CACHEFS, S3_RCLONE_TARGET),
    (S3_LOCAL, S3_CACHEFS, "cachefs"),
    (S3_RAW, S3_CACHEFS, "raw"),
)


def _speed_ratio(job: Job, ours: Any, theirs: Any) -> float | None:
    if not isinstance(ours, int | float) or not isinstance(theirs, int | float):
        return None
    if min(ours, theirs) <= 0:
        return None
    return round(ours / theirs if job.higher_is_better else theirs / ours, 3)


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every ratio of RATIOS for every job and condition measured (None where
    either side is missing)."""
    out = []
    for job in JOBS:
        if job.key not in results:
            continue
        for condition in CONDITIONS:
            row = results[job.key][condition]
            entry: dict[str, Any] = {"job": job.key, "condition": condition}
            for key, ours, theirs in RATIOS:
                entry[key] = _speed_ratio(
                    job, row.get(ours, {}).get("value"), row.get(theirs, {}).get("value")
                )
            out.append(entry)
    return out


# -- Markdown ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(figures: dict[str, Any]) -> str:
    if "error" in figures:
        return "error"
    return _fmt(figures.get("value"))


def _retouched(report: dict[str, Any]) -> str:
    factor = report.get("memory_retouch_factor", 0)
    if not factor:
        return ""
    return (
        f", then {factor}x the bytes the job reads of memory touched once (this VM hands"
        " freed memory back to its host; see bench/system.py)"
    )


def _passthrough_lines(report: dict[str, Any]) -> list[str]:
    """Which cachefs measurements the kernel read from the cache file itself."""
    taken = [
        (job, condition)
        for job, conditions in report["results"].items()
        for condition, row in conditions.items()
        if row.get("cachefs", {}).get("cachefs_counters", {}).get("passthrough_opens")
    ]
    if not taken:
        return ["", "Passthrough: no cachefs open was read by the kernel from the cache file."]
    conditions = sorted({c for _, c in taken})
    return [
        "",
        f"Passthrough: in {len(taken)} cachefs measurements ({', '.join(conditions)}), the "
        "files were cached whole and read by the kernel from the cache file itself (FUSE "
        "passthrough), not through the daemon.",
    ]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"### cachefs benchmark ({report['sizes']['mode']} run, {report['started']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, "
        f"kernel {m['kernel']}; disk {m['disk']}. {m['fio']}, {m['rclone']}.",
        f"Load average {report['load_average']['before']:.2f} before the run, "
        f"{report['load_average']['after']:.2f} after; "
        f"kernel caches {'dropped' if report['caches_dropped'] else 'NOT dropped'} "
        f"for cold and cache-hit{_retouched(report)}. Ratios are speed ratios from this one run "
        "(> 1: cachefs faster); CPU and peak RSS are the mount daemon's during the measured job.",
        "",
        "| job | condition | raw | cachefs | rclone | cachefs/raw | cachefs/rclone "
        "| cachefs CPU s | cachefs RSS MiB | rclone CPU s | rclone RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["job"], r["condition"]): r for r in report["ratios"]}
    for job in JOBS:
        if job.key not in report["results"]:
            continue
        for condition in CONDITIONS:
            row = report["results"][job.key][condition]
            r = by_key[(job.key, condition)]
            ours, theirs = row.get("cachefs", {}), row.get("rclone", {})
            cells = [
                f"{job.title} ({job.unit})",
                condition,
                _cell(row.get("raw", {})),
                _cell(ours),
                _cell(theirs),
                _fmt(r["cachefs/raw"]),
                _fmt(r["cachefs/rclone"]),
                _fmt(ours.get("daemon_cpu_s")),
                _fmt(ours.get("daemon_peak_rss_mib")),
                _fmt(theirs.get("daemon_cpu_s")),
                _fmt(theirs.get("daemon_peak_rss_mib")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _rounds_lines(report)
    lines += _passthrough_lines(report)
    s3 = report.get("s3like")
    if s3:
        t = s3["throttle"]
        lines += [
            "",
            f"Throttled backend ({t['latency_ms']:g} ms first byte, "
            f"{t['mib_s_per_connection']:g} MiB/s per connection), cold sequential read: "
            f"cachefs {_fmt(s3['cachefs']['value'])} MiB/s "
            f"(daemon CPU {_fmt(s3['cachefs'].get('daemon_cpu_s'))} s), "
            f"naive single stream {_fmt(s3['naive']['value'])} MiB/s: "
            f"**{_fmt(s3['ratio'])} x**.",
        ]
    moto = report.get("moto")
    if moto and "error" in moto:
        lines += ["", f"S3 on moto: FAILED: {moto['error']}"]
    elif moto:
        lines += [
            "",
            f"S3 on moto ({moto['server']}), cold sequential read of a "
            f"{moto['object_mib']} MiB object: cachefs {_fmt(moto['cachefs']['value'])} MiB/s "
            f"({_fmt(moto['cachefs']['backend']['read_data_calls'])} ReadData calls, "
            f"daemon CPU {_fmt(moto['cachefs'].get('daemon_cpu_s'))} s), "
            f"single-stream 1 MiB ranged GETs {_fmt(moto['naive']['value'])} MiB/s: "
            f"**{_fmt(moto['ratio'])} x**.",
        ]
    lines += _s3_lines(report)
    lines += _encrypted_lines(report)
    lines += _transport_lines(report)
    lines += _metrics_lines(report)
    lines += ["", "| goal | ratio | verdict |", "|---|---:|---|"]
    for g in report["goals"]:
        limit = f": {g['known_limit']}" if g.get("known_limit") else ""
        lines.append(f"| {g['goal']} | {_fmt(g['ratio'])} | {g['verdict']}{limit} |")
    return "\n".join(lines) + "\n"


def _rounds_lines(report: dict[str, Any]) -> list[str]:
    """The measurements taken in several rounds: each round's figure."""
    rows = []
    counts = set()
    for job in JOBS:
        for condition in CONDITIONS:
            row = report["results"].get(job.key, {}).get(condition, {})
            for target, figures in row.items():
                if "rounds" not in figures:
                    continue
                counts.add(len(figures["rounds"]) + len(figures.get("round_errors", [])))
                values = " / ".join(_fmt(v) for v in figures["rounds"])
                if figures.get("round_errors"):
                    values += f" ({len(figures['round_errors'])} failed)"
                cells = [f"{job.title} ({job.unit})", condition, target, values, _cell(figures)]
                rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    times = "several times" if len(counts) != 1 else f"{counts.pop()} times"
    return [
        "",
        f"Measured {times}, the targets alternating (the goals whose margin is within "
        "this machine's noise from one minute to the next); the tables give the median "
        "(of two, the worse).",
        "",
        "| job | condition | target | each round, in order | median |",
        "|---|---|---|---|---:|",
        *rows,
    ]


def _s3_lines(report: dict[str, Any]) -> list[str]:
    """cachefs and rclone over the S3 bucket, beside cachefs over the local source."""
    by_key = {(r["job"], r["condition"]): r for r in report["ratios"]}
    rows = []
    entries = []
    for job in JOBS:
        for condition in CONDITIONS:
            row = report["results"].get(job.key, {}).get(condition, {})
            if S3_CACHEFS not in row and S3_RCLONE_TARGET not in row:
                continue
            ours, theirs = row.get(S3_CACHEFS, {}), row.get(S3_RCLONE_TARGET, {})
            r = by_key[(job.key, condition)]
            if condition == "cold" and "entries" in ours:
                local = row.get("cachefs", row.get("raw", {})).get("entries")
                entries.append(
                    f"{job.title}: {_fmt(ours['entries'])} entries over S3, {_fmt(local)} local"
                )
            cells = [
                f"{job.title} ({job.unit})",
                condition,
                _cell(row.get("raw", {})),
                _cell(row.get("cachefs", {})),
                _cell(ours),
                _cell(theirs),
                _fmt(r[S3_RCLONE]),
                _fmt(r[S3_LOCAL]),
                _fmt(ours.get("daemon_cpu_s")),
                _fmt(ours.get("daemon_peak_rss_mib")),
                _fmt(theirs.get("daemon_cpu_s")),
                _fmt(theirs.get("daemon_peak_rss_mib")),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    sizes = f" ({'; '.join(entries)})" if entries else ""
    return [
        "",
        "S3 source: a bucket of a hadro server on 127.0.0.1 (bench/s3source.py) holding the "
        f"same files{sizes}: cachefs-s3 is `cachefs mount s3://bench MNT --s3-endpoint URL`, "
        "rclone-s3 `rclone mount benchs3:bench MNT --vfs-cache-mode full` (an S3 remote); "
        "s3/local is cachefs over S3 against cachefs over the local source.",
        "",
        "| job | condition | raw | cachefs (local) | cachefs-s3 | rclone-s3 "
        "| cachefs-s3/rclone-s3 | s3/local | cachefs-s3 CPU s | cachefs-s3 RSS MiB "
        "| rclone-s3 CPU s | rclone-s3 RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _encrypted_lines(report: dict[str, Any]) -> list[str]:
    """The encrypted cache against the plain one, for what the encrypted one measured."""
    by_key = {(r["job"], r["condition"]): r for r in report["ratios"]}
    rows = []
    verify: set[str] = set()
    for job in JOBS:
        for condition in CONDITIONS:
            row = report["results"].get(job.key, {}).get(condition, {})
            if ENCRYPTED not in row:
                continue
            plain, enc = row.get("cachefs", {}), row[ENCRYPTED]
            verify |= {f["cachefs_mount"]["verify"] for f in (plain, enc) if "cachefs_mount" in f}
            cells = [
                f"{job.title} ({job.unit})",
                condition,
                _cell(plain),
                _cell(enc),
                _fmt(by_key[(job.key, condition)][ENC_RATIO]),
                _fmt(plain.get("daemon_cpu_s")),
                _fmt(enc.get("daemon_cpu_s")),
                _fmt(plain.get("daemon_peak_rss_mib")),
                _fmt(enc.get("daemon_peak_rss_mib")),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    verified = f", both with `--verify {verify.pop()}`" if len(verify) == 1 else ""
    return [
        "",
        "Encrypted cache (`cachefs mount --encrypt`, a random 32-byte key) against the plain "
        f"one{verified}; ratio > 1: encrypted faster.",
        "",
        "| job | condition | cachefs | cachefs-enc | enc/plain | cachefs CPU s "
        "| cachefs-enc CPU s | cachefs RSS MiB | cachefs-enc RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def _transport_lines(report: dict[str, Any]) -> list[str]:
    """The two FUSE transports side by side, where pyfuse3 was measured."""
    return _beside_cachefs(
        report,
        PYFUSE3,
        PYFUSE3_RATIO,
        "FUSE transports: `--fuse native` (the default, with passthrough) against "
        "`--fuse pyfuse3` (libfuse, no passthrough); ratio > 1: pyfuse3 faster.",
        ("native", "pyfuse3"),
    )


def _metrics_lines(report: dict[str, Any]) -> list[str]:
    """cachefs with and without ``--metrics``, where both were measured."""
    return _beside_cachefs(
        report,
        METRICS,
        METRICS_RATIO,
        "Metrics: `cachefs mount --metrics` (every FUSE request timed) against cachefs "
        "without; ratio < 1: the metrics cost that much.",
        ("off", "on"),
    )


def _beside_cachefs(
    report: dict[str, Any], other: str, ratio: str, intro: str, names: tuple[str, str]
) -> list[str]:
    """A table of cachefs against target *other*, where *other* was measured."""
    by_key = {(r["job"], r["condition"]): r for r in report["ratios"]}
    rows = []
    for job in JOBS:
        for condition in CONDITIONS:
            row = report["results"].get(job.key, {}).get(condition, {})
            if other not in row:
                continue
            ours, theirs = row.get("cachefs", {}), row[other]
            cells = [
                f"{job.title} ({job.unit})",
                condition,
                _cell(ours),
                _cell(theirs),
                _fmt(by_key[(job.key, condition)][ratio]),
                _fmt(ours.get("daemon_cpu_s")),
                _fmt(theirs.get("daemon_cpu_s")),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    a, b = names
    return [
        "",
        intro,
        "",
        f"| job | condition | {a} | {b} | {b}/{a} | {a} CPU s | {b} CPU s |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


# -- chart -------------------------------------------------------------------------------


def chart(report: dict[str, Any], path: Path) -> None:
    """Bars of cachefs/raw, rclone/raw, cachefs/rclone and cachefs-enc/cachefs per job
    and condition (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["ratios"]
    labels = [f"{r['job']}\n{r['condition']}" for r in rows]
    series = [("cachefs/raw", "tab:blue"), ("rclone/raw", "tab:orange")]
    series.append(("cachefs/rclone", "tab:green"))
    if any(r.get(ENC_RATIO) is not None for r in rows):
        series.append((ENC_RATIO, "tab:purple"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(10, len(rows) * 0.75), 5.5))
    for i, (key, color) in enumerate(series):
        xs = [n + (i - (len(series) - 1) / 2) * width for n in range(len(rows))]
        ys = [r.get(key) or 0 for r in rows]
        ax.bar(xs, ys, width, label=key, color=color)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speed ratio (log scale)")
    m = report["machine"]
    ax.set_title(
        f"cachefs benchmark, {report['sizes']['mode']} run: {m['cores']} x {m['cpu']}, "
        f"{m['memory_gib']} GiB, kernel {m['kernel']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(report: dict[str, Any], results_dir: Path, stamp: str) -> dict[str, Path]:
    """``bench-<mode>-<stamp>.{json,md,png}``, copied to ``latest-<mode>.*``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    base = results_dir / f"bench-{report['sizes']['mode']}-{stamp}"
    paths = {ext: base.with_suffix(f".{ext}") for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    paths["md"].write_text(markdown(report))
    chart(report, paths["png"])
    for ext, path in paths.items():
        shutil.copyfile(path, results_dir / f"latest-{report['sizes']['mode']}.{ext}")
    return paths
