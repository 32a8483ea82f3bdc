"""Telling the namespace, and where asked the kernel, that a file changed."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import trio

from cachefs.fs.inodes import Namespace

log = logging.getLogger(__name__)


class KernelInvalidator:
    """Tells the namespace, and where asked the kernel, that a file changed.

    ``notify`` is the engine's ``on_invalidate`` callback (called on the trio
    thread; never blocks): a version of the file was dropped, so its
    directory is listed again.  The kernel needs no word of it: a new
    version is a new inode (cachefs.fs.inodes), and the old inode's pages
    are still the old version's.  ``drop_pages`` asks the kernel to drop
    the pages of the file's inode too (after ``cachefs purge`` and
    ``reset-file-errors``).  ``forget_entry`` asks it to forget the file's
    name, so that its next use is looked up again although the kernel's
    entry timeout (the mount's TTL) has not run out: for a new version
    learned from elsewhere (a group member), which the kernel would
    otherwise find only once that timeout ends.

    The kernel is told from a worker thread, since it may wait for requests
    this process must answer, and abandoned at unmount, since it may wait
    for requests this process no longer answers.  Pending file ids are
    sets, so the queue is bounded by the number of files.
    """

    def __init__(self) -> None:
        self._pending: set[str] = set()
        self._pages: set[str] = set()
        self._entries: set[str] = set()
        self._wakeup = trio.Event()

    def notify(self, file_id: str) -> None:
        self._pending.add(file_id)
        self._wakeup.set()

    def drop_pages(self, file_id: str) -> None:
        self._pages.add(file_id)
        self.notify(file_id)

    def forget_entry(self, file_id: str) -> None:
        self._entries.add(file_id)
        self.notify(file_id)

    async def serve(
        self,
        namespace: Namespace,
        invalidate_inode: Callable[[int], None],
        invalidate_entry: Callable[[int, bytes], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Tell the kernel with *invalidate_inode* and *invalidate_entry* (a
        cachefs.fuse.api.Kernel's; blocking, run in a thread) until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            pending, self._pending = self._pending, set()
            pages, self._pages = self._pages, set()
            entries, self._entries = self._entries, set()
            for file_id in sorted(pending):
                ino = namespace.invalidated(file_id)
                if ino is not None and file_id in pages:
                    try:
                        await trio.to_thread.run_sync(invalidate_inode, ino, abandon_on_cancel=True)
                    except OSError as e:  # ENOENT: the kernel had already let it go
                        if e.errno != errno.ENOENT:
                            log.warning("could not invalidate inode %d (%r): %s", ino, file_id, e)
                parent_id, _, name = file_id.rpartition("/")
                parent = namespace.live_inode(parent_id) if file_id in entries and name else None
                if parent is not None:
                    try:
                        await trio.to_thread.run_sync(
                            invalidate_entry, parent, os.fsencode(name), abandon_on_cancel=True
                        )
                    except OSError as e:  # ENOENT: the kernel had already let it go
                        if e.errno != errno.ENOENT:
                            log.warning("could not invalidate the entry %r: %s", file_id, e)
