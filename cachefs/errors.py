"""Exceptions of cachefs.

Every message is one line a user can act on.  Each class carries the errno
the FUSE layer answers with and the exit code the CLI returns, so that those
two edges translate errors in one place each.
"""

from __future__ import annotations

import errno as _errno


class CacheFSError(Exception):
    """Base of every error cachefs raises on purpose."""

    errno: int = _errno.EIO
    exit_code: int = 1


class ConfigError(CacheFSError):
    """Bad input from the user: options, paths, URLs, rules files."""

    errno = _errno.EINVAL
    exit_code = 2


class InvalidBlockSize(ConfigError):
    pass


class InvalidSize(ConfigError):
    pass


class CacheDirError(ConfigError):
    """The cache directory is missing, unwritable or unusable."""


class CacheDirInUse(CacheDirError):
    """Another live process holds the cache directory."""


class UnknownBackend(ConfigError):
    """No backend is registered for the URL's scheme."""


class SourceError(ConfigError):
    """The source (directory, bucket) is missing or unusable."""


class RulesError(ConfigError):
    """A faults rules file is malformed."""


class NotFound(CacheFSError):
    errno = _errno.ENOENT


class AccessDenied(CacheFSError):
    """The source refuses the daemon this entry (its mode, its owner): the
    reader gets EACCES at once, as it would reading the source itself."""

    errno = _errno.EACCES


class ReadFailed(CacheFSError):
    """A read could not be served; the reader gets EIO."""

    errno = _errno.EIO


class TransientFailure(ReadFailed):
    """The backend kept answering FAILURE after every retry."""


class FileQuarantined(ReadFailed):
    """The file is latched after FILE_FAILURE until reset_file_errors."""


class StorageQuarantined(ReadFailed):
    """The storage is latched after PERMANENT_FAILURE until reset_external_error."""


class CorruptData(ReadFailed):
    """The backend kept returning bytes that do not match the content information."""


class VersionGone(ReadFailed):
    """The version of the file a handle reads can no longer be completed: the
    source has another version (or none), and the blocks the read needs are
    not cached.  The handle never switches versions; a new open reads the
    current one."""

    errno = _errno.ESTALE


class CacheDiskFailed(CacheFSError):
    """The cache directory's filesystem failed (EIO, ENOSPC, read-only):
    reads go to the source uncached until it works again."""

    errno = _errno.EIO


class BadKey(ConfigError):
    """The encryption key is missing, malformed, or not the cache's key."""


class OutOfBounds(CacheFSError):
    """add-data at an offset (or reaching) beyond the end of the file."""

    errno = _errno.EINVAL
    exit_code = 4


class NoContentInfo(CacheFSError):
    """add-data without content information to check the data against (and no --trust)."""

    errno = _errno.EPERM
    exit_code = 3


class NotAFile(CacheFSError):
    """Data was asked of a directory or a symlink."""

    errno = _errno.EISDIR


class PinLimitExceeded(CacheFSError):
    """Pinned files alone would exceed the cache's size limit."""

    errno = _errno.ENOSPC
    exit_code = 1


# -- the command line and the control socket ------------------------------------------


class NotInMount(ConfigError):
    """A path the user gave is not inside a cachefs mount."""


class MountUnreachable(CacheFSError):
    """The mount's daemon does not answer on its control socket."""


class MountBusy(MountUnreachable):
    """Every control connection of the mount is in a request: this one was turned away."""


class RemoteError(CacheFSError):
    """The mount answered a request with an error."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MountFailed(CacheFSError):
    """The mount daemon reported a failure (or died) before the mount was ready."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- changes (the write path) ---------------------------------------------------------


class ReadOnly(CacheFSError):
    """A change on a read-only mount (``--read-only``, or a backend that cannot write)."""

    errno = _errno.EROFS


class ChangeRefused(CacheFSError):
    """The source (or the cache's rules) refuse a change with this errno
    (EEXIST, ENOTEMPTY, ENOTDIR, EXDEV, EACCES, ...)."""

    def __init__(self, message: str, errno_: int) -> None:
        super().__init__(message)
        self.errno = errno_


class NoSpace(CacheFSError):
    """Dirty data cannot be kept: the cache is full of it and cannot flush."""

    errno = _errno.ENOSPC


class WriteFailed(CacheFSError):
    """A flush did not reach the source (fsync, close with write-through, flush):
    the data stays dirty in the cache and is flushed later."""

    errno = _errno.EIO
