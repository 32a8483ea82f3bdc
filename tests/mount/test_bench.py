"""The benchmark suite: its rounds and report (fake targets), its arguments,
and one short real run of ``python -m bench --quick`` over a cachefs mount;
one short real run of the write bench, ``python -m bench.writes --quick``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import kernel_has_passthrough

from bench.dataset import BIG_DIR, QUICK, SMALL8_DIR, MiB, bigdir_names, small8_files
from bench.goals import check_goals
from bench.jobs import JOBS, Job
from bench.report import markdown, ratios
from bench.suite import Rounds, Run, run_jobs, typical
from bench.system import BenchError
from bench.writejobs import QUICK as WRITES_QUICK

REPO = Path(__file__).resolve().parents[2]
TTFB = next(j for j in JOBS if j.key == "ttfb")


class FakeTarget:
    """A target whose figures come from a list, one entry per mount, in order:
    ``{condition: value}``, or a BenchError that the mount raises."""

    def __init__(self, name: str, mounts: list[Any], log: list[str]) -> None:
        self.name = name
        self.root = Path("/fake") / name
        self.pid = None
        self._mounts = iter(mounts)
        self._log = log
        self._values: dict[str, float] = {}
        self._filled = False
        TARGETS_BY_ROOT[self.root] = self

    @contextmanager
    def fresh(self) -> Iterator[None]:
        mount = next(self._mounts)
        if isinstance(mount, Exception):
            raise mount
        self._values, self._filled = mount, False
        yield

    def measures(self, job: str, condition: str) -> bool:
        return True

    def counters(self) -> dict[str, Any]:
        return {}

    def settle(self) -> None:
        pass

    def fill(self) -> None:
        self._filled = True

    def take(self, warm: bool) -> dict[str, Any]:
        condition = "warm" if warm else "cache-hit" if self._filled else "cold"
        self._log.append(f"{self.name} {condition}")
        return {"value": self._values[condition]}


TARGETS_BY_ROOT: dict[Path, FakeTarget] = {}
FAKE_SEQ = Job(
    "seq1m_j1",
    "seq",
    "MiB/s",
    True,
    lambda root, sizes, warm: TARGETS_BY_ROOT[root].take(warm),
    lambda root, sizes: TARGETS_BY_ROOT[root].fill(),
    lambda sizes: 0,
)


def _run(targets: list[FakeTarget], rounds: Rounds, count: int) -> tuple[Any, list[str]]:
    said: list[str] = []
    sizes = replace(QUICK, rounds=count)
    run = Run([FAKE_SEQ], targets, sizes, False, said.append, {"seq1m_j1": rounds})  # type: ignore[arg-type]
    return run_jobs(run), said


def _shown(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k in ("value", "rounds", "error")}


def _mount(v: float) -> dict[str, float]:
    return {"cold": v, "cache-hit": v + 1, "warm": v + 2}


def test_rounds_alternate_the_named_targets_and_keep_the_median() -> None:
    log: list[str] = []
    raw = FakeTarget("raw", [_mount(100), _mount(300), _mount(200)], log)
    cachefs = FakeTarget("cachefs", [_mount(50), _mount(70), _mount(60)], log)
    rclone = FakeTarget("rclone", [_mount(10)], log)
    rounds = Rounds(frozenset({"raw", "cachefs"}), frozenset({"cold", "warm"}))

    results, said = _run([raw, cachefs, rclone], rounds, 3)

    # round 1: every target, every condition; then only the named ones, alternating
    assert log == [
        "raw cold", "raw cache-hit", "raw warm",
        "cachefs cold", "cachefs cache-hit", "cachefs warm",
        "rclone cold", "rclone cache-hit", "rclone warm",
        "raw cold", "raw warm", "cachefs cold", "cachefs warm",
        "raw cold", "raw warm", "cachefs cold", "cachefs warm",
    ]  # fmt: skip
    assert sum("(round 3 of 3)" in line for line in said) == 4
    r = results["seq1m_j1"]
    assert _shown(r["cold"]["raw"]) == {"value": 200, "rounds": [100, 300, 200]}
    assert _shown(r["warm"]["cachefs"]) == {"value": 62, "rounds": [52, 72, 62]}
    assert _shown(r["cache-hit"]["raw"]) == {"value": 101}  # measured once: no rounds
    assert _shown(r["cold"]["rclone"]) == {"value": 10}
    table = {row["condition"]: row for row in ratios(results)}
    assert table["cold"]["cachefs/raw"] == 0.3  # medians: 60 / 200


def test_a_target_that_fails_is_not_measured_again() -> None:
    log: list[str] = []
    raw = FakeTarget("raw", [_mount(100), _mount(300)], log)
    broken = FakeTarget("cachefs", [BenchError("mount failed"), _mount(1)], log)
    rounds = Rounds(frozenset({"raw", "cachefs"}), frozenset({"cold"}))

    results, said = _run([raw, broken], rounds, 2)

    for condition in ("cold", "cache-hit", "warm"):
        assert results["seq1m_j1"][condition]["cachefs"] == {"error": "mount failed"}
    assert results["seq1m_j1"]["cold"]["raw"]["rounds"] == [100, 300]
    failures = [line for line in said if "FAILED" in line]
    assert failures == ["seq1m_j1   cachefs: FAILED: mount failed"]
    assert not any(entry.startswith("cachefs") for entry in log)


def test_typical_takes_the_median_or_the_worse_of_two() -> None:
    faster = next(j for j in JOBS if j.higher_is_better)
    assert typical(faster, [{"value": 3}, {"value": 1}, {"value": 2}])["value"] == 2
    assert typical(faster, [{"value": 3}, {"value": 1}])["value"] == 1
    # for a time, the worse is the longer
    assert typical(TTFB, [{"value": 3.0}, {"value": 1.0}])["value"] == 3.0
    # a failed round leaves the others, and is counted
    got = typical(faster, [{"value": 5}, {"error": "boom"}, {"value": 7}])
    assert got == {"value": 5, "rounds": [5, 7], "round_errors": ["boom"]}
    assert typical(faster, [{"error": "a"}, {"error": "b"}]) == {"error": "a"}


def _report(results: dict[str, Any]) -> dict[str, Any]:
    table = ratios(results)
    return {
        "started": "2026-11-21 10:00:00",
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gib": 24,
            "kernel": "6.18",
            "disk": "vda",
            "fio": "fio-3.33",
            "rclone": "rclone v1.60",
        },
        "load_average": {"before": 0.1, "after": 0.2},
        "caches_dropped": True,
        "sizes": {"mode": "quick"},
        "results": results,
        "ratios": table,
        "goals": check_goals(table, None),
    }


def test_the_report_shows_each_round_and_judges_the_goals_on_the_median() -> None:
    results = {
        "seq1m_j1": {
            "cold": {"raw": {"value": 1000}, "cachefs": {"value": 600}},
            "cache-hit": {
                "raw": {"value": 1000, "rounds": [1200, 1000, 800]},
                "cachefs": {"value": 850, "rounds": [700, 850, 900]},
            },
            "warm": {"raw": {"value": 5000}, "cachefs": {"value": 4400}},
        }
    }
    report = _report(results)
    goals = {g["goal"]: g for g in report["goals"]}
    hit = goals["cache-hit seq 1M >= 0.9 x raw"]
    assert (hit["ratio"], hit["verdict"]) == (0.85, "MISS")
    assert goals["warm seq 1M >= 0.9 x raw"]["verdict"] == "MISS"  # 0.88
    assert goals["cold seq 1M >= 0.5 x raw"]["verdict"] == "PASS"
    assert "known_limit" not in goals["cold seq 1M >= 0.5 x raw"]
    assert goals["cold seq 1M >= 3 x rclone"]["verdict"] == "n/a"
    md = markdown(report)
    assert "Measured 3 times, the targets alternating" in md
    assert "| seq read 1M, 1 job (MiB/s) | cache-hit | raw | 1,200 / 1,000 / 800 | 1,000 |" in md
    assert "| seq read 1M, 1 job (MiB/s) | cache-hit | cachefs | 700 / 850 / 900 | 850 |" in md
    # a miss says what is known to stop it on this machine
    assert "| warm seq 1M >= 0.9 x raw | 0.88 | MISS: with passthrough the kernel reads" in md


def test_the_report_sets_the_s3_source_beside_the_local_one_and_judges_its_goals() -> None:
    def hit(value: int) -> dict[str, Any]:
        return {"value": value, "daemon_peak_rss_mib": 70.0}

    results = {
        "small8": {
            "cold": {
                "raw": {"value": 9000},
                "cachefs": {"value": 4000},
                "rclone": {"value": 1000},
                "cachefs-s3": {"value": 3000},
                "rclone-s3": {"value": 1000},
            },
            "cache-hit": {
                "raw": {"value": 9000},
                "cachefs": {"value": 6000},
                "cachefs-s3": hit(5000),
                "rclone-s3": {"value": 4000},
            },
            "warm": {"raw": {"value": 30000}, "cachefs": {"value": 20000}},
        },
        "bigdir": {
            "cold": {
                "raw": {"value": 100000, "entries": 5000},
                "cachefs": {"value": 30000, "entries": 5000},
                "cachefs-s3": {"value": 20000, "entries": 2000},
                "rclone-s3": {"value": 500, "entries": 2000},
            },
            "cache-hit": {},
            "warm": {},
        },
    }
    report = _report(results)
    goals = {g["goal"]: (g["ratio"], g["verdict"]) for g in report["goals"]}
    assert goals["small files, 8 readers: cold >= 0.35 x raw"] == (0.444, "PASS")
    assert goals["small files, 8 readers: cold >= 3 x rclone"] == (4.0, "PASS")
    assert goals["small files, 8 readers: cache-hit >= 0.6 x raw"] == (0.667, "PASS")
    assert goals["small files, 8 readers, S3 source: cold >= 2 x rclone"] == (3.0, "PASS")
    s3_hit = "small files, 8 readers, S3 source: cache-hit >= 0.9 x local cache-hit"
    assert goals[s3_hit] == (0.833, "MISS")
    assert goals["small files, 8 readers, S3 source: cache-hit >= 1.5 x rclone"] == (
        1.25,
        "MISS",
    )
    assert goals["big directory, S3 source: cold >= 1 x rclone"] == (40.0, "PASS")
    assert goals["big directory, local source: cold >= 1 x rclone"] == (None, "n/a")
    # the goals of issue 6 stay
    assert goals["cold seq 1M >= 3 x rclone"] == (None, "n/a")
    md = markdown(report)
    assert "ls -l of one big directory: 2,000 entries over S3, 5,000 local" in md
    row = "| small files, 8 parallel readers (files/s) | cache-hit | 9,000 | 6,000 | 5,000 | 4,000"
    assert f"{row} | 1.25 | 0.833 | – | 70.0 | – | – |" in md


def test_time_to_first_byte_goals_bound_the_time_against_raw() -> None:
    results = {
        "ttfb": {
            "cold": {},
            "cache-hit": {"raw": {"value": 1.0}, "cachefs": {"value": 2.9}},
            "warm": {"raw": {"value": 0.1}, "cachefs": {"value": 0.25}},
        }
    }
    goals = {g["goal"]: g["verdict"] for g in _report(results)["goals"]}
    assert goals["time to first byte, cache-hit: <= 3 x raw"] == "PASS"
    assert goals["time to first byte, warm: <= 2 x raw"] == "MISS"


def test_the_report_sets_the_two_fuse_transports_side_by_side() -> None:
    results = {
        "seq1m_j1": {
            "cold": {"raw": {"value": 1000}, "cachefs": {"value": 600}},
            "cache-hit": {
                "raw": {"value": 1000},
                "cachefs": {"value": 900, "daemon_cpu_s": 1.5},
                "cachefs-pyfuse3": {"value": 450, "daemon_cpu_s": 3.0},
            },
            "warm": {"raw": {"value": 5000}, "cachefs": {"value": 4400}},
        }
    }
    report = _report(results)
    by_condition = {r["condition"]: r for r in report["ratios"] if r["job"] == "seq1m_j1"}
    assert by_condition["cache-hit"]["cachefs-pyfuse3/cachefs"] == 0.5
    assert by_condition["warm"]["cachefs-pyfuse3/cachefs"] is None
    md = markdown(report)
    assert "| seq read 1M, 1 job (MiB/s) | cache-hit | 900 | 450 | 0.5 | 1.5 | 3 |" in md
    assert "| seq read 1M, 1 job (MiB/s) | warm | 4,400 |" not in md


def test_the_8_readers_read_every_file_and_ls_l_counts_every_entry(tmp_path: Path) -> None:
    """The two jobs of issue 23 on a plain directory (no mount): what they count
    is what is there, and a file that cannot be read fails the job."""
    sizes = replace(QUICK, small8_count=21, small8_size=100, bigdir_entries=37)
    (tmp_path / SMALL8_DIR).mkdir()
    for path in small8_files(tmp_path, sizes):
        path.write_bytes(b"x" * 100)
    (tmp_path / BIG_DIR).mkdir()
    for name in bigdir_names(sizes.bigdir_entries):
        (tmp_path / BIG_DIR / name).write_text(name)
    jobs = {j.key: j for j in JOBS}

    small8 = jobs["small8"].run(tmp_path, sizes, False)
    assert (small8["files"], small8["readers"]) == (21, 8)
    assert jobs["bigdir"].run(tmp_path, sizes, False)["entries"] == 37

    small8_files(tmp_path, sizes)[20].unlink()
    with pytest.raises(BenchError, match=r"^cat of the small files failed \(1\): cat: "):
        jobs["small8"].run(tmp_path, sizes, False)


def _bench(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--targets", "raw,nfs"], "bench: error: unknown targets nfs: choose from raw,"),
        (["--jobs", "seq9"], "bench: error: unknown jobs seq9: choose from seq1m_j1,"),
        (["--targets", ","], "bench: error: unknown targets : choose from"),
    ],
)
def test_a_wrong_target_or_job_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    done = _bench(*args, "--workdir", "/nonexistent/never-made")
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert done.stderr.count("\n") == 1
    assert not os.path.exists("/nonexistent/never-made")


def test_a_bad_round_count_is_refused() -> None:
    done = _bench("--rounds", "0", "--workdir", "/nonexistent/never-made")
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == "python -m bench: error: argument --rounds: expected a whole number from 1 to 9"


@pytest.mark.serial
def test_a_quick_run_over_raw_and_cachefs_measures_and_reports(tmp_path: Path) -> None:
    """The real thing, small: data made, cachefs mounted and unmounted (over
    both FUSE transports), fio run, two rounds of seq 1M, the JSON, Markdown
    and PNG written.  It needs fio, matplotlib and pyfuse3, which .ci/setup
    installs; without them the suite names them."""
    results = tmp_path / "results"
    args = ["--quick", "--workdir", str(tmp_path / "work"), "--results", str(results)]
    args += ["--targets", "raw,cachefs,cachefs-pyfuse3", "--jobs", "seq1m_j1,ttfb,small8"]
    args += ["--no-throttled", "--no-moto"]
    args += ["--rounds", "2"]
    if os.geteuid() != 0:
        args.append("--no-drop-caches")
    done = _bench(*args)
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    assert "(round 2 of 2)" in done.stdout
    report = json.loads((results / "latest-quick.json").read_text())
    seq = report["results"]["seq1m_j1"]
    for condition in ("cold", "cache-hit", "warm"):
        for target in ("raw", "cachefs"):
            figures = seq[condition][target]
            assert figures["value"] > 0
            assert len(figures["rounds"]) == 2
        counters = seq[condition]["cachefs"]["cachefs_counters"]
        assert counters["corrupt_from_backend"] == counters["corrupt_in_cache"] == 0
    # cold reads came from the backend, cache hits from the cache alone
    assert seq["cold"]["cachefs"]["cachefs_counters"]["bytes_from_backend"] > 0
    assert seq["cache-hit"]["cachefs"]["cachefs_counters"]["bytes_from_backend"] == 0
    assert "rounds" not in report["results"]["ttfb"]["cold"]["cachefs"]
    # Cached whole, the file is read by the kernel itself (as root): never when cold.
    opens = {c: seq[c]["cachefs"]["cachefs_counters"]["passthrough_opens"] for c in seq}
    assert opens["cold"] == 0
    if os.geteuid() == 0 and kernel_has_passthrough():
        assert opens["cache-hit"] + opens["warm"] > 0
        assert "Passthrough: in " in (results / "latest-quick.md").read_text()
    # pyfuse3: the same reads, never passthrough
    for condition in ("cold", "cache-hit", "warm"):
        counters = seq[condition]["cachefs-pyfuse3"]["cachefs_counters"]
        assert seq[condition]["cachefs-pyfuse3"]["value"] > 0
        assert counters["passthrough_opens"] == 0
    assert seq["cold"]["cachefs-pyfuse3"]["cachefs_counters"]["bytes_from_backend"] > 0
    assert seq["cache-hit"]["cachefs-pyfuse3"]["cachefs_counters"]["bytes_from_backend"] == 0
    # the 8 readers read every file, cache hits from the cache alone
    small8 = report["results"]["small8"]
    for condition in ("cold", "cache-hit", "warm"):
        for target in ("raw", "cachefs", "cachefs-pyfuse3"):
            figures = small8[condition][target]
            assert (figures["files"], figures["readers"]) == (QUICK.small8_count, 8)
    assert small8["cache-hit"]["cachefs"]["cachefs_counters"]["bytes_from_backend"] == 0
    assert (results / "latest-quick.png").stat().st_size > 0
    md = (results / "latest-quick.md").read_text()
    assert "| seq read 1M, 1 job (MiB/s) | cold | raw |" in md
    assert "| pyfuse3/native |" in md
    # nothing left mounted
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path) not in mounts


def test_a_quick_write_run_over_raw_and_cachefs_measures_and_flushes(tmp_path: Path) -> None:
    """``python -m bench.writes``, small: fio writes a file with an fsync at the
    end through raw and a cachefs mount, and the source holds what cachefs was
    given (the bench checks it after ``cachefs flush``)."""
    out = tmp_path / "writes.json"
    args = ["--quick", "--targets", "raw,cachefs", "--jobs", "seq1m_j1_fsync"]
    args += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "bench.writes", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout[-2000:]
    figures = json.loads(out.read_text())["results"]["seq1m_j1_fsync"]
    assert figures["raw"]["value"] > 0
    assert figures["cachefs"]["value"] > 0
    # the fsync at the end sent the whole file before fio was done
    assert figures["cachefs"]["flushed_during_mib"] == WRITES_QUICK.seq_bytes / MiB
    assert "| seq write 1M, 1 job, end fsync (MiB/s) |" in done.stdout
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
