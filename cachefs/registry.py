"""Find the backend for a source URL.

Backends are plugins: each is an entry point of the group
``cachefs.backends`` named after its URL scheme, pointing at a factory
``open_backend(url: str, **options) -> Backend``.  The core never imports a
backend module by name.  A source without a scheme (``/srv/data``,
``./data``) is a local directory, i.e. scheme ``file``.
"""

from __future__ import annotations

import logging
import re
from importlib.metadata import entry_points
from typing import Any

from cachefs.contract import Backend
from cachefs.errors import UnknownBackend

log = logging.getLogger(__name__)

GROUP = "cachefs.backends"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def source_scheme(source: str) -> str:
    """The URL scheme of *source*, lower-cased; ``file`` for a plain path."""
    match = _SCHEME.match(source)
    return match.group(1).lower() if match else "file"


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
