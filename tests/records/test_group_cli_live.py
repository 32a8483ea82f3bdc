"""The live group on the command line, as an administrator and a member run it
on separate machines (one groups directory each, one Redis): ``group pin`` and
``unpin`` (administrators only), and the nodes and pins ``group status`` shows.
The node status records a mount would publish are added here through the
Python API, as that member."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import wait_for
from groupsrig import GROUP, make_group
from redisserver import RedisServer

from cachefs.group.formats import NODE_STATUS_TYPE, NodeStatus, PinProgress, status_record
from cachefs.records import Record, Role, open_group

REPO = Path(__file__).resolve().parents[2]


def cli(groups_dir: Path, *args: object) -> subprocess.CompletedProcess[str]:
    """``cachefs ARGS`` as the member whose groups directory is *groups_dir*."""
    return subprocess.run(
        [sys.executable, "-m", "cachefs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "CACHEFS_GROUPS_DIR": str(groups_dir)},
        stdin=subprocess.DEVNULL,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stderr == "", done.stderr
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefs") and "error:" in lines[0], lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def status(groups_dir: Path) -> dict[str, Any]:
    shown: dict[str, Any] = json.loads(ok(cli(groups_dir, "group", "status", GROUP, "--json")))
    return shown


def pinned(groups_dir: Path) -> set[str]:
    return {pin["file"] for pin in status(groups_dir)["pins"]}


def add_as(groups_dir: Path, *records: Record) -> None:
    """Add reserved records as that member, and publish them."""

    async def main() -> None:
        async with open_group(GROUP, groups_dir=groups_dir) as group:
            for record in records:
                await group.records.add(record, internal=True)
            assert await group.sync(20.0)

    trio.run(main)


@pytest.fixture
def members(tmp_path: Path, redis_server: RedisServer) -> list[Path]:
    """The groups directories of an administrator and a member, sharing an engine."""
    return make_group(tmp_path / "groups", (Role.MEMBER,), engine=redis_server.url)


# -- pins ----------------------------------------------------------------------------------


def test_a_pin_reaches_every_member_and_an_unpin_removes_it(members: list[Path]) -> None:
    admin, member = members
    admin_id = status(admin)["member"]["id"]
    out = ok(cli(admin, "group", "pin", GROUP, "/data/a.bin", "./b.bin"))
    assert "pinned data/a.bin until" in out and "pinned b.bin until" in out

    seen = status(member)  # another machine: through the engine
    assert {p["file"] for p in seen["pins"]} == {"data/a.bin", "b.bin"}
    assert all(p["pinned_by"] == {"id": admin_id, "name": "admin"} for p in seen["pins"])
    text = ok(cli(member, "group", "status", GROUP))
    assert f"data/a.bin  by {admin_id} admin  expires" in text

    # pinned already: said, not pinned twice
    again = ok(cli(admin, "group", "pin", GROUP, "b.bin"))
    assert "b.bin is pinned already" in again
    assert [p["file"] for p in status(admin)["pins"]].count("b.bin") == 1

    assert ok(cli(admin, "group", "unpin", GROUP, "data/a.bin")).strip() == "unpinned data/a.bin"
    assert pinned(member) == {"b.bin"}


def test_a_pin_lasts_30_days_unless_told(members: list[Path]) -> None:
    admin, _ = members
    ok(cli(admin, "group", "pin", GROUP, "long.bin"))
    ok(cli(admin, "group", "pin", GROUP, "short.bin", "--expires", "2h"))
    now = datetime.now(UTC)
    until = {p["file"]: datetime.fromisoformat(p["expires"]) for p in status(admin)["pins"]}
    assert now + timedelta(days=29) < until["long.bin"] <= now + timedelta(days=30)
    assert now + timedelta(hours=1) < until["short.bin"] <= now + timedelta(hours=2)


def test_only_administrators_pin_and_unpin(members: list[Path]) -> None:
    admin, member = members
    one_line_error(cli(member, "group", "pin", GROUP, "a.bin"), 11, "NOT_AUTHORIZED", "administ")
    assert pinned(admin) == set()
    ok(cli(admin, "group", "pin", GROUP, "a.bin"))
    one_line_error(cli(member, "group", "unpin", GROUP, "a.bin"), 11, "NOT_AUTHORIZED")
    assert pinned(admin) == {"a.bin"}


def test_unpinning_what_is_not_pinned_is_an_error(members: list[Path]) -> None:
    admin, _ = members
    ok(cli(admin, "group", "pin", GROUP, "a.bin"))
    done = cli(admin, "group", "unpin", GROUP, "a.bin", "never.bin")
    one_line_error(done, 10, "RECORD_NOT_FOUND", "never.bin")
    assert done.stdout.strip() == "unpinned a.bin"  # the others are unpinned all the same
    assert pinned(admin) == set()


@pytest.mark.parametrize("path", ["../etc/passwd", "data/../x", "a//b", "/", "data/", "a/./b"])
def test_a_path_must_name_one_file(members: list[Path], path: str) -> None:
    admin, _ = members
    one_line_error(cli(admin, "group", "pin", GROUP, path), 2, "source's root")


# -- nodes -----------------------------------------------------------------------------------


def node(host: str, **counts: Any) -> NodeStatus:
    return NodeStatus(
        host=host,
        mountpoint="/mnt/data",
        source="s3://datasets/train",
        software="cachefs 0.1.0",
        **counts,
    )


def test_status_shows_live_nodes_and_a_dead_node_disappears(members: list[Path]) -> None:
    admin, member = members
    now = datetime.now(UTC)
    alive = node(
        "node-a",
        cached_bytes=3 << 20,
        cache_limit=10 << 30,
        hit_ratio=0.875,
        origin_bytes=1 << 20,
        hosted_bytes=2 << 20,
        local_bytes=5 << 20,
        pins=(PinProgress("data/a.bin", 512 << 10, 1 << 20), PinProgress("b.bin", error="EIO")),
    )
    malformed = [
        Record(type=NODE_STATUS_TYPE, expires=now + timedelta(hours=1), data=b"not json"),
        status_record(node("node-c", cached_bytes=-1), now + timedelta(hours=1)),
    ]
    # the member runs both mounts; node-b's stops refreshing its record at once
    add_as(
        member,
        status_record(alive, now + timedelta(hours=1)),
        status_record(node("node-b"), datetime.now(UTC) + timedelta(seconds=6)),
        *malformed,
    )

    shown = status(admin)
    assert shown["malformed_records"] == 2
    nodes = {n["host"]: n for n in shown["nodes"]}
    a = nodes["node-a"]
    assert a["member"]["name"] == "member1" and a["mountpoint"] == "/mnt/data"
    assert (a["source"], a["software"]) == ("s3://datasets/train", "cachefs 0.1.0")
    assert (a["origin_bytes"], a["hosted_bytes"], a["local_bytes"]) == (1 << 20, 2 << 20, 5 << 20)
    assert a["pins"][0] == {
        "file": "data/a.bin",
        "cached": 512 << 10,
        "size": 1 << 20,
        "error": None,
    }
    assert a["updated"] and a["expires"]

    text = ok(cli(admin, "group", "status", GROUP))
    assert "node-a:/mnt/data  by" in text and "2 malformed records skipped" in text
    assert "s3://datasets/train" in text and "cachefs 0.1.0" in text
    assert "3.0 MiB of 10.0 GiB" in text and "87.5%" in text
    assert "origin 1.0 MiB, hosted cache 2.0 MiB, local cache 5.0 MiB" in text
    assert "data/a.bin  512.0 KiB of 1.0 MiB (50%)" in text and "b.bin  error: EIO" in text

    wait_for(
        "node-b's status record expires",
        lambda: {n["host"] for n in status(admin)["nodes"]} == {"node-a"},
        deadline=60.0,
    )
