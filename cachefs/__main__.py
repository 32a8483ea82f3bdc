"""``python -m cachefs``: the same as the ``cachefs`` command."""

from cachefs.cli import main

raise SystemExit(main())
