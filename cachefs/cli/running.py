"""The cachefs commands that act on a running mount, through its control socket.

unmount, stats, prefetch, pin, unpin, purge, add-data and the resets.  A PATH names
its mount (found in /proc/self/mountinfo, no request to the file system)
and a file id within it; errors are raised as CacheFSError for the
command line to print as one line.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import os
import pwd
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cachefs.cli.progress import ProgressBar, summary
from cachefs.control.protocol import (
    MountEntry,
    abort_connection,
    attached,
    daemon_pid,
    find_mount,
    lazy_unmount,
    mount_at,
    request,
    wait_for_exit,
)
from cachefs.errors import CacheFSError, ConfigError, MountBusy, MountUnreachable, NotInMount
from cachefs.units import format_size

log = logging.getLogger("cachefs")


#: How long the daemon has to answer its control socket before unmount aborts it,
#: and to exit once aborted and told to.
ANSWER_DEADLINE = 5.0


def cmd_unmount(args: argparse.Namespace) -> int:
    entry = mount_at(args.mountpoint)
    if entry is None:
        inside = find_mount(args.mountpoint)  # NotInMount if not even inside one
        raise NotInMount(
            f"{args.mountpoint} is not a mount point (the mount is {inside.mountpoint})"
        )
    uid = os.geteuid()
    if uid != 0 and entry.owner is not None and entry.owner != uid:
        raise CacheFSError(
            f"permission denied: the mount at {entry.mountpoint} is {_user(entry.owner)}'s; "
            "only its owner and root may unmount it"
        )
    deadline = time.monotonic() + args.timeout
    try:
        pid = _ask_to_unmount(entry)
    except MountUnreachable as e:
        return _force_unmount(entry, str(e), deadline)
    if wait_for_exit(pid, max(0.0, deadline - time.monotonic())):
        return 0
    return _force_unmount(
        entry, f"the daemon (pid {pid}) did not exit within {args.timeout:g} s", deadline, pid
    )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _daemon_of(entry: MountEntry) -> int | None:
    """The pid the cache dir's lock file names, if that process runs as the
    mount's owner: a pid written there by someone else must not make
    unmount signal another process."""
    pid = daemon_pid(entry.cache_dir)
    if pid is None:
        return None
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    if entry.owner is not None and uid != entry.owner:
        log.debug("pid %d in the lock file runs as uid %d, not the mount's owner", pid, uid)
        return None
    return pid


def _ask_to_unmount(entry: MountEntry) -> int:
    """Ask the daemon to unmount; its pid.  MountUnreachable if it cannot be asked.

    A mount busy with other requests is asked by SIGTERM, which stops it as
    the request does (its reserved control places are all taken too).
    """
    try:
        result = request(entry, "unmount", timeout=ANSWER_DEADLINE)
    except MountBusy:
        pid = _daemon_of(entry)
        if pid is None:
            raise
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise MountUnreachable(f"the mount at {entry.mountpoint} has no daemon") from None
        log.info("the mount is busy: asked its daemon (pid %d) to unmount by SIGTERM", pid)
        return pid
    pid = result.get("pid") if isinstance(result, dict) else None
    if type(pid) is not int:
        raise MountUnreachable(
            f"the mount at {entry.mountpoint} answered unmount with {str(result)[:100]}"
        )
    return pid


def _force_unmount(entry: MountEntry, why: str, deadline: float, asked: int | None = None) -> int:
    """The daemon does not answer (stopped, hung, or dead), or did not exit
    in time: free the kernel (abort its FUSE connection: blocked readers get
    an error at once), detach the mount, and tell a live daemon to exit; 0
    once it has.

    *asked*: the pid of a daemon that was asked to unmount already.  A mount
    gone by the time it is to be detached was detached by its daemon, which
    finishes by itself: 0 at once, and nothing to say.
    """
    pid = asked or _daemon_of(entry)
    aborted = attached(entry) and abort_connection(entry)
    if not lazy_unmount(entry):
        return 0
    done = "aborted its FUSE connection and detached" if aborted else "detached"
    if pid is None:
        log.warning("%s; %s the mount", why, done)
        return 0
    if asked is None:
        for sig in (signal.SIGTERM, signal.SIGCONT):  # a stopped daemon wakes up to exit
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
    if not wait_for_exit(pid, max(deadline - time.monotonic(), ANSWER_DEADLINE)):
        raise CacheFSError(f"{why}; {done} the mount, but its daemon (pid {pid}) did not exit")
    log.warning("%s; %s the mount, and its daemon (pid %d) exited", why, done, pid)
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
    ("cache limit", "cache_limit", format_size),
    ("min free", "min_free", format_size),
    ("pinned", "pinned_bytes", format_size),
    ("pinned files", "pinned_files", str),
    ("evicted", "evicted_bytes", format_size),
    ("hit ratio", "hit_ratio", lambda v: "n/a" if v is None else f"{v:.1%}"),
    ("max readahead", "max_readahead", format_size),
    ("max fetches", "max_fetches", str),
    ("files in error", "files_in_error", str),
    ("external error", "external_error", lambda v: v or "none"),
    ("cache disk error", "cache_disk_error", lambda v: v or "none"),
)


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable table of ``cachefs stats``."""
    rows = [(label, fmt(stats[key])) for label, key, fmt in _STATS_ROWS if key in stats]
    shown = {key for _, key, _ in _STATS_ROWS} | {"file_errors", "short_files"}
    rows += [
        (key.replace("_", " "), str(value))
        for key, value in sorted(stats.items())
        if key not in shown and isinstance(value, int | float | str)
    ]
    rows += [("  in error", file_id) for file_id in stats.get("file_errors", [])]
    rows += [("  ends early", file_id) for file_id in stats.get("short_files", [])]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def cmd_stats(args: argparse.Namespace) -> int:
    stats = request(find_mount(args.path), "stats")
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats(stats))
    return 0


def _by_mount(paths: list[str]) -> dict[MountEntry, list[str]]:
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
    for entry, file_ids in _by_mount(args.paths).items():
        bar = ProgressBar(args.command, sys.stderr) if sys.stderr.isatty() else None
        started = time.monotonic()
        try:
            on_progress = bar.update if bar is not None else None
            result = request(entry, args.command, on_progress=on_progress, file_ids=file_ids)
        finally:
            if bar is not None:
                bar.close()
        if result["succeeded"] or not result["failed"]:
            print(summary(verb_past, result, time.monotonic() - started), flush=True)
        if "warning" in result:
            print(f"cachefs: warning: {result['warning']}", file=sys.stderr)
        for failure in result["failed"]:
            print(f"cachefs: error: {failure['error']}", file=sys.stderr)
            status = max(status, int(failure["exit_code"]))
    return status


def cmd_prefetch(args: argparse.Namespace) -> int:
    return _whole_files(args, "prefetched")


def cmd_pin(args: argparse.Namespace) -> int:
    return _whole_files(args, "pinned")


def cmd_unpin(args: argparse.Namespace) -> int:
    for entry, file_ids in _by_mount(args.paths).items():
        result = request(entry, "unpin", file_ids=file_ids)
        n = len(result["unpinned"])
        print(f"unpinned {n} file{'s' * (n != 1)}")
        for file_id in result["not_pinned"]:
            print(
                f"cachefs: warning: nothing pinned at {entry.mountpoint / file_id}", file=sys.stderr
            )
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    for entry, file_ids in _by_mount(args.paths).items():
        result = request(entry, "purge", file_ids=file_ids)
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
            got = request(
                entry,
                "add-data",
                file_id=file_id,
                offset=offset,
                data=base64.b64encode(chunk).decode(),
                trust=args.trust,
            )
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
            print(f"no latched file errors or early ends of file under {', '.join(args.paths)}")
    return 0


def cmd_reset_external_error(args: argparse.Namespace) -> int:
    request(find_mount(args.path), "reset-external-error")
    return 0
