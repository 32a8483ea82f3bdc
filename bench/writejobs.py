"""The write bench's jobs and sizes, and one fio run of a job (see bench/writes.py)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.dataset import GiB, MiB
from bench.system import BenchError

FIO_SLACK = 300.0  # on top of what a job should take, before fio is given up on


@dataclass(frozen=True)
class WriteSizes:
    mode: str
    seq_bytes: int  # what a seq job writes in all, split among its jobs
    rand_file: int  # each rand job's file
    rand_seconds: int  # rand jobs run this long (then the fsync, if any)
    rounds: int


FULL = WriteSizes("full", 2 * GiB, 512 * MiB, 5, 1)
QUICK = WriteSizes("quick", 64 * MiB, 16 * MiB, 1, 1)


@dataclass(frozen=True)
class WriteJob:
    key: str
    rw: str  # fio --rw
    bs: str
    numjobs: int
    end_fsync: bool

    @property
    def seq(self) -> bool:
        return self.rw == "write"

    @property
    def unit(self) -> str:
        return "MiB/s" if self.seq else "IOPS"

    @property
    def title(self) -> str:
        what = "seq write 1M" if self.seq else "rand write 4k"
        jobs = "1 job" if self.numjobs == 1 else f"{self.numjobs} jobs"
        return f"{what}, {jobs}{', end fsync' if self.end_fsync else ''} ({self.unit})"

    def file_size(self, sizes: WriteSizes) -> int:
        return sizes.seq_bytes // self.numjobs if self.seq else sizes.rand_file

    def footprint(self, sizes: WriteSizes) -> int:
        """What the job's files take, at most."""
        return self.file_size(sizes) * self.numjobs


JOBS = [
    WriteJob(f"{kind}_j{n}{'_fsync' if fsync else ''}", rw, bs, n, fsync)
    for kind, rw, bs in (("seq1m", "write", "1M"), ("rand4k", "randwrite", "4k"))
    for n in (1, 4)
    for fsync in (False, True)
]


def fio_write(directory: Path, job: WriteJob, sizes: WriteSizes) -> dict[str, Any]:
    """One fio run of *job* in *directory* (psync, jobs reported as one)."""
    cmd = ["fio", f"--name={job.key}", f"--directory={directory}", "--output-format=json"]
    cmd += ["--ioengine=psync", "--fallocate=none", "--group_reporting"]
    cmd += [f"--rw={job.rw}", f"--bs={job.bs}", f"--numjobs={job.numjobs}"]
    cmd += [f"--size={job.file_size(sizes)}", f"--end_fsync={int(job.end_fsync)}"]
    if not job.seq:
        cmd += ["--time_based", f"--runtime={sizes.rand_seconds}"]
    timeout = FIO_SLACK + (0 if job.seq else sizes.rand_seconds)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {job.key} did not finish within {timeout:g} s") from None
    out = done.stdout
    if done.returncode != 0 or "{" not in out:
        last = (done.stderr.strip() or out.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"fio {job.key} failed ({done.returncode}): {last[0]}")
    write = json.loads(out[out.index("{") :])["jobs"][0]["write"]
    clat = write["clat_ns"]
    bw = round(write["bw_bytes"] / MiB, 1)
    iops = round(write["iops"])
    return {
        "value": bw if job.seq else iops,
        "bw_mib_s": bw,
        "iops": iops,
        "io_mib": round(write["io_bytes"] / MiB, 1),
        "runtime_s": write["runtime"] / 1000,
        "clat_mean_us": round(clat["mean"] / 1000, 1),
        "clat_p99_us": round(clat.get("percentile", {}).get("99.000000", 0) / 1000, 1),
        "clat_max_ms": round(clat["max"] / 1e6, 1),
        "command": " ".join(cmd),
    }
