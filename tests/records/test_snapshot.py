"""Export and import of a member's records: a snapshot taken on one member merges
into another member of the group; whatever was edited by hand is refused line by
line and counted, the rest imported; a snapshot of another group, or a file that
is not a snapshot, is refused whole with one line naming why."""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from groupsrig import GROUP, make_group

from cachefs.records import GroupError, Record, RecordNotFound, open_group
from cachefs.records.model import decode_record
from cachefs.records.snapshot import FORMAT, export_snapshot, import_snapshot

TYPE = uuid.UUID("0f6c5a52-8d1e-4c5e-9a43-2b7f1c9d0e11")


def soon() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


async def fill(groups_dir: Path, count: int) -> list[uuid.UUID]:
    """*count* records added by this member, the last one deleted (a tombstone)."""
    async with open_group(GROUP, groups_dir=groups_dir) as group:
        ids = [
            await group.records.add(
                Record(
                    type=TYPE,
                    expires=soon(),
                    attributes=f'<attributes><attribute name="n" type="int">{i}</attribute>'
                    "</attributes>",
                    data=f"data {i}".encode(),
                )
            )
            for i in range(count)
        ]
        await group.records.delete(ids[-1])
    return ids


async def export(groups_dir: Path, path: Path) -> None:
    async with open_group(GROUP, groups_dir=groups_dir) as group:
        await export_snapshot(group, path)


async def test_a_snapshot_merges_into_another_member(tmp_path: Path) -> None:
    admin, member = make_group(tmp_path)
    ids = await fill(admin, 4)
    snap = tmp_path / "snap.jsonl"
    async with open_group(GROUP, groups_dir=admin) as group:
        counts = await export_snapshot(group, snap)
        originals = [await group.records.get(rid) for rid in ids[:-1]]
    assert (counts.records, counts.tombstones) == (3, 1)
    assert counts.credentials >= 1  # at least the creator's own

    async with open_group(GROUP, groups_dir=member) as group:
        report = await import_snapshot(group, snap)
        assert (report.imported, report.stale, report.rejected) == (4, 0, 0)
        for original in originals:
            assert original.id is not None
            assert await group.records.get(original.id) == original  # signature included
        with pytest.raises(RecordNotFound):
            await group.records.get(ids[-1])  # the deletion came along
        again = await import_snapshot(group, snap)
        assert (again.imported, again.stale, again.rejected) == (0, 4, 0)


async def test_the_snapshot_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    admin, _ = make_group(tmp_path)
    await fill(admin, 2)
    snap = tmp_path / "out" / "snap.jsonl"
    snap.parent.mkdir()
    snap.write_text("old contents\n")
    await export(admin, snap)
    assert stat.S_IMODE(snap.stat().st_mode) == 0o600
    assert os.listdir(snap.parent) == ["snap.jsonl"]  # no temporary file left
    lines = snap.read_text().splitlines()
    header = json.loads(lines[0])
    assert header[FORMAT] == 1 and header["group"] == GROUP
    assert json.loads(lines[-1]) == {"kind": "end", "items": len(lines) - 2}


async def test_an_edited_snapshot_is_refused_line_by_line(tmp_path: Path) -> None:
    admin, member = make_group(tmp_path)
    await fill(admin, 5)
    snap = tmp_path / "snap.jsonl"
    await export(admin, snap)
    lines = snap.read_text().splitlines()
    records = [i for i, line in enumerate(lines) if json.loads(line).get("kind") == "rec"]
    # ids are random, so the tombstone may be anywhere: edit two live records
    live = [
        i
        for i in records
        if not decode_record(base64.b64decode(json.loads(lines[i])["body"]))[1].deleted
    ]
    # one record's data changed (its signature no longer matches), one line garbled
    item = json.loads(lines[live[0]])
    body = bytearray(base64.b64decode(item["body"]))
    body[-1] ^= 0x01  # the last byte of the data
    item["body"] = base64.b64encode(bytes(body)).decode()
    lines[live[0]] = json.dumps(item)
    lines[live[1]] = lines[live[1]][: len(lines[live[1]]) // 2]
    snap.write_text("\n".join(lines) + "\n")

    async with open_group(GROUP, groups_dir=member) as group:
        report = await import_snapshot(group, snap)
        assert report.rejected == 2
        assert report.imported == len(records) - 2
        assert report.reasons == {"INVALID_RECORD": 1, "not JSON": 1}
        assert any("bad signature" in example for example in report.examples)
        held = [r async for r in group.records.enum()]
        assert len(held) == report.imported - 1  # one of them is the tombstone


async def test_a_snapshot_cut_short_says_so(tmp_path: Path) -> None:
    admin, member = make_group(tmp_path)
    await fill(admin, 3)
    snap = tmp_path / "snap.jsonl"
    await export(admin, snap)
    lines = snap.read_text().splitlines()
    snap.write_text("\n".join(lines[:-2]) + "\n")  # the end line and the last record gone
    async with open_group(GROUP, groups_dir=member) as group:
        report = await import_snapshot(group, snap)
    assert report.imported == 2 and report.rejected == 1
    assert list(report.reasons) == ["cut short: no end line"]


async def test_an_overlong_line_is_rejected_unread(tmp_path: Path) -> None:
    admin, member = make_group(tmp_path)
    await fill(admin, 2)
    snap = tmp_path / "snap.jsonl"
    await export(admin, snap)
    lines = snap.read_text().splitlines()
    huge = json.dumps({"kind": "rec", "body": "A" * (5 << 20), "sig": ""})
    lines.insert(-1, huge)
    lines[-1] = json.dumps({"kind": "end", "items": len(lines) - 2})
    snap.write_text("\n".join(lines) + "\n")
    async with open_group(GROUP, groups_dir=member) as group:
        report = await import_snapshot(group, snap)
    assert report.imported == 2
    assert report.reasons == {"a line over the length limit": 1}


async def test_a_snapshot_of_another_group_is_refused(tmp_path: Path) -> None:
    ours, _ = make_group(tmp_path / "ours")
    theirs, _ = make_group(tmp_path / "theirs")  # same name, another charter
    await fill(theirs, 2)
    snap = tmp_path / "theirs.jsonl"
    await export(theirs, snap)
    async with open_group(GROUP, groups_dir=ours) as group:
        with pytest.raises(GroupError) as refused:
            await import_snapshot(group, snap)
        assert group.group_id in str(refused.value)
        assert [r async for r in group.records.enum()] == []
    header = json.loads(snap.read_text().splitlines()[0])
    assert header["group_id"] in str(refused.value)
    assert "\n" not in str(refused.value)


async def test_a_forged_charter_under_our_group_id_is_refused(tmp_path: Path) -> None:
    ours, _ = make_group(tmp_path / "ours")
    theirs, _ = make_group(tmp_path / "theirs")
    snap = tmp_path / "theirs.jsonl"
    await export(theirs, snap)
    async with open_group(GROUP, groups_dir=ours) as group:
        lines = snap.read_text().splitlines()
        header = json.loads(lines[0])
        header["group_id"] = group.group_id
        snap.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
        with pytest.raises(GroupError, match="another charter"):
            await import_snapshot(group, snap)


@pytest.mark.parametrize(
    "contents", [b"", b"hello\n", b'{"kind": "rec"}\n', b"\xff\xfe\n", b"[" * 100_000]
)
async def test_a_file_that_is_not_a_snapshot_is_refused(tmp_path: Path, contents: bytes) -> None:
    admin, _ = make_group(tmp_path)
    path = tmp_path / "notes.txt"
    path.write_bytes(contents)
    async with open_group(GROUP, groups_dir=admin) as group:
        with pytest.raises(GroupError, match="not a cachefs records snapshot"):
            await import_snapshot(group, path)
        with pytest.raises(GroupError, match="cannot read"):
            await import_snapshot(group, tmp_path / "missing.jsonl")
