"""The cache commands: ``prefetch``, ``pin``, ``unpin``, ``purge`` and ``add-data``.

Each PATH names its mount (symlinks resolved) and a file id within it; the
paths are sent to each mount in one typed request.  ``prefetch`` and
``pin`` show a progress bar on a terminal and a summary line at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from cachefs.cli.options import MAX_OFFSET, AddCommand, non_empty, number, paths_argument
from cachefs.cli.progress import ProgressBar, summary
from cachefs.control.client import request
from cachefs.control.mounts import MountEntry, find_mount
from cachefs.control.protocol import AddData, Pin, Prefetch, Purge, Unpin
from cachefs.errors import CacheFSError, ConfigError
from cachefs.units import format_size


def add_cache_commands(add: AddCommand) -> None:
    prefetch = add(
        "prefetch",
        "fetch files whole into the cache",
        "Fetch each PATH (a file, or every file below a directory) whole into the cache of "
        "its mount. Shows a progress bar on a terminal and a summary line at the end; "
        "exits with 1 and names the files that failed.",
    )
    paths_argument(prefetch)
    prefetch.set_defaults(run=cmd_prefetch)

    pin = add(
        "pin",
        "fetch files whole and keep them cached",
        "Pin each PATH (a file, or every file below a directory): fetched whole and never "
        "evicted, also after a remount. Refused (exit 1) if pinned files would exceed the "
        "cache size.",
    )
    paths_argument(pin)
    pin.set_defaults(run=cmd_pin)

    unpin = add(
        "unpin",
        "let pinned files be evicted again",
        "Unpin each PATH (a directory: every pinned file below it). Their data stays cached "
        "until it is evicted or purged.",
    )
    paths_argument(unpin)
    unpin.set_defaults(run=cmd_unpin)

    purge = add(
        "purge",
        "drop files from the cache",
        "Drop the cached data of each PATH (a directory: of every file below it) and return "
        "its disk space, and forget where a RANGE_BEYOND_EOF answer said it ends; pinned "
        "files are kept. The next read asks the source again.",
    )
    paths_argument(purge)
    purge.set_defaults(run=cmd_purge)

    add_data = add(
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
        "path", metavar="PATH", type=non_empty, help="a regular file in a cachefs mount"
    )
    add_data.add_argument(
        "--offset",
        metavar="N",
        type=number(int, 0, MAX_OFFSET),
        required=True,
        help="byte offset in PATH where the data starts",
    )
    add_data.add_argument(
        "--from",
        dest="source",
        metavar="FILE",
        type=non_empty,
        default="-",
        help="where the bytes come from (default: - , standard input)",
    )
    add_data.add_argument(
        "--trust",
        action="store_true",
        help="accept blocks that cannot be checked (no content information) as they are",
    )
    add_data.set_defaults(run=cmd_add_data)


def by_mount(paths: list[str]) -> dict[MountEntry, list[str]]:
    """The file ids of *paths* (symlinks resolved), grouped by the mount holding them."""
    by_mount: dict[MountEntry, list[str]] = {}
    for path in paths:
        real = Path(os.path.realpath(path))
        entry = find_mount(real)
        by_mount.setdefault(entry, []).append(entry.file_id(real))
    return by_mount


def _whole_files(args: argparse.Namespace, verb_past: str) -> int:
    """prefetch and pin: progress on a terminal, a summary, the failures; exit 1 on any."""
    status = 0
    for entry, file_ids in by_mount(args.paths).items():
        bar = ProgressBar(args.command, sys.stderr) if sys.stderr.isatty() else None
        started = time.monotonic()
        try:
            on_progress = bar.update if bar is not None else None
            whole = Pin if args.command == "pin" else Prefetch
            result = request(entry, whole(tuple(file_ids)), on_progress=on_progress)
        finally:
            if bar is not None:
                bar.close()
        if result["succeeded"] or not result["failed"]:
            print(summary(verb_past, result, time.monotonic() - started), flush=True)
        if "warning" in result:
            print(f"cachefs: warning: {result['warning']}", file=sys.stderr)
        for failure in result["failed"]:
            print(f"cachefs: error: {failure['error']}", file=sys.stderr)
            status = max(status, failure["exit_code"])
    return status


def cmd_prefetch(args: argparse.Namespace) -> int:
    return _whole_files(args, "prefetched")


def cmd_pin(args: argparse.Namespace) -> int:
    return _whole_files(args, "pinned")


def cmd_unpin(args: argparse.Namespace) -> int:
    for entry, file_ids in by_mount(args.paths).items():
        result = request(entry, Unpin(tuple(file_ids)))
        n = len(result["unpinned"])
        print(f"unpinned {n} file{'s' * (n != 1)}")
        for file_id in result["not_pinned"]:
            print(
                f"cachefs: warning: nothing pinned at {entry.mountpoint / file_id}", file=sys.stderr
            )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    for entry, file_ids in by_mount(args.paths).items():
        result = request(entry, Purge(tuple(file_ids)))
        n, kept = result["purged"], len(result["pinned"])
        line = f"purged {n} file{'s' * (n != 1)}, freed {format_size(result['freed'])}"
        if kept:
            line += f"; kept {kept} pinned file{'s' * (kept != 1)}"
        in_use = len(result.get("in_use", []))
        if in_use:
            line += f"; kept {in_use} file{'s' * (in_use != 1)} open with passthrough"
        print(line)
    return 0


#: Bytes per add-data request (base64 keeps a request line under 1 MiB).
ADD_DATA_CHUNK = 512 << 10


def _chunks_from(source: str) -> list[bytes] | Iterator[bytes]:
    """The bytes of *source* in request-sized chunks; [] if it is empty."""
    chunks = _read_chunks(source)
    first = next(chunks, None)
    return [] if first is None else itertools.chain([first], chunks)


def _read_chunks(source: str) -> Iterator[bytes]:
    try:
        f = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise ConfigError(f"--from {source}: {e.strerror}") from None
    with f:
        while True:
            try:
                chunk = f.read(ADD_DATA_CHUNK)
            except OSError as e:
                raise ConfigError(f"--from {source}: {e.strerror}") from None
            if not chunk:
                return
            yield chunk


def cmd_add_data(args: argparse.Namespace) -> int:
    real = Path(os.path.realpath(args.path))
    entry = find_mount(real)
    file_id = entry.file_id(real)
    accepted = rejected = pending = 0
    offset = args.offset
    try:
        # Empty input still asks once: an offset past the end is an error.
        for chunk in _chunks_from(args.source) or [b""]:
            got = request(entry, AddData(file_id, offset, chunk, trust=args.trust))
            accepted, rejected, pending = (
                accepted + got["accepted"],
                rejected + got["rejected"],
                got["pending"],
            )
            offset += len(chunk)
    except CacheFSError:
        if accepted or rejected:  # what was done before the error still counts
            print(f"blocks accepted {accepted}, rejected {rejected}, pending {pending}")
        raise
    print(f"blocks accepted {accepted}, rejected {rejected}, pending {pending}")
    if pending:
        print(
            f"cachefs: warning: {pending} incomplete block{'s' * (pending != 1)} held until "
            "the rest is added (kept in memory only)",
            file=sys.stderr,
        )
    if rejected:
        print(
            f"cachefs: error: {rejected} block{'s' * (rejected != 1)} did not match "
            f"{'their hashes' if rejected != 1 else 'its hash'}: not stored",
            file=sys.stderr,
        )
        return 1
    return 0
