"""The jobs: fio seq/rand, small files (1 and 8 readers), metadata (``ls -lR``
of a tree, ``ls -l`` of one big directory), time to first byte.

Each job has ``run(root, sizes, warm)``, the measurement, returning a dict
whose ``value`` is the figure compared across targets, and ``fill(root,
sizes)``, which reads everything ``run`` reads once, so that caches hold it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.dataset import (
    BIG,
    BIG_DIR,
    SEQ4_DIR,
    TREE_DIR,
    MiB,
    Sizes,
    seq4_files,
    small8_files,
    small_files,
)
from bench.system import BenchError

CHUNK = MiB
FIRST_BYTES = 4096
TTFB_FILL = 8 * MiB
READERS = 8  # the parallel small-file readers


@dataclass(frozen=True)
class Job:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    run: Callable[[Path, Sizes, bool], dict[str, Any]]
    fill: Callable[[Path, Sizes], None]
    reads: Callable[[Sizes], int]  # bytes of data the job reads, at most


# -- fio ---------------------------------------------------------------------------------


def fio(name: str, warm: bool, timeout: float, *args: str) -> dict[str, Any]:
    """One fio run (psync, read-only, jobs reported as one); the read figures."""
    cmd = ["fio", f"--name={name}", "--output-format=json", "--ioengine=psync", "--readonly"]
    cmd += ["--group_reporting", *args]
    if warm:
        cmd.append("--invalidate=0")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {name} did not finish within {timeout:g} s") from None
    out = done.stdout
    if done.returncode != 0 or "{" not in out:
        last = (done.stderr.strip() or out.strip()).splitlines()[-1:] or ["no output"]
        raise BenchError(f"fio {name} failed ({done.returncode}): {last[0]}")
    report = json.loads(out[out.index("{") :])
    read = report["jobs"][0]["read"]
    clat = read["clat_ns"]
    percentiles = clat.get("percentile", {})
    return {
        "bw_mib_s": round(read["bw_bytes"] / MiB, 1),
        "iops": round(read["iops"]),
        "io_mib": round(read["io_bytes"] / MiB, 1),
        "runtime_s": read["runtime"] / 1000,
        "clat_mean_us": round(clat["mean"] / 1000, 1),
        "clat_p99_us": round(percentiles.get("99.000000", 0) / 1000, 1),
        "command": " ".join(cmd),
    }


def _seq_time(sizes: Sizes, warm: bool) -> list[str]:
    """Cold and cache-hit: one pass, capped.  Warm: passes over the file for a while,
    since one pass from the page cache lasts a fraction of a second."""
    if warm:
        return ["--time_based", f"--runtime={sizes.warm_seq_seconds}"]
    return [f"--runtime={sizes.seq_cap_seconds}"]


def _seq1(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    figures = fio(
        "seq1",
        warm,
        sizes.seq_cap_seconds + 60,
        f"--filename={root / BIG}",
        "--rw=read",
        "--bs=1M",
        f"--size={sizes.big}",
        *_seq_time(sizes, warm),
    )
    return {"value": figures["bw_mib_s"], **figures}


def _seq4(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    figures = fio(
        "seq4",
        warm,
        sizes.seq_cap_seconds + 60,
        f"--directory={root / SEQ4_DIR}",
        "--filename_format=seq4.$jobnum",
        "--numjobs=4",
        "--rw=read",
        "--bs=1M",
        f"--size={sizes.seq4_file}",
        *_seq_time(sizes, warm),
    )
    return {"value": figures["bw_mib_s"], **figures}


def _rand(numjobs: int) -> Callable[[Path, Sizes, bool], dict[str, Any]]:
    def run(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
        figures = fio(
            f"rand{numjobs}",
            warm,
            sizes.rand_seconds + 60,
            f"--filename={root / BIG}",
            "--rw=randread",
            "--bs=4k",
            f"--numjobs={numjobs}",
            f"--size={sizes.big}",
            "--time_based",
            f"--runtime={sizes.rand_seconds}",
        )
        return {"value": figures["iops"], **figures}

    return run


# -- plain tools ------------------------------------------------------------------------


def _timed(cmd: list[str], what: str) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise BenchError(f"{what} failed ({done.returncode}): {last[0]}")
    return elapsed


def _small(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    files = small_files(root, sizes)
    elapsed = _timed(["cat", *map(str, files)], "cat of the small files")
    return {
        "value": round(len(files) / elapsed),
        "files": len(files),
        "mib_s": round(len(files) * sizes.small_size / MiB / elapsed, 1),
        "seconds": round(elapsed, 3),
    }


def _small8(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    """READERS ``cat`` processes at once, each over its own run of consecutive
    files (as a program reading a directory's files one after another would),
    timed until the last one is done."""
    files = small8_files(root, sizes)
    n = len(files)
    runs = [files[i * n // READERS : (i + 1) * n // READERS] for i in range(READERS)]
    runs = [run for run in runs if run]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            ["cat", *map(str, run)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for run in runs
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode != 0:
            last = err.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
            raise BenchError(f"cat of the small files failed ({proc.returncode}): {last[0]}")
    return {
        "value": round(len(files) / elapsed),
        "files": len(files),
        "readers": len(runs),
        "mib_s": round(len(files) * sizes.small8_size / MiB / elapsed, 1),
        "seconds": round(elapsed, 3),
    }


def _bigdir(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    """``ls -l`` of the big directory (a readdir and a stat of every entry);
    the entries are counted from its output, so a listing cut short shows."""
    start = time.perf_counter()
    done = subprocess.run(
        ["ls", "-l", str(root / BIG_DIR)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["?"]
        raise BenchError(f"ls -l of the big directory failed ({done.returncode}): {last[0]}")
    entries = done.stdout.count(b"\n") - 1  # less ls's "total" line
    return {
        "value": round(entries / elapsed),
        "entries": entries,
        "seconds": round(elapsed, 3),
    }


def _metadata(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    elapsed = _timed(["ls", "-lR", str(root / TREE_DIR)], "ls -lR")
    return {
        "value": round(sizes.tree_entries / elapsed),
        "entries": sizes.tree_entries,
        "seconds": round(elapsed, 3),
    }


def _ttfb(root: Path, sizes: Sizes, warm: bool) -> dict[str, Any]:
    start = time.perf_counter()
    fd = os.open(root / BIG, os.O_RDONLY)
    try:
        got = os.read(fd, FIRST_BYTES)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
    if len(got) != FIRST_BYTES:
        raise BenchError(f"first read of {root / BIG} returned {len(got)} bytes")
    return {"value": round(elapsed * 1000, 3)}


# -- filling caches --------------------------------------------------------------------


def read_file(path: Path, limit: int | None = None) -> int:
    """Read *path* (up to *limit* bytes) in 1 MiB reads; the bytes read."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while limit is None or total < limit:
            n = f.readinto(view)
            if not n:
                break
            total += n
    return total


def _fill_big(root: Path, sizes: Sizes) -> None:
    read_file(root / BIG)


def _fill_seq4(root: Path, sizes: Sizes) -> None:
    for path in seq4_files(root):
        read_file(path)


def _fill_small(root: Path, sizes: Sizes) -> None:
    for path in small_files(root, sizes):
        read_file(path)


def _fill_small8(root: Path, sizes: Sizes) -> None:
    for path in small8_files(root, sizes):
        read_file(path)


def _fill_bigdir(root: Path, sizes: Sizes) -> None:
    with os.scandir(root / BIG_DIR) as entries:
        for entry in entries:
            entry.stat(follow_symlinks=False)


def _fill_tree(root: Path, sizes: Sizes) -> None:
    for dirpath, dirnames, filenames in os.walk(root / TREE_DIR):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))


def _fill_ttfb(root: Path, sizes: Sizes) -> None:
    read_file(root / BIG, TTFB_FILL)


def _big(sizes: Sizes) -> int:
    return sizes.big


JOBS = [
    Job("seq1m_j1", "seq read 1M, 1 job", "MiB/s", True, _seq1, _fill_big, _big),
    Job(
        "seq1m_j4",
        "seq read 1M, 4 jobs/files",
        "MiB/s",
        True,
        _seq4,
        _fill_seq4,
        lambda sizes: 4 * sizes.seq4_file,
    ),
    Job("rand4k_j1", "rand read 4k, 1 job", "IOPS", True, _rand(1), _fill_big, _big),
    Job("rand4k_j4", "rand read 4k, 4 jobs", "IOPS", True, _rand(4), _fill_big, _big),
    Job(
        "small",
        "small files (read all)",
        "files/s",
        True,
        _small,
        _fill_small,
        lambda sizes: sizes.small_count * sizes.small_size,
    ),
    Job(
        "small8",
        f"small files, {READERS} parallel readers",
        "files/s",
        True,
        _small8,
        _fill_small8,
        lambda sizes: sizes.small8_count * sizes.small8_size,
    ),
    Job(
        "metadata",
        "ls -lR (stat every entry)",
        "entries/s",
        True,
        _metadata,
        _fill_tree,
        lambda sizes: 0,
    ),
    Job(
        "bigdir",
        "ls -l of one big directory",
        "entries/s",
        True,
        _bigdir,
        _fill_bigdir,
        lambda sizes: 0,
    ),
    Job(
        "ttfb",
        "time to first byte, big file",
        "ms",
        False,
        _ttfb,
        _fill_ttfb,
        lambda sizes: FIRST_BYTES,
    ),
]
