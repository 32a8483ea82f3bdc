"""Attributes and listings: what the backend says the source holds, within a TTL.

Policy: a file's attributes are trusted for ``ttl`` seconds; past that the
next look asks the backend, and a new version drops the cached one.  While
the storage is quarantined, or a stat or listing fails, what was last known
is served (stale-if-error, counted in ``stale_served``); with nothing known
the caller gets the error.
"""

from __future__ import annotations

import logging

import trio

from cachefs.contract import Backend, DirEntry, FileAttrs, FileKind
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.index import CachedFile
from cachefs.engine.stats import Stats
from cachefs.errors import (
    AccessDenied,
    NotFound,
    ReadFailed,
    StorageQuarantined,
    TransientFailure,
)

log = logging.getLogger(__name__)


class Attributes:
    """What the backend says the source holds, kept for ``ttl`` seconds."""

    def __init__(self, backend: Backend, catalog: Catalog, ttl: float, stats: Stats) -> None:
        self._backend = backend
        self._catalog = catalog
        self._ttl = ttl
        self._stats = stats
        self._listings: dict[str, list[DirEntry]] = {}

    async def getattr(self, file_id: str) -> FileAttrs:
        """Attributes of *file_id*, asking the backend once the TTL has passed."""
        now = trio.current_time()
        cf = self._catalog.files.get(file_id)
        if cf is not None and now - cf.validated_at < self._ttl:
            return cf.attrs
        other = self._catalog.other.get(file_id) or self._catalog.listed(file_id)
        if other is not None and now - other[1] < self._ttl:
            return other[0]
        return await self.revalidate(file_id)

    async def revalidate(self, file_id: str) -> FileAttrs:
        cat = self._catalog
        cf = cat.files.get(file_id)
        known = cf.attrs if cf is not None else cat.other.get(file_id, (None, 0))[0]
        if cat.external_error is not None:
            if known is None:
                if file_id and self._absent_offline(file_id):
                    raise NotFound(f"{file_id}: no such file or directory")
                raise StorageQuarantined(
                    f"{file_id or '/'}: storage is offline: {cat.external_error}"
                )
            return known
        try:
            attrs = await self._backend.stat(file_id)
        except PermissionError as e:  # an answer, not a failure: nothing stale is served
            raise denied(file_id, e) from None
        except Exception as e:
            if known is None:
                raise TransientFailure(f"{file_id or '/'}: stat failed: {e}") from None
            log.warning("stat of %s failed (%s): serving the cached version", file_id, e)
            self._stats.stale_served += 1
            return known
        if attrs is None:
            cat.forget(file_id)
            raise NotFound(f"{file_id or '/'}: no such file or directory")
        return cat.learn(file_id, attrs, trio.current_time())

    def _absent_offline(self, file_id: str) -> bool:
        """Offline, a name the last listing of its directory did not have is
        taken as absent (so that a new file can be made there; should the
        source have one after all, the flush finds it: a conflict, both
        kept).  Without a listing it is unknown: the storage's error."""
        parent, _, name = file_id.rpartition("/")
        listing = self._listings.get(parent)
        return listing is not None and all(e.name != name for e in listing)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        """The entries of *dir_id*; their attributes refresh what the cache knows.

        While the storage is quarantined or does not answer, the last listing
        seen in this mount is served (counted in ``stale_served``).
        """
        cat = self._catalog
        name = dir_id or "/"
        forgotten = cat.forgotten
        try:
            if cat.external_error is not None:
                raise StorageQuarantined(f"{name}: storage is offline: {cat.external_error}")
            try:
                entries = await self._backend.list_dir(dir_id)
            except (FileNotFoundError, NotADirectoryError):
                self._listings.pop(dir_id, None)
                raise NotFound(f"{name}: no such directory") from None
            except PermissionError as e:
                self._listings.pop(dir_id, None)
                raise denied(dir_id, e) from None
            except Exception as e:
                raise TransientFailure(f"{name}: listing failed: {e}") from None
        except ReadFailed:
            if dir_id not in self._listings:
                raise
            self._stats.stale_served += 1
            return self._listings[dir_id]
        self._listings[dir_id] = entries
        prefix = f"{dir_id}/" if dir_id else ""
        now = trio.current_time()
        unknown: dict[str, FileAttrs] = {}
        for entry in entries:
            file_id = prefix + entry.name
            if entry.attrs.kind is not FileKind.FILE or file_id in cat.files:
                cat.learn(file_id, entry.attrs, now)
            else:  # a stat it spares, not a row: many of them are never opened
                unknown[entry.name] = entry.attrs
        if cat.forgotten == forgotten:  # else a removal may be older than the listing
            cat.note_listing(dir_id, now, unknown, self._ttl)
        return entries

    async def current(self, file_id: str) -> CachedFile:
        """The version of *file_id* the cache serves now (revalidated past the TTL)."""
        attrs = await self.getattr(file_id)
        cf = self.row(file_id, attrs)
        if cf is None or attrs.kind is not FileKind.FILE:
            raise NotFound(f"{file_id}: no such file")
        return cf

    def row(self, file_id: str, attrs: FileAttrs) -> CachedFile | None:
        """The cache's version of *file_id* that :meth:`getattr` just answered
        *attrs* for, made now if it came from a listing."""
        cat = self._catalog
        cf = cat.files.get(file_id)
        listed = cat.listed(file_id)
        if cf is None and listed is not None and listed[0] is attrs:
            cat.learn(file_id, attrs, listed[1])
            cf = cat.files.get(file_id)
        return cf


def denied(file_id: str, e: OSError) -> AccessDenied:
    """The source refuses the daemon *file_id* (EACCES, EPERM)."""
    return AccessDenied(f"{file_id or '/'}: the source refuses it: {e.strerror or e}")
