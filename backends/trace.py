"""A wrapper that records every ReadData and WriteData call and every
namespace change as one JSON line.

Each line is written when the call completes and flushed at once, so a
trace can be read while the mount runs.  A ReadData line has no ``op``::

    {"file_id": "a.bin", "size": 4194304, "position": 0, "bytes_to_read": 1048576,
     "flags": ["CONTINUOUS_STARTED", "TIL_END"], "result": "SUCCESS",
     "bytes_read": 1048576}

A WriteData line says ``"op": "write"``; a namespace change names its
method as ``op``, with its arguments but for versions and a symlink's
target, and the errno of a refusal by name (null if none)::

    {"op": "write", "file_id": "a.bin", "size": 5, "position": 0, "bytes_to_write": 5,
     "flags": ["WHOLE_FILE", "CONTINUOUS_STARTED", "CONTINUOUS_FINISHED", "TIL_END"],
     "result": "SUCCESS", "bytes_written": 5}
    {"op": "rename", "file_id": "a.bin", "new_id": "b.bin", "replace": false,
     "result": "FILE_FAILURE", "error": "EEXIST"}

read_trace returns the ReadData lines unless asked for others.

The file is opened (created mode 0600) to append, never through a symlink,
and only if it is a regular file of the running user that no other user can
read or write and that has no other hard links: a trace names the files
read, and a path planted by another user must not make cachefs write into
a file of theirs (or of root's).  Nor may it lie on a filesystem that is a
kernel interface (procfs, sysfs, debugfs, cgroup, ...: KERNEL_FILESYSTEMS),
where a root-owned 0200 file such as ``/proc/sys/vm/drop_caches`` passes
those checks and every write acts on the kernel.  The filesystem is asked
of the open fd itself (fstatfs), which needs no /proc and cannot be fooled
by a path changed after the open.  Anything else is a ConfigError naming
the file and the reason.  With ``name``, what is written as ``file_id`` is
``name(file_id)`` (the mount passes the cache key's name tags when the cache
is encrypted, so the trace holds no file names either).

CANCELED notifications are recorded like any call.  If the wrapped backend
raises, the line says ``"result": "EXCEPTION"`` and the exception goes on.
The lines are written on the trio loop (a small buffered write): this
wrapper is for tests and diagnosis, not for production mounts.  Every
other call (stat, list_dir, open, content information) is passed through
unrecorded.

A trace never fails a call.  When a line cannot be written (the disk is
full, an I/O error) one warning is logged and tracing stops for the rest of
the mount: the trace then ends, and read_trace leaves out a last line cut
short, rather than having gaps no one can see.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import platform
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from backends.wrapper import Wrapper
from cachefs.contract import Backend, ChangeResult, ReadData, RWResult, WriteData, flag_names
from cachefs.errors import ConfigError

log = logging.getLogger(__name__)


def read_trace(path: str | Path, op: str | None = "read") -> list[dict[str, Any]]:
    """The records of a trace file of *op* (``read``, ``write``, a namespace
    change's method; None: all), oldest first; a last line without its
    newline (cut short by a full disk, or still being written) is left out."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip() and line.endswith("\n")]
    return [r for r in records if op is None or r.get("op", "read") == op]


_OPEN_FLAGS = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_CLOEXEC
    | os.O_NOCTTY
    # a FIFO without a reader fails at once (ENXIO) instead of blocking the open
    | os.O_NONBLOCK
)
_REASONS = {
    errno.ELOOP: "is a symbolic link: refused, it could point anywhere",
    errno.ENXIO: "is not a regular file",
    errno.ENOENT: "cannot be created: its directory does not exist",
    errno.EISDIR: "is a directory",
}


def open_trace(path: str | Path) -> TextIO:
    """*path* opened to append lines to, created 0600; ConfigError naming it and why not."""
    try:
        fd = os.open(path, _OPEN_FLAGS, 0o600)
    except OSError as e:
        reason = _REASONS.get(e.errno or 0, f"cannot be opened: {e.strerror}")
        raise ConfigError(f"trace file {path} {reason}") from None
    try:
        problem = _filesystem_problem(fd) or _problem(os.fstat(fd))
        if problem is None:
            os.lseek(fd, 0, os.SEEK_END)  # as appending does: fails on /proc files and the like
    except OSError as e:
        problem = f"cannot be opened: {e.strerror}"
    if problem is not None:
        os.close(fd)
        raise ConfigError(f"trace file {path} {problem}")
    return open(fd, "a", buffering=1, encoding="utf-8")


def _problem(st: os.stat_result) -> str | None:
    """Why a file with status *st* must not take a trace; None if it may."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_nlink != 1:
        return "has other hard links"
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        return f"is open to other users (mode {mode:o}): chmod 600 it, or give a new file"
    return None


#: f_type (linux/magic.h) of the filesystems that are kernel interfaces, not storage.
KERNEL_FILESYSTEMS = {
    0x9FA0: "procfs",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x74726163: "tracefs",
    0x73636673: "securityfs",
    0x62656570: "configfs",
    0x0027E0EB: "cgroup",
    0x63677270: "cgroup2",
    0xCAFE4A11: "bpf",
    0xDE5E81E4: "efivarfs",
    0x6165676C: "pstore",
    0x42494E4D: "binfmt_misc",
    0x65735543: "fusectl",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
}
_fstatfs = ctypes.CDLL(None, use_errno=True).fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int
# struct statfs begins with f_type: a long (__fsword_t), but an unsigned int on s390x.
_F_TYPE = ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long
_STATFS_SIZE = 256  # struct statfs is 120 bytes on 64-bit Linux: room to spare


def _filesystem_problem(fd: int) -> str | None:
    """Why the filesystem of *fd* must not take a trace; None if it may."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    f_type = _F_TYPE.from_buffer(buf).value & 0xFFFFFFFF
    name = KERNEL_FILESYSTEMS.get(f_type)
    if name is None:
        return None
    return f"is on {name}, a kernel interface, not storage: give a file on a disk or tmpfs"


def _as_is(file_id: str) -> str:
    return file_id


def _result_name(code: int) -> str:
    try:
        return RWResult(code).name
    except ValueError:
        return str(code)


class TraceBackend(Wrapper):
    """Wrap *inner*, appending one line per ReadData, WriteData or change to *trace_path*.

    *name* maps a file id to what the line says (default: the id itself).
    """

    def __init__(
        self,
        inner: Backend,
        trace_path: str | Path,
        *,
        name: Callable[[str], str] = _as_is,
    ) -> None:
        super().__init__(inner)
        self.trace_path = Path(trace_path)
        self._name = name
        self._out: TextIO | None = open_trace(self.trace_path)

    def __repr__(self) -> str:
        return f"TraceBackend({self.inner!r}, {str(self.trace_path)!r})"

    def _read_line(self, req: ReadData, result: str) -> None:
        self._write(
            {
                "file_id": self._name(req.file_id),
                "size": req.size,
                "position": req.position,
                "bytes_to_read": req.bytes_to_read,
                "flags": flag_names(req.flags),
                "result": result,
                "bytes_read": req.bytes_read,
            }
        )

    def _write(self, record: dict[str, object]) -> None:
        if self._out is None:
            return  # stopped after a failed write
        try:
            self._out.write(json.dumps(record) + "\n")
        except OSError as e:
            log.warning(
                "trace file %s cannot be written (%s): tracing stopped, calls go on",
                self.trace_path,
                e.strerror or e,
            )
            self._close_trace()

    def _close_trace(self) -> None:
        out, self._out = self._out, None
        if out is not None:
            with contextlib.suppress(OSError):  # what a failed write left in the buffer
                out.close()

    async def read_data(self, req: ReadData) -> None:
        try:
            await self.inner.read_data(req)
        except BaseException:
            self._read_line(req, "EXCEPTION")
            raise
        self._read_line(req, _result_name(req.result_code))

    def _write_line(self, req: WriteData, result: str) -> None:
        self._write(
            {
                "op": "write",
                "file_id": self._name(req.file_id),
                "size": req.size,
                "position": req.position,
                "bytes_to_write": req.bytes_to_write,
                "flags": flag_names(req.flags),
                "result": result,
                "bytes_written": req.bytes_written,
            }
        )

    async def write_data(self, req: WriteData) -> None:
        try:
            await super().write_data(req)
        except BaseException:
            self._write_line(req, "EXCEPTION")
            raise
        self._write_line(req, _result_name(req.result_code))

    async def _change(
        self, op: str, file_id: str, change: Awaitable[ChangeResult], **args: object
    ) -> ChangeResult:
        line: dict[str, object] = {"op": op, "file_id": self._name(file_id), **args}
        try:
            result = await change
        except BaseException:
            self._write({**line, "result": "EXCEPTION", "error": None})
            raise
        error = errno.errorcode.get(result.error, str(result.error)) if result.error else None
        self._write({**line, "result": _result_name(result.result_code), "error": error})
        return result

    async def make_dir(self, dir_id: str, mode: int | None) -> ChangeResult:
        return await self._change("make_dir", dir_id, super().make_dir(dir_id, mode), mode=mode)

    async def remove_file(self, file_id: str, version: str) -> ChangeResult:
        return await self._change("remove_file", file_id, super().remove_file(file_id, version))

    async def remove_dir(self, dir_id: str) -> ChangeResult:
        return await self._change("remove_dir", dir_id, super().remove_dir(dir_id))

    async def rename(self, old_id: str, new_id: str, replace: bool) -> ChangeResult:
        change = super().rename(old_id, new_id, replace)
        return await self._change(
            "rename", old_id, change, new_id=self._name(new_id), replace=replace
        )

    async def set_size(self, file_id: str, size: int, version: str) -> ChangeResult:
        change = super().set_size(file_id, size, version)
        return await self._change("set_size", file_id, change, size=size)

    async def set_attrs(self, file_id: str, mode: int | None, mtime: float | None) -> ChangeResult:
        change = super().set_attrs(file_id, mode, mtime)
        return await self._change("set_attrs", file_id, change, mode=mode, mtime=mtime)

    async def make_symlink(self, file_id: str, target: str) -> ChangeResult:
        return await self._change("make_symlink", file_id, super().make_symlink(file_id, target))

    async def aclose(self) -> None:
        """Close the trace file, then the wrapped backend."""
        self._close_trace()
        await self.inner.aclose()


class TracePlugin:
    """The mount's ``--trace FILE`` (entry point ``trace`` of ``cachefs.wrappers``)."""

    def check(self, value: str) -> str:
        """The trace file's absolute path, opened once as the mount opens it
        (so it exists, private, from here on); ConfigError naming why not."""
        path = os.path.abspath(value)
        open_trace(path).close()
        return path

    def wrap(self, inner: Backend, value: str, names: Callable[[str], str]) -> Backend:
        return TraceBackend(inner, value, name=names)


plugin = TracePlugin()
