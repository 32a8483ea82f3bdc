"""What the suite reads: sizes per mode, and the data it makes itself.

The data lives in ``<workdir>/data-<mode>/`` and is kept between runs; a
manifest records how it was made, so a change of sizes remakes it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30

BIG = "big.bin"
SEQ4_DIR = "seq4"
SMALL_DIR = "small"
SMALL8_DIR = "small8"
TREE_DIR = "tree"
BIG_DIR = "bigdir"
MANIFEST = ".bench-manifest.json"
# the fields of Sizes that shape the data (the others are durations)
DATA_FIELDS = (
    "big",
    "seq4_file",
    "small_count",
    "small_size",
    "small8_count",
    "small8_size",
    "tree_dirs",
    "tree_files_per_dir",
    "bigdir_entries",
)


@dataclass(frozen=True)
class Sizes:
    """How much data and time each part of the run uses."""

    mode: str
    big: int  # the big file: seq x1, rand, time to first byte, throttled
    seq4_file: int  # each of the 4 files of seq x4
    small_count: int
    small_size: int
    small8_count: int  # the files the 8 parallel readers share
    small8_size: int
    tree_dirs: int  # the tree has tree_dirs * tree_files_per_dir entries
    tree_files_per_dir: int
    bigdir_entries: int  # the one big directory, local source
    s3_bigdir_entries: int  # its first entries, the big directory of the S3 bucket
    rand_seconds: int  # time_based rand jobs
    seq_cap_seconds: int  # a seq job stops here even if the file is not read through
    warm_seq_seconds: int  # warm seq jobs loop over their files this long
    throttled_seconds: int  # cachefs cold read through the throttled backend
    naive_bytes: int  # the naive single-stream read through the throttled backend
    moto_object: int  # the object on the moto-served bucket (the big file's first bytes)
    moto_seconds: int  # each read of it stops here even if the object is not read through
    rounds: int  # how many times the measurements of suite.ROUNDS are taken (--rounds)

    @property
    def tree_entries(self) -> int:
        return self.tree_dirs * self.tree_files_per_dir


FULL = Sizes(
    mode="full",
    big=GiB,
    seq4_file=256 * MiB,
    small_count=2000,
    small_size=64 << 10,
    small8_count=4000,
    small8_size=16 << 10,
    tree_dirs=100,
    tree_files_per_dir=100,  # the directory itself and 99 files
    bigdir_entries=100_000,
    # hadro lists a directory in pages of 1,000, each a walk and a stat of the
    # whole directory: 100,000 entries take 105 s to list, 10,000 about 1 s
    s3_bigdir_entries=10_000,
    rand_seconds=10,
    seq_cap_seconds=30,
    warm_seq_seconds=3,
    throttled_seconds=10,
    naive_bytes=192 * MiB,
    moto_object=256 * MiB,
    moto_seconds=12,
    rounds=3,
)

QUICK = Sizes(
    mode="quick",
    big=128 * MiB,
    seq4_file=64 * MiB,
    small_count=500,
    small_size=64 << 10,
    small8_count=400,
    small8_size=16 << 10,
    tree_dirs=20,
    tree_files_per_dir=100,
    bigdir_entries=5000,
    s3_bigdir_entries=2000,
    rand_seconds=1,
    seq_cap_seconds=10,
    warm_seq_seconds=1,
    throttled_seconds=3,
    naive_bytes=48 * MiB,
    moto_object=64 * MiB,
    moto_seconds=10,
    rounds=1,
)


def seq4_files(root: Path) -> list[Path]:
    """The files of seq x4, named as fio's ``filename_format=seq4.$jobnum`` makes them."""
    return [root / SEQ4_DIR / f"seq4.{i}" for i in range(4)]


def small_files(root: Path, sizes: Sizes) -> list[Path]:
    return [root / SMALL_DIR / f"f{i:05d}" for i in range(sizes.small_count)]


def small8_files(root: Path, sizes: Sizes) -> list[Path]:
    return [root / SMALL8_DIR / f"f{i:05d}" for i in range(sizes.small8_count)]


def bigdir_names(count: int) -> list[str]:
    """The first *count* entries of the big directory, in the order made."""
    return [f"e{i:06d}" for i in range(count)]


def _random_file(path: Path, size: int) -> None:
    chunk = 16 * MiB
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
        os.fsync(f.fileno())
    tmp.rename(path)


def _tree(root: Path, sizes: Sizes) -> None:
    for d in range(sizes.tree_dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir(parents=True)
        for i in range(sizes.tree_files_per_dir - 1):
            (sub / f"e{i:03d}").write_bytes(b"%d\n" % i)


def ensure_data(workdir: Path, sizes: Sizes, say: Callable[[str], None]) -> Path:
    """The data directory for *sizes*, made (or remade) if needed."""
    root = workdir / f"data-{sizes.mode}"
    manifest = root / MANIFEST
    wanted = {k: v for k, v in asdict(sizes).items() if k in DATA_FIELDS}
    try:
        made = json.loads(manifest.read_text())
        if {k: made.get(k) for k in DATA_FIELDS} == wanted:
            return root
    except (OSError, ValueError):
        pass
    say(f"making the data in {root} (once)")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    _random_file(root / BIG, sizes.big)
    (root / SEQ4_DIR).mkdir()
    for path in seq4_files(root):
        _random_file(path, sizes.seq4_file)
    (root / SMALL_DIR).mkdir()
    for path in small_files(root, sizes):
        path.write_bytes(os.urandom(sizes.small_size))
    (root / SMALL8_DIR).mkdir()
    for path in small8_files(root, sizes):
        path.write_bytes(os.urandom(sizes.small8_size))
    _tree(root / TREE_DIR, sizes)
    (root / BIG_DIR).mkdir()
    for name in bigdir_names(sizes.bigdir_entries):
        (root / BIG_DIR / name).write_bytes(name.encode())
    os.sync()
    manifest.write_text(json.dumps(wanted))
    return root
