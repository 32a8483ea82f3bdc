"""Cache metadata in SQLite (WAL): files, versions, block bitmaps, latches.

The engine keeps every row in memory (:class:`CachedFile`) and serves hits
from that mirror; SQLite is written only in batches by the flusher and when
a latch is set.  Lock order: the engine's trio code is single-threaded; this
module's connection is used from one worker thread at a time (the engine
holds ``Index.lock`` around every call).
"""

from __future__ import annotations

import logging
import sqlite3
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from cachefs.contract import FileAttrs, FileKind
from cachefs.engine.store import DataFile

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    file_id TEXT UNIQUE NOT NULL,
    version TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    mode INTEGER NOT NULL,
    zero_from INTEGER,
    error TEXT,
    pinned INTEGER NOT NULL,
    present BLOB NOT NULL
);
"""


@dataclass(slots=True, eq=False)
class CachedFile:
    """What the cache holds of one version of one file.

    ``present`` has one byte per block: 1 once the block's bytes are in the
    data file.  ``zero_from`` is where the backend said the data ends
    (RANGE_BEYOND_EOF): below the known size, everything from there reads as
    zeros without asking the backend.
    """

    row_id: int
    file_id: str
    version: str
    size: int
    mtime: float
    mode: int
    present: bytearray
    zero_from: int | None = None
    error: str | None = None
    pinned: bool = False
    # Bumped whenever a block stops being present: a read that left the loop
    # checks it to know its bytes were not evicted meanwhile.
    epoch: int = 0
    validated_at: float = float("-inf")
    retired: bool = False
    data: DataFile | None = None
    # Made on first use, dropped when empty: a cache may know 100,000s of files.
    # Blocks being fetched or evicted -> the Fetch to wait for.
    inflight: dict[int, Any] | None = None
    # Last read of each block, in ticks of the catalog's LRU clock.
    atime: array | None = None
    # Blocks marked present since the data file was last synced.
    unsynced: set[int] | None = None

    def busy(self, b: int) -> Any:
        """The Fetch holding block *b*, or None."""
        return None if self.inflight is None else self.inflight.get(b)

    def hold(self, first: int, last: int, fetch: Any) -> None:
        if self.inflight is None:
            self.inflight = {}
        for b in range(first, last + 1):
            self.inflight[b] = fetch

    def unhold(self, first: int, last: int, fetch: Any) -> None:
        inflight = self.inflight
        if inflight is None:
            return
        for b in range(first, last + 1):
            if inflight.get(b) is fetch:
                del inflight[b]
        if not inflight:
            self.inflight = None

    @property
    def attrs(self) -> FileAttrs:
        return FileAttrs(FileKind.FILE, self.size, self.mtime, self.version, self.mode)


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


class Index:
    """The SQLite side of the metadata.  Every method is blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = trio.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is durable, so eviction's "commit, then punch"
            # holds across a power cut, not only a crash of the process.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str | None) -> None:
        with self._db:
            if value is None:
                self._db.execute("DELETE FROM meta WHERE key=?", (key,))
            else:
                self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def check(self) -> None:
        """Raise sqlite3.DatabaseError unless the database reads back sane."""
        (result,) = self._db.execute("PRAGMA quick_check").fetchone()
        if result != "ok":
            raise sqlite3.DatabaseError(result)

    def load(self) -> list[CachedFile]:
        rows = self._db.execute(
            "SELECT id, file_id, version, size, mtime, mode, zero_from, error, pinned, present"
            " FROM files"
        )
        out = []
        for row in rows:
            row_id, file_id, version, size, mtime, mode, zero_from, error, pinned, present = row
            out.append(
                CachedFile(
                    row_id=row_id,
                    file_id=file_id,
                    version=version,
                    size=size,
                    mtime=mtime,
                    mode=mode,
                    present=bytearray(present),
                    zero_from=zero_from,
                    error=error,
                    pinned=bool(pinned),
                )
            )
        return out

    def write_batch(self, rows: list[tuple], deleted: list[int]) -> None:
        """Upsert *rows* (as from :func:`row_of`) and delete *deleted* ids, atomically."""
        with self._db:
            if deleted:
                self._db.executemany("DELETE FROM files WHERE id=?", [(i,) for i in deleted])
            if rows:
                # A new version of a file has a new row id: drop the old row first.
                self._db.executemany(
                    "DELETE FROM files WHERE file_id=? AND id<>?", [(r[1], r[0]) for r in rows]
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows
                )

    def wipe(self) -> None:
        with self._db:
            self._db.execute("DELETE FROM files")
            self._db.execute("DELETE FROM meta")


def row_of(cf: CachedFile, synced_only: bool = False) -> tuple:
    """The index row of *cf*; with *synced_only*, unsynced blocks show as absent."""
    present = bytearray(cf.present)
    if synced_only and cf.unsynced:
        for b in cf.unsynced:
            present[b] = 0
    return (
        cf.row_id,
        cf.file_id,
        cf.version,
        cf.size,
        cf.mtime,
        cf.mode,
        cf.zero_from,
        cf.error,
        int(cf.pinned),
        bytes(present),
    )
