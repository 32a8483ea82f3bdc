"""``python -m cachefs``: the same as the ``cachefs`` command."""

from cachefs.cli.main import main

raise SystemExit(main())
