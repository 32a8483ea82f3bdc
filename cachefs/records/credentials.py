"""Charters, credentials and revocations: the signed blobs a group is made of.

Policy:

- A group is born with a charter, self-signed by its creator.  The group id is
  a hash of the charter, so no other charter can pose under the same id.  The
  creator is an administrator for good, with a credential that never expires.
- A credential gives one public key a role until an expiry; a revocation ends
  a member's credentials from its time on.  Signing either here says nothing
  of whether the signer may: that is Trust's question.
- Every blob is canonical JSON (sorted keys, bytes in base64, times in UTC
  with microseconds); ``from_bytes`` accepts only what ``to_bytes`` would have
  written, so a blob has one spelling and its signature survives a round trip.
  Each kind of blob is signed under its own ``kind``, so one cannot pass for
  another.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from cachefs.records.errors import GroupError
from cachefs.records.identity import (
    KEY_SIZE,
    MEMBER_ID_PATTERN,
    SIGNATURE_SIZE,
    Identity,
    check_label,
    hash_id,
    member_id_of,
)
from cachefs.records.model import micros

__all__ = [
    "FOREVER",
    "Charter",
    "Credential",
    "Revocation",
    "Role",
    "create_charter",
    "issue_credential",
    "revoke",
    "time_text",
]

log = logging.getLogger(__name__)

#: The expiry of the creator's own credential.
FOREVER = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)

_MAX_BLOB = 4096
_MAX_RECORD_SIZE = 1 << 31
_GROUP_ID = re.compile(r"g[a-z2-7]{25}")
_TIME_TEXT = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)\.(\d{6})Z")


class Role(enum.StrEnum):
    ADMIN = "admin"
    MEMBER = "member"


def time_text(t: datetime) -> str:
    """``t`` as the blobs spell it: UTC, microseconds, ``Z``."""
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return (
        f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:"
        f"{t.second:02d}.{t.microsecond:06d}Z"
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _canonical(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError("not a string")
    return v


def _bytes_of(size: int, what: str) -> Callable[[object], bytes]:
    def conv(v: object) -> bytes:
        data = base64.b64decode(_str(v), validate=True)
        if len(data) != size:
            raise ValueError(f"{what} is not {size} bytes")
        return data

    return conv


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[object], str]:
    def conv(v: object) -> str:
        if not regex.fullmatch(_str(v)):
            raise ValueError(f"not a {what}")
        return str(v)

    return conv


def _time(v: object) -> datetime:
    m = _TIME_TEXT.fullmatch(_str(v))
    if m is None:
        raise ValueError("not a UTC time")
    year, month, day, hour, minute, second, micro = map(int, m.groups())
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def _label(allow_empty: bool) -> Callable[[object], str]:
    def conv(v: object) -> str:
        try:
            return check_label(_str(v), "a name", allow_empty=allow_empty)
        except GroupError:
            raise ValueError("not a valid name") from None

    return conv


def _size(v: object) -> int:
    if type(v) is not int or not 1 <= v <= _MAX_RECORD_SIZE:
        raise ValueError("not a record size")
    return v


_KEY = _bytes_of(KEY_SIZE, "a public key")
_SIG = _bytes_of(SIGNATURE_SIZE, "a signature")
_MID = _pattern(MEMBER_ID_PATTERN, "member id")
_GID = _pattern(_GROUP_ID, "group id")


def _parse(data: bytes, cls: type[Any], fields: dict[str, Callable[[object], object]]) -> Any:
    """An instance of ``cls`` from exactly the bytes its to_bytes writes."""
    what = cls.__name__.lower()
    if not isinstance(data, bytes) or len(data) > _MAX_BLOB:
        raise GroupError(f"malformed {what}: not bytes, or over {_MAX_BLOB} bytes")
    try:
        obj = json.loads(data.decode("ascii"))
        if not isinstance(obj, dict) or set(obj) != {"kind", "signature", *fields}:
            raise ValueError("not the fields of one")
        if obj["kind"] != cls.KIND:
            raise ValueError(f"kind {str(obj['kind'])[:40]!r}")
        values = {name: conv(obj[name]) for name, conv in fields.items()}
        item = cls(**values, signature=_SIG(obj["signature"]))
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as e:
        raise GroupError(f"malformed {what}: {e}") from None
    if item.to_bytes() != data:
        raise GroupError(f"malformed {what}: not in canonical form")
    return item


@dataclass(frozen=True)
class Charter:
    """The group's birth certificate, self-signed by its creator."""

    KIND: ClassVar[str] = "cachefs-charter/1"
    group_id: str
    name: str
    creator_key: bytes
    created: datetime
    max_record_size: int
    signature: bytes

    def _identifying(self) -> dict[str, object]:
        return {
            "kind": self.KIND,
            "name": self.name,
            "creator_key": _b64(self.creator_key),
            "created": time_text(self.created),
            "max_record_size": self.max_record_size,
        }

    def derived_id(self) -> str:
        """The group id the other fields give (``group_id`` if genuine)."""
        return hash_id("g", _canonical(self._identifying()))

    def signed_bytes(self) -> bytes:
        return _canonical({**self._identifying(), "group_id": self.group_id})

    def to_bytes(self) -> bytes:
        return _canonical(
            {**self._identifying(), "group_id": self.group_id, "signature": _b64(self.signature)}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Charter:
        charter: Charter = _parse(
            data,
            cls,
            {
                "group_id": _GID,
                "name": _label(False),
                "creator_key": _KEY,
                "created": _time,
                "max_record_size": _size,
            },
        )
        return charter


@dataclass(frozen=True)
class Credential:
    """An administrator's word that ``public_key`` is a member with ``role``
    from ``issued`` to ``expires``."""

    KIND: ClassVar[str] = "cachefs-credential/1"
    group_id: str
    member_id: str
    public_key: bytes
    name: str
    role: Role
    issued: datetime
    expires: datetime
    issuer_id: str
    signature: bytes

    def _fields(self) -> dict[str, object]:
        return {
            "kind": self.KIND,
            "group_id": self.group_id,
            "member_id": self.member_id,
            "public_key": _b64(self.public_key),
            "name": self.name,
            "role": str(self.role),
            "issued": time_text(self.issued),
            "expires": time_text(self.expires),
            "issuer_id": self.issuer_id,
        }

    def signed_bytes(self) -> bytes:
        return _canonical(self._fields())

    def to_bytes(self) -> bytes:
        return _canonical({**self._fields(), "signature": _b64(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Credential:
        cred: Credential = _parse(
            data,
            cls,
            {
                "group_id": _GID,
                "member_id": _MID,
                "public_key": _KEY,
                "name": _label(True),
                "role": lambda v: Role(_str(v)),
                "issued": _time,
                "expires": _time,
                "issuer_id": _MID,
            },
        )
        if member_id_of(cred.public_key) != cred.member_id:
            raise GroupError("malformed credential: its member id is not its key's")
        if cred.expires <= cred.issued:
            raise GroupError("malformed credential: it expires before it is issued")
        return cred


@dataclass(frozen=True)
class Revocation:
    """An administrator's word that ``member_id`` is no longer trusted from
    ``revoked`` on."""

    KIND: ClassVar[str] = "cachefs-revocation/1"
    group_id: str
    member_id: str
    revoked: datetime
    issuer_id: str
    signature: bytes

    def _fields(self) -> dict[str, object]:
        return {
            "kind": self.KIND,
            "group_id": self.group_id,
            "member_id": self.member_id,
            "revoked": time_text(self.revoked),
            "issuer_id": self.issuer_id,
        }

    def signed_bytes(self) -> bytes:
        return _canonical(self._fields())

    def to_bytes(self) -> bytes:
        return _canonical({**self._fields(), "signature": _b64(self.signature)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Revocation:
        rev: Revocation = _parse(
            data,
            cls,
            {"group_id": _GID, "member_id": _MID, "revoked": _time, "issuer_id": _MID},
        )
        return rev


def _utc(t: datetime) -> datetime:
    """``t`` as the blobs keep it: UTC, microseconds."""
    return _time(time_text(t))


def create_charter(
    creator: Identity, name: str, *, now: datetime, max_record_size: int = 1 << 20
) -> tuple[Charter, Credential]:
    """A new group's charter and its creator's own (administrator) credential."""
    check_label(name, "a group name", allow_empty=False)
    if not 1 <= max_record_size <= _MAX_RECORD_SIZE:
        raise GroupError(f"the maximum record size must be 1 to {_MAX_RECORD_SIZE} bytes")
    unsigned = Charter("", name, creator.public_key, _utc(now), max_record_size, b"")
    unsigned = dataclasses.replace(unsigned, group_id=unsigned.derived_id())
    charter = dataclasses.replace(unsigned, signature=creator.sign(unsigned.signed_bytes()))
    own = issue_credential(
        creator,
        charter,
        creator.public_key,
        role=Role.ADMIN,
        name=creator.name,
        now=now,
        expires=FOREVER,
    )
    return charter, own


def issue_credential(
    issuer: Identity,
    charter: Charter,
    public_key: bytes,
    *,
    role: Role,
    name: str,
    now: datetime,
    expires: datetime,
) -> Credential:
    """Sign a credential (whether the issuer may is Trust's question)."""
    check_label(name, "a member name", allow_empty=True)
    if role not in tuple(Role):
        raise GroupError(f"a role is admin or member, not {str(role)[:20]!r}")
    if micros(expires) <= micros(now):
        raise GroupError(f"a credential must expire after it is issued ({time_text(now)})")
    unsigned = Credential(
        charter.group_id,
        member_id_of(public_key),
        public_key,
        name,
        Role(role),
        _utc(now),
        _utc(expires),
        issuer.member_id,
        b"",
    )
    return dataclasses.replace(unsigned, signature=issuer.sign(unsigned.signed_bytes()))


def revoke(issuer: Identity, charter: Charter, member_id: str, *, now: datetime) -> Revocation:
    """Sign a revocation (whether the issuer may is Trust's question)."""
    if not MEMBER_ID_PATTERN.fullmatch(member_id):
        raise GroupError(f"not a member id: {member_id!r:.40} (m followed by 25 characters)")
    unsigned = Revocation(charter.group_id, member_id, _utc(now), issuer.member_id, b"")
    return dataclasses.replace(unsigned, signature=issuer.sign(unsigned.signed_bytes()))
