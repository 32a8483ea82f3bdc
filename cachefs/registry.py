"""Find the backend for a source URL.

Backends are plugins: each is an entry point of the group
``cachefs.backends`` named after its URL scheme, pointing at a factory
``open_backend(url: str, **options) -> Backend``.  The core never imports a
backend module by name.  A source without a scheme (``/srv/data``,
``./data``) is a local directory, i.e. scheme ``file``.

Schemes are case-insensitive (``FILE:///srv/data`` is ``file:///srv/data``).
A source is a URL only when its scheme is followed by ``//``: ``file:/x``
is the relative path ``file:/x``, the same for every part of cachefs that
reads it (the local backend, the check that a mount does not reach into
itself).
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from importlib.metadata import entry_points
from typing import Any

from cachefs.contract import Backend
from cachefs.errors import SourceError, UnknownBackend

log = logging.getLogger(__name__)

GROUP = "cachefs.backends"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def source_scheme(source: str) -> str:
    """The URL scheme of *source*, lower-cased; ``file`` for a plain path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else "file"


def local_path(source: str) -> str | None:
    """The directory a ``file`` source names; None for a source of another scheme.

    A plain path is returned as written; ``file:///abs/path`` (or
    ``file://localhost/abs/path``) as its percent-decoded path, bytes that
    are not UTF-8 kept as os.fsdecode keeps them.  SourceError, naming the
    problem, for a file URL that is malformed, names another host, has a
    query or fragment, or holds a NUL byte.
    """
    if source_scheme(source) != "file":
        return None
    if "\0" in source:
        raise SourceError("bad source: it holds a NUL byte")
    if "://" not in source:
        return source
    expected = "expected file:///absolute/path"
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError as e:
        raise SourceError(f"bad file URL {source!r}: malformed ({e}); {expected}") from None
    if parts.netloc.lower() not in ("", "localhost") or not parts.path.startswith("/"):
        raise SourceError(f"bad file URL {source!r}: {expected}")
    if "?" in source or "#" in source:
        raise SourceError(
            f"bad file URL {source!r}: no query or fragment is allowed "
            "(write a '?' or '#' in a name as %3F or %23)"
        )
    path = urllib.parse.unquote(parts.path, errors="surrogateescape")
    if "\0" in path:
        raise SourceError(f"bad file URL {source!r}: it holds a NUL byte (%00)")
    return path


def known_schemes() -> list[str]:
    """The schemes of the installed backends, sorted."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


def open_backend(source: str, **options: Any) -> Backend:
    """Open the backend for *source*; *options* go to its factory unchanged.

    The factory gets *source* as written (a plain path stays a plain path).
    Raises UnknownBackend when no installed backend serves the scheme; the
    factory's own errors (SourceError, …) pass through.
    """
    scheme = source_scheme(source)
    found = [ep for ep in entry_points(group=GROUP) if ep.name == scheme]
    if not found:
        known = ", ".join(known_schemes()) or "none (is cachefs installed?)"
        raise UnknownBackend(
            f"unknown source scheme {scheme!r} in {source!r}: known schemes are {known}"
        )
    factory = found[0].load()
    log.debug("opening the %s source with %s", scheme, found[0].value)  # a URL may hold secrets
    return factory(source, **options)
