"""Worker threads that stay, for blocking calls that would stall the trio loop.

``trio.to_thread.run_sync`` wakes or starts a cached thread, names it and
wraps the call each time: that costs the trio thread more than a 4 KiB cache
hit, or than a local source's open of a small file.  A queue to threads that
stay costs it about half as much.  The cache's hit path and hasher and the
local source each have a pool of their own.

Policy: at most *threads* calls run at once, first come first served;
threads start as calls need them, and one idle for IDLE_SECONDS ends.  A
caller cancelled before its call started never runs it; one cancelled while
it runs waits for it (a pread is short), unless the call may be abandoned:
then it stops waiting at once and the thread finishes the call on its own
(holding its place among the *threads* until then, so abandoned calls stay
bounded).  After :meth:`Workers.close` each call runs in a thread of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

log = logging.getLogger(__name__)

IDLE_SECONDS = 10.0


class _Call:
    __slots__ = ("fn", "args", "task", "token", "started", "dropped")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn = fn
        self.args = args
        self.task = trio.lowlevel.current_task()
        self.token = trio.lowlevel.current_trio_token()
        self.started = False
        # Its caller stopped waiting: not run if not started, its result dropped.
        self.dropped = False


class Workers:
    """Up to *threads* worker threads named *name*, started as calls need them.

    *on_start* runs first in each thread (the hasher lowers its priority there).
    """

    def __init__(self, threads: int, name: str, on_start: Callable[[], None] | None = None) -> None:
        self._max = threads
        self._name = name
        self._on_start = on_start
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # Guards the counts, _closed and each call's started/dropped.
        self._lock = threading.Lock()
        self._threads = 0
        # Calls queued and not yet taken, and threads waiting in the queue:
        # a call needs a new thread only while the first outnumber the second.
        self._queued = 0
        self._waiting = 0
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any, abandonable: bool = False) -> T:
        """``fn(*args)`` in a worker thread: its result, or its exception raised here."""
        call = _Call(fn, args)
        with self._lock:
            closed = self._closed
            if not closed:
                if self._queued >= self._waiting and self._threads < self._max:
                    # Started before anything is counted or queued: a thread
                    # the system refuses fails this call alone.
                    threading.Thread(target=self._work, name=self._name, daemon=True).start()
                    self._threads += 1
                self._queue.put(call)
                self._queued += 1
        if closed:
            # Work still finishing while its owner closes: a call queued behind
            # the pool's end would wait for ever.
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=abandonable)

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if call.started and not abandonable:
                    return trio.lowlevel.Abort.FAILED
                call.dropped = True
                return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _work(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # the thread serves all the same
                log.exception("worker thread %s: its start hook failed", self._name)
        while True:
            with self._lock:
                self._waiting += 1
            try:
                call = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._waiting -= 1
                    # A call queued as the wait ended counted on this thread.
                    if self._queued <= self._waiting:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._waiting -= 1
                if call is None:  # closed
                    self._threads -= 1
                    return
                self._queued -= 1
                run = call.started = not call.dropped
            if run:
                result = outcome.capture(call.fn, *call.args)
                try:
                    call.token.run_sync_soon(_deliver, call, result)
                except trio.RunFinishedError:
                    pass  # no one waits any more
                del result
            del call

    def close(self) -> None:
        """End the threads once the calls queued have run; later calls run in
        threads of their own."""
        with self._lock:
            self._closed = True
            for _ in range(self._threads):
                self._queue.put(None)


def _deliver(call: _Call, result: outcome.Outcome[Any]) -> None:
    """In the trio thread: wake the caller, unless it stopped waiting."""
    if not call.dropped:
        trio.lowlevel.reschedule(call.task, result)
