"""Requests the kernel is spared, and walks through a directory (cachefs.fs),
over an in-memory engine without a mount.

What the kernel is told (no FLUSH for a close with nothing to flush, a
directory listing it may keep, and until when), which names are looked up
by one listing instead of a stat each, and which files a walk through a
directory has fetched ahead.
"""

from __future__ import annotations

import errno
import os

from fsrig import FakeCache, FakeKernel, directory, errno_of, file, mount, names

from cachefs.contract import DirEntry, FileAttrs
from cachefs.fs.inodes import LIST_AFTER_LOOKUPS, ROOT_INODE, Namespace
from cachefs.fs.operations import Operations
from cachefs.fs.walks import FILES_AHEAD, GAP, SMALL_FILE, WALKS, Walks

CREATE = os.O_CREAT | os.O_WRONLY


def corpus(n: int, **big: int) -> dict[str, FileAttrs]:
    """A directory "c" of *n* files f000..; *big* names some with another size."""
    tree = {"": directory(), "c": directory()}
    for i in range(n):
        name = f"f{i:03d}"
        tree[f"c/{name}"] = file(size=big.get(name, 100))
    return tree


async def test_a_close_with_nothing_to_flush_sends_no_flush() -> None:
    cache = FakeCache(corpus(3))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    f = await ops.lookup(c.ino, b"f000")
    reading = await ops.open(f.ino, os.O_RDONLY)
    assert reading.noflush and reading.keep_cache
    writing = await ops.open(f.ino, os.O_WRONLY)
    assert not writing.noflush  # --write-back-delay 0: the close flushes
    cache.flush_close = False  # any other delay: the flush comes later
    entry, created = await ops.create(c.ino, b"new", 0o600, CREATE)
    assert created.noflush


async def test_the_kernel_keeps_a_listing_until_it_changes() -> None:
    cache = FakeCache(corpus(3))
    now = [0.0]
    ops = Operations(Namespace(cache, lambda: now[0]), cache, FakeKernel(False))  # type: ignore[arg-type]
    c = await ops.lookup(ROOT_INODE, b"c")
    first = await ops.opendir(c.ino)
    assert first.cache_dir and not first.keep_cache  # nothing cached yet
    again = await ops.opendir(c.ino)
    assert again.cache_dir and again.keep_cache
    await ops.create(c.ino, b"new", 0o600, CREATE)  # a change through the mount
    after_create = await ops.opendir(c.ino)
    assert not after_create.keep_cache
    assert (await ops.opendir(c.ino)).keep_cache
    now[0] += cache.config.ttl + 1  # the TTL passed: listed again
    assert not (await ops.opendir(c.ino)).keep_cache
    assert cache.listings == ["c", "c", "c"]


async def test_names_looked_up_one_by_one_are_listed_once() -> None:
    n = LIST_AFTER_LOOKUPS + 20
    cache = FakeCache(corpus(n))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    cache.stats.clear()
    for i in range(n):
        assert (await ops.lookup(c.ino, f"f{i:03d}".encode())).size == 100
    assert cache.listings == ["c"]
    # Each name is still asked of the engine (which answers from what the
    # listing told it), and a name the listing lacks is not.
    assert len(cache.stats) == n
    assert await errno_of(ops.lookup(c.ino, b"nosuch")) == errno.ENOENT
    assert len(cache.stats) == n


async def test_a_walk_in_listing_order_fetches_the_next_small_files_ahead() -> None:
    cache = FakeCache(corpus(30, f005=SMALL_FILE + 1, f006=0))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    await ops.opendir(c.ino)  # as `cat c/*` lists it first
    for i in range(4):
        f = await ops.lookup(c.ino, f"f{i:03d}".encode())
        await ops.open(f.ino, os.O_RDONLY)
    # From the second open on: FILES_AHEAD after it, each named once; the
    # large file and the empty one are left to the reader.
    wanted = [f"c/f{i:03d}" for i in range(2, 4 + FILES_AHEAD) if i not in (5, 6)]
    assert cache.ahead == wanted


async def test_opens_out_of_order_fetch_nothing_ahead() -> None:
    cache = FakeCache(corpus(40))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    await ops.opendir(c.ino)
    for i in (30, 3, 17, 9, 25, 1, 38, 14):
        f = await ops.lookup(c.ino, f"f{i:03d}".encode())
        await ops.open(f.ino, os.O_RDONLY)
    assert cache.ahead == []


async def test_a_writer_is_not_a_walk() -> None:
    cache = FakeCache(corpus(10))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    await ops.opendir(c.ino)
    for i in range(5):
        f = await ops.lookup(c.ino, f"f{i:03d}".encode())
        await ops.open(f.ino, os.O_WRONLY)
    assert cache.ahead == []


def listing(n: int) -> list[DirEntry]:
    return [DirEntry(f"f{i:05d}", file(size=10)) for i in range(n)]


def test_parallel_walks_of_one_directory_are_each_followed() -> None:
    walks, names = Walks(), listing(1000)
    starts = [i * 100 for i in range(WALKS)]  # xargs -P 8 -n 100
    ahead: list[str] = []
    for step in range(10):
        for s in starts:
            ahead += walks.opened(7, names, f"f{s + step:05d}")
    for s in starts:  # every walk fetched ahead of itself, once per name
        assert f"f{s + 5:05d}" in ahead and f"f{s + 10 + FILES_AHEAD - 1:05d}" in ahead
    assert len(ahead) == len(set(ahead))


def test_a_walk_may_skip_a_few_names_but_not_more() -> None:
    walks, names = Walks(), listing(100)
    assert walks.opened(1, names, "f00010") == []
    assert walks.opened(1, names, f"f{10 + GAP:05d}") != []  # moves the walk on
    assert walks.opened(1, names, f"f{10 + 3 * GAP + 1:05d}") == []  # a new walk


def test_a_new_listing_starts_new_walks() -> None:
    walks, names = Walks(), listing(50)
    walks.opened(1, names, "f00001")
    assert walks.opened(1, names, "f00002")
    fresh = listing(50)  # listed again: the walk is not carried over
    assert walks.opened(1, fresh, "f00003") == []


def test_a_name_the_listing_lacks_is_no_walk() -> None:
    walks, names = Walks(), listing(10)
    assert walks.opened(1, names, "zzz") == []
    assert walks.opened(1, names, "f00000a") == []


async def test_a_listing_outlives_the_kernel_forgetting_its_directory() -> None:
    cache = FakeCache(corpus(3))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    await ops.opendir(c.ino)
    ops.forget([(c.ino, 1)])  # the kernel dropped its caches
    c = await ops.lookup(ROOT_INODE, b"c")
    await ops.opendir(c.ino)
    assert cache.listings == ["c"]  # listed once


async def test_a_kept_listing_goes_with_its_directory() -> None:
    cache = FakeCache(corpus(3))
    ops, _ = mount(cache)
    c = await ops.lookup(ROOT_INODE, b"c")
    await ops.opendir(c.ino)
    ops.forget([(c.ino, 1)])
    await ops.rename(ROOT_INODE, b"c", ROOT_INODE, b"moved", 0)
    await ops.mkdir(ROOT_INODE, b"c", 0o755)  # another directory, empty
    c = await ops.lookup(ROOT_INODE, b"c")
    assert await names(ops, c.ino) == []
    moved = await ops.lookup(ROOT_INODE, b"moved")
    assert await names(ops, moved.ino) == [b"f000", b"f001", b"f002"]
