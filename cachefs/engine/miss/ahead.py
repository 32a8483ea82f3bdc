"""Files fetched ahead of their readers (directory readahead).

A program that reads the files of a directory one after another (cp -r,
tar, a training loop over a corpus of small files) waits for one miss per
file.  When the file system sees such a walk it names the next files, and
they are fetched here in the background, whole, as ``cachefs prefetch``
fetches them: by the same fetch path, checked the same way, so a reader
that opens one of them meanwhile joins its fetch.

Bounded: at most MAX_QUEUED files wait or are fetched at once, MAX_AHEAD
of them at a time; more are dropped, not queued.  Best effort: a failure is
logged at debug and forgotten (the reader meets it itself, with its own
retries and errors).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import trio

from cachefs.engine.stats import Stats
from cachefs.errors import CacheFSError

log = logging.getLogger(__name__)

#: Files fetched ahead at the same time.
MAX_AHEAD = 4
#: Files waiting or being fetched ahead, at most; more are not fetched ahead.
MAX_QUEUED = 32


class Ahead:
    """Fetches files ahead of readers with *fetch* (FileCache.prefetch),
    in *nursery*, counted in ``stats.fetched_ahead``."""

    def __init__(
        self, fetch: Callable[[str], Awaitable[None]], nursery: trio.Nursery, stats: Stats
    ) -> None:
        self._fetch = fetch
        self._nursery = nursery
        self._stats = stats
        self._limiter = trio.CapacityLimiter(MAX_AHEAD)
        self._queued: set[str] = set()

    def want(self, file_ids: Iterable[str]) -> None:
        """Fetch *file_ids* soon (those not already on their way)."""
        for file_id in file_ids:
            if len(self._queued) >= MAX_QUEUED:
                return
            if file_id not in self._queued:
                try:
                    self._nursery.start_soon(self._run, file_id)
                except RuntimeError:  # the cache is closing
                    return
                self._queued.add(file_id)

    async def _run(self, file_id: str) -> None:
        try:
            async with self._limiter:
                await self._fetch(file_id)
            self._stats.fetched_ahead += 1
        except CacheFSError as e:
            log.debug("fetching %r ahead: %s", file_id, e)
        except Exception:  # a bug here must not end the mount
            log.exception("unexpected error fetching %r ahead", file_id)
        finally:
            self._queued.discard(file_id)
