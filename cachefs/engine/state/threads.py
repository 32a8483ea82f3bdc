"""Long-lived threads for cache-disk reads that would block the loop.

A cache hit whose bytes are not in the page cache waits for the disk; on
the trio loop that would serialise every reader behind one disk read.
``trio.to_thread.run_sync`` costs more per call than a 4 KiB hit itself,
so hits (and the hasher) use these threads, fed through one queue.
Policy: a read in flight is not cancelled (a pread is short).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import outcome
import trio


class ReaderPool:
    """``threads`` daemon threads; create inside trio, :meth:`close` when done.

    *on_start* runs first in each thread (the hasher lowers its priority there).
    """

    def __init__(self, threads: int = 8, on_start: Callable[[], None] | None = None) -> None:
        self._on_start = on_start
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name="cachefs-reader", daemon=True)
            for _ in range(threads)
        ]
        for t in self._threads:
            t.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a pool thread: its result, or its exception raised here.

        After :meth:`close` (work still finishing while the cache closes) in
        a thread of its own: a job queued behind the pool's end would wait
        for ever, and cannot be cancelled.
        """
        if self._closed:
            return await trio.to_thread.run_sync(fn, *args)
        task = trio.lowlevel.current_task()
        token = self._token

        def deliver(result: outcome.Outcome) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._queue.put((fn, args, deliver))
        return await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)

    def _work(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while (job := self._queue.get()) is not None:
            fn, args, deliver = job
            deliver(outcome.capture(fn, *args))

    def close(self) -> None:
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
