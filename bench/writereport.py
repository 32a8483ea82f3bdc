"""The write bench's goals (issue 22), ratios and Markdown table.

A ratio is cachefs's figure over the other target's (MiB/s, IOPS): > 1
means cachefs is faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.writejobs import JOBS


@dataclass(frozen=True)
class Goal:
    title: str
    jobs: tuple[str, ...]
    ratio: str  # "cachefs/raw" or "cachefs/rclone"
    at_least: float


SEQ_WRITE_BACK = ("seq1m_j1", "seq1m_j4")
GOALS = (
    Goal("write-back seq write >= 0.7 x raw", SEQ_WRITE_BACK, "cachefs/raw", 0.7),
    Goal("write-back seq write >= 2 x rclone", SEQ_WRITE_BACK, "cachefs/rclone", 2.0),
    Goal(
        "rand write 4k >= 1 x rclone",
        tuple(j.key for j in JOBS if not j.seq),
        "cachefs/rclone",
        1.0,
    ),
)


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """``cachefs/raw`` and ``cachefs/rclone`` per job (None where one is missing)."""
    out: dict[str, dict[str, float | None]] = {}
    for key, per_target in results.items():
        mine = per_target.get("cachefs", {}).get("value")
        row: dict[str, float | None] = {}
        for peer in ("raw", "rclone"):
            theirs = per_target.get(peer, {}).get("value")
            row[f"cachefs/{peer}"] = round(mine / theirs, 3) if mine and theirs else None
        out[key] = row
    return out


def check_goals(table: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    verdicts = []
    for goal in GOALS:
        for key in goal.jobs:
            if key not in table:
                continue
            ratio = table[key][goal.ratio]
            verdict = "n/a" if ratio is None else "PASS" if ratio >= goal.at_least else "MISS"
            verdicts.append({"goal": goal.title, "job": key, "ratio": ratio, "verdict": verdict})
    return verdicts


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}" if digits else f"{round(value):,}"


def _cell(per: dict[str, dict[str, Any]], name: str, field: str = "value", digits: int = 0) -> str:
    figures = per.get(name, {})
    return "error" if "error" in figures else fmt(figures.get(field), digits)


def markdown(report: dict[str, Any]) -> str:
    results, table = report["results"], report["ratios"]
    verdicts: dict[str, list[str]] = {}
    for g in report["goals"]:
        line = next(x for x in GOALS if x.title == g["goal"])
        verdicts.setdefault(g["job"], []).append(
            f"{g['verdict']} {line.ratio.split('/')[1]} >= {line.at_least:g}"
        )
    head = "| job | raw | cachefs | rclone | cachefs/raw | cachefs/rclone | goals "
    head += "| cachefs flush after (s) | cachefs CPU s | rclone CPU s |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for job in JOBS:
        if job.key not in results:
            continue
        per = results[job.key]
        lines.append(
            f"| {job.title} | {_cell(per, 'raw')} | {_cell(per, 'cachefs')}"
            f" | {_cell(per, 'rclone')}"
            f" | {fmt(table[job.key]['cachefs/raw'], 2)}"
            f" | {fmt(table[job.key]['cachefs/rclone'], 2)}"
            f" | {', '.join(verdicts.get(job.key, []))}"
            f" | {_cell(per, 'cachefs', 'flush_after_s', 2)}"
            f" | {_cell(per, 'cachefs', 'daemon_cpu_s', 2)}"
            f" | {_cell(per, 'rclone', 'daemon_cpu_s', 2)} |"
        )
    errors = [
        f"- {key} {name}: {f['error']}"
        for key, per in results.items()
        for name, f in per.items()
        if "error" in f
    ]
    return "\n".join(lines + errors) + "\n"
