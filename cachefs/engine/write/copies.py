"""Working copies: the files being changed, kept whole in the cache dir until flushed.

Policy:

* A file being changed has one working copy: ``dirty/N.data`` holds the
  file's whole content (its size is the file's size, its mtime the file's),
  ``dirty/N.meta`` a header (JSON in the first HEADER bytes: the file's id,
  the version it was made from, its mode, what the flush must know) and
  one byte per PAGE of the file, 1 where the page changed since the last
  flush.  A copy of an existing file is made whole from the version the
  cache serves before its first change is taken ("filling" until then), so
  a flush, and a conflict copy, never lacks a byte.
* A change reaches the data file first, then the page map, then the
  caller is answered: a daemon killed after the answer loses nothing (the
  kernel holds both writes), one killed before loses only the unanswered
  change (its pages still read as unchanged: a random flush skips them,
  a whole flush sends what the data file holds).  ``sync`` makes both
  durable, data first, for fsync and before a flush.
* A copy that was still filling when the daemon died is dropped at the
  next start: nothing was written to it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

from cachefs._linux import fileio
from cachefs._linux.fileio import pread_into
from cachefs.contract import FileAttrs, FileKind

log = logging.getLogger(__name__)

#: The unit of change tracking: a write marks the pages it touches.
PAGE = 4096
#: The header's room at the start of the meta file; the page map follows it.
HEADER = 8192
FORMAT = "cachefs-working-copy/1"
#: Writes up to this size are done on the event loop (a page-cache copy);
#: larger ones in a worker thread.
INLINE_IO = 64 << 10
#: Writes from this size on allocate their range first (fileio.pwrite_all).
ALLOCATE_FROM = 64 << 10


def pages_of(size: int) -> int:
    return -(-size // PAGE)


@dataclass(slots=True)
class Header:
    """What the meta file says of a working copy, beyond its page map."""

    file_id: str
    #: The version the copy was made from ("" for a file that did not exist).
    base_version: str
    #: The size the source holds at base_version.
    base_size: int
    mode: int | None
    #: The smallest size the file had since the last flush (a random flush
    #: cuts the source there first, so the gap reads as zeros).
    cut: int
    filling: bool = False
    #: FILE_FAILURE of a flush: the copy stays until the latch is reset.
    error: str | None = None
    #: Changed since the last flush (data, size or a new file).
    changed: bool = False
    #: A flush began changing the source and has not ended well: the source
    #: may be at a version of the flush's own making (see write/flusher.py).
    flushing: bool = False

    def encode(self) -> bytes:
        raw = json.dumps(
            {
                "format": FORMAT,
                "file_id": self.file_id,
                "base_version": self.base_version,
                "base_size": self.base_size,
                "mode": self.mode,
                "cut": self.cut,
                "filling": self.filling,
                "error": self.error,
                "changed": self.changed,
                "flushing": self.flushing,
            },
            ensure_ascii=True,
        ).encode()
        if len(raw) > HEADER:
            raise OSError(errno.ENAMETOOLONG, "file name too long for a working copy")
        return raw.ljust(HEADER, b" ")

    @classmethod
    def decode(cls, raw: bytes) -> Header:
        """ValueError when it is not a header this version wrote."""
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a working copy header")
        mode = data["mode"]
        error = data["error"]
        header = cls(
            file_id=str(data["file_id"]),
            base_version=str(data["base_version"]),
            base_size=int(data["base_size"]),
            mode=None if mode is None else int(mode),
            cut=int(data["cut"]),
            filling=bool(data["filling"]),
            error=None if error is None else str(error),
            changed=bool(data["changed"]),
            flushing=bool(data.get("flushing", False)),
        )
        return header


class WorkingCopy:
    """One file being changed (see the module docstring).

    ``lock`` is held by every change and by a flush: a flush sends one
    state of the file, never a mix.  ``generation`` counts changes, so a
    flush knows whether the file changed while it ran.
    """

    def __init__(self, number: int, path: Path, header: Header, size: int, mtime: float) -> None:
        self.number = number
        self.path = path  # without suffix: N.data and N.meta beside it
        self.header = header
        self.size = size
        self.mtime = mtime
        self.pages = bytearray(pages_of(size))
        self.changed_pages = 0
        self.fd = -1
        self.meta_fd = -1
        self.lock = trio.Lock()
        self.generation = 0
        self.handles = 0
        self.writers = 0
        #: When the background flusher should flush it (trio clock), if at all.
        self.due: float | None = None
        self.retry_delay = 0.0
        #: Flush it when due even while it is open for writing (max-dirty).
        self.urgent = False
        self.flushing = False
        self.dropped = False
        #: Its directory entries were synced: later syncs need only sync the files.
        self.synced_dir = False

    @property
    def file_id(self) -> str:
        return self.header.file_id

    @property
    def version(self) -> str:
        """The version the mount shows for the file while it has this copy."""
        return f"local:{self.number}"

    @property
    def attrs(self) -> FileAttrs:
        return FileAttrs(FileKind.FILE, self.size, self.mtime, self.version, self.header.mode)

    @property
    def dirty(self) -> bool:
        return self.header.changed

    @property
    def dirty_bytes(self) -> int:
        return self.changed_pages * PAGE

    @property
    def disk_bytes(self) -> int:
        """About what it takes on the cache disk: what was filled from the
        version it was made from, and the pages written since (a file
        extended by truncate is holes, not bytes)."""
        h = self.header
        return min(self.size, min(h.base_size, h.cut) + self.changed_pages * PAGE)

    # -- files ---------------------------------------------------------------------

    def open_files(self, create: bool) -> None:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(f"{self.path}.data", flags, 0o600)
        try:
            self.meta_fd = os.open(f"{self.path}.meta", flags, 0o600)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def close_files(self) -> None:
        """Close the fds once (a second call does nothing)."""
        fds, self.fd, self.meta_fd = (self.fd, self.meta_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def remove_files(self) -> None:
        self.close_files()
        for suffix in (".meta", ".data"):  # the meta file first: no copy without it
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    def write_header(self) -> None:
        fileio.pwrite_all(self.meta_fd, memoryview(self.header.encode()), 0, allocate=False)

    # -- changes (blocking; the caller picks the thread) ----------------------------

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Store *data* at *offset*, then mark its pages (the file grows as needed)."""
        fileio.pwrite_all(self.fd, memoryview(data), offset, len(data) >= ALLOCATE_FROM)
        end = offset + len(data)
        if end > self.size:
            self._resize_map(end)
            self.size = end
        self._mark(offset // PAGE, pages_of(end))

    def fill_at(self, offset: int, data: bytes | memoryview) -> None:
        """Store bytes of the version the copy is made from (nothing changed)."""
        fileio.pwrite_all(self.fd, memoryview(data), offset)
        end = offset + len(data)
        if end > self.size:
            self._resize_map(end)
            self.size = end

    def truncate(self, size: int) -> None:
        """Cut or extend the file to *size* (an extension reads as zeros)."""
        os.ftruncate(self.fd, size)
        self.size = size
        if size < self.header.cut:
            self.header.cut = size
            self.write_header()
        # No page is marked: a random flush cuts the source where the file was
        # cut and sizes it (zeros, as here); a whole flush sends it all anyway.
        # So a file extended to 64 GiB is no 64 GiB of changes.
        self._resize_map(size)

    def _resize_map(self, size: int) -> None:
        n = pages_of(size)
        if n < len(self.pages):
            self.changed_pages -= self.pages.count(1, n)
            del self.pages[n:]
            os.ftruncate(self.meta_fd, HEADER + n)
        elif n > len(self.pages):
            self.pages.extend(bytes(n - len(self.pages)))

    def _mark(self, first: int, stop: int) -> None:
        pages = self.pages
        if pages.find(0, first, stop) < 0:
            return
        fresh = stop - first - pages.count(1, first, stop)
        pages[first:stop] = b"\x01" * (stop - first)
        self.changed_pages += fresh
        fileio.pwrite_all(
            self.meta_fd, memoryview(pages)[first:stop], HEADER + first, allocate=False
        )

    def read_at(self, offset: int, length: int) -> bytearray:
        out = bytearray(max(0, min(length, self.size - offset)))
        if out:
            got = pread_into(self.fd, memoryview(out), offset)
            del out[got:]
        return out

    def sync(self) -> None:
        """Make what was written durable: the data file, then the page map and header."""
        os.fdatasync(self.fd)
        os.fdatasync(self.meta_fd)

    def changed_runs(self, limit: int) -> Iterator[tuple[int, int]]:
        """(offset, length) runs of changed pages within the file, each at most *limit*."""
        pages, size = self.pages, self.size
        at = pages.find(1)
        while at >= 0:
            stop = pages.find(0, at)
            if stop < 0:
                stop = len(pages)
            start, end = at * PAGE, min(stop * PAGE, size)
            while start < end:
                n = min(limit, end - start)
                yield start, n
                start += n
            at = pages.find(1, stop)

    def mark_flushed(self) -> None:
        """The source holds the file as it is now: nothing is changed."""
        self.pages[:] = bytes(len(self.pages))
        self.changed_pages = 0
        os.ftruncate(self.meta_fd, HEADER)
        os.ftruncate(self.meta_fd, HEADER + len(self.pages))
        self.header.changed = False
        self.header.flushing = False
        self.header.cut = self.size
        self.header.base_size = self.size
        self.write_header()


class CopyStore:
    """The working copies of one cache dir, by file id."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.copies: dict[str, WorkingCopy] = {}
        self._next = 1

    def open(self) -> list[WorkingCopy]:
        """Create the directory or load the copies a previous mount left
        (those still filling are dropped); returns the loaded ones.  Blocking."""
        self.directory.mkdir(mode=0o700, exist_ok=True)
        loaded: list[WorkingCopy] = []
        numbers = []
        for meta in self.directory.glob("*.meta"):
            try:
                numbers.append(int(meta.stem))
            except ValueError:
                continue
        for n in sorted(numbers):
            self._next = max(self._next, n + 1)
            wc = self._load(n)
            if wc is not None:
                loaded.append(wc)
                self.copies[wc.file_id] = wc
        # Data files without their meta file: a copy being made or removed.
        for data in self.directory.glob("*.data"):
            if not data.with_suffix(".meta").exists():
                data.unlink(missing_ok=True)
        return loaded

    def _load(self, n: int) -> WorkingCopy | None:
        path = self.directory / str(n)
        try:
            with open(f"{path}.meta", "rb") as f:
                raw = f.read()
            header = Header.decode(raw[:HEADER])
            st = os.stat(f"{path}.data")
        except (OSError, ValueError) as e:
            log.error("working copy %s cannot be read (%s): left as it is", path, e)
            return None
        if header.filling:  # nothing was written to it: made again when needed
            WorkingCopy(n, path, header, 0, 0.0).remove_files()
            return None
        other = self.copies.get(header.file_id)
        if other is not None:
            # Two copies of one file: a clean one whose removal a crash cut
            # short, and a newer one; the changed one wins, else the newer.
            if other.dirty or not header.changed:
                log.warning("working copy %s duplicates %s: removed", path, other.path)
                WorkingCopy(n, path, header, 0, 0.0).remove_files()
                return None
            log.warning("working copy %s duplicates %s: that one removed", path, other.path)
            other.remove_files()
        wc = WorkingCopy(n, path, header, st.st_size, st.st_mtime)
        marks = raw[HEADER : HEADER + len(wc.pages)]
        wc.pages[: len(marks)] = marks
        wc.pages[:] = bytes(1 if m else 0 for m in wc.pages)
        wc.changed_pages = wc.pages.count(1)
        # A cut that reached the data file but not the header.
        wc.header.cut = min(wc.header.cut, wc.size)
        wc.open_files(create=False)
        return wc

    def make(
        self, file_id: str, base_version: str, base_size: int, mode: int | None
    ) -> WorkingCopy:
        """A new, empty copy (filling: the caller fills it, then calls ``ready``).  Blocking."""
        n = self._next
        self._next += 1
        header = Header(file_id, base_version, base_size, mode, cut=base_size, filling=True)
        wc = WorkingCopy(n, self.directory / str(n), header, 0, time.time())
        wc.open_files(create=True)
        try:
            wc.write_header()
        except BaseException:
            wc.remove_files()
            raise
        return wc

    def ready(self, wc: WorkingCopy) -> None:
        """*wc* is filled: it counts from now on (a restart keeps it).  Blocking."""
        wc.header.filling = False
        wc.write_header()
        self.copies[wc.file_id] = wc

    def drop(self, wc: WorkingCopy) -> None:
        """Remove *wc* (flushed, or its file removed).  Blocking."""
        if self.copies.get(wc.file_id) is wc:
            del self.copies[wc.file_id]
        wc.dropped = True
        wc.remove_files()

    def move(self, wc: WorkingCopy, new_id: str) -> None:
        """*wc* is the copy of *new_id* from now on.  Blocking."""
        if self.copies.get(wc.file_id) is wc:
            del self.copies[wc.file_id]
        wc.header.file_id = new_id
        wc.write_header()
        self.copies[new_id] = wc

    def sync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
