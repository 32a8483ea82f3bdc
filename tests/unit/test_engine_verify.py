"""Verified content: damage to the cache disk, the index or the backend's bytes is never served."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from enginerig import BS, LocalSource, Rig, read_at, read_sequential

from cachefs import ContentInfo
from cachefs.engine.state import store
from cachefs.errors import BadKey, CorruptData, NoContentInfo, OutOfBounds

DATA = os.urandom(4 * BS + 1000)  # five blocks, the last one short
KEY = os.urandom(32)


def data_file(rig: Rig) -> str:
    """The path of the single data file in the rig's cache."""
    (name,) = os.listdir(rig.cache_dir / "data")
    return str(rig.cache_dir / "data" / name)


def get_block(path: str, b: int, key: bytes | None) -> tuple[bytes, bytes]:
    """Block *b* as stored: its bytes, and (encrypted) its nonce and tag."""
    n = min(BS, len(DATA) - b * BS)
    return read_raw(path, b * BS, n), read_raw(path, TAGS_AT + 28 * b, 28) if key else b""


def put_block(path: str, b: int, key: bytes | None, stored: tuple[bytes, bytes]) -> None:
    patch(path, b * BS, stored[0])
    if key:
        patch(path, TAGS_AT + 28 * b, stored[1])


# An encrypted data file keeps each block's nonce and tag after the data.
TAGS_AT = -(-len(DATA) // 4096) * 4096


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_raw(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


async def fill(rig: Rig, key: bytes | None = None, **config) -> None:
    async with rig.engine(key, **config) as cache:
        assert await read_sequential(cache, "f") == DATA
    rig.calls()


def asked_blocks(rig: Rig) -> set[int]:
    return {c["position"] // BS for c in rig.reads()}


# -- the backend's bytes ----------------------------------------------------------------


async def test_damaged_bytes_from_the_backend_are_refetched_when_content_info_exists(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    rig.faults([{"file": "f", "corrupt": True, "count": 1}])
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        assert cache.statistics()["corrupt_from_backend"] == 1
    assert [c["position"] for c in rig.reads()] == [0, 0]


async def test_a_backend_that_keeps_returning_damaged_bytes_fails_the_read(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    rig.faults([{"file": "f", "corrupt": True}])
    async with rig.engine(retries=2) as cache:
        with pytest.raises(CorruptData) as info:
            await read_at(cache, "f", BS, 10)
        assert info.value.errno == 5  # EIO through the mount
        stats = cache.statistics()
        assert stats["corrupt_from_backend"] == 3
        assert stats["cached_bytes"] == 0
        rig.faults([])
        assert await read_at(cache, "f", BS, 10) == DATA[BS : BS + 10]


async def test_content_info_of_another_version_or_block_size_is_not_used(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", 2 * BS)  # another block size
    rig.faults([{"file": "f", "corrupt": True, "count": 1}])
    async with rig.engine() as cache:
        await read_at(cache, "f", 0, 10)
        assert cache.statistics()["corrupt_from_backend"] == 0


async def test_content_info_published_later_is_checked_on_the_next_read(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.faults([{"file": "f", "corrupt": True, "count": 1}])
    async with rig.engine() as cache:  # nothing to check against: damage is cached
        assert await read_at(cache, "f", 0, 10) != DATA[:10]
    rig.faults([])
    rig.memory.publish("f", BS)
    rig.calls()
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        assert cache.statistics()["corrupt_in_cache"] == 1
    assert asked_blocks(rig) == {0}


async def test_an_early_eof_that_contradicts_content_info_is_retried_not_believed(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    rig.faults([{"file": "f", "eof": BS + 10, "count": 2}])
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["corrupt_from_backend"] == 0


async def test_a_failed_content_info_request_is_asked_again_before_fetching(tmp_path, monkeypatch):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    answer = rig.memory.content_info
    failures = [OSError("503 Slow Down")]

    async def flaky(file_id):
        if failures:
            raise failures.pop()
        return await answer(file_id)

    monkeypatch.setattr(rig.memory, "content_info", flaky)
    rig.faults([{"file": "f", "corrupt": True}])
    async with rig.engine(retries=1) as cache:
        with pytest.raises(CorruptData):  # the read asked and failed, the fetch asked again
            await read_at(cache, "f", 0, 10)
    assert not failures


async def test_content_info_with_a_wrong_block_count_is_not_used(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    info = rig.memory.publish("f", BS)
    short = ContentInfo(info.version, info.size, BS, info.block_hashes[:2])
    await rig.memory.put_content_info("f", short)
    async with rig.engine() as cache:
        with pytest.raises(NoContentInfo):
            await cache.add_data("f", 4 * BS, DATA[4 * BS :])
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["corrupt_from_backend"] == 0


# -- the cache disk ---------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_a_flipped_byte_in_a_data_file_is_dropped_and_refetched(tmp_path, key):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, key)
    path = data_file(rig)
    at = 2 * BS + 100
    patch(path, at, bytes([read_raw(path, at, 1)[0] ^ 1]))
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, "f") == DATA
        assert cache.statistics()["corrupt_in_cache"] == 1
    assert asked_blocks(rig) == {2}


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_two_swapped_blocks_are_both_refetched(tmp_path, key):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, key)
    path = data_file(rig)
    one, two = get_block(path, 0, key), get_block(path, 1, key)
    put_block(path, 0, key, two)
    put_block(path, 1, key, one)
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {0, 1}


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_an_old_versions_block_replayed_into_the_new_version_is_refetched(tmp_path, key):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, key)
    old = get_block(data_file(rig), 0, key)
    new = os.urandom(len(DATA))
    rig.memory.put("f", new)
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, "f") == new
    put_block(data_file(rig), 0, key, old)
    rig.calls()
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, "f") == new
        assert cache.statistics()["corrupt_in_cache"] == 1
    assert asked_blocks(rig) == {0}


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_a_truncated_data_file_is_never_served(tmp_path, key):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, key)
    os.truncate(data_file(rig), 2 * BS + 10)
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, "f") == DATA


async def test_a_truncated_data_file_under_a_running_cache_is_refetched(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(verify="always") as cache:
        assert await read_sequential(cache, "f") == DATA
        rig.calls()
        os.truncate(data_file(rig), 2 * BS + 10)
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {2, 3, 4}


async def test_verify_once_checks_each_block_on_its_first_read_in_a_mount(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig)
    path = data_file(rig)
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        damaged = bytes(b ^ 0xFF for b in DATA[5:7])  # differs from what is stored
        patch(path, 5, damaged)  # after block 0 was checked in this mount
        assert await read_at(cache, "f", 0, 10) == DATA[:5] + damaged + DATA[7:10]
    async with rig.engine() as cache:  # a new mount checks it again
        assert await read_at(cache, "f", 0, 10) == DATA[:10]


async def test_verify_always_checks_every_read(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig)
    path = data_file(rig)
    async with rig.engine(verify="always") as cache:
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        patch(path, 5, bytes(b ^ 0xFF for b in DATA[5:7]))
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        assert cache.statistics()["corrupt_in_cache"] == 1


async def test_verify_off_neither_hashes_nor_checks(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    rig.faults([{"file": "f", "corrupt": True, "count": 1}])
    async with rig.engine(verify="off") as cache:
        got = await read_at(cache, "f", 0, 10)
        assert got != DATA[:10]  # nothing checked: the damage goes through
    rig.faults([])
    rig.calls()
    # Blocks cached without hashes are fetched again once verification is on.
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
    assert asked_blocks(rig) == {0}


# -- the index ---------------------------------------------------------------------------


async def test_garbage_in_the_index_starts_an_empty_cache(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig)
    with open(rig.cache_dir / "index.sqlite3", "r+b") as f:
        f.seek(100)
        f.write(os.urandom(4000))
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {0, 1, 2, 3, 4}


def sql(rig: Rig, statement: str, *args: object) -> None:
    db = sqlite3.connect(rig.cache_dir / "index.sqlite3")
    with db:
        db.execute(statement, args)
    db.close()


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_a_bitmap_claiming_blocks_never_stored_is_not_trusted(tmp_path, key):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(key) as cache:
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
    sql(rig, "UPDATE files SET present=?", b"\x01" * 5)
    rig.calls()
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {1, 2, 3, 4}


async def test_damaged_hashes_in_the_index_are_not_trusted(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    await fill(rig)
    sql(rig, "UPDATE files SET hashes=?", os.urandom(32 * 5))
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {0, 1, 2, 3, 4}


async def test_recorded_hashes_heal_after_damage_in_the_index(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig)
    sql(rig, "UPDATE files SET hashes=?", os.urandom(32 * 5))
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {0, 1, 2, 3, 4}
    async with rig.engine() as cache:
        assert await read_sequential(cache, "f") == DATA
    assert rig.reads() == []


async def test_a_tampered_encrypted_row_is_dropped(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, KEY)
    sql(rig, "UPDATE files SET name=?", os.urandom(40))
    async with rig.engine(KEY) as cache:
        assert await read_sequential(cache, "f") == DATA
    assert asked_blocks(rig) == {0, 1, 2, 3, 4}


# -- encryption ---------------------------------------------------------------------------


async def test_an_encrypted_cache_stores_neither_names_nor_data_in_clear(tmp_path):
    name = "secret-name.txt"
    rig = Rig(tmp_path, {name: DATA})
    info = rig.memory.publish(name, BS)
    secrets = [name.encode(), DATA[:64], DATA[BS : BS + 64], info.content_hash]
    secrets += [info.block_hashes[0], info.content_hash.hex().encode()]
    async with rig.engine(KEY) as cache:
        fh = await cache.open(name)
        assert await cache.read(fh, 0, len(DATA)) == DATA
        await cache.close(fh)
    for root, _, files in os.walk(rig.cache_dir):
        for f in files:
            raw = Path(root, f).read_bytes()
            for secret in secrets:
                assert secret not in raw, (f, secret[:16])
    rig.calls()
    async with rig.engine(KEY) as cache:
        assert cache.statistics()["cached_bytes"] == len(DATA)
        assert await read_at(cache, name, 0, len(DATA)) == DATA
    assert rig.reads() == []


async def test_a_fetch_sealed_and_written_in_several_runs_reads_back_exactly(tmp_path, monkeypatch):
    # 64 KiB chunks: the one fetch of the file is written as 3 chunks, then 1 and a short one.
    monkeypatch.setattr(store, "SEAL_RUN", 3 * BS)
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine(KEY) as cache:
        assert await read_at(cache, "f", 0, len(DATA)) == DATA
    assert [(c["position"], c["bytes_to_read"]) for c in rig.reads()] == [(0, len(DATA))]
    async with rig.engine(KEY) as cache:
        assert await read_at(cache, "f", 0, len(DATA)) == DATA
        assert cache.statistics()["corrupt_in_cache"] == 0
    assert rig.reads() == []


async def test_a_wrong_key_or_no_key_is_refused(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, KEY)
    with pytest.raises(BadKey, match="not the one"):
        async with rig.engine(os.urandom(32)):
            pass
    with pytest.raises(BadKey, match="is encrypted"):
        async with rig.engine():
            pass
    async with rig.engine(KEY) as cache:  # refusals left the cache as it was
        assert await read_sequential(cache, "f") == DATA
    assert rig.reads() == []


async def test_a_passphrase_works_as_a_key(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, b"correct horse battery staple")
    async with rig.engine(b"correct horse battery staple") as cache:
        assert await read_sequential(cache, "f") == DATA
    assert rig.reads() == []
    with pytest.raises(BadKey):
        async with rig.engine(b"correct horse battery stapler"):
            pass


async def test_a_plain_cache_opened_with_a_key_starts_afresh_encrypted(tmp_path):
    name = "plain-name.bin"
    rig = Rig(tmp_path, {name: DATA})
    async with rig.engine() as cache:
        assert await read_at(cache, name, 0, 10) == DATA[:10]
    async with rig.engine(KEY) as cache:
        assert cache.statistics()["cached_bytes"] == 0
        assert await read_at(cache, name, 0, 10) == DATA[:10]
    for f in rig.cache_dir.glob("index.sqlite3*"):
        assert name.encode() not in f.read_bytes(), f


async def test_a_block_size_change_still_needs_the_key(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    await fill(rig, KEY)
    with pytest.raises(BadKey):
        async with rig.engine(os.urandom(32), block_size=2 * BS):
            pass
    with pytest.raises(BadKey):
        async with rig.engine(block_size=2 * BS):
            pass
    async with rig.engine(KEY, block_size=2 * BS) as cache:  # the right key: afresh
        assert cache.statistics()["encrypted"] is True
        assert await read_sequential(cache, "f") == DATA
    with pytest.raises(BadKey):
        async with rig.engine(os.urandom(32), block_size=2 * BS):
            pass


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_a_name_that_is_not_utf8_is_cached_and_kept(tmp_path, key):
    name = os.fsdecode(b"caf\xe9.bin")  # Latin-1, not UTF-8
    rig = Rig(tmp_path, source=LocalSource(tmp_path / "src", {name: DATA}))
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, name) == DATA
    rig.calls()
    async with rig.engine(key) as cache:
        assert await read_sequential(cache, name) == DATA
    assert rig.reads() == []


# -- add_data --------------------------------------------------------------------------------


async def test_add_data_accepts_matching_blocks_and_readers_need_no_backend(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    async with rig.engine() as cache:
        got = await cache.add_data("f", 0, DATA)
        assert (got.accepted, got.rejected, got.pending) == (5, 0, 0)
        rig.calls()
        assert await read_sequential(cache, "f") == DATA
        assert rig.reads() == []


async def test_add_data_rejects_blocks_that_do_not_match(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    bad = bytearray(DATA[: BS * 2])
    bad[BS + 7] ^= 1
    async with rig.engine() as cache:
        got = await cache.add_data("f", 0, bytes(bad))
        assert (got.accepted, got.rejected, got.pending) == (1, 1, 0)
        assert cache.statistics()["add_data_rejected"] == 1
        rig.calls()
        assert await read_at(cache, "f", 0, 2 * BS) == DATA[: 2 * BS]
        assert asked_blocks(rig) == {1}


async def test_add_data_holds_a_partial_block_until_it_is_complete(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    async with rig.engine() as cache:
        got = await cache.add_data("f", 100, DATA[100:BS])
        assert (got.accepted, got.rejected, got.pending) == (0, 0, 1)
        assert cache.statistics()["cached_bytes"] == 0
        got = await cache.add_data("f", 0, DATA[:100])
        assert (got.accepted, got.rejected, got.pending) == (1, 0, 0)
        rig.calls()
        assert await read_at(cache, "f", 0, BS) == DATA[:BS]
        assert rig.reads() == []


async def test_add_data_covers_the_short_last_block(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    async with rig.engine() as cache:
        got = await cache.add_data("f", 4 * BS, DATA[4 * BS :])
        assert (got.accepted, got.pending) == (1, 0)


async def test_add_data_beyond_the_end_is_out_of_bounds(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    async with rig.engine() as cache:
        with pytest.raises(OutOfBounds) as info:
            await cache.add_data("f", len(DATA) + 1, b"x")
        assert info.value.exit_code == 4
        with pytest.raises(OutOfBounds):
            await cache.add_data("f", len(DATA) - 1, b"xy")
        assert cache.statistics()["cached_bytes"] == 0


async def test_add_data_without_content_info_needs_trust(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        with pytest.raises(NoContentInfo) as info:
            await cache.add_data("f", 0, DATA)
        assert info.value.exit_code == 3
        assert cache.statistics()["cached_bytes"] == 0
        got = await cache.add_data("f", 0, DATA, trust=True)
        assert got.accepted == 5
        rig.calls()
        assert await read_sequential(cache, "f") == DATA
        assert rig.reads() == []


async def test_add_data_checks_against_hashes_recorded_from_earlier_fetches(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    async with rig.engine() as cache:
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        await cache.purge("f")
        assert (await cache.add_data("f", 0, b"\x00" * BS)).rejected == 1
        assert (await cache.add_data("f", 0, DATA[:BS])).accepted == 1
        rig.calls()
        assert await read_at(cache, "f", 0, 10) == DATA[:10]
        assert rig.reads() == []


async def test_added_blocks_are_encrypted_too(tmp_path):
    rig = Rig(tmp_path, {"f": DATA})
    rig.memory.publish("f", BS)
    async with rig.engine(KEY) as cache:
        assert (await cache.add_data("f", 0, DATA)).accepted == 5
    assert DATA[:64] not in Path(data_file(rig)).read_bytes()
    async with rig.engine(KEY) as cache:
        assert await read_sequential(cache, "f") == DATA
    assert rig.reads() == []


@pytest.mark.parametrize("verify", ["once", "off"])
async def test_encrypted_blocks_are_sealed_in_chunks_and_small_reads_open_one(tmp_path, verify):
    data = os.urandom(3 * 4 * BS + 777)  # blocks of four 64 KiB chunks
    rig = Rig(tmp_path, {"f": data})
    async with rig.engine(KEY, block_size=4 * BS) as cache:
        assert await read_sequential(cache, "f") == data
    rig.calls()
    path = data_file(rig)
    at = 4 * BS + 2 * BS + 9  # block 1, chunk 2
    patch(path, at, bytes([read_raw(path, at, 1)[0] ^ 1]))  # a bit of the ciphertext
    async with rig.engine(KEY, block_size=4 * BS, verify=verify) as cache:
        for offset in range(0, len(data), 50_000):
            if not 4 * BS <= offset < 8 * BS:
                assert await read_at(cache, "f", offset, 5000) == data[offset : offset + 5000]
        assert cache.statistics()["corrupt_in_cache"] == 0  # block 1 not read yet
        assert await read_at(cache, "f", at - 10, 20) == data[at - 10 : at + 10]
        assert cache.statistics()["corrupt_in_cache"] == 1
    assert asked_blocks(rig) == {4}  # block 1 at 4 * BS, fetched again
