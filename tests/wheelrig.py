"""cachefs as a user installs it: the sdist and the wheel built from this
checkout, and a clean venv with the wheel installed, made once per test
session (``installed``: tests/mount/test_packaging.py, test_nonroot.py).

The build works on a copy of the checkout, so that it leaves no build/ or
egg-info behind.  The wheel installed is the one built from the sdist, as
``pip install cachefs`` builds it from PyPI when no wheel fits; the one
built from the checkout is kept to compare.  The venv has no system site
packages, lives in a world-readable directory and uses a python every user
may run (another user mounts with it), with the pyfuse3 extra (pip builds
pyfuse3 once; its cache makes later sessions quick).  Its commands run
through :meth:`Installed.env`: outside the checkout, no PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Not part of a release: what the copy the build works on leaves out.
_NOT_SHIPPED = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis",
    "results",
)  # fmt: skip
#: Building and installing is quick with pip's cache; the first pyfuse3 build is not.
BUILD_DEADLINE = 600.0


@dataclass(frozen=True)
class Installed:
    """The release files built and the venv they were installed into."""

    sdist: Path
    #: built from the sdist, and installed
    wheel: Path
    #: built from the checkout, to compare
    checkout_wheel: Path
    venv: Path
    #: a world-readable directory outside the checkout, for the tests' own files
    root: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def env(self, home: Path) -> dict[str, str]:
        """The whole environment for the venv's commands: nothing inherited."""
        return {
            "HOME": str(home),
            "PATH": f"{self.venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8",
        }


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    """Built once per session (tests/conftest.py offers it to every test)."""
    root = Path(tempfile.mkdtemp(prefix="cachefs-wheel-"))
    try:
        root.chmod(0o755)
        yield _build_and_install(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _build_and_install(root: Path) -> Installed:
    tree, dist = root / "checkout", root / "dist"
    shutil.copytree(REPO, tree, ignore=_NOT_SHIPPED, symlinks=True)
    dist.mkdir()
    # The checkout's own venv has setuptools, to make the sdist without a download.
    make_sdist = "import sys, setuptools.build_meta as b; print(b.build_sdist(sys.argv[1]))"
    sdist = dist / _finish(_start(sys.executable, "-c", make_sdist, dist, cwd=tree)).split()[-1]
    # The wheels as pip builds them: isolated, with the build backend pyproject.toml
    # names; side by side with each other and the venv, which need nothing of each other.
    wheel = (sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check")
    venv = root / "venv"
    steps = [
        _start(*wheel, "-w", dist / "checkout", tree, cwd=root),
        _start(*wheel, "-w", dist / "sdist", sdist, cwd=root),
        _start(_shared_python(), "-m", "venv", venv, cwd=root),
    ]
    for step in steps:
        _finish(step)
    (checkout_wheel,) = (dist / "checkout").glob("*.whl")
    (wheel_file,) = (dist / "sdist").glob("*.whl")
    pip = (venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check")
    _finish(_start(*pip, f"{wheel_file}[pyfuse3]", cwd=root))
    return Installed(sdist, wheel_file, checkout_wheel, venv, root)


def _shared_python() -> str:
    """A python >= 3.11 that every user may run (this one may live in root's home)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        real = Path(os.path.realpath(candidate))
        if all(p.stat().st_mode & stat.S_IXOTH for p in (real, *real.parents)):
            done = subprocess.run(
                [real, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"], check=False
            )
            if done.returncode == 0:
                return str(real)
    pytest.fail("no python >= 3.11 that every user may run (/usr/bin/python3)")


def _start(*args: object, cwd: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.Popen(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(step: subprocess.Popen[str]) -> str:
    """What *step* printed; the test fails if it did."""
    try:
        out, err = step.communicate(timeout=BUILD_DEADLINE)
    except subprocess.TimeoutExpired:
        step.kill()
        step.communicate()
        pytest.fail(f"{' '.join(map(str, step.args))}: not within {BUILD_DEADLINE:g} s")
    if step.returncode != 0:
        pytest.fail(f"{' '.join(map(str, step.args))} failed:\n{out}\n{err}")
    return out
