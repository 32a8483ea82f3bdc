"""Transfers: runs of ReadData calls on one file, and the flags they carry.

Policy (documented in docs/contract.md, "Flags"):

* A reader whose read starts at offset 0, or where its previous read ended,
  is sequential: its misses belong to one *continuous* transfer that is
  expected to run to the end of the file (TIL_END).  The first call is
  CONTINUOUS_STARTED, or CONTINUOUS_RESTARTED when the run starts at
  position 0 of a file that had a continuous transfer before.
* Any other read is *random*: the missing blocks of that one read form a
  transfer; TIL_END only if they reach the file's last block.
* Calls after the first carry IN_PROGRESS; a call whose range reaches the
  transfer's last block carries *_FINISHED.
* A transfer that made calls and ends without a FINISHED call (the reader
  closed, seeked away, failed, or the mount stops) gets one more call:
  CANCELED with bytes_to_read 0.
"""

from __future__ import annotations

import enum
from typing import Protocol

from cachefs.contract import RWEvent
from cachefs.engine.state.index import CachedFile


class Kind(enum.Enum):
    CONTINUOUS = "continuous"
    RANDOM = "random"
    WHOLE = "whole"


class Transfer:
    __slots__ = (
        "kind",
        "restarted",
        "last_block",
        "file_last_block",
        "calls",
        "finished",
        "position",
    )

    def __init__(
        self, kind: Kind, last_block: int, file_last_block: int, restarted: bool = False
    ) -> None:
        self.kind = kind
        self.restarted = restarted
        self.last_block = last_block
        self.file_last_block = file_last_block
        self.calls = 0
        self.finished = False
        self.position = 0

    @property
    def open(self) -> bool:
        """True when the backend has seen calls but not the end of this transfer."""
        return self.calls > 0 and not self.finished

    def flags_for(self, last_block_of_call: int) -> RWEvent:
        """Flags of the next call, which fetches up to *last_block_of_call*."""
        random = self.kind is Kind.RANDOM
        if self.calls == 0:
            if random:
                flags = RWEvent.RANDOM_STARTED
            elif self.restarted:
                flags = RWEvent.CONTINUOUS_RESTARTED
            else:
                flags = RWEvent.CONTINUOUS_STARTED
        else:
            flags = RWEvent.IN_PROGRESS
        if last_block_of_call >= self.last_block:
            flags |= RWEvent.RANDOM_FINISHED if random else RWEvent.CONTINUOUS_FINISHED
            self.finished = True
        if self.kind is Kind.WHOLE:
            flags |= RWEvent.WHOLE_FILE
        flags |= RWEvent.TIL_END if self.last_block >= self.file_last_block else RWEvent.BEFORE_END
        self.calls += 1
        return flags

    def cancel_flags(self) -> RWEvent:
        flags = RWEvent.CANCELED
        if self.kind is Kind.WHOLE:
            flags |= RWEvent.WHOLE_FILE
        return flags


class Ahead(Protocol):
    """A run's readahead (miss/readahead.py), as the reader's state sees it."""

    def extend(self, cf: CachedFile, end: int) -> None: ...

    async def stop(self) -> None: ...


#: What a run left behind when it ended: its transfer and its readahead.
Ended = tuple["Transfer | None", "Ahead | None"]


class ReaderState:
    """Sequential detection for one open handle, and its current run."""

    __slots__ = ("next_pos", "run_start", "run_reads", "continuous", "readahead")

    def __init__(self) -> None:
        self.next_pos: int | None = None
        self.run_start = 0
        self.run_reads = 0
        self.continuous: Transfer | None = None
        self.readahead: Ahead | None = None

    def observe(self, offset: int, end: int) -> tuple[bool, Ended | None]:
        """Record a read of [offset, end).

        Returns whether it is sequential, and the (transfer, readahead) of a
        run it ended: a read at 0 starts a new run, a read elsewhere than
        where the last one stopped is random and ends the run too.
        """
        sequential = offset == self.next_pos or offset == 0
        new_run = offset != self.next_pos
        self.next_pos = end
        if sequential and not new_run:
            self.run_reads += 1
            return True, None
        self.run_start, self.run_reads = offset, 1
        return sequential, self.detach()

    def detach(self) -> Ended | None:
        """Take the current run's transfer and readahead away, if any."""
        old = (self.continuous, self.readahead)
        self.continuous = None
        self.readahead = None
        return old if old != (None, None) else None
