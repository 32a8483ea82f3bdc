"""Encryption at rest for the block cache (``--encrypt``).

One key per mount, read from ``--key-file`` or ``CACHEFS_KEY``: 32 raw bytes,
64 hex characters, or a passphrase stretched with scrypt over the cache's
salt.  From it HKDF-SHA256 derives independent subkeys: blocks and metadata
are sealed with AES-256-GCM under a random 96-bit nonce, file names become
HMAC-SHA256 tags, and a key check value tells a wrong key before anything is
read.  Every primitive comes from ``cryptography``; nothing here is hand-made.

Sealed layout, blocks and metadata alike: ``nonce (12) || ciphertext || tag (16)``.
Anything that does not authenticate opens as ``None`` and is treated as not
cached: a wrong or tampered byte is never served.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from cachefs.errors import BadKey

log = logging.getLogger(__name__)

NONCE_SIZE = 12
TAG_SIZE = 16
OVERHEAD = NONCE_SIZE + TAG_SIZE
"""Bytes a sealed block (or sealed metadata) has beyond its plaintext."""

KEY_SIZE = 32
SALT_SIZE = 16
KEY_ENV = "CACHEFS_KEY"

# scrypt's cost: ~0.1 s and 32 MiB once per mount, by design.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1

_BLOCK_INFO = b"cachefs v1 block key"
_META_INFO = b"cachefs v1 metadata key"
_NAME_INFO = b"cachefs v1 name key"
_CHECK_INFO = b"cachefs v1 check key"
_CHECK_MESSAGE = b"cachefs v1 key check value"
_BLOCK_DOMAIN = b"cachefs v1 block\x00"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_ZERO_NONCE = bytes(NONCE_SIZE)
_ZERO_TAG = bytes(TAG_SIZE)
# Decrypting straight into a buffer saves a copy; older releases of cryptography cannot.
_DECRYPT_INTO = hasattr(AESGCM, "decrypt_into")


MAX_KEY_MATERIAL = 4096
"""Bytes a key file or CACHEFS_KEY may hold: a passphrase is never longer."""


def read_key_material(key_file: str | None, environ: Mapping[str, str]) -> bytes:
    """The key material for ``--encrypt``: the key file's bytes, else ``CACHEFS_KEY``.

    ``--key-file`` wins when both are given.  A key file of exactly 32 bytes
    that are not text is a raw key, taken as it is; otherwise one trailing newline (``\\n`` or
    ``\\r\\n``) is dropped, so ``echo passphrase > key`` works.  A key file that
    group or others may read gets a warning, not a refusal.  A key file must
    be a regular file (a FIFO or a device is refused without waiting on it),
    and it and CACHEFS_KEY hold at most MAX_KEY_MATERIAL bytes.

    Raises BadKey (one line, naming the problem) when no key is given, or the
    key file is missing, unreadable, not a regular file, empty or too big.
    """
    if key_file is not None:
        return _read_key_file(key_file)
    value = environ.get(KEY_ENV)
    if value is None:
        raise BadKey(f"--encrypt needs a key: give --key-file or set {KEY_ENV}")
    if not value:
        raise BadKey(f"{KEY_ENV} is empty: --encrypt needs a key")
    # The bytes the environment really holds, as os.environb would give them.
    material = value.encode("utf-8", "surrogateescape")
    if len(material) > MAX_KEY_MATERIAL:
        raise BadKey(f"{KEY_ENV} holds more than {MAX_KEY_MATERIAL} bytes: it is not a key")
    return material


def _read_key_file(key_file: str) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        fd = os.open(key_file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BadKey(f"key file {key_file} does not exist") from None
    except OSError as e:
        raise BadKey(f"key file {key_file} is not readable: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise BadKey(f"key file {key_file} is a directory")
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device"
            raise BadKey(f"key file {key_file} is {kind}: a key file must be a regular file")
        # Read one byte past the limit: a size of 0 proves nothing (/proc, /sys).
        chunks: list[bytes] = []
        left = MAX_KEY_MATERIAL + 1
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as e:
        raise BadKey(f"key file {key_file} is not readable: {e.strerror}") from None
    finally:
        os.close(fd)
    material = b"".join(chunks)
    if len(material) > MAX_KEY_MATERIAL:
        raise BadKey(
            f"key file {key_file} holds more than {MAX_KEY_MATERIAL} bytes: it is not a key "
            "(32 raw bytes, 64 hex digits or a passphrase)"
        )
    if not is_raw_key(material):
        if material.endswith(b"\r\n"):
            material = material[:-2]
        elif material.endswith(b"\n"):
            material = material[:-1]
        if not material:
            raise BadKey(f"key file {key_file} is empty")
    # Only a key that is used gets the warning: a refusal stays one line.
    if mode & 0o077:
        log.warning(
            "key file %s can be read by other users (mode %o); chmod 600 it",
            key_file,
            stat.S_IMODE(mode),
        )
    return material


_TEXT = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}


def is_raw_key(material: bytes) -> bool:
    """Whether *material* is a raw 32-byte key rather than a passphrase of 32 characters."""
    return len(material) == KEY_SIZE and not _TEXT.issuperset(material)


def new_salt() -> bytes:
    """A fresh random salt for a new encrypted cache; the caller stores it with the cache."""
    return os.urandom(SALT_SIZE)


class CacheKey:
    """The keys of one encrypted cache.

    derive() is the slow part (scrypt, when the material is a passphrase):
    call it once per mount.  Sealing and opening reuse the ciphers built there.
    """

    __slots__ = ("_blocks", "_check_key", "_meta", "_names")

    def __init__(self, master: bytes, salt: bytes) -> None:
        """Use derive(); *master* is exactly 32 bytes of key."""
        if len(master) != KEY_SIZE:
            raise ValueError(f"master key must be {KEY_SIZE} bytes")
        self._blocks = AESGCM(_subkey(master, salt, _BLOCK_INFO))
        self._meta = AESGCM(_subkey(master, salt, _META_INFO))
        self._names = HMAC(_subkey(master, salt, _NAME_INFO), hashes.SHA256())
        self._check_key = _subkey(master, salt, _CHECK_INFO)

    @classmethod
    def derive(cls, material: bytes, salt: bytes) -> CacheKey:
        """The cache's keys from the user's key *material* and the cache's *salt*.

        32 bytes that are not text are the key itself (text of that length is
        a passphrase: a random key is text with odds of 1 in 10^14); 64 hex
        characters are the 32 bytes written out; anything else is a
        passphrase, stretched with scrypt
        (n=2**15, r=8, p=1) over *salt*.  The salt also enters every subkey, so
        two caches under one key share no keys.  Raises BadKey on empty material.
        """
        if not material:
            raise BadKey("the encryption key is empty")
        if is_raw_key(material):
            master = bytes(material)
        elif len(material) == 2 * KEY_SIZE and _HEX_DIGITS.issuperset(material):
            master = bytes.fromhex(material.decode("ascii"))
        else:
            scrypt = Scrypt(salt=salt, length=KEY_SIZE, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
            master = scrypt.derive(material)
        return cls(master, salt)

    def check_value(self) -> str:
        """The key check value (hex): equal values mean the same key.

        Store it with the cache when the cache is created; a mount whose value
        differs has the wrong key and must refuse rather than read garbage.
        The value reveals nothing about the key.
        """
        mac = HMAC(self._check_key, hashes.SHA256())
        mac.update(_CHECK_MESSAGE)
        return mac.finalize().hex()

    def seal_block(
        self, row_id: int, version: str, index: int, plaintext: bytes | bytearray | memoryview
    ) -> bytes:
        """Encrypt and authenticate one block for the cache's data file.

        The block is bound to the file's row, its version and its block index:
        moved to another file, position or version it no longer opens.  The
        result is OVERHEAD bytes longer than *plaintext*.
        """
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._blocks.encrypt(nonce, plaintext, _block_ad(row_id, version, index))

    def open_block(
        self, row_id: int, version: str, index: int, sealed: bytes | bytearray | memoryview
    ) -> bytes | None:
        """The plaintext of a block sealed by seal_block with the same arguments.

        None when it does not authenticate: wrong key, tampered or truncated
        bytes, a block of another file, position or version, or a hole (all
        zeros).  Never raises on bad data; the caller treats None as not cached.
        """
        view = memoryview(sealed).cast("B")
        return self.open_chunk(row_id, version, index, view[:NONCE_SIZE], view[NONCE_SIZE:])

    def open_block_into(
        self,
        row_id: int,
        version: str,
        index: int,
        sealed: bytes | bytearray | memoryview,
        out: memoryview,
    ) -> bool:
        """Like open_block, the plaintext written into *out* (exactly its size).

        False when it does not authenticate; *out* then holds no plaintext
        to use.  One allocation and copy less than open_block.
        """
        view = memoryview(sealed).cast("B")
        return self.open_chunk_into(
            row_id, version, index, view[:NONCE_SIZE], view[NONCE_SIZE:], out
        )

    def open_chunk(
        self,
        row_id: int,
        version: str,
        index: int,
        nonce: bytes | bytearray | memoryview,
        body: bytes | bytearray | memoryview,
    ) -> bytes | None:
        """Like open_block, for a block whose nonce is kept apart from *body*
        (its ciphertext, then its tag): how the data files keep chunks."""
        if not _openable(nonce, body):
            return None
        try:
            return self._blocks.decrypt(nonce, body, _block_ad(row_id, version, index))
        except InvalidTag:
            return None

    def open_chunk_into(
        self,
        row_id: int,
        version: str,
        index: int,
        nonce: bytes | bytearray | memoryview,
        body: bytes | bytearray | memoryview,
        out: memoryview,
    ) -> bool:
        """Like open_chunk, the plaintext written into *out* (exactly its size,
        apart from *body*); False when it does not authenticate, and *out*
        then holds nothing to use."""
        if not _openable(nonce, body) or len(out) != len(body) - TAG_SIZE:
            return False
        ad = _block_ad(row_id, version, index)
        try:
            if _DECRYPT_INTO:
                self._blocks.decrypt_into(nonce, body, ad, out)
            else:
                out[:] = self._blocks.decrypt(nonce, body, ad)
        except InvalidTag:
            return False
        return True

    def name_tag(self, file_id: str) -> str:
        """A stable hex tag for *file_id*, stored in the index in place of the name.

        The same name under the same key always gives the same tag (so it can be
        looked up); without the key the tag tells nothing about the name.
        """
        mac = self._names.copy()
        mac.update(file_id.encode("utf-8", "surrogatepass"))
        return mac.finalize().hex()

    def seal(self, data: bytes, context: bytes) -> bytes:
        """Encrypt metadata (names, hash lists, error text) bound to *context*.

        *context* says where the value belongs (e.g. the column and row); it is
        authenticated, not stored, and must be given again to open().
        """
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._meta.encrypt(nonce, data, context)

    def open(self, sealed: bytes, context: bytes) -> bytes | None:
        """The metadata sealed by seal() under *context*; None when tampered,
        truncated, sealed under another key or another context."""
        if len(sealed) < OVERHEAD:
            return None
        view = memoryview(sealed)
        try:
            return self._meta.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], context)
        except InvalidTag:
            return None


def _openable(nonce: bytes | bytearray | memoryview, body: bytes | bytearray | memoryview) -> bool:
    """Whether a chunk can open at all: a nonce, a tag, and not a hole (all zeros)."""
    if len(nonce) != NONCE_SIZE or len(body) < TAG_SIZE:
        return False
    return not (nonce == _ZERO_NONCE and body[-TAG_SIZE:] == _ZERO_TAG)


def _subkey(master: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(master)


def _block_ad(row_id: int, version: str, index: int) -> bytes:
    """Associated data of a block: a domain string, then fixed-width row id and
    index, then the length-prefixed version, so no two triples share a value."""
    encoded = version.encode("utf-8", "surrogatepass")
    return _BLOCK_DOMAIN + struct.pack(">qQI", row_id, index, len(encoded)) + encoded
