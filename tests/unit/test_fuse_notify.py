"""The native transport's notifications, as the kernel reads them from /dev/fuse.

Layouts from linux/fuse.h: ``fuse_out_header`` (len, error = notify code,
unique 0), then the notification's struct; checked here against a pipe
standing in for the device, without a mount.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs.fuse.native import Connection

OUT_HEADER = struct.Struct("<IiQ")  # len error unique
INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino off len
INVAL_ENTRY_OUT = struct.Struct("<QII")  # parent namelen flags
FUSE_NOTIFY_INVAL_INODE = 2
FUSE_NOTIFY_INVAL_ENTRY = 3


@pytest.fixture
def device() -> Iterator[tuple[Connection, int]]:
    """A Connection writing into a pipe (never closed: it would unmount), and the
    pipe's reading end."""
    r, w = os.pipe()
    try:
        yield Connection(w, Path("/nowhere")), r
    finally:
        os.close(r)
        os.close(w)


def _message(r: int) -> tuple[int, bytes]:
    """The notify code and body of the one message written, checking its header."""
    data = os.read(r, 65536)
    length, code, unique = OUT_HEADER.unpack_from(data)
    assert length == len(data) and unique == 0
    return code, data[OUT_HEADER.size :]


@pytest.mark.parametrize("name", [b"f", b"a file.txt", b"caf\xe9-not-utf8", b"n" * 255])
def test_an_entry_is_invalidated_by_its_parent_and_nul_terminated_name(
    device: tuple[Connection, int], name: bytes
) -> None:
    connection, r = device
    connection.invalidate_entry(42, name)
    code, body = _message(r)
    assert code == FUSE_NOTIFY_INVAL_ENTRY
    parent, namelen, flags = INVAL_ENTRY_OUT.unpack_from(body)
    assert (parent, namelen, flags) == (42, len(name), 0)  # flags 0: forget, not just expire
    # The kernel refuses the message unless its size is exactly this, NUL included.
    assert body[INVAL_ENTRY_OUT.size :] == name + b"\0"


def test_an_inode_is_invalidated_whole(device: tuple[Connection, int]) -> None:
    connection, r = device
    connection.invalidate_inode(7)
    code, body = _message(r)
    assert code == FUSE_NOTIFY_INVAL_INODE
    assert body == INVAL_INODE_OUT.pack(7, 0, 0)  # offset 0, length 0: every page
