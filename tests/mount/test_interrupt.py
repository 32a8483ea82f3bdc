"""A reader blocked on a backend that does not answer can be killed.

The kernel tells the daemon with FUSE INTERRUPT when a process waiting on a
request gets a signal.  When the signal is fatal (``kill -9``) the daemon
stops waiting for the backend, answers, and ends the transfer with a
CANCELED call; when the process handles the signal, the request goes on
(EINTR would reach the program as the result of its read).  The backend
here is a real S3 server (moto) stopped with SIGSTOP: connections stay open
and nothing answers, for longer than the tests wait.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import pread_direct, wait_for

from backends.trace import read_trace

if TYPE_CHECKING:
    from conftest import MountFactory
    from s3server import MotoServer

pytest_plugins = ["s3server"]

KB64 = 64 * 1024
# Far below what the S3 backend waits for a server that does not answer
# (30 s per request, retried): a reader that dies within it was not held.
DIE_DEADLINE = 10.0

# Reads with O_DIRECT: the read is the reader's own request (a page-cache
# read would be the kernel's readahead, which a killed reader does not wait for).
READ_DIRECT = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 16)
print("reading", flush=True)
os.preadv(fd, [buf], 4 << 16)
"""
# The parent opens, forks and exits; the child reads the parent's handle once
# told (the test has reaped the parent by then: no /proc entry is left of it).
READ_AFTER_THE_OPENER_EXITED = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
if os.fork():
    os._exit(0)
sys.stdin.readline()
buf = mmap.mmap(-1, 1 << 16)
print("reading", os.getpid(), flush=True)
n = os.preadv(fd, [buf], 4 << 16)
print(n, buf[:n].hex(), flush=True)
"""
STAT = """
import os, sys
print("reading", flush=True)
os.stat(sys.argv[1])
"""


def start(script: str, path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "reading\n", proc.stderr.read() if proc.stderr else ""
    return proc


def waits_on_the_mount(proc: subprocess.Popen[str]) -> bool:
    """Whether *proc* sleeps in the kernel waiting for a FUSE answer."""
    assert proc.poll() is None, f"the reader exited with {proc.returncode}"
    wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
    return "fuse" in wchan or wchan == "request_wait_answer"


def signal_pending(proc: subprocess.Popen[str], signum: int) -> bool:
    """Whether *signum* is pending for *proc* (it waits on the mount meanwhile)."""
    assert waits_on_the_mount(proc)
    status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd", "ShdPnd"))]
    return any(mask & (1 << (signum - 1)) for mask in masks)


def killed_at_once(proc: subprocess.Popen[str]) -> None:
    wait_for("the reader to wait on the mount", lambda: waits_on_the_mount(proc))
    proc.kill()
    wait_for("the killed reader to exit", lambda: proc.poll() is not None, DIE_DEADLINE)


def test_a_reader_killed_during_a_hung_read_exits_and_the_backend_is_told(
    mount: MountFactory, own_s3_server: MotoServer, tmp_path: Path
) -> None:
    server = own_s3_server
    data = os.urandom(8 * KB64)
    bucket = server.new_bucket({"big.bin": data})
    trace = tmp_path / "trace.jsonl"
    m = mount(f"s3://{bucket}", "--s3-endpoint", server.endpoint, "--trace", trace)
    # Looked up, and its first block read, while the server answers.
    assert pread_direct(m / "big.bin", 0, KB64) == data[:KB64]
    server.pause()
    try:
        reader = start(READ_DIRECT, m / "big.bin")
        killed_at_once(reader)
        assert reader.returncode == -9
        # The transfer the killed reader started was ended with a CANCELED call.
        wait_for(
            "a CANCELED call in the trace",
            lambda: any("CANCELED" in r["flags"] for r in read_trace(trace)),
        )
    finally:
        server.resume()
    # Nothing of the abandoned call is left behind: the bytes are the object's.
    assert (m / "big.bin").read_bytes() == data
    m.unmount()


def test_a_lookup_waiting_on_a_hung_server_is_interrupted(
    mount: MountFactory, own_s3_server: MotoServer
) -> None:
    server = own_s3_server
    bucket = server.new_bucket({"one.txt": b"one\n", "two.txt": b"two\n"})
    # --ttl 0: every lookup asks the server.
    m = mount(f"s3://{bucket}", "--s3-endpoint", server.endpoint, "--ttl", "0")
    assert sorted(os.listdir(m.mountpoint)) == ["one.txt", "two.txt"]
    server.pause()
    try:
        killed_at_once(start(STAT, m / "two.txt"))
    finally:
        server.resume()
    assert (m / "two.txt").read_bytes() == b"two\n"
    m.unmount()


# pread through libc: Python would retry a read that failed with EINTR (PEP 475).
READ_WITH_A_HANDLER = """
import ctypes, mmap, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
signal.signal(signal.SIGUSR1, lambda *_: None)
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 16)
address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
print("reading", flush=True)
n = libc.pread(fd, ctypes.c_void_p(address), 1 << 16, ctypes.c_long(4 << 16))
print(n, ctypes.get_errno(), buf[: max(n, 0)].hex(), flush=True)
"""


def test_a_signal_the_reader_handles_does_not_fail_its_read(
    mount: MountFactory, own_s3_server: MotoServer
) -> None:
    server = own_s3_server
    data = os.urandom(8 * KB64)
    bucket = server.new_bucket({"big.bin": data})
    m = mount(f"s3://{bucket}", "--s3-endpoint", server.endpoint)
    assert pread_direct(m / "big.bin", 0, KB64) == data[:KB64]
    server.pause()
    try:
        reader = start(READ_WITH_A_HANDLER, m / "big.bin")
        wait_for("the reader to wait on the mount", lambda: waits_on_the_mount(reader))
        reader.send_signal(signal.SIGUSR1)
        if m.fuse == "native":
            wait_for(
                "the daemon to see the interrupt",
                lambda: "interrupted by a signal its process handles" in m.log_text(),
            )
        else:  # libfuse keeps INTERRUPT to itself: the kernel has sent it once pending
            wait_for("the signal to be pending", lambda: signal_pending(reader, signal.SIGUSR1))
    finally:
        server.resume()
    out, err = reader.communicate(timeout=60)
    n, error, got = out.split()
    assert (int(n), int(error)) == (KB64, 0), err
    assert bytes.fromhex(got) == data[4 * KB64 : 5 * KB64]
    m.unmount()


@pytest.mark.parametrize("mount", ["pyfuse3"], indirect=True)
def test_a_read_on_a_handle_whose_opener_exited_is_not_interrupted(
    mount: MountFactory, own_s3_server: MotoServer
) -> None:
    """pyfuse3 does not say who sent a READ: the handle's opener stands for it,
    and an opener that exited normally is not a dying reader."""
    server = own_s3_server
    data = os.urandom(8 * KB64)
    bucket = server.new_bucket({"big.bin": data})
    m = mount(f"s3://{bucket}", "--s3-endpoint", server.endpoint, "--log-level", "debug")
    assert pread_direct(m / "big.bin", 0, KB64) == data[:KB64]
    proc = subprocess.Popen(
        [sys.executable, "-c", READ_AFTER_THE_OPENER_EXITED, str(m / "big.bin")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert proc.wait(timeout=30) == 0  # the opener has exited and is reaped
    looked = "looked at 1 requests still running for a dying caller"
    before = m.log_text().count(looked)
    server.pause()
    try:
        proc.stdin.write("go\n")
        proc.stdin.close()
        word, pid = proc.stdout.readline().split()
        assert word == "reading"
        wchan = Path(f"/proc/{pid}/wchan")
        wait_for("the child to wait on the mount", lambda: "fuse" in wchan.read_text())
        # Twice: the transport looked at the read after its look-around, and again.
        wait_for("two looks at the read", lambda: m.log_text().count(looked) >= before + 2)
    finally:
        server.resume()
    n, got = proc.stdout.readline().split()
    assert (int(n), bytes.fromhex(got)) == (KB64, data[4 * KB64 : 5 * KB64])
    assert "interrupted: its process is dying" not in m.log_text()
    m.unmount()
