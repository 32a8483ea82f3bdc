"""KernelInvalidator (cachefs.fs.operations) without a mount: what it tells the
namespace and the kernel, with fakes of both.

The fake kernel calls run in the invalidator's worker threads and report
back over a channel; the invalidator handles file ids one at a time in
sorted order, so once the last one's call arrived, the others are settled.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

import pytest
import trio
import trio.testing

from cachefs.fs.operations import KernelInvalidator

DEADLINE = 10.0
Call = tuple[str, int, bytes]


class FakeNamespace:
    """Inodes the kernel knows, by file id; records what it was told."""

    def __init__(self, live: dict[str, int]) -> None:
        self.live = live
        self.invalidated_ids: list[str] = []

    def invalidated(self, file_id: str) -> int | None:
        self.invalidated_ids.append(file_id)
        return self.live.get(file_id)

    def live_inode(self, file_id: str) -> int | None:
        return self.live.get(file_id)


LIVE = {"": 1, "d": 5, "d/f": 7, "g": 8, "h": 9}


def fake_kernel(
    send: trio.MemorySendChannel[Call], fail: Callable[[bytes], None] = lambda name: None
) -> tuple[Callable[[int], None], Callable[[int, bytes], None]]:
    """invalidate_inode and invalidate_entry, reporting each call; *fail* may raise
    for an entry's name, as the kernel's write would."""

    def invalidate_inode(ino: int) -> None:
        trio.from_thread.run_sync(send.send_nowait, ("inode", ino, b""))

    def invalidate_entry(parent_ino: int, name: bytes) -> None:
        fail(name)
        trio.from_thread.run_sync(send.send_nowait, ("entry", parent_ino, name))

    return invalidate_inode, invalidate_entry


async def _calls(receive: trio.MemoryReceiveChannel[Call], n: int) -> list[Call]:
    with trio.fail_after(DEADLINE):
        return [await receive.receive() for _ in range(n)]


async def test_a_forgotten_entry_is_told_to_the_kernel_by_parent_and_name() -> None:
    ns = FakeNamespace(LIVE)
    invalidator = KernelInvalidator()
    send, receive = trio.open_memory_channel[Call](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.serve, ns, *fake_kernel(send))
        invalidator.forget_entry("d/f")
        invalidator.forget_entry("g")
        assert await _calls(receive, 2) == [("entry", 5, b"f"), ("entry", 1, b"g")]
        # ... and the namespace lists them and their directories again, as notify does.
        assert ns.invalidated_ids == ["d/f", "g"]
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):  # their pages stay: no inode call
            receive.receive_nowait()
        nursery.cancel_scope.cancel()


async def test_only_names_the_kernel_can_know_are_told() -> None:
    ns = FakeNamespace(LIVE)
    invalidator = KernelInvalidator()
    send, receive = trio.open_memory_channel[Call](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.serve, ns, *fake_kernel(send))
        invalidator.forget_entry("")  # the root has no name
        invalidator.forget_entry("gone/x")  # a directory the kernel does not know
        invalidator.notify("d/f")  # a dropped version needs no word to the kernel
        invalidator.forget_entry("h")
        assert await _calls(receive, 1) == [("entry", 1, b"h")]  # the last in order
        assert ns.invalidated_ids == ["", "d/f", "gone/x", "h"]
        nursery.cancel_scope.cancel()


async def test_dropped_pages_and_a_forgotten_entry_of_one_file_are_both_told() -> None:
    invalidator = KernelInvalidator()
    send, receive = trio.open_memory_channel[Call](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.serve, FakeNamespace(LIVE), *fake_kernel(send))
        invalidator.drop_pages("d/f")
        invalidator.forget_entry("d/f")
        assert await _calls(receive, 2) == [("inode", 7, b""), ("entry", 5, b"f")]
        nursery.cancel_scope.cancel()


async def test_an_entry_the_kernel_already_forgot_is_quiet_and_a_failure_is_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def fail(name: bytes) -> None:
        if name == b"d":
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        if name == b"g":
            raise OSError(errno.EIO, "Input/output error")

    invalidator = KernelInvalidator()
    send, receive = trio.open_memory_channel[Call](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.serve, FakeNamespace(LIVE), *fake_kernel(send, fail))
        for file_id in ("d", "g", "h"):
            invalidator.forget_entry(file_id)
        # the next one is still told
        assert await _calls(receive, 1) == [("entry", 1, b"h")]
        nursery.cancel_scope.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["could not invalidate the entry 'g': [Errno 5] Input/output error"]


async def test_a_kernel_call_that_never_returns_does_not_hold_up_the_unmount() -> None:
    release = threading.Event()
    send, receive = trio.open_memory_channel[Call](10)

    def wedged(parent_ino: int, name: bytes) -> None:
        trio.from_thread.run_sync(send.send_nowait, ("entry", parent_ino, name))
        release.wait(2 * DEADLINE)  # the kernel waits for a request nobody answers any more

    invalidator = KernelInvalidator()
    try:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    invalidator.serve, FakeNamespace(LIVE), lambda ino: None, wedged
                )
                invalidator.forget_entry("g")
                assert await _calls(receive, 1) == [("entry", 1, b"g")]
                nursery.cancel_scope.cancel()  # the unmount: serve returns at once
    finally:
        release.set()
