"""An in-process group for tests of the hosted cache: a blob store and the
group's content records in memory, an origin that records what it was asked,
and nodes (a real engine each) reading through cachefs.group.shared."""

from __future__ import annotations

import hashlib
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
import trio.testing
from enginerig import BS, CONFIG

from cachefs.contract import ContentInfo, ReadData, RWEvent
from cachefs.engine import open_file_cache
from cachefs.group.content import ContentCounters
from cachefs.group.hosted import HostedCache, block_name
from cachefs.group.shared import SharedBackend


class Store:
    """A blob store in memory; tests set what it does per name."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.asked: list[tuple[str, str]] = []
        self.failing: set[str] = set()  # names whose get raises
        self.lie: dict[str, str] = {}  # name asked -> name answered
        self.down = False  # every request raises
        self.stalled = False  # uploads never finish
        self.stalled_gets = False  # reads never finish

    async def _ask(self, op: str, name: str) -> None:
        self.asked.append((op, name))
        await trio.lowlevel.checkpoint()
        if self.down:
            raise OSError("connection refused")

    async def get_blob(self, name: str, limit: int | None = None) -> bytes | None:
        await self._ask("get", name)
        if self.stalled_gets:
            await trio.sleep_forever()
        if name in self.failing:
            raise OSError("connection reset")
        return self.blobs.get(self.lie.get(name, name))

    async def has_blob(self, name: str) -> bool:
        await self._ask("has", name)
        if self.stalled:
            await trio.sleep_forever()
        return name in self.blobs

    async def put_blob(self, name: str, data: bytes) -> None:
        await self._ask("put", name)
        self.blobs[name] = bytes(data)

    async def aclose(self) -> None:
        pass

    def check(self) -> None:
        """Every blob hashes to its name."""
        for name, data in self.blobs.items():
            assert name == block_name(hashlib.sha256(data).digest()), name

    def puts(self) -> list[str]:
        return [name for op, name in self.asked if op == "put"]


class Records:
    """The group's content records, as a dict (ContentRecords' interface)."""

    def __init__(self) -> None:
        self.infos: dict[tuple[str, str], ContentInfo] = {}
        self.counters = ContentCounters()
        self.max_blocks = 1000
        self.published: list[tuple[str, ContentInfo]] = []

    async def lookup(self, file_id: str, version: str, size: int | None) -> ContentInfo | None:
        await trio.lowlevel.checkpoint()
        return self.infos.get((file_id, version))

    def publish_nowait(self, file_id: str, info: ContentInfo) -> None:
        self.published.append((file_id, info))
        self.infos[(file_id, info.version)] = info


class Origin:
    """The origin, recording the ranges it was asked for; optionally slow."""

    def __init__(self, inner: Any, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.asked: list[tuple[int, int]] = []
        self.bytes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_data(self, req: ReadData) -> None:
        if req.bytes_to_read:
            self.asked.append((req.position, req.bytes_to_read))
        if self.delay:
            await trio.sleep(self.delay)
        await self.inner.read_data(req)
        self.bytes += req.bytes_read


class Node:
    def __init__(
        self, origin: Any, store: Store, records: Records, cache_dir: Path, **hosted: Any
    ) -> None:
        self.origin = origin
        self.hosted = HostedCache(store, "mem://hosted", **hosted)
        self.shared = SharedBackend(origin, self.hosted, records, BS)  # type: ignore[arg-type]
        self.cache_dir = cache_dir

    @asynccontextmanager
    async def running(self, **overrides: Any):
        async with trio.open_nursery() as nursery:
            await nursery.start(self.hosted.serve)
            async with open_file_cache(
                self.shared, self.cache_dir, replace(CONFIG, **overrides)
            ) as cache:
                yield cache
            nursery.cancel_scope.cancel()

    async def settle(self) -> None:
        """Until every offer is uploaded or dropped."""
        while self.hosted.queue_bytes:
            await trio.testing.wait_all_tasks_blocked()


def make_nodes(
    tmp_path: Path, origin: Any, n: int = 2, **hosted: Any
) -> tuple[Store, Records, list[Node]]:
    store, records = Store(), Records()
    made = []
    for i in range(n):
        (tmp_path / f"cache{i}").mkdir()
        made.append(Node(Origin(origin), store, records, tmp_path / f"cache{i}", **hosted))
    return store, records, made


def plant(store: Store, data: bytes, info: ContentInfo) -> None:
    for i, h in enumerate(info.block_hashes):
        store.blobs[block_name(h)] = data[i * BS : (i + 1) * BS]


async def version_of(origin: Any, file_id: str) -> str:
    attrs = await origin.stat(file_id)
    assert attrs is not None
    return str(attrs.version)


def request(file_id: str, size: int, pos: int, count: int, version: str) -> ReadData:
    return ReadData(
        file_id,
        size,
        pos,
        RWEvent(0),
        memoryview(bytearray(count)),
        count,
        version=version,
    )
