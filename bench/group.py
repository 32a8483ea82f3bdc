"""``python -m bench.group``: N machines reading one dataset, each on its own or as a group.

Starts and stops by itself, on 127.0.0.1: a redis-server (the group's
records), and for each group run a fresh moto_server holding the hosted
cache (``s3://hosted/blocks``).  The origin is a local directory of a few
files (the dataset, made once in the work dir and kept), read through the
mount's ``--throttle LATENCY_MS,MIBPS``, so that it costs what a remote
store would.

For each N of ``--nodes`` (1, 2, 4) two runs:

- independent: N mounts, each with its own cache, no group;
- group: N mounts in one group (one member and groups dir each), with
  ``--shared-cache s3://hosted/blocks``.

Every node is a real ``cachefs mount`` (a daemon) with its own cache dir and
``--trace``.  Nodes read the whole dataset one after another (node 1 cold,
then node 2, ...), sequentially in 1 MiB reads, and every byte is checked
against the source.  In the group, before the next node reads, the bench
waits until the node before has uploaded what it offered (``cachefs stats``:
``offer_queue_bytes`` 0) and, for node 1, published a content record for
every file (unless it dropped offers: a file with a block that was never
hashed gets none), and until the next node holds every content record the
node before holds (in its own records database); every wait polls with a
deadline and says so if it ran out.

Reported per N and run: origin bytes (the ReadData calls in the traces, which
record the origin below the hosted cache) over the dataset's size, the wall
time of each node's read, and the second node's speedup over the first.
Targets (issue 21): in the group, origin bytes at most 1.1 x the dataset
whatever N, and the second node's cold read at least 3 x faster than the
first's.  Results go to stdout (and ``--json FILE``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from backends.throttled import parse_throttle
from backends.trace import read_trace
from bench.dataset import MiB
from bench.records import Redis
from bench.s3like import moto_environment, moto_server
from bench.suite import default_workdir
from bench.system import REPO, BenchError, cachefs_cmd
from bench.targets import CachefsTarget
from cachefs.errors import ConfigError, InvalidSize
from cachefs.group.formats import CONTENT_INFO_TYPE
from cachefs.records.credentials import Role
from cachefs.records.groups import create_group, invite, join
from cachefs.records.identity import Identity
from cachefs.units import format_size, parse_size

GROUP = "bench"
HOSTED_BUCKET = "hosted"
HOSTED_URL = f"s3://{HOSTED_BUCKET}/blocks"
# 20 ms to the first byte, 4 MiB/s per connection: an origin far away (another
# region, a link with capped egress).  On a long sequential read the mount's
# readahead keeps 6 to 8 connections busy, so 1 GiB comes at about 25 MiB/s,
# in about 40 s.  The hosted cache, moto on loopback and sharing the 2 cores,
# serves 140-180 MiB/s and takes uploads at about 120 MiB/s: an origin faster
# than that makes the first node drop offers (docs/benchmarks.md).
DEFAULT_THROTTLE = "20,4"
DEFAULT_SIZE = "1G"
DEFAULT_FILES = 4
DEFAULT_NODES = "1,2,4"
# uploads, record replication: a deadline, never a measure
SETTLE_DEADLINE = 120.0
POLL = 0.2


# -- the dataset -------------------------------------------------------------------------


def ensure_dataset(workdir: Path, size: int, files: int, say: Callable[[str], None]) -> Path:
    """``<workdir>/group-data-<size>/part-<i>.bin``: *files* random files of
    *size* bytes in all (made once, kept while the manifest matches)."""
    root = workdir / f"group-data-{size}-{files}"
    manifest = root / "manifest.json"
    try:
        made = json.loads(manifest.read_text())
        if made.get("size") == size and len(made.get("files", {})) == files:
            return root
    except (OSError, ValueError):
        pass
    say(f"making the dataset in {root} (once)")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sums = {}
    each, rest = divmod(size, files)
    for i in range(files):
        name = f"part-{i}.bin"
        left = each + (rest if i == files - 1 else 0)
        crc = 0
        with open(root / name, "wb") as f:
            while left:
                chunk = os.urandom(min(16 * MiB, left))
                crc = zlib.crc32(chunk, crc)
                f.write(chunk)
                left -= len(chunk)
        sums[name] = crc
    os.sync()
    manifest.write_text(json.dumps({"size": size, "files": sums}))
    return root


def dataset_files(root: Path) -> dict[str, int]:
    """The dataset's file names and their CRC-32."""
    files: dict[str, int] = json.loads((root / "manifest.json").read_text())["files"]
    return files


def read_dataset(mnt: Path, files: dict[str, int]) -> float:
    """Read every file through *mnt*, in order, 1 MiB at a time; the seconds
    taken.  BenchError if any file's bytes differ from the source's."""
    buf = bytearray(MiB)
    view = memoryview(buf)
    start = time.perf_counter()
    for name, expected in files.items():
        crc = 0
        with open(mnt / name, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                crc = zlib.crc32(view[:n], crc)
        if crc != expected:
            raise BenchError(f"{mnt / name}: the bytes read differ from the source's")
    return time.perf_counter() - start


# -- the group ---------------------------------------------------------------------------


def make_group(root: Path, nodes: int, engine: str) -> list[Path]:
    """A group of *nodes* members, one groups directory each: the first its
    creator (an administrator), the others members it invited."""
    now = datetime.now(UTC)
    dirs = []
    membership = admin = None
    for k in range(nodes):
        d = root / f"member{k + 1}"
        d.mkdir(parents=True, mode=0o700)
        me = Identity.load_or_create(d / "identity.key", f"node{k + 1}")
        if membership is None or admin is None:
            admin = me
            membership = create_group(d, GROUP, me, engine=engine, max_record_size=1 << 20, now=now)
        else:
            blob = invite(
                membership,
                admin,
                me.public_key,
                role=Role.MEMBER,
                name=f"node{k + 1}",
                expires=now + timedelta(days=1),
                now=now,
            )
            join(d, blob, me, engine=engine)
        dirs.append(d)
    return dirs


def content_files(groups_dir: Path) -> set[str]:
    """The files whose content records the member of *groups_dir* holds in its
    own database (as its mount replicated them)."""
    done = subprocess.run(
        cachefs_cmd(
            "records",
            "list",
            "--offline",
            "--groups-dir",
            str(groups_dir),
            "--group",
            GROUP,
            "--type",
            str(CONTENT_INFO_TYPE),
            "--json",
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"cachefs records list: {done.stderr.strip()}")
    files = set()
    for line in done.stdout.splitlines():
        if line.strip():
            record = json.loads(line)
            files.add(json.loads(base64.b64decode(record["data"]))["file"])
    return files


def holds_records(groups_dir: Path, before: Path) -> bool:
    """Whether the member of *groups_dir* holds every content record that the
    member of *before* (the node that read before it) holds."""
    return content_files(groups_dir) >= content_files(before)


def wait_until(what: str, done: Callable[[], bool], say: Callable[[str], None]) -> float | None:
    """Poll *done* until it holds; the seconds waited, or None (said) if
    SETTLE_DEADLINE passed first."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > SETTLE_DEADLINE:
            say(f"  gave up waiting for {what} after {SETTLE_DEADLINE:g} s")
            return None
        time.sleep(POLL)
    return time.monotonic() - start


# -- the nodes ---------------------------------------------------------------------------


class Node(CachefsTarget):
    """One machine: ``cachefs mount DATASET MNT --throttle SPEC --trace FILE``,
    in the group with the hosted cache when *group_dir* is given."""

    def __init__(
        self,
        source: Path,
        workdir: Path,
        name: str,
        throttle: str,
        group_dir: Path | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(source, workdir)
        self.name = name
        self.throttle = throttle
        self.group_dir = group_dir
        self.endpoint = endpoint
        self.trace = workdir / "traces" / f"{name}.jsonl"

    @contextmanager
    def fresh(self) -> Iterator[None]:
        self.trace.parent.mkdir(parents=True, exist_ok=True)
        self.trace.unlink(missing_ok=True)  # the mount makes it anew, mode 600
        with super().fresh():
            yield

    def mount_options(self) -> list[str]:
        options = [f"--throttle={self.throttle}", f"--trace={self.trace}"]
        if self.group_dir is not None:
            assert self.endpoint is not None
            options += [
                f"--group={GROUP}",
                f"--groups-dir={self.group_dir}",
                f"--shared-cache={HOSTED_URL}",
                f"--shared-cache-endpoint={self.endpoint}",
            ]
        return options

    def origin_bytes(self) -> int:
        """Bytes read from the origin so far, as the trace says."""
        return sum(
            r["bytes_read"]
            for r in read_trace(self.trace)
            if r["result"] in ("SUCCESS", "PARTIAL") and isinstance(r["bytes_read"], int)
        )

    def group(self) -> dict[str, Any]:
        group: dict[str, Any] = self.counters().get("group") or {}
        return group


def create_bucket(endpoint: str, bucket: str) -> None:
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != 200:
            raise BenchError(f"creating bucket {bucket}: HTTP {response.status}")


# -- one run -----------------------------------------------------------------------------


def run_nodes(
    source: Path,
    workdir: Path,
    nodes: int,
    throttle: str,
    redis: Redis | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """N nodes reading the dataset one after another; in a group with a hosted
    cache when *redis* is given, else each on its own."""
    files = dataset_files(source)
    size = sum((source / name).stat().st_size for name in files)
    kind = "group" if redis is not None else "independent"
    run_dir = workdir / f"{kind}-n{nodes}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out: dict[str, Any] = {"nodes": nodes, "run": kind, "dataset_bytes": size, "node": []}
    with ExitStack() as stack:
        dirs: list[Path | None] = [None] * nodes
        endpoint = None
        if redis is not None:
            endpoint = stack.enter_context(moto_server(run_dir / "moto.log"))
            create_bucket(endpoint, HOSTED_BUCKET)
            dirs = list(make_group(run_dir / "groups", nodes, redis.url))
        for k in range(nodes):
            node = Node(source, run_dir, f"node{k + 1}", throttle, dirs[k], endpoint)
            stack.enter_context(node.fresh())
            figures: dict[str, Any] = {"node": k + 1}
            group_dir = dirs[k]
            before = dirs[k - 1] if k else None
            if group_dir is not None and before is not None:
                figures["records_wait_s"] = wait_until(
                    f"node {k + 1} holding node {k}'s content records",
                    partial(holds_records, group_dir, before),
                    say,
                )
            figures["read_s"] = round(read_dataset(node.root, files), 3)
            if group_dir is not None:

                def settled(node: Node = node, first: bool = k == 0) -> bool:
                    g = node.group()
                    uploaded = g.get("offer_queue_bytes") == 0
                    if not first:
                        return uploaded
                    published = g.get("content_published", 0) >= len(files)
                    return uploaded and (published or g.get("dropped_offers", 0) > 0)

                figures["settle_s"] = wait_until(f"node {k + 1}'s uploads", settled, say)
                figures["group"] = {
                    key: value for key, value in node.group().items() if key != "group_pins"
                }
            figures["origin_bytes"] = node.origin_bytes()
            figures["mib_s"] = round(size / MiB / figures["read_s"], 1)
            out["node"].append(figures)
            say(_node_line(figures, size))
    times = [n["read_s"] for n in out["node"]]
    out["origin_bytes"] = sum(n["origin_bytes"] for n in out["node"])
    out["origin_over_dataset"] = round(out["origin_bytes"] / size, 3)
    out["second_speedup"] = round(times[0] / times[1], 2) if len(times) > 1 else None
    return out


def _node_line(figures: dict[str, Any], size: int) -> str:
    line = (
        f"  node {figures['node']}: {figures['read_s']:.1f} s ({figures['mib_s']} MiB/s), "
        f"origin {figures['origin_bytes'] / size:.2f} x the dataset"
    )
    g = figures.get("group")
    if g:
        line += (
            f", hosted {format_size(g['hosted_bytes'])}, uploaded {g['uploaded']}, "
            f"dropped offers {g['dropped_offers']}, content records published "
            f"{g['content_published']}, used {g['content_used']}"
        )
    return line


# -- the report --------------------------------------------------------------------------


def table(runs: list[dict[str, Any]]) -> str:
    rows = [
        "| N | run | origin / dataset | each node's read (s), in order | 2nd node speedup |",
        "|---:|---|---:|---|---:|",
    ]
    for r in runs:
        times = " / ".join(f"{n['read_s']:.1f}" for n in r["node"])
        speedup = "" if r["second_speedup"] is None else f"{r['second_speedup']:.2f} x"
        rows.append(
            f"| {r['nodes']} | {r['run']} | {r['origin_over_dataset']:.2f} | {times} | {speedup} |"
        )
    return "\n".join(rows)


def targets(runs: list[dict[str, Any]]) -> list[tuple[str, str, bool]]:
    """(goal, figure, met) for the group runs."""
    out = []
    for r in runs:
        if r["run"] != "group":
            continue
        ratio = r["origin_over_dataset"]
        out.append(
            (f"N={r['nodes']} group: origin bytes <= 1.1 x dataset", f"{ratio}", ratio <= 1.1)
        )
        if r["second_speedup"] is not None:
            s = r["second_speedup"]
            out.append((f"N={r['nodes']} group: 2nd node >= 3 x faster than 1st", f"{s}", s >= 3))
    return out


# -- main --------------------------------------------------------------------------------


def _nodes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers, e.g. 1,2,4") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each N must be at least 1")
    return values


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except InvalidSize as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < MiB:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1M")
    return value


def _throttle(text: str) -> str:
    try:
        parse_throttle(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.group",
        description="N = 1, 2, 4 cachefs mounts reading the same dataset through a throttled "
        "origin, one after another: each with its own cache, then in a group sharing a "
        "hosted cache (moto S3, Redis, all on 127.0.0.1, started and stopped here).",
    )
    parser.add_argument(
        "--size", type=_size, default=parse_size(DEFAULT_SIZE), help="dataset size (default 1G)"
    )
    parser.add_argument(
        "--files", type=int, default=DEFAULT_FILES, help="files in the dataset (default 4)"
    )
    parser.add_argument(
        "--throttle",
        type=_throttle,
        default=DEFAULT_THROTTLE,
        metavar="LATENCY_MS,MIBPS",
        help=f"the origin, as the mount's --throttle (default {DEFAULT_THROTTLE})",
    )
    parser.add_argument(
        "--nodes", type=_nodes, default=_nodes(DEFAULT_NODES), help="the Ns (default 1,2,4)"
    )
    parser.add_argument(
        "--runs",
        default="independent,group",
        help="independent, group or both (default independent,group)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=default_workdir(),
        help="dataset, mount points, caches, logs (default: %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    if not kinds or set(kinds) - {"independent", "group"}:
        sys.exit(f"bench.group: --runs {args.runs!r}: independent, group or both")
    if args.files < 1:
        sys.exit("bench.group: --files must be at least 1")
    if not os.path.exists("/dev/fuse"):
        sys.exit("bench.group: /dev/fuse is missing (apt-get install fuse3)")

    def say(text: str) -> None:
        print(text, flush=True)

    started = time.perf_counter()
    workdir: Path = args.workdir.resolve()
    work = workdir / "group"
    latency, bandwidth = parse_throttle(args.throttle)
    out: dict[str, Any] = {
        "throttle": {"latency_ms": latency * 1000, "mib_s_per_connection": bandwidth / MiB},
        "hosted_cache": HOSTED_URL + " on moto_server, 127.0.0.1",
        "runs": [],
    }
    try:
        source = ensure_dataset(workdir, args.size, args.files, say)
        out["dataset"] = {"bytes": args.size, "files": args.files}
        work.mkdir(parents=True, exist_ok=True)
        with ExitStack() as stack:
            redis = None
            if "group" in kinds:
                redis = Redis(work)
                stack.callback(redis.stop)
            stack.enter_context(moto_environment())
            for n in args.nodes:
                for kind in kinds:
                    say(f"N={n}, {kind}:")
                    run = run_nodes(
                        source, work, n, args.throttle, redis if kind == "group" else None, say
                    )
                    out["runs"].append(run)
    except BenchError as e:
        sys.exit(f"bench.group: {e}")
    out["wall_s"] = round(time.perf_counter() - started, 1)
    print()
    print(
        f"Dataset {format_size(args.size)} in {args.files} files; origin throttled to "
        f"{latency * 1000:g} ms, {bandwidth / MiB:g} MiB/s per connection; "
        f"{out['wall_s']:.0f} s in all."
    )
    print()
    print(table(out["runs"]))
    goals = targets(out["runs"])
    if goals:
        print()
        for goal, figure, met in goals:
            print(f"{'PASS' if met else 'MISS'}  {goal}: {figure}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
