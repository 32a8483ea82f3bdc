"""A group's keys in Redis and the operations on them, each atomic (a Lua
script) and each within a deadline.

Layout, for group G:
- ``cachefs:G:log``: the change log, a stream of {kind, body, sig} (kind
  rec, cred or revoke; sig empty for the self-signed cred and revoke
  blobs), trimmed to about ``maxlen`` entries.
- ``cachefs:G:state``: record id -> its winning version (4-byte big-endian
  length of the body, the body, the signature); ``cachefs:G:order``: record
  id -> that version's sort key text; ``cachefs:G:expiry``: sorted set of
  record ids by expiration (microseconds since the epoch).  A record enters
  the state, and the log, only if it wins over the version there, by the
  order of ``Record.sort_key``: the state converges however publishes
  interleave.
- ``cachefs:G:creds``, ``cachefs:G:revoked``: every credential and
  revocation published, keyed by the SHA-256 of the blob (a member may hold
  several credentials; nothing published is ever overwritten).
- ``cachefs:G:epoch``: a random token set once; gone or changed means the
  engine lost its data.

Everything read here is untrusted: replies of the wrong shape raise
``BadReply``; entry contents are the caller's to check.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import trio
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy

from cachefs.records.model import EncodingError, Record, decode_record, micros

__all__ = [
    "ENGINE_ERRORS",
    "BadReply",
    "EngineLog",
    "ReadResult",
    "StreamId",
    "pack_state",
    "redact",
    "sort_key_text",
    "stream_id",
    "unpack_state",
]

T = TypeVar("T")
CALL_DEADLINE = 5.0  # seconds, any one call to the engine
BLOCK_MS = 1000  # a blocking read waits at most this long, so cancellation is prompt
# a log entry larger than the group's largest record (plus room for its fields) is junk
DEFAULT_MAX_ENTRY = (1 << 20) + (64 << 10)
READ_BUDGET = 8 << 20  # bytes of entries one read returns (at least one entry)
KINDS = ("rec", "cred", "revoke")
StreamId = tuple[int, int]
Value = str | bytes | int
_LEN = struct.Struct(">I")

# Lua compares strings with strcoll (the server's locale): compare bytes instead.
_NEWER = """
local function newer(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end
"""
# KEYS log state order expiry; ARGV maxlen body sig id sortkey expires(us) statevalue
# Every change goes into the log (members decide by version what wins); the state
# takes it only if it sorts after what the state holds.  Returns 1 if the state took
# it, else the state's sort key (which the publisher checks: a forged one is replaced).
_PUBLISH_RECORD = (
    _NEWER
    + """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'kind', 'rec', 'body', ARGV[2],
           'sig', ARGV[3])
local held = redis.call('HGET', KEYS[3], ARGV[4])
if held and not newer(ARGV[5], held) then return held end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[7])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[6], ARGV[4])
return 1
"""
)
# KEYS state order expiry; ARGV id expected-sortkey sortkey expires(us) statevalue:
# replace the state of one record if it still is what the publisher found invalid
_REPLACE_STATE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
"""
# KEYS log hash; ARGV maxlen kind blob field
_PUBLISH_BLOB = """
if redis.call('HSETNX', KEYS[2], ARGV[4], ARGV[3]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'kind', ARGV[2], 'body', ARGV[3],
           'sig', '')
return 1
"""
_EPOCH = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  redis.call('SET', KEYS[2], ARGV[1])
  epoch = ARGV[1]
end
"""
# KEYS log epoch; ARGV new-epoch position count -> {epoch, length, added, first id, entries}
_READ = (
    _EPOCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {epoch, 0, 0, false, {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, added, first = 0, 0, false
for i = 1, #info, 2 do
  local k = info[i]
  if k == 'length' then length = info[i + 1]
  elseif k == 'entries-added' then added = info[i + 1]
  elseif k == 'first-entry' and info[i + 1] then first = info[i + 1][1] end
end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], '+', 'COUNT', ARGV[3])
-- bounded replies: an entry over ARGV[4] bytes comes as kind "oversize" (refused),
-- and a reply stops once past ARGV[5] bytes (the rest comes with the next read)
local out, total = {}, 0
local cap, budget = tonumber(ARGV[4]), tonumber(ARGV[5])
for i, e in ipairs(entries) do
  local size = 0
  for j = 1, #e[2] do size = size + #e[2][j] end
  if size > cap then
    e = {e[1], {'kind', 'oversize'}}
    size = 0
  end
  if i > 1 and total + size > budget then break end
  total = total + size
  out[#out + 1] = e
end
return {epoch, length, added, first, out}
"""
)
# KEYS log epoch; ARGV new-epoch -> {epoch, last id}
_MARK = (
    _EPOCH
    + """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last == 0 then return {epoch, '0-0'} end
return {epoch, last[1][1]}
"""
)
# KEYS state order expiry; ARGV now(us) limit
_EXPIRE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
return #ids
"""


class BadReply(Exception):
    """The engine answered something that is not what the layout holds."""


# What engine trouble looks like; anything else is a bug, or the store's trouble.
ENGINE_ERRORS = (
    RedisError,
    OSError,
    trio.TooSlowError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
    anyio.EndOfStream,
    BadReply,
)


def sort_key_text(record: Record) -> str:
    """``record.sort_key()`` as a string of [0-9a-f] whose byte order is the
    tuple's order (what the engine compares)."""
    version, modified, modified_by, signature = record.sort_key()
    by = "".join(f"1{b:02x}" for b in modified_by.encode()) + "0"  # a prefix sorts first
    return f"{version:020d}{modified + (1 << 63):020d}{by}{signature.hex()}"


@dataclass(frozen=True)
class Shadowed:
    """A record published to the log whose state entry was kept: the state's sort
    key for it claims a later version, which the publisher checks."""

    body: bytes
    signature: bytes
    held_key: bytes


def pack_state(body: bytes, signature: bytes) -> bytes:
    return _LEN.pack(len(body)) + body + signature


def unpack_state(value: object) -> tuple[bytes, bytes]:
    """(body, signature) of a state value; EncodingError if it is not one."""
    if not isinstance(value, bytes) or len(value) < _LEN.size:
        raise EncodingError("a state value cut short")
    (n,) = _LEN.unpack_from(value)
    if _LEN.size + n > len(value):
        raise EncodingError("a state value cut short")
    return value[_LEN.size : _LEN.size + n], value[_LEN.size + n :]


def stream_id(raw: object) -> StreamId:
    """A stream id ``ms-seq`` as a pair that orders as the stream does."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ms, sep, seq = text.partition("-")
        if not sep:
            raise ValueError(text)
        return int(ms), int(seq)
    except (UnicodeDecodeError, ValueError):
        raise BadReply(f"not a stream id: {raw!r:.60}") from None


def _text(raw: object) -> str:
    if not isinstance(raw, bytes):
        raise BadReply(f"not a string: {raw!r:.60}")
    return raw.decode("ascii", errors="replace")


def redact(url: str) -> str:
    """The engine URL as it may be shown: without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rpartition("@")[2]))


async def call(aw: Awaitable[T], deadline: float = CALL_DEADLINE) -> T:
    with trio.fail_after(deadline):
        return await aw


@dataclass(frozen=True)
class Entry:
    """One log entry: ``fields`` as read (untrusted), None if not even pairs."""

    id: str
    fields: dict[Any, Any] | None

    def parts(self) -> tuple[str, bytes, bytes] | str:
        """(kind, body, sig), or why the entry is malformed."""
        if self.fields is None:
            return "not field/value pairs"
        kind, body, sig = (self.fields.get(k) for k in (b"kind", b"body", b"sig"))
        if not (isinstance(body, bytes) and isinstance(sig, bytes) and body):
            return "missing or empty fields"
        if not isinstance(kind, bytes) or kind.decode("ascii", "replace") not in KINDS:
            return f"unknown kind {kind!r:.40}"
        return kind.decode(), body, sig


@dataclass(frozen=True)
class ReadResult:
    epoch: str
    length: int  # entries in the log
    added: int  # entries ever added (Redis 7; 0 before)
    first: StreamId | None  # the oldest entry's id
    entries: list[Entry]  # after the position read from, oldest first


class EngineLog:
    """The group's keys over one client (entered by the caller)."""

    def __init__(
        self,
        client: coredis.Redis[bytes],
        group_id: str,
        maxlen: int,
        max_entry: int = DEFAULT_MAX_ENTRY,
    ) -> None:
        self.client = client
        self.maxlen = max(1, maxlen)
        self.max_entry = max_entry  # bytes of a log entry read, at most
        prefix = f"cachefs:{group_id}:"
        self.group_id = group_id
        self.log, self.state, self.order = prefix + "log", prefix + "state", prefix + "order"
        self.expiry, self.creds = prefix + "expiry", prefix + "creds"
        self.revoked, self.epoch = prefix + "revoked", prefix + "epoch"
        self._publish_record = client.register_script(_PUBLISH_RECORD)
        self._publish_blob = client.register_script(_PUBLISH_BLOB)
        self._replace_state = client.register_script(_REPLACE_STATE)
        self._read = client.register_script(_READ)
        self._mark = client.register_script(_MARK)
        self._expire = client.register_script(_EXPIRE)

    @staticmethod
    def connect(url: str, connect_timeout: float = CALL_DEADLINE) -> coredis.Redis[bytes]:
        """A client for *url* (redis:// or rediss://, user:password taken from it,
        percent-decoded); enter it with ``async with``.  No retries: the caller has
        its own policy."""
        return coredis.Redis.from_url(
            url,
            decode_components=True,
            decode_responses=False,
            retry_policy=NoRetryPolicy(),
            connect_timeout=connect_timeout,
        )

    async def ping(self) -> None:
        await call(self.client.ping())

    async def publish(
        self, entries: Sequence[tuple[str, bytes, bytes]]
    ) -> tuple[list[str], list[Shadowed]]:
        """Publish (kind, body, sig) entries in order, in one round trip; returns why
        each entry that cannot be published was dropped (the others are), and the
        records whose state entry was kept because it claims a later version."""
        dropped = []
        replies: list[tuple[tuple[str, bytes, bytes], Awaitable[Any]]] = []
        with trio.fail_after(CALL_DEADLINE):
            async with self.client.pipeline(transaction=False) as pipe:
                for kind, body, sig in entries:
                    why, reply = self._queue(pipe, kind, body, sig)
                    if why:
                        dropped.append(why)
                    elif reply is not None:
                        replies.append(((kind, body, sig), reply))
            shadowed = []
            for (_, body, sig), reply in replies:
                held = await reply
                if isinstance(held, bytes):
                    shadowed.append(Shadowed(body, sig, held))
        return dropped, shadowed

    async def state_entry(self, record_id: str) -> bytes | None:
        """The state's value for one record (untrusted)."""
        value: Any = await call(self.client.hget(self.state, record_id))
        return value if isinstance(value, bytes) else None

    async def replace_state(self, shadowed: Shadowed) -> bool:
        """Put this record in the state in place of an entry found invalid, unless the
        state changed meanwhile."""
        _, record = decode_record(shadowed.body, shadowed.signature)
        args: list[Value] = [str(record.id), shadowed.held_key, sort_key_text(record)]
        args += [micros(record.expires), pack_state(shadowed.body, shadowed.signature)]
        keys = [self.state, self.order, self.expiry]
        return bool(await call(self._replace_state(keys=keys, args=args)))

    def _queue(
        self, pipe: Any, kind: str, body: bytes, sig: bytes
    ) -> tuple[str | None, Awaitable[Any] | None]:
        if kind in ("cred", "revoke") and body:
            field = hashlib.sha256(body).hexdigest()
            target = self.creds if kind == "cred" else self.revoked
            args: list[Value] = [self.maxlen, kind, body, field]
            self._publish_blob(keys=[self.log, target], args=args, client=pipe)
            return None, None
        try:
            if kind != "rec":
                raise EncodingError(f"unknown kind {kind!r}")
            group_id, record = decode_record(body, sig)
            if group_id != self.group_id:
                raise EncodingError(f"a record of group {group_id}")
        except EncodingError as e:
            return str(e), None
        args = [self.maxlen, body, sig, str(record.id), sort_key_text(record)]
        args += [micros(record.expires), pack_state(body, sig)]
        keys = [self.log, self.state, self.order, self.expiry]
        return None, self._publish_record(keys=keys, args=args, client=pipe)

    async def read(self, position: str, count: int) -> ReadResult:
        """The epoch (set if missing), the log's extent and up to *count* entries
        after *position*, at one instant."""
        args: list[Value] = [uuid.uuid4().hex, position, count, self.max_entry, READ_BUDGET]
        reply: Any = await call(self._read(keys=[self.log, self.epoch], args=args))
        if not (isinstance(reply, list) and len(reply) == 5):
            raise BadReply(f"unexpected reply to a read: {reply!r:.100}")
        epoch, length, added, first, raw_entries = reply
        if not (isinstance(length, int) and isinstance(added, int)):
            raise BadReply(f"unexpected reply to a read: {reply!r:.100}")
        if not isinstance(raw_entries, list):
            raise BadReply(f"unexpected reply to a read: {reply!r:.100}")
        entries = []
        for raw in raw_entries:
            if not (isinstance(raw, list) and len(raw) == 2):
                raise BadReply(f"unexpected stream entry: {raw!r:.100}")
            entry_id, values = _text(raw[0]), raw[1]
            stream_id(entry_id)
            fields = None
            if isinstance(values, list) and len(values) % 2 == 0:
                fields = dict(zip(values[::2], values[1::2], strict=True))
            entries.append(Entry(entry_id, fields))
        first_id = None if first is None else stream_id(first)
        return ReadResult(_text(epoch), length, added, first_id, entries)

    async def mark(self) -> tuple[str, str]:
        """The epoch (set if missing) and the last id of the log ("0-0" if empty)."""
        reply: Any = await call(self._mark(keys=[self.log, self.epoch], args=[uuid.uuid4().hex]))
        if not (isinstance(reply, list) and len(reply) == 2):
            raise BadReply(f"unexpected reply to a mark: {reply!r:.100}")
        stream_id(reply[1])
        return _text(reply[0]), _text(reply[1])

    async def wait(self, position: str) -> None:
        """Return when an entry is appended to the log, or after a second (the caller
        has read up to *position*).  Blocks for entries newer than the call ("$"),
        not from *position*: the entries themselves are read by ``read``, which
        bounds their size; here at most one new entry comes back, unread."""
        await call(
            self.client.xread({self.log: "$"}, count=1, block=BLOCK_MS),
            BLOCK_MS / 1000 + CALL_DEADLINE,
        )

    async def scan(self, key: str, batch: int = 500) -> AsyncIterator[list[Any]]:
        """The values of hash *key*, a batch at a time (HSCAN: each value at least once)."""
        cursor: int | None = None
        while cursor != 0:
            cursor, data = await call(self.client.hscan(key, cursor=cursor, count=batch))
            if not isinstance(data, dict):
                raise BadReply(f"unexpected reply to HSCAN {key}")
            yield list(data.values())

    async def expire(self, now: int, limit: int) -> int:
        """Remove up to *limit* records expired at *now* (µs) from the state; how many."""
        keys = [self.state, self.order, self.expiry]
        removed: Any = await call(self._expire(keys=keys, args=[now, limit]))
        if not isinstance(removed, int):
            raise BadReply(f"unexpected reply to an expiry: {removed!r:.60}")
        return removed
