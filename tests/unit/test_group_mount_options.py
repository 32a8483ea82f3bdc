"""``cachefs mount --group ...``: every bad group option is one line and exit 2,
before anything is mounted or a cache dir is made."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_cachefs
from groupsrig import GROUP, make_group


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (groups,) = make_group(tmp_path / "g", ())
    return src, mnt, groups


def mount(setup: tuple[Path, Path, Path], *args: object) -> list[object]:
    src, mnt, groups = setup
    return ["mount", src, mnt, "--cache-dir", mnt.parent / "cache", *args]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--shared-cache", "/tmp"], ["--shared-cache needs --group"]),
        (["--trust-content", "everyone"], ["--trust-content", "invalid choice"]),
        (["--group", "nosuch"], ["nosuch"]),
        (["--group", GROUP, "--encrypt"], ["--encrypt"]),
        (["--group", GROUP, "--shared-cache", "gs://bucket/x"], ["gs"]),
        (["--group", GROUP, "--shared-cache", "s3://B_ad/x"], ["bucket"]),
        (["--group", GROUP, "--shared-cache", "{tmp}/missing"], ["does not exist"]),
        (["--group", GROUP, "--shared-cache", "{src}"], ["overlaps the source"]),
        (["--group", GROUP, "--shared-cache", "{tmp}"], ["overlaps the source"]),
        (["--group", GROUP, "--shared-cache", "{mnt}"], ["overlaps the mount point"]),
        (
            [
                "--group",
                GROUP,
                "--shared-cache",
                "{tmp}/hosted",
                "--shared-cache-endpoint",
                "http://127.0.0.1:9",
            ],
            ["--shared-cache-endpoint"],
        ),
        (["--group", GROUP, "--status-expiry", "1"], ["--status-expiry"]),
    ],
)
def test_bad_group_options_are_one_line(
    setup: tuple[Path, Path, Path], tmp_path: Path, args: list[str], words: list[str]
) -> None:
    src, mnt, groups = setup
    (tmp_path / "hosted").mkdir()
    filled = [a.format(tmp=tmp_path, src=src, mnt=mnt) for a in args]
    if "--group" in filled:
        filled += ["--groups-dir", str(groups)]
    done = run_cachefs(*mount(setup, *filled))
    assert_one_line_error(done, *words)
    assert not (mnt.parent / "cache").exists()
