"""Find the backend for a source URL, and the wrappers a mount stacks on it.

Backends are plugins: each is an entry point of the group
``cachefs.backends`` named after its URL scheme, pointing at a factory
``open_backend(url: str, **options) -> Backend``.  A source without a scheme
(``/srv/data``, ``./data``) is a local directory, i.e. scheme ``file``
(cachefs.contract.source_scheme and local_path read the URL forms).

Blob stores (a group's hosted cache) are found the same way: entry points of
the group ``cachefs.blobstores`` named after the URL scheme (a plain path is
``file``), each a factory ``open_blob_store(url: str, **options) -> BlobStore``.

Wrappers are plugins too: each is an entry point of the group
``cachefs.wrappers`` named after the mount option that turns it on
(``faults``, ``trace``, ``throttle``), pointing at an object with the
:class:`Wrapper` methods: ``check`` runs in the user's process, before a
daemon starts, and ``wrap`` in the daemon.  The core never imports a
backend or a wrapper module by name.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

from cachefs.contract import Backend, BlobStore, local_path, source_scheme
from cachefs.errors import ConfigError, UnknownBackend

__all__ = [
    "BLOB_GROUP",
    "GROUP",
    "WRAPPER_GROUP",
    "Wrapper",
    "known_schemes",
    "local_path",
    "open_backend",
    "open_blob_store",
    "source_scheme",
    "wrapper",
]

log = logging.getLogger(__name__)

GROUP = "cachefs.backends"
WRAPPER_GROUP = "cachefs.wrappers"
BLOB_GROUP = "cachefs.blobstores"


class Wrapper(Protocol):
    """A wrapper plugin: one mount option's value, checked, then a backend wrapped.

    The value is a string as the user gave it; ``check`` returns it in the
    form the daemon is handed (a path made absolute, say), and is what
    refuses it: ConfigError (one line, exit 2).  ``wrap`` gets that form
    again and may still fail the same way (a file changed meanwhile).
    """

    def check(self, value: str) -> str:
        """*value* checked, in the form ``wrap`` takes; ConfigError if refused."""
        ...

    def wrap(self, inner: Backend, value: str, names: Callable[[str], str]) -> Backend:
        """*inner* wrapped as *value* says.  *names* shows a file id as the
        mount may write it (the cache's name tags when it is encrypted)."""
        ...


def known_schemes(group: str = GROUP) -> list[str]:
    """The schemes of the installed backends (or blob stores: BLOB_GROUP), sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def _entry_point(group: str, name: str) -> EntryPoint | None:
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    return found[0] if found else None


def open_backend(source: str, **options: Any) -> Backend:
    """Open the backend for *source*; *options* go to its factory unchanged.

    The factory gets *source* as written (a plain path stays a plain path).
    Raises UnknownBackend when no installed backend serves the scheme; the
    factory's own errors (SourceError, …) pass through.
    """
    scheme = source_scheme(source)
    found = _entry_point(GROUP, scheme)
    if found is None:
        known = ", ".join(known_schemes()) or "none (is cachefs installed?)"
        raise UnknownBackend(
            f"unknown source scheme {scheme!r} in {source!r}: known schemes are {known}"
        )
    factory = found.load()
    log.debug("opening the %s source with %s", scheme, found.value)  # a URL may hold secrets
    backend: Backend = factory(source, **options)
    return backend


def open_blob_store(url: str, **options: Any) -> BlobStore:
    """Open the blob store at *url*; *options* go to its factory unchanged.

    Raises UnknownBackend when no installed blob store serves the scheme;
    the factory's own errors (SourceError, …) pass through.
    """
    scheme = source_scheme(url)
    found = _entry_point(BLOB_GROUP, scheme)
    if found is None:
        known = ", ".join(known_schemes(BLOB_GROUP)) or "none (is cachefs installed?)"
        shown = "" if "@" in url else f" in {url!r}"  # never repeat credentials
        raise UnknownBackend(
            f"unknown blob store scheme {scheme!r}{shown}: known schemes are {known}"
        )
    factory = found.load()
    log.debug("opening the %s blob store with %s", scheme, found.value)
    store: BlobStore = factory(url, **options)
    return store


def wrapper(name: str) -> Wrapper:
    """The installed wrapper plugin *name*; ConfigError if there is none."""
    found = _entry_point(WRAPPER_GROUP, name)
    if found is None:
        known = ", ".join(sorted({ep.name for ep in entry_points(group=WRAPPER_GROUP)}))
        raise ConfigError(
            f"no wrapper {name!r} is installed (installed: {known or 'none'}): "
            "is cachefs installed?"
        )
    plugin: Wrapper = found.load()
    return plugin
