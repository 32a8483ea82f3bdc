"""``python -m bench.records``: the group record store's figures.

Starts its own redis-server on a free 127.0.0.1 port (stopped at the end),
makes a group of two members in a temporary directory, and measures:

- local add rate: records added per second by one member (no engine), each
  signed, checked, indexed and committed to its database;
- search: a one-clause search among N records (100,000 by default) with 5
  attributes each, median and 95th percentile over repeated queries;
- add-to-event latency: one member adds, the other's watcher gets the event,
  through Redis on loopback (median and 95th percentile);
- catch-up: a member offline while another makes 10,000 changes reconnects
  and is up to date in how long.

Targets (issue 20): search < 50 ms, add-to-event p50 < 50 ms, catch-up of
10,000 changes < 5 s.  Results go to stdout (and ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from cachefs.records import ChangeType, Record, open_group
from cachefs.records.credentials import Role
from cachefs.records.groups import create_group, invite, join
from cachefs.records.identity import Identity
from cachefs.records.model import encode_record, record_id

GROUP = "bench"
TYPE = uuid.UUID("0b0b0b0b-0000-4000-8000-000000000001")


class Redis:
    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            sys.exit("bench.records: redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                sys.exit("bench.records: redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def make_members(root: Path, engine: str) -> tuple[Path, Path]:
    now = datetime.now(UTC)
    d0, d1 = root / "m0", root / "m1"
    for d in (d0, d1):
        d.mkdir(mode=0o700)
    admin = Identity.load_or_create(d0 / "identity.key", "admin")
    member = Identity.load_or_create(d1 / "identity.key", "member")
    membership = create_group(d0, GROUP, admin, engine=engine, max_record_size=1 << 20, now=now)
    blob = invite(
        membership,
        admin,
        member.public_key,
        role=Role.MEMBER,
        name="member",
        expires=now + timedelta(days=1),
        now=now,
    )
    join(d1, blob, member, engine=engine)
    return d0, d1


def attrs(i: int) -> str:
    return (
        "<attributes>"
        f'<attribute name="n" type="int">{i}</attribute>'
        f'<attribute name="bucket" type="int">{i % 10_000}</attribute>'
        f'<attribute name="owner" type="string">user{i % 1000}</attribute>'
        f'<attribute name="path" type="string">/data/set{i % 100}/file{i}.bin</attribute>'
        f'<attribute name="when" type="date">2026-12-{1 + i % 28:02d}T00:00:00Z</attribute>'
        "</attributes>"
    )


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def bench(root: Path, redis: Redis, records: int, out: dict[str, Any]) -> None:
    d0, d1 = make_members(root, redis.url)
    expires = datetime.now(UTC) + timedelta(hours=12)

    # -- local add rate ----------------------------------------------------------------
    async with open_group(GROUP, groups_dir=d0, replicate=False) as g0:
        n = 2000
        t = time.perf_counter()
        for i in range(n):
            await g0.records.add(Record(type=TYPE, expires=expires, attributes=attrs(i)))
        out["add_per_s"] = n / (time.perf_counter() - t)
        print(f"local add: {out['add_per_s']:,.0f} records/s ({n} adds)")

        # -- populate for the search: signed records applied in batches ----------------
        t = time.perf_counter()
        me = g0.identity
        batch: list[tuple[bytes, bytes]] = []
        start = g0.records.clock.now()
        for i in range(n, records):
            now = start + timedelta(microseconds=i)  # one id per creation time
            r = Record(
                type=TYPE,
                expires=expires,
                attributes=attrs(i),
                id=record_id(g0.group_id, me.member_id, TYPE, now),
                version=1,
                creator=me.member_id,
                modified_by=me.member_id,
                created=now,
                modified=now,
            )
            body = encode_record(g0.group_id, r)
            batch.append((body, me.sign(body)))
            if len(batch) == 1000:
                await g0.records.arrivals.apply_records(batch)
                batch = []
        await g0.records.arrivals.apply_records(batch)
        fill = time.perf_counter() - t
        print(
            f"populated {records:,} records with 5 attributes in {fill:.1f} s "
            f"({(records - n) / fill:,.0f} records/s checked and stored in batches)"
        )

        queries = {
            "int equal": '<clause attrib="bucket" type="int">{k}</clause>',
            "string prefix": '<clause attrib="path" type="string">/data/set{s}/file{k}*</clause>',
            "int range": '<clause attrib="n" type="int" compare="less">{k}</clause>',
        }
        for name, clause in queries.items():
            times = []
            hits = 0
            for k in range(50):
                key = k * 37 % 1000
                q = "<peersearch>" + clause.format(k=key, s=key % 100) + "</peersearch>"
                t = time.perf_counter()
                hits += len(await g0.records.search(q))
                times.append((time.perf_counter() - t) * 1000)
            label = name.replace(" ", "_")
            out[f"search_{label}_p50_ms"] = statistics.median(times)
            out[f"search_{label}_p95_ms"] = pct(times, 0.95)
            print(
                f"search ({name}) among {records:,}: p50 {statistics.median(times):.1f} ms, "
                f"p95 {pct(times, 0.95):.1f} ms, {hits / 50:.0f} records per answer"
            )

    # -- add-to-event latency through Redis --------------------------------------------
    async with (
        open_group(GROUP, groups_dir=d0) as g0,
        open_group(GROUP, groups_dir=d1) as g1,
    ):
        with trio.fail_after(120):
            await g0.sync(60)
            await g1.sync(60)
        latencies = []
        async with g1.records.events([TYPE]) as events:
            for i in range(200):
                t = time.perf_counter()
                rid = await g0.records.add(Record(type=TYPE, expires=expires, data=b"%d" % i))
                with trio.fail_after(10):
                    async for ev in events:
                        if ev.record_id == rid and ev.change is ChangeType.ADDED:
                            break
                latencies.append((time.perf_counter() - t) * 1000)
        out["event_p50_ms"] = statistics.median(latencies)
        out["event_p95_ms"] = pct(latencies, 0.95)
        print(
            f"add-to-event between two members: p50 {out['event_p50_ms']:.1f} ms, "
            f"p95 {out['event_p95_ms']:.1f} ms (200 adds)"
        )

    # -- catch-up after 10,000 missed changes --------------------------------------------
    changes = 10_000
    async with open_group(GROUP, groups_dir=d0) as g0:
        for i in range(changes):
            await g0.records.add(Record(type=TYPE, expires=expires, data=b"%d" % i))
        with trio.fail_after(300):
            while not await g0.sync(60):
                pass
    t = time.perf_counter()
    async with open_group(GROUP, groups_dir=d1) as g1:
        with trio.fail_after(300):
            await g1.sync(300)
        out["catch_up_s"] = time.perf_counter() - t
        live, _ = await g1.records.count()
    print(
        f"catch-up of {changes:,} missed changes: {out['catch_up_s']:.2f} s "
        f"(the member now holds {live:,} records)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.records", description=__doc__)
    parser.add_argument(
        "--records", type=int, default=100_000, help="records to search among (default 100000)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"records": args.records}
    with tempfile.TemporaryDirectory(prefix="cachefs-bench-records-") as tmp:
        root = Path(tmp)
        redis = Redis(root)
        try:
            trio.run(bench, root, redis, args.records, out)
        finally:
            redis.stop()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
