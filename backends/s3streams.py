"""The streams of continuous transfers, kept in an S3 file's context.

A continuous transfer's first call opens one GET to the end of the file;
later calls that start where the stream stands read on from it, so a
sequential reader pays one request, not one per call.  A stream is taken out
of the context while a call reads from it (no two threads share one), and is
not given back when another call has already started at or past where it
stands (readahead fetched that range with ranged GETs), when a CANCELED call
came meanwhile, or when the file already keeps ``MAX_STREAMS``.
"""

from __future__ import annotations

import threading
from typing import Any

# Streams one file keeps open at most (the readers of a file share its context).
MAX_STREAMS = 2
# Bytes obstore gathers before handing over a chunk of a stream.
STREAM_CHUNK = 256 << 10


class Stream:
    """One open GET of a file version, read on by consecutive calls."""

    __slots__ = ("version", "position", "generation", "_chunks", "_pending")

    def __init__(self, result: Any, position: int, version: str, generation: int) -> None:
        self.version = version
        self.position = position
        self.generation = generation
        self._chunks: Any = result.stream(min_chunk_size=STREAM_CHUNK)
        self._pending = memoryview(b"")

    def read_into(self, buffer: memoryview) -> int:
        """Fill *buffer*; fewer bytes only at the end.  Raises what broke the stream."""
        done, want = 0, len(buffer)
        while done < want:
            if not self._pending:
                try:
                    self._pending = memoryview(next(self._chunks))
                except StopIteration:
                    break
            n = min(len(self._pending), want - done)
            buffer[done : done + n] = self._pending[:n]
            self._pending = self._pending[n:]
            done += n
        self.position += done
        return done

    def close(self) -> None:
        self._chunks = None  # dropping the response closes its connection
        self._pending = memoryview(b"")


class S3File:
    """The file_context of an open file: the streams its transfers keep open.

    A stream is taken out while a call reads from it, so no two threads share
    one.  CANCELED starts a new generation: streams taken before are dropped
    when they come back.
    """

    __slots__ = ("key", "_streams", "_lock", "_latest", "_generation", "__weakref__")

    def __init__(self, key: str) -> None:
        self.key = key
        self._streams: list[Stream] = []
        self._lock = threading.Lock()
        self._latest = -1
        self._generation = 0

    def take(self, position: int, version: str) -> tuple[Stream | None, int]:
        """The stream standing at *position*, if any, and the current generation."""
        with self._lock:
            self._latest = max(self._latest, position)
            for i, s in enumerate(self._streams):
                if s.position == position and s.version == version:
                    return self._streams.pop(i), self._generation
            return None, self._generation

    def keep(self, stream: Stream) -> None:
        """Give *stream* back, unless it is stale or another call fetched past it."""
        with self._lock:
            if stream.generation == self._generation and self._latest < stream.position:
                self._streams.append(stream)
                if len(self._streams) <= MAX_STREAMS:
                    return
                stream = self._streams.pop(0)
        stream.close()

    def open_streams(self) -> int:
        return len(self._streams)

    def close(self) -> None:
        with self._lock:
            streams, self._streams = self._streams, []
            self._generation += 1
            self._latest = -1
        for s in streams:
            s.close()
