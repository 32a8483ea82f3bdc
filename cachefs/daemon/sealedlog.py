"""The log of a mount whose cache is encrypted: no name in clear.

With ``--encrypt`` the daemon's log handler gets :class:`SealNames`, which
rewrites every record before it is written: each text argument (a file id,
a path, a URL, a reason quoting them) becomes ``[sealed:TAG]``, where TAG
is the cache's own tag of that text (the one its index stores in place of
a file name, so an owner holding the key can tell which file a line is
about: ``cachefs`` computes it for a path); an exception keeps its type and
errno, not its message; a traceback keeps its frames, not its message.
Policy: what is sealed may hide a detail an operator wanted, never a name.
Numbers, enum members and the contract's own words (result codes such as
``FILE_FAILURE``, flags) stay: a file may well be called ``README``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

from cachefs.contract import RWEvent, RWResult

# The words a log line may show in clear: result codes and flags.
_VOCABULARY = frozenset(
    {r.name for r in RWResult} | {f.name for f in RWEvent if f.name is not None}
)


class SealedMessage(Exception):
    """Stands in a sealed record for an exception whose message may name a file."""


def describe(e: BaseException) -> str:
    """What of *e* may be logged: its type, and its errno for an OSError."""
    errno = getattr(e, "errno", None)
    return f"{type(e).__name__} [errno {errno}]" if isinstance(errno, int) else type(e).__name__


class SealNames(logging.Filter):
    """A handler filter that replaces every name in a record by its tag.

    *tag* maps a text to its tag (the cache key's ``name_tag``).
    """

    def __init__(self, tag: Callable[[str], str]) -> None:
        super().__init__()
        self._tag = tag

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            if isinstance(record.args, tuple):
                record.args = tuple(self._arg(a) for a in record.args)
            elif record.args:  # log.info("%(name)s", {"name": ...})
                record.args = self._arg(record.args)
        else:  # log.warning(some_object): its text is an argument too
            record.msg, record.args = "%s", (self._arg(record.msg),)
        if record.exc_info and record.exc_info[1] is not None:
            _, e, tb = record.exc_info
            record.exc_info = (SealedMessage, SealedMessage(describe(e)), tb)
            record.exc_text = None
        return True

    def _arg(self, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, Enum):
            return value.name
        if isinstance(value, BaseException):
            return describe(value)
        if isinstance(value, dict):
            return {k: self._arg(v) for k, v in value.items()}
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
        if text in _VOCABULARY:
            return text
        return self.seal(text)

    def seal(self, text: str) -> str:
        """``[sealed:TAG]`` for *text*."""
        return f"[sealed:{self._tag(text)[:16]}]"


class NameTags:
    """A text's tag under the cache key, once :meth:`use` has given it (before:
    one tag for every text, which tells nothing)."""

    def __init__(self) -> None:
        self._tag: Callable[[str], str] | None = None

    def use(self, tag: Callable[[str], str]) -> None:
        self._tag = tag

    def __call__(self, text: str) -> str:
        return "no-key-yet" if self._tag is None else self._tag(text)


def names_as_logged() -> Callable[[str], str]:
    """How to write a name into a line logged with no arguments (which the
    filter cannot see into): sealed while the log is (:func:`seal_log`),
    else quoted."""
    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, SealNames):
                return f.seal
    return repr


def seal_log(tag: Callable[[str], str]) -> None:
    """Seal what every handler of the root logger writes from now on (with
    *tag* in place of any tag given before)."""
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, SealNames)]:
            handler.removeFilter(old)
        handler.addFilter(SealNames(tag))
