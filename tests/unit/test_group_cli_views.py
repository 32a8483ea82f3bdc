"""What the command line shows of a group mount, without a mount: the group rows
of ``cachefs stats`` (from a reply as the daemon sends it) and the paths
``cachefs group pin`` takes."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from cachefs.cli.grouplive import file_path
from cachefs.cli.running import format_stats

REPLY: dict[str, Any] = {
    "source": "s3://datasets/train",
    "bytes_from_backend": 3 << 20,
    "hit_ratio": 0.5,
    "group": {
        "name": "farm",
        "member": "mqz3example",
        "hosted_cache": "s3://shared/blocks",
        "hosted_hits": 16,
        "hosted_misses": 48,
        "hosted_bytes": 1 << 20,
        "hosted_errors": 0,
        "rejected_blocks": 2,
        "offered": 48,
        "uploaded": 40,
        "already_there": 6,
        "dropped_offers": 2,
        "offer_queue_bytes": 64 << 10,
        "hosted_down": None,
        "content_published": 3,
        "content_used": 1,
        "rejected_records": 0,
        "versions_published": 1,
        "versions_applied": 4,
        "group_pins": [
            {"file": "data/a.bin", "cached": 1 << 20, "size": 4 << 20, "error": None},
            {"file": "gone.bin", "cached": 0, "size": 0, "error": "no such file"},
        ],
    },
}


def rows(table: str) -> dict[str, str]:
    """label -> value of a stats table (labels and values are two spaces apart)."""
    width = table.splitlines()[0].index("s3://")
    return {line[:width].strip(): line[width:].strip() for line in table.splitlines()}


def test_stats_shows_the_group_counters() -> None:
    table = format_stats(REPLY)
    shown = rows(table)
    assert shown["group"] == "farm (member mqz3example)"
    assert shown["hosted cache"] == "s3://shared/blocks"
    # the backend's bytes count the hosted cache's too: the origin gave the rest
    assert shown["from origin"] == "2.0 MiB" and shown["from hosted cache"] == "1.0 MiB"
    assert shown["hosted hits"] == "16" and shown["hosted misses"] == "48"
    assert shown["rejected blocks"] == "2" and shown["dropped offers"] == "2"
    assert shown["offered"] == "48" and shown["uploaded"] == "40"
    assert shown["offer queue"] == "64.0 KiB" and shown["rejected records"] == "0"
    pins = [line.split(None, 2)[2] for line in table.splitlines() if "group pin" in line]
    assert pins == ["data/a.bin  1.0 MiB of 4.0 MiB (25%)", "gone.bin  error: no such file"]


def test_stats_says_when_the_hosted_cache_is_down_or_absent() -> None:
    down = {**REPLY, "group": {**REPLY["group"], "hosted_down": "connection refused"}}
    assert rows(format_stats(down))["hosted cache"] == (
        "s3://shared/blocks (down: connection refused)"
    )
    alone = {**REPLY, "group": {"name": "farm", "member": "m", "hosted_cache": None}}
    assert rows(format_stats(alone))["hosted cache"] == "none"


def test_stats_without_a_group_has_no_group_rows() -> None:
    plain = {k: v for k, v in REPLY.items() if k != "group"}
    assert "group" not in format_stats(plain) and "hosted" not in format_stats(plain)


@pytest.mark.parametrize(
    ("given", "path"),
    [("data/a.bin", "data/a.bin"), ("/data/a.bin", "data/a.bin"), ("./a.bin", "a.bin")],
)
def test_pin_paths_are_taken_from_the_source_root(given: str, path: str) -> None:
    assert file_path(given) == path


@pytest.mark.parametrize("given", ["", "/", "./", "..", "a/../b", "a//b", "a/", "a/./b"])
def test_pin_paths_name_one_file_exactly(given: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        file_path(given)
