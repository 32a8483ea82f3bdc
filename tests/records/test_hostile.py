"""Group records attacked as a hostile or careless user would: a hung engine, a
forged engine, a full disk, an odd output path, a plain member forging a
record, two processes of one member.  Each test is a problem found by hand and
fails until it is fixed; what held up is not repeated here (see the report of
issue 20's hostile test).

Commands run as a user runs them (one process each, ``CACHEFS_GROUPS_DIR`` per
member); every wait has a deadline and nothing sleeps to synchronise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from groupsrig import GROUP, make_group
from redisserver import RedisServer

from cachefs.records import InvalidRecord, Record, Role, open_group
from cachefs.records.identity import Identity
from cachefs.records.model import encode_record
from cachefs.records.redislog import EngineLog

REPO = Path(__file__).resolve().parents[2]
TYPE = "0f6c5a52-8d1e-4c5e-9a43-2b7f1c9d0e11"
RECORD_TYPE = uuid.UUID(TYPE)
DEADLINE = 60.0  # seconds: a deadline for a command or a sync, never a measure


def env_of(groups_dir: Path) -> dict[str, str]:
    return {**os.environ, "CACHEFS_GROUPS_DIR": str(groups_dir), "PYTHONDONTWRITEBYTECODE": "1"}


def cli(
    groups_dir: Path,
    *args: object,
    timeout: float = DEADLINE,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``cachefs ARGS`` as the member whose groups directory is *groups_dir*."""
    return subprocess.run(
        [sys.executable, "-m", "cachefs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env_of(groups_dir),
        stdin=subprocess.DEVNULL,
        preexec_fn=preexec_fn,
    )


def one_error_line(done: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with one line on stderr naming an error (never an internal
    error, never a traceback)."""
    assert done.returncode not in (0, 1), (done.returncode, done.stderr)
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr[:400]
    assert lines[0].startswith("cachefs") and "error:" in lines[0], lines
    assert "internal error" not in lines[0], lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def soon(hours: float = 1.0) -> datetime:
    return datetime.now(UTC) + timedelta(hours=hours)


def file_size_limit(limit: int) -> Callable[[], None]:
    """For a child process: no file may grow past *limit* bytes (EFBIG, as on a full
    disk, without root or a mount)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@contextmanager
def silent_port() -> Iterator[int]:
    """A port where connections are accepted (by the kernel) and never answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        yield int(s.getsockname()[1])


# -- a hung engine: one warning line, not a page of traceback ------------------------------


def test_an_engine_that_accepts_and_never_answers_is_one_warning_line(tmp_path: Path) -> None:
    with silent_port() as port:
        (admin,) = make_group(tmp_path, (), engine=f"redis://127.0.0.1:{port}/0")
        done = cli(admin, "records", "add", "--type", TYPE, "--expires", "1h", "--timeout", "1")
    assert done.returncode == 0, done.stderr[-400:]
    assert "Traceback" not in done.stderr, done.stderr[:400]
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cachefs: warning:"), done.stderr[:400]


def test_a_hung_redis_is_one_warning_line(tmp_path: Path, redis_server: RedisServer) -> None:
    (admin,) = make_group(tmp_path, (), engine=redis_server.url)
    redis_server.pause()  # SIGSTOP: the port is open and nothing answers
    try:
        done = cli(admin, "records", "list", "--timeout", "1")
    finally:
        redis_server.resume()
    assert done.returncode == 0, done.stderr[-400:]
    assert "Traceback" not in done.stderr, done.stderr[:400]
    assert len(done.stderr.splitlines()) == 1, done.stderr[:400]


# -- a forged engine ---------------------------------------------------------------------


def test_oversized_forged_log_entries_do_not_grow_a_member_without_bound(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Anyone who can write to Redis appends entries far larger than any record the
    group allows; a member reads them 500 at a time, whole (400 MB of junk took a
    member to 1.3 GB, and past its --timeout it never got beyond them)."""
    admin, member = make_group(tmp_path, (Role.MEMBER,), engine=redis_server.url)

    # the member has a position in the log (it reads the log from there, not the state)
    group_id = json.loads(cli(member, "group", "status", "--json").stdout)["group_id"]

    async def forge() -> None:
        async with redis_server.client() as redis:
            junk = b"x" * (16 << 20)
            for _ in range(8):  # 128 MB; the group's records are at most 1 MiB
                await redis.xadd(
                    f"cachefs:{group_id}:log", {"kind": "rec", "body": junk, "sig": "s"}
                )

    trio.run(forge)
    after = cli(admin, "records", "add", "--type", TYPE, "--expires", "1h")  # behind the junk
    assert after.returncode == 0, after.stderr[-400:]
    peak = tmp_path / "peak"
    probe = textwrap.dedent(
        f"""
        import resource, sys
        from cachefs.cli.main import main
        code = main(["records", "list", "--timeout", "{DEADLINE}"])
        open({str(peak)!r}, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
        sys.exit(code)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=DEADLINE + 30,
        cwd=REPO,
        env=env_of(member),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-400:]
    assert after.stdout.strip() in done.stdout, done.stderr[-400:]  # it got past the junk
    peak_mib = int(peak.read_text()) / 1024
    # 123 MiB here; one CI run measured 509 MiB, not understood yet (issue 20's note):
    # the bound asserted is that a member does not hold the junk, several times over
    assert peak_mib < 768, f"a member reading 128 MB of forged entries peaked at {peak_mib:.0f} MiB"


def test_status_counts_the_malformed_log_entries_it_rejected(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    admin, member = make_group(tmp_path, (Role.MEMBER,), engine=redis_server.url)
    status = json.loads(cli(member, "group", "status", "--json").stdout)  # a position

    async def forge() -> None:
        async with redis_server.client() as redis:
            log = f"cachefs:{status['group_id']}:log"
            await redis.xadd(log, {"foo": "bar"})  # not kind/body/sig
            await redis.xadd(log, {"kind": "bogus", "body": "x", "sig": "y"})

    trio.run(forge)
    done = cli(member, "group", "status", "--json")
    assert done.returncode == 0, done.stderr
    # the command read and refused both; "rejected" says 0 (it shows the store's count only)
    assert json.loads(done.stdout)["rejected"] >= 2


async def test_a_plain_member_cannot_take_over_an_administrators_record(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A member signs, with its own key, a later version of an administrator's record
    naming itself creator, and publishes it.  Members that hold the record refuse it;
    a member that joins later (it reads the engine's state) takes it, and then refuses
    the administrator's own updates of the record for good."""
    admin_dir, mallory_dir, late_dir = make_group(
        tmp_path, (Role.MEMBER, Role.MEMBER), engine=redis_server.url
    )
    with trio.fail_after(DEADLINE):
        async with (
            open_group(GROUP, groups_dir=admin_dir) as admin,
            open_group(GROUP, groups_dir=mallory_dir) as mallory,
        ):
            rid = await admin.records.add(Record(type=RECORD_TYPE, expires=soon(), data=b"admin"))
            assert await admin.sync(DEADLINE) and await mallory.sync(DEADLINE)
            held = await mallory.records.get(rid)
            me = Identity.load(mallory_dir / "identity.key")
            forged = dataclasses.replace(
                held,
                version=held.version + 5,
                creator=me.member_id,
                modified_by=me.member_id,
                modified=datetime.now(UTC),
                data=b"mallory",
                signature=b"",
            )
            body = encode_record(admin.group_id, forged)
            async with EngineLog.connect(redis_server.url) as client:
                await EngineLog(client, admin.group_id, 100_000).publish(
                    [("rec", body, me.sign(body))]
                )
            assert await admin.sync(DEADLINE)
            assert (await admin.records.get(rid)).data == b"admin"
        async with open_group(GROUP, groups_dir=late_dir) as late:
            assert await late.sync(DEADLINE)
            assert (await late.records.get(rid)).creator == admin.identity.member_id
        async with open_group(GROUP, groups_dir=admin_dir) as admin:
            held = await admin.records.get(rid)
            await admin.records.update(dataclasses.replace(held, data=b"admin v2"))
            assert await admin.sync(DEADLINE)
        async with open_group(GROUP, groups_dir=late_dir) as late:
            assert await late.sync(DEADLINE)
            assert (await late.records.get(rid)).data == b"admin v2"


# -- two processes of one member ---------------------------------------------------------


async def test_two_processes_of_one_member_do_not_lose_an_update(tmp_path: Path) -> None:
    """Two processes of one member (a ``records watch`` or a program, and a command)
    share its database; the store's lock is per process.  Between one's read of the
    version held and its write, the other updates the record: both are told
    "version 2", and the second write silently replaces the first (the store promises
    INVALID_RECORD rather than a change overwritten unseen)."""
    (member,) = make_group(tmp_path, ())
    with trio.fail_after(DEADLINE):
        async with (
            open_group(GROUP, groups_dir=member) as one,
            open_group(GROUP, groups_dir=member) as two,
        ):
            rid = await one.records.add(Record(type=RECORD_TYPE, expires=soon(), data=b"v1"))
            read = await one.records.get(rid)
            real_live = one.records._live  # the read of the version held, in update()

            async def other_process_updates_meanwhile(
                record_id: uuid.UUID, now: datetime
            ) -> Record:
                held = await real_live(record_id, now)
                theirs = await two.records.get(record_id)
                await two.records.update(dataclasses.replace(theirs, data=b"two"))
                return held

            one.records._live = other_process_updates_meanwhile  # type: ignore[method-assign]
            try:
                with pytest.raises(InvalidRecord):  # today: both get version 2, "two" is lost
                    await one.records.update(dataclasses.replace(read, data=b"one"))
            finally:
                one.records._live = real_live  # type: ignore[method-assign]


# -- files: a full disk, a groups directory that is a file, an odd output path ----------


def test_a_group_create_on_a_full_disk_is_one_error_and_can_be_retried(tmp_path: Path) -> None:
    home = tmp_path / "m"
    assert cli(home, "group", "identity").returncode == 0
    done = cli(home, "group", "create", "farm", preexec_fn=file_size_limit(300))
    one_error_line(done)  # today: "internal error: OSError(27, 'File too large')", exit 1
    # the disk has room again: the same command works, and no half-made group is left
    again = cli(home, "group", "create", "farm")
    assert again.returncode == 0, again.stderr
    assert cli(home, "group", "list").stderr == ""


def test_a_member_key_on_a_full_disk_is_one_error(tmp_path: Path) -> None:
    done = cli(tmp_path / "m", "group", "identity", "--name", "ann", preexec_fn=file_size_limit(10))
    one_error_line(done)  # today: "internal error: OSError(27, 'File too large')", exit 1


def test_a_groups_directory_that_is_a_file_is_one_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "groups"
    not_a_dir.write_text("oops\n")
    one_error_line(cli(not_a_dir, "group", "identity"))  # today: internal FileExistsError
    one_error_line(cli(not_a_dir, "group", "create", "farm"))


@pytest.mark.parametrize("command", ["export", "invite"])
def test_writing_to_a_fifo_or_through_a_link_leaves_them_be(tmp_path: Path, command: str) -> None:
    """``records export FILE`` and ``group invite -o FILE`` rename a new file over FILE,
    whatever it is: a FIFO becomes a regular file, a symbolic link is replaced, and as
    root ``records export /dev/null`` replaces /dev/null itself.  They should write
    into it, or refuse it with one line -- not replace it."""
    (admin,) = make_group(tmp_path / "groups", ())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "target"
    target.write_text("mine\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    key = "0Ot0DKDHR1ozzDew-6ly0fxtnIA-6fdMPbfIlG2BCTY"
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a writer into it never blocks
    try:
        for path in (fifo, link):
            if command == "export":
                args: tuple[object, ...] = ("records", "export", path)
            else:
                args = ("group", "invite", GROUP, key, "-o", path)
            cli(admin, *args, "--offline")
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert link.is_symlink(), "the symbolic link was replaced by a regular file"


# -- one line per error ------------------------------------------------------------------


def test_revoking_the_creator_is_one_error_line(tmp_path: Path) -> None:
    (admin,) = make_group(tmp_path, ())
    creator = json.loads(cli(admin, "group", "identity", "--json").stdout)["member_id"]
    done = cli(admin, "group", "revoke", GROUP, creator, "--offline")
    # today a WARNING of the store's log comes first: two lines
    one_error_line(done, "NOT_AUTHORIZED")
