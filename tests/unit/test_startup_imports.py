"""Every cachefs command starts without loading the record store and its Redis
client: only the group and records commands, and mounts in a group, need it
(it doubled the start-up of every command, and the mount tests' time)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("coredis", "cachefs.records", "cachefs.group.member")


@pytest.mark.parametrize(
    "code",
    [
        "import cachefs.cli.main",  # every command's parser
        "import cachefs.daemon.serve, cachefs.daemon.session, cachefs.daemon.commands",
    ],
)
def test_no_command_loads_the_record_store_unless_it_needs_it(code: str) -> None:
    check = f"{code}\nimport sys\nprint(sorted(m for m in sys.modules if m.startswith({HEAVY!r})))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
