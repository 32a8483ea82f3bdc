"""The base of wrapper backends: every call passes to the wrapped backend.

A wrapper (faulty, trace, throttled, ...) overrides what it changes and
inherits the rest, so it keeps the Backend signatures exactly and stacks.
The optional content information calls pass through when the wrapped
backend has them; without them there is no content information (None), and
storing or deleting it raises NotImplementedError.

The write calls (contract.WritableBackend) pass through when the wrapped
backend is writable.  A wrapper always has them, so ``isinstance(wrapper,
WritableBackend)`` holds even around a read-only backend: its
``write_capabilities`` are then empty (``WriteCapability(0)``), which is
what the cache goes by, and every write call raises NotImplementedError
naming the backend.
"""

from __future__ import annotations

from typing import Any

from cachefs.contract import (
    Backend,
    ContentInfo,
    ContentInfoSource,
    DirEntry,
    FileAttrs,
    PassesWrites,
    ReadData,
)


class Wrapper(PassesWrites):
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        # Checked once: a backend's capabilities do not change while it is open.
        self.pass_writes_to(inner)

    async def stat(self, file_id: str) -> FileAttrs | None:
        return await self.inner.stat(file_id)

    async def list_dir(self, dir_id: str) -> list[DirEntry]:
        return await self.inner.list_dir(dir_id)

    async def open_file(self, file_id: str) -> object:
        return await self.inner.open_file(file_id)

    async def close_file(self, file_id: str, context: object) -> None:
        await self.inner.close_file(file_id, context)

    async def read_data(self, req: ReadData) -> None:
        await self.inner.read_data(req)

    async def aclose(self) -> None:
        await self.inner.aclose()

    # -- content information ---------------------------------------------------

    async def content_info(self, file_id: str) -> ContentInfo | None:
        inner = self.inner
        return await inner.content_info(file_id) if isinstance(inner, ContentInfoSource) else None

    async def put_content_info(self, file_id: str, info: ContentInfo) -> None:
        await self._optional("put_content_info")(file_id, info)

    async def delete_content_info(self, file_id: str) -> None:
        await self._optional("delete_content_info")(file_id)

    async def content_info_ids(self) -> list[str]:
        return await self._optional("content_info_ids")()

    def _optional(self, name: str) -> Any:
        call = getattr(self.inner, name, None)
        if call is None:
            raise NotImplementedError(f"{self.inner!r} cannot store content information")
        return call
