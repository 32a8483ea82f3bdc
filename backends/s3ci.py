"""Content information in an S3 source, beside the files it describes.

The record of a file ``<prefix>/<key>`` is the object
``<prefix>/.cachefs-ci/<key>``, holding ``ContentInfo.to_bytes()``.  The
functions take the prefixed store and run in a worker thread; a failed
request raises OSError with a one-line reason.
"""

from __future__ import annotations

import logging

import obstore
from obstore.store import S3Store

from backends.s3config import key_ok
from backends.s3errors import os_error
from cachefs.contract import ContentInfo

log = logging.getLogger(__name__)

# Below the prefix; never part of the source.
CI_DIR = ".cachefs-ci"


def servable(key: str) -> bool:
    """Whether *key* can be a file or directory of the source (not under CI_DIR)."""
    return key_ok(key) and CI_DIR not in key.split("/")


def read(store: S3Store, file_id: str) -> ContentInfo | None:
    """The record of *file_id* as stored; None if there is none or it is malformed."""
    if not key_ok(file_id):
        return None
    key = f"{CI_DIR}/{file_id}"
    try:
        data = obstore.get(store, key).bytes()
    except FileNotFoundError:
        return None
    except Exception as e:
        raise os_error(e, f"GET {key}") from None
    try:
        return ContentInfo.from_bytes(bytes(data))
    except ValueError as e:
        log.warning("ignoring the content information of %s: %s", file_id, e)
        return None


def write(store: S3Store, file_id: str, data: bytes) -> None:
    """Store *data* as the record of *file_id* (a PUT replaces an object atomically)."""
    if not key_ok(file_id):
        raise FileNotFoundError(f"invalid file id {file_id!r}")
    key = f"{CI_DIR}/{file_id}"
    try:
        obstore.put(store, key, data)
    except Exception as e:
        raise os_error(e, f"PUT {key}") from None


def delete(store: S3Store, file_id: str) -> None:
    """Remove the record of *file_id*; nothing if there is none."""
    if not key_ok(file_id):
        return
    key = f"{CI_DIR}/{file_id}"
    try:
        obstore.delete(store, key)
    except FileNotFoundError:
        pass
    except Exception as e:
        raise os_error(e, f"DELETE {key}") from None


def file_ids(store: S3Store) -> list[str]:
    """The file ids that have a record, sorted."""
    start = len(CI_DIR) + 1
    try:
        return sorted(
            meta["path"][start:]
            for chunk in obstore.list(store, CI_DIR, chunk_size=1000)
            for meta in chunk
        )
    except Exception as e:
        raise os_error(e, f"listing {CI_DIR}/") from None
