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
from pathlib import Path

from cachefs.engine.index import SCHEMA_VERSION, CachedFile, Index, block_count
from cachefs.engine.store import DataFile, page_end, punch_holes
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
    """Make the index and the data files agree; return the rows changed.

    A bitmap whose data file is missing or of the wrong size is dropped; data
    files without a row are deleted; space held by blocks the index does not
    mark (a fill interrupted by a crash) is given back.
    """
    repaired = []
    rows = {str(cf.row_id) for cf in files}
    on_disk: dict[str, os.stat_result] = {}
    with os.scandir(data_dir) as it:
        for entry in it:
            if entry.name in rows:
                on_disk[entry.name] = entry.stat()
            else:
                log.info("removing orphan cache data file %s", entry.path)
                _unlink(entry.path)
    for cf in files:
        name = str(cf.row_id)
        path = f"{data_dir}/{name}"
        cf.data = DataFile(path, cf.size)
        n = block_count(cf.size, block_size)
        st = on_disk.get(name)
        sane = len(cf.present) == n and not cf.present.translate(None, b"\x00\x01")
        if 1 in cf.present:
            sane = sane and st is not None and st.st_size == cf.size
        if not sane:
            log.warning("cache data of %s does not match its index: dropping it", cf.file_id)
            cf.present = bytearray(n)
            cf.zero_from = None
            _unlink(path)
            repaired.append(cf)
        elif st is not None and st.st_blocks * 512 > cf.present.count(1) * block_size + 4096:
            _punch_unmarked(path, cf, block_size)
    return repaired


def _punch_unmarked(path: str, cf: CachedFile, block_size: int) -> None:
    """Free the space of blocks written but never marked (drift after a crash)."""
    present, n = cf.present, len(cf.present)
    holes = []
    b = present.find(0)
    while b >= 0:
        end = present.find(1, b)
        end = n if end < 0 else end
        holes.append((b * block_size, page_end(min(end * block_size, cf.size)) - b * block_size))
        b = present.find(0, end) if end < n else -1
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        punch_holes(fd, holes)
    finally:
        os.close(fd)
    log.info("gave back the space of unmarked blocks of %s", cf.file_id)


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
