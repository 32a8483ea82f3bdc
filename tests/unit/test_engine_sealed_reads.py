"""Encrypted cache hits open only the chunks a read lies in: attacks on those chunks.

Each chunk (64 KiB) is sealed on its own, its nonce and tag in a table after
the data, bound to the file's row, its version and the chunk's index.  A
chunk that was tampered with, reordered, moved from another file, cut off
or punched out must never reach a reader: the read returns the source's
bytes (the block is fetched again), whether the damage happened under a
running cache or before the next mount.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from enginerig import BS, Rig, read_at

from cachefs._linux.fileio import page_end

KEY = os.urandom(32)
BLOCK = 4 * BS  # blocks of four chunks
CHUNK = BS
ENTRY = 28  # a chunk's nonce and tag in the table
F = os.urandom(3 * BLOCK + 777)
G = os.urandom(2 * BLOCK + 5000)
C = 5  # the chunk attacked: block 1, its second chunk


def data_files(rig: Rig) -> dict[str, str]:
    """The data file of each source file, told apart by size."""
    found = {}
    for name in os.listdir(rig.cache_dir / "data"):
        path = str(rig.cache_dir / "data" / name)
        size = os.path.getsize(path)
        for file, data in (("f", F), ("g", G)):
            if size == page_end(len(data)) + -(-len(data) // CHUNK) * ENTRY:
                found[file] = path
    assert set(found) == {"f", "g"}
    return found


def chunk_of(path: str, size: int, c: int) -> tuple[bytes, bytes]:
    """Chunk *c* as stored: its ciphertext, and its nonce and tag."""
    with open(path, "rb") as f:
        f.seek(c * CHUNK)
        body = f.read(min(CHUNK, size - c * CHUNK))
        f.seek(page_end(size) + c * ENTRY)
        return body, f.read(ENTRY)


def put_chunk(path: str, size: int, c: int, stored: tuple[bytes, bytes]) -> None:
    with open(path, "r+b") as f:
        f.seek(c * CHUNK)
        f.write(stored[0])
        f.seek(page_end(size) + c * ENTRY)
        f.write(stored[1])


def flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x80]))


def tag_flipped(files: dict[str, str]) -> None:
    flip(files["f"], page_end(len(F)) + C * ENTRY + ENTRY - 1)


def nonce_flipped(files: dict[str, str]) -> None:
    flip(files["f"], page_end(len(F)) + C * ENTRY)


def ciphertext_flipped(files: dict[str, str]) -> None:
    flip(files["f"], C * CHUNK + 4096 + 5)


def reordered(files: dict[str, str]) -> None:
    """Chunks C and C + 1 of f change places, each with its own nonce and tag."""
    path = files["f"]
    a, b = chunk_of(path, len(F), C), chunk_of(path, len(F), C + 1)
    put_chunk(path, len(F), C, b)
    put_chunk(path, len(F), C + 1, a)


def from_another_file(files: dict[str, str]) -> None:
    """g's chunk C, with its nonce and tag, in f's place C: same key, same index."""
    put_chunk(files["f"], len(F), C, chunk_of(files["g"], len(G), C))


def table_cut_short(files: dict[str, str]) -> None:
    """The data file ends inside the table, before chunk C's nonce and tag."""
    os.truncate(files["f"], page_end(len(F)) + C * ENTRY + 5)


def punched(files: dict[str, str]) -> None:
    """Chunk C and its table entry read as zeros (a hole)."""
    put_chunk(files["f"], len(F), C, (bytes(CHUNK), bytes(ENTRY)))


ATTACKS: list[Callable[[dict[str, str]], None]] = [
    tag_flipped,
    nonce_flipped,
    ciphertext_flipped,
    reordered,
    from_another_file,
    table_cut_short,
    punched,
]


async def fill(rig: Rig) -> None:
    async with rig.engine(KEY, block_size=BLOCK) as cache:
        for name, data in (("f", F), ("g", G)):
            assert await read_at(cache, name, 0, len(data)) == data
    rig.calls()


def fetched_blocks(rig: Rig) -> set[tuple[str, int]]:
    return {(c["file_id"], c["position"] // BLOCK) for c in rig.reads()}


# A small read inside chunk C, and one across the boundary of chunks C and C + 1.
READS = [(C * CHUNK + 4096, 4096), ((C + 1) * CHUNK - 4096, 8192)]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(("offset", "n"), READS, ids=["in-a-chunk", "across-chunks"])
async def test_an_attacked_chunk_is_never_served_under_a_running_cache(
    tmp_path: Path, attack: Callable[[dict[str, str]], None], offset: int, n: int
) -> None:
    rig = Rig(tmp_path, {"f": F, "g": G})
    await fill(rig)
    async with rig.engine(KEY, block_size=BLOCK) as cache:
        # Read once in this mount: from here on only the seals are checked.
        assert await read_at(cache, "f", 0, len(F)) == F
        assert rig.reads() == []
        attack(data_files(rig))
        # Chunks of other blocks still open, and come from the cache.
        assert await read_at(cache, "f", 2 * BLOCK + 4096, 4096) == F[2 * BLOCK + 4096 :][:4096]
        assert await read_at(cache, "g", C * CHUNK, 4096) == G[C * CHUNK :][:4096]
        assert await read_at(cache, "f", offset, n) == F[offset : offset + n]
        if attack is not table_cut_short:  # that one is told as a data file cut short
            assert cache.statistics()["corrupt_in_cache"] >= 1
        assert ("f", 1) in fetched_blocks(rig)
        # Fetched again, the block reads back from the cache.
        rig.calls()
        assert await read_at(cache, "f", BLOCK, BLOCK) == F[BLOCK : 2 * BLOCK]
    if attack is not table_cut_short:  # a data file cut short is remade whole
        assert rig.reads() == []


@pytest.mark.parametrize("attack", ATTACKS)
async def test_an_attacked_chunk_is_never_served_after_a_remount(
    tmp_path: Path, attack: Callable[[dict[str, str]], None]
) -> None:
    rig = Rig(tmp_path, {"f": F, "g": G})
    await fill(rig)
    attack(data_files(rig))
    # verify off: nothing checks the blocks but their seals.
    async with rig.engine(KEY, block_size=BLOCK, verify="off") as cache:
        for offset, n in READS:
            assert await read_at(cache, "f", offset, n) == F[offset : offset + n]
        assert await read_at(cache, "g", C * CHUNK, 4096) == G[C * CHUNK :][:4096]
    assert fetched_blocks(rig) == {("f", 1)}


async def test_small_reads_of_every_chunk_come_from_the_cache(tmp_path: Path) -> None:
    rig = Rig(tmp_path, {"f": F, "g": G})
    await fill(rig)
    async with rig.engine(KEY, block_size=BLOCK, verify="off") as cache:
        for offset in range(0, len(F), 4096 * 7):
            assert await read_at(cache, "f", offset, 4096) == F[offset : offset + 4096]
        assert await read_at(cache, "f", len(F) - 100, 4096) == F[-100:]  # the short last chunk
        assert cache.statistics()["corrupt_in_cache"] == 0
    assert rig.reads() == []
