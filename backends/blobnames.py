"""The names a blob store accepts (cachefs.contract.BlobStore).

A name is ``[0-9a-z/._-]`` text of ``/``-separated parts, none of them
empty, ``.`` or ``..``: it maps to an object key or a relative path as it
is, and can never leave the store's prefix or directory.  Anything else is a
ValueError: a caller's bug, not a store that is down.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[0-9a-z._-]+(?:/[0-9a-z._-]+)*")


def check_name(name: str) -> str:
    """*name* if a blob may bear it; ValueError otherwise."""
    if not _NAME.fullmatch(name) or any(part in (".", "..") for part in name.split("/")):
        raise ValueError(
            f"bad blob name {name!r}: expected [0-9a-z/._-] without empty, . or .. parts"
        )
    return name
