"""Worker threads for a local source's blocking calls (policy: backends.local).

A cold small file costs a local source four calls in threads (its content
information, open, read, close).  ``trio.to_thread.run_sync`` wakes or
starts a cached thread, names it and wraps the call for each one; a queue
to threads that stay costs the trio thread about half as much per call,
and on a cold read of small files the trio thread is what limits.

At most *threads* calls run at once, first come first served; a thread
idle for IDLE_SECONDS ends.  A caller cancelled before its call started
never runs it; one cancelled while it runs waits for it, unless the call
may be abandoned: then it stops waiting at once and the thread finishes
the call on its own (holding its place among the *threads* until then,
so abandoned calls stay bounded).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

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


class Jobs:
    """Up to *threads* worker threads, started as calls need them."""

    def __init__(self, threads: int) -> None:
        self._max = threads
        self._queue: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        # Guards the counts and each call's started/dropped.
        self._lock = threading.Lock()
        self._threads = 0
        # Threads waiting for a call that no queued call is promised to.
        self._idle = 0

    async def run(self, fn: Callable[..., T], *args: Any, abandonable: bool = False) -> T:
        """``fn(*args)`` in a worker thread: its result, or its exception raised here."""
        call = _Call(fn, args)
        with self._lock:
            self._queue.put(call)
            if self._idle:
                self._idle -= 1
            elif self._threads < self._max:
                self._threads += 1
                threading.Thread(target=self._work, name="cachefs-local", daemon=True).start()

        def abort(_: object) -> trio.lowlevel.Abort:
            with self._lock:
                if call.started and not abandonable:
                    return trio.lowlevel.Abort.FAILED
                call.dropped = True
                return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _work(self) -> None:
        while True:
            try:
                call = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():  # then this thread is one of the idle
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue
            with self._lock:
                run = call.started = not call.dropped
            if run:
                result = outcome.capture(call.fn, *call.args)
                try:
                    call.token.run_sync_soon(_deliver, call, result)
                except trio.RunFinishedError:
                    pass  # no one waits any more
                del result
            del call
            with self._lock:
                self._idle += 1


def _deliver(call: _Call, result: outcome.Outcome[Any]) -> None:
    """In the trio thread: wake the caller, unless it stopped waiting."""
    if not call.dropped:
        trio.lowlevel.reschedule(call.task, result)
