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
    ChangeResult,
    ContentInfo,
    ContentInfoSource,
    DirEntry,
    FileAttrs,
    ReadData,
    WritableBackend,
    WriteCapability,
    WriteData,
)


class Wrapper:
    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        # Checked once: a backend's capabilities do not change while it is open.
        self._writer = inner if isinstance(inner, WritableBackend) else None

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

    # -- writes ------------------------------------------------------------------

    @property
    def write_capabilities(self) -> WriteCapability:
        writer = self._writer
        return writer.write_capabilities if writer is not None else WriteCapability(0)

    def _writable(self) -> WritableBackend:
        if self._writer is None:
            raise NotImplementedError(f"{self.inner!r} is read-only: it cannot be written to")
        return self._writer

    async def write_data(self, req: WriteData) -> None:
        await self._writable().write_data(req)

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        return await self._writable().make_dir(dir_id, mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        return await self._writable().remove_file(file_id, version)

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        return await self._writable().remove_dir(dir_id)

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        return await self._writable().rename(old_id, new_id, replace)

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        return await self._writable().set_size(file_id, size, version)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        return await self._writable().set_attrs(file_id, mode, mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        return await self._writable().make_symlink(file_id, target)
