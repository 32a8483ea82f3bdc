"""Fetch buffers: page-aligned, in huge pages, reused, bounded, let go when idle; stale bytes
never show."""

from __future__ import annotations

import ctypes
from dataclasses import replace
from pathlib import Path

import pytest
from enginerig import BS, CONFIG, Rig, read_sequential, record_made

from backends.memory import MemoryBackend
from backends.wrapper import Wrapper
from cachefs import open_file_cache
from cachefs._linux import hugepages
from cachefs._linux.pagecache import PAGE
from cachefs.contract import ReadData
from cachefs.engine.miss import fetch
from cachefs.engine.miss.buffers import Buffers

FILES = {f"f{i}.bin": bytes([i]) * (16 * BS) for i in range(3)}


class Recording(Wrapper):
    """Notes where in memory each call's buffer starts."""

    def __init__(self, inner: MemoryBackend) -> None:
        super().__init__(inner)
        self.starts: list[int] = []

    async def read_data(self, req: ReadData) -> None:
        if req.bytes_to_read:
            self.starts.append(ctypes.addressof(ctypes.c_char.from_buffer(req.buffer)))
        await self.inner.read_data(req)


async def test_fetch_buffers_are_aligned_reused_bounded_and_let_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = record_made(monkeypatch, fetch, "Buffers")
    backend = Recording(MemoryBackend(FILES))
    config = replace(CONFIG, max_fetches=2, max_fetch=2 * BS, max_readahead=8 * BS)
    async with open_file_cache(backend, tmp_path, config) as cache:
        for name, data in FILES.items():
            assert await read_sequential(cache, name) == data
        assert len(backend.starts) >= 3 * 8  # 16 blocks a file, 2 a call
        assert all(start % PAGE == 0 for start in backend.starts)
        assert len(set(backend.starts)) <= 2  # one buffer per fetch in flight, reused
        [buffers] = made
        assert 1 <= buffers.kept <= 2
        buffers.trim()  # a fetch since the last trim: kept
        assert buffers.kept >= 1
        buffers.trim()  # a whole period without one: let go
        assert buffers.kept == 0
        assert await read_sequential(cache, "f0.bin") == FILES["f0.bin"]  # all hits


async def test_bytes_left_in_a_reused_buffer_never_show(tmp_path: Path) -> None:
    short = bytes(range(256)) * (BS // 256) + b"end"  # the source ends 3 bytes into block 1
    rig = Rig(tmp_path, {"full.bin": b"\xaa" * (2 * BS), "short.bin": short + bytes(BS - 3)})
    rig.faults([{"file": "short.bin", "eof": len(short)}])
    async with rig.engine(max_fetches=1) as cache:
        assert await read_sequential(cache, "full.bin") == b"\xaa" * (2 * BS)
        # The same buffer, holding full.bin's bytes; the tail past the end is zeros.
        assert await read_sequential(cache, "short.bin") == short + bytes(BS - 3)


def test_fetch_buffers_of_huge_page_size_ask_for_huge_pages() -> None:
    m = Buffers(4 << 20).take()
    start = ctypes.addressof(ctypes.c_char.from_buffer(m))
    flags = vm_flags(start)
    assert "hg" in flags, flags  # MADV_HUGEPAGE
    assert start % hugepages.HUGE == 0  # every 2 MiB of it can be one huge page
    small = hugepages.anonymous(64 << 10)
    assert "hg" not in vm_flags(ctypes.addressof(ctypes.c_char.from_buffer(small)))


def vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds *address*."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")
