"""The S3 source of the speed jobs: a bucket on a hadro server, mounted by
cachefs and by rclone.

moto answers one request at a time, slowly, so it measures moto; it stays where
behaviour is tested (tests/s3server.py) and for the cold read of one big
object (bench/s3like.py).  The small-file and big-directory jobs read from
hadro (PyPI: a read-only, S3-compatible server of a local directory, FastAPI
on uvicorn): GET with ranges, HEAD, ListObjects v1 and v2, ETags from size
and mtime; how much faster than moto and npm's s3rver it is: docs/benchmarks.md.
It ignores If-Match, which cachefs does not rely on (it
checks the ETag of every response itself), and nothing changes under the
benchmark.

hadro walks and stats the whole directory for every page of a listing, so
the bucket's big directory holds only the first ``s3_bigdir_entries`` of the
local one.  The bucket is made of hard links to the data the local jobs read
(``small8/``, ``bigdir/``), made again for every run; hadro is installed
once, with pip, into a venv of its own under the work dir.

The daemon of each mount gets the bench's own keys and no other ``AWS_*``
variable of the user's (an ``AWS_CA_BUNDLE`` stops rclone's S3 client).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.dataset import BIG_DIR, SMALL8_DIR, Sizes, bigdir_names, small8_files
from bench.system import BenchError, free_port, serve_on
from bench.targets import CachefsTarget, RcloneTarget

HADRO = "hadro==0.7.1"
INSTALL_DEADLINE = 600.0
START_DEADLINE = 30.0
BUCKET = "bench"
REMOTE = "benchs3"  # rclone's name for the bucket's server
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
REGION = "us-east-1"
# the jobs an S3 target measures, under every condition
S3_JOBS = frozenset({"small8", "bigdir"})


@dataclass(frozen=True)
class S3Bucket:
    """A bucket of the running server: what a mount needs to reach it."""

    endpoint: str
    name: str


def hadro_exe(workdir: Path, say: Callable[[str], None]) -> Path:
    """hadro, installed into ``<workdir>/tools/hadro`` the first time."""
    venv = workdir / "tools" / "hadro"
    exe = venv / "bin" / "hadro"
    if exe.exists():
        return exe
    say(f"installing {HADRO} into {venv} (once)")
    shutil.rmtree(venv, ignore_errors=True)
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--quiet", HADRO],
    ):
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=INSTALL_DEADLINE,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"installing {HADRO} took over {INSTALL_DEADLINE:g} s") from None
        if done.returncode != 0:
            last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["?"]
            raise BenchError(f"installing {HADRO} failed: {last[0]}")
    return exe


def _bucket(source: Path, served: Path, sizes: Sizes) -> None:
    """``served/BUCKET``: hard links to the small files of the 8 readers and to the
    first entries of the big directory."""
    shutil.rmtree(served, ignore_errors=True)
    bucket = served / BUCKET
    (bucket / SMALL8_DIR).mkdir(parents=True)
    (bucket / BIG_DIR).mkdir()
    pairs = [(path, bucket / SMALL8_DIR / path.name) for path in small8_files(source, sizes)]
    pairs += [
        (source / BIG_DIR / name, bucket / BIG_DIR / name)
        for name in bigdir_names(sizes.s3_bigdir_entries)
    ]
    for src, dst in pairs:
        try:
            os.link(src, dst)
        except OSError:  # another file system
            shutil.copy2(src, dst)


@contextmanager
def serve_bucket(
    source: Path, workdir: Path, sizes: Sizes, say: Callable[[str], None]
) -> Iterator[S3Bucket]:
    """The bucket, served by hadro on 127.0.0.1 while within."""
    exe = hadro_exe(workdir, say)
    served = workdir / f"s3-{sizes.mode}"
    _bucket(source, served, sizes)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [str(exe), str(served), "--port", str(port), "--region", REGION]
    with serve_on([*cmd, "--log-level", "warning"], port, logs / "hadro.log", START_DEADLINE):
        yield S3Bucket(f"http://127.0.0.1:{port}", BUCKET)


def _without_aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


class CachefsS3Target(CachefsTarget):
    """``cachefs mount s3://BUCKET MNT --s3-endpoint URL``."""

    name = "cachefs-s3"

    def __init__(self, source: Path, workdir: Path, bucket: S3Bucket) -> None:
        super().__init__(source, workdir)
        self.bucket = bucket

    def measures(self, job: str, condition: str) -> bool:
        return job in S3_JOBS

    def source_arg(self) -> str:
        return f"s3://{self.bucket.name}"

    def mount_options(self) -> list[str]:
        return [f"--s3-endpoint={self.bucket.endpoint}"]

    def environment(self) -> dict[str, str]:
        return {**_without_aws(), **KEYS, "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


class RcloneS3Target(RcloneTarget):
    """``rclone mount benchs3:BUCKET MNT --vfs-cache-mode full``, the remote
    given by ``RCLONE_CONFIG_BENCHS3_*`` (type s3, provider Other)."""

    name = "rclone-s3"

    def __init__(self, source: Path, workdir: Path, bucket: S3Bucket) -> None:
        super().__init__(source, workdir)
        self.bucket = bucket

    def measures(self, job: str, condition: str) -> bool:
        return job in S3_JOBS

    def remote(self) -> str:
        return f"{REMOTE}:{self.bucket.name}"

    def environment(self) -> dict[str, str]:
        prefix = f"RCLONE_CONFIG_{REMOTE.upper()}_"
        remote = {
            "TYPE": "s3",
            "PROVIDER": "Other",
            "ENDPOINT": self.bucket.endpoint,
            "REGION": REGION,
            "ACCESS_KEY_ID": KEYS["AWS_ACCESS_KEY_ID"],
            "SECRET_ACCESS_KEY": KEYS["AWS_SECRET_ACCESS_KEY"],
        }
        return {**_without_aws(), **{prefix + k: v for k, v in remote.items()}}


S3_TARGETS: dict[str, type[CachefsS3Target] | type[RcloneS3Target]] = {
    "cachefs-s3": CachefsS3Target,
    "rclone-s3": RcloneS3Target,
}
