"""Readers against a source that keeps changing: the model of a randomized test.

A :class:`Churn` holds a few files in a local source directory and records
every version each file has had.  :meth:`Churn.mutate` changes one file the
ways users do, recording each state the file passes through: a few pages
rewritten in place (one ``pwrite`` per page, each an atomic state for a
reader of the file), a truncation (shorter or longer), a replace by rename,
a deletion.  :func:`read_once` opens a file through the mount and reads it
as a program would (sequentially with buffered reads, or at random aligned
offsets with O_DIRECT), noting a digest of every page it got, where it saw
the end of the file, and the error that ended it, if any.

:meth:`Churn.explain` then says whether one reading is consistent: every
page equals that page of one single version the file had, and a clean end
of file lies at that version's length.  An error (ESTALE, EIO) may end a
reading anywhere; a mix of versions, or an end of file at a length the
version did not have, never.  Pages are kept as digests, so a long run
holds little memory.  :func:`run_churn` runs readers and changes together
and checks every reading.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conftest import Mount

PAGE = 4096
#: What a reading may end with: its version is gone (ESTALE; EIO too through
#: the page cache, never with O_DIRECT), the file is gone (ENOENT at open).
ALLOWED_ERRORS = frozenset({errno.ESTALE, errno.EIO, errno.ENOENT})
#: And what a reading of a mount whose daemon was killed may end with.
DEAD_MOUNT = frozenset({errno.ENOTCONN, errno.ECONNABORTED})


def digest(page: bytes) -> int:
    """A 64-bit digest of *page* (SipHash, keyed per process: compared only
    within this one).  Not blake2b: that releases the GIL for every page,
    and four threads digesting pages then spend more time handing the GIL
    over than reading through the mount."""
    return hash(page)


@dataclass(frozen=True)
class Version:
    size: int
    pages: tuple[int, ...]  # digests, the last page possibly short
    made_by: int  # the mutation that made it (0: before the first)


@dataclass
class Reading:
    """What one open handle got; ``after``: mutations begun when it ended."""

    name: str
    how: str
    pages: dict[int, int] = field(default_factory=dict)  # page index -> digest
    eof: int | None = None
    error: OSError | None = None
    after: int = 0


class Churn:
    def __init__(self, root: Path, names: list[str], rnd: random.Random, max_size: int) -> None:
        self.root = root
        self.rnd = rnd
        self.max_size = max_size
        self.history: dict[str, list[Version]] = {name: [] for name in names}
        # Mutations begun and recorded: a reading that ended after k had
        # begun can only have seen states that mutations up to k made.
        self.begun = self.mutations = 0
        self._pages: dict[str, list[int]] = {}
        for name in names:
            self._replace(name)

    # -- changing the source ----------------------------------------------------

    def _random_bytes(self, n: int) -> bytes:
        return self.rnd.randbytes(n)

    def _record(self, name: str, data: bytes, changed: range | None = None) -> None:
        """*name* now holds *data*; only the pages *changed* differ from its
        last state, if given (the others' digests are shared with it)."""
        pages = self._pages.get(name)
        if changed is None or pages is None:
            pages = [digest(data[at : at + PAGE]) for at in range(0, len(data), PAGE)]
        else:
            for i in changed:
                pages[i] = digest(data[i * PAGE : (i + 1) * PAGE])
        self._pages[name] = pages
        self.history[name].append(Version(len(data), tuple(pages), self.begun))

    def _replace(self, name: str) -> None:
        data = self._random_bytes(self.rnd.randrange(0, self.max_size))
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)
        self._record(name, data)

    def mutate(self) -> str:
        """Change one file at random; what was done."""
        self.begun += 1
        try:
            return self._mutate()
        finally:
            self.mutations += 1

    def _mutate(self) -> str:
        name = self.rnd.choice(sorted(self.history))
        path = self.root / name
        action = self.rnd.choice(["rewrite", "rewrite", "truncate", "replace", "delete"])
        if not path.exists():
            action = "replace"
        if action == "replace":
            self._replace(name)
        elif action == "delete":
            path.unlink()
        elif action == "truncate":
            data = path.read_bytes()
            size = self.rnd.randrange(0, self.max_size)
            os.truncate(path, size)
            self._record(name, data[:size] + bytes(max(0, size - len(data))))
        else:
            buf = bytearray(path.read_bytes())
            if not buf:
                return self._mutate()
            count = -(-len(buf) // PAGE)
            first = self.rnd.randrange(0, count)
            fd = os.open(path, os.O_WRONLY)
            try:
                for page in range(first, min(first + self.rnd.randint(1, 4), count)):
                    at = page * PAGE
                    new = self._random_bytes(min(PAGE, len(buf) - at))
                    os.pwrite(fd, new, at)  # one page: readers see it whole or not at all
                    buf[at : at + len(new)] = new
                    self._record(name, bytes(buf), range(page, page + 1))
            finally:
                os.close(fd)
        return action

    # -- checking ---------------------------------------------------------------

    def explain(self, reading: Reading, allowed: frozenset[int] = ALLOWED_ERRORS) -> str | None:
        """None if *reading* is of one version; otherwise what is wrong."""
        allowed = allowed if reading.how != "direct" else allowed - {errno.EIO}
        if reading.error is not None and reading.error.errno not in allowed:
            return f"{reading.name} read {reading.how}: unexpected error {reading.error!r}"
        for version in reversed(self.history[reading.name]):
            if version.made_by > reading.after:  # made after the reading ended
                continue
            if reading.eof is not None and reading.eof != version.size:
                continue
            pages = version.pages
            if all(i < len(pages) and pages[i] == d for i, d in reading.pages.items()):
                return None
        return (
            f"{reading.name} read {reading.how}: {len(reading.pages)} pages, end of file at"
            f" {reading.eof}, error {reading.error!r}: no single version of its"
            f" {len(self.history[reading.name])} has all of them; {self._closest(reading)}"
        )

    def _closest(self, reading: Reading) -> str:
        """Which versions each page read belongs to (for the failure message)."""
        history = self.history[reading.name]
        where = {
            i: [n for n, v in enumerate(history) if i < len(v.pages) and v.pages[i] == d][-3:]
            for i, d in sorted(reading.pages.items())
        }
        sizes = [n for n, v in enumerate(history) if v.size == reading.eof][-3:]
        return f"versions holding each page {where}; versions of that size {sizes}"


#: How long a run may take to reach its counts before the test fails.
CHURN_DEADLINE = 600.0


def run_churn(
    m: Mount, churn: Churn, mutations: int, readers: int = 3, kill: bool = False
) -> tuple[int, int, int]:
    """Readers read while one thread changes the source, a change for every
    few readings, until *mutations* changes were made, a file was read
    whole at least as many times, and at least one reading met a change
    (ended in an error): counts, not a clock, end it (CHURN_DEADLINE fails
    it).  With *kill*, the daemon is killed (kill -9) then, while they
    still read.  Each reading is checked once every state it may have seen
    is recorded.  Returns how many readings there were, how many read a
    file whole, and how many ended in an error; fails the test if one is
    not of one version."""
    readings: list[Reading] = []
    done = threading.Condition()
    stopped = threading.Event()
    allowed = ALLOWED_ERRORS | (DEAD_MOUNT if kill else frozenset())
    failures: list[BaseException] = []
    wrong: list[str] = []
    counts = [0, 0, 0]

    def check(upto: int) -> None:
        """Check the readings that ended before mutation *upto* began."""
        with done:
            ready = [r for r in readings if r.after <= upto]
            readings[:] = [r for r in readings if r.after > upto]
        for r in ready:
            counts[0] += 1
            counts[1] += r.eof is not None and r.error is None
            counts[2] += r.error is not None
            why = churn.explain(r, allowed)
            if why is not None:
                wrong.append(why)
        with done:
            done.notify_all()

    target = churn.mutations + mutations

    def enough() -> bool:
        return churn.mutations >= target and counts[1] >= mutations and counts[2] > 0

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            while not stopped.is_set():
                got = read_once(churn, m.mountpoint, rnd)
                with done:
                    readings.append(got)
                    done.notify_all()
        except BaseException as e:
            failures.append(e)
            raise

    def mutator() -> None:
        try:
            while not stopped.is_set():
                with done:  # a change every few readings: paced by the readers, not a clock
                    until = len(readings) + 3
                    done.wait_for(lambda: len(readings) >= until or stopped.is_set())  # noqa: B023
                churn.mutate()
                check(churn.mutations)
        except BaseException as e:
            failures.append(e)
            raise

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    threads.append(threading.Thread(target=mutator))
    for t in threads:
        t.start()
    try:
        with done:
            reached = done.wait_for(lambda: enough() or bool(failures), timeout=CHURN_DEADLINE)
        if kill:
            m.kill()  # readers meet a dead mount: ENOTCONN, ECONNABORTED
    finally:
        stopped.set()
        with done:
            done.notify_all()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a reader hung"
    assert not failures, failures
    check(churn.mutations)
    assert wrong == [], wrong[:5]
    assert reached, f"not {mutations} changes and whole readings in {CHURN_DEADLINE:g} s: {counts}"
    if not kill:
        assert "Traceback" not in m.log_text()
    return counts[0], counts[1], counts[2]


def read_once(churn: Churn, mountpoint: Path, rnd: random.Random) -> Reading:
    """Open one of *churn*'s files through the mount and read it one way or another."""
    reading = Reading(
        rnd.choice(sorted(churn.history)), rnd.choice(["sequential"] * 2 + ["direct"])
    )
    try:
        _read(reading, mountpoint, rnd, churn.max_size)
    finally:
        reading.after = churn.begun
    return reading


def _read(reading: Reading, mountpoint: Path, rnd: random.Random, max_size: int) -> None:
    how = reading.how
    try:
        fd = os.open(
            mountpoint / reading.name, os.O_RDONLY | (os.O_DIRECT if how == "direct" else 0)
        )
    except OSError as e:
        reading.error = e
        return
    try:
        if how == "sequential":
            offset = 0
            # A short read is not the end (the page cache returns what it
            # read before a failed page): an empty one is.
            while data := os.read(fd, rnd.choice([PAGE, 16 * PAGE, 64 * PAGE])):
                _note(reading, offset, data)
                offset += len(data)
            reading.eof = offset
        else:
            for _ in range(rnd.randint(1, 8)):
                offset = rnd.randrange(0, max_size // PAGE + 1) * PAGE
                want = rnd.choice([PAGE, 16 * PAGE])
                data = os.pread(fd, want, offset)
                _note(reading, offset, data)
                if len(data) < want:
                    if data or offset == 0:
                        reading.eof = offset + len(data)
                    break
    except OSError as e:
        reading.error = e
    finally:
        try:
            os.close(fd)
        except OSError:  # the mount died meanwhile
            pass


def _note(reading: Reading, offset: int, data: bytes) -> None:
    for at in range(0, len(data), PAGE):
        reading.pages[(offset + at) // PAGE] = digest(data[at : at + PAGE])
