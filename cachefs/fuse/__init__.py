"""cachefs's own FUSE transport: the kernel protocol over /dev/fuse, served with trio.

Speaking the protocol directly (instead of through libfuse) lets a mount
hand the kernel a cache file to read by itself (passthrough, Linux 6.9+),
and needs no C library or compiler to install.
"""

from cachefs.fuse.native.abi import DirReply, Entry, Opened, Statfs
from cachefs.fuse.native.device import Connection, MountError
from cachefs.fuse.native.session import FUSEError, Operations, Session, mount

__all__ = [
    "Connection",
    "DirReply",
    "Entry",
    "FUSEError",
    "MountError",
    "Opened",
    "Operations",
    "Session",
    "Statfs",
    "mount",
]
