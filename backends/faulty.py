"""A wrapper that makes ReadData calls fail on demand, driven by a JSON file.

The rules file holds a JSON list; on each ReadData call the first rule whose
``file`` glob matches the file_id (``fnmatch.fnmatchcase``) applies::

    [{"file": "big/*.bin", "result": "PARTIAL", "max_bytes": 4096},
     {"file": "short.txt", "eof": 100},
     {"file": "bad.bin", "corrupt": true, "count": 1},
     {"file": "*", "result": "FAILURE", "count": 3}]

Keys of a rule:

- ``file`` (glob, required) and ``result`` (an RWResult name; required
  unless ``eof`` or ``corrupt`` is given; with ``eof`` it defaults to
  RANGE_BEYOND_EOF).
- neither ``max_bytes`` nor ``eof``: copy nothing and answer ``result``.
- ``max_bytes``: ask the wrapped backend for at most this many bytes into the
  front of the buffer and answer ``result`` with what was copied.
- ``eof``: pretend the file ends there.  A call reaching past it gets the
  real bytes below it and RANGE_BEYOND_EOF; any other call is passed through.
- ``corrupt`` (true or false): pass the call through, then flip every bit
  of the first byte of each 4 KiB the call returned (offsets 0, 4096, …
  of the buffer), leaving the result code as the wrapped backend set it.
  Cannot be combined with ``result``, ``max_bytes`` or ``eof``.
- ``count``: apply to the next N matching calls only (counted in memory; a
  rewrite of the file starts the counts afresh).

Policy: real errors win over injected ones (if the wrapped backend fails a
sub-request, its answer is returned).  CANCELED calls are never touched.
The file is checked with one ``os.stat`` per call and re-read when its
(device, inode, size, mtime) changes, so a running mount can be made to
fail by rewriting it (write a temp file and rename it over), and the next
read sees the new rules.  Both happen on the trio loop, so that the wrapper
adds no scheduling point to the calls it passes on; so the work is bounded
and never waits: a rules file is a regular file of at most MAX_RULES_BYTES
holding at most MAX_RULES rules, and anything else (a FIFO, a device, a
directory, a bigger file) is refused on its stat, unopened and unread.
Keep the file on a local filesystem (never inside the mount itself).  A
bad file at start is a RulesError; later, the last good rules stay in
force and each distinct bad state is logged once.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backends.wrapper import Wrapper
from cachefs.contract import Backend, ReadData, RWEvent, RWResult
from cachefs.errors import RulesError

log = logging.getLogger(__name__)

#: A rules file holds a handful of rules: a bigger one is refused unread.
MAX_RULES_BYTES = 1 << 20
#: Every read is matched against the rules in turn: so many, and no more.
MAX_RULES = 1000

_KEYS = ("file", "result", "max_bytes", "eof", "corrupt", "count")
# A corrupt call flips the first byte of every CORRUPT_STRIDE bytes it returned.
CORRUPT_STRIDE = 4096
_RESULTS = ", ".join(r.name for r in RWResult)


@dataclasses.dataclass(slots=True)
class Rule:
    file: str
    result: RWResult
    max_bytes: int | None = None
    eof: int | None = None
    count: int | None = None
    corrupt: bool = False

    def matches(self, file_id: str) -> bool:
        return (self.count is None or self.count > 0) and fnmatch.fnmatchcase(file_id, self.file)


def _int(rule: dict[str, Any], key: str) -> int | None:
    value = rule.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {json.dumps(value)}")
    if value < 0:
        raise ValueError(f"{key} must not be negative, got {value}")
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
    eof, max_bytes = _int(raw, "eof"), _int(raw, "max_bytes")
    corrupt = raw.get("corrupt", False)
    if not isinstance(corrupt, bool):
        raise ValueError(f"corrupt must be true or false, got {json.dumps(corrupt)}")
    if corrupt:
        for key in ("result", "max_bytes", "eof"):
            if key in raw:
                raise ValueError(f"'corrupt' cannot be combined with {key!r}")
        return Rule(glob, RWResult.SUCCESS, count=_int(raw, "count"), corrupt=True)
    if eof is not None and max_bytes is not None:
        raise ValueError("'eof' and 'max_bytes' cannot be combined")
    name = raw.get("result", "RANGE_BEYOND_EOF" if eof is not None else None)
    if name is None:
        raise ValueError("missing key 'result'")
    if not isinstance(name, str) or name not in RWResult.__members__:
        raise ValueError(f"unknown result {name!r} (expected one of {_RESULTS})")
    return Rule(glob, RWResult[name], max_bytes, eof, _int(raw, "count"))


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
_Identity = tuple[int, int, int, int] | str


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


def _read(path: Path) -> tuple[_Identity, list[Rule] | RulesError]:
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
    rules = _read(Path(path))[1]
    if isinstance(rules, RulesError):
        raise rules
    return rules


def _look(path: Path, seen: _Identity) -> tuple[_Identity, list[Rule] | RulesError] | None:
    """The rules file's identity and rules (or why they are bad) if it is
    no longer the version *seen*; else None.  A stat, and a bounded read
    when the file changed (see _read)."""
    try:
        found: _Identity = _identity(os.stat(path))
    except OSError as e:
        found = _cannot_read(path, e)[0]
    return None if found == seen else _read(path)


def corrupt(buffer: memoryview, length: int) -> None:
    """Flip the first byte of every CORRUPT_STRIDE bytes of ``buffer[:length]``."""
    for i in range(0, length, CORRUPT_STRIDE):
        buffer[i] ^= 0xFF


class FaultyBackend(Wrapper):
    """Wrap *inner*, applying the rules of *rules_path* to ReadData calls."""

    def __init__(self, inner: Backend, rules_path: str | Path) -> None:
        super().__init__(inner)
        self.rules_path = Path(rules_path)
        self._seen, rules = _read(self.rules_path)
        if isinstance(rules, RulesError):
            raise rules
        self.rules = rules

    def __repr__(self) -> str:
        return f"FaultyBackend({self.inner!r}, {str(self.rules_path)!r})"

    def _refresh(self) -> None:
        change = _look(self.rules_path, self._seen)
        if change is None:
            return
        self._seen, rules = change
        if isinstance(rules, RulesError):
            log.error("%s; keeping the last good rules", rules)
        else:
            self.rules = rules
            log.info("faults file %s: %d rules loaded", self.rules_path, len(rules))

    def _match(self, file_id: str) -> Rule | None:
        self._refresh()
        for rule in self.rules:
            if rule.matches(file_id):
                if rule.count is not None:
                    rule.count -= 1
                return rule
        return None

    async def read_data(self, req: ReadData) -> None:
        if req.flags & RWEvent.CANCELED:
            await self.inner.read_data(req)
            return
        rule = self._match(req.file_id)
        if rule is None:
            await self.inner.read_data(req)
            return
        log.debug("fault %s for %r @%d", rule, req.file_id, req.position)
        if rule.corrupt:
            await self.inner.read_data(req)
            corrupt(req.buffer, req.bytes_read)
            return
        if rule.eof is not None:
            if req.position + req.bytes_to_read <= rule.eof:
                await self.inner.read_data(req)
                return
            limit, result = max(0, rule.eof - req.position), RWResult.RANGE_BEYOND_EOF
        elif rule.max_bytes is not None:
            limit, result = min(rule.max_bytes, req.bytes_to_read), rule.result
        else:
            limit, result = 0, rule.result
        req.bytes_read = 0
        req.result_code = result
        if limit == 0:
            return
        sub = dataclasses.replace(
            req,
            buffer=req.buffer[:limit],
            bytes_to_read=limit,
            bytes_read=0,
            result_code=RWResult.SUCCESS,
        )
        await self.inner.read_data(sub)
        req.bytes_read = sub.bytes_read
        if sub.result_code != RWResult.SUCCESS:
            req.result_code = sub.result_code


class FaultsPlugin:
    """The mount's ``--faults FILE`` (entry point ``faults`` of ``cachefs.wrappers``)."""

    def check(self, value: str) -> str:
        """The rules file's absolute path; RulesError (one line) if it is unreadable or bad."""
        path = os.path.abspath(value)
        load_rules(path)
        return path

    def wrap(self, inner: Backend, value: str, names: Callable[[str], str]) -> Backend:
        return FaultyBackend(inner, value)


plugin = FaultsPlugin()
