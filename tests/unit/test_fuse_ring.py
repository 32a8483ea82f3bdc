"""The FUSE-over-io_uring probe's layouts (bench/fuseuring.py), without a ring.

Layouts from linux/io_uring.h (a 128-byte SQE whose command area starts at
byte 48) and linux/fuse.h (fuse_uring_req_header: in_out[128], op_in[128],
then commit id and payload size; fuse_uring_cmd_req in the command area).
A wrong offset there loses requests or hangs the kernel's queue, so the
probe's figures would measure nothing.
"""

from __future__ import annotations

import struct

import pytest

from bench.fuseuring import (
    ENT_IN_OUT,
    ENT_IN_OUT_STRUCT,
    HEADER_SIZE,
    OP_IN,
    PARAMS,
    SQE,
    unpack_request,
)
from cachefs.fuse.native import abi

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad


def _entry(opcode: int, op: bytes, payload: bytes, extlen: int = 0) -> tuple[bytearray, bytes]:
    header = bytearray(HEADER_SIZE)
    length = IN_HEADER.size + len(op) + len(payload)
    IN_HEADER.pack_into(header, 0, length, opcode, 77, 5, 0, 0, 1234, extlen, 0)
    header[OP_IN : OP_IN + len(op)] = op
    ENT_IN_OUT_STRUCT.pack_into(header, ENT_IN_OUT, 0, 77, len(payload), 0)
    return header, payload


def test_a_read_comes_whole_from_the_op_area() -> None:
    op = abi.READ_IN.pack(9, 4096, 131072) + bytes(40 - abi.READ_IN.size)  # fuse_read_in
    header, payload = _entry(abi.READ, op, b"")
    commit_id, opcode, unique, nodeid, pid, body = unpack_request(header, payload)
    assert (commit_id, opcode, unique, nodeid, pid) == (77, abi.READ, 77, 5, 1234)
    assert body == op
    assert abi.READ_IN.unpack_from(body) == (9, 4096, 131072)


def test_a_lookup_name_comes_from_the_payload() -> None:
    header, payload = _entry(abi.LOOKUP, b"", b"a file\0")
    assert unpack_request(header, payload)[5] == b"a file\0"


def test_a_write_is_its_struct_then_its_data_without_extensions() -> None:
    op = bytes(range(40))
    data = b"x" * 5000
    header, payload = _entry(abi.WRITE, op, data + bytes(16), extlen=2)
    assert unpack_request(header, payload)[5] == op + data


def test_an_impossible_length_is_refused() -> None:
    header, payload = _entry(abi.READ, b"", b"abc")
    IN_HEADER.pack_into(header, 0, 10, abi.READ, 77, 5, 0, 0, 1, 0, 0)
    with pytest.raises(ValueError):
        unpack_request(header, payload)


def test_the_sqe_command_area_is_where_the_kernel_reads_it() -> None:
    assert SQE.size == 128 and PARAMS.size == 120
    sqe = SQE.pack(46, 0, 0, 3, 2, 0, 0xABC, 2, 0, 11, 0, 0, 0, 0, 77, 1)
    assert sqe[0] == 46  # IORING_OP_URING_CMD
    assert struct.unpack_from("<i", sqe, 4)[0] == 3  # fd
    assert struct.unpack_from("<I", sqe, 8)[0] == 2  # cmd_op: COMMIT_AND_FETCH
    assert struct.unpack_from("<Q", sqe, 16)[0] == 0xABC  # addr: the iovecs
    assert struct.unpack_from("<I", sqe, 24)[0] == 2  # len: two iovecs
    assert struct.unpack_from("<Q", sqe, 32)[0] == 11  # user_data: the entry
    # fuse_uring_cmd_req at byte 48: flags, commit_id, qid
    assert struct.unpack_from("<QQH", sqe, 48) == (0, 77, 1)
