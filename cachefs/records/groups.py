"""The groups directory: which groups this machine is a member of, on disk.

Layout (directories 0700, files 0600, every file replaced whole or not at all)::

    GROUPS_DIR/identity.key             this machine's member key, identity.name beside it
    GROUPS_DIR/groups/NAME/charter      the group's charter
    GROUPS_DIR/groups/NAME/chain        this member's credential, then its issuer's, ...
                                        up to the creator's own (JSON list of base64 blobs)
    GROUPS_DIR/groups/NAME/config.json  {"engine": URL or null, "stream_maxlen": N}
    GROUPS_DIR/groups/NAME/records.db   the record database

Nothing here is taken on trust: a membership is loaded only if its charter
and chain verify.  An invitation is a file an administrator hands a new
member; it carries the charter and the new credential's chain, all signed,
and names the group by its charter's name.  NAME is the member's local name
for the group (the charter's, unless it joined under another).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cachefs.records.credentials import Charter, Credential, Role, create_charter, issue_credential
from cachefs.records.errors import GroupError, GroupNotReady, NotAuthorized, RecordsError
from cachefs.records.identity import Identity, read_file, write_file
from cachefs.records.model import micros
from cachefs.records.trust import Trust

__all__ = [
    "IDENTITY_FILE",
    "Membership",
    "create_group",
    "default_groups_dir",
    "group_name_ok",
    "invite",
    "join",
    "list_memberships",
    "load_membership",
    "parse_engine_url",
]

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"
DEFAULT_STREAM_MAXLEN = 100_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_FILE = 1 << 20
_MAX_CHAIN = 16
_INVITATION = "cachefs-invitation"


def default_groups_dir() -> Path:
    """$CACHEFS_GROUPS_DIR; else /var/lib/cachefs/groups for root; else
    $XDG_DATA_HOME/cachefs/groups (~/.local/share/cachefs/groups)."""
    if env := os.environ.get("CACHEFS_GROUPS_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/cachefs/groups")
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "cachefs" / "groups"


def group_name_ok(name: str) -> str:
    """``name`` if it can name a group here (letters, digits, . _ -, up to 64)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise GroupError(
            f"bad group name {str(name)[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def parse_engine_url(url: str) -> str:
    """``url`` if it names a Redis server: redis:// or rediss://, optional
    user:password@, a host, optional :port and /db.  The message of a refusal
    never repeats the URL (it may hold a password)."""
    hint = "use redis://[user:password@]host[:port][/db] or rediss://..."
    if not isinstance(url, str) or not url.isprintable() or any(c.isspace() for c in url):
        raise GroupError(f"the engine URL holds spaces or control characters: {hint}")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise GroupError(f"the engine URL is malformed (its port?): {hint}") from None
    if parts.scheme not in ("redis", "rediss") or not url.startswith(parts.scheme + "://"):
        raise GroupError(f"the engine URL must start with redis:// or rediss://: {hint}")
    if not parts.hostname:
        raise GroupError(f"the engine URL names no host: {hint}")
    if port is not None and not 1 <= port <= 65535:
        raise GroupError(f"the engine URL's port must be 1 to 65535: {hint}")
    db = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.path not in ("", "/") and not (db.isdigit() and db.isascii() and int(db) < 1 << 31):
        raise GroupError(f"the engine URL's database must be a number after the host: {hint}")
    if parts.query or parts.fragment or "#" in url or "?" in url:
        raise GroupError(f"the engine URL takes no ?options or #fragment: {hint}")
    return url


@dataclass(frozen=True)
class Membership:
    """This machine's membership of one group, as verified from disk."""

    name: str
    path: Path
    charter: Charter
    chain: tuple[Credential, ...]
    engine: str | None = field(repr=False)  # may hold a password
    stream_maxlen: int

    @property
    def database(self) -> Path:
        return self.path / "records.db"

    @property
    def credential(self) -> Credential:
        """This member's own credential (the chain's first)."""
        return self.chain[0]

    def trust(self) -> Trust:
        """A Trust that knows the charter and this member's chain."""
        return _verified(self.charter, self.chain)


def _verified(charter: Charter, chain: Sequence[Credential]) -> Trust:
    """NotAuthorized unless ``chain`` verifies, from the creator's end on."""
    trust = Trust(charter)
    for cred in reversed(chain):
        trust.add_credential(cred)
    return trust


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not base64 text") from None
    if _b64(data) != text:
        raise ValueError("not canonical base64")
    return data


def _chain_bytes(chain: Sequence[Credential]) -> bytes:
    return json.dumps([_b64(c.to_bytes()) for c in chain]).encode() + b"\n"


def _parse_chain(items: object) -> tuple[Credential, ...]:
    if not isinstance(items, list) or not 1 <= len(items) <= _MAX_CHAIN:
        raise ValueError(f"the chain is not a list of 1 to {_MAX_CHAIN} credentials")
    return tuple(Credential.from_bytes(_unb64(item)) for item in items)


def _config_bytes(engine: str | None, stream_maxlen: int) -> bytes:
    return json.dumps({"engine": engine, "stream_maxlen": stream_maxlen}, indent=1).encode()


def _write_membership(path: Path, charter: Charter, chain: Sequence[Credential]) -> None:
    write_file(path / "chain", _chain_bytes(chain))
    write_file(path / "charter", charter.to_bytes())


def _groups_root(groups_dir: Path) -> Path:
    root = groups_dir / "groups"
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise GroupError(f"cannot use the groups directory {groups_dir}: {_why(e)}") from None
    return root


def _why(e: OSError) -> str:
    if isinstance(e, FileExistsError | NotADirectoryError):
        return "a path in it is a file, not a directory"
    return e.strerror or str(e)


def _fill_new_group(path: Path, write: Callable[[], None]) -> None:
    """Write a new group directory's files, or leave no directory at all: a
    half-made group would block the name and warn on every command."""
    try:
        write()
    except (OSError, GroupError) as e:
        shutil.rmtree(path, ignore_errors=True)
        why = _why(e) if isinstance(e, OSError) else e.detail
        raise GroupError(f"cannot write the group in {path}: {why}") from None


def create_group(
    groups_dir: Path,
    name: str,
    identity: Identity,
    *,
    engine: str | None,
    max_record_size: int,
    now: datetime,
) -> Membership:
    """A new group with ``identity`` as its creator and first administrator."""
    group_name_ok(name)
    if engine is not None:
        parse_engine_url(engine)
    charter, own = create_charter(identity, name, now=now, max_record_size=max_record_size)
    path = _groups_root(groups_dir) / name
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise GroupError(
            f"a group {name} already exists in {groups_dir}: pick another name"
        ) from None

    def write() -> None:
        write_file(path / "config.json", _config_bytes(engine, DEFAULT_STREAM_MAXLEN))
        _write_membership(path, charter, (own,))

    _fill_new_group(path, write)
    log.info("created group %s (%s) in %s", name, charter.group_id, groups_dir)
    return Membership(name, path, charter, (own,), engine, DEFAULT_STREAM_MAXLEN)


def invite(
    membership: Membership,
    issuer: Identity,
    public_key: bytes,
    *,
    role: Role,
    name: str,
    expires: datetime,
    now: datetime,
) -> bytes:
    """The invitation file that lets the holder of ``public_key`` join with
    ``role`` until ``expires``."""
    if issuer.member_id != membership.credential.member_id:
        raise GroupError(
            f"you are {issuer.member_id}, but group {membership.name} in {membership.path.parent} "
            f"belongs to member {membership.credential.member_id}"
        )
    trust = membership.trust()
    mine = trust.credential(issuer.member_id, now)
    if mine is None or mine.role is not Role.ADMIN:
        raise NotAuthorized(
            f"member {issuer.member_id} is not an administrator of group {membership.name} "
            "now (expired, revoked or a plain member): only an administrator invites"
        )
    if micros(expires) > micros(mine.expires):
        raise NotAuthorized(
            f"a credential cannot outlive its issuer's: yours expires at {mine.expires.isoformat()}"
        )
    cred = issue_credential(
        issuer, membership.charter, public_key, role=role, name=name, now=now, expires=expires
    )
    chain = (cred, *membership.chain)
    _verified(membership.charter, chain)  # what the new member will check
    invitation = {
        _INVITATION: 1,
        "group": membership.charter.name,
        "charter": _b64(membership.charter.to_bytes()),
        "chain": [_b64(c.to_bytes()) for c in chain],
    }
    return json.dumps(invitation, indent=1, sort_keys=True).encode() + b"\n"


def _parse_invitation(data: bytes) -> tuple[str, Charter, tuple[Credential, ...]]:
    if len(data) > _MAX_FILE:
        raise GroupError("not a cachefs invitation: the file is too large")
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict) or set(obj) != {_INVITATION, "group", "charter", "chain"}:
            raise ValueError("not the fields of one")
        if type(obj[_INVITATION]) is not int or obj[_INVITATION] != 1:
            raise ValueError("a version this cachefs does not know")
        charter = Charter.from_bytes(_unb64(obj["charter"]))
        chain = _parse_chain(obj["chain"])
        if obj["group"] != charter.name:
            raise ValueError("its group name is not its charter's")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GroupError(f"not a cachefs invitation ({e}): ask for the file again") from None
    except GroupError as e:
        raise GroupError(f"not a valid invitation ({e.detail}): ask for the file again") from None
    return charter.name, charter, chain


def join(
    groups_dir: Path,
    invitation: bytes,
    identity: Identity,
    *,
    engine: str | None,
    name: str | None = None,
    now: datetime | None = None,
) -> Membership:
    """Become a member with an invitation; ``name`` is the local name of the
    group (default: the charter's).  Joining a group again with a newer
    invitation replaces this member's credentials."""
    group, charter, chain = _parse_invitation(invitation)
    if chain[0].member_id != identity.member_id:
        raise GroupError(
            f"this invitation is for member {chain[0].member_id}, you are {identity.member_id}: "
            "send the administrator your own public key"
        )
    _verified(charter, chain)
    now = now or datetime.now(UTC)
    if micros(now) > micros(chain[0].expires):
        raise GroupNotReady(
            f"the invitation to group {group} expired at {chain[0].expires.isoformat()}: "
            "ask for a new one"
        )
    name = group_name_ok(name or group)
    if engine is not None:
        parse_engine_url(engine)
    path = _groups_root(groups_dir) / name
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        held = load_membership(groups_dir, name)
        if held.charter != charter:
            raise GroupError(
                f"a group named {name} with another charter ({held.charter.group_id}) is already "
                f"joined in {groups_dir}: join under another name (--name)"
            ) from None
        engine = engine if engine is not None else held.engine
        write_file(path / "config.json", _config_bytes(engine, held.stream_maxlen))
        _write_membership(path, charter, chain)
        log.info("renewed the membership of group %s (%s)", name, charter.group_id)
        return Membership(name, path, charter, chain, engine, held.stream_maxlen)

    def write() -> None:
        write_file(path / "config.json", _config_bytes(engine, DEFAULT_STREAM_MAXLEN))
        _write_membership(path, charter, chain)

    _fill_new_group(path, write)
    log.info("joined group %s (%s) as %s", name, charter.group_id, chain[0].role)
    return Membership(name, path, charter, chain, engine, DEFAULT_STREAM_MAXLEN)


def _read(path: Path) -> bytes:
    try:
        return read_file(path, limit=_MAX_FILE)
    except FileNotFoundError:
        raise GroupError(
            f"{path} is missing: the group is incomplete; remove {path.parent} and join again"
        ) from None


def load_membership(groups_dir: Path, name: str) -> Membership:
    """The membership of group ``name``, verified (GroupError if there is none)."""
    group_name_ok(name)
    path = groups_dir / "groups" / name
    if not path.is_dir():
        raise GroupError(f"no group {name} in {groups_dir}: create or join it first")
    try:
        charter = Charter.from_bytes(_read(path / "charter"))
        chain = _parse_chain(json.loads(_read(path / "chain")))
        config = json.loads(_read(path / "config.json"))
        if not isinstance(config, dict) or set(config) != {"engine", "stream_maxlen"}:
            raise ValueError("config.json does not hold exactly engine and stream_maxlen")
        engine, maxlen = config["engine"], config["stream_maxlen"]
        if engine is not None:
            parse_engine_url(engine)
        if type(maxlen) is not int or maxlen < 1:
            raise ValueError("stream_maxlen in config.json is not a positive integer")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise GroupError(f"group {name} in {groups_dir} is damaged: {e}") from None
    except GroupError as e:
        raise GroupError(f"group {name} in {groups_dir} is damaged: {e.detail}") from None
    _verified(charter, chain)
    return Membership(name, path, charter, chain, engine, maxlen)


def list_memberships(groups_dir: Path) -> list[Membership]:
    """Every group this machine is a member of, by name; a damaged one is
    logged and left out."""
    root = groups_dir / "groups"
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not _NAME.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            found.append(load_membership(groups_dir, entry.name))
        except RecordsError as e:
            log.warning("group %s left out: %s", entry.name, e)
    return found
