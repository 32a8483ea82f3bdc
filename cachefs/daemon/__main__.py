"""``python -m cachefs.daemon MOUNTPOINT --ready-fd N``: the daemon ``cachefs mount``
starts, its options as JSON on stdin (cachefs.daemon.spawn)."""

from cachefs.daemon.spawn import daemon_main

raise SystemExit(daemon_main())
