"""``pip install cachefs`` from a built wheel works on a fresh machine: the
sdist and the wheel of this checkout, installed into a clean venv
(tests/wheelrig.py), hold what pyproject.toml declares, and the venv's own
``cachefs`` (run outside the checkout, with a clean environment) mounts.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from conftest import EXIT_DEADLINE, FUSE_TRANSPORTS, REPO, lazy_unmount
from wheelrig import Installed

from cachefs.control.mounts import mount_at

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def run(installed: Installed, *args: object) -> subprocess.CompletedProcess[str]:
    """The venv's ``cachefs ARGS``, from outside the checkout, nothing inherited."""
    return subprocess.run(
        [installed.bin("cachefs"), *map(str, args)],
        cwd=installed.root,
        env=installed.env(Path("/root")),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_DEADLINE,
        check=False,
    )


def test_version_is_the_projects(installed: Installed) -> None:
    done = run(installed, "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cachefs", PROJECT["version"]]


def test_the_venv_runs_the_installed_cachefs(installed: Installed) -> None:
    done = subprocess.run(
        [
            installed.venv / "bin" / "python",
            "-c",
            "import cachefs, backends; print(cachefs.__file__)",
        ],
        cwd=installed.root,
        env=installed.env(Path("/root")),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(done.stdout.strip()).is_relative_to(installed.venv), done.stdout


def test_the_wheel_holds_the_commands_and_plugins(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
        declared = _sections(wheel.read(entry_points).decode())
    assert declared["console_scripts"] == PROJECT["scripts"]
    assert set(declared["console_scripts"]) == {"cachefs", "mount.cachefs", "mount.fuse.cachefs"}
    for group, points in PROJECT["entry-points"].items():
        assert declared[group] == points, group
    for script in declared["console_scripts"]:
        assert os.access(installed.bin(script), os.X_OK), script


def test_the_sdist_builds_the_same_wheel(installed: Installed) -> None:
    """Everything a build needs is in the sdist: the wheel built from it holds
    every file the checkout's does, and every module of the checkout."""
    with zipfile.ZipFile(installed.wheel) as a, zipfile.ZipFile(installed.checkout_wheel) as b:
        from_sdist, from_checkout = set(a.namelist()), set(b.namelist())
    assert from_sdist == from_checkout
    modules = {
        str(p.relative_to(REPO))
        for package in ("cachefs", "backends")
        for p in (REPO / package).rglob("*.py")
    }
    assert modules <= from_sdist
    with tarfile.open(installed.sdist) as sdist:
        top = installed.sdist.name.removesuffix(".tar.gz")
        held = {name.removeprefix(f"{top}/") for name in sdist.getnames()}
    assert {"pyproject.toml", "README.md"} <= held


@pytest.mark.parametrize("fuse", FUSE_TRANSPORTS)
def test_the_installed_cachefs_mounts(installed: Installed, tmp_path: Path, fuse: str) -> None:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    data = os.urandom(300_000)
    (src / "data.bin").write_bytes(data)
    try:
        done = run(installed, "mount", src, mnt, "--cache-dir", tmp_path / "cache", "--fuse", fuse)
        assert done.returncode == 0, done.stderr
        assert (mnt / "data.bin").read_bytes() == data
        done = run(installed, "stats", "--json", mnt)
        assert done.returncode == 0, done.stderr
        # the daemon serving it is the venv's python
        pid = json.loads(done.stdout)["pid"]
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        assert Path(argv0).is_relative_to(installed.venv), argv0
        done = run(installed, "unmount", mnt)
        assert done.returncode == 0, done.stderr
        assert mount_at(mnt) is None
    finally:
        lazy_unmount(mnt)


def _sections(text: str) -> dict[str, dict[str, str]]:
    """An entry_points.txt: ``[group]`` then ``name = value`` lines."""
    sections: dict[str, dict[str, str]] = {}
    group: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("["):
            group = sections.setdefault(line.strip("[]"), {})
        elif "=" in line:
            name, value = line.split("=", 1)
            group[name.strip()] = value.strip()
    return sections
