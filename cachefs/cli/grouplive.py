"""The live group on the command line: ``cachefs group pin`` / ``unpin``, and
the nodes and pins ``cachefs group status`` shows.

- A node is a live node status record (cachefs.group.formats): what a mount
  of the group says of itself, refreshed while it runs; a node that dies
  disappears when its record expires.  A record that does not decode as a
  node status (or holds numbers that are not counts) is skipped and counted,
  never shown half.
- A group pin is a live pin record whose last signer is an administrator
  now: members pin only what an administrator asked for.  Pin records from
  anyone else are counted as ignored.
- Only administrators pin and unpin (NOT_AUTHORIZED, exit 11, for a member).
  A pin lasts ``--expires``, by default 30 days or until the administrator's
  credentials end if sooner, as a record can outlive neither.  Unpin deletes
  every live pin record of the file, whoever signed it.
- PATH is the file's path from the source's root (``data/a.bin``); a leading
  ``/`` or ``./`` is dropped, so paths as a user writes them work.  ``..``,
  ``.`` and empty parts are refused: a pin names one file, exactly.
- Everything a node says is shown as data: text that is not printable is
  quoted, so a record cannot write control characters to the terminal.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cachefs.cli.groupsession import (
    AddLeaf,
    engine_options,
    expiry,
    iso,
    open_session,
    run,
    when,
)
from cachefs.units import format_size

# The record store is imported by the commands that use it (see cli.groupsession).
if TYPE_CHECKING:
    from cachefs.group.formats import NodeStatus
    from cachefs.records.credentials import Credential
    from cachefs.records.group import Group
    from cachefs.records.model import Record

__all__ = ["LiveGroup", "add_pin_commands", "file_path", "read_live"]

_PATH_HELP = "a file's path from the source's root, data/a.bin (a leading / or ./ is dropped)"

#: A group pin's lifetime when --expires is not given (and the credentials allow it).
DEFAULT_PIN_LIFETIME = timedelta(days=30)


def add_pin_commands(leaf: AddLeaf) -> None:
    pin = leaf(
        "pin",
        "pin files on every mount of the group (administrators)",
        "Publish a group pin for each PATH (the file's path from the source's root): "
        "every mount of the group fetches the file and keeps it in its cache until it is "
        "unpinned or the pin expires. `cachefs group status` shows each node's progress. "
        "A file pinned already is left as it is.",
    )
    pin.add_argument("group", metavar="GROUP")
    pin.add_argument("paths", metavar="PATH", nargs="+", type=file_path, help=_PATH_HELP)
    pin.add_argument(
        "--expires",
        metavar="WHEN",
        type=expiry,
        help="when the pin ends: a duration (2h, 90d; units s m h d w) or a date-time "
        "(default: 30d, or when your credentials end if sooner)",
    )
    engine_options(pin)
    pin.set_defaults(run=cmd_pin)

    unpin = leaf(
        "unpin",
        "release group pins (administrators)",
        "Delete the group pins of each PATH: every mount releases the file (it stays "
        "cached until evicted). A PATH that is not pinned is an error (RECORD_NOT_FOUND), "
        "after the others are unpinned.",
    )
    unpin.add_argument("group", metavar="GROUP")
    unpin.add_argument("paths", metavar="PATH", nargs="+", type=file_path, help=_PATH_HELP)
    engine_options(unpin)
    unpin.set_defaults(run=cmd_unpin)


def file_path(text: str) -> str:
    """A file's path from the source's root, as group pins name files."""
    path = text
    while True:
        if path.startswith("/"):
            path = path[1:]
        elif path.startswith("./"):
            path = path[2:]
        else:
            break
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a file's path from the source's root (data/a.bin): "
            "no '..', '.' or empty parts"
        )
    return path


# -- pin and unpin -----------------------------------------------------------------------


def cmd_pin(args: argparse.Namespace) -> int:
    return run(_pin, args)


async def _pin(args: argparse.Namespace) -> int:
    from cachefs.group.formats import pin_record

    async with open_session(args, args.group) as session:
        group = session.group
        now = group.records.clock.now()
        mine = _administrator(group, now, "pin")
        if args.expires is not None:
            expires = when(args.expires, now)
        else:
            expires = min(now + DEFAULT_PIN_LIFETIME, mine.expires)
        pinned = {pin.file: pin for pin in (await read_live(group)).pins}
        for path in dict.fromkeys(args.paths):
            held = pinned.get(path)
            if held is not None:
                print(f"{path} is pinned already (until {held.expires})")
                continue
            await group.records.add(pin_record(path, expires), internal=True)
            pinned[path] = Pin("", path, group.identity.member_id, "", iso(expires))
            print(f"pinned {path} until {iso(expires)}")
        await session.publish()
    return 0


def cmd_unpin(args: argparse.Namespace) -> int:
    return run(_unpin, args)


async def _unpin(args: argparse.Namespace) -> int:
    from cachefs.group.formats import GROUP_PIN_TYPE, decode_pin
    from cachefs.records.errors import RecordNotFound

    async with open_session(args, args.group) as session:
        group = session.group
        _administrator(group, group.records.clock.now(), "unpin")
        by_file: dict[str, list[Record]] = {}
        async with group.records.enum(GROUP_PIN_TYPE) as records:
            async for record in records:
                try:
                    by_file.setdefault(decode_pin(record), []).append(record)
                except ValueError:
                    continue
        missing = []
        for path in dict.fromkeys(args.paths):
            if path not in by_file:
                missing.append(path)
                continue
            for record in by_file[path]:
                assert record.id is not None
                try:
                    await group.records.delete(record.id, internal=True)
                except RecordNotFound:
                    pass  # deleted or expired meanwhile: unpinned all the same
            print(f"unpinned {path}")
        await session.publish()
    if missing:
        raise RecordNotFound(
            f"no group pin of {', '.join(missing)} in group {group.name} (nothing to unpin)"
        )
    return 0


def _administrator(group: Group, now: datetime, action: str) -> Credential:
    """This member's credential, if it is an administrator's; the one-line refusal
    otherwise."""
    from cachefs.records.credentials import Role
    from cachefs.records.errors import GroupNotReady, NotAuthorized

    me = group.identity.member_id
    mine = group.records.trust.credential(me, now)
    if mine is None:
        raise GroupNotReady(
            f"member {me} has no valid credentials in group {group.name} (expired or revoked)"
        )
    if mine.role is not Role.ADMIN:
        raise NotAuthorized(
            f"only an administrator may {action} files for group {group.name}; "
            f"you ({me}) are a {mine.role}"
        )
    return mine


# -- what status shows ---------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """A live node: its status record's creator, times, and what it says."""

    record: str
    member: str
    member_name: str
    updated: str
    expires: str
    status: NodeStatus

    def to_json(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "member": {"id": self.member, "name": self.member_name},
            "updated": self.updated,
            "expires": self.expires,
            **asdict(self.status),
        }

    def lines(self) -> list[str]:
        s = self.status
        ratio = "n/a" if s.hit_ratio is None else f"{s.hit_ratio:.1%}"
        who = f"{self.member} {_text(self.member_name)}".rstrip()
        rows = [
            ("source", _text(s.source)),
            ("software", _text(s.software)),
            ("cache", f"{format_size(s.cached_bytes)} of {format_size(s.cache_limit)}"),
            ("hit ratio", ratio),
            (
                "bytes",
                f"origin {format_size(s.origin_bytes)}, hosted cache "
                f"{format_size(s.hosted_bytes)}, local cache {format_size(s.local_bytes)}",
            ),
            ("updated", f"{self.updated} (expires {self.expires})"),
        ]
        for p in s.pins:
            done = f"{p.cached / p.size:.0%}" if p.size else "100%"
            progress = (
                f"error: {_text(p.error)}"
                if p.error is not None
                else f"{format_size(p.cached)} of {format_size(p.size)} ({done})"
            )
            rows.append(("pin", f"{_text(p.file)}  {progress}"))
        head = f"  {_text(s.host)}:{_text(s.mountpoint)}  by {who}"
        return [head, *(f"    {label:<10} {value}" for label, value in rows)]


@dataclass(frozen=True)
class Pin:
    """A live group pin: the file, who pinned it and until when."""

    record: str
    file: str
    pinned_by: str
    pinned_by_name: str
    expires: str

    def to_json(self) -> dict[str, Any]:
        return {
            "record": self.record,
            "file": self.file,
            "pinned_by": {"id": self.pinned_by, "name": self.pinned_by_name},
            "expires": self.expires,
        }

    def line(self) -> str:
        who = f"{self.pinned_by} {_text(self.pinned_by_name)}".rstrip()
        return f"  {_text(self.file)}  by {who}  expires {self.expires}"


@dataclass
class LiveGroup:
    """The group's live nodes and pins, as this member holds them now."""

    nodes: list[Node] = field(default_factory=list)
    pins: list[Pin] = field(default_factory=list)
    #: node status and pin records that do not decode
    malformed: int = 0
    #: pin records whose signer is not an administrator now
    ignored_pins: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "pins": [p.to_json() for p in self.pins],
            "malformed_records": self.malformed,
            "ignored_pins": self.ignored_pins,
        }

    def lines(self) -> list[str]:
        skipped = []
        if self.malformed:
            skipped.append(f"{self.malformed} malformed records skipped")
        if self.ignored_pins:
            skipped.append(f"{self.ignored_pins} pins by non-administrators ignored")
        note = f" ({', '.join(skipped)})" if skipped else ""
        out = [f"{'nodes':<9} {len(self.nodes)} live{note}"]
        for node in self.nodes:
            out += node.lines()
        out.append(f"{'pins':<9} {len(self.pins)} live")
        out += [pin.line() for pin in self.pins]
        return out


async def read_live(group: Group) -> LiveGroup:
    """The live node status and group pin records of *group* (the store returns
    only records neither expired nor deleted)."""
    from cachefs.group.formats import GROUP_PIN_TYPE, NODE_STATUS_TYPE, decode_pin, decode_status
    from cachefs.records.credentials import Role

    now = group.records.clock.now()
    names = {cred.member_id: cred.name for cred, _ in group.members()}
    live = LiveGroup()
    async with group.records.enum(NODE_STATUS_TYPE) as records:
        async for record in records:
            try:
                status = decode_status(record)
                _check_counts(status)
            except ValueError:
                live.malformed += 1
                continue
            assert record.modified is not None
            live.nodes.append(
                Node(
                    str(record.id),
                    record.creator,
                    names.get(record.creator, ""),
                    iso(record.modified),
                    iso(record.expires),
                    status,
                )
            )
    async with group.records.enum(GROUP_PIN_TYPE) as records:
        async for record in records:
            try:
                file_id = decode_pin(record)
            except ValueError:
                live.malformed += 1
                continue
            signer = group.records.trust.credential(record.modified_by, now)
            if signer is None or signer.role is not Role.ADMIN:
                live.ignored_pins += 1
                continue
            creator = record.creator
            live.pins.append(
                Pin(str(record.id), file_id, creator, names.get(creator, ""), iso(record.expires))
            )
    live.nodes.sort(key=lambda n: (n.status.host, n.status.mountpoint, n.record))
    live.pins.sort(key=lambda p: (p.file, p.record))
    return live


def _check_counts(status: NodeStatus) -> None:
    """ValueError unless every count of *status* is a whole number of bytes, its hit
    ratio a fraction, and its pins well formed: a node's record is shown whole or
    not at all."""

    def count(value: object) -> bool:
        return type(value) is int and value >= 0

    counts = (
        status.cached_bytes,
        status.cache_limit,
        status.origin_bytes,
        status.hosted_bytes,
        status.local_bytes,
    )
    ratio = status.hit_ratio
    if not all(count(v) for v in counts) or not (
        ratio is None or (type(ratio) in (int, float) and 0 <= ratio <= 1)
    ):
        raise ValueError("not a node status: bad counts")
    for p in status.pins:
        if not (
            isinstance(p.file, str)
            and count(p.cached)
            and count(p.size)
            and (p.error is None or isinstance(p.error, str))
        ):
            raise ValueError("not a node status: bad pin progress")


def _text(value: str) -> str:
    """*value* as it is if printable, else quoted (escapes shown, never sent)."""
    return value if value.isprintable() else json.dumps(value)
