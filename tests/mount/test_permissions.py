"""Permissions mirror the source: an entry is shown with the source's mode
bits (write bits too: the mount is read-write), and an entry the daemon may
not read is refused with EACCES at once, as reading the source would be.

The daemon runs as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
(setpriv), so file modes bind it as they bind any user; the test's own
reads keep full root rights, so the kernel lets them through to the daemon.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import MountFactory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sets file modes that bind root")

NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "source"
    root.mkdir()
    (root / "ok.txt").write_bytes(b"readable\n")
    (root / "secret.bin").write_bytes(b"nobody may read this\n")
    (root / "secret.bin").chmod(0o000)
    (root / "owner.txt").write_bytes(b"owner only\n")
    (root / "owner.txt").chmod(0o640)
    locked = root / "locked"
    locked.mkdir()
    (locked / "inside.txt").write_bytes(b"inside\n")
    locked.chmod(0o600)  # listable names, but no entry can be looked at
    return root


def source_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


def errno_of(fn: object, *args: object) -> int:
    try:
        fn(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


def read_without_dac(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NO_DAC, "cat", str(path)], capture_output=True, text=True, timeout=30)


def test_modes_are_the_sources_and_what_the_daemon_may_not_read_is_eacces(
    mount: MountFactory, source: Path
) -> None:
    m = mount(source, prefix=NO_DAC)
    # Shown as in the source (a read-write mount: write bits too).
    assert os.stat(m / "secret.bin").st_mode & 0o7777 == 0o000
    assert os.stat(m / "owner.txt").st_mode & 0o7777 == 0o640
    assert os.stat(m / "locked").st_mode & 0o7777 == 0o600
    assert os.stat(m / "ok.txt").st_mode & 0o7777 == (root_mode := source_mode(source / "ok.txt"))
    assert root_mode & 0o222  # the file is writable in the source: so in the mount
    assert (m / "ok.txt").read_bytes() == b"readable\n"

    # A reader bound by modes is refused by the kernel, as by the source.
    for place in (source, m.mountpoint):
        done = read_without_dac(place / "secret.bin")
        assert done.returncode == 1 and "Permission denied" in done.stderr, done
    assert read_without_dac(m / "owner.txt").stdout == "owner only\n"

    # A reader the kernel lets through meets the daemon's refusal: EACCES at
    # once, the backend not asked to read (no retries), nothing latched.
    calls = m.stats()["read_data_calls"]
    assert errno_of((m / "secret.bin").read_bytes) == errno.EACCES
    assert errno_of(os.listdir, m / "locked") == errno.EACCES
    numbers = m.stats()
    assert numbers["read_data_calls"] == calls
    assert numbers["files_in_error"] == 0 and numbers["external_error"] is None

    # Allowed at the source, allowed through the mount.
    (source / "secret.bin").chmod(0o444)
    (source / "locked").chmod(0o700)
    m2 = mount(source, prefix=NO_DAC)
    assert (m2 / "secret.bin").read_bytes() == b"nobody may read this\n"
    assert os.listdir(m2 / "locked") == ["inside.txt"]
    m.unmount()
    m2.unmount()
