"""The base of wrapper backends: every call passes to the wrapped backend.

A wrapper (faulty, trace, throttled, ...) overrides what it changes and
inherits the rest, so it keeps the Backend signatures exactly and stacks.
"""

from __future__ import annotations

from typing import Any

from cachefs.contract import Backend, DirEntry, FileAttrs, ReadData


class Wrapper:
    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def stat(self, file_id: str) -> FileAttrs | None:
        return await self.inner.stat(file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        return await self.inner.list_dir(dir_id)

    async def open_file(self, file_id: str) -> Any:
        return await self.inner.open_file(file_id)

    async def close_file(self, file_id: str, context: Any) -> None:
        await self.inner.close_file(file_id, context)

    async def read_data(self, req: ReadData) -> None:
        await self.inner.read_data(req)

    async def aclose(self) -> None:
        await self.inner.aclose()
