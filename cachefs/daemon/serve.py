"""Wiring of a mount: options -> backend -> engine -> FUSE, in one nursery.

``serve_mount`` runs a mount in this process until it is unmounted (by
``cachefs unmount``, SIGTERM/SIGINT/SIGHUP, or ``fusermount3 -u``); on every
way out the FUSE session is closed, the engine commits its metadata and the
backend is closed.  ``spawn_daemon`` starts the same thing as a detached
process and returns once the mount is ready, or raises with the reason it
failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

import cachefs
from backends.faulty import FaultyBackend
from backends.throttled import throttle
from backends.trace import TraceBackend
from cachefs import fuse
from cachefs.contract import Backend
from cachefs.control.protocol import SUBTYPE, MountEntry, fsname_for, mount_at, serve_control
from cachefs.daemon.commands import ControlCommands
from cachefs.daemon.sealedlog import NameTags, seal_log
from cachefs.engine import CacheConfig, FileCache, open_file_cache
from cachefs.engine.miss.fetch import first_error
from cachefs.engine.state.cachedir import check_cache_dir, open_own_file
from cachefs.engine.state.crypto import read_key_material
from cachefs.errors import CacheDirError, CacheFSError, ConfigError, MountFailed
from cachefs.fs.inodes import Namespace
from cachefs.fs.operations import KernelInvalidator, Operations
from cachefs.registry import open_backend, source_scheme

log = logging.getLogger(__name__)

#: Requests in flight get this long to finish after an unmount was asked for.
UNMOUNT_GRACE = 10.0
#: The kernel sends INIT at once; this only bounds a broken mount's start.
INIT_DEADLINE = 10.0
LOG_NAME = "cachefs.log"


@dataclass(frozen=True, slots=True)
class MountOptions:
    source: str
    mountpoint: Path
    cache_dir: Path
    config: CacheConfig
    faults: Path | None = None
    trace: Path | None = None
    throttle: str | None = None
    readahead_kb: int = 1024
    #: keyword options of the source's backend factory (the ``--s3-*`` options)
    backend_options: dict[str, Any] = field(default_factory=dict)
    #: encrypt the cache at rest, the key from key_file or CACHEFS_KEY
    encrypt: bool = False
    key_file: Path | None = None
    #: let the kernel read whole cached files by itself (FUSE passthrough)
    passthrough: bool = True


def normalize_source(source: str) -> str:
    """A plain path made absolute; URLs as written."""
    if source_scheme(source) == "file" and "://" not in source:
        return os.path.abspath(source)
    return source


def default_cache_dir(identity: str) -> Path:
    """``$XDG_CACHE_HOME/cachefs/<hash>`` (root: ``/var/cache/cachefs/<hash>``).

    *identity* names what is cached: the source, and for a bucket its endpoint
    (``cachefs.cli.s3options.cache_identity``), so that two sources never share a dir.
    """
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    if os.geteuid() == 0:
        base = Path("/var/cache")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cachefs" / digest


def prepare_cache_dir(path: Path) -> Path:
    """Create *path* (mode 0700) if needed; its absolute form.

    CacheDirError unless it is a directory of this user's (check_cache_dir);
    the mount makes it owner-only when it opens it.
    """
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
    except FileExistsError:
        pass  # a dangling symlink, or a file: check_cache_dir says which
    except OSError as e:
        raise CacheDirError(f"cannot create cache dir {path}: {e.strerror}") from None
    check_cache_dir(path)
    return path


def check_fuse(device: str = "/dev/fuse", fusermount: str = "fusermount3") -> None:
    """ConfigError unless this machine can mount FUSE file systems."""
    if not os.path.exists(device):
        raise ConfigError(
            f"{device} is missing: install fuse3 (apt-get install fuse3), "
            "or give the container the device (--device /dev/fuse)"
        )
    if not os.access(device, os.R_OK | os.W_OK):
        raise ConfigError(f"no permission to open {device}: run as root or fix its mode")
    if os.geteuid() != 0 and shutil.which(fusermount) is None:
        raise ConfigError("fusermount3 is missing: install fuse3 (apt-get install fuse3)")


def check_mountpoint(path: Path) -> None:
    """ConfigError unless *path* is an empty directory that is not mounted on."""
    if mount_at(path) is not None:
        raise ConfigError(f"{path} is already a cachefs mount point")
    try:
        entries = os.listdir(path)
    except FileNotFoundError:
        raise ConfigError(f"mount point {path} does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"mount point {path} is not a directory") from None
    except OSError as e:
        raise ConfigError(
            f"mount point {path} is unusable ({e.strerror}); "
            f"if it is a stale mount, run: fusermount3 -u -z {path}"
        ) from None
    if entries:
        raise ConfigError(f"mount point {path} is not empty")


def run_mount(opts: MountOptions, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount in this process and serve until unmounted.

    A CacheFSError raised inside a nursery (a refused mount, say) is raised
    as itself, not as the exception group around it.
    """
    try:
        trio.run(serve_mount, opts, on_ready)
    except BaseExceptionGroup as group:
        error = first_error(group)
        if isinstance(error, CacheFSError):
            raise error from group
        raise


async def serve_mount(opts: MountOptions, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount, call *on_ready*, serve until unmounted; always leave the cache consistent."""
    # Encrypted, no name reaches the log or the trace in clear: they carry the
    # cache key's name tags, as the index does (known once the cache is open;
    # nothing is read before).
    tags = NameTags()
    if opts.encrypt:
        seal_log(tags)
    check_fuse()
    check_mountpoint(opts.mountpoint)
    # A remote source is checked when opened (an S3 bucket is listed once,
    # within its own deadline): off the loop, which serves nothing yet anyway.
    backend: Backend = await trio.to_thread.run_sync(
        partial(open_backend, opts.source, **opts.backend_options)
    )
    # trace(faulty(throttled(source))): the throttle slows the source down as a
    # remote store would, and the trace records what the faults returned.
    try:
        if opts.throttle is not None:
            backend = throttle(backend, opts.throttle)
        if opts.faults is not None:
            backend = FaultyBackend(backend, opts.faults)
        if opts.trace is not None:
            backend = TraceBackend(backend, opts.trace, name=tags if opts.encrypt else str)
        log.info("backend: %r", backend)
        invalidator = KernelInvalidator()
        key = None
        if opts.encrypt:
            key_file = None if opts.key_file is None else str(opts.key_file)
            key = read_key_material(key_file, os.environ)
        async with open_file_cache(
            backend,
            opts.cache_dir,
            opts.config,
            on_invalidate=invalidator.notify,
            key_material=key,
        ) as cache:
            if cache.catalog.key is not None:
                tags.use(cache.catalog.key.name_tag)
            namespace = Namespace(cache)
            await _serve_fuse(opts, cache, namespace, invalidator, on_ready)
        log.info("cache metadata committed")
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()


class _Session:
    """The FUSE session's life: mounting, and stopping gently, then by cancellation."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.fuse: fuse.Session | None = None
        self.stopping = False

    def serve(self, session: fuse.Session) -> None:
        self.fuse = session
        self._nursery.start_soon(self._run_fuse, session)

    def stop(self) -> None:
        if self.stopping or self.fuse is None:
            self._nursery.cancel_scope.cancel()
            return
        self.stopping = True
        self.fuse.stop()
        self._nursery.start_soon(self._cancel_after_grace)

    async def _cancel_after_grace(self) -> None:
        await trio.sleep(UNMOUNT_GRACE)
        log.warning("requests still running %.0f s after unmount: cancelling them", UNMOUNT_GRACE)
        self._nursery.cancel_scope.cancel()

    async def _run_fuse(self, session: fuse.Session) -> None:
        await session.serve()
        log.info("file system loop ended")
        self._nursery.cancel_scope.cancel()

    async def watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                self.stop()


async def _serve_fuse(
    opts: MountOptions,
    cache: FileCache,
    namespace: Namespace,
    invalidator: KernelInvalidator,
    on_ready: Callable[[], None],
) -> None:
    connection: fuse.Connection | None = None
    try:
        async with trio.open_nursery() as nursery:
            session = _Session(nursery)
            nursery.start_soon(session.watch_signals)
            commands = ControlCommands(
                cache,
                namespace,
                source=opts.source,
                mountpoint=opts.mountpoint,
                stop=session.stop,
                invalidate=invalidator.drop_pages,
            )
            # The control socket first: once the mount is visible, it answers.
            await nursery.start(serve_control, opts.cache_dir, commands)
            initialized = trio.Event()
            connection = await fuse.mount(opts.mountpoint, fsname_for(opts.cache_dir), SUBTYPE)
            ops = Operations(namespace, cache, connection, on_init=initialized.set)
            # Registering a backing file needs CAP_SYS_ADMIN: offered as root only.
            passthrough = opts.passthrough and os.geteuid() == 0
            session.serve(fuse.Session(ops, connection, passthrough=passthrough))
            await nursery.start(invalidator.serve, namespace, connection.invalidate_inode)
            await _tune_when_initialized(opts, initialized)
            log.info("mounted %s on %s (cache %s)", opts.source, opts.mountpoint, opts.cache_dir)
            on_ready()
    finally:
        if connection is not None:
            connection.close()
            log.info("unmounted %s", opts.mountpoint)


async def _tune_when_initialized(opts: MountOptions, initialized: trio.Event) -> None:
    """Tune the mount once the kernel has taken our answer to its INIT request.

    Not before: the kernel sets the mount's readahead from that answer, to at
    most what it offered at mount time (its 128 KiB default), and so undoes
    any earlier setting.
    """
    with trio.move_on_after(INIT_DEADLINE):
        await initialized.wait()
    if not initialized.is_set():
        log.warning("no FUSE INIT request within %.0f s: the mount is not tuned", INIT_DEADLINE)
        return
    entry = mount_at(opts.mountpoint)
    if entry is None:
        log.warning("%s is not in /proc/self/mountinfo: not tuned", opts.mountpoint)
        return
    await trio.to_thread.run_sync(tune, entry, opts.readahead_kb)


def tune(entry: MountEntry, readahead_kb: int) -> None:
    """Raise the mount's readahead; warn on failure.

    Call it after the FUSE INIT handshake, or the kernel resets the readahead
    (to at most what it offered in INIT, its 128 KiB default).
    """
    # The mount's bdi is named after its st_dev, as mountinfo shows it.
    bdi = Path(f"/sys/class/bdi/{entry.major}:{entry.minor}/read_ahead_kb")
    try:
        bdi.write_text(f"{readahead_kb}\n")
    except OSError as e:
        log.warning("cannot set readahead (%s): %s", bdi, e.strerror)
    else:
        log.debug("%s: %s", bdi, bdi.read_text().strip())


# -- running as a daemon ------------------------------------------------------


class Readiness:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        except OSError:
            pass  # the parent gave up waiting
        finally:
            os.close(fd)

    def ready(self) -> None:
        self._send("ok\n")

    def failed(self, exit_code: int, message: str) -> None:
        self._send(f"error {exit_code} {' '.join(message.split())}\n")


def spawn_daemon(argv: list[str], log_path: Path, timeout: float) -> int:
    """Start ``cachefs <argv> --ready-fd N`` detached; return its pid once ready."""
    read_end, write_end = os.pipe()
    env = dict(os.environ)
    package_root = str(Path(cachefs.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        log_fd = open_own_file(log_path, os.O_WRONLY | os.O_APPEND)
        with open(log_fd, "ab") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cachefs", *argv, "--ready-fd", str(write_end)],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
                cwd="/",
                env=env,
            )
    finally:
        os.close(write_end)
    try:
        line = _read_line(read_end, timeout)
    finally:
        os.close(read_end)
    if line == "ok":
        return proc.pid
    if line is None:
        proc.terminate()
        raise MountFailed(f"the mount was not ready within {timeout:.0f} s; see {log_path}")
    if line.startswith("error "):
        _, code, message = line.split(" ", 2)
        raise MountFailed(message, int(code))
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
    raise MountFailed(f"the mount daemon exited (status {status}); see {log_path}")


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from *fd*; "" on EOF; None if none came in time."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()
