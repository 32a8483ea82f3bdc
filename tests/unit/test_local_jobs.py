"""The local source's worker threads (backends.localjobs): results, errors,
the bound on calls at once, and what a cancelled caller gets."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from backends import localjobs
from backends.localjobs import Jobs


async def test_results_and_errors_come_back() -> None:
    jobs = Jobs(2)
    assert await jobs.run(pow, 2, 10) == 1024
    with pytest.raises(ZeroDivisionError):
        await jobs.run(divmod, 1, 0)


async def test_at_most_threads_calls_at_once() -> None:
    jobs = Jobs(2)
    lock = threading.Lock()
    running: list[int] = []
    most = 0
    gate = threading.Event()

    def call() -> None:
        nonlocal most
        with lock:
            running.append(1)
            most = max(most, len(running))
        gate.wait(10)
        with lock:
            running.pop()

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(jobs.run, call)
        with trio.fail_after(10):
            while len(running) < 2:  # both threads in a call
                await trio.sleep(0.001)
        gate.set()
    assert most == 2


async def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    jobs = Jobs(1)
    gate = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(jobs.run, gate.wait, 10)  # holds the one thread
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0) as scope:
            await jobs.run(ran.append, "queued")
        assert scope.cancelled_caught
        gate.set()
    assert await jobs.run(ran.append, "after") is None
    assert ran == ["after"]


async def test_a_running_call_is_waited_for_unless_it_may_be_abandoned() -> None:
    jobs = Jobs(2)
    gate = threading.Event()
    done: list[str] = []

    def call(name: str, started: threading.Event) -> None:
        started.set()
        gate.wait(10)
        done.append(name)

    async def run_then_cancel(name: str, abandonable: bool, release: bool) -> None:
        started = threading.Event()

        async def cancel_once_started(scope: trio.CancelScope) -> None:
            await trio.to_thread.run_sync(started.wait, 10)
            scope.cancel()
            if release:
                gate.set()

        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:
                nursery.start_soon(cancel_once_started, scope)
                await jobs.run(call, name, started, abandonable=abandonable)

    await run_then_cancel("abandoned", abandonable=True, release=False)
    assert done == []  # its caller went at once; the call still runs
    await run_then_cancel("waited", abandonable=False, release=True)
    assert "waited" in done  # its caller returned only once it ran


async def test_idle_threads_end(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(localjobs, "IDLE_SECONDS", 0.01)
    jobs = Jobs(3)
    await jobs.run(int)
    with trio.fail_after(10):
        while jobs._threads:
            await trio.sleep(0.01)
    assert await jobs.run(int, "7") == 7  # a new one starts
