from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from cachefs.engine.state import crypto
from cachefs.engine.state.crypto import OVERHEAD, CacheKey, new_salt, read_key_material
from cachefs.errors import BadKey, ConfigError

RAW = bytes(range(32))
SALT = bytes(16)
BLOCK = os.urandom(4096)


@pytest.fixture(scope="module")
def key() -> CacheKey:
    return CacheKey.derive(RAW, SALT)


@pytest.fixture(scope="module")
def other_key() -> CacheKey:
    return CacheKey.derive(bytes(range(1, 33)), SALT)


def key_file(tmp_path: Path, content: bytes, mode: int = 0o600) -> str:
    path = tmp_path / "key"
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


def assert_one_line(error: BadKey, *words: str) -> None:
    message = str(error)
    assert "\n" not in message
    for word in words:
        assert word in message
    # no chained OSError for a traceback to show
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


# -- blocks ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", [bytes, bytearray, memoryview])
def test_block_round_trip(key: CacheKey, make: type) -> None:
    sealed = key.seal_block(7, "etag-1", 3, make(BLOCK))
    assert len(sealed) == len(BLOCK) + OVERHEAD
    assert BLOCK not in sealed
    assert key.open_block(7, "etag-1", 3, sealed) == BLOCK
    assert key.open_block(7, "etag-1", 3, memoryview(bytearray(sealed))) == BLOCK


def test_empty_block_round_trip(key: CacheKey) -> None:
    sealed = key.seal_block(1, "v", 0, b"")
    assert len(sealed) == OVERHEAD
    assert key.open_block(1, "v", 0, sealed) == b""


def test_sealing_twice_uses_fresh_nonces(key: CacheKey) -> None:
    first = key.seal_block(1, "v", 0, BLOCK)
    second = key.seal_block(1, "v", 0, BLOCK)
    assert first[:12] != second[:12]
    assert first != second


@pytest.mark.parametrize(
    ("row_id", "version", "index"),
    [
        (8, "etag-1", 3),  # another file
        (7, "etag-2", 3),  # another version of the file
        (7, "etag-1", 4),  # another position
        (7, "etag-1", 0),
        (7, "", 3),
        (7, "etag-1\x00", 3),
        (3, "etag-1", 7),  # row id and index swapped
    ],
)
def test_block_moved_elsewhere_does_not_open(
    key: CacheKey, row_id: int, version: str, index: int
) -> None:
    sealed = key.seal_block(7, "etag-1", 3, BLOCK)
    assert key.open_block(row_id, version, index, sealed) is None


@pytest.mark.parametrize("position", [0, 11, 12, 100, -17, -1])
def test_flipped_byte_does_not_open(key: CacheKey, position: int) -> None:
    sealed = bytearray(key.seal_block(7, "etag-1", 3, BLOCK))
    sealed[position] ^= 0x01
    assert key.open_block(7, "etag-1", 3, sealed) is None


@pytest.mark.parametrize("size", [0, 1, OVERHEAD - 1, OVERHEAD, OVERHEAD + 4096])
def test_hole_does_not_open(key: CacheKey, size: int) -> None:
    assert key.open_block(7, "etag-1", 3, bytes(size)) is None


def test_truncated_block_does_not_open(key: CacheKey) -> None:
    sealed = key.seal_block(7, "etag-1", 3, BLOCK)
    assert key.open_block(7, "etag-1", 3, sealed[:-1]) is None
    assert key.open_block(7, "etag-1", 3, sealed[: OVERHEAD - 1]) is None
    assert key.open_block(7, "etag-1", 3, sealed[:12]) is None


@pytest.mark.parametrize("into", [True, False], ids=["decrypt_into", "older cryptography"])
def test_a_block_opens_into_a_buffer_only_when_authentic(
    key: CacheKey, monkeypatch: pytest.MonkeyPatch, into: bool
) -> None:
    monkeypatch.setattr(crypto, "_DECRYPT_INTO", into)
    sealed = bytearray(key.seal_block(7, "etag-1", 3, BLOCK))
    out = bytearray(len(BLOCK))
    assert key.open_block_into(7, "etag-1", 3, sealed, memoryview(out))
    assert out == BLOCK
    assert not key.open_block_into(7, "etag-1", 4, sealed, memoryview(out))  # elsewhere
    assert not key.open_block_into(7, "etag-1", 3, sealed, memoryview(out)[:-1])  # wrong size
    assert not key.open_block_into(7, "etag-1", 3, bytes(len(sealed)), memoryview(out))  # hole
    sealed[100] ^= 1
    assert not key.open_block_into(7, "etag-1", 3, sealed, memoryview(out))


def split(sealed: bytes) -> tuple[bytes, bytes]:
    """A sealed block as the data files keep a chunk: its nonce apart from
    its ciphertext and tag."""
    return sealed[: crypto.NONCE_SIZE], sealed[crypto.NONCE_SIZE :]


@pytest.mark.parametrize("into", [True, False], ids=["decrypt_into", "older cryptography"])
def test_a_chunk_kept_apart_from_its_nonce_opens_only_where_it_was_sealed(
    key: CacheKey, other_key: CacheKey, monkeypatch: pytest.MonkeyPatch, into: bool
) -> None:
    monkeypatch.setattr(crypto, "_DECRYPT_INTO", into)
    nonce, body = split(key.seal_block(7, "etag-1", 3, BLOCK))
    out = bytearray(len(BLOCK))
    assert key.open_chunk(7, "etag-1", 3, nonce, body) == BLOCK
    assert key.open_chunk_into(7, "etag-1", 3, memoryview(nonce), bytearray(body), memoryview(out))
    assert out == BLOCK
    for where in [(8, "etag-1", 3), (7, "etag-2", 3), (7, "etag-1", 2), (7, "etag-1", 4)]:
        assert key.open_chunk(*where, nonce, body) is None  # another file, version or place
        assert not key.open_chunk_into(*where, nonce, body, memoryview(out))
    assert other_key.open_chunk(7, "etag-1", 3, nonce, body) is None


def test_a_tampered_cut_or_punched_chunk_does_not_open(key: CacheKey) -> None:
    nonce, body = split(key.seal_block(7, "etag-1", 3, BLOCK))
    other_nonce, other_body = split(key.seal_block(7, "etag-1", 3, BLOCK))
    out = memoryview(bytearray(len(BLOCK)))
    cases = [
        (nonce, body[:-1]),  # cut short
        (nonce, body[: crypto.TAG_SIZE - 1]),  # not even a tag
        (nonce[:-1], body),  # a short nonce
        (other_nonce, body),  # another sealing's nonce
        (nonce, other_body),  # another sealing's ciphertext and tag
        (nonce, body[:-16] + other_body[-16:]),  # another sealing's tag
        (bytes(crypto.NONCE_SIZE), bytes(len(body))),  # a hole
    ]
    for i in (0, len(BLOCK) - 1, len(body) - 1):  # ciphertext, its last byte, the tag
        flipped = bytearray(body)
        flipped[i] ^= 1
        cases.append((nonce, bytes(flipped)))
    for n, b in cases:
        assert key.open_chunk(7, "etag-1", 3, n, b) is None
        size = max(len(b) - crypto.TAG_SIZE, 0)
        assert not key.open_chunk_into(7, "etag-1", 3, n, b, out[:size])
    assert not key.open_chunk_into(7, "etag-1", 3, nonce, body, out[:-1])  # wrong size


def test_block_under_another_key_does_not_open(key: CacheKey, other_key: CacheKey) -> None:
    sealed = key.seal_block(7, "etag-1", 3, BLOCK)
    assert other_key.open_block(7, "etag-1", 3, sealed) is None


# -- metadata and names -----------------------------------------------------------


def test_metadata_round_trip(key: CacheKey) -> None:
    sealed = key.seal(b"dir/file.bin", b"files.name:7")
    assert b"file.bin" not in sealed
    assert key.open(sealed, b"files.name:7") == b"dir/file.bin"
    assert key.open(key.seal(b"", b"ctx"), b"ctx") == b""


def test_metadata_in_another_context_does_not_open(key: CacheKey) -> None:
    sealed = key.seal(b"dir/file.bin", b"files.name:7")
    assert key.open(sealed, b"files.name:8") is None
    assert key.open(sealed, b"") is None


def test_tampered_or_truncated_metadata_does_not_open(key: CacheKey, other_key: CacheKey) -> None:
    sealed = key.seal(b"dir/file.bin", b"ctx")
    flipped = bytearray(sealed)
    flipped[-1] ^= 0x80
    assert key.open(bytes(flipped), b"ctx") is None
    assert key.open(sealed[:-1], b"ctx") is None
    assert key.open(sealed[:5], b"ctx") is None
    assert key.open(bytes(len(sealed)), b"ctx") is None
    assert other_key.open(sealed, b"ctx") is None


def test_blocks_and_metadata_use_separate_keys(key: CacheKey) -> None:
    assert key.open_block(1, "v", 0, key.seal(b"data", b"ctx")) is None
    assert key.open(key.seal_block(1, "v", 0, b"data"), b"ctx") is None


def test_name_tag_is_stable_and_keyed(key: CacheKey, other_key: CacheKey) -> None:
    tag = key.name_tag("dir/file.bin")
    assert tag == key.name_tag("dir/file.bin")
    assert tag == CacheKey.derive(RAW, SALT).name_tag("dir/file.bin")
    assert len(tag) == 64 and int(tag, 16) >= 0
    assert "file" not in tag
    assert key.name_tag("dir/file.bin2") != tag
    assert other_key.name_tag("dir/file.bin") != tag
    assert key.name_tag("dir/\udcff") != key.name_tag("dir/?")


# -- deriving keys ----------------------------------------------------------------


def test_raw_and_hex_keys_are_the_same_key(key: CacheKey) -> None:
    for material in (RAW.hex().encode(), RAW.hex().upper().encode()):
        same = CacheKey.derive(material, SALT)
        assert same.check_value() == key.check_value()
        assert same.open_block(7, "v", 1, key.seal_block(7, "v", 1, BLOCK)) == BLOCK


def test_passphrase_derives_a_stable_key() -> None:
    first = CacheKey.derive(b"correct horse battery staple", SALT)
    again = CacheKey.derive(b"correct horse battery staple", SALT)
    assert first.check_value() == again.check_value()
    assert again.open(first.seal(b"name", b"ctx"), b"ctx") == b"name"
    # 64 characters that are not hex are a passphrase too, not an error
    assert CacheKey.derive(b"z" * 64, SALT).check_value() != first.check_value()


def test_another_salt_gives_another_key(key: CacheKey) -> None:
    salt = new_salt()
    assert len(salt) == 16 and salt != new_salt()
    passphrase = b"correct horse battery staple"
    assert (
        CacheKey.derive(passphrase, salt).check_value()
        != CacheKey.derive(passphrase, SALT).check_value()
    )
    assert CacheKey.derive(RAW, salt).check_value() != key.check_value()


def test_wrong_key_has_another_check_value(key: CacheKey, other_key: CacheKey) -> None:
    check = key.check_value()
    assert check == key.check_value()
    assert len(check) == 64 and int(check, 16) >= 0
    assert other_key.check_value() != check
    assert CacheKey.derive(b"a passphrase", SALT).check_value() != check


def test_empty_material_is_a_bad_key() -> None:
    with pytest.raises(BadKey):
        CacheKey.derive(b"", SALT)


# -- reading the key ------------------------------------------------------------------


def test_key_file_wins_over_environment(tmp_path: Path) -> None:
    path = key_file(tmp_path, b"from the file")
    assert read_key_material(path, {"CACHEFS_KEY": "from env"}) == b"from the file"
    assert read_key_material(None, {"CACHEFS_KEY": "from env"}) == b"from env"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"secret\n", b"secret"),
        (b"secret\r\n", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b"secret", b"secret"),
        (b" secret \n", b" secret "),
        (RAW, RAW),
    ],
)
def test_key_file_loses_one_trailing_newline(
    tmp_path: Path, content: bytes, expected: bytes
) -> None:
    assert read_key_material(key_file(tmp_path, content), {}) == expected


def test_no_key_at_all(tmp_path: Path) -> None:
    with pytest.raises(BadKey) as info:
        read_key_material(None, {})
    assert_one_line(info.value, "--key-file", "CACHEFS_KEY")
    assert isinstance(info.value, ConfigError)


def test_empty_environment_key() -> None:
    with pytest.raises(BadKey) as info:
        read_key_material(None, {"CACHEFS_KEY": ""})
    assert_one_line(info.value, "CACHEFS_KEY", "empty")


def test_missing_key_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope")
    with pytest.raises(BadKey) as info:
        read_key_material(path, {"CACHEFS_KEY": "ignored when a file is given"})
    assert_one_line(info.value, path, "does not exist")


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"])
def test_empty_key_file(tmp_path: Path, content: bytes) -> None:
    path = key_file(tmp_path, content)
    with pytest.raises(BadKey) as info:
        read_key_material(path, {})
    assert_one_line(info.value, path, "empty")


def test_key_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BadKey) as info:
        read_key_material(str(tmp_path), {})
    assert_one_line(info.value, str(tmp_path), "directory")


def test_unreadable_key_file(tmp_path: Path) -> None:
    # A path through a regular file: open fails with ENOTDIR even for root.
    path = key_file(tmp_path, b"secret") + "/key"
    with pytest.raises(BadKey) as info:
        read_key_material(path, {})
    assert_one_line(info.value, path, "not readable")


def test_key_file_readable_by_others_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = key_file(tmp_path, b"secret", mode=0o644)
    with caplog.at_level(logging.WARNING, logger="cachefs.engine.state.crypto"):
        assert read_key_material(path, {}) == b"secret"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert path in warnings[0].getMessage() and "644" in warnings[0].getMessage()


def test_private_key_file_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = key_file(tmp_path, b"secret", mode=0o600)
    with caplog.at_level(logging.WARNING, logger="cachefs.engine.state.crypto"):
        read_key_material(path, {})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_32_character_passphrase_is_stretched_not_taken_raw() -> None:
    salt = new_salt()
    text = b"correct horse battery staple 123"
    assert len(text) == 32
    assert CacheKey.derive(text, salt).check_value() != CacheKey(text, salt).check_value()


def test_a_passphrase_is_the_same_key_from_a_file_or_the_environment(tmp_path: Path) -> None:
    salt = new_salt()
    passphrase = "x" * 31  # with its newline the file holds 32 bytes
    path = tmp_path / "key"
    path.write_text(passphrase + "\n")
    path.chmod(0o600)
    from_file = CacheKey.derive(read_key_material(str(path), {}), salt)
    from_env = CacheKey.derive(read_key_material(None, {"CACHEFS_KEY": passphrase}), salt)
    assert from_file.check_value() == from_env.check_value()
