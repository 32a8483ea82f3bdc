"""The argument parser of the ``cachefs`` command: its commands, in the order
--help lists them, each declared by its family's module."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

from cachefs.cli.cache import add_cache_commands
from cachefs.cli.flushing import add_flush
from cachefs.cli.group import add_group_commands
from cachefs.cli.mount import add_mount, add_publish
from cachefs.cli.options import Parser, common_options
from cachefs.cli.records import add_records_commands
from cachefs.cli.running import add_stats_and_resets, add_unmount


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = Parser(
        prog="cachefs",
        description="A FUSE file system that serves a source (a directory, "
        "file:///path, s3://bucket/prefix) through a persistent block cache, and writes "
        "changes back to it.",
    )
    parser.add_argument(
        "-V", "--version", action="version", version=_version(), help="print the version and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = commands.add_parser(
            name, help=help, description=description, parents=[common], prog=f"cachefs {name}"
        )
        return sub

    add_mount(add)
    add_unmount(add)
    add_cache_commands(add)
    add_flush(add)
    add_stats_and_resets(add)
    add_publish(add)
    add_group_commands(add)
    add_records_commands(add)
    return parser


def _version() -> str:
    """``cachefs X.Y.Z``: the version of the installed distribution, the one
    a bug report needs (not the source tree's)."""
    try:
        return f"cachefs {version('cachefs')}"
    except PackageNotFoundError:
        return "cachefs (not installed)"
