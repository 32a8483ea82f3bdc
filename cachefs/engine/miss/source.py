"""The backend as the miss path sees it: one file context per version, the
ReadData calls, and the latches its answers set.

Every call is pinned to one version (``ReadData.version``) and made through
that version's own backend context, so a context opened on one version (a
local file's inode) is never moved to another.  A backend that raises, or
answers with a result code or a byte count that cannot be, answered
FAILURE.  FILE_FAILURE latches the file, PERMANENT_FAILURE the storage;
both are committed to the index at once and refuse later fetches until
they are reset.
"""

from __future__ import annotations

import logging

import trio

from cachefs.contract import Backend, ReadData, RWResult
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.commits import Committer
from cachefs.engine.state.index import CachedFile
from cachefs.engine.stats import Stats
from cachefs.errors import FileQuarantined, StorageQuarantined

log = logging.getLogger(__name__)


class Source:
    """ReadData calls on *backend*, file contexts, and the file and storage latches."""

    def __init__(
        self, backend: Backend, catalog: Catalog, committer: Committer, stats: Stats
    ) -> None:
        self._backend = backend
        self._catalog = catalog
        self._committer = committer
        self._stats = stats
        # (file id, version) -> the backend's context for it (opaque)
        self._contexts: dict[tuple[str, str], object] = {}

    # -- latches --------------------------------------------------------------------

    def latched(self, cf: CachedFile) -> bool:
        """Whether the storage or *cf* is latched (nothing more is asked of it)."""
        return self._catalog.external_error is not None or cf.error is not None

    def check_latches(self, cf: CachedFile) -> None:
        external = self._catalog.external_error
        if external is not None:
            raise StorageQuarantined(f"{cf.file_id}: storage is offline: {external}")
        if cf.error is not None:
            raise FileQuarantined(
                f"{cf.file_id}: quarantined after {cf.error} (cachefs reset-file-errors lifts it)"
            )

    def note_eof(self, cf: CachedFile, pos: int) -> None:
        """RANGE_BEYOND_EOF at *pos*: *cf* reads as zeros from there, without
        asking again (for this version)."""
        cf.zero_from = pos if cf.zero_from is None else min(cf.zero_from, pos)
        self._catalog.dirty.add(cf)

    async def latch_file(self, cf: CachedFile, pos: int) -> None:
        """FILE_FAILURE at *pos*: latch *cf*, commit, and raise FileQuarantined."""
        cf.error = f"FILE_FAILURE at offset {pos}"
        self._catalog.dirty.add(cf)
        await self._committer.commit_if_usable()
        self.check_latches(cf)

    async def latch_storage(self, cf: CachedFile, pos: int) -> None:
        """PERMANENT_FAILURE at *pos* of *cf*: latch the storage, commit, raise."""
        self._catalog.external_error = f"PERMANENT_FAILURE reading {cf.file_id} at offset {pos}"
        await self._committer.commit_if_usable()
        self.check_latches(cf)

    # -- calls ----------------------------------------------------------------------

    async def call(self, req: ReadData) -> tuple[RWResult, int]:
        """One ReadData call; a raising or lying backend answers FAILURE, 0 bytes.

        Counted by its result code, and timed, once answered."""
        stats = self._stats
        stats.read_data_calls += 1
        started = trio.current_time()
        rc, n = await self._ask(req)
        stats.read_data_seconds.observe(trio.current_time() - started)
        stats.read_data_results[rc.name] += 1
        stats.bytes_from_backend += n
        return rc, n

    async def _ask(self, req: ReadData) -> tuple[RWResult, int]:
        """The backend's answer to *req*: its result code, and the bytes it
        moved when the code says it moved any."""
        try:
            await self._backend.read_data(req)
        except Exception:
            log.exception(
                "backend raised on ReadData(%s, position %d, %d bytes): treated as FAILURE",
                req.file_id,
                req.position,
                req.bytes_to_read,
            )
            return RWResult.FAILURE, 0
        n = req.bytes_read
        try:
            rc = RWResult(req.result_code)
        except ValueError:
            log.error("backend set unknown result code %r: treated as FAILURE", req.result_code)
            return RWResult.FAILURE, 0
        if type(n) is not int or not 0 <= n <= req.bytes_to_read:
            log.error(
                "backend bug: bytes_read %r for bytes_to_read %d on %s: treated as FAILURE",
                n,
                req.bytes_to_read,
                req.file_id,
            )
            return RWResult.FAILURE, 0
        if rc in (RWResult.SUCCESS, RWResult.PARTIAL, RWResult.RANGE_BEYOND_EOF):
            return rc, n
        return rc, 0

    # -- file contexts ----------------------------------------------------------------

    def context_of(self, cf: CachedFile) -> tuple[object] | None:
        """(context,) when the backend has *cf*'s version open, else None."""
        key = (cf.file_id, cf.version)
        if key in self._contexts:
            return (self._contexts[key],)
        return None

    async def context(self, cf: CachedFile) -> object:
        """The backend's context for *cf*'s version, opened on first use;
        raises what ``open_file`` raises."""
        contexts, key = self._contexts, (cf.file_id, cf.version)
        if key in contexts:
            return contexts[key]
        ctx = await self._backend.open_file(cf.file_id)
        if key in contexts:  # another reader opened it meanwhile
            await self._close(cf.file_id, ctx)
        else:
            contexts[key] = ctx
        return contexts[key]

    async def close_context(self, file_id: str, version: str) -> None:
        contexts = self._contexts
        if (file_id, version) in contexts:
            await self._close(file_id, contexts.pop((file_id, version)))

    async def close_all_contexts(self) -> None:
        for file_id, version in list(self._contexts):
            with trio.move_on_after(5):
                await self.close_context(file_id, version)

    async def _close(self, file_id: str, ctx: object) -> None:
        try:
            await self._backend.close_file(file_id, ctx)
        except Exception as e:
            log.warning("backend close_file(%s) failed: %s", file_id, e)
