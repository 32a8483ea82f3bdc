"""Opening a cache directory: lock it, load or rebuild its index, repair drift.

Layout: ``lock`` (flock held by the live process, its pid inside),
``index.sqlite3`` (metadata), ``data/<row id>`` (block bytes).  Anything that
cannot be trusted is dropped, never served: an unreadable index is moved
aside and the cache starts empty; a data file that does not match its row
loses its bitmap; data files without a row are deleted.

The cache dir and everything in it is its owner's alone (names, sizes and
block hashes are in the index): a cache dir of another user is refused,
one of ours is made 0700 whatever its mode was, and files or directories
in it that others could read (made by older versions) are made owner-only
when it is opened.  What cachefs creates there it creates 0600 / 0700;
SQLite gives the index's -wal and -shm files the index's own mode.
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
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from cachefs._linux.fileio import page_end, punch_holes
from cachefs.engine.state.crypto import CacheKey, new_salt
from cachefs.engine.state.index import SCHEMA_VERSION, CachedFile, Index, block_count
from cachefs.engine.state.store import DataFile
from cachefs.errors import BadKey, CacheDirError, CacheDirInUse

log = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite3"


# Bits that let others (group, world) at a file or directory.
_OTHERS = 0o077


def check_cache_dir(cache_dir: Path) -> None:
    """CacheDirError unless *cache_dir* is a directory of this user's.

    A symlink is followed only if it is this user's or root's: a link of
    another user's could be pointed elsewhere by them at any time.
    """
    try:
        link = os.lstat(cache_dir)
        st = os.stat(cache_dir)
    except FileNotFoundError:
        raise CacheDirError(f"cache dir {cache_dir} does not exist") from None
    except OSError as e:
        raise CacheDirError(f"cache dir {cache_dir} is not usable: {e.strerror}") from None
    me = os.geteuid()
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (me, 0):
        raise CacheDirError(
            f"cache dir {cache_dir} is a symlink of another user (uid {link.st_uid}),"
            " who could point it elsewhere: give the directory itself, or one of your own"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"cache dir {cache_dir} is not a directory")
    if st.st_uid != me:
        raise CacheDirError(
            f"cache dir {cache_dir} belongs to another user (uid {st.st_uid}); the cache"
            " must be readable by its owner only: use a cache dir of your own"
        )


def _make_owner_only(cache_dir: Path) -> None:
    """Make the (checked) cache dir 0700 and take group and other bits off
    its entries.  What is not this user's, and symlinks, are left alone."""
    fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():  # replaced since it was checked
            raise CacheDirError(f"cache dir {cache_dir} belongs to another user")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _OTHERS:
            os.fchmod(fd, 0o700)
            log.info("cache dir %s was mode %04o: made it 0700 (owner only)", cache_dir, mode)
        loose = 0
        for name in os.listdir(fd):
            try:
                entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
                loose += _tighten(name, entry, dir_fd=fd)
            except FileNotFoundError:  # removed meanwhile
                pass
        if loose:
            log.info("cache dir %s: made %d entries owner-only", cache_dir, loose)
    finally:
        os.close(fd)


def _tighten(path: str, st: os.stat_result, dir_fd: int | None = None) -> bool:
    """Take group and other bits off a file or directory of ours; whether it had any."""
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or not mode & _OTHERS:
        return False
    os.chmod(path, mode & ~_OTHERS & 0o7777, dir_fd=dir_fd)
    return True


def open_own_file(path: Path, flags: int) -> int:
    """Open (creating it 0600) a file cachefs keeps in its cache dir, never
    through a symlink, and only if it is a regular file of this user with no
    other link: in a cache dir others could write to, a planted link must
    not make cachefs truncate or append to another file."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        why = "it is a symlink" if e.errno == errno.ELOOP else e.strerror
        raise CacheDirError(f"cache dir file {path} is not usable: {why}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise CacheDirError(
            f"cache dir file {path} is not a regular file of this user with one link:"
            " remove it, or use another cache dir"
        )
    return fd


def lock_cache_dir(cache_dir: Path) -> int:
    """Take the cache dir's lock, then make the dir and what is in it
    owner-only; return the fd that holds the lock."""
    check_cache_dir(cache_dir)
    fd = open_own_file(cache_dir / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CacheDirInUse(
            f"cache dir {cache_dir} is in use by another cachefs process (pid {pid})"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if not os.access(cache_dir, os.W_OK):
            raise CacheDirError(f"cache dir {cache_dir} is not writable")
        _make_owner_only(cache_dir)
    except OSError as e:
        os.close(fd)
        raise CacheDirError(f"cache dir {cache_dir} is not usable: {e.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
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
    loose = 0
    with os.scandir(data_dir) as it:
        for entry in it:
            if entry.name in rows:
                on_disk[entry.name] = st = entry.stat(follow_symlinks=False)
                loose += _tighten(entry.path, st)
            else:
                log.info("removing orphan cache data file %s", entry.path)
                _unlink(entry.path)
    if loose:
        log.info("made %d cache data files owner-only", loose)
    for cf in files:
        name = str(cf.row_id)
        path = f"{data_dir}/{name}"
        cf.data = DataFile(path, cf.size, block_size, key, cf.row_id, cf.version)
        cf.data.written = 1 in cf.present
        n = block_count(cf.size, block_size)
        found = on_disk.get(name)
        sane = len(cf.present) == n and not cf.present.translate(None, b"\x00\x01")
        if 1 in cf.present:
            sane = sane and found is not None and found.st_size == cf.data.disk_size
        if not sane:
            log.warning("cache data of %s does not match its index: dropping it", cf.file_id)
            cf.present = bytearray(n)
            cf.zero_from = None
            _unlink(path)
            repaired.append(cf)
        elif (
            found is not None
            and found.st_blocks * 512
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
