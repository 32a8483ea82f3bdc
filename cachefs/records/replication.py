"""Replication of a group's changes through Redis (coredis, under trio).

Policy:
- The engine is an untrusted transport that may fail at any time.  Every
  change read from it goes to the store's checks (``ReplicaLink.apply``);
  entries that are malformed are counted as rejected and skipped.  Trouble
  with the engine never stops the member: local changes stay in the outbox
  until the engine acknowledged them, and ``serve`` reconnects with a
  jittered exponential backoff (0.1 s to 5 s), logging one warning per
  outage and one line when the engine is back.  Every call to the engine
  has a deadline.
- A member follows the log from its position.  It reads the engine's whole
  state instead (credentials, revocations, live records), then follows the
  log from where it ended before that reading, when it has no position
  yet, when the log was trimmed past its position, and when the engine
  lost its data (the epoch changed: then it also republishes everything it
  holds, so the engine is whole again once every member has connected).
- Whoever sees expired records in the engine's state removes them.
- The layout in Redis is redislog.py's: one Redis server (not Cluster),
  6.2 or later.  Deadlines run on trio's clock: run the replication on the
  real clock.  The engine URL's password is never logged (``display_url``
  is the URL without it).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import unquote, urlsplit

import trio

from cachefs.records.clock import Clock, SystemClock
from cachefs.records.credentials import Credential, Revocation
from cachefs.records.errors import RecordsError
from cachefs.records.model import ApplyResult, EncodingError, decode_record, micros
from cachefs.records.redislog import (
    ENGINE_ERRORS,
    EngineLog,
    ReadResult,
    Shadowed,
    pack_state,
    redact,
    sort_key_text,
    stream_id,
    unpack_state,
)

__all__ = ["OutboxEntry", "ReplicaLink", "ReplicationStatistics", "Replicator"]

log = logging.getLogger(__name__)

CLOSE_DEADLINE = 2.0
BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
READ_BATCH = 500
MAX_BLOBS = 10_000  # credentials (or revocations) read in a resync, at most
PUBLISH_BATCH = 200
JANITOR_EVERY = 60.0
JANITOR_BATCH = 500
LOGGED_REJECTIONS = 10  # then only counted


@dataclass(frozen=True)
class OutboxEntry:
    """A local change the engine has not acknowledged: kind is rec, cred or revoke."""

    seq: int
    kind: str
    body: bytes
    signature: bytes


class ReplicaLink(Protocol):
    """The store as the replication sees it."""

    group_id: str

    async def pending(self, limit: int) -> list[OutboxEntry]: ...  # oldest first

    async def published(self, seqs: Sequence[int]) -> None: ...  # drop from the outbox

    async def apply(self, kind: str, body: bytes, signature: bytes) -> ApplyResult: ...

    # many at once, in order (the result of each as apply gives it): how a member catches up
    async def apply_many(self, items: Sequence[tuple[str, bytes, bytes]]) -> list[ApplyResult]: ...

    async def position(self) -> str | None: ...  # the last stream id applied

    async def set_position(self, stream_id: str | None) -> None: ...

    async def engine_epoch(self) -> str | None: ...

    async def set_engine_epoch(self, epoch: str) -> None: ...

    async def republish_all(self) -> None: ...  # everything held back into the outbox

    async def wait_outbox(self) -> None: ...  # returns once a change was queued since last call

    # (body, signature) of the version held of a record, if any
    async def held(self, record_id: str) -> tuple[bytes, bytes] | None: ...


@dataclass(frozen=True)
class ReplicationStatistics:
    connected: bool
    published: int  # outbox entries the engine acknowledged
    applied: int  # changes read from the engine and applied
    stale: int  # changes read that were held already, or older
    rejected: int  # changes read that were malformed or failed a check
    malformed: int  # of those, entries too malformed to reach the store's checks
    resyncs: int  # full reads of the engine's state
    reconnects: int
    engine_resets: int  # times the engine was found to have lost its data
    last_error: str | None
    position: str | None  # the last log entry applied


class Replicator:
    """Publishes this member's outbox to the engine and applies what the other
    members published; ``serve`` runs until cancelled."""

    def __init__(
        self,
        link: ReplicaLink,
        url: str,
        *,
        stream_maxlen: int = 100_000,
        max_record_size: int = 1 << 20,
        clock: Clock | None = None,
    ) -> None:
        if urlsplit(url).scheme not in ("redis", "rediss"):
            raise ValueError(f"not a redis:// or rediss:// URL: {redact(url)}")
        self.url = url
        self.display_url = redact(url)
        self._link = link
        self._maxlen = stream_maxlen
        # a log entry is a record and its field names: anything larger is junk
        self._max_entry = max_record_size + (64 << 10)
        self._clock: Clock = clock or SystemClock()
        self._publish_lock = trio.Lock()  # one drainer of the outbox at a time
        self._wake = trio.Event()  # set by sync(): stop waiting to reconnect
        self._progress = trio.Event()  # replaced each time the reader moves
        self._position: str | None = None  # the last stream id applied
        self._epoch: str | None = None  # the engine epoch the reader follows
        self._connected = False
        self._outage = False
        self._sessions = 0
        self._logged_rejections = 0
        self._published = self._applied = self._stale = self._rejected = 0
        self._malformed = 0  # of the rejected: too malformed to reach the store
        self._resyncs = self._reconnects = self._resets = 0
        self._last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def statistics(self) -> ReplicationStatistics:
        return ReplicationStatistics(
            connected=self._connected,
            published=self._published,
            applied=self._applied,
            stale=self._stale,
            rejected=self._rejected,
            malformed=self._malformed,
            resyncs=self._resyncs,
            reconnects=self._reconnects,
            engine_resets=self._resets,
            last_error=self._last_error,
            position=self._position,
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Replicate until cancelled; never raises for the engine's trouble."""
        task_status.started()
        delay = BACKOFF_MIN
        try:
            while True:
                sessions = self._sessions
                try:
                    await self._run_session()
                    self._down(ConnectionError("the connection closed"))
                except* ENGINE_ERRORS as group:
                    self._down(group.exceptions[0])
                except* RecordsError as group:  # the member's own database failed
                    self._connected = False
                    self._last_error = str(group.exceptions[0])
                    log.warning("group %s: %s; retrying", self._link.group_id, self._last_error)
                if self._sessions != sessions:  # it had connected: start over
                    delay = BACKOFF_MIN
                with trio.move_on_after(delay * random.uniform(0.5, 1.0)):
                    await self._wake.wait()  # or sync() wants the engine now
                self._wake = trio.Event()
                delay = min(delay * 2, BACKOFF_MAX)
        finally:
            self._connected = False

    async def sync(self, timeout: float) -> bool:
        """Publish the whole outbox and wait until ``serve`` has applied everything
        the log held then, within *timeout* seconds; False if the engine could not
        be reached (or ``serve`` is not running) in time."""
        with trio.move_on_after(timeout):
            self._wake.set()
            while True:
                resets = self._resets
                epoch, last = await self._publish_and_mark()
                while not (
                    self._epoch == epoch
                    and self._position is not None
                    and stream_id(self._position) >= stream_id(last)
                ):
                    await self._progress.wait()
                if self._resets == resets:
                    return True
                # the engine had lost its data: publish what was queued again
        return False

    # -- connection -----------------------------------------------------------------------

    async def _run_session(self) -> None:
        with trio.CancelScope() as teardown:
            async with EngineLog.connect(self.url) as client:
                try:
                    engine = EngineLog(client, self._link.group_id, self._maxlen, self._max_entry)
                    await engine.ping()
                    self._up()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_loop, engine)
                        nursery.start_soon(self._publish_loop, engine)
                        nursery.start_soon(self._janitor_loop, engine)
                finally:
                    self._connected = False
                    teardown.deadline = trio.current_time() + CLOSE_DEADLINE

    async def _publish_and_mark(self) -> tuple[str, str]:
        """For sync: publish the outbox over a connection of its own, then the epoch
        and the last id of the log."""
        delay = BACKOFF_MIN
        while True:
            try:
                async with EngineLog.connect(self.url) as client:
                    engine = EngineLog(client, self._link.group_id, self._maxlen, self._max_entry)
                    async with self._publish_lock:
                        await self._drain(engine)
                    return await engine.mark()
            except* ENGINE_ERRORS as group:
                self._last_error = self._describe(group.exceptions[0])
            await trio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    def _up(self) -> None:
        self._connected = True
        if self._sessions:
            self._reconnects += 1
        self._sessions += 1
        if self._outage:
            self._outage = False
            log.info("group %s: engine %s reachable again", self._link.group_id, self.display_url)
        else:
            log.debug("group %s: connected to %s", self._link.group_id, self.display_url)

    def _down(self, error: BaseException) -> None:
        self._connected = False
        self._last_error = self._describe(error)
        if self._outage:
            log.debug("group %s: still unreachable: %s", self._link.group_id, self._last_error)
            return
        self._outage = True
        log.warning(
            "group %s: engine %s unreachable (%s); local changes stay queued, retrying",
            self._link.group_id,
            self.display_url,
            self._last_error,
        )

    def _describe(self, error: BaseException) -> str:
        while isinstance(error, BaseExceptionGroup) and error.exceptions:
            error = error.exceptions[0]
        text = str(error) or "no answer in time"
        password = urlsplit(self.url).password or ""
        for secret in filter(None, (password, unquote(password))):
            text = text.replace(secret, "***")
        return f"{type(error).__name__}: {text}"[:300]

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # -- publishing -----------------------------------------------------------------------

    async def _publish_loop(self, engine: EngineLog) -> None:
        while True:
            async with self._publish_lock:
                await self._drain(engine)
            await self._link.wait_outbox()

    async def _drain(self, engine: EngineLog) -> None:
        while entries := await self._link.pending(PUBLISH_BATCH):
            dropped, shadowed = await engine.publish(
                [(e.kind, e.body, e.signature) for e in entries]
            )
            for why in dropped:  # cannot happen for what the store queued: never block on it
                log.error("group %s: dropped an outbox entry: %s", self._link.group_id, why)
            for item in shadowed:
                await self._check_shadow(engine, item)
            await self._link.published([e.seq for e in entries])
            self._published += len(entries) - len(dropped)

    async def _check_shadow(self, engine: EngineLog, item: Shadowed) -> None:
        """Our record is in the log but the state kept an entry claiming a later
        version: take that entry if it is valid (we converge on it), else put ours in
        its place, so that a forged entry cannot hide the record from a resync."""
        value = await engine.state_entry(str(decode_record(item.body, item.signature)[1].id))
        result = ApplyResult.REJECTED
        if value is not None:
            try:
                body, sig = unpack_state(value)
            except EncodingError:
                pass
            else:
                result = await self._apply("rec", body, sig)
        if result is ApplyResult.REJECTED and await engine.replace_state(item):
            log.warning(
                "group %s: the engine's state held an invalid entry for a record; replaced",
                self._link.group_id,
            )

    # -- reading --------------------------------------------------------------------------

    async def _read_loop(self, engine: EngineLog) -> None:
        link = self._link
        known = await link.engine_epoch()
        self._position = await link.position()
        while True:
            read = await engine.read(self._position or "0-0", READ_BATCH)
            if read.epoch != known:
                if known is not None:
                    self._resets += 1
                    log.warning(
                        "group %s: engine %s lost its data; republishing all this member holds",
                        link.group_id,
                        self.display_url,
                    )
                    await link.republish_all()
                await self._resync(engine, "first connection" if known is None else "reset")
                await link.set_engine_epoch(read.epoch)
                known = read.epoch
            elif self._epoch != read.epoch:
                self._epoch = read.epoch
                self._notify()
            elif self._position is None:
                await self._resync(engine, "no position")
            elif self._trimmed(read):
                await self._resync(engine, "the log was trimmed past this member's position")
            elif read.entries:
                await self._apply_entries(engine, read)
            else:
                self._notify()
                await engine.wait(self._position)

    def _trimmed(self, read: ReadResult) -> bool:
        """Whether entries after our position may have been trimmed away."""
        assert self._position is not None
        if read.length == 0 or read.first is None:
            return self._position != "0-0"
        if read.added == read.length:  # nothing was ever removed (Redis 7 counts)
            return False
        return read.first > stream_id(self._position)

    async def _apply_entries(self, engine: EngineLog, read: ReadResult) -> None:
        items = []
        for entry in read.entries:
            parts = entry.parts()
            if isinstance(parts, str):
                self._reject(f"log entry {entry.id}: {parts}")
            else:
                items.append(parts)
        results = await self._apply_all(items)
        for (kind, body, sig), result in zip(items, results, strict=True):
            if kind == "rec" and result is ApplyResult.REJECTED:
                await self._repair_state(engine, body, sig)
        self._position = read.entries[-1].id
        await self._link.set_position(self._position)
        self._notify()

    async def _apply_all(self, items: list[tuple[str, bytes, bytes]]) -> list[ApplyResult]:
        """Apply in order, in one call to the store; the result of each."""
        if len(items) < 2:
            return [await self._apply(*item) for item in items]
        try:
            results = await self._link.apply_many(items)
        except (RecordsError, ValueError):  # find the culprit one by one
            return [await self._apply(*item) for item in items]
        for result in results:
            self._count(result)
        return results

    async def _repair_state(self, engine: EngineLog, body: bytes, sig: bytes) -> None:
        """A refused record may also have taken the engine's state for its id (the
        state keeps what claims the latest version): put back the version this
        member holds, so that members who read the state are not left without it."""
        try:
            _, record = decode_record(body, sig)
        except EncodingError:
            return
        if await engine.state_entry(str(record.id)) != pack_state(body, sig):
            return
        held = await self._link.held(str(record.id))
        if held is not None and await engine.replace_state(
            Shadowed(held[0], held[1], sort_key_text(record).encode())
        ):
            log.warning(
                "group %s: the engine's state held a refused version of record %s; "
                "put back the one held here",
                self._link.group_id,
                record.id,
            )

    async def _apply(self, kind: str, body: bytes, sig: bytes, count: bool = True) -> ApplyResult:
        try:
            result = await self._link.apply(kind, body, sig)
        except (RecordsError, ValueError) as e:
            self._reject(f"a {kind} the store refused: {e}")
            return ApplyResult.REJECTED
        if count:
            self._count(result)
        return result

    def _count(self, result: ApplyResult) -> None:
        if result is ApplyResult.APPLIED:
            self._applied += 1
        elif result is ApplyResult.STALE:
            self._stale += 1
        else:
            self._rejected += 1

    def _reject(self, why: str) -> None:
        """Something malformed from the engine: counted; the first few are logged."""
        self._rejected += 1
        self._malformed += 1
        if self._logged_rejections < LOGGED_REJECTIONS:
            self._logged_rejections += 1
            last = self._logged_rejections == LOGGED_REJECTIONS
            more = " (further ones are only counted)" if last else ""
            log.warning("group %s: rejected from the engine: %s%s", self._link.group_id, why, more)

    # -- resync ---------------------------------------------------------------------------

    async def _resync(self, engine: EngineLog, reason: str) -> None:
        """Read the whole state: credentials, revocations, then every live record;
        then follow the log from its end before the reading began."""
        self._resyncs += 1
        log.info("group %s: reading the engine's state (%s)", self._link.group_id, reason)
        _, last = await engine.mark()
        for kind, key in (("cred", engine.creds), ("revoke", engine.revoked)):
            blobs: list[bytes] = []
            async for batch in engine.scan(key):
                blobs += (b for b in batch if isinstance(b, bytes) and b)
                if len(blobs) > MAX_BLOBS:  # anyone who can write to Redis can add junk
                    log.warning(
                        "group %s: the engine holds more than %d %s entries; reading the first %d",
                        self._link.group_id,
                        MAX_BLOBS,
                        kind,
                        MAX_BLOBS,
                    )
                    del blobs[MAX_BLOBS:]
                    break
            await self._apply_blobs(kind, blobs)
        now = micros(self._clock.now())
        async for batch in engine.scan(engine.state):
            items = []
            for value in batch:
                try:
                    body, sig = unpack_state(value)
                    _, record = decode_record(body, sig)
                except EncodingError as e:
                    self._reject(f"a state entry: {e}")
                    continue
                if micros(record.expires) > now:
                    items.append(("rec", body, sig))
            await self._apply_all(items)
        self._position = last
        await self._link.set_position(last)
        self._notify()

    async def _apply_blobs(self, kind: str, blobs: list[bytes]) -> None:
        """A credential can only be checked once its issuer's is known: in order of
        issue (what does not parse last: the store rejects it cheaply), then round
        again while some are applied."""
        parse = Credential.from_bytes if kind == "cred" else Revocation.from_bytes
        last = datetime.max.replace(tzinfo=UTC)
        dated: list[tuple[datetime, int, bytes]] = []
        for i, blob in enumerate(blobs):
            try:
                item = parse(blob)
                when = item.issued if isinstance(item, Credential) else item.revoked
            except RecordsError:
                when = last
            dated.append((when, i, blob))
        blobs = [blob for _, _, blob in sorted(dated)]
        while blobs:
            left = []
            for blob in blobs:
                result = await self._apply(kind, blob, b"", count=False)
                if result is ApplyResult.REJECTED:
                    left.append(blob)
                else:
                    self._count(result)
            if len(left) == len(blobs):
                self._rejected += len(left)
                return
            blobs = left

    # -- expiry ---------------------------------------------------------------------------

    async def _janitor_loop(self, engine: EngineLog) -> None:
        """Remove expired records from the engine's state, a bounded batch at a time."""
        while True:
            now = micros(self._clock.now())
            while await engine.expire(now, JANITOR_BATCH) == JANITOR_BATCH:
                pass
            await trio.sleep(JANITOR_EVERY)
