"""``cachefs publish``: content information for every file of a source.

Policy:

- The whole source is walked through its backend (``list_dir`` from the
  root; regular files only) and each file is read through the ReadData
  contract, as one WHOLE_FILE transfer pinned to the version ``stat`` gave
  before reading.  The SHA-256 of each block becomes a ContentInfo stored
  with the backend's ``put_content_info``.
- The block size must be the one of the mounts that use the information:
  a mount ignores content information of any other block size.
- A file whose stored information already names its version, size and
  block size is left as it is (unchanged).  A file that changes while it is
  read (``stat`` gives another version afterwards, or a read answers
  FILE_MODIFIED_EXTERNALLY or RANGE_BEYOND_EOF) is skipped: a later run
  publishes it.  Any other result than SUCCESS or PARTIAL, or an exception
  from the backend, fails the file.
- Stored information of files no longer in the source is removed, unless
  part of the source could not be listed.
- At most PARALLEL files are read at once; hashing runs in worker threads.
- Each skipped or failed file is logged as it happens (WARNING, ERROR); the
  command prints one summary line at the end and exits with 1 if anything
  failed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import trio

from cachefs.contract import (
    Backend,
    ContentInfo,
    ContentInfoStore,
    FileAttrs,
    FileKind,
    ReadData,
    RWEvent,
    RWResult,
)
from cachefs.engine import CacheConfig
from cachefs.errors import ConfigError, SourceError
from cachefs.registry import open_backend
from cachefs.units import format_size

log = logging.getLogger(__name__)

PARALLEL = 4
# Bytes one ReadData call asks for, whatever the block size (a block may span calls).
CALL_SIZE = 4 << 20
_CHANGED = frozenset({RWResult.FILE_MODIFIED_EXTERNALLY, RWResult.RANGE_BEYOND_EOF})


class FileChanged(Exception):
    """The file is no longer the version being read."""


class ReadFailure(Exception):
    """A ReadData call answered something else than SUCCESS or PARTIAL."""


@dataclass(slots=True)
class PublishReport:
    """What a run did, file by file; ``bytes_hashed`` counts the files read."""

    published: int = 0
    unchanged: int = 0
    skipped: int = 0
    failed: int = 0
    removed: int = 0
    bytes_hashed: int = 0

    def summary(self, seconds: float) -> str:
        """``published 3 files, 2 unchanged, 0 skipped, 0 failed, 1 removed; ...``."""
        n = self.published
        return (
            f"published {n} file{'s' * (n != 1)}, {self.unchanged} unchanged, "
            f"{self.skipped} skipped, {self.failed} failed, {self.removed} removed; "
            f"{format_size(self.bytes_hashed)} hashed in {seconds:.1f} s"
        )


class BlockHasher:
    """The SHA-256 of each *block_size* block of the bytes fed, in order."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.hashes: list[bytes] = []
        self._current = hashlib.sha256()
        self._filled = 0

    def feed(self, data: memoryview) -> None:
        while data:
            take = min(len(data), self.block_size - self._filled)
            self._current.update(data[:take])
            self._filled += take
            data = data[take:]
            if self._filled == self.block_size:
                self.hashes.append(self._current.digest())
                self._current, self._filled = hashlib.sha256(), 0

    def finish(self) -> tuple[bytes, ...]:
        if self._filled:
            self.hashes.append(self._current.digest())
            self._current, self._filled = hashlib.sha256(), 0
        return tuple(self.hashes)


async def read_content_info(
    backend: Backend, file_id: str, attrs: FileAttrs, block_size: int
) -> ContentInfo:
    """The content information of version ``attrs.version`` of *file_id*, read whole.

    Raises FileChanged or ReadFailure; what the backend raises passes through.
    """
    hasher = BlockHasher(block_size)
    buffer = memoryview(bytearray(min(CALL_SIZE, attrs.size)))
    context = await backend.open_file(file_id)
    position, calls, finished = 0, 0, attrs.size == 0
    try:
        while position < attrs.size:
            count = min(len(buffer), attrs.size - position)
            flags = RWEvent.WHOLE_FILE | RWEvent.TIL_END
            flags |= RWEvent.IN_PROGRESS if calls else RWEvent.CONTINUOUS_STARTED
            if position + count == attrs.size:
                flags |= RWEvent.CONTINUOUS_FINISHED
            req = ReadData(
                file_id=file_id,
                size=attrs.size,
                position=position,
                flags=flags,
                buffer=buffer,
                bytes_to_read=count,
                file_context=context,
                version=attrs.version,
            )
            calls += 1
            await backend.read_data(req)
            rc, n = req.result_code, req.bytes_read
            if rc in _CHANGED:
                raise FileChanged(f"the source answered {RWResult(rc).name}")
            if rc not in (RWResult.SUCCESS, RWResult.PARTIAL):
                raise ReadFailure(f"reading @{position}: {_name(rc)}")
            if not 0 < n <= count:
                raise ReadFailure(f"reading @{position}: {_name(rc)} with {n} of {count} bytes")
            await trio.to_thread.run_sync(hasher.feed, buffer[:n])
            position += n
            finished = position == attrs.size and bool(flags & RWEvent.CONTINUOUS_FINISHED)
    finally:
        with trio.CancelScope(shield=True):
            if calls and not finished:
                await _cancel(backend, file_id, attrs.size, position, context)
            await backend.close_file(file_id, context)
    return ContentInfo(attrs.version, attrs.size, block_size, hasher.finish())


async def _cancel(backend: Backend, file_id: str, size: int, position: int, context: Any) -> None:
    """Tell the backend the transfer ended early (it may hold a stream open)."""
    req = ReadData(
        file_id=file_id,
        size=size,
        position=position,
        flags=RWEvent.CANCELED | RWEvent.WHOLE_FILE,
        buffer=memoryview(b""),
        bytes_to_read=0,
        file_context=context,
    )
    try:
        await backend.read_data(req)
    except Exception as e:
        log.debug("%s: the CANCELED call raised %r", file_id, e)


def _name(rc: int) -> str:
    try:
        return RWResult(rc).name
    except ValueError:
        return f"result {rc:#x}"


@runtime_checkable
class Publishable(Backend, ContentInfoStore, Protocol):
    """A backend ``cachefs publish`` can write content information to."""


class _Run:
    """One publishing run over *backend*; counts go to ``report``."""

    def __init__(self, backend: Publishable, block_size: int) -> None:
        self.backend = backend
        self.block_size = block_size
        self.report = PublishReport()

    async def walk(self) -> tuple[list[str], bool]:
        """The regular files of the source, and whether every directory was listed."""
        files: list[str] = []
        complete = True
        pending = [""]
        while pending:
            dir_id = pending.pop()
            try:
                entries = await self.backend.list_dir(dir_id)
            except Exception as e:
                if not dir_id:
                    raise SourceError(f"cannot list the source: {_one_line(e)}") from None
                if isinstance(e, FileNotFoundError):
                    continue  # removed meanwhile: nothing there to publish
                log.error("cannot list %s/: %s", dir_id, _one_line(e))
                self.report.failed += 1
                complete = False
                continue
            for entry in entries:
                child = f"{dir_id}/{entry.name}" if dir_id else entry.name
                if entry.attrs.kind is FileKind.DIR:
                    pending.append(child)
                elif entry.attrs.kind is FileKind.FILE:
                    files.append(child)
        return sorted(files), complete

    async def prune(self, files: list[str]) -> None:
        """Remove the stored information of what is not a file of the source now."""
        try:
            stored = await self.backend.content_info_ids()
        except Exception as e:
            log.error("cannot list the stored content information: %s", _one_line(e))
            self.report.failed += 1
            return
        present = set(files)
        await for_each(
            [i for i in stored if i not in present],
            partial(self._remove, self.backend.delete_content_info),
        )

    async def _remove(self, delete: Callable[[str], Awaitable[None]], file_id: str) -> None:
        try:
            await delete(file_id)
        except Exception as e:
            log.error("%s: cannot remove its stale content information: %s", file_id, _one_line(e))
            self.report.failed += 1
        else:
            log.debug("%s: stale content information removed", file_id)
            self.report.removed += 1

    async def publish_file(self, file_id: str) -> None:
        try:
            outcome = await self._publish(file_id)
        except Exception as e:
            log.debug("%s failed", file_id, exc_info=True)
            log.error("%s: %s", file_id, _one_line(e))
            self.report.failed += 1
            return
        if outcome is not None:
            log.warning("skipped %s: %s", file_id, outcome)
            self.report.skipped += 1

    async def _publish(self, file_id: str) -> str | None:
        """Publish one file; None when done, else why it was skipped."""
        before = await self.backend.stat(file_id)
        if before is None or before.kind is not FileKind.FILE:
            return "no longer a regular file"
        if await self._stored_matches(file_id, before):
            self.report.unchanged += 1
            return None
        try:
            info = await read_content_info(self.backend, file_id, before, self.block_size)
        except FileChanged as e:
            return f"it changed while being read ({e})"
        self.report.bytes_hashed += info.size
        after = await self.backend.stat(file_id)
        if after is None or after.version != before.version:
            return "it changed while being read"
        await self.backend.put_content_info(file_id, info)
        log.debug("%s: published %d blocks", file_id, len(info.block_hashes))
        self.report.published += 1
        return None

    async def _stored_matches(self, file_id: str, attrs: FileAttrs) -> bool:
        try:
            stored = await self.backend.content_info(file_id)
        except Exception as e:
            log.debug("%s: cannot read its content information (%s): publishing", file_id, e)
            return False
        return stored is not None and (stored.version, stored.size, stored.block_size) == (
            attrs.version,
            attrs.size,
            self.block_size,
        )


async def for_each(
    items: Iterable[str], fn: Callable[[str], Awaitable[None]], parallel: int = PARALLEL
) -> None:
    """``await fn(item)`` for every item, at most *parallel* at once (a pool of
    *parallel* tasks taking items in turn, so a million items are not a
    million tasks)."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:  # shared: each item is taken by one worker
            await fn(item)

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(worker)


async def publish(backend: Backend, block_size: int) -> PublishReport:
    """Publish the content information of every file of *backend*'s source.

    ConfigError if the backend cannot store it; SourceError if the source's
    root cannot be listed.  Everything else is counted in the report.
    """
    if not isinstance(backend, Publishable):
        raise ConfigError(f"{backend!r} cannot store content information")
    run = _Run(backend, block_size)
    files, complete = await run.walk()
    # First, so that a file that became a directory (or back) has room for its record.
    if complete:
        await run.prune(files)
    else:
        log.warning("part of the source could not be listed: no stale information is removed")
    await for_each(files, run.publish_file)
    return run.report


async def _open_and_publish(source: str, block_size: int, options: dict[str, Any]) -> PublishReport:
    backend = await trio.to_thread.run_sync(partial(open_backend, source, **options))
    try:
        return await publish(backend, block_size)
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()


def run_publish(source: str, block_size: int, options: dict[str, Any]) -> int:
    """``cachefs publish``: publish, print the summary line; the exit code."""
    CacheConfig(block_size=block_size).validate()
    started = time.monotonic()
    report = trio.run(_open_and_publish, source, block_size, options)
    print(report.summary(time.monotonic() - started), flush=True)
    return 1 if report.failed else 0


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
