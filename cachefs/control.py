"""Talking to a running mount: finding it, and its control socket.

Finding the mount for a PATH needs no request to the file system (so it
works on a hung mount): the longest mount point in /proc/self/mountinfo of
type ``fuse.cachefs`` that contains PATH.  The mount's fsname (the "source"
column of mountinfo, what ``df`` shows) is ``cachefs:<cache dir>``,
percent-encoded, which leads to the control socket.

The control socket is ``control.sock`` in the cache directory, mode 0600.
A client sends one JSON object per line, ``{"command": NAME, ...}``; the
mount answers each with one line, ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": MESSAGE, "exit_code": N}``.  A long request (a
prefetch) may first send any number of ``{"progress": {...}}`` lines; if
the client leaves before the answer, the request is cancelled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import trio

from cachefs.errors import (
    CacheDirInUse,
    CacheFSError,
    MountUnreachable,
    NotInMount,
    RemoteError,
)

log = logging.getLogger(__name__)

FSTYPE = "fuse.cachefs"
SUBTYPE = "cachefs"
SOCKET_NAME = "control.sock"
_FSNAME_PREFIX = "cachefs:"
_MAX_LINE = 1 << 20
_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")

#: Clients served at once; more wait in the listen backlog.
MAX_CLIENTS = 16

Handler = Callable[[dict[str, Any], "Progress"], Awaitable[Any]]


# -- finding a mount ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountEntry:
    mountpoint: Path
    major: int
    minor: int
    cache_dir: Path | None

    @property
    def socket_path(self) -> Path | None:
        return self.cache_dir / SOCKET_NAME if self.cache_dir else None

    def file_id(self, path: Path) -> str:
        """The file id of *path*, which lies inside this mount."""
        rel = os.path.relpath(path, self.mountpoint)
        return "" if rel == "." else rel


def fsname_for(cache_dir: Path) -> str:
    """The fsname that tells clients where the mount keeps its cache."""
    return _FSNAME_PREFIX + quote(os.fsencode(cache_dir), safe="/-_.~")


def _cache_dir_from_fsname(fsname: str) -> Path | None:
    if not fsname.startswith(_FSNAME_PREFIX):
        return None
    return Path(os.fsdecode(unquote_to_bytes(fsname[len(_FSNAME_PREFIX) :])))


def _unescape(field: bytes) -> str:
    return os.fsdecode(_MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def cachefs_mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[MountEntry]:
    """Every cachefs mount this process can see, in mount order."""
    mounts = []
    for line in mountinfo.read_bytes().splitlines():
        fields = line.split(b" ")
        try:
            sep = fields.index(b"-")
        except ValueError:
            continue
        if fields[sep + 1].decode(errors="replace") != FSTYPE:
            continue
        major, minor = (int(n) for n in fields[2].split(b":"))
        mounts.append(
            MountEntry(
                mountpoint=Path(_unescape(fields[4])),
                major=major,
                minor=minor,
                cache_dir=_cache_dir_from_fsname(_unescape(fields[sep + 2])),
            )
        )
    return mounts


def _inside(path: Path, mountpoint: Path) -> bool:
    return path == mountpoint or mountpoint in path.parents


def find_mount(path: str | Path) -> MountEntry:
    """The innermost cachefs mount containing *path*; NotInMount if none."""
    mounts = cachefs_mounts()
    # abspath first: it needs no request to the (maybe hung) mount.
    for candidate in dict.fromkeys((Path(os.path.abspath(path)), Path(os.path.realpath(path)))):
        matching = [m for m in mounts if _inside(candidate, m.mountpoint)]
        if matching:
            return max(matching, key=lambda m: len(m.mountpoint.parts))
    raise NotInMount(f"{path} is not inside a cachefs mount")


def mount_at(mountpoint: str | Path) -> MountEntry | None:
    """The cachefs mount whose mount point is exactly *mountpoint*, if any."""
    target = Path(os.path.abspath(mountpoint))
    matching = [m for m in cachefs_mounts() if m.mountpoint == target]
    return matching[-1] if matching else None


# -- the socket -----------------------------------------------------------------


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """An AF_UNIX address for *path*, going through /proc for long paths."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _address(path) as address:
            sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _replace_stale(path: Path) -> None:
    """Remove a socket left by a crashed mount; CacheDirInUse if one answers."""
    if not os.path.lexists(path):
        return
    try:
        _connect(path, timeout=2.0).close()
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale control socket %s", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise CacheDirInUse(
            f"cache dir {path.parent} has a control socket that answers: {e}"
        ) from e
    raise CacheDirInUse(f"cache dir {path.parent} is in use by a running mount")


async def serve_control(
    cache_dir: Path,
    handle: Handler,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests on ``<cache_dir>/control.sock`` until cancelled.

    Each client is served in its own task, its requests one after another;
    at most MAX_CLIENTS at once.  A long request does not hold up others.
    """
    path = cache_dir / SOCKET_NAME
    _replace_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _address(path) as address:
            await sock.bind(address)
        os.chmod(path, 0o600)
        identity = os.stat(path).st_ino
        sock.listen(8)
    except BaseException:
        sock.close()
        raise
    limiter = trio.CapacityLimiter(MAX_CLIENTS)
    try:
        task_status.started()
        await trio.serve_listeners(
            lambda stream: _serve_client(stream, handle, limiter), [trio.SocketListener(sock)]
        )
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == identity:
                path.unlink()


class Progress:
    """Where a handler sends the progress lines of one request.

    ``send`` never raises: once the client has gone, the request is
    cancelled (nobody waits for its answer) and further sends do nothing.
    """

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self._stream = stream
        self._scope = scope
        self._lock = trio.Lock()
        self.client_gone = False

    async def send(self, fields: dict[str, Any]) -> None:
        if self.client_gone:
            return
        async with self._lock:
            try:
                await self._stream.send_all(_encode({"progress": fields}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.client_gone = True
                self._scope.cancel()


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


async def _serve_client(
    stream: trio.SocketStream, handle: Handler, limiter: trio.CapacityLimiter
) -> None:
    buffer = bytearray()
    async with limiter, stream:
        while True:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return
            if not data:
                return
            buffer += data
            while (end := buffer.find(b"\n")) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                with trio.CancelScope() as scope:
                    answer = await _answer(line, handle, Progress(stream, scope))
                if scope.cancelled_caught:
                    log.info("a control client left before its answer: its request was cancelled")
                    return
                try:
                    await stream.send_all(_encode(answer))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if len(buffer) > _MAX_LINE:
                return


async def _answer(line: bytes, handle: Handler, progress: Progress) -> dict[str, Any]:
    try:
        request = json.loads(line)
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            raise ValueError("a request is a JSON object with a 'command'")
    except ValueError as e:
        return {"ok": False, "error": f"bad request: {e}", "exit_code": 2}
    try:
        return {"ok": True, "result": await handle(request, progress)}
    except CacheFSError as e:
        return {"ok": False, "error": str(e), "exit_code": e.exit_code}
    except Exception as e:
        log.exception("control request %r failed", request.get("command"))
        return {"ok": False, "error": f"internal error: {e!r}", "exit_code": 1}


def request(
    mount: MountEntry,
    command: str,
    timeout: float = 30.0,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    **args: Any,
) -> Any:
    """Send one request to *mount* and return its result; raises on errors.

    Progress lines go to *on_progress*.  *timeout* bounds each wait for a
    line, so a long request that keeps reporting progress never times out.
    """
    path = mount.socket_path
    if path is None:
        raise MountUnreachable(f"cannot tell where the mount at {mount.mountpoint} keeps its cache")
    try:
        sock = _connect(path, timeout)
    except (ConnectionRefusedError, FileNotFoundError) as e:
        raise MountUnreachable(
            f"the mount at {mount.mountpoint} does not answer ({e.strerror}): "
            "is its daemon running?"
        ) from e
    except OSError as e:
        raise MountUnreachable(f"talking to the mount at {mount.mountpoint}: {e}") from e
    with sock, sock.makefile("rb") as replies:
        _talk(mount, sock.sendall, _encode({"command": command, **args}))
        while True:
            line = _talk(mount, replies.readline, _MAX_LINE)
            if not line:
                raise MountUnreachable(f"the mount at {mount.mountpoint} closed the connection")
            answer = json.loads(line)
            if "progress" not in answer:
                break
            if on_progress is not None:
                on_progress(answer["progress"])
    if not answer.get("ok"):
        raise RemoteError(answer.get("error", "request failed"), int(answer.get("exit_code", 1)))
    return answer.get("result")


def _talk(mount: MountEntry, io: Callable[[Any], Any], arg: Any) -> Any:
    """One socket operation, its OSError as MountUnreachable."""
    try:
        return io(arg)
    except OSError as e:
        raise MountUnreachable(f"talking to the mount at {mount.mountpoint}: {e}") from e


# -- stopping a mount --------------------------------------------------------------


def lazy_unmount(mountpoint: Path) -> None:
    """Detach *mountpoint* now (``fusermount3 -u -z``); the kernel lets go when it is idle."""
    if shutil.which("fusermount3"):
        cmd = ["fusermount3", "-u", "-z", str(mountpoint)]
    else:
        cmd = ["umount", "-l", str(mountpoint)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CacheFSError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


FUSECTL = Path("/sys/fs/fuse/connections")


def abort_connection(mount: MountEntry, fusectl: Path = FUSECTL) -> bool:
    """Abort the mount's FUSE connection: every request waiting on its
    daemon, and every later one, fails at once (ECONNABORTED, ENOTCONN).

    Through fusectl's ``abort`` file (mounted here if it is not, as root).
    False, with the reason logged, where that cannot be done.
    """
    # fusectl names a connection by its device number as the kernel encodes it.
    path = fusectl / str((mount.major << 20) | mount.minor) / "abort"
    if fusectl.is_dir() and not any(fusectl.iterdir()):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", str(fusectl)],
                capture_output=True,
                check=False,
                timeout=10,
            )
    try:
        path.write_text("1")
    except OSError as e:
        log.warning("cannot abort the FUSE connection of %s (%s): %s", mount.mountpoint, path, e)
        return False
    return True


def daemon_pid(cache_dir: Path | None) -> int | None:
    """The pid of the live process that holds *cache_dir*'s lock, if any."""
    if cache_dir is None:
        return None
    try:
        fd = os.open(cache_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: its holder wrote its pid in it
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """True once process *pid* has exited (zombies count), False after *timeout*."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
