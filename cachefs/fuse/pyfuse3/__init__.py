"""The pyfuse3 FUSE transport: libfuse's session loop on trio, through pyfuse3.

An optional extra (``pip install 'cachefs[pyfuse3]'``): importing this
package imports pyfuse3; cachefs.fuse.transport("pyfuse3") does it on
demand.  ``mount_fs`` is its cachefs.fuse.api.Transport.  It drives the
same file system as the native transport, without passthrough (libfuse
cannot send a backing id).
"""

from cachefs.fuse.pyfuse3.mount import mount_fs

__all__ = ["mount_fs"]
