"""A mount raises its soft limit on open fds to the hard one before it
serves (cachefs.daemon.serve): the cache keeps up to a quarter of it in
data files open."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

LOW = 256

# run_mount up to the point where it would serve: what limits the mount sees.
SCRIPT = """
import resource
from cachefs.daemon import serve
from cachefs.engine.state.catalog import keep_open_limit

def serve_here(*args):
    print(*resource.getrlimit(resource.RLIMIT_NOFILE), keep_open_limit())

serve.trio.run = serve_here
serve.run_mount(None)
"""


def test_a_mount_serves_with_its_fd_limit_raised_to_the_hard_limit():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard <= LOW:
        pytest.skip(f"the hard fd limit is {hard}")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, hard)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    soft, now_hard, kept = map(int, done.stdout.split())
    assert (soft, now_hard) == (hard, hard)
    assert kept > LOW // 4
