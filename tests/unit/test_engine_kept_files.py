"""The data files the catalog keeps open between opens (engine/state/catalog.py):
bounded, let go when their version is replaced, all closed with the cache."""

from __future__ import annotations

import os

import pytest
from enginerig import BS, Rig, read_sequential

from cachefs.engine.state import catalog

pytestmark = pytest.mark.unit


def data_fds(rig: Rig) -> list[str]:
    """Where this process's fds on the cache's data files point."""
    data_dir = str(rig.cache_dir / "data")
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith(data_dir):
            out.append(target)
    return out


async def test_kept_files_are_bounded_and_closed_with_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "KEEP_OPEN", 3)
    files = {f"f{i}": os.urandom(BS + i) for i in range(8)}
    rig = Rig(tmp_path, files)
    async with rig.engine() as cache:
        for name, data in files.items():
            assert await read_sequential(cache, name) == data
            await cache.commit()  # no sync in flight (it may open a file of its own)
            assert len(data_fds(rig)) <= 3
        assert len(data_fds(rig)) == 3  # the last ones read
        rig.reads()
        for name, data in files.items():  # read again: from the cache
            assert await read_sequential(cache, name) == data
        assert rig.reads() == []
    assert data_fds(rig) == []


async def test_a_replaced_version_lets_its_kept_file_go(tmp_path):
    old, new = os.urandom(3 * BS), os.urandom(2 * BS + 5)
    rig = Rig(tmp_path, {"f": old})
    async with rig.engine(ttl=0) as cache:
        assert await read_sequential(cache, "f") == old
        assert await read_sequential(cache, "f") == old  # a hit, from the kept file
        await cache.commit()  # no sync in flight (it may open a file of its own)
        (kept,) = data_fds(rig)
        rig.source.put("f", new)
        assert await read_sequential(cache, "f") == new
        assert await read_sequential(cache, "f") == new
        await cache.commit()
        (now,) = data_fds(rig)
        assert now != kept and not now.endswith(" (deleted)")
