"""A running mount's state, written to its log on SIGUSR1: for a mount that seems stuck.

``kill -USR1 PID`` (PID is in the cache dir's ``lock`` file) makes the
daemon log, one line per item, each starting ``state:``: its trio tasks as
a tree, each with where it waits (the innermost frame of cachefs or a
backend, and the trio call it is parked in); the inodes with handles open
and the engine's handles, by file; the blocks in flight (being fetched,
evicted or supplied); the changed files, flushing or waiting; the lengths
of the queues; and the counters of ``cachefs stats``.

Policy:

* Logged at WARNING, so that every level but ``error`` shows it: it was
  asked for.
* Cheap and read-only: it runs on the trio loop between two requests and
  never waits, so what it shows is one instant.  At most MAX_TASKS tasks
  are listed; the count of the others is said.
* File ids are written as names_as_logged says: on an encrypted mount as
  their tags, as in every other line of its log.  Task names (trio names a
  task after its function unless told otherwise, which cachefs never is)
  and frames are code, not data; the counters shown are numbers only.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from types import FrameType
from typing import Any

import trio

from cachefs.daemon.sealedlog import names_as_logged
from cachefs.engine import FileCache
from cachefs.fs.inodes import Namespace

log = logging.getLogger(__name__)

#: Tasks listed in a dump at most (a busy mount runs one per request).
MAX_TASKS = 200
#: Lines of each other kind (inodes, handles, blocks in flight, changed files)
#: at most: a dump of a busy mount must not rotate the log's history away.
MAX_ITEMS = 200


def log_state(cache: FileCache, namespace: Namespace) -> None:
    """Write the state of the mount to the log (call it in the mount's trio run)."""
    counters: dict[str, object] = dict(cache.statistics())
    counters.update(dataclasses.asdict(cache.write_statistics()))
    run = trio.lowlevel.current_statistics()
    queues = [
        ("", f"trio tasks living: {run.tasks_living}, runnable: {run.tasks_runnable}"),
        ("", f"trio calls from threads waiting: {run.run_sync_soon_queue_size}"),
    ]
    activity = cache.activity()
    activity["queues"] = queues + activity["queues"]
    root = trio.lowlevel.current_root_task()
    assert root is not None  # called in the trio run
    lines = state_lines(
        task_lines(root),
        namespace.open_inodes(),
        activity,
        counters,
        names_as_logged(),
    )
    log.warning("state: dump begins (SIGUSR1)")
    for line in lines:
        # No arguments: every name in *line* is already as the log must show it.
        log.warning("state: " + line)
    log.warning("state: dump ends")


def state_lines(
    tasks: Sequence[str],
    inodes: Sequence[tuple[int, str, int]],
    activity: Mapping[str, Sequence[tuple[str, str]]],
    counters: Mapping[str, object],
    name: Callable[[str], str],
) -> list[str]:
    """The lines of a dump: *tasks* as :func:`task_lines` gives them, the
    *inodes* with handles open (Namespace.open_inodes), the engine's
    *activity* (FileCache.activity) and the numbers among *counters*; every
    file id written as *name* writes it."""
    lines = [f"task {t}" for t in tasks]
    lines += _capped(
        [f"inode {ino} {name(file_id)}: handles={n}" for ino, file_id, n in inodes[:MAX_ITEMS]],
        len(inodes),
        "inodes",
    )
    for kind, what in (("handles", "open"), ("fetches", "in flight"), ("writes", "changed")):
        items = activity.get(kind, ())
        shown = [f"{what} {name(file_id)}: {text}" for file_id, text in items[:MAX_ITEMS]]
        lines += _capped(shown, len(items), f"files {what}")
    lines += [f"queue {text}" for _, text in activity.get("queues", ())]
    numbers = [
        f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in counters.items()
        if isinstance(value, (int, float))
    ]
    lines.append("counters " + " ".join(numbers))
    return lines


def _capped(lines: list[str], total: int, what: str) -> list[str]:
    """*lines*, the first of *total*, and how many more there were."""
    if total > len(lines):
        return [*lines, f"... and {total - len(lines)} more {what}"]
    return lines


def task_lines(root: trio.lowlevel.Task, limit: int = MAX_TASKS) -> list[str]:
    """The task tree under *root*, one task a line, indented by depth: its
    name and where it waits; at most *limit* tasks, then how many more."""
    lines: list[str] = []
    left = 0
    stack: list[tuple[trio.lowlevel.Task, int]] = [(root, 0)]
    while stack:
        task, depth = stack.pop()
        if len(lines) >= limit:
            left += 1
        else:
            lines.append(f"{'  ' * depth}{task.name} {waits_in(task)}")
        for nursery in reversed(task.child_nurseries):
            stack += [(child, depth + 1) for child in reversed(list(nursery.child_tasks))]
    if left:
        lines.append(f"... and {left} more tasks")
    return lines


def waits_in(task: trio.lowlevel.Task) -> str:
    """``in FUNCTION line N, on TRIO_CALL``: the innermost frame of the task
    outside trio, and the trio call it waits in (from its chain of awaits,
    nothing else is walked)."""
    ours: FrameType | None = None
    parked: FrameType | None = None
    awaited: Any = task.coro
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:
            break
        if str(frame.f_globals.get("__name__", "")).partition(".")[0] == "trio":
            parked = parked or frame
        else:
            ours, parked = frame, None
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    if task is trio.lowlevel.current_task():
        return "(writing this dump)"
    where = [] if ours is None else [f"in {_function(ours)} line {ours.f_lineno}"]
    return ", ".join(where + ([] if parked is None else [f"on {_function(parked)}"]))


def _function(frame: FrameType) -> str:
    return f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}"
