"""The reader threads that serve cache hits from disk."""

from __future__ import annotations

import os
import threading

import pytest
import trio

from cachefs.engine.state.threads import ReaderPool


async def test_calls_run_off_the_loop_and_return_or_raise():
    pool = ReaderPool(threads=2)
    try:
        assert await pool.run(threading.current_thread) is not threading.current_thread()
        assert await pool.run(sum, [1, 2, 3]) == 6
        with pytest.raises(FileNotFoundError):
            await pool.run(os.stat, "/nonexistent/path")
    finally:
        pool.close()


async def test_many_concurrent_calls_each_get_their_own_answer():
    pool = ReaderPool(threads=3)
    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await pool.run(lambda x: x * x, i)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    finally:
        pool.close()
    assert results == {i: i * i for i in range(50)}


async def test_a_call_after_the_pool_closed_still_gets_its_answer():
    """Work finishing while the cache closes (a hash of a block fetched ahead)
    must not wait for ever behind the pool's end."""
    pool = ReaderPool(threads=2)
    pool.close()
    with trio.fail_after(10):
        assert await pool.run(lambda x: x * 2, 21) == 42
        with pytest.raises(ZeroDivisionError):
            await pool.run(lambda: 1 / 0)
