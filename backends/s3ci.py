"""Content information in an S3 source, beside the files it describes.

The record of a file ``<prefix>/<key>`` is the object
``<prefix>/.cachefs-ci/<key>``, holding ``ContentInfo.to_bytes()``.  The
functions take the prefixed store and run in a worker thread; a failed
request raises OSError with a one-line reason.

Which files have a record is looked up in a listing of the records of
their directory (:class:`Records`), not by a GET per file: most files of
most sources have none, and a cache hit should ask S3 nothing per file.  A
listing reads at most WINDOW keys (from the start, or in a directory with
more records from just before the name asked for) and is trusted for FRESH
seconds; a record it does not show answers None without a request.
So a record published within FRESH seconds before the cache first asks
for it may be missed (as one published just after is): the cache then
hashes that version's blocks itself, as for a file without a record.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import obstore
import trio
from obstore.store import S3Store

from backends.s3config import key_ok
from backends.s3errors import os_error
from cachefs.contract import ContentInfo

log = logging.getLogger(__name__)

# Below the prefix; never part of the source.
CI_DIR = ".cachefs-ci"
# Most keys one listing of a directory's records reads (one page of S3's).
WINDOW = 1000
# Seconds a listing of records is trusted.
FRESH = 5.0
# Directories whose latest listing of records is kept.
MAX_DIRS = 256


def servable(key: str) -> bool:
    """Whether *key* can be a file or directory of the source (not under CI_DIR)."""
    return key_ok(key) and CI_DIR not in key.split("/")


def read(store: S3Store, file_id: str) -> ContentInfo | None:
    """The record of *file_id* as stored; None if there is none or it is malformed."""
    if not key_ok(file_id):
        return None
    key = f"{CI_DIR}/{file_id}"
    try:
        data = obstore.get(store, key).bytes()
    except FileNotFoundError:
        return None
    except Exception as e:
        raise os_error(e, f"GET {key}") from None
    try:
        return ContentInfo.from_bytes(bytes(data))
    except ValueError as e:
        log.warning("ignoring the content information of %s: %s", file_id, e)
        return None


def write(store: S3Store, file_id: str, data: bytes) -> None:
    """Store *data* as the record of *file_id* (a PUT replaces an object atomically)."""
    if not key_ok(file_id):
        raise FileNotFoundError(f"invalid file id {file_id!r}")
    key = f"{CI_DIR}/{file_id}"
    try:
        obstore.put(store, key, data)
    except Exception as e:
        raise os_error(e, f"PUT {key}") from None


def delete(store: S3Store, file_id: str) -> None:
    """Remove the record of *file_id*; nothing if there is none."""
    if not key_ok(file_id):
        return
    key = f"{CI_DIR}/{file_id}"
    try:
        obstore.delete(store, key)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise os_error(e, f"DELETE {key}") from None


def file_ids(store: S3Store) -> list[str]:
    """The file ids that have a record, sorted."""
    start = len(CI_DIR) + 1
    try:
        return sorted(
            meta["path"][start:]
            for chunk in obstore.list(store, CI_DIR, chunk_size=1000)
            for meta in chunk
        )
    except Exception as e:
        raise os_error(e, f"listing {CI_DIR}/") from None


@dataclass(frozen=True, slots=True)
class Window:
    """The records of one directory with names in (``after``, ``last``]
    (``last`` None: to the end), as listed at ``taken`` (trio's clock)."""

    after: str
    last: str | None
    names: frozenset[str]
    taken: float

    def covers(self, name: str) -> bool:
        return self.after < name and (self.last is None or name <= self.last)


def list_window(store: S3Store, dir_id: str, after: str, limit: int | None = None) -> Window:
    """The records of *dir_id* named after *after*, reading at most *limit*
    (default WINDOW) keys: those of subdirectories count, in the order S3
    lists them."""
    limit = limit or WINDOW
    base = f"{CI_DIR}/{dir_id}/" if dir_id else f"{CI_DIR}/"
    names: set[str] = set()
    last: str | None = None
    try:
        for chunk in obstore.list(store, base[:-1], offset=base + after, chunk_size=limit):
            for meta in chunk:
                rel = meta["path"][len(base) :]
                if "/" not in rel:
                    names.add(rel)
            if len(chunk) >= limit:
                last = chunk[-1]["path"][len(base) :]
            break
    except Exception as e:
        raise os_error(e, f"listing {base}") from None
    return Window(after, last, frozenset(names), 0.0)


class Records:
    """Which files have a record, from listings of their directory's records.

    *list_window* runs :func:`list_window` (in a worker thread).  Concurrent
    lookups in one directory share one listing.
    """

    def __init__(
        self,
        list_window: Callable[[str, str], Awaitable[Window]],
        fresh: float | None = None,
        max_dirs: int | None = None,
    ) -> None:
        self._list = list_window
        self._fresh = FRESH if fresh is None else fresh
        self._max_dirs = max_dirs or MAX_DIRS
        self._windows: OrderedDict[str, Window] = OrderedDict()
        self._listing: dict[str, trio.Event] = {}
        # Directories whose records this process changed while they were being listed.
        self._changed: set[str] = set()
        # Directories whose listing failed, and when: not listed again before
        # ``fresh`` has passed (every waiter would list again, one by one).
        self._failed: OrderedDict[str, float] = OrderedDict()

    async def may_have(self, file_id: str) -> bool:
        """False if *file_id* has no record (as of at most ``fresh`` s ago);
        True if it has one, or the listing failed (then the GET finds out)."""
        dir_id, _, name = file_id.rpartition("/")
        while True:
            failed = self._failed.get(dir_id)
            if failed is not None and trio.current_time() - failed < self._fresh:
                await trio.lowlevel.checkpoint()
                return True
            window = self._windows.get(dir_id)
            if window is not None and self._answers(window, name):
                await trio.lowlevel.checkpoint()
                return name in window.names
            pending = self._listing.get(dir_id)
            if pending is not None:
                await pending.wait()
                continue
            try:
                window = await self._list_from(dir_id, self._start(window, name))
            except OSError as e:
                log.debug("records of %s/ not listed (%s): asking for %s", dir_id, e, file_id)
                self._failed.pop(dir_id, None)
                self._failed[dir_id] = trio.current_time()
                if len(self._failed) > self._max_dirs:
                    self._failed.popitem(last=False)
                return True
            if window.covers(name):
                return name in window.names
            # Past what one listing reads of a large directory: on from there.

    @staticmethod
    def _start(window: Window | None, name: str) -> str:
        """Where to list from for *name*: from the start of a directory whose
        records one listing reads whole; otherwise as close before *name* as
        is known, and past the last listing if that stopped before it (so
        every listing gets further)."""
        if window is None or window.last is None:
            return ""
        if window.last < name:
            return max(window.last, name[:-1])
        return name[:-1]

    async def _list_from(self, dir_id: str, after: str) -> Window:
        done = self._listing[dir_id] = trio.Event()
        started = trio.current_time()
        try:
            window = await self._list(dir_id, after)
        finally:
            del self._listing[dir_id]
            changed = dir_id in self._changed  # then the listing may predate the change
            self._changed.discard(dir_id)
            done.set()
        window = Window(window.after, window.last, window.names, started)
        if not changed:
            self._keep(dir_id, window)
        return window

    def _answers(self, window: Window, name: str) -> bool:
        return window.covers(name) and trio.current_time() - window.taken < self._fresh

    def _keep(self, dir_id: str, window: Window) -> None:
        self._windows[dir_id] = window
        self._windows.move_to_end(dir_id)
        while len(self._windows) > self._max_dirs:
            self._windows.popitem(last=False)

    def wrote(self, file_id: str, present: bool | None) -> None:
        """This process stored (True) or deleted (False) the record of
        *file_id*, or tried to and cannot tell (None)."""
        dir_id, _, name = file_id.rpartition("/")
        if dir_id in self._listing:
            self._changed.add(dir_id)
        window = self._windows.get(dir_id)
        if window is None or not window.covers(name):
            return
        if present is None:
            del self._windows[dir_id]
            return
        names = window.names | {name} if present else window.names - {name}
        self._windows[dir_id] = Window(window.after, window.last, names, window.taken)
