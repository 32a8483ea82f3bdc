"""Members and their keys.

Policy:

- A member is an Ed25519 key pair; its id is a hash of its public key, so an
  id cannot be claimed without the key.  The private key lives in a PEM file
  only its owner can read; a key file others can read, a symbolic link or
  another user's file is refused, never used.
- A public key is shown and pasted in one spelling only (base64url, no
  padding); any other spelling is refused rather than guessed at.
- Files are written whole or not at all, readable by their owner only.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cachefs.records.errors import GroupError

__all__ = [
    "KEY_SIZE",
    "MEMBER_ID_PATTERN",
    "SIGNATURE_SIZE",
    "Identity",
    "check_label",
    "decode_key",
    "encode_key",
    "hash_id",
    "member_id_of",
    "read_file",
    "verify",
    "write_file",
]

log = logging.getLogger(__name__)

KEY_SIZE = 32
SIGNATURE_SIZE = 64
_MAX_LABEL = 64
MEMBER_ID_PATTERN = re.compile(r"m[a-z2-7]{25}")
_MAX_KEY_FILE = 16 * 1024
_KEY_TEXT = re.compile(r"[A-Za-z0-9_-]{43}")


def hash_id(prefix: str, data: bytes) -> str:
    """An id for ``data``: ``prefix`` and 25 base32 characters of its SHA-256."""
    digest = base64.b32encode(hashlib.sha256(data).digest()).decode("ascii").lower()
    return prefix + digest[:25]


def member_id_of(public_key: bytes) -> str:
    if len(public_key) != KEY_SIZE:
        raise GroupError(f"a public key is {KEY_SIZE} bytes, not {len(public_key)}")
    return hash_id("m", public_key)


def encode_key(public_key: bytes) -> str:
    """The public key as users paste it (43 characters)."""
    return base64.urlsafe_b64encode(public_key).rstrip(b"=").decode("ascii")


def decode_key(text: str) -> bytes:
    text = text.strip().rstrip("=")
    if not _KEY_TEXT.fullmatch(text):
        raise GroupError("a public key is 43 characters of A-Z a-z 0-9 - _ (as shown by identity)")
    key = base64.urlsafe_b64decode(text + "=")
    if encode_key(key) != text:
        raise GroupError("not a public key: its last character is not canonical")
    return key


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    if len(public_key) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_label(text: str, what: str, *, allow_empty: bool) -> str:
    if (not text and not allow_empty) or len(text) > _MAX_LABEL or not text.isprintable():
        raise GroupError(f"{what} must be 1 to {_MAX_LABEL} printable characters: {text!r:.80}")
    return text


# ----------------------------------------------------------------- files


def regular_or_new(path: Path, what: str) -> None:
    """GroupError unless *path* is a regular file or nothing yet: a file written whole
    is a new file renamed over it, which must not replace a FIFO, a device (as root,
    /dev/null itself) or a symbolic link."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise GroupError(f"cannot write {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise GroupError(
            f"{path} is not a regular file: {what} is written as a new file in its place; "
            "give the path of a regular file or of a new one"
        )


def write_file(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write a 0600 file whole or not at all; ``exclusive``: never replace one
    (FileExistsError).  Never replaces anything but a regular file (GroupError)."""
    regular_or_new(path, "the file")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_file(path: Path, *, limit: int, private: bool = False) -> bytes:
    """The contents of a regular file, never through a symbolic link;
    ``private``: also refuse one that is not the caller's or that others may
    read or write.  FileNotFoundError if missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise GroupError(
                f"{path} is a symbolic link: replace it with the file itself"
            ) from None
        if isinstance(e, FileNotFoundError):
            raise
        raise GroupError(f"cannot read {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise GroupError(f"{path} is not a regular file: remove it")
        if private and st.st_uid != os.geteuid():
            raise GroupError(f"{path} belongs to uid {st.st_uid}, not to you: use your own")
        if private and st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise GroupError(
                f"{path} can be read or written by others (mode {mode:04o}): run chmod 600 {path}"
            )
        chunks = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise GroupError(f"{path} is larger than {limit} bytes: not a cachefs file")
        return b"".join(chunks)
    finally:
        os.close(fd)


# -------------------------------------------------------------- identity


class Identity:
    """This member: its key pair and optional human name."""

    def __init__(self, private_key: Ed25519PrivateKey, name: str = "") -> None:
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.member_id = member_id_of(self.public_key)
        self.name = check_label(name, "a member name", allow_empty=True)

    def __repr__(self) -> str:
        return f"Identity({self.member_id}, {self.name!r})"

    @classmethod
    def generate(cls, name: str = "") -> Identity:
        """A new identity that lives in memory only."""
        return cls(Ed25519PrivateKey.generate(), name)

    @classmethod
    def load_or_create(cls, path: Path, name: str | None = None) -> Identity:
        """The identity whose key is at ``path``, created there if missing;
        ``name`` (if given) replaces the stored human name."""
        try:
            return cls._load_or_create(path, name)
        except OSError as e:
            why = e.strerror or str(e)
            if isinstance(e, FileExistsError | NotADirectoryError):
                why = "a path in it is a file, not a directory"
            raise GroupError(f"cannot create the member key {path}: {why}") from None

    @classmethod
    def _load_or_create(cls, path: Path, name: str | None) -> Identity:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.path.lexists(path):
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            try:
                write_file(path, pem, exclusive=True)
                log.info("created the member key %s", path)
            except FileExistsError:
                pass  # created meanwhile by another process: use that one
        identity = cls.load(path)
        if name is not None and name != identity.name:
            identity = cls(identity._private, name)
            write_file(path.with_suffix(".name"), name.encode() + b"\n")
        return identity

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            pem = read_file(path, limit=_MAX_KEY_FILE, private=True)
        except FileNotFoundError:
            raise GroupError(
                f"no member key at {path}: create one with `cachefs group identity`"
            ) from None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise GroupError(f"{path} holds no readable unencrypted private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise GroupError(f"{path} holds a key that is not Ed25519")
        name_path = path.with_suffix(".name")
        try:
            raw = read_file(name_path, limit=4 * _MAX_LABEL)
        except FileNotFoundError:
            return cls(key)
        try:
            name = check_label(raw.decode().strip(), "a member name", allow_empty=True)
        except (UnicodeDecodeError, GroupError):
            raise GroupError(f"{name_path} holds no valid member name: fix or remove it") from None
        return cls(key, name)

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)
