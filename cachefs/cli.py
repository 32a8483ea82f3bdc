"""The ``cachefs`` command: mount, unmount, stats and the reset commands.

Every error a user can cause ends as one line, ``cachefs: error: ...``, on
stderr and the error's exit code (2 for bad input); a traceback appears only
with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from cachefs.control import (
    MountEntry,
    MountUnreachable,
    NotInMount,
    find_mount,
    lazy_unmount,
    mount_at,
    request,
    wait_for_exit,
)
from cachefs.engine import CacheConfig
from cachefs.errors import CacheFSError
from cachefs.mount import (
    LOG_NAME,
    MountOptions,
    Readiness,
    check_fuse,
    check_mountpoint,
    default_cache_dir,
    normalize_source,
    prepare_cache_dir,
    run_mount,
    spawn_daemon,
)
from cachefs.registry import open_backend
from cachefs.sizes import format_size, parse_size

log = logging.getLogger("cachefs")

LOG_LEVELS = ("debug", "info", "warning", "error")
READY_TIMEOUT = 60.0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _non_negative(kind: type[int] | type[float]) -> Any:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="how much to log (default: info for a foreground mount, warning otherwise); "
        "debug also shows tracebacks",
    )
    parser = _Parser(
        prog="cachefs",
        description="A read-only FUSE file system that serves a source (a directory, "
        "file:///path) through a persistent block cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=description, parents=[common], prog=f"cachefs {name}"
        )

    mount = command(
        "mount",
        "mount SOURCE on MOUNTPOINT",
        "Mount SOURCE (a directory or file:///abs/path) read-only on MOUNTPOINT. "
        "Returns once the mount is ready, or with the reason it failed; "
        "the daemon logs to cachefs.log in the cache dir.",
    )
    mount.add_argument("source", metavar="SOURCE", help="directory path or file:///abs/path")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    mount.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where cached blocks and metadata live (default: "
        "$XDG_CACHE_HOME/cachefs/<hash of SOURCE>, as root /var/cache/cachefs/<hash>)",
    )
    mount.add_argument(
        "--block-size",
        metavar="SIZE",
        default="1M",
        help="cache block size, a power of two from 4K to 64M (default: 1M); "
        "fixed for the life of a cache dir",
    )
    mount.add_argument(
        "--ttl",
        metavar="SECONDS",
        type=_non_negative(float),
        default=60.0,
        help="how long attributes and listings are trusted before asking SOURCE again "
        "(default: 60)",
    )
    mount.add_argument(
        "--retries",
        metavar="N",
        type=_non_negative(int),
        default=3,
        help="retries of a failing read, with backoff, before the reader gets EIO (default: 3)",
    )
    mount.add_argument(
        "--faults",
        metavar="FILE",
        help="inject read failures from a JSON rules file, re-read while mounted (testing)",
    )
    mount.add_argument(
        "--trace",
        metavar="FILE",
        help="append one JSON line per backend ReadData call to FILE (testing, diagnosis)",
    )
    mount.add_argument(
        "--readahead-kb",
        metavar="N",
        type=_non_negative(int),
        default=1024,
        help="kernel readahead of the mount in KiB (default: 1024)",
    )
    mount.add_argument(
        "--foreground", action="store_true", help="serve in this process, logging to stderr"
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.set_defaults(run=cmd_mount)

    unmount = command(
        "unmount",
        "unmount a cachefs mount cleanly",
        "Ask the mount's daemon to unmount, commit the cache metadata and exit; "
        "returns when it has. A mount whose daemon is gone is detached (fusermount3 -u -z).",
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_non_negative(float),
        default=30.0,
        help="how long to wait for the daemon before detaching the mount (default: 30)",
    )
    unmount.set_defaults(run=cmd_unmount)

    stats = command(
        "stats",
        "show a mount's counters",
        "Show the counters of the mount containing PATH: backend calls and bytes, cache hits "
        "and misses, cached bytes, latched file errors and the external error.",
    )
    stats.add_argument("path", metavar="PATH", help="any path inside the mount")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(run=cmd_stats)

    reset_files = command(
        "reset-file-errors",
        "serve files again after FILE_FAILURE",
        "Lift the FILE_FAILURE latch of each PATH (a directory: of every file below it; "
        "the mount point: of all files), so reads ask the source again.",
    )
    reset_files.add_argument("paths", metavar="PATH", nargs="+")
    reset_files.set_defaults(run=cmd_reset_file_errors)

    reset_external = command(
        "reset-external-error",
        "use the source again after PERMANENT_FAILURE",
        "Lift the PERMANENT_FAILURE latch of the mount containing PATH: reads that miss the "
        "cache ask the source again.",
    )
    reset_external.add_argument("path", metavar="PATH", help="any path inside the mount")
    reset_external.set_defaults(run=cmd_reset_external_error)
    return parser


# -- mount ----------------------------------------------------------------------------


def mount_options(args: argparse.Namespace) -> MountOptions:
    """Check and complete the mount options; creates the cache dir."""
    config = CacheConfig(block_size=parse_size(args.block_size), ttl=args.ttl, retries=args.retries)
    config.validate()
    source = normalize_source(args.source)
    return MountOptions(
        source=source,
        mountpoint=Path(os.path.realpath(args.mountpoint)),
        cache_dir=prepare_cache_dir(Path(args.cache_dir or default_cache_dir(source))),
        config=config,
        faults=Path(os.path.abspath(args.faults)) if args.faults else None,
        trace=Path(os.path.abspath(args.trace)) if args.trace else None,
        readahead_kb=args.readahead_kb,
    )


def _daemon_argv(opts: MountOptions, log_level: str) -> list[str]:
    argv = [
        "mount",
        opts.source,
        str(opts.mountpoint),
        "--foreground",
        f"--cache-dir={opts.cache_dir}",
        f"--block-size={opts.config.block_size}",
        f"--ttl={opts.config.ttl!r}",
        f"--retries={opts.config.retries}",
        f"--readahead-kb={opts.readahead_kb}",
        f"--log-level={log_level}",
    ]
    if opts.faults:
        argv.append(f"--faults={opts.faults}")
    if opts.trace:
        argv.append(f"--trace={opts.trace}")
    return argv


def _check_source(source: str) -> None:
    backend = open_backend(source)
    trio.run(backend.aclose)


def cmd_mount(args: argparse.Namespace) -> int:
    readiness = Readiness(args.ready_fd)
    try:
        if not args.foreground:
            check_fuse()
            check_mountpoint(Path(os.path.realpath(args.mountpoint)))
            _check_source(normalize_source(args.source))
        opts = mount_options(args)
        if args.foreground:
            run_mount(opts, on_ready=readiness.ready)
        else:
            log_path = opts.cache_dir / LOG_NAME
            spawn_daemon(_daemon_argv(opts, args.log_level or "info"), log_path, READY_TIMEOUT)
    except CacheFSError as e:
        readiness.failed(e.exit_code, str(e))
        raise
    except BaseException as e:
        readiness.failed(1, f"internal error: {e!r}")
        raise
    return 0


# -- talking to a mount -----------------------------------------------------------------


def cmd_unmount(args: argparse.Namespace) -> int:
    entry = mount_at(args.mountpoint)
    if entry is None:
        inside = find_mount(args.mountpoint)  # NotInMount if not even inside one
        raise NotInMount(
            f"{args.mountpoint} is not a mount point (the mount is {inside.mountpoint})"
        )
    try:
        pid = request(entry, "stats", timeout=5.0)["pid"]
        started = time.monotonic()
        request(entry, "unmount", timeout=args.timeout)
    except MountUnreachable as e:
        log.warning("%s; detaching the mount", e)
        lazy_unmount(entry.mountpoint)
        return 0
    left = max(0.0, args.timeout - (time.monotonic() - started))
    if not wait_for_exit(pid, left):
        lazy_unmount(entry.mountpoint)
        raise CacheFSError(
            f"the daemon (pid {pid}) did not exit within {args.timeout:g} s; "
            "the mount was detached (fusermount3 -u -z)"
        )
    return 0


_STATS_ROWS = (
    ("source", "source", str),
    ("mount point", "mountpoint", str),
    ("cache dir", "cache_dir", str),
    ("block size", "block_size", format_size),
    ("ttl", "ttl", lambda v: f"{v:g} s"),
    ("ReadData calls", "read_data_calls", str),
    ("from backend", "bytes_from_backend", format_size),
    ("cache hits", "hit_bytes", format_size),
    ("cache misses", "miss_bytes", format_size),
    ("cached", "cached_bytes", format_size),
    ("files in error", "files_in_error", str),
    ("external error", "external_error", lambda v: v or "none"),
)


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable table of ``cachefs stats``."""
    rows = [(label, fmt(stats[key])) for label, key, fmt in _STATS_ROWS if key in stats]
    shown = {key for _, key, _ in _STATS_ROWS} | {"file_errors"}
    rows += [
        (key.replace("_", " "), str(value))
        for key, value in sorted(stats.items())
        if key not in shown and isinstance(value, int | float | str)
    ]
    rows += [("  in error", file_id) for file_id in stats.get("file_errors", [])]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = request(find_mount(args.path), "stats")
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats(stats))
    return 0


def cmd_reset_file_errors(args: argparse.Namespace) -> int:
    by_mount: dict[MountEntry, list[str]] = {}
    for path in args.paths:
        entry = find_mount(path)
        by_mount.setdefault(entry, []).append(entry.file_id(Path(os.path.abspath(path))))
    for entry, file_ids in by_mount.items():
        reset = request(entry, "reset-file-errors", file_ids=file_ids)
        for file_id in reset:
            print(f"reset {entry.mountpoint / file_id}")
        if not reset:
            print(f"no latched file errors under {', '.join(args.paths)}")
    return 0


def cmd_reset_external_error(args: argparse.Namespace) -> int:
    request(find_mount(args.path), "reset-external-error")
    return 0


# -- entry point ------------------------------------------------------------------------


def _configure_logging(args: argparse.Namespace) -> None:
    foreground = getattr(args, "foreground", False)
    level = args.log_level or ("info" if foreground else "warning")
    fmt = (
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
        if foreground
        else "cachefs: %(levelname)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one cachefs command; returns its exit code."""
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    try:
        return args.run(args)
    except CacheFSError as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(f"cachefs: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        log.debug("%s failed", args.command, exc_info=True)
        print(
            f"cachefs: error: internal error: {e!r} (--log-level debug shows the traceback)",
            file=sys.stderr,
        )
        return 1
