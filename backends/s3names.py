"""The namespace of an S3 source: which keys are files and directories, and changing it.

Policy:

- A key is a file; a "/"-delimited prefix of keys is a directory.  A
  directory made through the mount holds the empty marker object
  ``<dir>/.cachefs-dir`` (``DIR_MARKER``), which keeps it when it is empty;
  the marker is never shown and never served.  A ``<dir>/`` marker made by
  another tool (the S3 console's "Create folder") counts as a directory too,
  but obstore cannot name a key that ends in "/": the mount cannot remove or
  rename such a directory (EPERM, before anything changed).  A directory
  that exists only because keys lie under it disappears with its last key.
- The functions run in a worker thread and answer a ChangeResult; they check
  the precondition with a HEAD or a listing, then change (S3 has no
  conditional delete or copy through obstore), so a change made by another
  client between the two is not seen: the answer then rests on the state
  just before.
- ``remove_file`` with a version deletes only if the object's ETag is still
  that version (FILE_MODIFIED_EXTERNALLY otherwise).
- ``rename`` of a file is a server-side copy, then a delete of the old key:
  for a moment both names exist, and a failure between the two leaves both.
  A directory is renamed key by key (every key under it is copied, then all
  are deleted): not atomic; a failure while copying leaves the old
  directory whole and part of the new one.
- Errors map through backends.s3errors (``result_for``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

if TYPE_CHECKING:
    from obstore import ObjectMeta

from backends import s3ci
from backends.s3config import key_ok
from backends.s3errors import result_for
from cachefs.contract import ChangeResult, FileAttrs, FileKind, RWResult

log = logging.getLogger(__name__)

# The empty object that makes a directory made through the mount exist.
DIR_MARKER = ".cachefs-dir"
FILE_MODE = 0o644
DIR_MODE = 0o755
# Keys the recursive listing of a directory fetches at a time.
LIST_CHUNK = 1000
# The keys remove_dir needs to see: every marker, and one more.
_PROBE = 3


def servable(key: str) -> bool:
    """Whether *key* can be a file or directory of the source (no marker, no record)."""
    return s3ci.servable(key) and key.rsplit("/", 1)[-1] != DIR_MARKER


def file_attrs(meta: ObjectMeta) -> FileAttrs:
    """A file's attributes from its metadata; its version is its ETag as sent."""
    mtime = meta["last_modified"].timestamp()
    etag = meta.get("e_tag")
    version = etag if etag else f"{meta['size']}@{mtime}"
    return FileAttrs(FileKind.FILE, meta["size"], mtime, version, FILE_MODE)


def dir_attrs(mtime: float | None = None) -> FileAttrs:
    return FileAttrs(FileKind.DIR, 0, time.time() if mtime is None else mtime, "dir", DIR_MODE)


def head(store: S3Store, key: str) -> ObjectMeta | None:
    """The object's metadata, or None if there is none (other failures raise)."""
    try:
        return obstore.head(store, key)
    except FileNotFoundError:
        return None


def _under(store: S3Store, dir_id: str, chunk: int = LIST_CHUNK) -> Iterator[ObjectMeta]:
    """Every object under ``dir_id/``, markers included, in key order."""
    for metas in obstore.list(store, dir_id, chunk_size=chunk):
        yield from metas


def _is_folder_marker(store: S3Store, dir_id: str, meta: ObjectMeta) -> bool:
    """Whether a listed entry is another tool's ``name/`` marker: obstore shows
    it as ``name``, and only a HEAD tells it from an empty file ``name``."""
    if meta["path"] == dir_id:
        return True  # listed under "dir_id/": only the key "dir_id/" is shown so
    return meta["size"] == 0 and head(store, meta["path"]) is None


def _refused(error: int, reason: str) -> ChangeResult:
    return ChangeResult(RWResult.FILE_FAILURE, error, reason)


def _failed(what: str, e: Exception) -> ChangeResult:
    rc, reason = result_for(e)
    level = logging.DEBUG if rc is RWResult.FILE_MODIFIED_EXTERNALLY else logging.WARNING
    log.log(level, "%s: %s -> %s", what, reason, rc.name)
    return ChangeResult(rc, reason=f"{what}: {reason}")


def _bad_name(key: str) -> ChangeResult | None:
    if not key_ok(key):
        return _refused(errno.EINVAL, f"{key!r} cannot be an S3 key (an empty, '.' or '..' part)")
    if not servable(key):
        return _refused(errno.EPERM, f"{key}: a name cachefs keeps for itself")
    return None


class Names:
    """Namespace changes on *store* (HEAD, list, delete); *copy_store* runs the
    server-side copies, which may take long for large objects."""

    def __init__(self, store: S3Store, copy_store: S3Store) -> None:
        self._store = store
        self._copy_store = copy_store

    def _has_keys(self, dir_id: str) -> bool:
        return any(True for _ in _under(self._store, dir_id, 1))

    def make_dir(self, dir_id: str) -> ChangeResult:
        """Put ``dir_id/.cachefs-dir`` unless the name is taken (EEXIST)."""
        if not dir_id:
            return _refused(errno.EEXIST, "the root exists")
        bad = _bad_name(dir_id)
        if bad is not None:
            return bad
        try:
            if head(self._store, dir_id) is not None or self._has_keys(dir_id):
                return _refused(errno.EEXIST, f"{dir_id} exists")
            obstore.put(self._store, f"{dir_id}/{DIR_MARKER}", b"", mode="create")
        except AlreadyExistsError:
            return _refused(errno.EEXIST, f"{dir_id} exists")
        except Exception as e:
            return _failed(f"mkdir {dir_id}", e)
        return ChangeResult(attrs=dir_attrs())

    def remove_file(self, file_id: str, version: str) -> ChangeResult:
        """Delete the object, if it is at *version* ("" for any)."""
        if not file_id or not servable(file_id):
            return _refused(errno.ENOENT, f"no file {file_id!r}")
        try:
            meta = head(self._store, file_id)
            if meta is None:
                if self._has_keys(file_id):
                    return _refused(errno.EISDIR, f"{file_id} is a directory")
                return _refused(errno.ENOENT, f"no file {file_id}")
            now = file_attrs(meta).version
            if version and now != version:
                return ChangeResult(
                    RWResult.FILE_MODIFIED_EXTERNALLY,
                    reason=f"{file_id} is at version {now}, not {version}",
                )
            obstore.delete(self._store, file_id)
        except Exception as e:
            return _failed(f"DELETE {file_id}", e)
        return ChangeResult()

    def remove_dir(self, dir_id: str) -> ChangeResult:
        """Delete the directory's marker; ENOTEMPTY if any other key is under it."""
        if not dir_id:
            return _refused(errno.EBUSY, "the root cannot be removed")
        if not servable(dir_id):
            return _refused(errno.ENOENT, f"no directory {dir_id!r}")
        ours = f"{dir_id}/{DIR_MARKER}"
        try:
            found = []
            for meta in _under(self._store, dir_id, _PROBE):
                found.append(meta)
                if len(found) == _PROBE:
                    break
            if not found:
                if head(self._store, dir_id) is not None:
                    return _refused(errno.ENOTDIR, f"{dir_id} is a file")
                return _refused(errno.ENOENT, f"no directory {dir_id}")
            if any(m["path"] not in (dir_id, ours) for m in found):
                return _refused(errno.ENOTEMPTY, f"{dir_id} is not empty")
            if any(m["path"] == dir_id for m in found):
                return _folder_refused(dir_id)
            obstore.delete(self._store, ours)
        except Exception as e:
            return _failed(f"rmdir {dir_id}", e)
        return ChangeResult()

    def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        """Copy, then delete: a file, or every key of a directory."""
        if old_id == new_id:
            return ChangeResult()
        if not old_id or not servable(old_id):
            return _refused(errno.ENOENT, f"no file {old_id!r}")
        if not new_id or new_id.startswith(f"{old_id}/"):
            return _refused(errno.EINVAL, f"cannot move {old_id} into itself")
        bad = _bad_name(new_id)
        if bad is not None:
            return bad
        try:
            if head(self._store, old_id) is not None:
                return self._rename_file(old_id, new_id, replace)
            keys = list(_under(self._store, old_id))
            if not keys:
                return _refused(errno.ENOENT, f"no file {old_id}")
            return self._rename_dir(old_id, new_id, replace, keys)
        except Exception as e:
            return _failed(f"rename {old_id} -> {new_id}", e)

    def _rename_file(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        if self._has_keys(new_id):
            return _refused(errno.EISDIR, f"{new_id} is a directory")
        if not replace and head(self._store, new_id) is not None:
            return _refused(errno.EEXIST, f"{new_id} exists")
        obstore.copy(self._copy_store, old_id, new_id)
        obstore.delete(self._store, old_id)
        return ChangeResult()

    def _rename_dir(
        self, old_id: str, new_id: str, replace: bool, keys: list[ObjectMeta]
    ) -> ChangeResult:
        if head(self._store, new_id) is not None:
            if not replace:
                return _refused(errno.EEXIST, f"{new_id} exists")
            return _refused(errno.ENOTDIR, f"{new_id} is a file")
        taken = [m["path"] for m in _under(self._store, new_id, _PROBE)]
        if any(k not in (new_id, f"{new_id}/{DIR_MARKER}") for k in taken):
            return _refused(errno.ENOTEMPTY, f"{new_id} is not empty")
        if taken and not replace:
            return _refused(errno.EEXIST, f"{new_id} exists")
        for meta in keys:
            if _is_folder_marker(self._store, old_id, meta):
                return _folder_refused(meta["path"])
        start = len(old_id)
        for meta in keys:
            obstore.copy(self._copy_store, meta["path"], new_id + meta["path"][start:])
        paths = [m["path"] for m in keys]
        for i in range(0, len(paths), LIST_CHUNK):
            obstore.delete(self._store, paths[i : i + LIST_CHUNK])
        log.debug("renamed %s -> %s: %d keys copied and deleted", old_id, new_id, len(paths))
        return ChangeResult()


def _folder_refused(dir_id: str) -> ChangeResult:
    return _refused(
        errno.EPERM,
        f"{dir_id}/ is a folder marker made by another tool; obstore cannot copy or"
        " delete a key that ends in '/'",
    )
