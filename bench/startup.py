"""Start-up at scale: how long a cache of 1,000,000 blocks takes to open.

    python -m bench.startup [--blocks N] [--files N] [--workdir DIR]

Builds synthetic metadata (every block present, sparse data files of the
right size) with 4 KiB blocks, then opens the cache in a fresh process and
reports the time to open and the memory its in-memory index takes.  The
targets (issue 5): under 2 s and under 100 MB for 1,000,000 blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 4096

_PROBE = r"""
import json, resource, sys, time, tracemalloc
import trio
from backends.memory import MemoryBackend
from cachefs import CacheConfig, open_file_cache

async def main():
    traced = sys.argv[2] == "memory"  # tracing slows allocation: time and memory apart
    if traced:
        tracemalloc.start()
    t0 = time.perf_counter()
    async with open_file_cache(MemoryBackend(), sys.argv[1], CacheConfig(block_size=4096)) as c:
        opened = time.perf_counter() - t0
        current = tracemalloc.get_traced_memory()[0] if traced else None
        stats = c.statistics()
    print(json.dumps({"open_s": opened, "index_bytes": current,
                      "cached_bytes": stats["cached_bytes"],
                      "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))

trio.run(main)
"""


def build(cache_dir: Path, files: int, blocks: int) -> None:
    """A cache dir whose index says every block of every file is present."""
    from cachefs.engine.state.cachedir import lock_cache_dir, open_index
    from cachefs.engine.state.index import CachedFile, row_of

    per_file = blocks // files
    size = per_file * BLOCK
    lock = lock_cache_dir(cache_dir)
    try:
        index = open_index(cache_dir, BLOCK).index
        rows = []
        for i in range(files):
            row_id = i + 1
            cf = CachedFile(
                row_id,
                f"dir{i % 100}/file{i}",
                "v1",
                size,
                0.0,
                0o644,
                bytearray(b"\x01" * per_file),
                hashes=bytearray(b"\x5a" * 32 * per_file),  # as recorded on fills
            )
            rows.append(row_of(cf))
            with open(cache_dir / "data" / str(row_id), "wb") as f:
                f.truncate(size)
        index.write_batch(rows, [])
        index.close()
    finally:
        os.close(lock)


def probe(cache_dir: Path, what: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(cache_dir), what],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def measure(cache_dir: Path) -> dict:
    """Open time (warm page cache, untraced) and index memory (traced), each in a fresh process."""
    probe(cache_dir, "time")
    timed = probe(cache_dir, "time")
    timed["index_bytes"] = probe(cache_dir, "memory")["index_bytes"]
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for files in args.files:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            cache_dir = Path(tmp)
            t0 = time.perf_counter()
            build(cache_dir, files, args.blocks)
            built = time.perf_counter() - t0
            m = measure(cache_dir)
            m.update(files=files, blocks=args.blocks, build_s=round(built, 1))
            results.append(m)
            print(
                f"{args.blocks:,} blocks in {files:,} files: open {m['open_s']:.2f} s "
                f"(target < 2 s), index {m['index_bytes'] / 1e6:.1f} MB (target < 100 MB), "
                f"process peak RSS {m['max_rss_kb'] / 1024:.0f} MiB"
            )
            shutil.rmtree(cache_dir, ignore_errors=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "startup.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
