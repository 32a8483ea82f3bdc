"""cachefs's own FUSE transport: the kernel protocol over /dev/fuse, served with trio.

Speaking the protocol directly (instead of through libfuse) lets a mount
hand the kernel a cache file to read by itself (passthrough, Linux 6.9+),
and needs no C library or compiler to install.  ``mount_fs`` is its
cachefs.fuse.api.Transport.
"""

from cachefs.fuse.native.device import Connection
from cachefs.fuse.native.session import Session, mount, mount_fs

__all__ = ["Connection", "Session", "mount", "mount_fs"]
