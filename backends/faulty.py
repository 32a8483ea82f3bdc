"""A wrapper that makes calls fail on demand, driven by a JSON file.

The rules file holds a JSON list; on each call the first rule whose ``op``
and ``file`` globs match the call and its file_id (``fnmatch.fnmatchcase``)
applies::

    [{"file": "big/*.bin", "result": "PARTIAL", "max_bytes": 4096},
     {"file": "short.txt", "eof": 100},
     {"file": "bad.bin", "corrupt": true, "count": 1},
     {"file": "*", "op": "write", "result": "FAILURE", "count": 3},
     {"file": "logs/*", "op": "make_dir", "result": "FILE_FAILURE", "error": "ENOSPC"},
     {"file": "slow.bin", "op": "*", "hang": true}]

Keys of a rule:

- ``file`` (glob, required) and ``result`` (an RWResult name; required
  unless ``eof``, ``corrupt`` or ``hang`` is given; with ``eof`` it
  defaults to RANGE_BEYOND_EOF).
- ``op`` (glob, default ``read``): which calls: ``read`` (ReadData),
  ``write`` (WriteData), or a namespace change: ``make_dir``,
  ``remove_file``, ``remove_dir``, ``rename`` (matched on the old name),
  ``set_size``, ``set_attrs``, ``make_symlink``.  ``*`` is every call.
- neither ``max_bytes`` nor ``eof``: copy (store) nothing and answer
  ``result``.  A namespace change is not made and answers ``result``,
  with ``error`` (an errno name, e.g. ``"ENOSPC"``; EIO for FILE_FAILURE
  when none is given).
- ``max_bytes``: pass at most this many bytes of the call to the wrapped
  backend (a read into the front of the buffer; a write of the front of
  its bytes, as a call that does not finish the transfer) and answer
  ``result`` with what was copied or stored.
- ``eof`` (reads): pretend the file ends there.  A call reaching past it
  gets the real bytes below it and RANGE_BEYOND_EOF; any other call is
  passed through.
- ``corrupt`` (reads; true or false): pass the call through, then flip
  every bit of the first byte of each 4 KiB the call returned (offsets 0,
  4096, … of the buffer), leaving the result code as the wrapped backend
  set it.  Cannot be combined with ``result``, ``max_bytes`` or ``eof``.
- ``hang`` (true or false): the call never returns (until its caller
  cancels it).  Cannot be combined with the other effects.
- ``count``: apply to the next N matching calls only (counted in memory; a
  rewrite of the file starts the counts afresh).

Policy: real errors win over injected ones (if the wrapped backend fails a
sub-request, its answer is returned).  CANCELED calls are never touched.
The file is checked with one ``os.stat`` per call and re-read when its
(device, inode, size, mtime) changes, so a running mount can be made to
fail by rewriting it (write a temp file and rename it over), and the next
call sees the new rules.  Both happen on the trio loop, so that the wrapper
adds no scheduling point to the calls it passes on; so the work is bounded
and never waits (backends.faultrules).  Keep the file on a local
filesystem (never inside the mount itself).  A bad file at start is a
RulesError; later, the last good rules stay in force and each distinct bad
state is logged once.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

import trio

from backends.faultrules import MAX_RULES, MAX_RULES_BYTES, Rule, load_rules, look, read_rules
from backends.wrapper import Wrapper
from cachefs.contract import Backend, ChangeResult, ReadData, RWEvent, RWResult, WriteData
from cachefs.errors import RulesError

__all__ = ["MAX_RULES", "MAX_RULES_BYTES", "FaultyBackend", "Rule", "corrupt", "plugin"]

log = logging.getLogger(__name__)

# A corrupt call flips the first byte of every CORRUPT_STRIDE bytes it returned.
CORRUPT_STRIDE = 4096
_FINISHING = RWEvent.CONTINUOUS_FINISHED | RWEvent.RANDOM_FINISHED


def corrupt(buffer: memoryview, length: int) -> None:
    """Flip the first byte of every CORRUPT_STRIDE bytes of ``buffer[:length]``."""
    for i in range(0, length, CORRUPT_STRIDE):
        buffer[i] ^= 0xFF


class FaultyBackend(Wrapper):
    """Wrap *inner*, applying the rules of *rules_path* to its calls."""

    def __init__(self, inner: Backend, rules_path: str | Path) -> None:
        super().__init__(inner)
        self.rules_path = Path(rules_path)
        self._seen, rules = read_rules(self.rules_path)
        if isinstance(rules, RulesError):
            raise rules
        self.rules = rules

    def __repr__(self) -> str:
        return f"FaultyBackend({self.inner!r}, {str(self.rules_path)!r})"

    def _refresh(self) -> None:
        change = look(self.rules_path, self._seen)
        if change is None:
            return
        self._seen, rules = change
        if isinstance(rules, RulesError):
            log.error("%s; keeping the last good rules", rules)
        else:
            self.rules = rules
            log.info("faults file %s: %d rules loaded", self.rules_path, len(rules))

    def _match(self, op: str, file_id: str) -> Rule | None:
        self._refresh()
        for rule in self.rules:
            if rule.matches(op, file_id):
                if rule.count is not None:
                    rule.count -= 1
                return rule
        return None

    async def read_data(self, req: ReadData) -> None:
        if req.flags & RWEvent.CANCELED:
            await self.inner.read_data(req)
            return
        rule = self._match("read", req.file_id)
        if rule is None:
            await self.inner.read_data(req)
            return
        log.debug("fault %s for %r @%d", rule, req.file_id, req.position)
        if rule.hang:
            await trio.sleep_forever()
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

    async def write_data(self, req: WriteData) -> None:
        if req.flags & RWEvent.CANCELED:
            await super().write_data(req)
            return
        rule = self._match("write", req.file_id)
        if rule is None:
            await super().write_data(req)
            return
        log.debug("fault %s for a write of %r @%d", rule, req.file_id, req.position)
        if rule.hang:
            await trio.sleep_forever()
        limit = min(rule.max_bytes or 0, req.bytes_to_write)
        req.bytes_written = 0
        req.result_code = rule.result
        if limit == 0:
            return
        flags = req.flags
        if limit < req.bytes_to_write:  # the rest is still to come: not the last call
            flags &= ~_FINISHING
            if flags & RWEvent.TIL_END:
                flags = flags & ~RWEvent.TIL_END | RWEvent.BEFORE_END
        sub = dataclasses.replace(
            req,
            flags=flags,
            buffer=req.buffer[:limit],
            bytes_to_write=limit,
            bytes_written=0,
            result_code=RWResult.SUCCESS,
        )
        await super().write_data(sub)
        req.file_context, req.new_version = sub.file_context, sub.new_version
        req.bytes_written = sub.bytes_written
        if sub.result_code != RWResult.SUCCESS:
            req.result_code = sub.result_code

    async def _fault(self, op: str, file_id: str) -> ChangeResult | None:
        """The injected answer to a namespace change; None to make it."""
        rule = self._match(op, file_id)
        if rule is None:
            return None
        log.debug("fault %s for %s %r", rule, op, file_id)
        if rule.hang:
            await trio.sleep_forever()
        error = rule.error or (errno.EIO if rule.result is RWResult.FILE_FAILURE else 0)
        reason = f"{op} {file_id}: injected {rule.result.name}"
        return ChangeResult(rule.result, error=error, reason=reason)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        fault = await self._fault("make_dir", dir_id)
        return fault if fault is not None else await super().make_dir(dir_id, mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        fault = await self._fault("remove_file", file_id)
        return fault if fault is not None else await super().remove_file(file_id, version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        fault = await self._fault("remove_dir", dir_id)
        return fault if fault is not None else await super().remove_dir(dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        fault = await self._fault("rename", old_id)
        return fault if fault is not None else await super().rename(old_id, new_id, replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        fault = await self._fault("set_size", file_id)
        return fault if fault is not None else await super().set_size(file_id, size, version)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        fault = await self._fault("set_attrs", file_id)
        return fault if fault is not None else await super().set_attrs(file_id, mode, mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        fault = await self._fault("make_symlink", file_id)
        return fault if fault is not None else await super().make_symlink(file_id, target)


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
