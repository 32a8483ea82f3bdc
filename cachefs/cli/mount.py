"""``cachefs mount`` and ``cachefs publish``: options checked, then the daemon started.

Bad options fail here, in the user's process, as one line and exit 2; what
only the daemon can find (a wrong key, a busy cache dir) comes back through
its readiness pipe.  The daemon (``mount --foreground``) checks its own
command line again: the parser, mount_options and check_apart here, the
rest where it mounts.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import trio

from backends.faulty import load_rules
from backends.trace import open_trace
from cachefs.cli import s3options
from cachefs.daemon.checks import check_fuse, check_mountpoint, prepare_cache_dir
from cachefs.daemon.options import MountOptions, default_cache_dir, normalize_source
from cachefs.daemon.serve import LOG_NAME, run_mount
from cachefs.daemon.spawn import Readiness, spawn_daemon
from cachefs.engine import CacheConfig
from cachefs.engine.state.crypto import read_key_material
from cachefs.errors import CacheFSError, ConfigError
from cachefs.publish import run_publish
from cachefs.registry import local_path, open_backend
from cachefs.units import format_size

READY_TIMEOUT = 60.0


def mount_options(args: argparse.Namespace) -> MountOptions:
    """Check and complete the mount options; creates nothing (cmd_mount makes the
    cache dir, once everything that can be refused has been checked)."""
    block_size = args.block_size
    if args.cache_size is not None and args.cache_size < block_size:
        raise ConfigError(
            f"--cache-size {format_size(args.cache_size)} is smaller than one cache block "
            f"({format_size(block_size)})"
        )
    source = normalize_source(args.source)
    backend_options = s3options.from_args(args, source)
    cache_dir = Path(
        os.path.abspath(
            args.cache_dir or default_cache_dir(s3options.cache_identity(source, backend_options))
        )
    )
    min_free = args.min_free
    if isinstance(min_free, float):
        st = _statvfs_where(cache_dir)
        min_free = int(st.f_blocks * st.f_frsize * min_free)
    if args.key_file is not None and not args.encrypt:
        raise ConfigError("--key-file is only used with --encrypt")
    key_file = Path(os.path.abspath(args.key_file)) if args.key_file else None
    if args.encrypt:
        read_key_material(None if key_file is None else str(key_file), os.environ)
    faults = Path(os.path.abspath(args.faults)) if args.faults else None
    if faults is not None:
        load_rules(faults)  # RulesError: one line, exit 2, before a daemon starts
    config = CacheConfig(
        block_size=block_size,
        verify=args.verify,
        io_uring=args.io_uring,
        ttl=args.ttl,
        retries=args.retries,
        cache_size=args.cache_size,
        min_free=min_free,
        max_readahead=args.max_readahead,
        max_fetches=args.max_fetches,
    )
    config.validate()
    return MountOptions(
        source=source,
        mountpoint=Path(os.path.realpath(args.mountpoint)),
        cache_dir=cache_dir,
        config=config,
        faults=faults,
        trace=Path(os.path.abspath(args.trace)) if args.trace else None,
        throttle=args.throttle,
        readahead_kb=args.readahead_kb,
        backend_options=backend_options,
        encrypt=args.encrypt,
        key_file=key_file,
        passthrough=args.passthrough,
    )


def _statvfs_where(path: Path) -> os.statvfs_result:
    """statvfs of *path*, or else of its nearest ancestor there is: where it will be made."""
    for where in (path, *path.parents):
        try:
            return os.statvfs(where)
        except OSError:
            continue
    return os.statvfs("/")


def _daemon_argv(opts: MountOptions, log_level: str) -> list[str]:
    argv = [
        "mount",
        opts.source,
        str(opts.mountpoint),
        "--foreground",
        f"--cache-dir={opts.cache_dir}",
        f"--block-size={opts.config.block_size}",
        f"--ttl={opts.config.ttl!r}",
        f"--retries={opts.config.retries}",
        f"--max-readahead={opts.config.max_readahead}",
        f"--max-fetches={opts.config.max_fetches}",
        f"--readahead-kb={opts.readahead_kb}",
        f"--verify={opts.config.verify}",
        f"--log-level={log_level}",
    ]
    if opts.config.cache_size is not None:
        argv.append(f"--cache-size={opts.config.cache_size}")
    if opts.config.min_free is not None:
        argv.append(f"--min-free={opts.config.min_free}")
    if not opts.config.io_uring:
        argv.append("--no-io-uring")
    if not opts.passthrough:
        argv.append("--no-passthrough")
    if opts.encrypt:
        argv.append("--encrypt")  # CACHEFS_KEY, if that is the key, is inherited
    if opts.key_file:
        argv.append(f"--key-file={opts.key_file}")
    if opts.faults:
        argv.append(f"--faults={opts.faults}")
    if opts.trace:
        argv.append(f"--trace={opts.trace}")
    if opts.throttle:
        argv.append(f"--throttle={opts.throttle}")
    return argv + s3options.to_argv(opts.backend_options)


def check_apart(source: str, mountpoint: Path, cache_dir: Path | None = None) -> None:
    """ConfigError if the mount would reach into itself, which deadlocks it.

    Refused: MOUNTPOINT is SOURCE, lies below it, or holds it; the cache dir
    lies at or below MOUNTPOINT.  Paths are compared with symlinks resolved,
    and as (device, inode), so a bind mount of SOURCE counts as SOURCE.  Only
    local sources have a path: an ``s3://`` source is never refused here.
    """
    mountpoint = Path(os.path.realpath(mountpoint))
    root = local_path(source)  # SourceError if malformed: as the backend reads it
    if root is not None:
        src = Path(os.path.realpath(root))
        if _at_or_below(mountpoint, src):
            where = "the source itself" if _same(mountpoint, src) else f"inside the source {src}"
            raise ConfigError(
                f"mount point {mountpoint} is {where}: the mount would read itself; "
                "choose a mount point outside the source"
            )
        if _at_or_below(src, mountpoint):
            raise ConfigError(f"source {src} is inside the mount point {mountpoint}")
    if cache_dir is not None and _at_or_below(Path(os.path.realpath(cache_dir)), mountpoint):
        raise ConfigError(f"cache dir {cache_dir} is inside the mount point {mountpoint}")


def _at_or_below(path: Path, top: Path) -> bool:
    """Whether real path *path* is *top* or below it."""
    return any(_same(p, top) for p in (path, *path.parents))


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _check_source(source: str, options: dict[str, Any]) -> None:
    """Open and close the source (an S3 bucket: one listing, at most ~15 s)."""
    backend = open_backend(source, **options)
    trio.run(backend.aclose)


def _check_before_cache_dir(args: argparse.Namespace) -> None:
    """What can fail before the cache dir is made: FUSE, the mount point, the source."""
    source = normalize_source(args.source)
    options = s3options.from_args(args, source)
    check_fuse()
    mountpoint = Path(os.path.realpath(args.mountpoint))
    check_mountpoint(mountpoint)
    check_apart(source, mountpoint)
    _check_source(source, options)


def cmd_mount(args: argparse.Namespace) -> int:
    readiness = Readiness(args.ready_fd)
    try:
        if not args.foreground:
            _check_before_cache_dir(args)
        opts = mount_options(args)
        check_apart(opts.source, opts.mountpoint, opts.cache_dir)
        if opts.trace is not None:
            open_trace(opts.trace).close()  # the mount opens it again, the same way
        prepare_cache_dir(opts.cache_dir)  # only now: a refused mount leaves nothing behind
        if args.foreground:
            run_mount(opts, on_ready=readiness.ready)
        else:
            log_path = opts.cache_dir / LOG_NAME
            spawn_daemon(_daemon_argv(opts, args.log_level or "info"), log_path, READY_TIMEOUT)
    except CacheFSError as e:
        readiness.failed(e.exit_code, str(e))
        raise
    except BaseException as e:
        readiness.failed(1, f"internal error: {e!r}")
        raise
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    source = normalize_source(args.source)
    return run_publish(source, args.block_size, s3options.from_args(args, source))
