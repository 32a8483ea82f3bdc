"""A wrapper that records every ReadData call as one JSON line.

Each line is written when the call completes and flushed at once, so a
trace can be read while the mount runs::

    {"file_id": "a.bin", "size": 4194304, "position": 0, "bytes_to_read": 1048576,
     "flags": ["CONTINUOUS_STARTED", "TIL_END"], "result": "SUCCESS",
     "bytes_read": 1048576}

CANCELED notifications are recorded like any call.  If the wrapped backend
raises, the line says ``"result": "EXCEPTION"`` and the exception goes on.
The lines are written on the trio loop (a small buffered write): this
wrapper is for tests and diagnosis, not for production mounts.  Everything
but ``read_data`` is passed through unrecorded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from backends.wrapper import Wrapper
from cachefs.contract import Backend, ReadData, RWResult, flag_names

log = logging.getLogger(__name__)


def read_trace(path: str | Path) -> list[dict[str, Any]]:
    """The records of a trace file, oldest first."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class TraceBackend(Wrapper):
    """Wrap *inner*, appending one line per ReadData call to *trace_path*."""

    def __init__(self, inner: Backend, trace_path: str | Path) -> None:
        super().__init__(inner)
        self.trace_path = Path(trace_path)
        self._out = open(self.trace_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def __repr__(self) -> str:
        return f"TraceBackend({self.inner!r}, {str(self.trace_path)!r})"

    def _write(self, req: ReadData, result: str) -> None:
        record = {
            "file_id": req.file_id,
            "size": req.size,
            "position": req.position,
            "bytes_to_read": req.bytes_to_read,
            "flags": flag_names(req.flags),
            "result": result,
            "bytes_read": req.bytes_read,
        }
        self._out.write(json.dumps(record) + "\n")

    async def read_data(self, req: ReadData) -> None:
        try:
            await self.inner.read_data(req)
        except BaseException:
            self._write(req, "EXCEPTION")
            raise
        try:
            result = RWResult(req.result_code).name
        except ValueError:
            result = str(req.result_code)
        self._write(req, result)

    async def aclose(self) -> None:
        """Close the trace file, then the wrapped backend."""
        self._out.close()
        await self.inner.aclose()
