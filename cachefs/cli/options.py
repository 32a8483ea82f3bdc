"""What the commands' options share: the parser that errs in one line, the
value types with their ranges, and the options every command has.

A value type refuses what is out of range at parse time, naming the option,
the value and what is allowed, exit 2.  The ranges are finite, and wide
enough for any real use.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from cachefs.engine.config import MAX_BLOCK, MIN_BLOCK
from cachefs.errors import ConfigError
from cachefs.units import parse_size

N = TypeVar("N", int, float)

LOG_LEVELS = ("debug", "info", "warning", "error")

MAX_TTL = 365 * 24 * 3600  # a year: the kernel's attribute timeouts overflow far above
MAX_RETRIES = 100
MAX_FETCHES = 1024
MAX_READAHEAD_KB = 1 << 20  # 1 GiB
MAX_TIMEOUT = 24 * 3600
MAX_SIZE = 1 << 60  # 1024P: sizes stay far inside 64-bit arithmetic
MAX_OFFSET = (1 << 63) - 1  # the largest file offset Linux has

#: Adds a command: (name, help, description) -> its parser.
AddCommand = Callable[[str, str, str], argparse.ArgumentParser]


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever the input held
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            # Before Python 3.13, "--opt=--" gives [] unchecked instead of a value.
            given = getattr(parsed, action.dest, None)
            if action.option_strings and action.nargs is None and given == []:
                self.error(f"argument {action.option_strings[0]}: expected one argument")
        return parsed, extras


def common_options() -> Parser:
    """The options of every command (a parent parser)."""
    common = Parser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="how much to log (default: info for a foreground mount, warning otherwise); "
        "debug also shows tracebacks",
    )
    return common


def listen_address(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 HOST in brackets) as (host, port); the port from 1 to 65535."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c in host for c in "[]/ ") or (":" in host and "[" not in text):
        raise argparse.ArgumentTypeError(
            f"not HOST:PORT: {text!r} (like 127.0.0.1:9464, or [::1]:9464 for IPv6)"
        )
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port from 1 to 65535: {port!r} in {text!r}")
    return host, int(port)


def number(kind: type[N], low: int, high: int) -> Callable[[str], N]:
    """A converter to a finite *kind* from *low* to *high*; the error states the range."""
    noun = "a whole number" if kind is int else "a number"
    allowed = f"from {low} to {high}"

    def convert(text: str) -> N:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r} ({allowed})") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r} ({allowed})")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}: {text!r} ({allowed})")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}: {text!r} ({allowed})")
        return value

    convert.__name__ = kind.__name__
    return convert


def non_empty(text: str) -> str:
    """A path or URL as given; empty is refused (as a path it would mean ".")."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def size(text: str) -> int:
    try:
        value = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is more than the largest size, 1024P")
    return value


def block_size(text: str) -> int:
    value = size(text)
    if not (MIN_BLOCK <= value <= MAX_BLOCK) or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two from 4K to 64M, not {text!r}")
    return value


def size_or_percent(text: str) -> int | float:
    """A size in bytes (int), or a share of the cache filesystem like ``5%`` (float)."""
    if not text.strip().endswith("%"):
        return size(text)
    try:
        percent = float(text.strip()[:-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}") from None
    if not 0 <= percent < 100:
        raise argparse.ArgumentTypeError(f"a percentage must be from 0% to below 100%: {text!r}")
    return percent / 100


def checked_by(check: Callable[[str], str]) -> Callable[[str], str]:
    """A converter that runs *check* (ConfigError if it refuses) at parse time."""

    def convert(text: str) -> str:
        try:
            return check(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def paths_argument(parser: argparse.ArgumentParser) -> None:
    """The PATH... of the commands on files in a mount."""
    parser.add_argument("paths", metavar="PATH", nargs="+", type=non_empty)
