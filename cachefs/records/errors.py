"""The errors of the record store, named as the reference names them.

Each error is its own class with its own CLI exit code, and its message
starts with its name (``RECORD_NOT_FOUND: no record 3f2a...``), so a script
can tell them apart by either.  ``GroupError`` is the rest: a group that does
not exist, an invitation for another identity, a snapshot of another group.
"""

from __future__ import annotations

import errno as _errno

from cachefs.errors import CacheFSError


class RecordsError(CacheFSError):
    """Base of the record store's errors; ``name`` is the reference's name."""

    name = "RECORDS_ERROR"
    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.name}: {message}")
        self.detail = message


class RecordNotFound(RecordsError):
    """No live record has this id (never added, deleted, or expired)."""

    name = "RECORD_NOT_FOUND"
    errno = _errno.ENOENT
    exit_code = 10


class NotAuthorized(RecordsError):
    """A reserved record type, or a member changing a record it did not create,
    or a signer the group does not (or no longer) trust."""

    name = "NOT_AUTHORIZED"
    errno = _errno.EACCES
    exit_code = 11


class InvalidAttributes(RecordsError):
    """The attribute XML is malformed, names a reserved or non-alphanumeric
    attribute, or holds a value that is not of its type."""

    name = "INVALID_ATTRIBUTES"
    errno = _errno.EINVAL
    exit_code = 12


class InvalidSearch(RecordsError):
    """The search XML (or ``--where`` text) is malformed."""

    name = "INVALID_SEARCH"
    errno = _errno.EINVAL
    exit_code = 13


class InvalidRecord(RecordsError):
    """A record that cannot be stored: no type, a change to a field an update
    may not change, a bad signature or encoding."""

    name = "INVALID_RECORD"
    errno = _errno.EINVAL
    exit_code = 14


class InvalidRecordExpiration(RecordsError):
    """An expiration in the past, lowered by an update, or beyond the
    publisher's credentials."""

    name = "INVALID_RECORD_EXPIRATION"
    errno = _errno.EINVAL
    exit_code = 15


class MaxRecordSizeExceeded(RecordsError):
    """The record's encoded size passes the group's maximum."""

    name = "MAX_RECORD_SIZE_EXCEEDED"
    errno = _errno.EFBIG
    exit_code = 16


class GroupNotReady(RecordsError):
    """The group cannot do this yet: no credentials joined, credentials
    expired or revoked, or the engine was required and is unreachable."""

    name = "GROUP_NOT_READY"
    errno = _errno.EAGAIN
    exit_code = 17


class GroupError(RecordsError):
    """Anything else about a group a user can fix: a missing group, a bad
    invitation or snapshot file, a snapshot of another group."""

    name = "GROUP_ERROR"
    errno = _errno.EINVAL
    exit_code = 2
