"""Whether the thread waiting on a request is dying: the test every transport
applies before it cuts a request short (docs/SEMANTICS.md, rule 9)."""

from __future__ import annotations

#: SIGKILL's bit in /proc/<tid>/status's pending masks: set for every fatal signal.
_SIGKILL_BIT = 1 << (9 - 1)


def dying(tid: int, gone: bool = True) -> bool:
    """Whether thread *tid* has a fatal signal pending (the kernel marks every
    fatal signal as SIGKILL), or is gone (*gone*: what a thread that is not
    there counts as).  A thread of another PID namespace (pid 0 in the
    request) cannot be looked at: it is taken as living, so a program never
    gets EINTR from a read; kill -9 of it waits for the source."""
    if tid <= 0:
        return False
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return gone
    for line in status.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
            return True
    return False
