"""The worker threads that stay (cachefs.threads), as the hit path, the
hasher and the local source use them: results, errors, the bound on calls
at once, what a cancelled caller gets, idle threads ending, and calls after
the pool closed."""

from __future__ import annotations

import os
import threading

import pytest
import trio
import trio.testing

from cachefs import threads
from cachefs.threads import Workers


async def test_results_and_errors_come_back_from_another_thread() -> None:
    workers = Workers(2, "test")
    try:
        assert await workers.run(threading.current_thread) is not threading.current_thread()
        assert await workers.run(pow, 2, 10) == 1024
        with pytest.raises(FileNotFoundError):
            await workers.run(os.stat, "/nonexistent/path")
    finally:
        workers.close()


async def test_many_concurrent_calls_each_get_their_own_answer() -> None:
    workers = Workers(3, "test")
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await workers.run(lambda x: x * x, i)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    finally:
        workers.close()
    assert results == {i: i * i for i in range(50)}


async def test_at_most_threads_calls_at_once() -> None:
    workers = Workers(2, "test")
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
            nursery.start_soon(workers.run, call)
        with trio.fail_after(10):
            while len(running) < 2:  # both threads in a call
                await trio.sleep(0.001)
        gate.set()
    assert most == 2


async def test_a_call_cancelled_before_it_starts_never_runs() -> None:
    workers = Workers(1, "test")
    gate = threading.Event()
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers.run, gate.wait, 10)  # holds the one thread
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0) as scope:
            await workers.run(ran.append, "queued")
        assert scope.cancelled_caught
        gate.set()
    assert await workers.run(ran.append, "after") is None
    assert ran == ["after"]


async def test_a_running_call_is_waited_for_unless_it_may_be_abandoned() -> None:
    workers = Workers(2, "test")
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
                await workers.run(call, name, started, abandonable=abandonable)

    await run_then_cancel("abandoned", abandonable=True, release=False)
    assert done == []  # its caller went at once; the call still runs
    await run_then_cancel("waited", abandonable=False, release=True)
    assert "waited" in done  # its caller returned only once it ran


async def test_idle_threads_end_and_start_again_with_their_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(threads, "IDLE_SECONDS", 0.01)
    started: list[int] = []
    workers = Workers(3, "test", on_start=lambda: started.append(threading.get_ident()))
    first = await workers.run(threading.get_ident)
    with trio.fail_after(10):
        while workers._threads:
            await trio.sleep(0.01)
    assert await workers.run(int, "7") == 7  # a new one starts
    assert len(started) == 2 and started[0] == first


async def test_a_call_after_busy_threads_went_idle_and_ended_still_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More calls than threads, then quiet until the threads end: the next
    calls must start a thread, not wait for one counted idle that is gone."""
    monkeypatch.setattr(threads, "IDLE_SECONDS", 0.01)
    workers = Workers(2, "test")
    try:
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(workers.run, pow, i, 2)
        with trio.fail_after(10):
            while workers._threads:
                await trio.sleep(0.01)
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(workers.run, int, "7")
    finally:
        workers.close()


async def test_a_thread_the_system_refuses_fails_only_its_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused: list[int] = []
    real = threading.Thread

    class Refusing(real):  # type: ignore[misc,valid-type]
        def start(self) -> None:
            if not refused:
                refused.append(1)
                raise RuntimeError("can't start new thread")
            super().start()

    monkeypatch.setattr(threads.threading, "Thread", Refusing)
    ran: list[int] = []
    workers = Workers(1, "test")
    try:
        with pytest.raises(RuntimeError):
            await workers.run(ran.append, 1)
        with trio.fail_after(10):
            assert await workers.run(int, "7") == 7
        assert ran == []  # the refused call never ran behind its caller's back
    finally:
        workers.close()


async def test_a_failing_start_hook_leaves_the_thread_serving() -> None:
    def hook() -> None:
        raise ValueError("no priority for you")

    workers = Workers(1, "test", on_start=hook)
    try:
        with trio.fail_after(10):
            assert await workers.run(int, "8") == 8
    finally:
        workers.close()


async def test_a_call_after_the_pool_closed_still_gets_its_answer() -> None:
    """Work finishing while the cache closes (a hash of a block fetched ahead)
    must not wait for ever behind the pool's end."""
    workers = Workers(2, "test")
    await workers.run(int)  # a thread to end
    workers.close()
    with trio.fail_after(10):
        assert await workers.run(lambda x: x * 2, 21) == 42
        with pytest.raises(ZeroDivisionError):
            await workers.run(lambda: 1 / 0)
