"""Three real mounts in one group: a moto S3 server holds the origin bucket and
the hosted cache's bucket, a redis-server the group's records, all on
127.0.0.1.  Each mount is a process of its own with its own cache dir and its
own member (groups directory), as on separate machines; the administrator
pins and reads the group's status from a fourth groups directory.

What is checked is what users of the group would notice: the bytes every
mount serves, the bytes fetched from the origin (each mount's ``--trace``),
the group counters of ``cachefs stats``, and ``cachefs group status``.
Every wait polls a condition with a deadline.  The mounts use the native
FUSE transport only (the group does not depend on it; both would double the
time of the file).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from conftest import Mount, MountFactory, pread_direct, run_cachefs, sha256, wait_for
from groupsrig import GROUP, identity, make_group

from backends.trace import read_trace
from cachefs.contract import ContentInfo
from cachefs.group.formats import CONTENT_INFO_TYPE, content_record
from cachefs.records import Record, Role, open_group
from cachefs.records.model import encode_record, record_id
from cachefs.records.redislog import EngineLog

if TYPE_CHECKING:
    from redisserver import RedisServer
    from s3server import MotoServer

pytest_plugins = ["s3server"]

MiB = 1 << 20
#: the hosted cache is s3://BUCKET/PREFIX: block objects are PREFIX/blocks/<sha256 hex>
PREFIX = "cache"
BLOCK_SIZE = "1M"
#: a deadline for the group to settle (uploads, replication), never a measure
SETTLE = 60.0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Rig:
    """The servers, the group and the mounts of one test."""

    tmp: Path
    origin_server: MotoServer
    hosted_server: MotoServer
    redis: RedisServer
    mounts: MountFactory
    #: groups directories: the administrator's, then one per member that mounts
    dirs: list[Path]
    origin: str = ""
    hosted: str = ""
    traces: dict[Path, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.origin = self.origin_server.new_bucket()
        self.hosted = self.hosted_server.new_bucket()

    def put(self, key: str, data: bytes) -> None:
        self.origin_server.put(self.origin, key, data)

    def mount(self, member: int, *options: object) -> Mount:
        """Member *member* (1..3) mounts the origin bucket, in the group, with the
        hosted cache and a trace of its own."""
        trace = self.tmp / f"trace-{member}-{len(self.traces)}.jsonl"
        m = self.mounts(
            f"s3://{self.origin}",
            "--s3-endpoint",
            self.origin_server.endpoint,
            "--group",
            GROUP,
            "--groups-dir",
            self.dirs[member],
            "--shared-cache",
            f"s3://{self.hosted}/{PREFIX}",
            "--shared-cache-endpoint",
            self.hosted_server.endpoint,
            "--trace",
            trace,
            *options,
            block_size=BLOCK_SIZE,
        )
        self.traces[m.mountpoint] = trace
        return m

    def origin_bytes(self, m: Mount, file_id: str | None = None) -> int:
        """Bytes *m* read from the origin (of *file_id*), as its trace says."""
        return sum(
            r["bytes_read"]
            for r in read_trace(self.traces[m.mountpoint])
            if r["result"] in ("SUCCESS", "PARTIAL") and file_id in (None, r["file_id"])
        )


def hosted_key(block: bytes) -> str:
    return f"{PREFIX}/blocks/{digest(block)}"


def put_hosted_blocks(rig: Rig, data: bytes) -> None:
    """Put the blocks of *data* in the hosted cache, each under its hash's name."""
    for i in range(0, len(data), MiB):
        block = data[i : i + MiB]
        rig.hosted_server.put(rig.hosted, hosted_key(block), block)


def s3_version(rig: Rig, key: str) -> str:
    """The version of *key* in the origin, as a mount sees it."""

    async def main() -> str:
        backend = rig.origin_server.open(rig.origin)
        try:
            attrs = await backend.stat(key)
        finally:
            await backend.aclose()
        assert attrs is not None and attrs.version
        return attrs.version

    return trio.run(main)


def add_as(groups_dir: Path, *records: Record) -> None:
    """Add reserved records as the member of *groups_dir*, and publish them."""

    async def main() -> None:
        async with open_group(GROUP, groups_dir=groups_dir) as group:
            for record in records:
                await group.records.add(record, internal=True)
            assert await group.sync(SETTLE)

    trio.run(main)


def forge_content_record(rig: Rig, file_id: str, other: bytes) -> None:
    """Publish in the group's Redis a content record of *file_id* saying it holds
    *other*, signed by a key the group never heard of, and put *other*'s blocks
    in the hosted cache."""
    put_hosted_blocks(rig, other)
    info = ContentInfo.of_bytes(other, s3_version(rig, file_id), MiB)
    stranger = identity(rig.tmp / "stranger", "stranger")
    group_id = json.loads(group_cli(rig.dirs[0], "status", GROUP, "--json"))["group_id"]
    now = datetime.now(UTC)
    forged = dataclasses.replace(
        content_record(file_id, info, now + timedelta(days=1)),
        id=record_id(group_id, stranger.member_id, CONTENT_INFO_TYPE, now),
        version=1,
        creator=stranger.member_id,
        modified_by=stranger.member_id,
        created=now,
        modified=now,
    )
    body = encode_record(group_id, forged)

    async def main() -> None:
        async with EngineLog.connect(rig.redis.url) as client:
            await EngineLog(client, group_id, 100_000).publish([("rec", body, stranger.sign(body))])

    trio.run(main)


def group_cli(groups_dir: Path, *args: object) -> str:
    """``cachefs group ARGS`` as the member of *groups_dir*; its output."""
    done = run_cachefs("group", *args, "--groups-dir", groups_dir)
    assert done.returncode == 0, done.stderr
    return done.stdout


def group_stats(m: Mount) -> dict[str, Any]:
    group: dict[str, Any] = m.stats()["group"]
    return group


def content_records(groups_dir: Path) -> list[str]:
    """The files whose content records the member of *groups_dir* holds (its own
    database, as its mount replicated it: the engine is not asked)."""
    done = run_cachefs(
        "records",
        "list",
        "--offline",
        "--groups-dir",
        groups_dir,
        "--group",
        GROUP,
        "--type",
        CONTENT_INFO_TYPE,
        "--json",
    )
    assert done.returncode == 0, done.stderr
    files = []
    for line in done.stdout.splitlines():
        if line.strip():
            record = json.loads(line)
            files.append(json.loads(base64.b64decode(record["data"]))["file"])
    return files


def has_content(rig: Rig, member: int, file_id: str) -> bool:
    return file_id in content_records(rig.dirs[member])


def holds(path: Path, data: bytes) -> bool:
    return path.read_bytes() == data


def group_pins_are(m: Mount, pins: list[dict[str, Any]]) -> bool:
    return group_stats(m)["group_pins"] == pins


def pinned_files_are(m: Mount, count: int) -> bool:
    return m.stats()["pinned_files"] == count


def published(m: Mount) -> bool:
    """*m* uploaded everything it offered and published a content record."""
    g = group_stats(m)
    return g["offer_queue_bytes"] == 0 and g["content_published"] >= 1


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[MountFactory]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse (FUSE) on this machine")
    factory = MountFactory(tmp_path, fuse="native")
    try:
        yield factory
    finally:
        factory.close()


def make_rig(
    tmp_path: Path,
    origin: MotoServer,
    hosted: MotoServer,
    redis: RedisServer,
    mounts: MountFactory,
) -> Rig:
    dirs = make_group(tmp_path / "groups", (Role.MEMBER,) * 3, engine=redis.url)
    return Rig(tmp_path, origin, hosted, redis, mounts, dirs)


@pytest.fixture
def rig(
    tmp_path: Path, s3_server: MotoServer, redis_server: RedisServer, mounts: MountFactory
) -> Rig:
    return make_rig(tmp_path, s3_server, s3_server, redis_server, mounts)


# -- the hosted cache shares what one mount fetched ----------------------------------------


def test_three_mounts_read_64_mib_from_the_origin_once(rig: Rig) -> None:
    data = os.urandom(64 * MiB)
    rig.put("data.bin", data)
    a, b, c = rig.mount(1), rig.mount(2), rig.mount(3)

    assert sha256(a / "data.bin") == digest(data)
    wait_for("the first mount's blocks uploaded", lambda: published(a), SETTLE)
    for m, member in ((b, 2), (c, 3)):
        wait_for(
            f"member {member} holding the content record",
            partial(has_content, rig, member, "data.bin"),
            SETTLE,
        )
        assert sha256(m / "data.bin") == digest(data)

    total = sum(rig.origin_bytes(m) for m in (a, b, c))
    assert len(data) <= total <= 1.1 * len(data), total
    for m in (b, c):
        g = group_stats(m)
        assert g["hosted_bytes"] >= 0.9 * len(data), g
        assert g["rejected_blocks"] == 0, g


# -- nothing unverified is served -------------------------------------------------------


def test_a_hosted_block_overwritten_with_other_bytes_is_never_served(rig: Rig) -> None:
    data = os.urandom(4 * MiB)
    rig.put("data.bin", data)
    a, b = rig.mount(1), rig.mount(2)
    assert sha256(a / "data.bin") == digest(data)
    wait_for("the first mount's blocks uploaded", lambda: published(a), SETTLE)
    wait_for("member 2 holding the content record", lambda: has_content(rig, 2, "data.bin"))

    # someone with write access to the bucket replaces the second block
    second = data[MiB : 2 * MiB]
    key = hosted_key(second)
    rig.hosted_server.admin.head_object(Bucket=rig.hosted, Key=key)  # it is there
    rig.hosted_server.put(rig.hosted, key, os.urandom(MiB))

    assert sha256(b / "data.bin") == digest(data)
    assert pread_direct(b / "data.bin", MiB, MiB) == second  # from b's own cache now
    g = group_stats(b)
    assert g["rejected_blocks"] >= 1, g
    assert g["hosted_hits"] >= 1, g  # the first block came from the hosted cache
    assert rig.origin_bytes(b) >= MiB  # the second at least came from the origin


def test_a_content_record_forged_outside_the_group_is_rejected(rig: Rig) -> None:
    """An outsider who can write to Redis publishes content information of other
    bytes, signed with its own key, and puts those bytes in the hosted cache: if
    a mount took the record, the hosted blocks would check out against it."""
    data = os.urandom(4 * MiB)
    rig.put("data.bin", data)
    b = rig.mount(1)
    forge_content_record(rig, "data.bin", os.urandom(len(data)))
    wait_for("the forged record refused", lambda: group_stats(b)["rejected_records"] >= 1)

    assert sha256(b / "data.bin") == digest(data)
    g = group_stats(b)
    assert g["hosted_hits"] == 0 and g["content_used"] == 0, g
    assert rig.origin_bytes(b) == len(data)


def test_a_member_content_record_is_refused_where_only_administrators_are_trusted(
    rig: Rig,
) -> None:
    """With --trust-content admins, a member's content record (here of other
    bytes, put in the hosted cache) is not used: the origin is read."""
    data = os.urandom(4 * MiB)
    rig.put("data.bin", data)
    c = rig.mount(2, "--trust-content", "admins")
    evil = os.urandom(len(data))
    put_hosted_blocks(rig, evil)
    info = ContentInfo.of_bytes(evil, s3_version(rig, "data.bin"), MiB)
    add_as(rig.dirs[3], content_record("data.bin", info, datetime.now(UTC) + timedelta(days=1)))
    wait_for("member 2 holding the content record", lambda: has_content(rig, 2, "data.bin"))

    assert sha256(c / "data.bin") == digest(data)
    g = group_stats(c)
    assert g["rejected_records"] >= 1 and g["hosted_hits"] == 0, g
    assert rig.origin_bytes(c) == len(data)


# -- the hosted cache and Redis down, then back ---------------------------------------------


@pytest.fixture
def own_rig(
    tmp_path: Path,
    s3_server: MotoServer,
    own_s3_server: MotoServer,
    redis_server: RedisServer,
    mounts: MountFactory,
) -> Rig:
    """The hosted cache on a server of its own, which the test kills."""
    return make_rig(tmp_path, s3_server, own_s3_server, redis_server, mounts)


def test_reads_go_on_while_the_hosted_cache_and_redis_are_down(own_rig: Rig) -> None:
    rig = own_rig
    first, later = os.urandom(8 * MiB), os.urandom(4 * MiB)
    rig.put("first.bin", first)
    rig.put("later.bin", later)
    a = rig.mount(1)
    b = rig.mount(2, "--max-readahead", "0")  # each block read when asked: mid-read is mid-read
    assert sha256(a / "first.bin") == digest(first)
    wait_for("the first mount's blocks uploaded", lambda: published(a), SETTLE)
    wait_for("member 2 holding the content record", lambda: has_content(rig, 2, "first.bin"))

    half = len(first) // 2
    assert pread_direct(b / "first.bin", 0, half) == first[:half]
    assert group_stats(b)["hosted_hits"] >= 1
    rig.hosted_server.kill()
    rig.redis.kill()
    for offset in range(half, len(first), MiB):
        assert pread_direct(b / "first.bin", offset, MiB) == first[offset : offset + MiB]
    assert sha256(b / "first.bin") == digest(first)
    g = group_stats(b)
    assert g["hosted_errors"] >= 1, g
    assert rig.origin_bytes(b, "first.bin") >= len(first) - half

    # back (both empty, as a restarted moto and a Redis without persistence are)
    rig.hosted_server.start()
    rig.hosted_server.admin.create_bucket(Bucket=rig.hosted)
    rig.redis.start()
    assert sha256(a / "later.bin") == digest(later)
    wait_for(
        "the later file's blocks uploaded",
        lambda: published(a) and group_stats(a)["content_published"] >= 2,
        SETTLE,
    )
    wait_for("member 2 holding the later record", lambda: has_content(rig, 2, "later.bin"), SETTLE)
    # b tries the hosted cache again once its backoff has passed (at most 30 s):
    # the first small file it reads from the origin then offers its block
    probes = itertools.count()

    def b_uses_it_again() -> bool:
        name = f"probe-{next(probes)}.bin"
        rig.put(name, name.encode())
        assert (b / name).read_bytes() == name.encode()
        return group_stats(b)["hosted_down"] is None

    wait_for("member 2 using the hosted cache again", b_uses_it_again, SETTLE)
    assert sha256(b / "later.bin") == digest(later)
    assert rig.origin_bytes(b, "later.bin") == 0


# -- the group, live --------------------------------------------------------------------


def test_a_version_change_reaches_members_whose_ttl_is_an_hour(rig: Rig) -> None:
    old, new = os.urandom(2 * MiB), os.urandom(3 * MiB)
    rig.put("data.bin", old)
    a = rig.mount(1, "--ttl", "1")  # a sees the change after a second
    b, c = rig.mount(2, "--ttl", "3600"), rig.mount(3, "--ttl", "3600")
    for m in (a, b, c):
        assert (m / "data.bin").read_bytes() == old

    rig.put("data.bin", new)
    wait_for("the first mount seeing the new version", lambda: (a / "data.bin").read_bytes() == new)
    for m in (b, c):
        wait_for(
            "the new version read where the TTL is an hour",
            partial(holds, m / "data.bin", new),
        )
    assert group_stats(a)["versions_published"] >= 1
    assert all(group_stats(m)["versions_applied"] >= 1 for m in (b, c))


def test_a_change_written_through_one_member_reaches_the_others_at_its_flush(rig: Rig) -> None:
    old, new = os.urandom(MiB), os.urandom(MiB + 5)
    rig.put("data.bin", old)
    a = rig.mount(1, "--write-back-delay", "0")
    b = rig.mount(2, "--ttl", "3600")
    assert (b / "data.bin").read_bytes() == old
    with open(a / "data.bin", "wb") as f:
        f.write(new)  # closed: flushed before close returns (write-back delay 0)
    got = rig.origin_server.admin.get_object(Bucket=rig.origin, Key="data.bin")["Body"].read()
    assert got == new
    wait_for("the change read where the TTL is an hour", partial(holds, b / "data.bin", new))
    assert group_stats(a)["versions_published"] >= 1


def node_mountpoints(rig: Rig) -> set[str]:
    """The mount points of the live nodes ``cachefs group status`` shows the administrator."""
    shown = json.loads(group_cli(rig.dirs[0], "status", GROUP, "--json"))
    return {node["mountpoint"] for node in shown["nodes"]}


def pins_shown(rig: Rig) -> dict[str, list[dict[str, Any]]]:
    shown = json.loads(group_cli(rig.dirs[0], "status", GROUP, "--json"))
    return {node["mountpoint"]: node["pins"] for node in shown["nodes"]}


def test_a_group_pin_reaches_every_member_and_a_dead_node_leaves(rig: Rig) -> None:
    data = os.urandom(4 * MiB)
    rig.put("pinned.bin", data)
    nodes = [rig.mount(member, "--status-expiry", "5") for member in (1, 2, 3)]
    every = {str(m.mountpoint) for m in nodes}
    wait_for("every node in the group's status", lambda: node_mountpoints(rig) == every)

    group_cli(rig.dirs[0], "pin", GROUP, "pinned.bin")
    whole = [{"file": "pinned.bin", "cached": len(data), "size": len(data), "error": None}]
    for m in nodes:
        wait_for(
            "the group pin fetched whole",
            partial(group_pins_are, m, whole),
            SETTLE,
        )
        assert m.stats()["pinned_files"] == 1
    wait_for(
        "every node's progress in the group's status",
        lambda: pins_shown(rig) == dict.fromkeys(every, whole),
    )
    for m in nodes:
        assert sha256(m / "pinned.bin") == digest(data)

    group_cli(rig.dirs[0], "unpin", GROUP, "pinned.bin")
    for m in nodes:
        wait_for("the group pin released", partial(pinned_files_are, m, 0))

    dead = nodes.pop()
    dead.kill()
    wait_for(
        "the dead node gone from the group's status",
        lambda: node_mountpoints(rig) == every - {str(dead.mountpoint)},
    )
