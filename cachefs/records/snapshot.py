"""Export and import of a member's record database: a snapshot file.

The format is ours and is documented in docs/records.md.  One JSON object
per line: a header naming the group (its id and its charter), then one item
per line, ``{"kind": "cred"|"revoke"|"rec", "body": base64, "sig": base64}``
-- credentials and revocations first, in the order they were verified, then
every record held, tombstones included -- and an end line counting the
items, so that a file cut short is noticed.

Policy:

- Export writes one consistent state (the store's database is held for the
  duration) to a new 0600 file that replaces *path* only once it is complete
  and on disk: a crash leaves the old file or the new one, never half of one.
- A snapshot is as untrusted as the engine: import checks every item exactly
  as the store checks what arrives from the engine (signature, signer chained
  to the creator, role, version) and merges by version.  Nothing is trusted
  because it came from a file.
- Import refuses the whole file (GroupError) only when it is not a snapshot,
  or is the snapshot of another group (or carries another charter under this
  group's id).  Anything else is decided line by line: a malformed or
  overlong line, a record that fails its checks, is rejected and counted, and
  the rest is applied; the report says how many were imported, already held
  and rejected, and why.
- What an import applies is queued for the engine as well, so that the
  other members get what they lacked (they merge it by version too).
- A record the member already holds at that version or a newer one is
  counted as already held (stale) without further checks: it changes
  nothing.  Expired records are not exported.
- Memory stays bounded: the file is read line by line, a line longer than
  the cap (4 MiB, or more for a group whose records may be bigger) is
  rejected unread.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TypeVar

import trio

from cachefs.records.attributes import format_date
from cachefs.records.database import Database
from cachefs.records.errors import GroupError
from cachefs.records.group import Group
from cachefs.records.identity import regular_or_new
from cachefs.records.model import ApplyResult, encode_record, micros

__all__ = ["FORMAT", "ExportCounts", "ImportReport", "export_snapshot", "import_snapshot"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The header's key and the format version it holds.
FORMAT = "cachefs-records-snapshot"
VERSION = 1
MAX_LINE = 4 << 20
_BATCH_BYTES = 8 << 20  # lines handed from the reading thread at once, at most
_EXAMPLES = 5  # rejections described one by one in the report


@dataclass(frozen=True)
class ExportCounts:
    credentials: int
    revocations: int
    records: int  # live records
    tombstones: int  # deleted records, kept so that the deletion replicates


@dataclass
class ImportReport:
    imported: int = 0  # records new to this member, or newer than the version held
    stale: int = 0  # records held already at that version or a newer one, or expired
    rejected: int = 0  # lines refused: malformed, or failing the group's checks
    credentials: int = 0  # credentials and revocations new to this member
    reasons: dict[str, int] = field(default_factory=dict)  # why lines were rejected
    examples: list[str] = field(default_factory=list)  # the first few, "line N: why"

    def reject(self, line: int, reason: str, detail: str = "") -> None:
        self.rejected += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(f"line {line}: {detail or reason}")


# -- export ------------------------------------------------------------------------------


async def export_snapshot(group: Group, path: Path) -> ExportCounts:
    """Write a snapshot of *group*'s database as this member holds it to *path*."""
    path = Path(path)
    db = _database(group)
    now_us = micros(group.records.clock.now())
    header = {
        FORMAT: VERSION,
        "group": group.name,
        "group_id": group.group_id,
        "charter": _b64(group.membership.charter.to_bytes()),
        "exported": format_date(group.records.clock.now()),
        "member": group.identity.member_id,
    }

    def write(out: BinaryIO) -> ExportCounts:
        with db.reading():
            return write_all(out)

    def write_all(out: BinaryIO) -> ExportCounts:
        out.write(_line(header))
        creds = db.blobs("credentials")
        revs = db.blobs("revocations")
        for blob in creds:
            out.write(_line({"kind": "cred", "body": _b64(blob), "sig": ""}))
        for blob in revs:
            out.write(_line({"kind": "revoke", "body": _b64(blob), "sig": ""}))
        live = dead = 0
        for record in db.all_records():
            if micros(record.expires) <= now_us:
                continue
            body = encode_record(group.group_id, dataclasses.replace(record, signature=b""))
            out.write(_line({"kind": "rec", "body": _b64(body), "sig": _b64(record.signature)}))
            if record.deleted:
                dead += 1
            else:
                live += 1
        out.write(_line({"kind": "end", "items": len(creds) + len(revs) + live + dead}))
        return ExportCounts(len(creds), len(revs), live, dead)

    # one read transaction in the store's database thread: one state of the database
    counts = await group.records.db(_write_atomically, path, write)
    log.info("exported group %s to %s: %s", group.name, path, counts)
    return counts


def _write_atomically(path: Path, fill: Callable[[BinaryIO], T]) -> T:
    """*fill* a new 0600 file that replaces *path* once complete and on disk."""
    regular_or_new(path, "the snapshot")
    directory = path.absolute().parent
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600)
    except OSError as e:
        raise GroupError(f"cannot write the snapshot {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as out:
            result = fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise GroupError(f"cannot write the snapshot {path}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return result


# -- import ------------------------------------------------------------------------------


async def import_snapshot(group: Group, path: Path) -> ImportReport:
    """Check and merge the snapshot at *path* into *group*; GroupError if the file
    is not a snapshot of this group, else a report of what each line became."""
    path = Path(path)
    cap = max(MAX_LINE, (group.membership.charter.max_record_size // 3 + 2) * 4 + 4096)
    reader = await trio.to_thread.run_sync(_LineReader.open, path, cap)
    records: list[tuple[int, bytes, bytes]] = []
    # credentials (revocations) whose issuer comes later in the file: tried again at the end
    later: list[tuple[int, str, bytes]] = []
    try:
        report = ImportReport()
        first = await trio.to_thread.run_sync(reader.batch, 1)
        _check_header(group, path, first[0][1] if first else b"")
        ended = False
        while batch := await trio.to_thread.run_sync(reader.batch, _BATCH_BYTES):
            for number, line in batch:
                if ended:
                    report.reject(number, "a line after the end line")
                    continue
                item = _parse_item(line, report, number)
                if item is None:
                    continue
                if isinstance(item, int):  # the end line: lines 2 .. number-1 were items
                    ended = True
                    if item != number - 2:
                        report.reject(
                            number,
                            "the end line counts other items than the file has",
                            f"the end line counts {item} items, the file has {number - 2}",
                        )
                    continue
                kind, body, sig = item
                if kind == "rec":
                    records.append((number, body, sig))
                elif not await _apply_blob(group, report, kind, body):
                    later.append((number, kind, body))
            await _apply_records(group, report, records)
            records = []
        while later:
            left = [item for item in later if not await _apply_blob(group, report, *item[1:])]
            if len(left) == len(later):
                break
            later = left
        for number, kind, _ in later:
            what = "credential" if kind == "cred" else "revocation"
            report.reject(number, f"a {what} that does not verify")
        if not ended:
            report.reject(
                reader.lines + 1,
                "cut short: no end line",
                "the file ends without its end line: it was cut short",
            )
    finally:
        await trio.to_thread.run_sync(reader.close)
    log.info("imported %s into group %s: %s", path, group.name, report)
    return report


def _check_header(group: Group, path: Path, line: bytes | None) -> None:
    try:
        header = json.loads(line) if line else None
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or FORMAT not in header:
        raise GroupError(f"{path} is not a cachefs records snapshot (cachefs records export)")
    if header[FORMAT] != VERSION:
        raise GroupError(
            f"{path} is a snapshot in format {header[FORMAT]!r:.20}; this "
            f"cachefs reads format {VERSION}"
        )
    theirs = str(header.get("group_id"))[:40]
    if theirs != group.group_id:
        name = str(header.get("group"))[:64]
        raise GroupError(
            f"{path} is a snapshot of group {name} ({theirs}), not of group "
            f"{group.name} ({group.group_id}): import it into a member of {name}"
        )
    try:
        charter = base64.b64decode(str(header.get("charter")), validate=True)
    except (binascii.Error, ValueError):
        charter = b""
    if charter != group.membership.charter.to_bytes():
        raise GroupError(
            f"{path} names group {group.group_id} but carries another charter: "
            "it is damaged or forged"
        )


def _parse_item(
    line: bytes | None, report: ImportReport, number: int
) -> tuple[str, bytes, bytes] | int | None:
    """(kind, body, signature) of an item line, the count of the end line, or None
    (rejected and counted)."""
    if line is None:
        report.reject(number, "a line over the length limit")
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        report.reject(number, "not JSON")
        return None
    if not isinstance(obj, dict):
        report.reject(number, "not an item")
        return None
    kind = obj.get("kind")
    if kind == "end" and type(obj.get("items")) is int:
        return int(obj["items"])
    if kind not in ("cred", "revoke", "rec"):
        report.reject(number, "an unknown kind of item", f"unknown kind {str(kind)[:20]!r}")
        return None
    try:
        body = base64.b64decode(str(obj.get("body")), validate=True)
        sig = base64.b64decode(str(obj.get("sig", "")), validate=True)
    except (binascii.Error, ValueError):
        report.reject(number, "not base64")
        return None
    return str(kind), body, sig


async def _apply_records(
    group: Group, report: ImportReport, records: list[tuple[int, bytes, bytes]]
) -> None:
    """Check and merge a batch of record lines, queueing what was new for the engine."""
    if not records:
        return
    outcomes = await group.records.arrivals.apply_records(
        [(body, sig) for _, body, sig in records], publish=True
    )
    for (number, _, _), outcome in zip(records, outcomes, strict=True):
        if outcome.result is ApplyResult.APPLIED:
            report.imported += 1
        elif outcome.result is ApplyResult.STALE:
            report.stale += 1
        else:
            report.reject(number, outcome.reason, outcome.detail)


async def _apply_blob(group: Group, report: ImportReport, kind: str, body: bytes) -> bool:
    """Apply a credential or revocation; False if it was refused (for now)."""
    if kind == "cred":
        result = await group.records.arrivals.apply_credential(body, publish=True)
    else:
        result = await group.records.arrivals.apply_revocation(body, publish=True)
    if result is ApplyResult.APPLIED:
        report.credentials += 1
    return result is not ApplyResult.REJECTED


class _LineReader:
    """Lines of a file with their numbers, each at most *cap* bytes (a longer one
    comes as None, skipped unread); used from one thread at a time."""

    def __init__(self, f: BinaryIO, cap: int) -> None:
        self._f = f
        self._cap = cap
        self.lines = 0

    @classmethod
    def open(cls, path: Path, cap: int) -> _LineReader:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise GroupError(f"cannot read the snapshot {path}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise GroupError(f"{path} is not a regular file: give the snapshot file itself")
        os.set_blocking(fd, True)
        return cls(os.fdopen(fd, "rb"), cap)

    def batch(self, max_bytes: int) -> list[tuple[int, bytes | None]]:
        out: list[tuple[int, bytes | None]] = []
        size = 0
        try:
            while size < max_bytes:
                line = self._f.readline(self._cap + 1)
                if not line:
                    break
                self.lines += 1
                if len(line) > self._cap and not line.endswith(b"\n"):
                    while (rest := self._f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                    out.append((self.lines, None))
                    continue
                out.append((self.lines, line))
                size += len(line)
        except OSError as e:
            raise GroupError(f"cannot read the snapshot: {e.strerror}") from None
        return out

    def close(self) -> None:
        self._f.close()


def _line(obj: dict[str, object]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _database(group: Group) -> Database:
    # every record held, tombstones included: read through group.records.db, its thread
    return group.database
