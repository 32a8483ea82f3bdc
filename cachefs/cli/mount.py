"""``cachefs mount`` and ``cachefs publish``: their options, checked once, then the
mount started (in this process with ``--foreground``, else as a daemon).

Each option is declared once, here, with its type, range and help; what
the parser cannot see alone (sizes against each other, the key, a faults
or trace file) ``mount_options`` checks, turning the parsed command line
into the MountOptions the mount runs with.  Bad options fail in the user's
process, as one line and exit 2; the daemon is handed the checked options
as data (cachefs.daemon.spawn), and what only it can find (a wrong key, a
busy cache dir) comes back through its readiness pipe.
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path
from typing import Any

import trio

from cachefs.cli import s3options
from cachefs.cli.options import (
    MAX_FETCHES,
    MAX_READAHEAD_KB,
    MAX_RETRIES,
    MAX_TIMEOUT,
    MAX_TTL,
    AddCommand,
    block_size,
    checked_by,
    listen_address,
    non_empty,
    number,
    size,
    size_or_percent,
)
from cachefs.daemon.checks import (
    check_apart,
    check_fuse,
    check_mountpoint,
    check_shared_cache_apart,
    prepare_cache_dir,
)
from cachefs.daemon.notify import notify
from cachefs.daemon.options import MountOptions, default_cache_dir, normalize_source
from cachefs.daemon.serve import LOG_NAME, run_mount
from cachefs.daemon.spawn import Orders, spawn_daemon
from cachefs.engine import CacheConfig
from cachefs.engine.state.crypto import read_key_material
from cachefs.errors import ConfigError
from cachefs.fuse import TRANSPORTS, check_transport
from cachefs.group.options import TRUST_MODES, MemberOptions
from cachefs.publish import run_publish
from cachefs.registry import open_backend, open_blob_store, source_scheme, wrapper
from cachefs.units import format_size

READY_TIMEOUT = 60.0
DEFAULTS = CacheConfig()
#: The least --max-dirty: room for the largest write the kernel sends, and then some.
MIN_MAX_DIRTY = 1 << 20


def _throttle(text: str) -> str:
    return wrapper("throttle").check(text)


def add_mount(add: AddCommand) -> None:
    mount = add(
        "mount",
        "mount SOURCE on MOUNTPOINT",
        "Mount SOURCE (a directory, file:///abs/path or s3://BUCKET[/PREFIX]) on "
        "MOUNTPOINT, read-write where SOURCE can be written (read-only with --read-only, "
        "or over an encrypted cache). "
        "Returns once the mount is ready, or with the reason it failed; "
        "the daemon logs to cachefs.log in the cache dir.",
    )
    option = mount.add_argument
    option(
        "source",
        metavar="SOURCE",
        type=non_empty,
        help="directory path, file:///abs/path or s3://BUCKET[/PREFIX]",
    )
    option(
        "mountpoint",
        metavar="MOUNTPOINT",
        type=non_empty,
        help="an empty directory, outside SOURCE",
    )
    option(
        "--cache-dir",
        metavar="DIR",
        type=non_empty,
        help="where cached blocks and metadata live (default: "
        "$XDG_CACHE_HOME/cachefs/<hash of SOURCE and S3 endpoint>, "
        "as root /var/cache/cachefs/<hash>)",
    )
    _block_size_option(
        mount,
        "cache block size, a power of two from 4K to 64M (default: 1M); "
        "fixed for the life of a cache dir",
    )
    option(
        "--ttl",
        metavar="SECONDS",
        type=number(float, 0, MAX_TTL),
        default=60.0,
        help="how long attributes and listings are trusted before asking SOURCE again, "
        f"0 to {MAX_TTL} (a year) (default: 60)",
    )
    option(
        "--retries",
        metavar="N",
        type=number(int, 0, MAX_RETRIES),
        default=3,
        help="retries of a failing read, with backoff, before the reader gets EIO, "
        f"0 to {MAX_RETRIES} (default: 3)",
    )
    option(
        "--cache-size",
        metavar="SIZE",
        type=size,
        help="most bytes of cached blocks to keep; the least recently read go first "
        "(default: 10G or 80%% of the cache filesystem's free space, whichever is smaller)",
    )
    option(
        "--min-free",
        metavar="SIZE|N%",
        type=size_or_percent,
        help="free space to leave on the cache filesystem, evicting to keep it: a size, or a "
        "percentage of the filesystem like 5%% (default: 5%%)",
    )
    option(
        "--max-readahead",
        metavar="SIZE",
        type=size,
        default=DEFAULTS.max_readahead,
        help="how far ahead of a sequential reader to fetch, in windows growing from 1M "
        f"(default: {DEFAULTS.max_readahead >> 20}M; 0 disables)",
    )
    option(
        "--max-fetches",
        metavar="N",
        type=number(int, 1, MAX_FETCHES),
        default=DEFAULTS.max_fetches,
        help=f"ReadData calls in flight at once (default: {DEFAULTS.max_fetches}), "
        f"at most {MAX_FETCHES}",
    )
    option(
        "--verify",
        choices=("once", "always", "off"),
        default=DEFAULTS.verify,
        help="check blocks read from the cache disk against their SHA-256: once per block "
        "per mount, always, or off (no hashing, no content information; fastest). Blocks "
        "from the source are checked against its published content information either way "
        "unless off (default: once)",
    )
    option(
        "--no-io-uring",
        dest="io_uring",
        action="store_false",
        help="read cache hits that are not in the page cache through a pool of threads "
        "instead of io_uring. By default io_uring is used where the kernel allows it "
        "(`cachefs stats` shows which: disk reads); it costs about a quarter of the CPU "
        "per read",
    )
    option(
        "--no-passthrough",
        dest="passthrough",
        action="store_false",
        help="answer every read of the mount in cachefs. By default a file the cache holds "
        "whole (every block, checked) is opened for the kernel to read from the cache file "
        "itself, at the disk's speed (FUSE passthrough: Linux 6.9 or later, as root; plain "
        "caches only). Reads of such opens then do not show in `cachefs stats` hits",
    )
    option(
        "--fuse",
        choices=TRANSPORTS,
        default=TRANSPORTS[0],
        help="the FUSE transport: native is cachefs's own, with passthrough; pyfuse3 runs "
        "on libfuse through pyfuse3, without passthrough, and needs the extra "
        "cachefs[pyfuse3] (default: native)",
    )
    option(
        "--encrypt",
        action="store_true",
        help="keep the cache encrypted at rest (AES-256-GCM per block; file names sealed). "
        "The key comes from --key-file or the CACHEFS_KEY environment variable: 32 random "
        "bytes, 64 hex digits, or a passphrase (stretched with scrypt). A cache dir made with "
        "a key refuses any other key, and refuses to mount without one",
    )
    option(
        "--key-file",
        metavar="FILE",
        type=non_empty,
        help="the --encrypt key (raw 32 bytes, hex, or a passphrase); chmod 600 it",
    )
    option(
        "--faults",
        metavar="FILE",
        type=non_empty,
        help="inject failures of reads, writes and name changes from a JSON rules file,"
        " re-read while mounted (testing)",
    )
    option(
        "--trace",
        metavar="FILE",
        type=non_empty,
        help="append one JSON line per backend ReadData and WriteData call and name change"
        " to FILE (testing, diagnosis)",
    )
    option(
        "--throttle",
        metavar="LATENCY_MS,MIBPS",
        type=checked_by(_throttle),
        help="simulate a remote store: per-request first-byte latency in ms and "
        "per-connection bandwidth in MiB/s (benchmarks, testing)",
    )
    option(
        "--readahead-kb",
        metavar="N",
        type=number(int, 0, MAX_READAHEAD_KB),
        default=1024,
        help=f"kernel readahead of the mount in KiB, 0 to {MAX_READAHEAD_KB} (default: 1024)",
    )
    option("--foreground", action="store_true", help="serve in this process, logging to stderr")
    option(
        "--metrics",
        metavar="HOST:PORT",
        type=listen_address,
        help="serve Prometheus metrics at http://HOST:PORT/metrics: the counters of "
        "`cachefs stats`, and latency histograms of ReadData calls and of FUSE requests by "
        "operation (docs/metrics.md). Off by default; 127.0.0.1:9464 serves this machine only",
    )
    option(
        "--allow-other",
        action="store_true",
        help="let users other than the one who mounts use the mount (FUSE allow_other). Every "
        "file shows as owned by the user who mounted, with its mode from SOURCE, and each "
        "user is checked against that. A user other than root needs user_allow_other in "
        "/etc/fuse.conf (docs/service.md#non-root-mounts)",
    )
    _write_options(mount)
    s3options.add_arguments(mount)
    _group_options(mount)
    mount.set_defaults(run=cmd_mount)


def _write_options(parser: argparse.ArgumentParser) -> None:
    writes = parser.add_argument_group(
        "Changes",
        "A change lands in the cache dir first (a write returns once it is there) and is "
        "sent to SOURCE later: --write-back-delay seconds after the last process that "
        "changed a file closed it, at once on fsync (which returns when SOURCE has it), "
        "`cachefs flush PATH` and `cachefs unmount` (unless --keep-dirty). Every reader of "
        "the mount sees a change at once. While SOURCE is offline, changes keep landing in "
        "the cache and are sent once it is back (`cachefs reset-external-error`); what is "
        "not sent when the mount ends waits in the cache dir and is sent by the next mount "
        "of it (after a crash too: at least all that fsync acknowledged). A file changed in "
        "SOURCE meanwhile is never overwritten: the changes made here go to "
        "NAME.conflict-<UTC time> beside it. "
        "`cachefs stats` shows the changes not yet sent.",
    )
    writes.add_argument(
        "--read-only",
        action="store_true",
        help="take no change: every write, create, delete or rename fails with EROFS "
        "(read-only file system), and nothing is sent to SOURCE",
    )
    writes.add_argument(
        "--write-back-delay",
        metavar="SECONDS",
        type=number(float, 0, MAX_TIMEOUT),
        default=DEFAULTS.write_back_delay,
        help="how long after a changed file was last closed it is sent to SOURCE, 0 to "
        f"{MAX_TIMEOUT}; 0: when it is closed, and close waits until SOURCE has it "
        f"(default: {DEFAULTS.write_back_delay:g})",
    )
    writes.add_argument(
        "--max-dirty",
        metavar="SIZE",
        type=_max_dirty,
        help="most bytes of changes not yet sent to SOURCE, at least 1M and at most "
        "--cache-size; above it, writers wait while changed files are sent (ENOSPC only if "
        "none can be) (default: half the cache size)",
    )


def _max_dirty(text: str) -> int:
    value = size(text)
    if value < MIN_MAX_DIRTY:
        raise argparse.ArgumentTypeError(f"must be at least 1M, not {text!r}")
    return value


def _group_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Groups (docs/group.md)",
        "A mount in a group publishes its status and the file versions it sees, pins what "
        "the group's administrators pin, and with --shared-cache shares the blocks it "
        "fetches: each block comes from the origin once for the whole group, and every "
        "block from the hosted cache is checked against the file's content information.",
    )
    group.add_argument(
        "--group",
        metavar="NAME",
        type=non_empty,
        help="take part in group NAME as this machine's member (`cachefs group join`)",
    )
    group.add_argument(
        "--groups-dir",
        metavar="DIR",
        type=non_empty,
        help="where this machine's memberships are (default: $CACHEFS_GROUPS_DIR, else "
        "/var/lib/cachefs/groups as root, else $XDG_DATA_HOME/cachefs/groups, "
        "~/.local/share/cachefs/groups)",
    )
    group.add_argument(
        "--shared-cache",
        metavar="URL",
        type=non_empty,
        help="the group's hosted cache of blocks: s3://BUCKET[/PREFIX], or a directory all "
        "members share; needs --group. Down or unreachable, reads go to the origin",
    )
    group.add_argument(
        "--shared-cache-endpoint",
        metavar="URL",
        type=s3options.endpoint,
        help="the S3 endpoint of --shared-cache (default: --s3-endpoint, else "
        "$AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)",
    )
    group.add_argument(
        "--trust-content",
        choices=TRUST_MODES,
        default=TRUST_MODES[0],
        help="whose content records let a block come from the hosted cache: any member's "
        "(members), or administrators' only (admins). Content information the origin "
        "publishes always wins (default: members)",
    )
    group.add_argument(
        "--status-expiry",
        metavar="SECONDS",
        type=number(float, 5, 86400),
        default=60.0,
        help="lifetime of this mount's status record, rewritten every third of it: a node "
        "that dies leaves `cachefs group status` this long after (default: 60)",
    )


def add_publish(add: AddCommand) -> None:
    publish = add(
        "publish",
        "store content information for every file of a source",
        "Read every file of SOURCE and store the SHA-256 of each of its blocks beside it "
        "(in SOURCE/.cachefs-ci/, which mounts never show), so that mounts of SOURCE check "
        "every block they fetch against it. Needs write access to SOURCE. Files whose "
        "information is already up to date are not read again; files that change while "
        "being read are skipped; the information of files gone from SOURCE is removed. "
        "Prints one summary line; exits with 1 if any file failed.",
    )
    publish.add_argument(
        "source",
        metavar="SOURCE",
        type=non_empty,
        help="directory path, file:///abs/path or s3://BUCKET[/PREFIX]",
    )
    _block_size_option(
        publish,
        "block size of the hashes; must equal the --block-size of the mounts that use "
        "them, which ignore information of any other block size (default: 1M, the mount's "
        "default)",
    )
    s3options.add_arguments(publish)
    publish.set_defaults(run=cmd_publish)


def _block_size_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--block-size", metavar="SIZE", type=block_size, default="1M", help=help)


# -- from the command line to MountOptions ---------------------------------------------------


def mount_options(args: argparse.Namespace) -> MountOptions:
    """The mount options *args* give, checked and completed; ConfigError (one line,
    exit 2) if they are refused.  Creates nothing but a new trace file: cmd_mount
    makes the cache dir once everything that can be refused has been checked."""
    block_size = args.block_size
    if args.cache_size is not None and args.cache_size < block_size:
        raise ConfigError(
            f"--cache-size {format_size(args.cache_size)} is smaller than one cache block "
            f"({format_size(block_size)})"
        )
    if args.cache_size is not None and (args.max_dirty or 0) > args.cache_size:
        raise ConfigError(
            f"--max-dirty {format_size(args.max_dirty)} is more than --cache-size "
            f"{format_size(args.cache_size)}: changes not yet sent are kept in the cache"
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
    # Innermost first: trace(faults(throttle(source))).
    wrappers = [("throttle", args.throttle)] if args.throttle else []
    if args.faults:
        wrappers.append(("faults", wrapper("faults").check(args.faults)))  # RulesError
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
        read_only=args.read_only,
        write_back_delay=args.write_back_delay,
        max_dirty=args.max_dirty,
    )
    config.validate()
    mountpoint = Path(os.path.realpath(args.mountpoint))
    check_apart(source, mountpoint, cache_dir)
    if args.trace:
        wrappers.append(("trace", wrapper("trace").check(args.trace)))  # opened as the mount will
    group = _member_options(args, backend_options)
    if group is not None and group.shared_cache is not None:
        check_shared_cache_apart(group.shared_cache, source, mountpoint, cache_dir)
    return MountOptions(
        group=group,
        source=source,
        mountpoint=mountpoint,
        cache_dir=cache_dir,
        config=config,
        wrappers=tuple(wrappers),
        readahead_kb=args.readahead_kb,
        backend_options=backend_options,
        encrypt=args.encrypt,
        key_file=key_file,
        passthrough=args.passthrough,
        fuse=args.fuse,
        metrics=args.metrics,
        allow_other=args.allow_other,
    )


def _member_options(
    args: argparse.Namespace, source_options: dict[str, Any]
) -> MemberOptions | None:
    """The group options, checked: this machine a member, the hosted cache's URL sound."""
    if args.group is None:
        for flag, given in (
            ("--shared-cache", args.shared_cache),
            ("--shared-cache-endpoint", args.shared_cache_endpoint),
            ("--groups-dir", args.groups_dir),
        ):
            if given is not None:
                raise ConfigError(f"{flag} needs --group NAME")
        return None
    if args.encrypt:
        raise ConfigError(
            "--group cannot be combined with --encrypt: the group's records and hosted "
            "cache hold file names and blocks in clear"
        )
    from cachefs.records.groups import default_groups_dir, load_membership

    groups_dir = Path(os.path.abspath(args.groups_dir)) if args.groups_dir else default_groups_dir()
    load_membership(groups_dir, args.group)  # GroupError: not a member here
    shared, shared_options = args.shared_cache, {}
    if shared is not None:
        if source_scheme(shared) == "file" and "://" not in shared:
            shared = os.path.abspath(shared)
        endpoint = args.shared_cache_endpoint or source_options.get("endpoint")
        if endpoint and source_scheme(shared) == "s3":
            shared_options["endpoint"] = endpoint
        elif args.shared_cache_endpoint:
            raise ConfigError("--shared-cache-endpoint is only for an s3:// --shared-cache")
        store = open_blob_store(shared, **shared_options)  # the URL checked, nothing asked
        trio.run(store.aclose)
    return MemberOptions(
        group=args.group,
        groups_dir=groups_dir,
        shared_cache=shared,
        shared_cache_options=shared_options,
        trust_content=args.trust_content,
        status_expiry=args.status_expiry,
    )


def _statvfs_where(path: Path) -> os.statvfs_result:
    """statvfs of *path*, or else of its nearest ancestor there is: where it will be made."""
    for where in (path, *path.parents):
        try:
            return os.statvfs(where)
        except OSError:
            continue
    return os.statvfs("/")


def _check_source(source: str, options: dict[str, Any]) -> None:
    """Open and close the source (an S3 bucket: one listing, within its own deadline)."""
    backend = open_backend(source, **options)
    trio.run(backend.aclose)


def check_before_cache_dir(args: argparse.Namespace) -> None:
    """What can fail before the cache dir is made: FUSE, the mount point, the source."""
    source = normalize_source(args.source)
    options = s3options.from_args(args, source)
    check_fuse(args.allow_other)
    mountpoint = Path(os.path.realpath(args.mountpoint))
    check_mountpoint(mountpoint)
    check_apart(source, mountpoint)
    _check_source(source, options)


def cmd_mount(args: argparse.Namespace) -> int:
    check_transport(args.fuse)
    if not args.foreground:
        check_before_cache_dir(args)
    opts = mount_options(args)
    prepare_cache_dir(opts.cache_dir)  # only now: a refused mount leaves nothing behind
    if args.foreground:
        # Run by systemd (Type=notify), the unit is started once the mount serves.
        run_mount(opts, on_ready=partial(notify, "READY=1"))
    else:
        orders = Orders(opts, args.log_level or "info")
        spawn_daemon(orders, opts.cache_dir / LOG_NAME, READY_TIMEOUT)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    source = normalize_source(args.source)
    return run_publish(source, args.block_size, s3options.from_args(args, source))
