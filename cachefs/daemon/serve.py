"""Wiring of a mount: options -> backend -> engine -> FUSE, in one nursery.

``serve_mount`` runs a mount in this process until it is unmounted (by
``cachefs unmount``, SIGTERM/SIGINT/SIGHUP, or ``fusermount3 -u``); on every
way out the FUSE session is closed, the engine commits its metadata and the
backend is closed.  A clean way out flushes the changed files first, once
the kernel has let go of the mount, for at most EXIT_FLUSH_DEADLINE
seconds (``cachefs unmount`` flushed them already, unless --keep-dirty
asked to leave them): what is left waits in the cache dir, and the next
mount of it flushes it.  ``cachefs.daemon.spawn`` runs the same thing as a
detached process.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial

import trio

from cachefs.contract import Backend
from cachefs.daemon.checks import check_fuse, check_mountpoint
from cachefs.daemon.flushes import flush_on_exit, log_left
from cachefs.daemon.options import MountOptions
from cachefs.daemon.sealedlog import NameTags, seal_log
from cachefs.daemon.session import serve_fuse
from cachefs.engine import open_file_cache
from cachefs.engine.miss.fetch import first_error
from cachefs.engine.state.crypto import read_key_material
from cachefs.errors import CacheFSError
from cachefs.fs.inodes import Namespace
from cachefs.fs.operations import KernelInvalidator
from cachefs.registry import open_backend, open_blob_store, wrapper

log = logging.getLogger(__name__)

LOG_NAME = "cachefs.log"
#: How long a daemon on its way out flushes changed files before it closes the cache.
EXIT_FLUSH_DEADLINE = 60.0


def run_mount(opts: MountOptions, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount in this process and serve until unmounted.

    A CacheFSError raised inside a nursery (a refused mount, say) is raised
    as itself, not as the exception group around it.
    """
    raise_fd_limit()
    if threading.current_thread() is threading.main_thread():
        # SIGUSR1 asks a serving mount for a state dump (cachefs.daemon.dump);
        # before it serves (a bucket listed, the index read) and while it
        # flushes on its way out, it must not end the process.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        trio.run(serve_mount, opts, on_ready)
    except BaseExceptionGroup as group:
        error = first_error(group)
        if isinstance(error, CacheFSError):
            raise error from group
        raise


def raise_fd_limit() -> None:
    """Raise the soft limit on open fds to the hard limit.

    The cache keeps recently used data files open, up to a quarter of the
    soft limit (engine/state/catalog.py): the usual 1024 would keep only 256.
    Nothing in the daemon selects on an fd it opens later (select() stops at
    1024); a refusal leaves the limit as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:  # an infinite hard limit is above the kernel's cap
        log.debug("cannot raise the fd limit from %d: %s", soft, e)


async def serve_mount(opts: MountOptions, on_ready: Callable[[], None] = lambda: None) -> None:
    """Mount, call *on_ready*, serve until unmounted; always leave the cache consistent."""
    # Encrypted, no name reaches the log or the trace in clear: they carry the
    # cache key's name tags, as the index does (known once the cache is open;
    # nothing is read before).
    tags = NameTags()
    if opts.encrypt:
        seal_log(tags)
    check_fuse(opts.allow_other)
    check_mountpoint(opts.mountpoint)
    # A remote source is checked when opened (an S3 bucket is listed once,
    # within its own deadline): off the loop, which serves nothing yet anyway.
    backend: Backend = await trio.to_thread.run_sync(
        partial(open_backend, opts.source, **opts.backend_options)
    )
    invalidator = KernelInvalidator()
    # The wrappers in the order given, innermost first (the command line
    # stacks trace(faults(throttle(source))): the throttle slows the source
    # down as a remote store would, and the trace records what the faults
    # returned).  Encrypted, a wrapper shows file ids as name tags only.
    try:
        for name, value in opts.wrappers:
            backend = wrapper(name).wrap(backend, value, tags if opts.encrypt else str)
        async with AsyncExitStack() as stack:
            member = None
            on_invalidate: Callable[[str], None] = invalidator.notify
            if opts.group is not None:
                # The group's records replicate in the background; the hosted
                # cache, when there is one, goes in front of the origin.  (The
                # record store is loaded by mounts in a group only.)
                from cachefs.group.member import open_member

                member = await stack.enter_async_context(
                    open_member(opts.group, opts.config.block_size, backend, open_blob_store)
                )
                backend = member.backend
                on_invalidate = _both(invalidator.notify, member.on_retired)
            log.info("backend: %r", backend)
            key = None
            if opts.encrypt:
                key_file = None if opts.key_file is None else str(opts.key_file)
                key = read_key_material(key_file, os.environ)
            async with open_file_cache(
                backend,
                opts.cache_dir,
                opts.config,
                on_invalidate=on_invalidate,
                key_material=key,
            ) as cache:
                if cache.catalog.key is not None:
                    tags.use(cache.catalog.key.name_tag)
                namespace = Namespace(cache)
                if await serve_fuse(opts, cache, namespace, invalidator, on_ready, member):
                    await flush_on_exit(cache, EXIT_FLUSH_DEADLINE)
                else:
                    log_left(cache, "left for the next mount", logging.INFO)
            log.info("cache metadata committed")
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()


def _both(first: Callable[[str], None], second: Callable[[str], None]) -> Callable[[str], None]:
    def both(file_id: str) -> None:
        first(file_id)
        second(file_id)

    return both
