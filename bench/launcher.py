"""Mount a local directory through the throttled backend, in the foreground.

    python -m bench.launcher SOURCE MOUNTPOINT --cache-dir DIR [--throttle 30,90]

The same wiring as ``cachefs.mount.serve_mount`` with ``throttle(local)`` as
the backend; it prints ``ready`` on stdout once the mount serves, stops on
SIGTERM or ``cachefs unmount``, and then prints the throttled backend's
statistics as one JSON line.  It exists until the mount can stack the
wrapper itself (a ``--throttle LATENCY_MS,MIBPS`` option of
``cachefs mount``); it relies on ``cachefs.mount._serve_fuse``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import trio

from backends.throttled import throttle
from cachefs.engine import CacheConfig, open_file_cache
from cachefs.fuse_ops import KernelInvalidator
from cachefs.mount import (
    MountOptions,
    _serve_fuse,
    check_fuse,
    check_mountpoint,
    prepare_cache_dir,
)
from cachefs.namespace import Namespace
from cachefs.registry import open_backend


async def serve(opts: MountOptions, spec: str) -> None:
    check_fuse()
    check_mountpoint(opts.mountpoint)
    backend = throttle(open_backend(opts.source), spec)
    try:
        invalidator = KernelInvalidator()
        async with open_file_cache(
            backend, opts.cache_dir, opts.config, on_invalidate=invalidator.notify
        ) as cache:
            await _serve_fuse(
                opts, cache, Namespace(cache), invalidator, lambda: print("ready", flush=True)
            )
    finally:
        with trio.CancelScope(shield=True):
            await backend.aclose()
        print(json.dumps({"backend": backend.statistics()}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launcher")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--throttle", default="30,90", metavar="LATENCY_MS,MIBPS")
    parser.add_argument("--readahead-kb", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    opts = MountOptions(
        source=str(Path(args.source).resolve()),
        mountpoint=Path(args.mountpoint).resolve(),
        cache_dir=prepare_cache_dir(Path(args.cache_dir)),
        config=CacheConfig(),
        readahead_kb=args.readahead_kb,
    )
    trio.run(serve, opts, args.throttle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
