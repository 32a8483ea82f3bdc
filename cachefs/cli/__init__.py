"""The ``cachefs`` command: one module per command family."""

from cachefs.cli.main import main

__all__ = ["main"]
