"""Opening a cache directory: its lock, its index, and the FileCache over it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from cachefs.contract import Backend
from cachefs.engine.config import CacheConfig
from cachefs.engine.filecache import FileCache
from cachefs.engine.state.cachedir import lock_cache_dir, open_index
from cachefs.engine.state.catalog import Catalog
from cachefs.engine.state.index import Index
from cachefs.engine.write.copies import CopyStore


@asynccontextmanager
async def open_file_cache(
    backend: Backend,
    cache_dir: str | os.PathLike[str],
    config: CacheConfig | None = None,
    *,
    on_invalidate: Callable[[str], None] | None = None,
    key_material: bytes | None = None,
) -> AsyncIterator[FileCache]:
    """Open the cache in *cache_dir* (which must exist) over *backend*.

    Takes the directory's lock (CacheDirInUse if another live process holds
    it), loads or rebuilds the index, and runs the flusher and the trimmer.
    On exit open transfers are canceled and metadata is committed; the
    backend is left open (its owner closes it).  With *key_material* the
    cache is encrypted at rest (BadKey if it is not the cache's key).
    """
    config = config or CacheConfig()
    config.validate()
    path = Path(cache_dir).absolute()
    lock_fd = lock_cache_dir(path)
    index: Index | None = None
    try:
        opened = await trio.to_thread.run_sync(open_index, path, config.block_size, key_material)
        index = opened.index
        catalog = Catalog(
            index,
            path / "data",
            config.block_size,
            opened.files,
            opened.external_error,
            on_invalidate,
            opened.key,
            opened.next_row,
        )
        catalog.dirty.update(opened.repaired)
        store = CopyStore(path / "dirty")
        await trio.to_thread.run_sync(store.open)
        async with trio.open_nursery() as nursery:
            cache = FileCache(backend, path, config, catalog, nursery, store)
            await cache.start(nursery)
            try:
                yield cache
            finally:
                with trio.CancelScope(shield=True):
                    await cache.aclose()
                nursery.cancel_scope.cancel()
    finally:
        if index is not None:
            index.close()
        os.close(lock_fd)
