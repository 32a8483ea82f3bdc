"""The argument parser of the ``cachefs`` command: every option and its --help."""

from __future__ import annotations

import argparse
import math
import os
import stat
from collections.abc import Sequence
from typing import Any, NoReturn

from backends.throttled import parse_throttle
from cachefs.cli import s3options
from cachefs.cli.mount import cmd_mount, cmd_publish
from cachefs.cli.running import (
    cmd_add_data,
    cmd_pin,
    cmd_prefetch,
    cmd_purge,
    cmd_reset_external_error,
    cmd_reset_file_errors,
    cmd_stats,
    cmd_unmount,
    cmd_unpin,
)
from cachefs.engine import CacheConfig
from cachefs.engine.config import MAX_BLOCK, MIN_BLOCK
from cachefs.errors import ConfigError
from cachefs.units import parse_size

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULTS = CacheConfig()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever the input held
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            # Before Python 3.13, "--opt=--" gives [] unchecked instead of a value.
            given = getattr(parsed, action.dest, None)
            if action.option_strings and action.nargs is None and given == []:
                self.error(f"argument {action.option_strings[0]}: expected one argument")
        return parsed, extras


# The ranges of the numeric options: finite, and wide enough for any real use.
MAX_TTL = 365 * 24 * 3600  # a year: the kernel's attribute timeouts overflow far above
MAX_RETRIES = 100
MAX_FETCHES = 1024
MAX_READAHEAD_KB = 1 << 20  # 1 GiB
MAX_TIMEOUT = 24 * 3600
MAX_SIZE = 1 << 60  # 1024P: sizes stay far inside 64-bit arithmetic
MAX_OFFSET = (1 << 63) - 1  # the largest file offset Linux has
MAX_LATENCY_MS = 60_000
MIN_MIBPS, MAX_MIBPS = 0.001, 1_000_000


def _number(kind: type[int] | type[float], low: int, high: int) -> Any:
    """A converter to a finite *kind* from *low* to *high*; the error states the range."""
    noun = "a whole number" if kind is int else "a number"
    allowed = f"from {low} to {high}"

    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not {noun}: {text!r} ({allowed})") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r} ({allowed})")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}: {text!r} ({allowed})")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}: {text!r} ({allowed})")
        return value

    convert.__name__ = kind.__name__
    return convert


def _non_empty(text: str) -> str:
    """A path or URL as given; empty is refused (as a path it would mean ".")."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is more than the largest size, 1024P")
    return value


def _block_size(text: str) -> int:
    value = _size(text)
    if not (MIN_BLOCK <= value <= MAX_BLOCK) or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two from 4K to 64M, not {text!r}")
    return value


def _size_or_percent(text: str) -> int | float:
    """A size in bytes (int), or a share of the cache filesystem like ``5%`` (float)."""
    if not text.strip().endswith("%"):
        return _size(text)
    try:
        percent = float(text.strip()[:-1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}") from None
    if not 0 <= percent < 100:
        raise argparse.ArgumentTypeError(f"a percentage must be from 0% to below 100%: {text!r}")
    return percent / 100


def _throttle(text: str) -> str:
    """A ``LATENCY_MS,MIBPS`` spec, checked; passed on as written."""
    try:
        latency, bandwidth = parse_throttle(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if latency * 1000 > MAX_LATENCY_MS or not MIN_MIBPS <= bandwidth / (1 << 20) <= MAX_MIBPS:
        raise argparse.ArgumentTypeError(
            f"throttle {text!r}: latency must be from 0 to {MAX_LATENCY_MS} ms and "
            f"bandwidth from {MIN_MIBPS} to {MAX_MIBPS} MiB/s"
        )
    return text


def _ready_fd(text: str) -> int:
    """The daemon's readiness pipe: an open pipe, never stdin, stdout or stderr."""
    fd = _number(int, 3, 1 << 30)(text)
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError:
        is_pipe = False
    if not is_pipe:
        raise argparse.ArgumentTypeError(f"{fd} is not an open pipe")
    return fd


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
        "file:///path, s3://bucket/prefix) through a persistent block cache.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=help, description=description, parents=[common], prog=f"cachefs {name}"
        )

    mount = command(
        "mount",
        "mount SOURCE on MOUNTPOINT",
        "Mount SOURCE (a directory, file:///abs/path or s3://BUCKET[/PREFIX]) read-only "
        "on MOUNTPOINT. "
        "Returns once the mount is ready, or with the reason it failed; "
        "the daemon logs to cachefs.log in the cache dir.",
    )
    mount.add_argument(
        "source",
        metavar="SOURCE",
        type=_non_empty,
        help="directory path, file:///abs/path or s3://BUCKET[/PREFIX]",
    )
    mount.add_argument(
        "mountpoint",
        metavar="MOUNTPOINT",
        type=_non_empty,
        help="an empty directory, outside SOURCE",
    )
    mount.add_argument(
        "--cache-dir",
        metavar="DIR",
        type=_non_empty,
        help="where cached blocks and metadata live (default: "
        "$XDG_CACHE_HOME/cachefs/<hash of SOURCE and S3 endpoint>, "
        "as root /var/cache/cachefs/<hash>)",
    )
    mount.add_argument(
        "--block-size",
        metavar="SIZE",
        type=_block_size,
        default="1M",
        help="cache block size, a power of two from 4K to 64M (default: 1M); "
        "fixed for the life of a cache dir",
    )
    mount.add_argument(
        "--ttl",
        metavar="SECONDS",
        type=_number(float, 0, MAX_TTL),
        default=60.0,
        help="how long attributes and listings are trusted before asking SOURCE again, "
        f"0 to {MAX_TTL} (a year) (default: 60)",
    )
    mount.add_argument(
        "--retries",
        metavar="N",
        type=_number(int, 0, MAX_RETRIES),
        default=3,
        help="retries of a failing read, with backoff, before the reader gets EIO, "
        f"0 to {MAX_RETRIES} (default: 3)",
    )
    mount.add_argument(
        "--cache-size",
        metavar="SIZE",
        type=_size,
        help="most bytes of cached blocks to keep; the least recently read go first "
        "(default: 10G or 80%% of the cache filesystem's free space, whichever is smaller)",
    )
    mount.add_argument(
        "--min-free",
        metavar="SIZE|N%",
        type=_size_or_percent,
        help="free space to leave on the cache filesystem, evicting to keep it: a size, or a "
        "percentage of the filesystem like 5%% (default: 5%%)",
    )
    mount.add_argument(
        "--max-readahead",
        metavar="SIZE",
        type=_size,
        default=DEFAULTS.max_readahead,
        help="how far ahead of a sequential reader to fetch, in windows growing from 1M "
        f"(default: {DEFAULTS.max_readahead >> 20}M; 0 disables)",
    )
    mount.add_argument(
        "--max-fetches",
        metavar="N",
        type=_number(int, 1, MAX_FETCHES),
        default=DEFAULTS.max_fetches,
        help=f"ReadData calls in flight at once (default: {DEFAULTS.max_fetches}), "
        f"at most {MAX_FETCHES}",
    )
    mount.add_argument(
        "--verify",
        choices=("once", "always", "off"),
        default=DEFAULTS.verify,
        help="check blocks read from the cache disk against their SHA-256: once per block "
        "per mount, always, or off (no hashing, no content information; fastest). Blocks "
        "from the source are checked against its published content information either way "
        "unless off (default: once)",
    )
    mount.add_argument(
        "--no-io-uring",
        dest="io_uring",
        action="store_false",
        help="read cache hits that are not in the page cache through a pool of threads "
        "instead of io_uring. By default io_uring is used where the kernel allows it "
        "(`cachefs stats` shows which: disk reads); it costs about a quarter of the CPU "
        "per read",
    )
    mount.add_argument(
        "--no-passthrough",
        dest="passthrough",
        action="store_false",
        help="answer every read of the mount in cachefs. By default a file the cache holds "
        "whole (every block, checked) is opened for the kernel to read from the cache file "
        "itself, at the disk's speed (FUSE passthrough: Linux 6.9 or later, as root; plain "
        "caches only). Reads of such opens then do not show in `cachefs stats` hits",
    )
    mount.add_argument(
        "--encrypt",
        action="store_true",
        help="keep the cache encrypted at rest (AES-256-GCM per block; file names sealed). "
        "The key comes from --key-file or the CACHEFS_KEY environment variable: 32 random "
        "bytes, 64 hex digits, or a passphrase (stretched with scrypt). A cache dir made with "
        "a key refuses any other key, and refuses to mount without one",
    )
    mount.add_argument(
        "--key-file",
        metavar="FILE",
        type=_non_empty,
        help="the --encrypt key (raw 32 bytes, hex, or a passphrase); chmod 600 it",
    )
    mount.add_argument(
        "--faults",
        metavar="FILE",
        type=_non_empty,
        help="inject read failures from a JSON rules file, re-read while mounted (testing)",
    )
    mount.add_argument(
        "--trace",
        metavar="FILE",
        type=_non_empty,
        help="append one JSON line per backend ReadData call to FILE (testing, diagnosis)",
    )
    mount.add_argument(
        "--throttle",
        metavar="LATENCY_MS,MIBPS",
        type=_throttle,
        help="simulate a remote store: per-request first-byte latency in ms and "
        "per-connection bandwidth in MiB/s (benchmarks, testing)",
    )
    mount.add_argument(
        "--readahead-kb",
        metavar="N",
        type=_number(int, 0, MAX_READAHEAD_KB),
        default=1024,
        help=f"kernel readahead of the mount in KiB, 0 to {MAX_READAHEAD_KB} (default: 1024)",
    )
    mount.add_argument(
        "--foreground", action="store_true", help="serve in this process, logging to stderr"
    )
    mount.add_argument("--ready-fd", type=_ready_fd, help=argparse.SUPPRESS)
    s3options.add_arguments(mount)
    mount.set_defaults(run=cmd_mount)

    unmount = command(
        "unmount",
        "unmount a cachefs mount cleanly",
        "Ask the mount's daemon to unmount, commit the cache metadata and exit; "
        "returns when it has. A daemon that does not answer within 5 s (stopped, hung "
        "or gone) or does not exit in time has its FUSE connection aborted, so processes "
        "blocked on the mount get an error at once; the mount is detached and the daemon "
        "told to exit.",
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT", type=_non_empty)
    unmount.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_number(float, 0, MAX_TIMEOUT),
        default=30.0,
        help="how long to wait for the daemon to exit before aborting its connection and "
        f"detaching the mount, 0 to {MAX_TIMEOUT} (default: 30)",
    )
    unmount.set_defaults(run=cmd_unmount)

    prefetch = command(
        "prefetch",
        "fetch files whole into the cache",
        "Fetch each PATH (a file, or every file below a directory) whole into the cache of "
        "its mount. Shows a progress bar on a terminal and a summary line at the end; "
        "exits with 1 and names the files that failed.",
    )
    prefetch.add_argument("paths", metavar="PATH", nargs="+", type=_non_empty)
    prefetch.set_defaults(run=cmd_prefetch)

    pin = command(
        "pin",
        "fetch files whole and keep them cached",
        "Pin each PATH (a file, or every file below a directory): fetched whole and never "
        "evicted, also after a remount. Refused (exit 1) if pinned files would exceed the "
        "cache size.",
    )
    pin.add_argument("paths", metavar="PATH", nargs="+", type=_non_empty)
    pin.set_defaults(run=cmd_pin)

    unpin = command(
        "unpin",
        "let pinned files be evicted again",
        "Unpin each PATH (a directory: every pinned file below it). Their data stays cached "
        "until it is evicted or purged.",
    )
    unpin.add_argument("paths", metavar="PATH", nargs="+", type=_non_empty)
    unpin.set_defaults(run=cmd_unpin)

    purge = command(
        "purge",
        "drop files from the cache",
        "Drop the cached data of each PATH (a directory: of every file below it) and return "
        "its disk space, and forget where a RANGE_BEYOND_EOF answer said it ends; pinned "
        "files are kept. The next read asks the source again.",
    )
    purge.add_argument("paths", metavar="PATH", nargs="+", type=_non_empty)
    purge.set_defaults(run=cmd_purge)

    add_data = command(
        "add-data",
        "supply file content from elsewhere",
        "Supply bytes of PATH (a file in a mount) at --offset, read from --from (a file, or - "
        "for stdin): copied from a peer, a USB disk, another cache. Each block is stored only "
        "once it is complete and matches its SHA-256 from the source's content information "
        "(cachefs publish) or from an earlier fetch; a partial block is held in the mount's "
        "memory until the rest is added. Prints blocks accepted, rejected and pending. "
        "Exit codes: 1 some blocks rejected, 3 no content information to check against "
        "(--trust accepts the data unchecked), 4 beyond the end of the file.",
    )
    add_data.add_argument(
        "path", metavar="PATH", type=_non_empty, help="a regular file in a cachefs mount"
    )
    add_data.add_argument(
        "--offset",
        metavar="N",
        type=_number(int, 0, MAX_OFFSET),
        required=True,
        help="byte offset in PATH where the data starts",
    )
    add_data.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        type=_non_empty,
        default="-",
        help="where the bytes come from (default: - , standard input)",
    )
    add_data.add_argument(
        "--trust",
        action="store_true",
        help="accept blocks that cannot be checked (no content information) as they are",
    )
    add_data.set_defaults(run=cmd_add_data)

    stats = command(
        "stats",
        "show a mount's counters",
        "Show the counters of the mount containing PATH: backend calls and bytes, cache hits "
        "and misses, hit ratio, cached, pinned and evicted bytes, the cache limit and free "
        "space floor, latched file errors and the external error.",
    )
    stats.add_argument("path", metavar="PATH", type=_non_empty, help="any path inside the mount")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(run=cmd_stats)

    reset_files = command(
        "reset-file-errors",
        "serve files again after FILE_FAILURE or an early end of file",
        "Lift the FILE_FAILURE latch of each PATH (a directory: of every file below it; "
        "the mount point: of all files), so reads ask the source again, and forget where "
        "a RANGE_BEYOND_EOF answer said such a file ends (the zeros cached for it go).",
    )
    reset_files.add_argument("paths", metavar="PATH", nargs="+", type=_non_empty)
    reset_files.set_defaults(run=cmd_reset_file_errors)

    reset_external = command(
        "reset-external-error",
        "use the source again after PERMANENT_FAILURE",
        "Lift the PERMANENT_FAILURE latch of the mount containing PATH: reads that miss the "
        "cache ask the source again.",
    )
    reset_external.add_argument(
        "path", metavar="PATH", type=_non_empty, help="any path inside the mount"
    )
    reset_external.set_defaults(run=cmd_reset_external_error)

    publish = command(
        "publish",
        "store content information for every file of a source",
        "Read every file of SOURCE and store the SHA-256 of each of its blocks beside it "
        "(in SOURCE/.cachefs-ci/, which mounts never show), so that mounts of SOURCE check "
        "every block they fetch against it. Needs write access to SOURCE. Files whose "
        "information is already up to date are not read again; files that change while "
        "being read are skipped; the information of files gone from SOURCE is removed. "
        "Prints one summary line; exits with 1 if any file failed.",
    )
    publish.add_argument(
        "source",
        metavar="SOURCE",
        type=_non_empty,
        help="directory path, file:///abs/path or s3://BUCKET[/PREFIX]",
    )
    publish.add_argument(
        "--block-size",
        metavar="SIZE",
        type=_block_size,
        default="1M",
        help="block size of the hashes; must equal the --block-size of the mounts that use "
        "them, which ignore information of any other block size (default: 1M, the mount's "
        "default)",
    )
    s3options.add_arguments(publish)
    publish.set_defaults(run=cmd_publish)
    return parser
