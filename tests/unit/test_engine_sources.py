"""The engine's core cases over every kind of source: memory, a directory, S3 (moto)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import trio
from enginerig import BS, MemorySource, Rig, SourceFactory, read_at, read_sequential
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachefs import ContentInfo, CorruptData, NotFound, VersionGone

pytest_plugins = ["s3server"]

DATA = os.urandom(10 * BS + 7)
SMALL = os.urandom(1000)


def rig_of(tmp_path: Path, make_source: SourceFactory, files: dict[str, bytes]) -> Rig:
    return Rig(tmp_path, source=make_source(files))


async def test_a_sequential_read_is_one_continuous_transfer(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"d/f": DATA})
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f", 3 * BS) == DATA
    calls = rig.calls()
    assert [c["position"] for c in calls] == [0, 3 * BS, 6 * BS, 9 * BS]
    assert all(c["result"] == "SUCCESS" for c in calls)
    assert "CONTINUOUS_STARTED" in calls[0]["flags"]
    assert "CONTINUOUS_FINISHED" in calls[-1]["flags"]


async def test_a_sequential_read_with_readahead_returns_the_bytes(tmp_path, make_source):
    big = os.urandom(200 * BS + 3)
    rig = rig_of(tmp_path, make_source, {"big": big})
    async with rig.engine(max_readahead=32 * BS, max_fetches=4) as cache:
        assert await read_sequential(cache, "big", 2 * BS) == big
    assert all(c["result"] == "SUCCESS" for c in rig.reads())


async def test_random_reads_return_the_source_bytes(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"f": DATA, "s": SMALL})
    async with rig.engine() as cache:
        for offset, length in [(5 * BS + 3, 2 * BS), (0, 10), (10 * BS, 100), (7, BS)]:
            assert await read_at(cache, "f", offset, length) == DATA[offset : offset + length]
        assert await read_at(cache, "s", 990, 100) == SMALL[990:]
        assert await read_at(cache, "s", 2000, 10) == b""


async def test_parallel_readers_get_their_bytes(tmp_path, make_source):
    files = {f"f{i}": os.urandom(4 * BS + i) for i in range(4)}
    rig = rig_of(tmp_path, make_source, files)
    async with rig.engine() as cache, trio.open_nursery() as nursery:

        async def reader(name: str) -> None:
            assert await read_sequential(cache, name, BS // 2) == files[name]

        for name in files:
            nursery.start_soon(reader, name)


async def test_a_second_engine_serves_the_same_bytes_with_zero_calls(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"d/f": DATA, "s": SMALL})
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        assert await read_sequential(cache, "s") == SMALL
    assert rig.reads()
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f") == DATA
        assert await read_at(cache, "s", 10, 100) == SMALL[10:110]
    assert rig.calls() == []


async def test_a_replaced_file_fails_its_old_handles_and_new_opens_read_it_new(
    tmp_path, make_source
):
    rig = rig_of(tmp_path, make_source, {"f": DATA})
    async with rig.engine(ttl=3600) as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        new = os.urandom(2 * BS + 1)
        rig.source.put("f", new)
        assert await read_at(cache, "f", 0, 10) == DATA[:10]  # trusted within the TTL
        with pytest.raises(VersionGone):
            await read_at(cache, "f", 5 * BS, 10)  # a miss: the source has another version
        assert await read_at(cache, "f", 0, 3 * BS) == new
    assert "FILE_MODIFIED_EXTERNALLY" in [c["result"] for c in rig.reads()]


async def test_a_handle_reads_its_version_whole_while_the_file_is_replaced(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"f": DATA})
    new = os.urandom(len(DATA) + BS)
    async with rig.engine(ttl=0) as cache:
        fh = await cache.open("f")
        got = bytearray(await cache.read(fh, 0, BS))
        rig.source.put("f", new)
        assert await read_sequential(cache, "f") == new  # a new open: the new version
        try:
            while data := await cache.read(fh, len(got), BS):
                got += data
        except VersionGone:
            pass
        finally:
            await cache.close(fh)
        # One version or an error: the old one whole, or a prefix of it.
        # Here whole: the local inode it opened is still there, the S3
        # stream of its transfer still reads the old object, and only a
        # memory source has nothing left of it.
        assert bytes(got) == DATA[: len(got)]
        assert len(got) == (BS if isinstance(rig.source, MemorySource) else len(DATA))


async def test_a_replaced_file_is_read_new_after_the_ttl(tmp_path, make_source, mock_clock):
    rig = rig_of(tmp_path, make_source, {"f": DATA})
    async with rig.engine(ttl=60) as cache:
        assert await read_sequential(cache, "f") == DATA
        rig.source.put("f", b"new content")
        mock_clock.jump(30)
        assert await read_at(cache, "f", 0, 100) == DATA[:100]
        mock_clock.jump(31)
        assert (await cache.getattr("f")).size == len(b"new content")
        assert await read_at(cache, "f", 0, 100) == b"new content"


async def test_a_deleted_file_fails_its_handle_and_is_not_found_after(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"f": DATA, "g": SMALL})
    async with rig.engine(ttl=0) as cache:
        fh = await cache.open("f")
        rig.source.delete("f")
        with pytest.raises(VersionGone):
            await cache.read(fh, 0, 10)
        await cache.close(fh)
        with pytest.raises(NotFound):
            await cache.open("f")
        with pytest.raises(NotFound):
            await cache.open("f")
        assert await read_at(cache, "g", 0, 10) == SMALL[:10]


async def test_listings_show_files_and_directories(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"a": b"1", "d/b": b"22", "d/e/c": b"333"})
    async with rig.engine() as cache:
        top = {e.name: e.attrs for e in await cache.list_dir("")}
        assert {n: a.kind.value for n, a in top.items()} == {"a": "file", "d": "dir"}
        assert top["a"].size == 1
        inner = {e.name: e.attrs.kind.value for e in await cache.list_dir("d")}
        assert inner == {"b": "file", "e": "dir"}
        with pytest.raises(NotFound):
            await cache.list_dir("nope")


names = st.sampled_from(["a", "b", "d/c"])


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    source=st.dictionaries(names, st.binary(max_size=5 * 4096 + 17), min_size=1),
    plan=st.lists(
        st.tuples(names, st.integers(0, 6 * 4096), st.integers(0, 3 * 4096)), max_size=20
    ),
)
def test_random_reads_over_random_files_return_the_source_bytes(make_source, source, plan):
    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            rig = Rig(Path(tmp), source=make_source(source))
            for _ in range(2):  # cold, then again on the same cache dir
                async with rig.engine(block_size=4096, max_fetch=2 * 4096) as cache:
                    for name, offset, length in plan:
                        if name in source:
                            got = await read_at(cache, name, offset, length)
                            assert got == source[name][offset : offset + length]

    trio.run(main)


async def test_content_info_stored_with_the_source_catches_damaged_bytes(tmp_path, make_source):
    rig = rig_of(tmp_path, make_source, {"d/f": DATA})
    backend = rig.source.backend
    attrs = await backend.stat("d/f")
    await backend.put_content_info("d/f", ContentInfo.of_bytes(DATA, attrs.version, BS))
    rig.faults([{"file": "d/f", "corrupt": True, "count": 1}])
    async with rig.engine() as cache:
        assert await read_sequential(cache, "d/f", 3 * BS) == DATA
        assert cache.statistics()["corrupt_from_backend"] == 1
        assert [e.name for e in await cache.list_dir("")] == ["d"]
        rig.faults([{"file": "d/f", "corrupt": True}])
        await cache.purge("d/f")
        with pytest.raises(CorruptData):
            await read_at(cache, "d/f", 0, 10)
