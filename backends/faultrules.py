"""The rules of backends.faulty: their syntax (checked), and reading the file.

What the rules mean is backends.faulty's policy.  Reading is bounded and
never waits: a rules file is a regular file of at most MAX_RULES_BYTES
holding at most MAX_RULES rules; anything else (a FIFO, a device, a
directory, a bigger file) is refused on its stat, unopened and unread.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import json
import os
import stat
from pathlib import Path
from typing import Any

from cachefs.contract import RWResult
from cachefs.errors import RulesError

#: A rules file holds a handful of rules: a bigger one is refused unread.
MAX_RULES_BYTES = 1 << 20
#: Every call is matched against the rules in turn: so many, and no more.
MAX_RULES = 1000

_KEYS = ("file", "op", "result", "max_bytes", "eof", "corrupt", "hang", "error", "count")
#: What a rule's "op" names: a ReadData call, a WriteData call, or a namespace change.
OPS = (
    "read",
    "write",
    "make_dir",
    "remove_file",
    "remove_dir",
    "rename",
    "set_size",
    "set_attrs",
    "make_symlink",
)
_RESULTS = ", ".join(r.name for r in RWResult)


@dataclasses.dataclass(slots=True)
class Rule:
    file: str
    result: RWResult
    max_bytes: int | None = None
    eof: int | None = None
    count: int | None = None
    corrupt: bool = False
    op: str = "read"
    hang: bool = False
    error: int = 0

    def matches(self, op: str, file_id: str) -> bool:
        return (
            (self.count is None or self.count > 0)
            and fnmatch.fnmatchcase(op, self.op)
            and fnmatch.fnmatchcase(file_id, self.file)
        )


def _int(rule: dict[str, Any], key: str) -> int | None:
    value = rule.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {json.dumps(value)}")
    if value < 0:
        raise ValueError(f"{key} must not be negative, got {value}")
    return value


def _flag(rule: dict[str, Any], key: str) -> bool:
    value = rule.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {json.dumps(value)}")
    return value


def _op(rule: dict[str, Any]) -> str:
    op = rule.get("op", "read")
    if not isinstance(op, str):
        raise ValueError("'op' must be a glob string")
    if not any(fnmatch.fnmatchcase(name, op) for name in OPS):
        raise ValueError(f"op {op!r} matches none of {', '.join(OPS)}")
    return op


def _errno(rule: dict[str, Any]) -> int:
    name = rule.get("error")
    if name is None:
        return 0
    value = getattr(errno, name, None) if isinstance(name, str) else None
    if not isinstance(value, int) or errno.errorcode.get(value) is None:
        raise ValueError(f'error must be an errno name such as "ENOSPC", got {json.dumps(name)}')
    return value


def _rule(raw: object) -> Rule:
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {json.dumps(raw)}")
    for key in raw:
        if key not in _KEYS:
            raise ValueError(f"unknown key {key!r} (expected {', '.join(_KEYS)})")
    glob = raw.get("file")
    if not isinstance(glob, str):
        raise ValueError("'file' must be a glob string")
    op, count = _op(raw), _int(raw, "count")
    eof, max_bytes = _int(raw, "eof"), _int(raw, "max_bytes")
    corrupt, hang = _flag(raw, "corrupt"), _flag(raw, "hang")
    for key in ("eof", "corrupt"):
        if key in raw and op != "read":
            raise ValueError(f"{key!r} applies to reads only (op 'read')")
    for key, value in (("hang", hang), ("corrupt", corrupt)):
        if value:
            for other in ("result", "max_bytes", "eof", "corrupt", "hang", "error"):
                if other != key and raw.get(other, False) is not False:
                    raise ValueError(f"{key!r} cannot be combined with {other!r}")
            return Rule(glob, RWResult.SUCCESS, count=count, corrupt=corrupt, op=op, hang=hang)
    if eof is not None and max_bytes is not None:
        raise ValueError("'eof' and 'max_bytes' cannot be combined")
    name = raw.get("result", "RANGE_BEYOND_EOF" if eof is not None else None)
    if name is None:
        raise ValueError("missing key 'result'")
    if not isinstance(name, str) or name not in RWResult.__members__:
        raise ValueError(f"unknown result {name!r} (expected one of {_RESULTS})")
    return Rule(glob, RWResult[name], max_bytes, eof, count, op=op, error=_errno(raw))


def parse_rules(text: str, origin: str) -> list[Rule]:
    """The rules in *text*; RulesError naming *origin* and the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RulesError(f"faults file {origin}: invalid JSON: {e}") from None
    except RecursionError:
        raise RulesError(f"faults file {origin}: invalid JSON: nested too deeply") from None
    if not isinstance(data, list):
        raise RulesError(f"faults file {origin}: expected a JSON list of rules")
    if len(data) > MAX_RULES:
        raise RulesError(f"faults file {origin}: {len(data)} rules, more than {MAX_RULES}")
    rules = []
    for i, raw in enumerate(data, 1):
        try:
            rules.append(_rule(raw))
        except ValueError as e:
            raise RulesError(f"faults file {origin}: rule {i}: {e}") from None
    return rules


# What identifies a version of the rules file cheaply (device, inode, size,
# mtime), or why it cannot be looked at.
Identity = tuple[int, int, int, int] | str


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _refuse(path: Path, st: os.stat_result) -> RulesError | None:
    """Why a file of this kind and size cannot be a rules file, if it cannot."""
    if not stat.S_ISREG(st.st_mode):
        kind = "not a regular file"
        if stat.S_ISFIFO(st.st_mode):
            kind = "a FIFO"
        elif stat.S_ISDIR(st.st_mode):
            kind = "a directory"
        return RulesError(f"faults file {path}: {kind}; a rules file must be a regular file")
    if st.st_size > MAX_RULES_BYTES:
        return RulesError(f"faults file {path}: {st.st_size} bytes, more than {MAX_RULES_BYTES}")
    return None


def _cannot_read(path: Path, e: OSError) -> tuple[str, RulesError]:
    reason = f"cannot read: {e.strerror or e}"
    return reason, RulesError(f"faults file {path}: {reason}")


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks = []
    while limit > 0 and (chunk := os.read(fd, limit)):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def read_rules(path: Path) -> tuple[Identity, list[Rule] | RulesError]:
    """The rules file's identity, and its rules or why it is no rules file.

    Blocking, but bounded: a file that is not regular (or too big) is
    refused on its stat and never opened, the file is opened without
    waiting for a writer (should it have become a FIFO meanwhile), and at
    most MAX_RULES_BYTES + 1 bytes are read.
    """
    try:
        st = os.stat(path)
        if (refused := _refuse(path, st)) is not None:
            return _identity(st), refused
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return _cannot_read(path, e)
    try:
        st = os.fstat(fd)
        found = _identity(st)
        if (refused := _refuse(path, st)) is not None:
            return found, refused
        data = _read_at_most(fd, MAX_RULES_BYTES + 1)
    except OSError as e:
        return _cannot_read(path, e)
    finally:
        os.close(fd)
    if len(data) > MAX_RULES_BYTES:  # it grew since fstat
        return found, RulesError(f"faults file {path}: more than {MAX_RULES_BYTES} bytes")
    try:
        return found, parse_rules(data.decode("utf-8"), str(path))
    except UnicodeDecodeError:
        return found, RulesError(f"faults file {path}: not UTF-8 text")
    except RulesError as e:
        return found, e


def load_rules(path: str | Path) -> list[Rule]:
    """Read and check a rules file; RulesError if it is unreadable or bad.

    Safe on any path a user gives: it never waits for a FIFO's writer, and
    reads at most MAX_RULES_BYTES + 1 bytes of a regular file.
    """
    rules = read_rules(Path(path))[1]
    if isinstance(rules, RulesError):
        raise rules
    return rules


def look(path: Path, seen: Identity) -> tuple[Identity, list[Rule] | RulesError] | None:
    """The rules file's identity and rules (or why they are bad) if it is
    no longer the version *seen*; else None.  A stat, and a bounded read
    when the file changed (see read_rules)."""
    try:
        found: Identity = _identity(os.stat(path))
    except OSError as e:
        found = _cannot_read(path, e)[0]
    return None if found == seen else read_rules(path)
