"""The groups directory: creating, inviting, joining, loading and listing,
with one groups directory per member as on separate machines; and every
file and invitation treated as something a hostile user may have written."""

from __future__ import annotations

import base64
import json
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cachefs.records.credentials import Charter, Credential, Role
from cachefs.records.errors import GroupError, GroupNotReady, NotAuthorized, RecordsError
from cachefs.records.groups import (
    Membership,
    create_group,
    default_groups_dir,
    group_name_ok,
    invite,
    join,
    list_memberships,
    load_membership,
    parse_engine_url,
)
from cachefs.records.identity import Identity

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
ENGINE = "redis://127.0.0.1:6379/0"


def me(groups_dir: Path, name: str) -> Identity:
    return Identity.load_or_create(groups_dir / "identity.key", name)


@pytest.fixture
def creator_dir(tmp_path: Path) -> Path:
    return tmp_path / "creator"


@pytest.fixture
def team(creator_dir: Path) -> Membership:
    return create_group(
        creator_dir,
        "team",
        me(creator_dir, "ann"),
        engine=ENGINE,
        max_record_size=4096,
        now=T0,
    )


def invitation_for(
    team: Membership, creator_dir: Path, member: Identity, role: Role = Role.MEMBER, **kw: object
) -> bytes:
    args: dict[str, object] = {"role": role, "name": member.name, "expires": T0 + 30 * DAY}
    args.update(kw)
    return invite(team, me(creator_dir, "ann"), member.public_key, now=T0 + DAY, **args)  # type: ignore[arg-type]


def test_create_invite_join_load_and_list(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    joined = join(bob_dir, invitation_for(team, creator_dir, bob), bob, engine=None, now=T0 + DAY)
    assert joined.name == "team" and joined.charter == team.charter
    assert joined.credential.member_id == bob.member_id and joined.credential.role is Role.MEMBER
    assert [c.member_id for c in joined.chain] == [bob.member_id, team.credential.member_id]
    assert joined.engine is None and joined.stream_maxlen > 0
    assert joined.database == bob_dir / "groups" / "team" / "records.db"
    assert joined.trust().credential(bob.member_id, T0 + 2 * DAY) == joined.credential

    for d, membership in ((creator_dir, team), (bob_dir, joined)):
        loaded = load_membership(d, "team")
        assert loaded == membership
        assert list_memberships(d) == [membership]
        path = d / "groups" / "team"
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        for f in ("charter", "chain", "config.json"):
            assert stat.S_IMODE((path / f).stat().st_mode) == 0o600
        assert not [p for p in path.iterdir() if p.name.startswith(".")]
    assert team.engine == ENGINE and team.charter.max_record_size == 4096
    assert ENGINE not in repr(team)  # it may hold a password


def test_an_admin_invited_by_the_creator_invites_in_turn(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir, cid_dir = tmp_path / "bob", tmp_path / "cid"
    bob, cid = me(bob_dir, "bob"), me(cid_dir, "cid")
    invitation = invitation_for(team, creator_dir, bob, Role.ADMIN)
    bobs = join(bob_dir, invitation, bob, engine=None, now=T0 + DAY)
    invitation = invite(
        bobs, bob, cid.public_key, role=Role.MEMBER, name="cid", expires=T0 + 9 * DAY,
        now=T0 + 2 * DAY,
    )  # fmt: skip
    cids = join(cid_dir, invitation, cid, engine=ENGINE, name="ours", now=T0 + 3 * DAY)
    assert cids.name == "ours" and cids.engine == ENGINE
    assert [c.member_id for c in cids.chain] == [
        cid.member_id,
        bob.member_id,
        team.credential.member_id,
    ]
    assert load_membership(cid_dir, "ours") == cids


def test_a_plain_member_cannot_invite(tmp_path: Path, creator_dir: Path, team: Membership) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    bobs = join(bob_dir, invitation_for(team, creator_dir, bob), bob, engine=None, now=T0 + DAY)
    with pytest.raises(NotAuthorized, match="only an administrator invites"):
        invite(
            bobs, bob, Identity.generate().public_key, role=Role.MEMBER, name="",
            expires=T0 + 9 * DAY, now=T0 + 2 * DAY,
        )  # fmt: skip


def test_an_invitation_cannot_outlive_its_issuer(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    invitation = invitation_for(team, creator_dir, bob, Role.ADMIN, expires=T0 + 5 * DAY)
    bobs = join(bob_dir, invitation, bob, engine=None, now=T0 + DAY)
    with pytest.raises(NotAuthorized, match="cannot outlive"):
        invite(
            bobs, bob, Identity.generate().public_key, role=Role.MEMBER, name="",
            expires=T0 + 6 * DAY, now=T0 + 2 * DAY,
        )  # fmt: skip
    with pytest.raises(NotAuthorized, match="not an administrator"):
        invite(
            bobs, bob, Identity.generate().public_key, role=Role.MEMBER, name="",
            expires=T0 + 9 * DAY, now=T0 + 6 * DAY,
        )  # fmt: skip


def test_an_invitation_for_another_identity_is_refused(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob = Identity.generate("bob")
    eve_dir = tmp_path / "eve"
    eve = me(eve_dir, "eve")
    with pytest.raises(GroupError) as info:
        join(eve_dir, invitation_for(team, creator_dir, bob), eve, engine=None)
    assert f"for member {bob.member_id}, you are {eve.member_id}" in str(info.value)
    assert list_memberships(eve_dir) == []


def test_every_flipped_bit_of_an_invitation_is_refused(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    invitation = invitation_for(team, creator_dir, bob)
    for i in range(len(invitation)):
        tampered = invitation[:i] + bytes([invitation[i] ^ 0x01]) + invitation[i + 1 :]
        with pytest.raises(RecordsError):
            join(bob_dir, tampered, bob, engine=None, now=T0 + DAY)
    assert list_memberships(bob_dir) == []


def test_a_forged_promotion_in_an_invitation_is_refused(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    invitation = json.loads(invitation_for(team, creator_dir, bob))
    cred = json.loads(base64.b64decode(invitation["chain"][0]))
    cred["role"] = "admin"
    blob = json.dumps(cred, sort_keys=True, separators=(",", ":")).encode()
    invitation["chain"][0] = base64.b64encode(blob).decode()
    with pytest.raises(NotAuthorized, match="signature"):
        join(bob_dir, json.dumps(invitation).encode(), bob, engine=None)
    invitation["chain"] = invitation["chain"][:1]  # without the issuer's credential
    with pytest.raises(NotAuthorized):
        join(bob_dir, json.dumps(invitation).encode(), bob, engine=None)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"[]", b'{"cachefs-invitation": 2}', b"\xff\xfe", b"[" * 100_000],
)
def test_a_file_that_is_no_invitation_is_refused(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(GroupError, match="invitation"):
        join(tmp_path, data, Identity.generate(), engine=None)


def test_an_expired_invitation_is_not_ready(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    invitation = invitation_for(team, creator_dir, bob, expires=T0 + 2 * DAY)
    with pytest.raises(GroupNotReady, match="expired"):
        join(bob_dir, invitation, bob, engine=None, now=T0 + 3 * DAY)
    assert list_memberships(bob_dir) == []


def test_joining_again_renews_and_another_charter_under_the_name_is_refused(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    join(bob_dir, invitation_for(team, creator_dir, bob), bob, engine=ENGINE, now=T0 + DAY)
    renewal = invitation_for(team, creator_dir, bob, Role.ADMIN, expires=T0 + 60 * DAY)
    renewed = join(bob_dir, renewal, bob, engine=None, now=T0 + DAY)
    assert renewed.credential.role is Role.ADMIN and renewed.engine == ENGINE
    assert load_membership(bob_dir, "team") == renewed

    other_dir = tmp_path / "other"
    other = create_group(
        other_dir, "team", me(other_dir, "zed"), engine=None, max_record_size=1 << 20, now=T0
    )
    foreign = invite(
        other, me(other_dir, "zed"), bob.public_key, role=Role.MEMBER, name="bob",
        expires=T0 + 9 * DAY, now=T0,
    )  # fmt: skip
    with pytest.raises(GroupError, match="another charter"):
        join(bob_dir, foreign, bob, engine=None, now=T0 + DAY)
    again = join(bob_dir, foreign, bob, engine=None, name="team2", now=T0 + DAY)
    assert again.charter == other.charter


def test_a_group_is_created_once(creator_dir: Path, team: Membership) -> None:
    with pytest.raises(GroupError, match="already exists"):
        create_group(
            creator_dir, "team", me(creator_dir, "ann"), engine=None, max_record_size=1, now=T0
        )


@pytest.mark.parametrize("name", ["a/b", "../x", "", ".hidden", "-x", "a" * 65, "a b", "é"])
def test_a_bad_group_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(GroupError, match="bad group name"):
        create_group(tmp_path, name, Identity.generate(), engine=None, max_record_size=1, now=T0)
    with pytest.raises(GroupError, match="bad group name"):
        load_membership(tmp_path, name)
    assert not (tmp_path / "x").exists()


def test_good_group_names() -> None:
    for name in ("team", "a", "T-1_x.y", "a" * 64):
        assert group_name_ok(name) == name


def test_a_missing_group_is_named(tmp_path: Path) -> None:
    with pytest.raises(GroupError, match=f"no group team in {tmp_path}"):
        load_membership(tmp_path, "team")
    assert list_memberships(tmp_path) == []


def test_a_tampered_group_directory_is_refused(creator_dir: Path, team: Membership) -> None:
    path = creator_dir / "groups" / "team"
    charter = json.loads((path / "charter").read_bytes())
    charter["max_record_size"] = 1 << 30
    (path / "charter").write_bytes(
        json.dumps(charter, sort_keys=True, separators=(",", ":")).encode()
    )
    with pytest.raises(NotAuthorized, match="charter"):
        load_membership(creator_dir, "team")
    assert list_memberships(creator_dir) == []  # left out, with a warning


@pytest.mark.parametrize(
    "config",
    [
        "{}",
        '{"engine": "http://x", "stream_maxlen": 5}',
        '{"engine": null, "stream_maxlen": 0}',
        '{"engine": null, "stream_maxlen": 5, "more": 1}',
        "not json",
        "[" * 5000,
    ],
)
def test_a_bad_config_is_refused(creator_dir: Path, team: Membership, config: str) -> None:
    (creator_dir / "groups" / "team" / "config.json").write_text(config)
    with pytest.raises(GroupError, match="team"):
        load_membership(creator_dir, "team")


def test_a_group_file_that_is_a_symlink_is_refused(creator_dir: Path, team: Membership) -> None:
    chain = creator_dir / "groups" / "team" / "chain"
    chain.rename(chain.with_name("real"))
    chain.symlink_to(chain.with_name("real"))
    with pytest.raises(GroupError, match="symbolic link"):
        load_membership(creator_dir, "team")


def test_the_member_key_must_be_private(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    me(tmp_path, "ann")
    os.chmod(key, 0o644)
    with pytest.raises(GroupError, match=f"{key} can be read or written by others"):
        me(tmp_path, "ann")


def test_the_groups_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CACHEFS_GROUPS_DIR", str(tmp_path / "g"))
    assert default_groups_dir() == tmp_path / "g"
    monkeypatch.delenv("CACHEFS_GROUPS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    expected = (
        Path("/var/lib/cachefs/groups")
        if os.geteuid() == 0
        else tmp_path / "data" / "cachefs" / "groups"
    )
    assert default_groups_dir() == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/0",
        "redis://host/15",
        "rediss://user:s3cret@cache.example.com:6380/2",
        "redis://:s3cret@[::1]:6379",
    ],
)
def test_good_engine_urls(url: str) -> None:
    assert parse_engine_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "localhost:6379",
        "http://host",
        "redis://",
        "redis://:s3cret@",
        "redis://host:port",
        "redis://user:s3cret@host:99999",
        "redis://user:s3cret@host:0",
        "redis://user:s3cret@host/db",
        "redis://user:s3cret@host/0/1",
        "redis://user:s3cret@host?ssl=1",
        "redis://user:s3cret@host#x",
        "redis://user:s3cret@ho st",
        "redis://user:s3cret/x@host",
        "user:s3cret@host",
        "unix:///tmp/s3cret.sock",
    ],
)
def test_bad_engine_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(GroupError) as info:
        parse_engine_url(url)
    message = str(info.value)
    assert "s3cret" not in message and "\n" not in message
    assert "redis://" in message


def test_a_bad_engine_url_is_refused_by_create_and_join(
    tmp_path: Path, creator_dir: Path, team: Membership
) -> None:
    with pytest.raises(GroupError, match="engine URL"):
        create_group(
            tmp_path, "other", Identity.generate(), engine="http://x", max_record_size=1, now=T0
        )
    bob_dir = tmp_path / "bob"
    bob = me(bob_dir, "bob")
    with pytest.raises(GroupError, match="engine URL"):
        join(bob_dir, invitation_for(team, creator_dir, bob), bob, engine="redis:/x", now=T0)
    assert list_memberships(tmp_path) == list_memberships(bob_dir) == []


def test_blobs_in_the_group_files_are_canonical(creator_dir: Path, team: Membership) -> None:
    path = creator_dir / "groups" / "team"
    assert Charter.from_bytes((path / "charter").read_bytes()) == team.charter
    chain = json.loads((path / "chain").read_bytes())
    assert [Credential.from_bytes(base64.b64decode(c)) for c in chain] == list(team.chain)
