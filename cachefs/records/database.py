"""A member's record database: one SQLite file per group membership.

Tables: ``records`` (every field of the latest version held of each record,
tombstones included, until it expires), ``attrs`` (the search index, see
cachefs.records.search), ``credentials`` and ``revocations`` (verified
blobs), ``meta`` (the replication position, the engine's epoch) and
``outbox`` (local changes the engine has not acknowledged yet, in order).

A record and its index rows and its outbox entry are written in one
transaction, with ``synchronous=FULL``: a change that returned is on disk,
and is published after a crash.  The class is synchronous and not
thread-safe: the store runs every call in one worker thread at a time.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cachefs.records.attributes import Attribute, parse_attributes
from cachefs.records.errors import GroupError
from cachefs.records.model import Record, RecordFlags, from_micros, micros
from cachefs.records.search import ATTRS_SCHEMA, index_rows

__all__ = ["Database", "Outgoing", "digest"]

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        id TEXT PRIMARY KEY, type TEXT NOT NULL, version INTEGER NOT NULL,
        flags INTEGER NOT NULL, creator TEXT NOT NULL, modified_by TEXT NOT NULL,
        attributes TEXT NOT NULL, created INTEGER NOT NULL, modified INTEGER NOT NULL,
        expires INTEGER NOT NULL, data BLOB NOT NULL, signature BLOB NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS records_type ON records(type, id)",
    "CREATE INDEX IF NOT EXISTS records_expires ON records(expires)",
    "CREATE INDEX IF NOT EXISTS records_creator ON records(creator, flags)",
    # searches on the reserved attributes (peerlastmodifiedby, peercreationtime, ...)
    "CREATE INDEX IF NOT EXISTS records_modified_by ON records(modified_by)",
    "CREATE INDEX IF NOT EXISTS records_created ON records(created)",
    "CREATE INDEX IF NOT EXISTS records_modified ON records(modified)",
    "CREATE TABLE IF NOT EXISTS credentials (digest TEXT PRIMARY KEY, blob BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS revocations (digest TEXT PRIMARY KEY, blob BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # key: the record id, or the blob's digest: a newer entry replaces a queued one
    """CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL, body BLOB NOT NULL, signature BLOB NOT NULL, key TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS outbox_key ON outbox(key)",
    *ATTRS_SCHEMA,
)
_COLUMNS = (
    "id, type, version, flags, creator, modified_by, attributes, created, modified, "
    "expires, data, signature"
)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One entry of the outbox: what the replication publishes, in ``seq`` order."""

    seq: int
    kind: str  # "rec", "cred", "revoke"
    body: bytes
    signature: bytes


def _row(record: Record) -> tuple[object, ...]:
    assert record.id is not None and record.created is not None and record.modified is not None
    return (
        str(record.id),
        str(record.type),
        record.version,
        int(record.flags),
        record.creator,
        record.modified_by,
        record.attributes,
        micros(record.created),
        micros(record.modified),
        micros(record.expires),
        record.data,
        record.signature,
    )


def _record(row: Sequence[object]) -> Record:
    rid, rtype, version, flags, creator, modified_by, attrs, created, modified, expires = row[:10]
    data, signature = row[10], row[11]
    assert isinstance(version, int) and isinstance(flags, int)
    assert isinstance(created, int) and isinstance(modified, int) and isinstance(expires, int)
    assert isinstance(data, bytes) and isinstance(signature, bytes)
    return Record(
        type=uuid.UUID(str(rtype)),
        expires=from_micros(expires),
        attributes=str(attrs),
        data=data,
        flags=RecordFlags(flags),
        id=uuid.UUID(str(rid)),
        version=version,
        creator=str(creator),
        modified_by=str(modified_by),
        created=from_micros(created),
        modified=from_micros(modified),
        signature=signature,
    )


def digest(blob: bytes) -> str:
    """What identifies a credential or revocation blob (in its table and the outbox)."""
    return hashlib.sha256(blob).hexdigest()


class Database:
    def __init__(self, path: Path | str) -> None:
        if path != ":memory:":
            path = Path(path)
            # 0600 before SQLite opens it: its -wal and -shm files take its mode
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            except OSError as e:
                raise GroupError(f"cannot open the record database {path}: {e.strerror}") from e
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            for statement in _SCHEMA:
                self._db.execute(statement)
        except sqlite3.DatabaseError as e:
            raise GroupError(f"the record database {path} is unusable: {e}") from e

    def close(self) -> None:
        self._db.close()

    # -- records -----------------------------------------------------------------------

    def get(self, record_id: uuid.UUID) -> Record | None:
        """The version held, tombstone or not, expired or not."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE id = ?", (str(record_id),)
        ).fetchone()
        return None if row is None else _record(row)

    def put(
        self,
        record: Record,
        outgoing: tuple[str, bytes, bytes] | None = None,
        replaces: Record | None = None,
    ) -> bool:
        """Store this version, its index rows, and (a local change) its outbox entry,
        in one transaction, if the version held is still *replaces* (None: no row at
        all); False if another process changed it since."""
        with self._transaction():
            row = self._db.execute(
                "SELECT version, signature FROM records WHERE id = ?", (str(record.id),)
            ).fetchone()
            expected = None if replaces is None else (replaces.version, replaces.signature)
            if (None if row is None else (row[0], bytes(row[1]))) != expected:
                return False
            self._store(record)
            if outgoing is not None:
                self._enqueue(*outgoing, str(record.id))
        return True

    def _store(self, record: Record, attrs: Sequence[Attribute] | None = None) -> None:
        rid = str(record.id)
        rows = []
        if not record.deleted:
            if attrs is None:
                attrs = parse_attributes(record.attributes)
            rows = index_rows(rid, attrs)  # the reserved ones are the header's columns
        self._db.execute(
            f"INSERT OR REPLACE INTO records ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            _row(record),
        )
        self._db.execute("DELETE FROM attrs WHERE record_id = ?", (rid,))
        self._db.executemany("INSERT INTO attrs VALUES (?,?,?,?,?)", rows)

    def put_many(
        self, records: Sequence[tuple[Record, Sequence[Attribute], bytes]], outbox: bool = False
    ) -> None:
        """Store these versions from elsewhere (with their parsed attributes and their
        canonical body) in one transaction; with *outbox*, queue them for the engine."""
        if not records:
            return
        with self._transaction():
            for record, attrs, body in records:
                self._store(record, attrs)
                if outbox:
                    self._enqueue("rec", body, record.signature, str(record.id))

    def remove_versions(self, records: Sequence[Record]) -> None:
        """Remove these versions (one that failed its checks), not a newer one."""
        with self._transaction():
            for record in records:
                gone = self._db.execute(
                    "DELETE FROM records WHERE id = ? AND version = ? AND signature = ?",
                    (str(record.id), record.version, record.signature),
                ).rowcount
                if gone:
                    self._db.execute("DELETE FROM attrs WHERE record_id = ?", (str(record.id),))

    def get_live(self, record_id: uuid.UUID, now_us: int) -> list[Record]:
        """The record if it is live (no tombstone, not expired): a list of one or none."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE id = ? AND flags & 2 = 0 AND expires > ?",
            (str(record_id), now_us),
        ).fetchone()
        return [] if row is None else [_record(row)]

    def live_page(
        self, record_type: uuid.UUID | None, after: str, limit: int, now_us: int
    ) -> list[Record]:
        """Live records (not tombstones, not expired) in id order after *after*."""
        where = "id > ? AND flags & 2 = 0 AND expires > ?"
        params: list[object] = [after, now_us]
        if record_type is not None:
            where = "type = ? AND " + where
            params.insert(0, str(record_type))
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE {where} ORDER BY id LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_record(r) for r in rows]

    def search(self, subquery: str, params: Sequence[object], now_us: int) -> list[Record]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE id IN ({subquery}) "
            "AND flags & 2 = 0 AND expires > ? ORDER BY id",
            (*params, now_us),
        ).fetchall()
        return [_record(r) for r in rows]

    def expire(self, now_us: int) -> list[Record]:
        """Remove the records (and tombstones) whose expiration has passed, at most
        1000 at a time; returns them."""
        query = f"SELECT {_COLUMNS} FROM records WHERE expires <= ? ORDER BY expires LIMIT 1000"
        if self._db.execute(query, (now_us,)).fetchone() is None:
            return []  # nothing due: no write transaction
        with self._transaction():
            rows = self._db.execute(query, (now_us,)).fetchall()
            for row in rows:
                self._db.execute("DELETE FROM records WHERE id = ?", (row[0],))
                self._db.execute("DELETE FROM attrs WHERE record_id = ?", (row[0],))
        return [_record(r) for r in rows]

    def next_expiry(self) -> int | None:
        row = self._db.execute("SELECT MIN(expires) FROM records").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def autorefreshed(self, creator: str) -> list[Record]:
        """This creator's live AUTOREFRESH records."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM records WHERE creator = ? AND flags & 3 = 1", (creator,)
        ).fetchall()
        return [_record(r) for r in rows]

    def all_records(self) -> Iterator[Record]:
        """Every record held, tombstones included, in id order (pages, so that a big
        database is not read at once)."""
        after = ""
        while True:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM records WHERE id > ? ORDER BY id LIMIT 500", (after,)
            ).fetchall()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            after = str(rows[-1][0])

    def counts(self, now_us: int) -> tuple[int, int]:
        """(live records, tombstones)."""
        live, dead = self._db.execute(
            "SELECT COALESCE(SUM(flags & 2 = 0), 0), COALESCE(SUM(flags & 2 != 0), 0) "
            "FROM records WHERE expires > ?",
            (now_us,),
        ).fetchone()
        return int(live), int(dead)

    # -- credentials and revocations ---------------------------------------------------

    def add_blob(self, table: str, blob: bytes, outgoing: str | None = None) -> None:
        assert table in ("credentials", "revocations")
        with self._transaction():
            self._db.execute(
                f"INSERT OR IGNORE INTO {table} (digest, blob) VALUES (?, ?)",
                (digest(blob), blob),
            )
            if outgoing is not None:
                self._enqueue(outgoing, blob, b"", digest(blob))

    def blobs(self, table: str) -> list[bytes]:
        assert table in ("credentials", "revocations")
        return [bytes(r[0]) for r in self._db.execute(f"SELECT blob FROM {table} ORDER BY rowid")]

    # -- meta and outbox ---------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str | None) -> None:
        if value is None:
            self._db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def queue(self, entries: Sequence[tuple[str, bytes, bytes, str]]) -> None:
        """Queue (kind, body, signature, key) entries for the engine."""
        with self._transaction():
            for entry in entries:
                self._enqueue(*entry)

    def _enqueue(self, kind: str, body: bytes, signature: bytes, key: str) -> None:
        # one entry per record (its latest version) or blob: the outbox of a member
        # offline for long stays as big as what it changed, not how often
        self._db.execute("DELETE FROM outbox WHERE key = ?", (key,))
        self._db.execute(
            "INSERT INTO outbox (kind, body, signature, key) VALUES (?,?,?,?)",
            (kind, body, signature, key),
        )

    def pending(self, limit: int) -> list[Outgoing]:
        rows = self._db.execute(
            "SELECT seq, kind, body, signature FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [Outgoing(int(s), str(k), bytes(b), bytes(g)) for s, k, b, g in rows]

    def published(self, seqs: Sequence[int]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seqs])

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    # -- plumbing ----------------------------------------------------------------------

    def explain(self, subquery: str, params: Sequence[object], now_us: int) -> list[str]:
        """The query plan of a search, for tests that check searches are indexed."""
        rows = self._db.execute(
            f"EXPLAIN QUERY PLAN SELECT {_COLUMNS} FROM records WHERE id IN ({subquery}) "
            "AND flags & 2 = 0 AND expires > ? ORDER BY id",
            (*params, now_us),
        ).fetchall()
        return [str(r[-1]) for r in rows]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def reading(self) -> _Transaction:
        """``with db.reading():`` one consistent view of the database for several reads
        (another process may be writing it)."""
        return _Transaction(self._db, "BEGIN DEFERRED")


class _Transaction:
    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self._db = db
        self._begin = begin

    def __enter__(self) -> None:
        self._db.execute(self._begin)

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
