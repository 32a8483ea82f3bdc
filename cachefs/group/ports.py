"""What a group member needs of the mount's cache, and nothing more.

The daemon hands the member the FileCache as a :class:`CacheView`, and
callbacks for what only the file system can do (tell the kernel a name
changed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from cachefs.contract import ContentInfo, FileAttrs


class CacheView(Protocol):
    """The cache as a group member sees it (cachefs.engine.FileCache has these)."""

    def known_attrs(self, file_id: str) -> FileAttrs | None:
        """The version the cache serves now, without asking the source."""
        ...

    async def revalidate(self, file_id: str) -> FileAttrs:
        """Ask the source for *file_id* now, TTL or not; a new version
        retires the cached one.  Raises NotFound when it is gone, ReadFailed
        when the source cannot answer."""
        ...

    async def pin(self, file_id: str) -> None: ...

    async def unpin(self, file_id: str) -> bool: ...

    def pinned(self) -> list[str]: ...

    def content_of(self, file_id: str) -> ContentInfo | None:
        """The block hashes of the version the cache holds whole, as it
        computed them from the bytes it stored; None until it has them all."""
        ...

    def cached_bytes_of(self, file_id: str) -> int:
        """Bytes of *file_id*'s current version held in the cache."""
        ...

    def statistics(self) -> Mapping[str, Any]: ...
