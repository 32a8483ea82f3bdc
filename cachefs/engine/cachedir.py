"""Opening a cache directory: lock it, load or rebuild its index, repair drift.

Layout: ``lock`` (flock held by the live process, its pid inside),
``index.sqlite3`` (metadata), ``data/<row id>`` (block bytes).  Anything that
cannot be trusted is dropped, never served: an unreadable index is moved
aside and the cache starts empty; a data file that does not match its row
loses its bitmap; data files without a row are deleted.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import time
from array import array
from pathlib import Path

from cachefs.engine.index import SCHEMA_VERSION, CachedFile, Index, block_count
from cachefs.engine.store import DataFile
from cachefs.errors import CacheDirError, CacheDirInUse

log = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite3"


def lock_cache_dir(cache_dir: Path) -> int:
    """Take the cache dir's lock; return the fd that holds it."""
    if not cache_dir.exists():
        raise CacheDirError(f"cache dir {cache_dir} does not exist")
    if not cache_dir.is_dir():
        raise CacheDirError(f"cache dir {cache_dir} is not a directory")
    try:
        fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise CacheDirError(f"cache dir {cache_dir} is not usable: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CacheDirInUse(
            f"cache dir {cache_dir} is in use by another cachefs process (pid {pid})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if not os.access(cache_dir, os.W_OK):
        os.close(fd)
        raise CacheDirError(f"cache dir {cache_dir} is not writable")
    return fd


def open_index(
    cache_dir: Path, block_size: int
) -> tuple[Index, list[CachedFile], str | None, list[CachedFile]]:
    """Open (or rebuild) the index.

    Returns it with its checked rows, the storage latch, and the rows the
    check repaired (to be written back).
    """
    data_dir = cache_dir / "data"
    db_path = cache_dir / INDEX_NAME
    fresh = not db_path.exists()
    try:
        data_dir.mkdir(mode=0o700, exist_ok=True)
        index, files, external_error = _load(db_path, block_size)
    except sqlite3.DatabaseError as e:
        log.warning("cache index %s is unreadable (%s): starting with an empty cache", db_path, e)
        _move_aside(db_path)
        fresh = True
        index, files, external_error = _load(db_path, block_size)
    except OSError as e:
        raise CacheDirError(f"cache dir {cache_dir} is not usable: {e}") from None
    if fresh:
        # Data without the index that vouched for it cannot be trusted.
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(mode=0o700, exist_ok=True)
    repaired = _repair(data_dir, files, block_size)
    return index, files, external_error, repaired


def _load(db_path: Path, block_size: int) -> tuple[Index, list[CachedFile], str | None]:
    index = Index(db_path)
    try:
        index.check()
        schema, old_bs = index.get_meta("schema"), index.get_meta("block_size")
        if schema not in (None, SCHEMA_VERSION) or old_bs not in (None, str(block_size)):
            log.warning(
                "cache %s was made with block size %s (schema %s): starting it afresh",
                db_path.parent,
                old_bs,
                schema,
            )
            index.wipe()
            shutil.rmtree(db_path.parent / "data", ignore_errors=True)
            (db_path.parent / "data").mkdir(mode=0o700, exist_ok=True)
        index.set_meta("schema", SCHEMA_VERSION)
        index.set_meta("block_size", str(block_size))
        return index, index.load(), index.get_meta("external_error")
    except BaseException:
        index.close()
        raise


def _move_aside(db_path: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = db_path.with_name(db_path.name + suffix)
        try:
            p.rename(p.with_name(f"{p.name}.corrupt-{stamp}"))
        except FileNotFoundError:
            pass


def _repair(data_dir: Path, files: list[CachedFile], block_size: int) -> list[CachedFile]:
    """Drop bitmaps that do not match their data file; delete orphan data files."""
    repaired = []
    rows = {str(cf.row_id) for cf in files}
    for entry in os.scandir(data_dir):
        if entry.name not in rows:
            log.info("removing orphan cache data file %s", entry.path)
            _unlink(entry.path)
    for cf in files:
        path = data_dir / str(cf.row_id)
        cf.data = DataFile(path, cf.size)
        n = block_count(cf.size, block_size)
        sane = len(cf.present) == n and not cf.present.translate(None, b"\x00\x01")
        if sane and 1 not in cf.present:
            continue
        try:
            sane = sane and os.stat(path).st_size == cf.size
        except FileNotFoundError:
            sane = False
        if not sane:
            log.warning("cache data of %s does not match its index: dropping it", cf.file_id)
            cf.present = bytearray(n)
            cf.atime = array("Q", bytes(8 * n))
            cf.zero_from = None
            _unlink(path)
            repaired.append(cf)
    return repaired


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
