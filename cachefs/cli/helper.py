"""``mount.cachefs`` (also ``mount.fuse.cachefs``): the helper mount(8) runs for
``mount -t cachefs`` and for /etc/fstab lines of type ``cachefs`` or ``fuse.cachefs``.

mount(8) runs ``mount.TYPE SOURCE MOUNTPOINT [-sfnv] [-N NS] -o OPTIONS``
(util-linux 2.38 passes no ``-t``, puts ``rw`` or ``ro`` first in OPTIONS,
and keeps ``defaults``, ``noauto``, ``comment=`` and ``x-*`` to itself).
Each option maps one to one onto ``cachefs mount``: ``NAME=VALUE`` is
``--NAME VALUE``, a bare ``NAME`` is ``--NAME``; the list is then run by
the ``cachefs mount`` command itself, so every option, default, check and
error is the command line's.  Options that belong to mount(8) or systemd
are dropped, ``ro`` and ``allow_other`` translated; anything else is refused
by name unless ``-s`` (sloppy).  A value that holds a comma is given in
double quotes, as mount(8) splits options at the commas outside them; the
quotes are taken off.  The helper returns once the mount is ready, as ``cachefs
mount`` does, so ``mount`` returns with the mount usable.

mount(8) exits with its helper's exit code, and its callers read that by
mount(8)'s table: so cachefs's 2 (the command or its options refused)
becomes 1 ("incorrect invocation"), any other failure 32 ("mount failure").
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
from collections.abc import Collection, Sequence

from cachefs.cli.main import main as cachefs_main
from cachefs.cli.mount import add_mount, check_before_cache_dir, mount_options
from cachefs.cli.options import Parser, common_options
from cachefs.errors import CacheFSError, ConfigError
from cachefs.fuse import check_transport

#: mount(8)'s exit codes for a refused command line and for a failed mount.
MOUNT_USAGE = 1
MOUNT_FAILURE = 32

#: Options for mount(8), systemd or the kernel's generic mount flags, which a
#: FUSE mount of cachefs has no use for; ``x-*`` and ``comment=*`` too.
DROPPED = frozenset(
    {
        "defaults", "auto", "noauto", "nofail", "_netdev", "nouser",
        "rw", "nosuid", "nodev", "exec", "async",
        "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
        "lazytime", "nolazytime", "diratime", "nodiratime", "silent", "loud",
    }
)  # fmt: skip
DROPPED_PREFIXES = ("x-", "comment=")
#: Generic mount options a cachefs mount cannot honour: refused by name (even
#: with -s), rather than mounted without them.
REFUSED = {
    "noexec": "cachefs mounts always allow exec",
    "suid": "cachefs mounts are always nosuid",
    "dev": "cachefs mounts are always nodev",
    "user": "mounts by users through fstab are not supported (docs/service.md#non-root-mounts)",
    "users": "mounts by users through fstab are not supported (docs/service.md#non-root-mounts)",
    "owner": "mounts by users through fstab are not supported (docs/service.md#non-root-mounts)",
    "group": "mounts by users through fstab are not supported (docs/service.md#non-root-mounts)",
}
#: Generic mount options that mean a cachefs option.
TRANSLATED = {"ro": "read-only", "allow_other": "allow-other"}
#: ``cachefs mount`` options that make no sense from mount(8): it waits for the helper.
NOT_MOUNT_OPTIONS = frozenset({"--foreground", "--help"})


def mount_parser() -> argparse.ArgumentParser:
    """The parser of ``cachefs mount``, as its module declares it."""
    made: list[argparse.ArgumentParser] = []

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        made.append(
            Parser(prog=f"cachefs {name}", description=description, parents=[common_options()])
        )
        return made[-1]

    add_mount(add)
    return made[0]


def option_names(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    """The ``-o`` names *parser*'s options answer to, each with its value's
    metavar (None for a flag)."""
    names: dict[str, str | None] = {}
    for action in parser._actions:
        for flag in action.option_strings:
            metavar = action.metavar if isinstance(action.metavar, str) else None
            if "," in (metavar or ""):
                continue  # mount(8) splits a value at its commas: not given through -o
            if flag.startswith("--") and flag not in NOT_MOUNT_OPTIONS:
                names[flag[2:]] = (metavar or action.dest.upper()) if action.nargs != 0 else None
    return names


def cachefs_arguments(
    source: str, mountpoint: str, options: Sequence[str], known: Collection[str], sloppy: bool
) -> list[str]:
    """The ``cachefs mount`` arguments mount(8)'s *options* (``-o`` lists) stand for;
    ConfigError naming the first unknown one, unless *sloppy* (then it is dropped)."""
    arguments = ["mount", source, mountpoint]
    for item in (item for text in options for item in _split(text) if item):
        name, equals, value = item.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]  # mount(8) lets a value be quoted: name="a,b"
        if (not equals and name in DROPPED) or item.startswith(DROPPED_PREFIXES):
            continue
        if not equals and name in REFUSED:
            raise ConfigError(f"option {item!r} is not supported: {REFUSED[name]}")
        if not equals:
            name = TRANSLATED.get(name, name)
        if name not in known:
            if sloppy:
                continue
            raise ConfigError(f"unknown option {item!r}")
        arguments.append(f"--{name}={value}" if equals else f"--{name}")
    return arguments


def _split(text: str) -> list[str]:
    """*text* split at its commas, as mount(8) splits options: not inside double quotes."""
    items, item, quoted = [], "", False
    for c in text:
        if c == "," and not quoted:
            items.append(item)
            item = ""
            continue
        quoted ^= c == '"'
        item += c
    return [*items, item]


def _describe(names: dict[str, str | None]) -> str:
    shown = ", ".join(
        name if metavar is None else f"{name}={metavar}" for name, metavar in names.items()
    )
    paragraphs = (
        "The mount(8) helper of cachefs: `mount -t cachefs SOURCE MOUNTPOINT -o "
        "cache-dir=DIR,cache-size=20G` and /etc/fstab lines of type cachefs or fuse.cachefs "
        "run it to mount SOURCE on MOUNTPOINT as `cachefs mount` does (docs/service.md). "
        "It returns once the mount is ready.",
        "Each option maps one to one onto `cachefs mount` (cachefs mount --help says what "
        f"it does): NAME=VALUE is --NAME VALUE, NAME is --NAME. They are: {shown}.",
        f"Dropped (mount(8)'s, systemd's, generic): {', '.join(sorted(DROPPED))}, x-*, "
        "comment=*. Translated: ro is read-only, allow_other is allow-other. Any other "
        "option is refused by name, unless -s. A value that holds a comma goes in double "
        'quotes: cache-dir="/a,b".',
        "Exit codes are mount(8)'s: 0 mounted, 1 the command line or an option refused, "
        "32 the mount failed.",
    )
    return "\n\n".join(textwrap.fill(text, 79, break_on_hyphens=False) for text in paragraphs)


def build_helper_parser(prog: str, names: dict[str, str | None]) -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        usage=f"{prog} SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS]",
        description=_describe(names),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="as for cachefs mount")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="as for cachefs mount")
    parser.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        action="append",
        help="comma-separated options, NAME=VALUE or NAME",
    )
    parser.add_argument("-s", dest="sloppy", action="store_true", help="drop unknown options")
    parser.add_argument(
        "-f", dest="fake", action="store_true", help="check everything, mount nothing"
    )
    parser.add_argument("-n", action="store_true", help="ignored: there is no mtab to write")
    parser.add_argument(
        "-v", dest="verbose", action="store_true", help="print the cachefs command it runs"
    )
    parser.add_argument("-N", dest="namespace", metavar="NS", help="not supported")
    parser.add_argument(
        "-t", dest="type", metavar="TYPE", help="ignored: cachefs or fuse.cachefs, as mount(8) says"
    )
    return parser


def _check(arguments: list[str], parser: argparse.ArgumentParser) -> int:
    """What ``cachefs mount`` would check before mounting, with nothing made; its exit code."""
    args = parser.parse_args(arguments[1:])
    try:
        check_transport(args.fuse)
        check_before_cache_dir(args)
        mount_options(args)
    except CacheFSError as e:
        print(f"cachefs: error: {' '.join(str(e).split())}", file=sys.stderr)
        return e.exit_code
    return 0


def run(argv: Sequence[str], prog: str) -> int:
    """The helper's work; cachefs's exit code."""
    mount = mount_parser()
    names = option_names(mount)
    args = build_helper_parser(prog, names).parse_args(argv)
    try:
        if args.namespace is not None:
            raise ConfigError("-N (mounting in another namespace) is not supported")
        arguments = cachefs_arguments(
            args.source, args.mountpoint, args.options or [], names, args.sloppy
        )
    except ConfigError as e:
        print(f"{prog}: error: {e} (see {prog} --help)", file=sys.stderr)
        return e.exit_code
    if args.verbose:
        doing = "checking" if args.fake else "running"
        print(f"{prog}: {doing}: {shlex.join(['cachefs', *arguments])}")
    if args.fake:
        return _check(arguments, mount)
    return cachefs_main(arguments)


def mount_status(code: int) -> int:
    """cachefs's exit code as mount(8)'s."""
    if code == 0:
        return 0
    return MOUNT_USAGE if code == 2 else MOUNT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    """Run the helper as mount(8) does; mount(8)'s exit code."""
    prog = os.path.basename(sys.argv[0]) if argv is None else "mount.cachefs"
    try:
        code = run(sys.argv[1:] if argv is None else argv, prog)
    except SystemExit as e:  # argparse: --help, or a refused command line
        code = e.code if isinstance(e.code, int) else 1
    return mount_status(code)
