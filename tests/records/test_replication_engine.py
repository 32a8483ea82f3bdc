"""The replication engine against a real redis-server, with small in-memory
stores (FakeLink) in place of the record store: what members converge to,
and what happens when the engine is trimmed, reset, killed, hung or fed
garbage.  Synchronisation is ``Replicator.sync`` (publish, then read until
caught up), always with a deadline; the network runs on trio's real clock."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from redisserver import RedisServer

from cachefs.records.model import (
    ApplyResult,
    EncodingError,
    Record,
    RecordFlags,
    decode_record,
    encode_record,
)
from cachefs.records.redislog import redact, sort_key_text
from cachefs.records.replication import OutboxEntry, Replicator

GROUP = "gtestgroup0000000000000000"
RECORD_TYPE = uuid.UUID("0b5e7a0c-1d2e-4f30-8a41-5b6c7d8e9f00")
SYNC = 15.0  # seconds: a deadline, never a measure


def sign(body: bytes) -> bytes:
    """The fake store's signature: a tampered body no longer matches it."""
    return hashlib.sha256(body).digest()


@dataclass
class FakeLink:
    """A member's store, in memory: records by id (the winner by sort key), blobs
    for credentials and revocations, an outbox."""

    member: str
    group_id: str = GROUP
    records: dict[uuid.UUID, Record] = field(default_factory=dict)
    blobs: set[bytes] = field(default_factory=set)
    outbox: list[OutboxEntry] = field(default_factory=list)
    pos: str | None = None
    epoch: str | None = None
    republished: int = 0
    batches: int = 0
    _seq: int = 0
    _queued: trio.Event = field(default_factory=trio.Event)

    # -- what a test does to it
    def change(
        self, record: Record | None = None, *, data: bytes = b"", delete: bool = False
    ) -> Record:
        """A local add (record None) or update: stored and queued for publishing."""
        now = datetime.now(UTC)
        if record is None:
            record = Record(type=RECORD_TYPE, expires=now + timedelta(hours=1), id=uuid.uuid4())
            record = replace(record, creator=self.member, created=now)
        flags = record.flags | RecordFlags.DELETED if delete else record.flags
        record = replace(
            record,
            data=data,
            flags=flags,
            version=record.version + 1,
            modified_by=self.member,
            modified=now,
        )
        body = encode_record(self.group_id, record)
        record = replace(record, signature=sign(body))
        self.records[record.id] = record  # type: ignore[index]
        self._queue("rec", body, record.signature)
        return record

    def add_blob(self, blob: bytes) -> None:
        self.blobs.add(blob)
        self._queue("cred", blob, b"")

    def _queue(self, kind: str, body: bytes, sig: bytes) -> None:
        self._seq += 1
        self.outbox.append(OutboxEntry(self._seq, kind, body, sig))
        self._queued.set()

    # -- the ReplicaLink
    async def pending(self, limit: int) -> list[OutboxEntry]:
        await trio.lowlevel.checkpoint()
        return self.outbox[:limit]

    async def published(self, seqs: Sequence[int]) -> None:
        done = set(seqs)
        self.outbox = [e for e in self.outbox if e.seq not in done]

    async def apply(self, kind: str, body: bytes, signature: bytes) -> ApplyResult:
        await trio.lowlevel.checkpoint()
        if kind == "cred":
            if not body.startswith(b"cred:"):
                return ApplyResult.REJECTED
            known = body in self.blobs
            self.blobs.add(body)
            return ApplyResult.STALE if known else ApplyResult.APPLIED
        if kind != "rec" or signature != sign(body):
            return ApplyResult.REJECTED
        try:
            group_id, record = decode_record(body, signature)
        except EncodingError:
            return ApplyResult.REJECTED
        if group_id != self.group_id or record.id is None:
            return ApplyResult.REJECTED
        held = self.records.get(record.id)
        if held is not None and held.sort_key() >= record.sort_key():
            return ApplyResult.STALE
        self.records[record.id] = record
        return ApplyResult.APPLIED

    async def apply_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[ApplyResult]:
        self.batches += 1
        return [await self.apply(*item) for item in items]

    async def position(self) -> str | None:
        return self.pos

    async def set_position(self, stream_id: str | None) -> None:
        self.pos = stream_id

    async def engine_epoch(self) -> str | None:
        return self.epoch

    async def set_engine_epoch(self, epoch: str) -> None:
        self.epoch = epoch

    async def republish_all(self) -> None:
        self.republished += 1
        for blob in sorted(self.blobs):
            self._queue("cred", blob, b"")
        for record in self.records.values():
            body = encode_record(self.group_id, replace(record, signature=b""))
            self._queue("rec", body, record.signature)

    async def held(self, record_id: str) -> tuple[bytes, bytes] | None:
        record = self.records.get(uuid.UUID(record_id))
        if record is None:
            return None
        return encode_record(self.group_id, replace(record, signature=b"")), record.signature

    async def wait_outbox(self) -> None:
        await self._queued.wait()
        self._queued = trio.Event()


Member = Callable[..., tuple[FakeLink, Replicator]]


@pytest.fixture
def make_member(redis_server: RedisServer) -> Member:
    """A member with an in-memory store."""

    def make(name: str, **options: int) -> tuple[FakeLink, Replicator]:
        link = FakeLink(name)
        return link, Replicator(link, redis_server.url, **options)

    return make


@asynccontextmanager
async def serving(*replicators: Replicator) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for replicator in replicators:
            await nursery.start(replicator.serve)
        yield
        nursery.cancel_scope.cancel()


def member(name: str, server: RedisServer, **options: int) -> tuple[FakeLink, Replicator]:
    link = FakeLink(name)
    return link, Replicator(link, server.url, **options)


async def synced(*replicators: Replicator) -> None:
    """Each publishes, then each reads: afterwards all have seen all."""
    for replicator in [*replicators, *replicators]:
        assert await replicator.sync(SYNC), replicator.statistics()


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.message
        for r in caplog.records
        if r.levelno == logging.WARNING and "unreachable" in r.message
    ]


def contents(link: FakeLink) -> dict[uuid.UUID, tuple[int, str, bytes]]:
    return {i: (r.version, r.modified_by, r.data) for i, r in link.records.items()}


# -- the sort key the engine compares -------------------------------------------------


_records = st.builds(
    lambda v, t, by, sig: Record(
        type=RECORD_TYPE,
        expires=datetime.now(UTC),
        version=v,
        modified=datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=t),
        modified_by=by,
        signature=sig,
    ),
    st.integers(0, 2**64 - 1),
    st.integers(-(2**40), 2**50),
    st.text(max_size=6),
    st.binary(max_size=6),
)


@given(_records, _records)
def test_the_engine_orders_versions_as_the_store_does(a: Record, b: Record) -> None:
    ka, kb = sort_key_text(a).encode(), sort_key_text(b).encode()
    assert (ka < kb) == (a.sort_key() < b.sort_key())
    assert (ka == kb) == (a.sort_key() == b.sort_key())


def test_the_password_of_an_engine_url_is_never_shown() -> None:
    assert redact("redis://ann:s3cret@host:6379/0") == "redis://ann:***@host:6379/0"
    assert redact("rediss://:s3cret@host/1") == "rediss://:***@host/1"
    assert redact("redis://host:6379/0") == "redis://host:6379/0"


# -- members through a real engine ----------------------------------------------------


async def test_two_members_converge(redis_server: RedisServer, make_member: Member) -> None:
    a, ra = make_member("ma")
    b, rb = make_member("mb")
    async with serving(ra, rb):
        mine = [a.change(data=b"a%d" % i) for i in range(20)]
        theirs = [b.change(data=b"b%d" % i) for i in range(20)]
        a.add_blob(b"cred:one")
        await synced(ra, rb)
        # both change the same records at once: one version wins everywhere
        for record in mine[:5]:
            a.change(record, data=b"from a")
            b.change(b.records[record.id], data=b"from b")  # type: ignore[index]
        b.change(theirs[0], delete=True)
        await synced(ra, rb)
    assert contents(a) == contents(b)
    assert len(a.records) == 40 and b.blobs == {b"cred:one"}
    assert b.records[theirs[0].id].deleted  # type: ignore[index]
    assert not a.outbox and not b.outbox
    stats = ra.statistics()
    assert stats.connected is False and stats.rejected == 0 and stats.published == 26


async def test_an_offline_member_catches_up_from_the_log(
    redis_server: RedisServer, make_member: Member
) -> None:
    a, ra = make_member("ma")
    b, rb = make_member("mb")
    async with serving(ra, rb):
        a.change()
        await synced(ra, rb)
    async with serving(ra):  # b is offline
        records = [a.change(data=b"%d" % i) for i in range(500)]
        for record in records:
            a.change(record, data=b"again")
        await synced(ra)
    resyncs = rb.statistics().resyncs
    async with serving(rb):
        await synced(rb)
    assert contents(b) == contents(a) and len(b.records) == 501
    stats = rb.statistics()
    assert stats.resyncs == resyncs  # followed the log, no full read
    assert stats.applied == 1001 and stats.rejected == 0
    assert b.batches > 0


async def test_a_member_whose_position_was_trimmed_resyncs(
    redis_server: RedisServer, make_member: Member
) -> None:
    a, ra = make_member("ma", stream_maxlen=10)
    b, rb = make_member("mb", stream_maxlen=10)
    async with serving(ra, rb):
        a.change()
        await synced(ra, rb)
    resyncs = rb.statistics().resyncs
    async with serving(ra):
        records = [a.change(data=b"%d" % i) for i in range(400)]
        for record in records[:100]:
            a.change(record, data=b"v2")
        a.change(records[0], delete=True)
        await synced(ra)
    async with redis_server.client() as client:
        assert await client.xlen(f"cachefs:{GROUP}:log") < 400  # trimmed
    async with serving(rb):
        await synced(rb)
    assert contents(b) == contents(a) and len(b.records) == 401
    assert b.records[records[0].id].deleted  # type: ignore[index]
    assert rb.statistics().resyncs == resyncs + 1


async def test_an_engine_that_lost_its_data_is_restored(redis_server: RedisServer) -> None:
    a, ra = member("ma", redis_server)
    b, rb = member("mb", redis_server)
    async with serving(ra, rb):
        for i in range(30):
            a.change(data=b"%d" % i)
        b.add_blob(b"cred:b")
        await synced(ra, rb)
        async with redis_server.client() as client:
            await client.flushall()
        await synced(ra, rb)
        assert a.republished == 1 and b.republished == 1
        assert ra.statistics().engine_resets == 1
        a.change(a.records[next(iter(a.records))], data=b"after")
        await synced(ra, rb)
    # a newcomer reads everything from the restored engine
    c, rc = member("mc", redis_server)
    async with serving(rc):
        await synced(rc)
    assert contents(c) == contents(a) == contents(b) and len(c.records) == 30
    assert c.blobs == {b"cred:b"} and c.republished == 0
    assert rc.statistics().resyncs == 1


@pytest.mark.parametrize(
    "redis_server", [{"appendonly": False}, {"appendonly": True}], indirect=True
)
async def test_engine_killed_and_restarted(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Whether or not the engine kept its data, nothing is lost: changes made
    while it was down are published once it is back.  Each member warns once."""
    caplog.set_level(logging.INFO, "cachefs.records.replication")
    a, ra = member("ma", redis_server)
    b, rb = member("mb", redis_server)
    async with serving(ra, rb):
        for i in range(10):
            b.change(data=b"%d" % i)
        await synced(ra, rb)
        redis_server.kill()
        while_down = [a.change(data=b"down %d" % i) for i in range(10)]
        assert not await ra.sync(0.5)
        assert a.outbox  # still queued
        redis_server.start()
        await synced(ra, rb)
        assert ra.statistics().reconnects >= 1
    assert contents(a) == contents(b) and len(b.records) == 20
    assert all(r.id in b.records for r in while_down)
    assert not a.outbox
    resets = rb.statistics().engine_resets
    assert resets == (0 if redis_server.appendonly else 1)
    assert len(outage_warnings(caplog)) == 2
    assert sum("reachable again" in r.message for r in caplog.records) == 2


async def test_forged_entries_are_rejected(redis_server: RedisServer, make_member: Member) -> None:
    a, ra = make_member("ma")
    b, rb = make_member("mb")
    real = a.change(data=b"real")
    body = encode_record(GROUP, replace(real, signature=b""))
    tampered = bytearray(body)
    tampered[-1] ^= 1
    other_group = encode_record("gother", replace(real, signature=b""))
    log_key = f"cachefs:{GROUP}:log"
    async with serving(ra, rb):
        await synced(ra, rb)
        async with redis_server.client() as client:
            forged: list[dict[str, bytes]] = [
                {"garbage": b"x"},
                {"kind": b"rec", "body": b"not a record", "sig": b"x"},
                {"kind": b"evil", "body": body, "sig": real.signature},
                {"kind": b"rec", "body": bytes(tampered), "sig": real.signature},
                {"kind": b"rec", "body": other_group, "sig": sign(other_group)},
                {"kind": b"rec", "body": b"", "sig": b""},
                {"kind": b"\xff\xfe", "body": b"\x00", "sig": b"\x00"},
                {"kind": b"cred", "body": b"not a credential", "sig": b""},
            ]
            for fields in forged:
                await client.xadd(log_key, fields)  # type: ignore[arg-type]
            await client.hset(f"cachefs:{GROUP}:state", {"junk": b"\x00\x00\x00\x09abc"})
        after = a.change(real, data=b"still flowing")
        await synced(ra, rb)
    assert rb.statistics().rejected == len(forged)
    assert b.records[real.id].data == b"still flowing" == after.data  # type: ignore[index]
    # a newcomer reading the state rejects the junk there too
    c, rc = make_member("mc")
    async with serving(rc):
        await synced(rc)
    assert contents(c) == contents(a)
    assert rc.statistics().rejected == 1


async def test_a_hung_engine_fails_sync_within_its_deadline(redis_server: RedisServer) -> None:
    a, ra = member("ma", redis_server)
    b, rb = member("mb", redis_server)
    async with serving(ra, rb):
        await synced(ra, rb)
        redis_server.pause()
        try:
            record = a.change(data=b"while hung")
            with trio.fail_after(SYNC):  # a deadline for the deadline
                assert not await ra.sync(1.0)
        finally:
            redis_server.resume()
        await synced(ra, rb)
    assert b.records[record.id].data == b"while hung"  # type: ignore[index]


class SteppedClock:
    def __init__(self) -> None:
        self.t = datetime.now(UTC)

    def now(self) -> datetime:
        return self.t

    async def sleep_until(self, when: datetime) -> None:
        await trio.sleep_forever()


async def test_expired_records_leave_the_engine_state(redis_server: RedisServer) -> None:
    clock = SteppedClock()
    link = FakeLink("ma")
    replicator = Replicator(link, redis_server.url, clock=clock)
    for i in range(3):
        link.change(data=b"%d" % i)
    async with serving(replicator):
        await synced(replicator)
    state = f"cachefs:{GROUP}:state"
    async with redis_server.client() as client:
        assert await client.hlen(state) == 3
        clock.t += timedelta(hours=2)
        async with serving(replicator):  # the janitor runs at each connection
            with trio.fail_after(SYNC):
                while await client.hlen(state):
                    await trio.sleep(0.05)  # a state the test cannot be told of
        assert await client.zcard(f"cachefs:{GROUP}:expiry") == 0
    # a newcomer whose clock says they expired does not take them from the state
    late = FakeLink("mb")
    newcomer = Replicator(late, redis_server.url, clock=clock)
    async with serving(newcomer):
        await synced(newcomer)
    assert late.records == {}


SECRET = "s3cret pw/@"


@pytest.mark.parametrize("redis_server", [{"tls": True, "password": SECRET}], indirect=True)
async def test_tls_and_a_password_from_the_url(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert redis_server.url.startswith("rediss://:")
    a, ra = member("ma", redis_server)
    b, rb = member("mb", redis_server)
    wrong = Replicator(FakeLink("mc"), redis_server.url.replace("s3cret", "wrong"))
    async with serving(ra, rb, wrong):
        a.change(data=b"over TLS")
        await synced(ra, rb)
        assert not await wrong.sync(0.5)
    assert contents(b) == contents(a) and len(b.records) == 1
    error = wrong.statistics().last_error
    assert error is not None and "wrong" not in error
    assert "wrong" not in caplog.text and "s3cret" not in caplog.text
    assert "***" in wrong.display_url
    assert len(outage_warnings(caplog)) == 1
