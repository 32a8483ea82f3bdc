"""The FUSE session's life in the daemon: mounted, served, stopped gently, then by cancellation.

However the session ends, the kernel is let go first; ``serve_fuse`` then
says whether the daemon is to flush the changed files on its way out
(cachefs.daemon.serve): always, unless ``cachefs unmount --keep-dirty``
asked to leave them for the next mount.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import trio

from cachefs import fuse
from cachefs.control.mounts import SUBTYPE, fsname_for
from cachefs.control.server import serve_control
from cachefs.daemon.commands import ControlCommands
from cachefs.daemon.dump import log_state
from cachefs.daemon.options import MountOptions
from cachefs.daemon.tuning import tune_when_initialized
from cachefs.engine import FileCache
from cachefs.fs.inodes import Namespace
from cachefs.fs.operations import KernelInvalidator, Operations
from cachefs.latency import Latencies

if TYPE_CHECKING:  # the record store is loaded by mounts in a group only
    from cachefs.group.member import Member

log = logging.getLogger(__name__)

#: Requests in flight get this long to finish after an unmount was asked for.
UNMOUNT_GRACE = 10.0


class _Session:
    """The FUSE session's life: mounting, and stopping gently, then by cancellation."""

    def __init__(self, nursery: trio.Nursery, cache: FileCache, namespace: Namespace) -> None:
        self._nursery = nursery
        self._cache = cache  # what a state dump shows (SIGUSR1), with the namespace
        self._namespace = namespace
        self.fuse: fuse.Mounted | None = None
        self.stopping = False
        #: The changed files are left in the cache dir, unflushed (unmount --keep-dirty).
        self.keep_dirty = False

    def keep_changes(self) -> None:
        self.keep_dirty = True

    def serve(self, session: fuse.Mounted) -> None:
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

    async def _run_fuse(self, session: fuse.Mounted) -> None:
        await session.serve()
        log.info("file system loop ended")
        self._nursery.cancel_scope.cancel()

    async def watch_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP unmount; SIGUSR1 logs the mount's state
        (cachefs.daemon.dump) and it goes on serving."""
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with trio.open_signal_receiver(*stops, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    try:
                        log_state(self._cache, self._namespace)
                    except Exception:  # a dump must not take the mount down
                        log.exception("the state dump failed")
                    continue
                log.info("%s: unmounting", signal.Signals(signum).name)
                self.stop()


async def serve_fuse(
    opts: MountOptions,
    cache: FileCache,
    namespace: Namespace,
    invalidator: KernelInvalidator,
    on_ready: Callable[[], None],
    member: Member | None = None,
) -> bool:
    """Mount, serve until unmounted, let the kernel go; whether the changed
    files are to be flushed now (False: kept for the next mount)."""
    mount_fs = fuse.transport(opts.fuse)
    mounted: fuse.Mounted | None = None
    try:
        async with trio.open_nursery() as nursery:
            session = _Session(nursery, cache, namespace)
            nursery.start_soon(session.watch_signals)
            commands = ControlCommands(
                cache,
                namespace,
                source=opts.source,
                mountpoint=opts.mountpoint,
                stop=session.stop,
                invalidate=invalidator.drop_pages,
                member=member,
                keep_dirty=session.keep_changes,
            )
            # The control socket first: once the mount is visible, it answers.
            await nursery.start(serve_control, opts.cache_dir, commands)
            timer = None
            if opts.metrics is not None:
                # Before the mount: an address it cannot listen on fails it, nothing
                # mounted.  (prometheus_client is loaded by such mounts only.)
                from cachefs.daemon.metrics import MetricsServer

                timer = Latencies()
                await nursery.start(MetricsServer(commands.stats, timer).serve, opts.metrics)
            initialized = trio.Event()

            def make_ops(kernel: fuse.Kernel) -> Operations:
                return Operations(namespace, cache, kernel, on_init=initialized.set)

            # Registering a backing file needs CAP_SYS_ADMIN: offered as root only.
            passthrough = opts.passthrough and os.geteuid() == 0
            if opts.passthrough and not passthrough:
                log.info(
                    "passthrough off: registering cache files for the kernel to read needs "
                    "root; every read of the mount is answered by cachefs"
                )
            mounted = await mount_fs(
                opts.mountpoint,
                fsname_for(opts.cache_dir),
                SUBTYPE,
                make_ops,
                passthrough=passthrough,
                allow_other=opts.allow_other,
                timer=timer,
            )
            session.serve(mounted)
            kernel = mounted.kernel
            await nursery.start(
                invalidator.serve, namespace, kernel.invalidate_inode, kernel.invalidate_entry
            )
            await tune_when_initialized(opts, initialized)
            if member is not None:
                from cachefs.group.status import Described

                described = Described(str(opts.mountpoint), opts.source, _software())
                await nursery.start(
                    member.serve, cache, opts.cache_dir, invalidator.forget_entry, described
                )
            log.info("mounted %s on %s (cache %s)", opts.source, opts.mountpoint, opts.cache_dir)
            if cache.read_only_reason is not None and not opts.config.read_only:
                log.info("mounted read-only: %s", cache.read_only_reason)
            limit = cache.space()[0]
            if cache.writable and (opts.config.max_dirty or 0) > limit:
                log.warning(
                    "--max-dirty %d is more than the cache size (%d bytes): changes not yet"
                    " flushed may fill the cache",
                    opts.config.max_dirty,
                    limit,
                )
            on_ready()
    finally:
        if mounted is not None:
            mounted.close()
            log.info("unmounted %s", opts.mountpoint)
    return not session.keep_dirty


def _software() -> str:
    """``cachefs <version>`` as installed."""
    try:
        return f"cachefs {version('cachefs')}"
    except PackageNotFoundError:
        return "cachefs (not installed)"
