"""FUSE transports that drive the file system (cachefs.fs).

``native`` (cachefs.fuse.native) speaks the kernel protocol over /dev/fuse
itself: the default, with passthrough.  ``pyfuse3`` (cachefs.fuse.pyfuse3)
runs on libfuse through pyfuse3, an optional extra.  Both drive the same
:class:`Operations` through the transport-neutral API re-exported here
(cachefs.fuse.api); the file system never imports a transport, and
importing this package loads none: :func:`transport` does, on demand.
"""

from __future__ import annotations

from cachefs.errors import ConfigError
from cachefs.fuse.api import (
    UNSUPPORTED,
    DirReply,
    Entry,
    FUSEError,
    Kernel,
    Mounted,
    MountError,
    Opened,
    Operations,
    Payload,
    Statfs,
    Transport,
)

#: The FUSE transports ``cachefs mount --fuse`` chooses from; the first is the default.
TRANSPORTS = ("native", "pyfuse3")

_PYFUSE3_MISSING = (
    "--fuse pyfuse3 needs the pyfuse3 extra: pip install 'cachefs[pyfuse3]'"
    " (it builds against libfuse3: apt-get install libfuse3-dev pkg-config)"
)


def check_transport(name: str) -> None:
    """Raise ConfigError (one line, exit 2) unless transport *name* can run here."""
    if name not in TRANSPORTS:
        raise ConfigError(f"unknown FUSE transport {name!r}: choose one of {', '.join(TRANSPORTS)}")
    if name == "pyfuse3":
        try:
            import pyfuse3  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"{_PYFUSE3_MISSING} ({e})") from None


def transport(name: str) -> Transport:
    """The mount function of transport *name*, imported now.  ConfigError as
    :func:`check_transport`."""
    check_transport(name)
    if name == "pyfuse3":
        from cachefs.fuse.pyfuse3 import mount_fs as pyfuse3_mount

        return pyfuse3_mount
    from cachefs.fuse.native import mount_fs

    return mount_fs


__all__ = [
    "TRANSPORTS",
    "UNSUPPORTED",
    "DirReply",
    "Entry",
    "FUSEError",
    "Kernel",
    "MountError",
    "Mounted",
    "Opened",
    "Operations",
    "Payload",
    "Statfs",
    "Transport",
    "check_transport",
    "transport",
]
