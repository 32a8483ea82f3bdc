"""The Python example of docs/records.md runs as written and prints what the page
says it prints (against a group without an engine, as a user's own program)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from groupsrig import make_group

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "records.md"


def block_after(text: str, marker: str) -> str:
    """The fenced code block that follows *marker*."""
    match = re.search(re.escape(marker) + r".*?\n```[a-z]*\n(.*?)\n```", text, re.DOTALL)
    assert match, f"no code block after {marker!r} in {PAGE}"
    return match.group(1)


def test_the_python_example_runs_and_prints_what_the_page_says(tmp_path: Path) -> None:
    text = PAGE.read_text()
    program = tmp_path / "example.py"
    program.write_text(block_after(text, "<!-- example:"))
    expected = block_after(text, "<!-- output -->")
    admin, _ = make_group(tmp_path / "groups")
    done = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "CACHEFS_GROUPS_DIR": str(admin), "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected.strip()
    assert done.stderr == ""
