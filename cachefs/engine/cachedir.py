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
import hmac
import json
import logging
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from cachefs.engine.crypto import CacheKey, new_salt
from cachefs.engine.index import SCHEMA_VERSION, CachedFile, Index, block_count
from cachefs.engine.store import DataFile, page_end, punch_holes
from cachefs.errors import BadKey, CacheDirError, CacheDirInUse

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


@dataclass
class Opened:
    """What opening a cache directory found."""

    index: Index
    files: list[CachedFile]
    external_error: str | None
    repaired: list[CachedFile]  # rows the check changed, to be written back
    key: CacheKey | None
    next_row: int


def open_index(cache_dir: Path, block_size: int, key_material: bytes | None = None) -> Opened:
    """Open (or rebuild) the index; with *key_material*, an encrypted cache.

    An encrypted cache opened without a key, or with another key, is refused
    (BadKey); an unencrypted cache opened with a key is started afresh.
    Blocking: scrypt and SQLite run here.
    """
    data_dir = cache_dir / "data"
    db_path = cache_dir / INDEX_NAME
    fresh = not db_path.exists()
    try:
        data_dir.mkdir(mode=0o700, exist_ok=True)
        opened = _load(db_path, block_size, key_material)
    except sqlite3.DatabaseError as e:
        log.warning("cache index %s is unreadable (%s): starting with an empty cache", db_path, e)
        _move_aside(db_path)
        fresh = True
        opened = _load(db_path, block_size, key_material)
    except OSError as e:
        raise CacheDirError(f"cache dir {cache_dir} is not usable: {e}") from None
    if fresh:
        # Data without the index that vouched for it cannot be trusted.
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(mode=0o700, exist_ok=True)
    opened.repaired = _repair(data_dir, opened.files, block_size, opened.key)
    return opened


def _load(db_path: Path, block_size: int, key_material: bytes | None) -> Opened:
    cache_dir = db_path.parent
    index = Index(db_path)
    try:
        index.check()
        plain = key_material is not None and index.get_meta("encryption") is None
        if plain and index.has_rows():
            # Encrypting a plain cache: its names must not survive anywhere
            # in the old file (free pages, the WAL), so the file goes.
            log.warning("cache %s holds unencrypted data: starting it afresh, encrypted", cache_dir)
            index.close()
            _remove_index(db_path)
            shutil.rmtree(cache_dir / "data", ignore_errors=True)
            (cache_dir / "data").mkdir(mode=0o700, exist_ok=True)
            index = Index(db_path)
        # The key is checked before anything else may wipe the cache.
        key = _key_of(index, cache_dir, key_material)
        schema, old_bs = index.get_meta("schema"), index.get_meta("block_size")
        if schema not in (None, SCHEMA_VERSION) or old_bs not in (None, str(block_size)):
            log.warning(
                "cache %s was made with block size %s (schema %s): starting it afresh",
                cache_dir,
                old_bs,
                schema,
            )
            index.wipe(keep=("encryption",))
            shutil.rmtree(cache_dir / "data", ignore_errors=True)
            (cache_dir / "data").mkdir(mode=0o700, exist_ok=True)
        index.set_meta("schema", SCHEMA_VERSION)
        index.set_meta("block_size", str(block_size))
        files, refused = index.load(key)
        if refused:
            index.write_batch([], refused)  # their data files go as orphans
        external = index.get_meta("external_error")
        if external is not None and external.startswith("sealed:"):
            opened = None if key is None else key.open(bytes.fromhex(external[7:]), _EXTERNAL)
            external = "PERMANENT_FAILURE" if opened is None else opened.decode()
        next_row = int(index.get_meta("next_row") or 1)
        return Opened(index, files, external, [], key, next_row)
    except BaseException:
        index.close()
        raise


_EXTERNAL = b"external_error"


def _key_of(index: Index, cache_dir: Path, material: bytes | None) -> CacheKey | None:
    """The cache's key: checked against its key check value, or set up anew."""
    stored = index.get_meta("encryption")
    if stored is None:
        if material is None:
            return None
        salt = new_salt()
        key = CacheKey.derive(material, salt)
        index.set_meta("encryption", json.dumps({"salt": salt.hex(), "check": key.check_value()}))
        return key
    if material is None:
        raise BadKey(
            f"cache dir {cache_dir} is encrypted: mount with --encrypt and its key"
            " (--key-file or CACHEFS_KEY), or use another cache dir"
        )
    try:
        info = json.loads(stored)
        salt, check = bytes.fromhex(info["salt"]), info["check"]
    except (ValueError, KeyError, TypeError):
        raise CacheDirError(f"cache dir {cache_dir}: its encryption record is damaged") from None
    key = CacheKey.derive(material, salt)
    if not hmac.compare_digest(key.check_value(), str(check)):
        raise BadKey(f"the key is not the one cache dir {cache_dir} was encrypted with")
    return key


def _remove_index(db_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        _unlink(db_path.with_name(db_path.name + suffix))


def _move_aside(db_path: Path) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        p = db_path.with_name(db_path.name + suffix)
        try:
            p.rename(p.with_name(f"{p.name}.corrupt-{stamp}"))
        except FileNotFoundError:
            pass


def _repair(
    data_dir: Path, files: list[CachedFile], block_size: int, key: CacheKey | None
) -> list[CachedFile]:
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
        cf.data = DataFile(path, cf.size, block_size, key, cf.row_id, cf.version)
        cf.data.written = 1 in cf.present
        n = block_count(cf.size, block_size)
        st = on_disk.get(name)
        sane = len(cf.present) == n and not cf.present.translate(None, b"\x00\x01")
        if 1 in cf.present:
            sane = sane and st is not None and st.st_size == cf.data.disk_size
        if not sane:
            log.warning("cache data of %s does not match its index: dropping it", cf.file_id)
            cf.present = bytearray(n)
            cf.zero_from = None
            _unlink(path)
            repaired.append(cf)
        elif (
            st is not None
            and st.st_blocks * 512
            > cf.present.count(1) * block_size + (cf.data.disk_size - cf.size) + 8192
        ):
            _punch_unmarked(cf.data, cf)
    return repaired


def _punch_unmarked(data: DataFile, cf: CachedFile) -> None:
    """Free the space of blocks written but never marked (drift after a crash)."""
    present, n = cf.present, len(cf.present)
    holes = []
    b = present.find(0)
    while b >= 0:
        end = present.find(1, b)
        end = n if end < 0 else end
        start, stop = data.span(b, end - 1)
        holes.append((start, page_end(stop) - start))
        b = present.find(0, end) if end < n else -1
    fd = os.open(data.path, os.O_RDWR | os.O_CLOEXEC)
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
