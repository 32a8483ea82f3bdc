"""Cache metadata in SQLite (WAL): files, versions, block bitmaps, latches.

The engine keeps every row in memory (:class:`CachedFile`) and serves hits
from that mirror; SQLite is written only in batches by the flusher and when
a latch is set.  Lock order: the engine's trio code is single-threaded; this
module's connection is used from one worker thread at a time (the engine
holds ``Index.lock`` around every call).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from cachefs.contract import FileAttrs, FileKind
from cachefs.engine.state.inflight import Fetch
from cachefs.engine.state.store import NO_HASH, DataFile

if TYPE_CHECKING:
    from cachefs.engine.state.crypto import CacheKey

log = logging.getLogger(__name__)

SCHEMA_VERSION = "2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    file_id TEXT UNIQUE NOT NULL,
    name BLOB,
    version TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    mode INTEGER NOT NULL,
    zero_from INTEGER,
    error TEXT,
    pinned INTEGER NOT NULL,
    present BLOB NOT NULL,
    hashes BLOB,
    content_hash BLOB
);
"""


@dataclass(slots=True, eq=False)
class CachedFile:
    """What the cache holds of one version of one file.

    ``present`` has one byte per block: 1 once the block's bytes are in the
    data file.  ``zero_from`` is where the backend said the data ends
    (RANGE_BEYOND_EOF): below the known size, everything from there reads as
    zeros without asking the backend.

    ``hashes`` holds the SHA-256 of each block (32 bytes each, zeros where
    unknown): recorded as blocks arrive, or the source's content information
    when ``content_hash`` is set (then every block's hash is known and is
    the authority).  ``verified`` marks the blocks checked in this process.
    ``trusted`` marks the blocks whose hash came with ``add-data --trust``
    rather than from the source: purge drops those hashes with the blocks
    (the others outlive them, so add-data can check against them).
    """

    row_id: int
    file_id: str
    version: str
    size: int
    mtime: float
    mode: int | None
    present: bytearray
    zero_from: int | None = None
    error: str | None = None
    pinned: bool = False
    hashes: bytearray | None = None
    content_hash: bytes | None = None
    trusted: bytearray | None = None
    # Bumped whenever a block stops being present: a read that left the loop
    # checks it to know its bytes were not evicted meanwhile.
    epoch: int = 0
    validated_at: float = float("-inf")
    # No longer the version the catalog serves to new opens: its row is
    # gone, and its data file is removed once no handle reads it.
    retired: bool = False
    # The source answered FILE_MODIFIED_EXTERNALLY for this version: what is
    # not cached of it cannot be had any more.
    gone: bool = False
    # Open handles reading this version (engine.OpenFile): while any is, a
    # retired version's data file stays, so they read what it holds.
    handles: int = 0
    data: DataFile | None = None
    # Made on first use, dropped when empty: a cache may know 100,000s of files.
    # Blocks being fetched or evicted -> the Fetch to wait for.
    inflight: dict[int, Fetch] | None = None
    # Last read of each block, in ticks of the catalog's LRU clock.
    atime: array | None = None
    # Blocks marked present since the data file was last synced.
    unsynced: set[int] | None = None
    # Blocks whose bytes were checked against their hash in this process.
    verified: bytearray | None = None
    # Blocks stored whose hash is still to be taken, each with the hasher's
    # run that will take it (engine/miss/hasher.py): the index shows them as
    # absent until it is.
    unhashed: dict[int, object] | None = None
    # The backend was asked for content information in this process.
    info_asked: bool = False
    # Handles the kernel reads by itself from the data file (engine/hit/whole.py):
    # while any is open, no block of this file is evicted or purged.
    held: int = 0

    def busy(self, b: int) -> Fetch | None:
        """The Fetch holding block *b*, or None."""
        return None if self.inflight is None else self.inflight.get(b)

    def hold(self, fetch: Fetch) -> None:
        """Blocks fetch.first..fetch.last are being fetched or evicted: readers wait."""
        if self.inflight is None:
            self.inflight = {}
        for b in range(fetch.first, fetch.last + 1):
            self.inflight[b] = fetch

    def finish(self, fetch: Fetch) -> None:
        """Let go of what *fetch* held and wake its waiters."""
        inflight = self.inflight
        if inflight is not None:
            for b in range(fetch.first, fetch.last + 1):
                if inflight.get(b) is fetch:
                    del inflight[b]
            if not inflight:
                self.inflight = None
        fetch.done.set()

    def hash_of(self, b: int) -> bytes | None:
        """The known SHA-256 of block *b*, or None."""
        h = self.hashes
        if h is None:
            return None
        out = bytes(h[32 * b : 32 * b + 32])
        return None if out == NO_HASH else out

    @property
    def attrs(self) -> FileAttrs:
        return FileAttrs(FileKind.FILE, self.size, self.mtime, self.version, self.mode)


def block_count(size: int, block_size: int) -> int:
    return (size + block_size - 1) // block_size


def _create_owner_only(path: Path) -> None:
    """Create the database file 0600 if it is missing (SQLite would make it
    0644), and take group and other bits off it if it has them: SQLite
    creates the -wal and -shm files with the database file's mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        mode = os.fstat(fd).st_mode & 0o7777
        if mode & 0o077:
            os.fchmod(fd, mode & ~0o077)
    finally:
        os.close(fd)


class Index:
    """The SQLite side of the metadata.  Every method is blocking."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = trio.Lock()
        _create_owner_only(path)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is durable, so eviction's "commit, then punch"
            # holds across a power cut, not only a crash of the process.
            self._db.execute("PRAGMA synchronous=FULL")
            # Deleted rows are overwritten: a name or hash that left the
            # index is not left on a free page.
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        try:
            self._db.close()
        except sqlite3.Error as e:  # a failed cache disk: what was committed stands
            log.warning("closing the cache index %s: %s", self.path, e)

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

    def load(self, key: CacheKey | None = None) -> tuple[list[CachedFile], list[int]]:
        """The rows that can be trusted, and the ids of those that cannot.

        A row is refused when its sealed fields fail authentication (wrong
        or tampered, with a key) or its hashes do not match its content hash.
        """
        rows = self._db.execute(
            "SELECT id, file_id, name, version, size, mtime, mode, zero_from, error, pinned,"
            " present, hashes, content_hash FROM files"
        )
        out, refused = [], []
        for row in rows:
            cf = _file_of(row, key)
            if cf is None:
                refused.append(row[0])
            else:
                out.append(cf)
        return out, refused

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
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )

    def has_rows(self) -> bool:
        return self._db.execute("SELECT 1 FROM files LIMIT 1").fetchone() is not None

    def wipe(self, keep: tuple[str, ...] = ()) -> None:
        """Drop every file (the table is made anew: older schemas too) and the
        metadata but the *keep* keys."""
        kept = {k: v for k in keep if (v := self.get_meta(k)) is not None}
        self._db.execute("DROP TABLE IF EXISTS files")
        self._db.executescript(_SCHEMA)
        with self._db:
            self._db.execute("DELETE FROM meta")
            self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(kept.items()))


def _file_of(row: tuple, key: CacheKey | None) -> CachedFile | None:
    row_id, file_id, name, version, size, mtime, mode, zero_from, error, pinned = row[:10]
    present, hashes, content_hash = row[10:]
    if key is not None:
        opened = None if name is None else key.open(name, b"name:%d" % row_id)
        decoded = None if opened is None else opened.decode("utf-8", "surrogateescape")
        if decoded is None or key.name_tag(decoded) != file_id:
            log.warning("cache index row %d fails authentication: dropping it", row_id)
            return None
        file_id = decoded
        if hashes is not None:
            hashes = key.open(hashes, b"hashes:%d" % row_id)
            if hashes is None:
                log.warning("hashes of cache index row %d fail authentication", row_id)
                return None
        if content_hash is not None:
            content_hash = key.open(content_hash, b"content:%d" % row_id)
            if content_hash is None:
                log.warning("content hash of cache index row %d fails authentication", row_id)
                return None
    elif isinstance(file_id, bytes):
        file_id = file_id.decode("utf-8", "surrogateescape")
    trusted = None
    n = len(present)
    if hashes is not None and content_hash is None and len(hashes) == 33 * n:
        hashes, trusted = hashes[: 32 * n], bytearray(hashes[32 * n :])
    if content_hash is not None and (
        hashes is None or hashlib.sha256(hashes).digest() != content_hash
    ):
        log.warning("content information of %s in the cache index is damaged", file_id)
        return None
    return CachedFile(
        row_id=row_id,
        file_id=file_id,
        version=version,
        size=size,
        mtime=mtime,
        mode=None if mode < 0 else mode,
        present=bytearray(present),
        zero_from=zero_from,
        error=error,
        pinned=bool(pinned),
        hashes=None if hashes is None else bytearray(hashes),
        content_hash=content_hash,
        trusted=trusted,
    )


def row_of(cf: CachedFile, synced_only: bool = False, key: CacheKey | None = None) -> tuple:
    """The index row of *cf*; with *synced_only*, unsynced blocks show as absent.

    With a key, the name and the hashes are sealed and the name's tag is
    the lookup column: no file name is stored in clear.
    """
    present = bytearray(cf.present)
    if synced_only and cf.unsynced:
        for b in cf.unsynced:
            present[b] = 0
    if cf.unhashed:  # a later mount would not trust them without a hash
        for b in cf.unhashed:
            present[b] = 0
    file_id: str | bytes = cf.file_id
    name, content_hash = None, cf.content_hash
    hashes = None if cf.hashes is None else bytes(cf.hashes)
    if hashes is not None and cf.trusted is not None and cf.content_hash is None:
        hashes += bytes(cf.trusted)  # one byte a block after the hashes (33 per block)
    if key is not None:
        file_id = key.name_tag(cf.file_id)
        name = key.seal(_encode(cf.file_id), b"name:%d" % cf.row_id)
        if hashes is not None:
            hashes = key.seal(hashes, b"hashes:%d" % cf.row_id)
        if content_hash is not None:
            content_hash = key.seal(content_hash, b"content:%d" % cf.row_id)
    elif not cf.file_id.isascii():
        file_id = _encode(cf.file_id)  # kept as bytes: a name may not be valid UTF-8
    return (
        cf.row_id,
        file_id,
        name,
        cf.version,
        cf.size,
        cf.mtime,
        -1 if cf.mode is None else cf.mode,  # NULL-free column: -1 for unknown
        cf.zero_from,
        cf.error,
        int(cf.pinned),
        bytes(present),
        hashes,
        content_hash,
    )


def _encode(file_id: str) -> bytes:
    """A file id as bytes (a local name that was not UTF-8 round-trips)."""
    return file_id.encode("utf-8", "surrogateescape")
