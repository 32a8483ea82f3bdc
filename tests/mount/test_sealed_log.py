"""An encrypted cache writes no file name or source path in clear to its log.

The same hostile session (reads, a file rewritten under a reader, damaged
content information, a file the daemon may not read, injected failures) is
run on a plain and on an encrypted mount at --log-level debug: the plain
mount's log names the files (so the session does reach the log), the
encrypted one's does not, anywhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import run_cachefs

if TYPE_CHECKING:
    from conftest import MountFactory

SECRETS = ("alice", "zeta", "cachefs-secret-src", "ALICE_MOVED")


def source(tmp_path: Path) -> Path:
    root = tmp_path / "cachefs-secret-src"
    (root / "clinic-zeta").mkdir(parents=True)
    (root / "clinic-zeta" / "patient-alice.txt").write_bytes(b"alice\n" * 50_000)
    (root / "ALICE_MOVED").write_bytes(os.urandom(300_000))
    (root / "alice-denied.txt").write_bytes(b"no\n")
    (root / "alice-denied.txt").chmod(0o000)
    ci = root / ".cachefs-ci" / "clinic-zeta"
    ci.mkdir(parents=True)
    (ci / "patient-alice.txt").write_bytes(b"not content information")
    return root


def session(mount: MountFactory, tmp_path: Path, *options: object) -> str:
    src = source(tmp_path)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "ALICE_MOVED", "result": "FAILURE", "count": 2}]))
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    m = mount(
        src,
        "--faults",
        rules,
        *[str(o).replace("KEY", str(key)) for o in options],
        prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search"),
    )
    assert (m / "clinic-zeta" / "patient-alice.txt").read_bytes() == b"alice\n" * 50_000
    with open(m / "ALICE_MOVED", "rb", buffering=0) as f:
        f.read(65536)
        (src / "ALICE_MOVED").write_bytes(os.urandom(300_000))
        with pytest.raises(OSError):
            while f.read(1 << 20):
                pass
    with pytest.raises(PermissionError):
        (m / "alice-denied.txt").read_bytes()
    m.unmount()
    # The daemon's log (its stderr here: --foreground), and every file it left.
    return m.log_text() + "".join(p.read_text(errors="replace") for p in m.cache_dir.rglob("*.log"))


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's file access rights with setpriv")
def test_a_plain_mount_logs_names(mount: MountFactory, tmp_path: Path) -> None:
    text = session(mount, tmp_path)
    for secret in SECRETS:
        assert secret in text


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's file access rights with setpriv")
def test_an_encrypted_mount_logs_no_name(mount: MountFactory, tmp_path: Path) -> None:
    text = session(mount, tmp_path, "--encrypt", "--key-file", "KEY")
    assert "[sealed:" in text
    for secret in SECRETS:
        assert secret not in text, [line for line in text.splitlines() if secret in line][:5]


def test_a_daemon_that_fails_logs_the_kind_of_error_and_the_user_gets_its_message(
    tmp_path: Path, mnt: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"f\n")
    cache = tmp_path / "cachefs-secret-cache"
    key, wrong = tmp_path / "key", tmp_path / "wrong"
    for path in (key, wrong):
        path.write_bytes(os.urandom(32))
        path.chmod(0o600)
    options = ("--cache-dir", cache, "--encrypt")
    done = run_cachefs("mount", src, mnt, *options, "--key-file", key)
    assert done.returncode == 0, done.stderr
    assert run_cachefs("unmount", mnt).returncode == 0
    # Only the daemon, opening the cache, finds the key wrong.
    done = run_cachefs("mount", src, mnt, *options, "--key-file", wrong)
    assert done.returncode == 2
    assert "cachefs-secret-cache" in done.stderr  # the user who asked is told
    log = (cache / "cachefs.log").read_text()
    assert "BadKey" in log
    assert "secret" not in log
