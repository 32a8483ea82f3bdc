"""Telling systemd how a foreground mount is doing (sd_notify, without libsystemd).

A unit of ``Type=notify`` (docs/systemd/cachefs@.service) counts as started
only when its main process says ``READY=1``: for a mount, once the mount
point serves files, so that units ordered after it never see an empty
directory.  systemd names its socket in $NOTIFY_SOCKET: a path, or an
abstract socket written with a leading ``@``.  Without it (not run by
systemd) nothing is sent.  A message that cannot be sent is logged, never
raised: the mount itself is fine, and systemd's start timeout says the rest.
It is sent without waiting (it is sent from the mount's loop): a socket whose
queue is full drops it, as systemd's own sd_notify would time out.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(state: str, environ: Mapping[str, str] = os.environ) -> None:
    """Send *state* (``READY=1``, ``STOPPING=1``, ...) to systemd, if it listens."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return  # unset, or a kind of socket (vsock) systemd uses only for VMs
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, address)
    except OSError as e:
        log.warning("could not tell systemd %s: %s", state, e.strerror or e)
