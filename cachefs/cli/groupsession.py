"""What the ``group`` and ``records`` commands share: a command family with
sub-commands, the groups directory, opening a group for one command (a
Session: sync with the engine within --timeout, one warning line if it is
unreachable), and the parsing of durations, times and type ids.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cachefs.cli.options import MAX_TIMEOUT, AddCommand, Parser, non_empty, number
from cachefs.errors import CacheFSError, ConfigError

# The record store (and the Redis client under it) is imported by the commands that
# use it, not by every cachefs command: it would double the start-up time of all.
if TYPE_CHECKING:
    from cachefs.records.group import Group
    from cachefs.records.groups import Membership

T = TypeVar("T")

#: A family's sub-command adder: (name, help, description) -> its parser.
AddLeaf = Callable[[str, str, str], argparse.ArgumentParser]

DEFAULT_INVITE_LIFETIME = timedelta(days=90)
_DURATION = re.compile(r"(?:\d+[smhdw])+")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def family(add: AddCommand, name: str, help: str, description: str) -> AddLeaf:
    """A command with sub-commands (``cachefs NAME COMMAND``); returns their adder.
    Each sub-command takes --groups-dir and --log-level (also after its name)."""
    parent = add(name, help, description)
    leaves = parent.add_subparsers(dest="action", required=True, metavar="COMMAND")
    common = Parser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=argparse.SUPPRESS,
        help="how much to log (default: warning); debug also shows tracebacks",
    )
    common.add_argument(
        "--groups-dir",
        metavar="DIR",
        type=non_empty,
        help="this member's groups directory (default: $CACHEFS_GROUPS_DIR, else "
        "$XDG_DATA_HOME/cachefs/groups, for root /var/lib/cachefs/groups)",
    )

    def leaf(sub: str, help: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = leaves.add_parser(
            sub, help=help, description=description, parents=[common], prog=f"cachefs {name} {sub}"
        )
        return parser

    return leaf


def engine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=number(float, 0, MAX_TIMEOUT),
        default=5.0,
        help="how long to wait for the group's engine, first to catch up with what the "
        "other members changed, last to publish this command's change (default: 5); "
        "an engine that does not answer in time is a warning, not an error",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="do not contact the engine: work on the local database; changes wait in "
        "the outbox for the next command that reaches the engine",
    )


def groups_dir(args: argparse.Namespace) -> Path:
    from cachefs.records.groups import default_groups_dir

    return Path(args.groups_dir) if args.groups_dir else default_groups_dir()


def run(main: Callable[..., Awaitable[T]], *args: Any) -> T:
    """trio.run, with the error a nursery wrapped unwrapped, so that it reaches the
    command line as itself (one line, its exit code)."""
    import trio

    try:
        return trio.run(main, *args)
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from None


def warn(message: str) -> None:
    print(f"cachefs: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def choose_group(directory: Path, name: str | None, how: str = "--group NAME") -> Membership:
    """The membership named, or the only one; a one-line error listing them otherwise."""
    from cachefs.records.errors import GroupError
    from cachefs.records.groups import list_memberships, load_membership

    if name is not None:
        return load_membership(directory, name)
    joined = list_memberships(directory)
    if len(joined) == 1:
        return joined[0]
    if not joined:
        raise GroupError(
            f"no group in {directory}: create one (cachefs group create) or join one "
            "(cachefs group join), or give --groups-dir"
        )
    names = ", ".join(sorted(m.name for m in joined))
    raise GroupError(f"this member is in several groups ({names}): choose one with {how}")


@dataclass
class Session:
    """An open group and whether its engine answered the first sync."""

    group: Group
    timeout: float
    reachable: bool = True

    async def catch_up(self) -> None:
        """Read what the other members changed (and publish what waits in the outbox);
        a warning if the engine does not answer in time."""
        from cachefs.records.redislog import redact

        group = self.group
        if group.engine is None:
            return
        self.reachable = await group.sync(self.timeout)
        if not self.reachable:
            replication = (await group.statistics()).replication
            why = (
                replication.last_error
                if replication and replication.last_error
                else (f"no answer within {self.timeout:g} s")
            )
            warn(
                f"the engine of group {group.name} is unreachable ({redact(group.engine)}: "
                f"{why}); working on the local database, changes are published when it is back"
            )

    async def publish(self) -> None:
        """Publish this command's change (if the engine answered at first)."""
        if self.group.engine is None or not self.reachable:
            return
        if not await self.group.sync(self.timeout):
            warn(
                f"the engine of group {self.group.name} did not take the change within "
                f"{self.timeout:g} s; it stays in the outbox and is published by the next "
                "command or process that reaches the engine"
            )


@asynccontextmanager
async def open_session(
    args: argparse.Namespace, name: str, *, catch_up: bool = True
) -> AsyncIterator[Session]:
    """Open group *name* of this member and (unless told not to) catch up with its
    engine first."""
    from cachefs.records.group import open_group

    level = getattr(args, "log_level", None)
    if level is None:
        # an unreachable engine is said once, by catch_up, not by the replication too
        logging.getLogger("cachefs.records.replication").setLevel(logging.ERROR)
    if level != "debug":
        # the Redis client logs each failed connection with its traceback; the
        # replication says what matters in one line
        logging.getLogger("coredis").setLevel(logging.CRITICAL)
    async with open_group(
        name, groups_dir=groups_dir(args), replicate=not getattr(args, "offline", False)
    ) as group:
        session = Session(group, getattr(args, "timeout", 5.0))
        if catch_up:
            await session.catch_up()
        yield session


def expiry(text: str) -> timedelta | datetime:
    """--expires: a duration from now (``90m``, ``2h``, ``1d12h``; s m h d w) or a
    W3C date-time (``2026-12-31``, ``2026-12-31T00:00Z``; no zone means UTC)."""
    from cachefs.records.attributes import parse_date

    text = text.strip()
    if _DURATION.fullmatch(text):
        seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhdw])", text))
        if not 0 < seconds <= 100 * 365 * 86400:
            raise argparse.ArgumentTypeError(f"{text!r}: a duration from 1s to 100 years")
        return timedelta(seconds=seconds)
    try:
        return parse_date(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (2h, 90d; units s m h d w) nor a date-time "
            "(2026-12-31T00:00Z)"
        ) from None


def when(spec: timedelta | datetime, now: datetime) -> datetime:
    return now + spec if isinstance(spec, timedelta) else spec


def type_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a UUID: {text!r:.80}") from None


def iso(t: datetime) -> str:
    """ISO 8601 in UTC, as the records' attributes write dates."""
    from cachefs.records.attributes import format_date

    return format_date(t)


def shown_time(t: datetime) -> str:
    from cachefs.records.credentials import FOREVER

    return "never" if t >= FOREVER else iso(t)


def now_utc() -> datetime:
    return datetime.now(UTC)


def read_input(
    path: Path, what: str, limit: int, too_big: Callable[[str], CacheFSError] = ConfigError
) -> bytes:
    """A file's bytes (``-``: stdin): ConfigError (exit 2) if it cannot be read,
    *too_big* if it holds more than *limit* bytes."""
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise too_big(f"{what} {path} is larger than {limit} bytes")
    return data
