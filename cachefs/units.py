"""Byte sizes as users write them: ``4096``, ``64K``, ``1M``, ``10G``, ``1MiB``.

Suffixes are binary (K = 1024) and case-insensitive; a trailing ``B`` or
``iB`` is accepted.  Fractions are allowed when they come out to a whole
number of bytes (``1.5K``).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from cachefs.errors import InvalidSize

_UNITS = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGTP]?)(?:I?B)?\s*$", re.I)


def parse_size(text: str) -> int:
    """The number of bytes *text* names; InvalidSize if it names none."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidSize(f"invalid size {text!r}: use a number of bytes or 4K, 1M, 10G")
    try:
        number = Decimal(match["number"])
    except InvalidOperation:  # pragma: no cover - the regex admits only decimals
        raise InvalidSize(f"invalid size {text!r}") from None
    value = number * (1 << _UNITS[match["unit"].upper()])
    if value != value.to_integral_value():
        raise InvalidSize(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """*n* bytes for a human: ``0 B``, ``512 B``, ``1.5 KiB``, ``64.0 MiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"
