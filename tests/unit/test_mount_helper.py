"""mount.cachefs without mounting: how mount(8)'s -o options map onto ``cachefs
mount``, what is refused and with which exit code, and the sd_notify message a
foreground mount sends systemd (cachefs.daemon.notify)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

from cachefs.cli.helper import (
    MOUNT_FAILURE,
    MOUNT_USAGE,
    cachefs_arguments,
    main,
    mount_parser,
    mount_status,
    option_names,
)
from cachefs.daemon.notify import notify
from cachefs.errors import ConfigError

NAMES = option_names(mount_parser())


def arguments(*options: str, sloppy: bool = False) -> list[str]:
    """The cachefs mount options (after SOURCE and MOUNTPOINT) that *options* give."""
    return cachefs_arguments("/src", "/mnt", options, NAMES, sloppy)[3:]


def test_values_and_flags_map_one_to_one() -> None:
    assert arguments("cache-dir=/var/cache/x,cache-size=20G", "no-passthrough") == [
        "--cache-dir=/var/cache/x",
        "--cache-size=20G",
        "--no-passthrough",
    ]
    # A value may itself hold "=", and a leading "-" stays a value.
    assert arguments("s3-endpoint=http://h:9000/?a=b,ttl=-1") == [
        "--s3-endpoint=http://h:9000/?a=b",
        "--ttl=-1",
    ]


def test_generic_options_are_dropped_or_translated() -> None:
    given = (
        "rw,defaults,auto,noauto,nofail,_netdev,nouser,nosuid,nodev,"
        "exec,atime,noatime,relatime,strictatime,lazytime,x-systemd.automount,"
        "x-systemd.idle-timeout=60,x-mount.mkdir,comment=systemd.automount"
    )
    assert arguments(given) == []
    assert arguments("ro,allow_other") == ["--read-only", "--allow-other"]


@pytest.mark.parametrize("option", ["noexec", "suid", "dev", "user", "users", "owner", "group"])
def test_generic_options_a_mount_cannot_honour_are_refused_even_when_sloppy(option: str) -> None:
    """A hardened fstab line must not mount without what it asked for."""
    for sloppy in (False, True):
        with pytest.raises(ConfigError, match=f"option '{option}' is not supported"):
            arguments(f"nosuid,{option}", sloppy=sloppy)


def test_an_option_whose_value_holds_a_comma_is_not_offered() -> None:
    assert "throttle" not in NAMES  # LATENCY_MS,MIBPS: mount(8) would split it
    with pytest.raises(ConfigError, match="unknown option"):
        arguments("throttle=30")


def test_names_are_the_mount_commands() -> None:
    assert NAMES["cache-dir"] == "DIR"
    assert NAMES["read-only"] is None
    assert "foreground" not in NAMES  # mount(8) waits for its helper to return
    assert "help" not in NAMES


@pytest.mark.parametrize("item", ["colour=blue", "foreground", "sync", "ro=1"])
def test_an_unknown_option_is_refused_by_name(item: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown option '{item}'"):
        arguments(f"cache-size=1G,{item}")
    assert arguments(f"cache-size=1G,{item}", sloppy=True) == ["--cache-size=1G"]


def test_exit_codes_are_mount_8s() -> None:
    assert [mount_status(code) for code in (0, 1, 2, 3, 130)] == [
        0,
        MOUNT_FAILURE,
        MOUNT_USAGE,
        MOUNT_FAILURE,
        MOUNT_FAILURE,
    ]
    assert (MOUNT_USAGE, MOUNT_FAILURE) == (1, 32)


def test_help_says_what_it_is_and_how_options_map(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "mount -t cachefs" in out and "fuse.cachefs" in out
    assert "NAME=VALUE is --NAME VALUE" in out
    assert "cache-size=SIZE" in out and "x-*" in out and "ro is read-only" in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["/src", "/mnt", "-o", "colour=blue"], ["mount.cachefs: error:", "'colour=blue'"]),
        (["/src", "/mnt", "-N", "1234"], ["mount.cachefs: error:", "-N"]),
        (["/src"], ["mount.cachefs: error:", "MOUNTPOINT"]),
        (["/src", "/mnt", "-f", "-o", "ttl=soon"], ["cachefs mount: error:", "--ttl"]),
    ],
)
def test_refused_command_lines(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    assert main(argv) == MOUNT_USAGE
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err


# -- sd_notify -------------------------------------------------------------------------------


def test_notify_reaches_a_path_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert listener.recv(64) == b"READY=1"


def test_notify_reaches_an_abstract_socket(tmp_path: Path) -> None:
    name = f"cachefs-test-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert listener.recv(64) == b"STOPPING=1"


def test_notify_without_systemd_does_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notify("READY=1", {})
    notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert caplog.records == []
    # A socket that is gone: said in the log, the mount goes on.
    with caplog.at_level(logging.WARNING):
        notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})
    said = [r.getMessage().split(":")[0] for r in caplog.records]
    assert said == ["could not tell systemd READY=1"]


def test_a_quoted_value_keeps_its_commas_and_loses_its_quotes() -> None:
    """mount(8) lets a value be quoted; passed on with its quotes, the cache dir
    would be made under a directory named with a quote, in the current one."""
    assert arguments('cache-dir="/var/cache/a,b",ttl=5') == [
        "--cache-dir=/var/cache/a,b",
        "--ttl=5",
    ]
    assert arguments('cache-dir="/var/c"') == ["--cache-dir=/var/c"]
