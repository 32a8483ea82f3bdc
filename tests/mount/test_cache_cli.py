"""Cache management from the command line, through real mounts.

The mount options that size the cache, and the commands prefetch, pin,
unpin, purge and stats.  --trace shows which reads reached the backend;
the cache dir's data files show what the cache really holds on disk.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import NATIVE_ONLY, disk_usage, pread_direct, run_on_a_terminal

from backends.trace import read_trace
from cachefs.cli.progress import ProgressBar, format_duration, render, summary
from cachefs.units import format_size

if TYPE_CHECKING:
    from conftest import MountFactory

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
KB64 = 64 * 1024
MIB = 1 << 20
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")


def make_tree(root: Path, sizes: dict[str, int]) -> dict[str, bytes]:
    data = {}
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data[name] = os.urandom(size)
        path.write_bytes(data[name])
    return data


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


def calls_for(trace: Path, file_id: str, since: int = 0) -> list[dict[str, object]]:
    return [c for c in read_trace(trace)[since:] if c["file_id"] == file_id]


# -- options -----------------------------------------------------------------------------


@needs_fuse
@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--cache-size", "lots", ["--cache-size", "invalid size 'lots'"]),
        ("--min-free", "120%", ["--min-free", "120%"]),
        ("--min-free", "much%", ["--min-free", "much%"]),
        ("--max-fetches", "0", ["--max-fetches", "at least 1"]),
        ("--max-readahead", "1X", ["--max-readahead", "invalid size"]),
        ("--cache-size", "4K", ["--cache-size", "smaller than one cache block"]),
    ],
)
def test_bad_cache_options_exit_2_with_one_line(
    cachefs: Cachefs, tmp_path: Path, option: str, value: str, words: list[str]
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    done = cachefs(
        "mount", tmp_path / "src", tmp_path / "mnt", "--cache-dir", tmp_path / "c", option, value
    )
    assert done.returncode == 2, done.stderr
    line = one_line(done.stderr)
    assert line.startswith("cachefs") and "error:" in line
    for word in words:
        assert word in line


def test_mount_help_states_the_cache_defaults(cachefs: Cachefs) -> None:
    text = " ".join(cachefs("mount", "--help").stdout.split())
    assert "10G or 80% of the cache filesystem's free space, whichever is smaller" in text
    assert "like 5% (default: 5%)" in text
    assert "(default: 64M; 0 disables)" in text
    assert "--max-fetches N ReadData calls in flight at once (default: 8)" in text


@NATIVE_ONLY
def test_options_reach_the_engine(mount: MountFactory, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    m = mount(
        tmp_path / "src",
        *("--cache-size", "3M", "--min-free", "1%", "--max-readahead", "0"),
        *("--max-fetches", "3"),
    )
    stats = m.stats()
    st = os.statvfs(m.cache_dir)
    assert stats["cache_limit"] == 3 * MIB
    assert stats["min_free"] == st.f_blocks * st.f_frsize // 100
    assert stats["max_readahead"] == 0 and stats["max_fetches"] == 3


# -- prefetch ----------------------------------------------------------------------------


def test_prefetch_of_a_directory_then_remount_serves_with_zero_calls(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs
) -> None:
    src = tmp_path / "src"
    sizes = {"d/empty": 0, "d/one": 1, "d/block": KB64, "d/e/odd": 300_003, "d/e/big": MIB + 17}
    data = make_tree(src, {**sizes, "top.bin": 5000, "other.bin": 7000})
    cache, first_trace, second_trace = tmp_path / "cache", tmp_path / "t1", tmp_path / "t2"
    m = mount(src, "--trace", first_trace, cache_dir=cache)
    done = cachefs("prefetch", m / "d", m / "top.bin")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    total = format_size(sum(sizes.values()) + 5000)
    assert one_line(done.stdout).startswith(
        f"prefetched 6 files, {total} ({total} from the source)"
    )
    calls = read_trace(first_trace)
    assert calls and all("WHOLE_FILE" in c["flags"] for c in calls)
    assert {c["file_id"] for c in calls} == {f for f in sizes if sizes[f]} | {"top.bin"}
    assert m.stats()["cached_bytes"] == sum(sizes.values()) + 5000
    m.unmount()

    again = mount(src, "--trace", second_trace, cache_dir=cache)
    for name in [*sizes, "top.bin"]:
        assert (again / name).read_bytes() == data[name], name
    assert read_trace(second_trace) == []
    assert (again / "other.bin").read_bytes() == data["other.bin"]
    assert {c["file_id"] for c in read_trace(second_trace)} == {"other.bin"}


@NATIVE_ONLY
def test_prefetch_names_the_files_that_failed(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a": 1000, "b": 2000, "c": 3000})
    rules = tmp_path / "rules.json"
    rules.write_text('[{"file": "b", "result": "FAILURE"}]')
    m = mount(src, "--faults", rules, "--retries", "0")
    done = cachefs("prefetch", m.mountpoint, m / "missing")
    assert done.returncode == 1
    assert one_line(done.stdout).startswith("prefetched 2 of 3 files, 5.9 KiB")
    assert one_line(done.stdout).endswith("; 2 failed")
    errors = done.stderr.splitlines()
    assert len(errors) == 2, done.stderr
    assert errors[0].startswith("cachefs: error: missing: no such file")
    assert errors[1].startswith("cachefs: error: b: backend failed")


@NATIVE_ONLY
def test_an_answer_over_a_mebibyte_reaches_the_command(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a": 1000})
    m = mount(src)
    # Each missing name comes back in the answer with its error: over 1 MiB.
    names = [f"{i:04d}-" + "n" * 195 for i in range(4500)]
    done = cachefs("prefetch", m / "a", *(m / name for name in names), timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert one_line(done.stdout).endswith(f"; {len(names)} failed")
    errors = done.stderr.splitlines()
    assert len(errors) == len(names), done.stderr[-2000:]
    for name, error in zip(names, errors, strict=True):
        assert error.startswith(f"cachefs: error: {name}: no such file"), error


@NATIVE_ONLY
def test_prefetch_shows_a_progress_bar_on_a_terminal(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, {f"f{i}": 100_000 for i in range(4)})
    m = mount(src)
    proc, text = run_on_a_terminal("prefetch", m.mountpoint)
    assert proc.returncode == 0
    assert one_line(proc.stdout).startswith("prefetched 4 files")
    segments = text.split("\r")
    assert any(s.startswith("prefetch ") and s.rstrip().endswith("files") for s in segments)
    assert segments[-1] == "" and segments[-2].strip() == ""  # the bar is erased at the end


# -- pin, unpin ------------------------------------------------------------------------


def test_pinned_files_survive_pressure_and_remounts(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs
) -> None:
    src = tmp_path / "src"
    data = make_tree(src, {"keep.bin": 256 * 1024 + 5, **{f"x/f{i}": 512 * 1024 for i in range(8)}})
    cache = tmp_path / "cache"
    small = ("--cache-size", "1M", "--min-free", "0")
    for round_ in range(2):
        trace = tmp_path / f"trace{round_}"
        m = mount(src, "--trace", trace, *small, cache_dir=cache)
        if round_ == 0:
            done = cachefs("pin", m / "keep.bin")
            assert done.returncode == 0, done.stderr
            assert one_line(done.stdout).startswith("pinned 1 file, 256.0 KiB")
        stats = m.stats()
        assert stats["pinned_files"] == 1 and stats["pinned_bytes"] == len(data["keep.bin"])
        for i in range(8):  # 4 MiB through a 1 MiB cache
            assert (m / f"x/f{i}").read_bytes() == data[f"x/f{i}"]
        assert m.stats()["evicted_bytes"] > 0
        seen = len(read_trace(trace))
        got = pread_direct(m / "keep.bin", 0, len(data["keep.bin"]))
        assert got == data["keep.bin"]
        assert calls_for(trace, "keep.bin", since=seen) == []
        m.unmount()
    m = mount(src, *small, cache_dir=cache)
    done = cachefs("unpin", m / "x")
    assert done.returncode == 0
    assert one_line(done.stdout) == "unpinned 0 files"
    assert "nothing pinned at" in done.stderr
    done = cachefs("unpin", m.mountpoint)
    assert one_line(done.stdout) == "unpinned 1 file"
    assert m.stats()["pinned_bytes"] == 0


@NATIVE_ONLY
def test_pinning_beyond_the_limit_is_refused(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs
) -> None:
    src = tmp_path / "src"
    make_tree(src, {"a.bin": 768 * 1024, "d/b.bin": 512 * 1024, "d/c.bin": 100})
    m = mount(src, "--cache-size", "1M", "--min-free", "0")
    assert cachefs("pin", m / "a.bin").returncode == 0
    for target, words in [
        (m / "d/b.bin", "cannot pin d/b.bin: pinned files would hold 1310720 bytes"),
        (m / "d", "cannot pin 2 files: pinned files would hold 1310820 bytes"),
    ]:
        done = cachefs("pin", target)
        assert done.returncode == 1
        assert done.stdout == ""
        line = one_line(done.stderr)
        assert line.startswith(f"cachefs: error: {words}"), line
        assert line.endswith("more than the cache limit of 1048576 bytes")
    assert m.stats()["pinned_files"] == 1
    assert cachefs("unpin", m / "a.bin").returncode == 0
    done = cachefs("pin", m / "d")
    assert done.returncode == 0, done.stderr
    assert m.stats()["pinned_bytes"] == 512 * 1024 + 100


# -- purge ---------------------------------------------------------------------------------


def test_purge_returns_the_space_and_the_next_read_asks_the_source(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs
) -> None:
    src = tmp_path / "src"
    sizes = {"d/a": MIB, "d/b": 600_000, "d/e/c": 300_001, "keep": 200_000}
    data = make_tree(src, sizes)
    trace = tmp_path / "trace"
    m = mount(src, "--trace", trace)
    for name in ("d/a", "d/b", "d/e/c"):
        assert (m / name).read_bytes() == data[name]
    assert cachefs("pin", m / "keep").returncode == 0
    assert disk_usage(m.cache_dir) >= sum(sizes.values())

    done = cachefs("purge", m / "d")
    assert done.returncode == 0, done.stderr
    assert one_line(done.stdout) == "purged 3 files, freed 1.9 MiB"
    assert m.stats()["cached_bytes"] == sizes["keep"]
    assert disk_usage(m.cache_dir) <= sizes["keep"] + 4 * 4096

    done = cachefs("purge", m.mountpoint)
    assert one_line(done.stdout) == "purged 0 files, freed 0 B; kept 1 pinned file"
    seen = len(read_trace(trace))
    assert pread_direct(m / "d/e/c", 1000, 5000) == data["d/e/c"][1000:6000]
    assert calls_for(trace, "d/e/c", since=seen)
    assert pread_direct(m / "keep", 0, 1000) == data["keep"][:1000]
    assert calls_for(trace, "keep", since=seen) == []


@pytest.mark.parametrize("command", ["purge", "reset-file-errors"])
def test_an_early_end_of_file_is_forgotten_by_purge_and_reset(
    mount: MountFactory, tmp_path: Path, cachefs: Cachefs, command: str
) -> None:
    src = tmp_path / "src"
    data = make_tree(src, {"f": 300_000})["f"]
    rules = tmp_path / "rules.json"
    rules.write_text('[{"file": "f", "eof": 1000}]')
    m = mount(src, "--faults", rules, "--ttl", "0")
    assert (m / "f").read_bytes() == data[:1000] + bytes(299_000)  # what the source said
    numbers = m.stats()
    assert numbers["short_files"] == ["f"]
    assert "ends early" in cachefs("stats", m.mountpoint).stdout
    rules.write_text("[]")
    assert (m / "f").read_bytes() == data[:1000] + bytes(299_000)  # the same version
    done = cachefs(command, m / "f")
    assert done.returncode == 0, done.stderr
    assert m.stats()["short_files"] == []
    assert (m / "f").read_bytes() == data


# -- the limit -------------------------------------------------------------------------------


def test_the_limit_holds_under_four_parallel_readers(mount: MountFactory, tmp_path: Path) -> None:
    src = tmp_path / "src"
    limit = 4 * MIB
    data = make_tree(src, {f"f{i}": 5 * MIB for i in range(4)})  # 5x the limit
    m = mount(
        src,
        *("--cache-size", limit, "--min-free", "0"),
        *("--max-fetches", "2", "--max-readahead", "512K"),
    )
    # In flight: 2 fetches of at most one kernel request (1 MiB) or one readahead
    # window (512K), each widened to whole 64K blocks; plus extent-tree slack.
    bound = limit + 2 * (MIB + 2 * KB64) + 16 * 4096
    failures: list[str] = []

    def reader(name: str) -> None:
        try:
            with open(m / name, "rb") as f:
                assert f.read() == data[name]
            rnd = random.Random(name)
            for _ in range(40):
                offset = rnd.randrange(len(data[name]))
                got = pread_direct(m / name, offset, 256 * 1024)
                assert got == data[name][offset : offset + 256 * 1024]
        except BaseException as e:  # reported by the main thread
            failures.append(f"{name}: {e!r}")

    readers = [threading.Thread(target=reader, args=(name,)) for name in data]
    for t in readers:
        t.start()
    peak = 0
    while any(t.is_alive() for t in readers):
        peak = max(peak, disk_usage(m.cache_dir))
        readers[0].join(0.005)  # sampling pace
    for t in readers:
        t.join()
    assert failures == []
    stats = m.stats()
    assert stats["evicted_bytes"] > 0
    assert stats["cached_bytes"] <= bound
    assert peak <= bound, (peak, bound)
    assert disk_usage(m.cache_dir) <= bound


# -- the progress line, in process ----------------------------------------------------------


def test_progress_line_rendering() -> None:
    report = {"done": 3 * MIB, "total": 4 * MIB, "files_done": 1, "files": 2}
    line = render("prefetch", report, 1 * MIB, 100)
    assert line.startswith("prefetch  75% [")
    assert line.endswith("3.0 MiB/4.0 MiB 1.0 MiB/s ETA 0:01 1/2 files")
    assert len(line) <= 100
    assert len(render("prefetch", report, None, 40)) < 40
    assert "ETA --:--" in render("prefetch", report, None, 200)
    scanning = {"scanning": True, "done": 0, "total": 5 * MIB, "files_done": 0, "files": 7}
    assert render("pin", scanning, None, 80) == "pin: finding files... 7 files, 5.0 MiB"
    assert [format_duration(s) for s in (7, 754, 3723)] == ["0:07", "12:34", "1:02:03"]


def test_progress_bar_rate_is_recent_and_the_bar_is_erased() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = ProgressBar("prefetch", out, clock=lambda: now[0], width=120)
    for t, done in [(0, 0), (1, MIB), (2, 2 * MIB), (10, 3 * MIB), (12, 13 * MIB)]:
        now[0] = t
        bar.update({"done": done, "total": 20 * MIB, "files_done": 0, "files": 1})
    rate = bar.rate()
    assert rate is not None and rate == pytest.approx(5 * MIB)  # the last 5 s only
    bar.close()
    assert out.getvalue().endswith("\r")
    assert out.getvalue().split("\r")[-2].strip() == ""


def test_summary_line() -> None:
    result = {"files": 3, "succeeded": 2, "bytes": 3 * MIB, "fetched": MIB, "failed": [{}]}
    assert summary("prefetched", result, 1.25) == (
        "prefetched 2 of 3 files, 3.0 MiB (1.0 MiB from the source) in 1.2 s; 1 failed"
    )
    result = {"files": 1, "succeeded": 1, "bytes": 10, "fetched": 0, "failed": []}
    assert summary("pinned", result, 0) == "pinned 1 file, 10 B (0 B from the source) in 0.0 s"
