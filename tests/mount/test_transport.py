"""Choosing the FUSE transport: ``cachefs mount --fuse pyfuse3`` without the
pyfuse3 extra is a one-line error that says what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO, assert_one_line_error

from cachefs.control.mounts import mount_at

MISSING = "raise ImportError(\"No module named 'pyfuse3' (a test shim)\")\n"


def test_pyfuse3_without_the_extra_is_a_one_line_error(src: Path, tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "pyfuse3.py").write_text(MISSING)  # found before the installed one
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(REPO)]))
    done = subprocess.run(
        [sys.executable, "-m", "cachefs", "mount", str(src), str(mnt), "--fuse", "pyfuse3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert_one_line_error(done, "--fuse pyfuse3", "pip install 'cachefs[pyfuse3]'", "libfuse3-dev")
    assert mount_at(mnt) is None
