"""The ``cachefs group`` and ``cachefs records`` commands as a user runs them: one
process per command, one groups directory per member (``CACHEFS_GROUPS_DIR``),
as on separate machines.  Every error is one line naming its error and its exit
code, never a traceback."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from groupsrig import GROUP, make_group
from redisserver import RedisServer

from cachefs.records.credentials import Role
from cachefs.records.model import NODE_STATUS_TYPE

REPO = Path(__file__).resolve().parents[2]
TYPE = "0f6c5a52-8d1e-4c5e-9a43-2b7f1c9d0e11"
DEADLINE = 30.0


def env_of(groups_dir: Path) -> dict[str, str]:
    return {**os.environ, "CACHEFS_GROUPS_DIR": str(groups_dir)}


def cli(groups_dir: Path, *args: object, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``cachefs ARGS`` as the member whose groups directory is *groups_dir*."""
    return subprocess.run(
        [sys.executable, "-m", "cachefs", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env_of(groups_dir),
        stdin=subprocess.DEVNULL,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stderr == "", done.stderr
    return done.stdout


def failed(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """Exit *code*, and the last line of stderr the one error line, naming *words*."""
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert lines and lines[-1].startswith("cachefs") and "error:" in lines[-1], done.stderr
    assert all(line.startswith("cachefs") for line in lines), done.stderr
    for word in words:
        assert word in lines[-1], lines[-1]
    return lines[-1]


def add(groups_dir: Path, *args: object) -> str:
    return ok(cli(groups_dir, "records", "add", "--type", TYPE, "--expires", "2h", *args)).strip()


@pytest.fixture
def members(tmp_path: Path) -> list[Path]:
    """The groups directories of an administrator and a member of GROUP, no engine."""
    return make_group(tmp_path / "groups", (Role.MEMBER,))


def test_create_identity_invite_join(tmp_path: Path) -> None:
    ann, bob = tmp_path / "ann", tmp_path / "bob"
    created = ok(cli(ann, "group", "create", "farm", "--name", "ann"))
    assert "created group farm" in created
    shown = json.loads(ok(cli(bob, "group", "identity", "--json", "--name", "bob")))
    assert shown["member_id"].startswith("m") and shown["name"] == "bob"
    assert stat_mode(bob / "identity.key") == 0o600
    # the key is created once: the same identity afterwards
    assert (
        json.loads(ok(cli(bob, "group", "identity", "--json")))["public_key"]
        == (shown["public_key"])
    )

    invitation = tmp_path / "bob.invitation"
    ok(
        cli(
            ann,
            "group",
            "invite",
            "farm",
            shown["public_key"],
            "--member-name",
            "bob",
            "--expires",
            "30d",
            "-o",
            invitation,
        )
    )
    joined = ok(cli(bob, "group", "join", invitation))
    assert "joined group farm" in joined and shown["member_id"] in joined

    listed = json.loads(ok(cli(bob, "group", "list", "--json")))
    assert (listed["group"], listed["role"]) == ("farm", "member")
    status = json.loads(ok(cli(ann, "group", "status", "--json")))
    assert status["member"]["role"] == "admin" and status["engine"] is None
    assert {m["id"] for m in status["members"]} == {status["member"]["id"], shown["member_id"]}

    # an invitation is for one key only
    carl = tmp_path / "carl"
    ok(cli(carl, "group", "identity"))
    failed(cli(carl, "group", "join", invitation), 2, "GROUP_ERROR", "this invitation is for")


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_add_get_update_list_search_delete(members: list[Path], tmp_path: Path) -> None:
    admin, _ = members
    data = tmp_path / "data.bin"
    data.write_bytes(b"\x00payload\xff")
    rid = add(admin, "--attr", "size:int=5", "--attr", "owner=Ann", "--data-file", data)
    other = add(admin, "--attr", "size:int=50", "--attr", "owner=bob")
    assert uuid.UUID(rid)

    record = json.loads(ok(cli(admin, "records", "get", rid, "--json")))
    assert record["id"] == rid and record["type"] == TYPE and record["version"] == 1
    assert base64.b64decode(record["data"]) == b"\x00payload\xff"
    assert record["attributes"] == [
        {"name": "size", "type": "int", "value": 5},
        {"name": "owner", "type": "string", "value": "Ann"},
    ]
    assert 'name="owner" type="string">Ann<' in record["attributes_xml"]
    assert record["expires"].endswith("Z") and record["creator"] == record["modified_by"]
    assert record["signature"]
    line = ok(cli(admin, "records", "get", rid))
    assert rid in line and "size=5" in line and len(line.splitlines()) == 1

    # --attr replaces the whole set; what is not given stays
    assert ok(cli(admin, "records", "update", rid, "--attr", "size:int=7")).split() == [
        rid,
        "version",
        "2",
    ]
    record = json.loads(ok(cli(admin, "records", "get", rid, "--json")))
    assert record["attributes"] == [{"name": "size", "type": "int", "value": 7}]
    assert base64.b64decode(record["data"]) == b"\x00payload\xff"

    listed = ok(cli(admin, "records", "list", "--type", TYPE)).splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted([rid, other])

    def found(*query: str) -> list[str]:
        out = ok(cli(admin, "records", "search", *query, "--json"))
        return [json.loads(line)["id"] for line in out.splitlines()]

    assert found("--where", "size>6 and size<10") == [rid]
    assert found("--where", "owner=B*") == [other]
    xml = (
        '<peersearch><clause attrib="size" type="int" compare="greaterorequal">7'
        "</clause></peersearch>"
    )
    assert sorted(found("--xml", xml)) == sorted([rid, other])
    assert found("--where", "owner!=bob") == []  # rid has no owner any more: no match

    assert ok(cli(admin, "records", "delete", rid)).strip() == f"deleted {rid}"
    failed(cli(admin, "records", "get", rid), 10, "RECORD_NOT_FOUND", rid)


def test_export_on_one_member_import_on_another(members: list[Path], tmp_path: Path) -> None:
    admin, member = members
    kept = [add(admin, "--attr", f"n:int={i}") for i in range(3)]
    snap = tmp_path / "snap.jsonl"
    out = ok(cli(admin, "records", "export", snap))
    assert "exported 3 records" in out

    out = ok(cli(member, "records", "import", snap))
    assert out.startswith("imported 3 records, 0 already held (stale), 0 rejected")
    listed = ok(cli(member, "records", "list")).splitlines()
    assert sorted(line.split()[0] for line in listed) == sorted(kept)
    assert "imported 0 records, 3 already held" in ok(cli(member, "records", "import", snap))


def test_an_edited_snapshot_is_refused_record_by_record(
    members: list[Path], tmp_path: Path
) -> None:
    admin, member = members
    data = tmp_path / "data"
    data.write_bytes(b"some data")
    for i in range(3):
        add(admin, "--attr", f"n:int={i}", "--data-file", data)
    snap = tmp_path / "snap.jsonl"
    ok(cli(admin, "records", "export", snap))
    lines = snap.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if '"kind":"rec"' in line)
    item = json.loads(lines[first])
    body = bytearray(base64.b64decode(item["body"]))
    body[-1] ^= 1
    item["body"] = base64.b64encode(bytes(body)).decode()
    lines[first] = json.dumps(item)
    snap.write_text("\n".join(lines) + "\n")

    done = cli(member, "records", "import", snap)
    error = failed(done, 14, "INVALID_RECORD", "1 lines", "rejected")
    assert "imported 2 records, 0 already held (stale), 1 rejected" in done.stdout
    assert "bad signature" in done.stderr and error
    assert len(ok(cli(member, "records", "list")).splitlines()) == 2


def test_a_snapshot_of_another_group_is_refused(members: list[Path], tmp_path: Path) -> None:
    admin, _ = members
    (stranger,) = make_group(tmp_path / "other", ())
    add(stranger)
    snap = tmp_path / "other.jsonl"
    ok(cli(stranger, "records", "export", snap))
    failed(cli(admin, "records", "import", snap), 2, "GROUP_ERROR", "snapshot of group")
    assert ok(cli(admin, "records", "list")) == ""


def test_each_error_names_itself_with_its_exit_code(members: list[Path], tmp_path: Path) -> None:
    admin, member = members
    theirs = add(admin)
    snap = tmp_path / "snap.jsonl"
    ok(cli(admin, "records", "export", snap))
    ok(cli(member, "records", "import", snap))  # the member holds the record too
    bad_xml = tmp_path / "attrs.xml"
    bad_xml.write_text("<attributes><attribute name='a'>")
    big = tmp_path / "big"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    new = ("records", "add", "--type", TYPE, "--expires")
    cases: list[tuple[Path, tuple[object, ...], int, tuple[str, ...]]] = [
        (admin, ("records", "get", uuid.uuid4()), 10, ("RECORD_NOT_FOUND",)),
        (member, ("records", "update", theirs, "--expires", "3h"), 11, ("NOT_AUTHORIZED",)),
        (member, ("records", "delete", theirs), 11, ("NOT_AUTHORIZED",)),
        (
            admin,
            ("records", "add", "--type", NODE_STATUS_TYPE, "--expires", "1h"),
            11,
            ("NOT_AUTHORIZED", "reserved"),
        ),
        (admin, (*new, "1h", "--attr", "peerrecordid=x"), 12, ("INVALID_ATTRIBUTES",)),
        (admin, (*new, "1h", "--attr", "bad-name=1"), 12, ("INVALID_ATTRIBUTES",)),
        (admin, (*new, "1h", "--attr", "n:int=five"), 12, ("INVALID_ATTRIBUTES",)),
        (admin, (*new, "1h", "--attributes-xml", bad_xml), 12, ("INVALID_ATTRIBUTES",)),
        (admin, ("records", "search", "--where", "size >"), 13, ("INVALID_SEARCH",)),
        (admin, ("records", "search", "--xml", "<peersearch/>"), 13, ("INVALID_SEARCH",)),
        (admin, (*new, "2020-01-01"), 15, ("INVALID_RECORD_EXPIRATION", "future")),
        (
            admin,
            ("records", "update", theirs, "--expires", "1m"),
            15,
            ("INVALID_RECORD_EXPIRATION", "not lower"),
        ),
        (member, (*new, "400d"), 15, ("INVALID_RECORD_EXPIRATION", "credentials")),
        (admin, (*new, "1h", "--data-file", big), 16, ("MAX_RECORD_SIZE_EXCEEDED",)),
        (admin, ("records", "list", "--group", "nope"), 2, ("GROUP_ERROR", "no group nope")),
        # usage errors
        (admin, ("records", "add", "--type", "nope", "--expires", "1h"), 2, ("not a UUID",)),
        (admin, (*new, "soon"), 2, ("--expires",)),
        (admin, (*new, "1h", "--data-file", tmp_path / "absent"), 2, ("cannot read",)),
        (admin, ("records", "update", theirs), 2, ("nothing to change",)),
    ]
    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda case: cli(case[0], *case[1]), cases))
    for (_, args, code, words), result in zip(cases, done, strict=True):
        assert result.returncode == code, (args, result.stderr)
        failed(result, code, *words)

    # revoked: the member learns it (here through a snapshot) and may change nothing
    member_id = json.loads(ok(cli(member, "group", "identity", "--json")))["member_id"]
    assert member_id in ok(cli(admin, "group", "revoke", GROUP, member_id))
    ok(cli(admin, "records", "export", snap))
    ok(cli(member, "records", "import", snap))
    failed(cli(member, "records", "add", "--type", TYPE, "--expires", "1h"), 17, "GROUP_NOT_READY")
    status = json.loads(ok(cli(member, "group", "status", "--json")))
    assert status["member"]["role"] is None  # no valid credentials any more
    (me,) = [m for m in status["members"] if m["id"] == member_id]
    assert me["revoked"] is not None


def test_several_groups_need_group(tmp_path: Path) -> None:
    (admin,) = make_group(tmp_path / "g", ())
    ok(cli(admin, "group", "create", "second"))
    error = failed(cli(admin, "records", "list"), 2, "GROUP_ERROR", "--group")
    assert "second" in error and GROUP in error
    assert ok(cli(admin, "records", "list", "--group", "second")) == ""


# -- with a real engine ------------------------------------------------------------------


@pytest.fixture
def engine_members(tmp_path: Path, redis_server: RedisServer) -> list[Path]:
    return make_group(tmp_path / "groups", (Role.MEMBER,), engine=redis_server.url)


def test_a_record_added_on_one_member_is_read_on_another(engine_members: list[Path]) -> None:
    admin, member = engine_members
    rid = add(admin, "--attr", "size:int=1")
    record = json.loads(ok(cli(member, "records", "get", rid, "--json")))
    assert record["attributes"] == [{"name": "size", "type": "int", "value": 1}]
    # and back: the member's change reaches the administrator
    mine = add(member)
    assert mine in ok(cli(admin, "records", "list"))


def test_an_unreachable_engine_is_one_warning_and_changes_wait(
    engine_members: list[Path], redis_server: RedisServer
) -> None:
    admin, member = engine_members
    ok(cli(member, "records", "list"))  # the member has caught up once
    redis_server.stop()
    done = cli(admin, "records", "add", "--type", TYPE, "--expires", "1h", "--timeout", "1")
    assert done.returncode == 0, done.stderr
    rid = done.stdout.strip()
    warning = done.stderr.splitlines()
    assert len(warning) == 1 and warning[0].startswith("cachefs: warning: the engine of group")
    assert "unreachable" in warning[0] and "published when it is back" in warning[0]
    status = json.loads(cli(admin, "group", "status", "--json", "--timeout", "1").stdout)
    assert status["reachable"] is False and status["outbox"] >= 1

    redis_server.start()  # empty: the engine lost everything; the next command republishes
    ok(cli(admin, "records", "list"))
    assert json.loads(ok(cli(member, "records", "get", rid, "--json")))["id"] == rid


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_watch_prints_json_lines_until_interrupted(
    engine_members: list[Path], signum: signal.Signals
) -> None:
    admin, member = engine_members
    watcher = subprocess.Popen(
        [sys.executable, "-m", "cachefs", "records", "watch", "--type", TYPE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=env_of(member),
    )
    try:
        rid = add(admin)  # printed whether the watcher sees it live or catching up
        assert watcher.stdout is not None
        ready, _, _ = select.select([watcher.stdout], [], [], DEADLINE)
        assert ready, "no event within the deadline"
        event = json.loads(watcher.stdout.readline())
        assert event == {"change": "ADDED", "code": 1, "id": rid, "type": TYPE, "version": 1}
        watcher.send_signal(signum)
        out, err = watcher.communicate(timeout=DEADLINE)
        assert watcher.returncode == 128 + signum
        assert err == b""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()


def test_help_answers_the_questions() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cachefs", "records", "update", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=DEADLINE,
    )
    assert done.returncode == 0
    assert "REPLACE the whole set" in " ".join(done.stdout.split())
