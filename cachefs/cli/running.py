"""The commands on a running mount's life: ``unmount``, ``stats`` and the resets.

A PATH names its mount (found in /proc/self/mountinfo, no request to the
file system) and a file id within it; the mount is asked through its
control socket with the protocol's typed requests; errors are raised as
CacheFSError for the command line to print as one line.

``unmount`` has the mount flush its changed files first (reported as
``cachefs flush`` reports, cachefs.cli.flushing), unless --keep-dirty:
it exits with 1 when a changed file did not reach the source as the
mount showed it, 0 otherwise, and the mount is gone either way.  The
files not sent stay in the cache dir for the next mount of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cachefs.cli.flushing import progress_bar, report_flush
from cachefs.cli.options import MAX_TIMEOUT, AddCommand, non_empty, number, paths_argument
from cachefs.control.client import request
from cachefs.control.mounts import (
    MountEntry,
    attached,
    daemon_pid,
    find_mount,
    lazy_unmount,
    mount_at,
    wait_for_exit,
)
from cachefs.control.protocol import (
    ResetExternalError,
    ResetFileErrors,
    Stats,
    Unmount,
    UnmountReply,
)
from cachefs.daemon.tuning import abort_connection
from cachefs.errors import CacheFSError, MountBusy, MountUnreachable, NotInMount
from cachefs.units import format_size

log = logging.getLogger("cachefs")


def add_unmount(add: AddCommand) -> None:
    unmount = add(
        "unmount",
        "unmount a cachefs mount cleanly",
        "Ask the mount's daemon to send every changed file to the source (a progress bar on "
        "a terminal, then a summary line), unmount, commit the cache metadata and exit; "
        "returns when it has. A changed file that cannot be sent (the source offline, or "
        "refusing it) or that ran into a conflict is named on stderr and the exit code is 1, "
        "but the mount is gone either way: such a file stays in the cache dir, and the next "
        "mount of that cache dir flushes it. Interrupted (Ctrl-C) while it flushes, the "
        "mount stays as it was. A daemon that does not answer within 5 s (stopped, hung "
        "or gone) or does not exit in time has its FUSE connection aborted, so processes "
        "blocked on the mount get an error at once; the mount is detached and the daemon "
        "told to exit.",
    )
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT", type=non_empty)
    unmount.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=number(float, 0, MAX_TIMEOUT),
        default=30.0,
        help="how long to wait for the daemon to exit, once it has flushed, before aborting "
        f"its connection and detaching the mount, 0 to {MAX_TIMEOUT} (default: 30)",
    )
    unmount.add_argument(
        "--keep-dirty",
        action="store_true",
        help="unmount at once, without sending the changed files to the source: they stay in "
        "the cache dir, and the next mount of that cache dir sends them",
    )
    unmount.set_defaults(run=cmd_unmount)


def add_stats_and_resets(add: AddCommand) -> None:
    stats = add(
        "stats",
        "show a mount's counters",
        "Show the counters of the mount containing PATH: backend calls and bytes, cache hits "
        "and misses, hit ratio, cached, pinned and evicted bytes, the cache limit and free "
        "space floor, latched file errors and the external error; changes: whether the mount "
        "is read-only (and why), changed files and bytes not yet sent to the source, "
        "flushes, WriteData calls, conflicts and failed flushes; for a mount in a group, "
        "bytes from the origin and from the hosted cache, the hosted cache's hits, misses, "
        "offers and uploads, rejected blocks and records, and each group pin's progress.",
    )
    stats.add_argument("path", metavar="PATH", type=non_empty, help="any path inside the mount")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(run=cmd_stats)

    reset_files = add(
        "reset-file-errors",
        "read or flush files again after FILE_FAILURE, forget early ends of file",
        "Lift the FILE_FAILURE latch of each PATH (a directory: of every file below it; "
        "the mount point: of all files), so reads ask the source again and a changed file "
        "the source refused is sent again now, and forget where a RANGE_BEYOND_EOF answer "
        "said such a file ends (the zeros cached for it go).",
    )
    paths_argument(reset_files)
    reset_files.set_defaults(run=cmd_reset_file_errors)

    reset_external = add(
        "reset-external-error",
        "use the source again after PERMANENT_FAILURE",
        "Lift the PERMANENT_FAILURE latch of the mount containing PATH: reads that miss the "
        "cache ask the source again, and the changes made while it was offline are sent "
        "to it now.",
    )
    reset_external.add_argument(
        "path", metavar="PATH", type=non_empty, help="any path inside the mount"
    )
    reset_external.set_defaults(run=cmd_reset_external_error)


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
    started = time.monotonic()
    try:
        reply = _ask_to_unmount(entry, args.keep_dirty)
    except MountUnreachable as e:
        return _force_unmount(entry, str(e), time.monotonic() + args.timeout)
    status = _report_unmount(entry, reply, args.keep_dirty, time.monotonic() - started)
    pid = reply["pid"]
    if wait_for_exit(pid, args.timeout):
        return status
    why = f"the daemon (pid {pid}) did not exit within {args.timeout:g} s"
    return max(status, _force_unmount(entry, why, time.monotonic(), pid))


def _report_unmount(
    entry: MountEntry, reply: UnmountReply, keep_dirty: bool, seconds: float
) -> int:
    """Print what the daemon flushed and what it leaves in the cache dir;
    1 if a changed file did not reach the source as it is (see cli.flushing)."""
    status = 0
    flush = reply.get("flush")
    if flush is not None and (flush["flushed"] or flush["failed"] or flush["conflicts"]):
        status = report_flush(entry.mountpoint, flush, seconds)
    kept = reply.get("kept", 0)
    if kept:
        where = entry.cache_dir or "the cache dir"
        files = f"{kept} changed file{'s' * (kept != 1)}"
        if keep_dirty:
            print(f"{files} left in {where}: the next mount of it sends them to the source")
        else:
            print(
                f"cachefs: warning: {files} not sent to the source "
                f"{'stays' if kept == 1 else 'stay'} in {where}: "
                "the next mount of it that can write sends them (one the source refused "
                "once `cachefs reset-file-errors` is run on it)",
                file=sys.stderr,
            )
    return status


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


def _ask_to_unmount(entry: MountEntry, keep_dirty: bool) -> UnmountReply:
    """Ask the daemon to flush (unless *keep_dirty*) and unmount; its answer.
    MountUnreachable if it cannot be asked.

    The flush may take long: the daemon is waited for as long as it
    reports progress.  A mount busy with other requests is asked by
    SIGTERM, which stops it as the request does (its reserved control
    places are all taken too), flushing for a while on its way out.
    """
    bar = progress_bar()
    try:
        on_progress = bar.update if bar is not None else None
        unmount = Unmount(keep_dirty=keep_dirty)
        return request(entry, unmount, timeout=ANSWER_DEADLINE, on_progress=on_progress)
    except MountBusy:
        pid = _daemon_of(entry)
        if pid is None:
            raise
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            raise MountUnreachable(f"the mount at {entry.mountpoint} has no daemon") from None
        log.info("the mount is busy: asked its daemon (pid %d) to unmount by SIGTERM", pid)
        return {"pid": pid}
    finally:
        if bar is not None:
            bar.close()


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
    (
        "  by result",
        "read_data_results",
        lambda by_code: ", ".join(f"{code} {n}" for code, n in by_code.items() if n) or "none",
    ),
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
    ("read-only", "read_only", lambda v: "yes" if v else "no"),
    ("write-back delay", "write_back_delay", lambda v: f"{v:g} s"),
    ("max dirty", "max_dirty", format_size),
    ("dirty files", "dirty_files", str),
    ("dirty", "dirty_bytes", format_size),
    ("flushing", "flushing_files", str),
    ("flushed files", "flushed_files", str),
    ("flushed", "flushed_bytes", format_size),
    ("WriteData calls", "write_data_calls", str),
    ("write failures", "write_failures", str),
    ("write conflicts", "write_conflicts", str),
)


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable table of ``cachefs stats``."""
    rows = [(label, fmt(stats[key])) for label, key, fmt in _STATS_ROWS if key in stats]
    reason = stats.get("read_only_reason")
    if stats.get("read_only") and reason:
        rows = [(lb, f"yes: {reason}" if lb == "read-only" else v) for lb, v in rows]
    shown = {key for _, key, _ in _STATS_ROWS} | {"file_errors", "short_files", "read_only_reason"}
    rows += [
        (key.replace("_", " "), str(value))
        for key, value in sorted(stats.items())
        if key not in shown and isinstance(value, int | float | str)
    ]
    rows += [("  in error", file_id) for file_id in stats.get("file_errors", [])]
    rows += [("  ends early", file_id) for file_id in stats.get("short_files", [])]
    rows += [("  not flushed", file_id) for file_id in stats.get("latched_writes", [])]
    group = stats.get("group")
    if isinstance(group, dict):
        rows += _group_rows(group, stats.get("bytes_from_backend"))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


_GROUP_ROWS = (
    ("hosted hits", "hosted_hits", str),
    ("hosted misses", "hosted_misses", str),
    ("hosted errors", "hosted_errors", str),
    ("rejected blocks", "rejected_blocks", str),
    ("offered", "offered", str),
    ("uploaded", "uploaded", str),
    ("already there", "already_there", str),
    ("dropped offers", "dropped_offers", str),
    ("mismatched offers", "mismatched_offers", str),
    ("offer queue", "offer_queue_bytes", format_size),
    ("content published", "content_published", str),
    ("content used", "content_used", str),
    ("rejected records", "rejected_records", str),
    ("versions published", "versions_published", str),
    ("versions applied", "versions_applied", str),
)


#: shown by _group_rows before the counters
_GROUP_HEAD = ("name", "member", "hosted_cache", "hosted_down", "hosted_bytes", "group_pins")


def _group_rows(group: dict[str, Any], from_backend: object) -> list[tuple[str, str]]:
    """The rows of a group mount (the reply's ``group`` object): bytes from the
    origin are those from the backend less those the hosted cache gave."""
    hosted = group.get("hosted_cache")
    down = group.get("hosted_down")
    rows = [
        ("group", f"{group.get('name')} (member {group.get('member')})"),
        ("hosted cache", f"{hosted or 'none'}" + (f" (down: {down})" if down else "")),
    ]
    hosted_bytes = group.get("hosted_bytes")
    if isinstance(hosted_bytes, int):
        if isinstance(from_backend, int):
            rows.append(("from origin", format_size(max(0, from_backend - hosted_bytes))))
        rows.append(("from hosted cache", format_size(hosted_bytes)))
    rows += [(label, fmt(group[key])) for label, key, fmt in _GROUP_ROWS if key in group]
    shown = {key for _, key, _ in _GROUP_ROWS} | set(_GROUP_HEAD)
    rows += [
        (key.replace("_", " "), str(value))
        for key, value in sorted(group.items())
        if key not in shown and isinstance(value, int | float | str)
    ]
    for pin in group.get("group_pins", []):
        cached, size, error = pin.get("cached", 0), pin.get("size", 0), pin.get("error")
        done = f"{cached / size:.0%}" if size else "100%"
        progress = (
            f"error: {error}" if error else f"{format_size(cached)} of {format_size(size)} ({done})"
        )
        rows.append(("  group pin", f"{pin.get('file')}  {progress}"))
    return rows


def cmd_stats(args: argparse.Namespace) -> int:
    stats = request(find_mount(args.path), Stats())
    print(json.dumps(stats, indent=2, sort_keys=True) if args.json else format_stats(stats))
    return 0


def cmd_reset_file_errors(args: argparse.Namespace) -> int:
    by_mount: dict[MountEntry, list[str]] = {}
    for path in args.paths:
        entry = find_mount(path)
        by_mount.setdefault(entry, []).append(entry.file_id(Path(os.path.abspath(path))))
    for entry, file_ids in by_mount.items():
        reset = request(entry, ResetFileErrors(tuple(file_ids)))
        for file_id in reset:
            print(f"reset {entry.mountpoint / file_id}")
        if not reset:
            print(
                "no latched file errors (failed reads, flushes the source refused) or early "
                f"ends of file under {', '.join(args.paths)}"
            )
    return 0


def cmd_reset_external_error(args: argparse.Namespace) -> int:
    entry = find_mount(args.path)
    request(entry, ResetExternalError())
    print(
        f"the source of {entry.mountpoint} is used again: reads ask it, and changed files "
        "waiting for it are sent now"
    )
    return 0
