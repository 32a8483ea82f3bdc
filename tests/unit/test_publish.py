"""``cachefs publish``: content information for every file of a source."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import assert_one_line_error
from enginerig import Bare

from backends.faulty import FaultyBackend
from backends.local import LocalBackend, version_of
from backends.memory import MemoryBackend
from backends.trace import TraceBackend, read_trace
from backends.wrapper import Wrapper
from cachefs import CacheConfig, cli
from cachefs.contract import ContentInfo, ReadData
from cachefs.errors import ConfigError
from cachefs.publish import CALL_SIZE, PARALLEL, publish

pytest_plugins = ["s3server"]

Cachefs = Callable[..., subprocess.CompletedProcess[str]]
BS = 64 * 1024
A = os.urandom(3 * BS + 100)
B = b"bee\n"


def summary_of(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """a.bin, sub/b.txt, empty, and a symlink (never published)."""
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    (root / "a.bin").write_bytes(A)
    (root / "sub" / "b.txt").write_bytes(B)
    (root / "empty").write_bytes(b"")
    (root / "link").symlink_to("a.bin")
    return root


def local_record(root: Path, rel: str) -> ContentInfo:
    return ContentInfo.from_bytes((root / ".cachefs-ci" / rel).read_bytes())


def expected_local(root: Path, rel: str, block_size: int = BS) -> ContentInfo:
    path = root / rel
    return ContentInfo.of_bytes(path.read_bytes(), version_of(os.stat(path)), block_size)


def replace_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- the command line on a directory ------------------------------------------------


def test_help_says_what_it_does(cachefs: Cachefs) -> None:
    done = cachefs("publish", "--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert done.stdout.startswith("usage: cachefs publish")
    assert "SHA-256 of each of its blocks" in text
    assert "must equal the --block-size of the mounts" in text
    assert "publish" in cachefs("--help").stdout


def test_publish_a_directory(cachefs: Cachefs, src: Path) -> None:
    done = cachefs("publish", src, "--block-size", "64K")
    assert done.returncode == 0, done.stderr
    assert summary_of(done).startswith(
        "published 3 files, 0 unchanged, 0 skipped, 0 failed, 0 removed; 192.1 KiB hashed"
    )
    for rel in ("a.bin", "sub/b.txt", "empty"):
        stored = (src / ".cachefs-ci" / rel).read_bytes()
        assert stored == expected_local(src, rel).to_bytes()
    assert not (src / ".cachefs-ci" / "link").exists()

    # Again: nothing to read.
    done = cachefs("publish", src, "--block-size", "64K")
    assert done.returncode == 0, done.stderr
    assert summary_of(done).startswith(
        "published 0 files, 3 unchanged, 0 skipped, 0 failed, 0 removed; 0 B hashed"
    )

    # A file replaced is published again; a file removed loses its record.
    replace_file(src / "a.bin", b"new content")
    (src / "sub" / "b.txt").unlink()
    done = cachefs("publish", src, "--block-size", "64K")
    assert done.returncode == 0, done.stderr
    assert summary_of(done).startswith(
        "published 1 file, 1 unchanged, 0 skipped, 0 failed, 1 removed; 11 B hashed"
    )
    assert local_record(src, "a.bin") == expected_local(src, "a.bin")
    assert not (src / ".cachefs-ci" / "sub").exists()


def test_the_default_block_size_is_the_mounts(cachefs: Cachefs, src: Path) -> None:
    done = cachefs("publish", f"file://{src}")
    assert done.returncode == 0, done.stderr
    assert local_record(src, "a.bin").block_size == CacheConfig().block_size == 1 << 20
    assert local_record(src, "a.bin") == expected_local(src, "a.bin", 1 << 20)
    # Another block size makes every record stale.
    done = cachefs("publish", src, "--block-size", "4K")
    assert summary_of(done).startswith("published 3 files, 0 unchanged")
    assert local_record(src, "a.bin") == expected_local(src, "a.bin", 4096)


def test_a_file_that_becomes_a_directory(cachefs: Cachefs, src: Path) -> None:
    assert cachefs("publish", src, "--block-size", "64K").returncode == 0
    (src / "empty").unlink()
    (src / "empty").mkdir()
    (src / "empty" / "inner").write_bytes(B)
    done = cachefs("publish", src, "--block-size", "64K")
    assert done.returncode == 0, done.stderr
    assert summary_of(done).startswith("published 1 file, 2 unchanged, 0 skipped, 0 failed, 1 ")
    assert local_record(src, "empty/inner") == expected_local(src, "empty/inner")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["{tmp}/nope"], ["nope", "does not exist"]),
        (["{tmp}/src/a.bin"], ["not a directory"]),
        (["s3://Bad_Bucket"], ["not a valid bucket name"]),
        (["ftp://host/x"], ["unknown source scheme 'ftp'"]),
        (["{tmp}/src", "--block-size", "12Q"], ["invalid size", "12Q"]),
        (["{tmp}/src", "--block-size", "3K"], ["power of two"]),
        (["{tmp}/src", "--block-size", "128M"], ["power of two"]),
        (["{tmp}/src", "--s3-region", "eu-west-1"], ["--s3-region", "only for s3://"]),
        ([], ["required"]),
    ],
)
def test_bad_input_is_one_line(
    cachefs: Cachefs, src: Path, tmp_path: Path, args: list[str], words: list[str]
) -> None:
    done = cachefs("publish", *(a.format(tmp=tmp_path) for a in args))
    assert_one_line_error(done, *words)
    assert done.stdout == ""
    assert not (src / ".cachefs-ci").exists()


def test_a_source_that_cannot_store_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("cachefs.publish.open_backend", lambda source, **options: Bare({"f": B}))
    assert cli.main(["publish", "bare://x"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "cachefs: error: Bare() cannot store content information\n"


def test_a_failing_file_fails_the_run(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    src: Path,
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "a.bin", "result": "FILE_FAILURE"}]))
    monkeypatch.setattr(
        "cachefs.publish.open_backend",
        lambda source, **options: FaultyBackend(LocalBackend(source), rules),
    )
    assert cli.main(["publish", str(src), "--block-size", "64K"]) == 1
    out, _ = capsys.readouterr()
    assert out.startswith("published 2 files, 0 unchanged, 0 skipped, 1 failed, 0 removed")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["a.bin: reading @0: FILE_FAILURE"]
    assert not (src / ".cachefs-ci" / "a.bin").exists()
    assert local_record(src, "sub/b.txt") == expected_local(src, "sub/b.txt")


# -- the command line on a bucket ----------------------------------------------------


def test_publish_a_bucket(cachefs: Cachefs, s3_server: Any) -> None:
    files = {"data/a.bin": A, "data/sub/b.txt": B, "data/empty": b"", "elsewhere": B}
    bucket = s3_server.new_bucket(files)
    url = f"s3://{bucket}/data"

    def run() -> str:
        done = cachefs("publish", url, "--block-size", "64K", "--s3-endpoint", s3_server.endpoint)
        assert done.returncode == 0, done.stderr
        return summary_of(done)

    def record(rel: str) -> ContentInfo:
        got = s3_server.admin.get_object(Bucket=bucket, Key=f"data/.cachefs-ci/{rel}")
        return ContentInfo.from_bytes(got["Body"].read())

    def expected(rel: str) -> ContentInfo:
        got = s3_server.admin.get_object(Bucket=bucket, Key=f"data/{rel}")
        return ContentInfo.of_bytes(got["Body"].read(), got["ETag"], BS)

    assert run().startswith("published 3 files, 0 unchanged, 0 skipped, 0 failed, 0 removed")
    for rel in ("a.bin", "sub/b.txt", "empty"):
        assert record(rel) == expected(rel)
    listed = s3_server.admin.list_objects_v2(Bucket=bucket, Prefix="data/.cachefs-ci/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "data/.cachefs-ci/a.bin",
        "data/.cachefs-ci/empty",
        "data/.cachefs-ci/sub/b.txt",
    ]

    assert run().startswith("published 0 files, 3 unchanged, 0 skipped, 0 failed, 0 removed")

    s3_server.put(bucket, "data/a.bin", b"new content")
    s3_server.delete(bucket, "data/sub/b.txt")
    assert run().startswith("published 1 file, 1 unchanged, 0 skipped, 0 failed, 1 removed")
    assert record("a.bin") == expected("a.bin")
    listed = s3_server.admin.list_objects_v2(Bucket=bucket, Prefix="data/.cachefs-ci/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "data/.cachefs-ci/a.bin",
        "data/.cachefs-ci/empty",
    ]


def test_a_missing_bucket_is_one_line(cachefs: Cachefs, s3_server: Any) -> None:
    done = cachefs("publish", "s3://no-such-bucket", "--s3-endpoint", s3_server.endpoint)
    assert_one_line_error(done, "has no bucket no-such-bucket")


# -- the walk, the reads and what is skipped -----------------------------------------


class Hooked(Wrapper):
    """Calls *hook(name, file_id)* before passing each call through."""

    def __init__(self, inner: Any, hook: Callable[[str, str], Any]) -> None:
        super().__init__(inner)
        self.hook = hook

    async def _call(self, name: str, file_id: str) -> None:
        result = self.hook(name, file_id)
        if result is not None:
            await result

    async def list_dir(self, dir_id: str) -> Any:
        await self._call("list_dir", dir_id)
        return await super().list_dir(dir_id)

    async def open_file(self, file_id: str) -> Any:
        await self._call("open_file", file_id)
        return await super().open_file(file_id)

    async def close_file(self, file_id: str, context: Any) -> None:
        await self._call("close_file", file_id)
        await super().close_file(file_id, context)

    async def read_data(self, req: ReadData) -> None:
        await self._call("read_data", req.file_id)
        await super().read_data(req)


async def test_memory_records_match_its_own_publish() -> None:
    mem = MemoryBackend({"a.bin": A, "d/b.txt": B})
    report = await publish(mem, BS)
    assert (report.published, report.bytes_hashed) == (2, len(A) + len(B))
    expected = MemoryBackend({"a.bin": A, "d/b.txt": B})
    assert await mem.content_info("a.bin") == expected.publish("a.bin", BS)
    assert await mem.content_info("d/b.txt") == expected.publish("d/b.txt", BS)


async def test_one_whole_file_transfer_pinned_to_the_version(tmp_path: Path) -> None:
    big = os.urandom(2 * CALL_SIZE + 5)
    mem = MemoryBackend({"big": big})
    version = (await mem.stat("big")).version
    await publish(TraceBackend(mem, tmp_path / "trace.jsonl"), BS)
    calls = read_trace(tmp_path / "trace.jsonl")
    assert [(c["position"], c["bytes_to_read"], c["result"]) for c in calls] == [
        (0, CALL_SIZE, "SUCCESS"),
        (CALL_SIZE, CALL_SIZE, "SUCCESS"),
        (2 * CALL_SIZE, 5, "SUCCESS"),
    ]
    assert [c["flags"] for c in calls] == [
        ["WHOLE_FILE", "CONTINUOUS_STARTED", "TIL_END"],
        ["IN_PROGRESS", "WHOLE_FILE", "TIL_END"],
        ["IN_PROGRESS", "WHOLE_FILE", "CONTINUOUS_FINISHED", "TIL_END"],
    ]
    assert await mem.content_info("big") == ContentInfo.of_bytes(big, version, BS)


async def test_partial_answers_are_read_on(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"file": "*", "result": "PARTIAL", "max_bytes": 1000}]))
    mem = MemoryBackend({"a.bin": A})
    report = await publish(FaultyBackend(mem, rules), BS)
    assert (report.published, report.failed) == (1, 0)
    assert await mem.content_info("a.bin") == MemoryBackend({"a.bin": A}).publish("a.bin", BS)


async def test_a_failed_read_sends_canceled_and_closes(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    big = os.urandom(CALL_SIZE + 1)
    rules.write_text(
        json.dumps(
            [
                {"file": "*", "result": "PARTIAL", "max_bytes": CALL_SIZE, "count": 1},
                {"file": "*", "result": "FAILURE"},
            ]
        )
    )
    closed: list[str] = []
    mem = MemoryBackend({"big": big})
    traced = TraceBackend(FaultyBackend(mem, rules), tmp_path / "trace.jsonl")
    hooked = Hooked(traced, lambda name, f: closed.append(f) if name == "close_file" else None)
    report = await publish(hooked, BS)
    assert (report.published, report.failed) == (0, 1)
    calls = read_trace(tmp_path / "trace.jsonl")
    assert [c["result"] for c in calls] == ["PARTIAL", "FAILURE", "SUCCESS"]
    assert calls[-1]["flags"] == ["CANCELED", "WHOLE_FILE"]
    assert closed == ["big"]
    assert await mem.content_info("big") is None


async def test_a_file_changed_during_the_read_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    mem = MemoryBackend({"a.bin": A, "b.txt": B})

    def change(name: str, file_id: str) -> None:
        if name == "read_data" and file_id == "a.bin":
            mem.put("a.bin", b"changed")

    report = await publish(Hooked(mem, change), BS)
    assert (report.published, report.skipped, report.failed) == (1, 1, 0)
    assert await mem.content_info("a.bin") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "skipped a.bin: it changed while being read (the source answered FILE_MODIFIED_EXTERNALLY)"
    ]
    # The next run publishes what it holds now.
    report = await publish(mem, BS)
    assert (report.published, report.unchanged) == (1, 1)
    assert (await mem.content_info("a.bin")).size == len(b"changed")


async def test_a_file_changed_after_the_read_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    mem = MemoryBackend({"a.bin": A})

    def change(name: str, file_id: str) -> None:
        if name == "close_file":
            mem.put("a.bin", b"changed")

    report = await publish(Hooked(mem, change), BS)
    assert (report.published, report.skipped, report.bytes_hashed) == (0, 1, len(A))
    assert await mem.content_info("a.bin") is None
    assert "skipped a.bin: it changed while being read" in caplog.text


async def test_unchanged_files_are_not_read() -> None:
    mem = MemoryBackend({"a.bin": A, "b.txt": B})
    await publish(mem, BS)
    calls: list[str] = []
    report = await publish(Hooked(mem, lambda name, f: calls.append(name)), BS)
    assert (report.published, report.unchanged) == (0, 2)
    assert "open_file" not in calls and "read_data" not in calls
    # A record of another block size, or of another version, is stale.
    await mem.put_content_info("a.bin", ContentInfo.of_bytes(A, "other", BS))
    mem.publish("b.txt", 4096)
    report = await publish(mem, BS)
    assert (report.published, report.unchanged) == (2, 0)


async def test_stale_records_are_removed_only_after_a_complete_walk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mem = MemoryBackend({"a.bin": A, "d/b.txt": B})
    await mem.put_content_info("gone", ContentInfo.of_bytes(B, "1", BS))

    def fail_d(name: str, dir_id: str) -> None:
        if name == "list_dir" and dir_id == "d":
            raise OSError("listing d/: HTTP 503 SlowDown")

    report = await publish(Hooked(mem, fail_d), BS)
    assert (report.published, report.failed, report.removed) == (1, 1, 0)
    assert await mem.content_info("gone") is not None
    assert "cannot list d/: listing d/: HTTP 503 SlowDown" in caplog.text

    report = await publish(mem, BS)
    assert (report.published, report.unchanged, report.removed) == (1, 1, 1)
    assert await mem.content_info_ids() == ["a.bin", "d/b.txt"]


async def test_at_most_parallel_files_at_once() -> None:
    mem = MemoryBackend({f"f{i}": bytes([i]) * 10 for i in range(3 * PARALLEL)})
    open_now, most = 0, 0

    async def hook(name: str, file_id: str) -> None:
        nonlocal open_now, most
        if name == "open_file":
            open_now += 1
            most = max(most, open_now)
            await trio.testing.wait_all_tasks_blocked()
        elif name == "close_file":
            open_now -= 1

    report = await publish(Hooked(mem, hook), BS)
    assert report.published == 3 * PARALLEL
    assert most == PARALLEL


async def test_publish_refuses_a_backend_that_cannot_store() -> None:
    with pytest.raises(ConfigError, match="cannot store content information"):
        await publish(Bare({"f": B}), BS)
