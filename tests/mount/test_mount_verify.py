"""Verified content, add-data and encryption through real mounts and the command line."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import NATIVE_ONLY, REPO, run_cachefs

from backends.trace import read_trace

if TYPE_CHECKING:
    from conftest import MountFactory

KB64 = 64 * 1024
DATA = os.urandom(5 * KB64 + 123)


def cli(*args: object, stdin: bytes | None = None, env: dict[str, str] | None = None):
    """``python -m cachefs ARGS`` with bytes on stdin and extra environment."""
    return subprocess.run(
        [sys.executable, "-m", "cachefs", *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def one_line(data: bytes | str) -> str:
    text = data.decode() if isinstance(data, bytes) else data
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(DATA)
    return src


def publish(src: Path) -> None:
    done = run_cachefs("publish", src, "--block-size", "64K")
    assert done.returncode == 0, done.stderr


def faults(path: Path, rules: list[dict[str, object]]) -> Path:
    path.write_text(json.dumps(rules))
    return path


# -- verify before serve --------------------------------------------------------------------


def test_damaged_bytes_from_the_source_give_eio_and_are_counted(
    mount: MountFactory, src: Path, tmp_path: Path
) -> None:
    publish(src)
    rules = faults(tmp_path / "rules.json", [{"file": "f", "corrupt": True}])
    m = mount(src, "--faults", rules, "--retries", "1")
    with pytest.raises(OSError) as info:
        (m / "f").read_bytes()
    assert info.value.errno == errno.EIO
    stats = m.stats()
    assert stats["corrupt_from_backend"] >= 2
    assert stats["cached_bytes"] == 0


def test_damage_once_from_the_source_is_refetched(
    mount: MountFactory, src: Path, tmp_path: Path
) -> None:
    publish(src)
    rules = faults(tmp_path / "rules.json", [{"file": "f", "corrupt": True, "count": 1}])
    m = mount(src, "--faults", rules)
    assert (m / "f").read_bytes() == DATA
    assert m.stats()["corrupt_from_backend"] == 1


def test_a_damaged_cache_file_is_refetched_after_a_remount(
    mount: MountFactory, src: Path, tmp_path: Path
) -> None:
    cache, trace = tmp_path / "cache", tmp_path / "trace"
    m = mount(src, cache_dir=cache)
    assert (m / "f").read_bytes() == DATA
    m.unmount()
    (name,) = os.listdir(cache / "data")
    with open(cache / "data" / name, "r+b") as f:
        f.seek(3 * KB64 + 5)
        f.write(bytes([DATA[3 * KB64 + 5] ^ 0xFF]))
    again = mount(src, "--trace", trace, cache_dir=cache)
    assert (again / "f").read_bytes() == DATA
    assert again.stats()["corrupt_in_cache"] == 1
    assert [c["position"] // KB64 for c in read_trace(trace)] == [3]


# -- add-data -------------------------------------------------------------------------------


def test_add_data_from_a_file_then_reads_need_no_source(
    mount: MountFactory, src: Path, tmp_path: Path
) -> None:
    publish(src)
    copy, trace = tmp_path / "copy", tmp_path / "trace"
    copy.write_bytes(DATA)
    m = mount(src, "--trace", trace)
    done = cli("add-data", m / "f", "--offset", 0, "--from", copy)
    assert done.returncode == 0, done.stderr
    assert one_line(done.stdout) == "blocks accepted 6, rejected 0, pending 0"
    assert (m / "f").read_bytes() == DATA
    assert read_trace(trace) == []


@NATIVE_ONLY
def test_add_data_from_stdin_reports_rejected_and_pending_blocks(
    mount: MountFactory, src: Path
) -> None:
    publish(src)
    m = mount(src)
    bad = bytearray(DATA[: 2 * KB64 + 10])
    bad[KB64] ^= 1
    done = cli("add-data", m / "f", "--offset", 0, stdin=bytes(bad))
    assert done.returncode == 1
    assert one_line(done.stdout) == "blocks accepted 1, rejected 1, pending 1"
    assert "did not match" in done.stderr.decode()
    # The rest of the pending block completes it.
    done = cli("add-data", m / "f", "--offset", 2 * KB64 + 10, stdin=DATA[2 * KB64 + 10 : 3 * KB64])
    assert done.returncode == 0, done.stderr
    assert one_line(done.stdout) == "blocks accepted 1, rejected 0, pending 0"
    assert m.stats()["cached_bytes"] == 2 * KB64


@NATIVE_ONLY
def test_add_data_refusals_have_their_own_exit_codes(
    mount: MountFactory, src: Path, tmp_path: Path
) -> None:
    m = mount(src)
    done = cli("add-data", m / "f", "--offset", 0, stdin=DATA)
    assert done.returncode == 3
    assert "no content information" in one_line(done.stderr)
    done = cli("add-data", m / "f", "--offset", len(DATA), stdin=b"x")
    assert done.returncode == 4
    assert "beyond the end" in one_line(done.stderr)
    done = cli("add-data", m / "f", "--offset", len(DATA) + 1, "--from", "/dev/null")
    assert done.returncode == 4
    assert "beyond the end" in one_line(done.stderr)
    done = cli("add-data", m.mountpoint, "--offset", 0, stdin=b"x")
    assert done.returncode == 1
    assert "not a regular file" in one_line(done.stderr)
    done = cli("add-data", m / "f", "--offset", 0, "--from", tmp_path / "missing")
    assert done.returncode == 2
    assert "missing" in one_line(done.stderr)
    done = cli("add-data", tmp_path, "--offset", 0, stdin=b"x")
    assert done.returncode == 2
    assert m.stats()["cached_bytes"] == 0
    done = cli("add-data", m / "f", "--offset", 0, "--trust", stdin=DATA)
    assert done.returncode == 0, done.stderr
    assert one_line(done.stdout) == "blocks accepted 6, rejected 0, pending 0"
    assert (m / "f").read_bytes() == DATA


def test_purge_undoes_trusted_add_data_that_was_wrong(
    mount: MountFactory, src: Path, tmp_path: Path
) -> None:
    """--trust is the owner's word, wrong or not; purge is how the owner takes it back."""
    cache = tmp_path / "cache"
    m = mount(src, cache_dir=cache)
    bad = bytearray(DATA)
    bad[KB64 + 5] ^= 0xFF
    done = cli("add-data", m / "f", "--offset", 0, "--trust", stdin=bytes(bad))
    assert done.returncode == 0, done.stderr
    assert (m / "f").read_bytes() == bytes(bad)  # trusted: served as given
    # The right bytes are refused: they do not match what was trusted.
    done = cli("add-data", m / "f", "--offset", KB64, stdin=DATA[KB64 : 2 * KB64])
    assert one_line(done.stdout) == "blocks accepted 0, rejected 1, pending 0"
    m.unmount()
    m = mount(src, cache_dir=cache)
    assert (m / "f").read_bytes() == bytes(bad)  # it survives a remount
    done = cli("purge", m / "f")
    assert done.returncode == 0, done.stderr
    # Purged: neither the blocks nor the hashes they brought are left.
    done = cli("add-data", m / "f", "--offset", KB64, stdin=DATA[KB64 : 2 * KB64])
    assert done.returncode == 3, done.stdout  # nothing to check against any more
    assert (m / "f").read_bytes() == DATA
    done = cli("add-data", m / "f", "--offset", KB64, stdin=DATA[KB64 : 2 * KB64])
    assert one_line(done.stdout) == "blocks accepted 1, rejected 0, pending 0"
    m.unmount()
    again = mount(src, cache_dir=cache)
    assert (again / "f").read_bytes() == DATA


def test_purge_drops_a_trusted_piece_of_a_block_still_held(mount: MountFactory, src: Path) -> None:
    m = mount(src)
    done = cli("add-data", m / "f", "--offset", 0, "--trust", stdin=b"\xff" * 1000)
    assert one_line(done.stdout) == "blocks accepted 0, rejected 0, pending 1"
    assert cli("purge", m / "f").returncode == 0
    # The rest of the block, on its own, is not enough any more.
    done = cli("add-data", m / "f", "--offset", 1000, "--trust", stdin=DATA[1000:KB64])
    assert one_line(done.stdout) == "blocks accepted 0, rejected 0, pending 1"
    assert (m / "f").read_bytes() == DATA


# -- encryption -------------------------------------------------------------------------------


def key_file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def test_an_encrypted_mount_keeps_no_plain_data_and_refuses_other_keys(
    mount: MountFactory, src: Path, tmp_path: Path, mnt: Path
) -> None:
    cache = tmp_path / "cache"
    key = key_file(tmp_path, "key", os.urandom(32))
    m = mount(src, "--encrypt", "--key-file", key, cache_dir=cache)
    assert (m / "f").read_bytes() == DATA
    assert m.stats()["encrypted"] is True
    m.unmount()
    for path in (cache / "data").iterdir():
        assert DATA[:64] not in path.read_bytes()
    wrong = key_file(tmp_path, "wrong", os.urandom(32))
    options = ("--cache-dir", cache, "--block-size", "64K")
    done = cli("mount", src, mnt, *options, "--encrypt", "--key-file", wrong)
    assert done.returncode == 2
    assert "not the one" in one_line(done.stderr)
    done = cli("mount", src, mnt, *options)
    assert done.returncode == 2
    assert "is encrypted" in one_line(done.stderr)
    trace = tmp_path / "trace"
    again = mount(src, "--encrypt", "--key-file", key, "--trace", trace, cache_dir=cache)
    assert (again / "f").read_bytes() == DATA
    assert read_trace(trace) == []


def test_a_passphrase_in_cachefs_key(src: Path, tmp_path: Path, mnt: Path) -> None:
    cache = tmp_path / "cache"
    env = {"CACHEFS_KEY": "a long passphrase"}
    done = cli("mount", src, mnt, "--cache-dir", cache, "--encrypt", env=env)
    try:
        assert done.returncode == 0, done.stderr
        assert (mnt / "f").read_bytes() == DATA
    finally:
        assert cli("unmount", mnt).returncode == 0
    done = cli("mount", src, mnt, "--cache-dir", cache, "--encrypt", env={"CACHEFS_KEY": "x"})
    assert done.returncode == 2
    assert "not the one" in one_line(done.stderr)


def test_key_option_mistakes_exit_2_with_one_line(src: Path, tmp_path: Path, mnt: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CACHEFS_KEY"}
    cases = [
        (("--encrypt",), "needs a key"),
        (("--encrypt", "--key-file", tmp_path / "nope"), "does not exist"),
        (("--key-file", tmp_path / "nope"), "only used with --encrypt"),
    ]
    for options, message in cases:
        done = subprocess.run(
            [sys.executable, "-m", "cachefs", "mount", str(src), str(mnt), *map(str, options)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 2, (options, done.stderr)
        assert message in one_line(done.stderr), options
    assert not os.path.ismount(mnt)
