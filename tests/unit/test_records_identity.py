"""Members, credentials and the checks of Trust, attacked as a hostile member
or a hostile transport would: every tampered blob, every unauthorised issuer
and every forbidden record change is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cachefs.records.credentials import (
    FOREVER,
    Charter,
    Credential,
    Revocation,
    Role,
    create_charter,
    issue_credential,
    revoke,
)
from cachefs.records.errors import GroupError, InvalidRecord, NotAuthorized, RecordsError
from cachefs.records.identity import Identity, decode_key, encode_key, member_id_of, verify
from cachefs.records.model import Record, encode_record, record_id
from cachefs.records.trust import Trust

T0 = datetime(2026, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TYPE = uuid.UUID("11111111-1111-4111-8111-111111111111")


class Group:
    """A creator, an administrator and two members of one group, all known to ``trust``."""

    def __init__(self) -> None:
        self.creator = Identity.generate("creator")
        self.admin = Identity.generate("admin")
        self.ann = Identity.generate("ann")
        self.bob = Identity.generate("bob")
        self.charter, self.root = create_charter(self.creator, "team", now=T0)
        self.trust = Trust(self.charter)
        assert self.trust.add_credential(self.root)
        self.admin_cred = self.issue(self.creator, self.admin, Role.ADMIN, T0 + HOUR)
        self.ann_cred = self.issue(self.admin, self.ann, Role.MEMBER, T0 + 2 * HOUR)
        self.bob_cred = self.issue(self.admin, self.bob, Role.MEMBER, T0 + 2 * HOUR)

    def issue(
        self,
        issuer: Identity,
        member: Identity,
        role: Role,
        now: datetime,
        expires: datetime | None = None,
    ) -> Credential:
        cred = issue_credential(
            issuer,
            self.charter,
            member.public_key,
            role=role,
            name=member.name,
            now=now,
            expires=expires or now + 30 * DAY,
        )
        assert self.trust.add_credential(cred)
        return cred

    def record(
        self,
        signer: Identity,
        *,
        creator: Identity | None = None,
        modified: datetime = T0 + DAY,
        expires: datetime = T0 + 2 * DAY,
        group_id: str | None = None,
        **fields: Any,
    ) -> tuple[bytes, Record]:
        """A record body signed by ``signer`` and the record it encodes."""
        values: dict[str, object] = {
            "type": TYPE,
            "expires": expires,
            "attributes": "",
            "data": b"payload",
            "id": uuid.UUID("22222222-2222-4222-8222-222222222222"),
            "version": 2,
            "creator": (creator or signer).member_id,
            "modified_by": signer.member_id,
            "created": T0 + 3 * HOUR,
            "modified": modified,
        }
        values.update(fields)
        if "id" not in fields:  # as the store derives it
            values["id"] = record_id(
                group_id or self.charter.group_id,
                str(values["creator"]),
                values["type"],  # type: ignore[arg-type]
                values["created"],  # type: ignore[arg-type]
            )
        record = Record(**values)  # type: ignore[arg-type]
        body = encode_record(group_id or self.charter.group_id, record)
        return body, dataclasses.replace(record, signature=signer.sign(body))


@pytest.fixture
def g() -> Group:
    return Group()


def flips(blob: bytes) -> list[bytes]:
    """``blob`` with one bit changed, at every position."""
    return [blob[:i] + bytes([blob[i] ^ 0x01]) + blob[i + 1 :] for i in range(len(blob))]


# ---------------------------------------------------------------- ids and keys


def test_member_ids_and_pasted_keys() -> None:
    me = Identity.generate()
    assert me.member_id == member_id_of(me.public_key)
    assert me.member_id.startswith("m") and len(me.member_id) == 26
    assert me.member_id == me.member_id.lower()
    text = encode_key(me.public_key)
    assert len(text) == 43
    assert decode_key(f"  {text}\n") == me.public_key
    assert me.member_id != Identity.generate().member_id


@pytest.mark.parametrize("text", ["", "abc", "A" * 44, "A" * 42 + "!", "A" * 42 + "B"])
def test_a_bad_pasted_key_is_refused(text: str) -> None:
    with pytest.raises(GroupError):
        decode_key(text)


def test_verify_says_no_to_the_wrong_key_data_or_sizes() -> None:
    me, other = Identity.generate(), Identity.generate()
    sig = me.sign(b"data")
    assert verify(me.public_key, b"data", sig)
    assert not verify(other.public_key, b"data", sig)
    assert not verify(me.public_key, b"datA", sig)
    assert not verify(me.public_key[:31], b"data", sig)
    assert not verify(me.public_key, b"data", sig[:63])


# ---------------------------------------------------------------- blobs


def test_blobs_round_trip_exactly_and_still_verify(g: Group) -> None:
    rev = revoke(g.admin, g.charter, g.bob.member_id, now=T0 + DAY)
    for item in (g.charter, g.root, g.ann_cred, rev):
        blob = item.to_bytes()
        again = type(item).from_bytes(blob)
        assert again == item and again.to_bytes() == blob
    trust = Trust(Charter.from_bytes(g.charter.to_bytes()))
    for cred in (g.root, g.admin_cred, g.ann_cred):
        assert trust.add_credential(Credential.from_bytes(cred.to_bytes()))
    assert trust.add_revocation(Revocation.from_bytes(rev.to_bytes()))
    assert not trust.add_credential(Credential.from_bytes(g.ann_cred.to_bytes()))
    assert not trust.add_revocation(Revocation.from_bytes(rev.to_bytes()))


def test_the_creator_credential_lasts_and_is_an_administrator(g: Group) -> None:
    assert g.root.role is Role.ADMIN and g.root.expires == FOREVER
    assert g.root.issuer_id == g.root.member_id == g.creator.member_id
    assert g.charter.group_id.startswith("g") and len(g.charter.group_id) == 26


def test_every_flipped_bit_of_a_credential_is_refused(g: Group) -> None:
    for blob in flips(g.ann_cred.to_bytes()):
        trust = Trust(g.charter)
        trust.add_credential(g.root)
        trust.add_credential(g.admin_cred)
        with pytest.raises((GroupError, NotAuthorized)):
            trust.add_credential(Credential.from_bytes(blob))


def test_every_flipped_bit_of_a_charter_is_refused(g: Group) -> None:
    for blob in flips(g.charter.to_bytes()):
        with pytest.raises((GroupError, NotAuthorized)):
            Trust(Charter.from_bytes(blob))


def test_every_flipped_bit_of_a_revocation_is_refused(g: Group) -> None:
    rev = revoke(g.admin, g.charter, g.bob.member_id, now=T0 + DAY)
    for blob in flips(rev.to_bytes()):
        with pytest.raises((GroupError, NotAuthorized)):
            g.trust.add_revocation(Revocation.from_bytes(blob))
    assert g.trust.credential(g.bob.member_id, T0 + 2 * DAY) is not None


def _edited(blob: bytes, **changes: object) -> bytes:
    fields = json.loads(blob)
    fields.update(changes)
    for name in [k for k, v in changes.items() if v is None]:
        del fields[name]
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "changes",
    [
        {"extra": 1},
        {"name": None},
        {"role": "root"},
        {"role": 1},
        {"public_key": "AAAA"},
        {"signature": "AAAA"},
        {"issued": "2026-01-01T00:00:00Z"},
        {"issued": "2026-01-01T00:00:00.000000+00:00"},
        {"member_id": "m" + "a" * 25},
        {"group_id": "not-a-group"},
        {"kind": "cachefs-revocation/1"},
        {"name": "x" * 65},
        {"name": "line\nbreak"},
    ],
)
def test_a_malformed_credential_is_refused_by_from_bytes(
    g: Group, changes: dict[str, object]
) -> None:
    with pytest.raises(GroupError, match="malformed credential"):
        Credential.from_bytes(_edited(g.ann_cred.to_bytes(), **changes))


def test_only_the_canonical_spelling_is_accepted(g: Group) -> None:
    blob = g.ann_cred.to_bytes()
    spaced = json.dumps(json.loads(blob), sort_keys=True).encode()
    with pytest.raises(GroupError, match="canonical"):
        Credential.from_bytes(spaced)
    with pytest.raises(GroupError):
        Credential.from_bytes(blob[:-1] + b',"name":"x"}')  # a duplicate key
    with pytest.raises(GroupError):
        Credential.from_bytes(b"\xff" + blob)
    with pytest.raises(GroupError):
        Credential.from_bytes(b" " * 5000)
    with pytest.raises(GroupError):
        Credential.from_bytes(b"[" * 4000)


@pytest.mark.parametrize("size", [0, -1, True, 1.5, 1 << 40])
def test_a_charter_with_a_silly_record_size_is_refused(g: Group, size: object) -> None:
    with pytest.raises(GroupError, match="malformed charter"):
        Charter.from_bytes(_edited(g.charter.to_bytes(), max_record_size=size))


def test_a_charter_cannot_take_another_groups_id(g: Group) -> None:
    other, _ = create_charter(g.creator, "other", now=T0)
    forged = dataclasses.replace(other, group_id=g.charter.group_id)
    forged = dataclasses.replace(forged, signature=g.creator.sign(forged.signed_bytes()))
    with pytest.raises(NotAuthorized, match="charter"):
        Trust(forged)


def test_a_charter_signed_by_someone_else_is_refused(g: Group) -> None:
    forged = dataclasses.replace(g.charter, signature=g.admin.sign(g.charter.signed_bytes()))
    with pytest.raises(NotAuthorized):
        Trust(forged)


# ---------------------------------------------------------------- who may issue


def test_a_credential_from_a_plain_member_is_refused(g: Group) -> None:
    mallory = Identity.generate()
    with pytest.raises(NotAuthorized, match="not an administrator"):
        g.issue(g.ann, mallory, Role.ADMIN, T0 + DAY)
    assert g.trust.credential(mallory.member_id, T0 + 2 * DAY) is None


def test_a_member_cannot_promote_itself(g: Group) -> None:
    with pytest.raises(NotAuthorized, match="not an administrator"):
        g.issue(g.ann, g.ann, Role.ADMIN, T0 + DAY)
    assert g.trust.credential(g.ann.member_id, T0 + 2 * DAY).role is Role.MEMBER  # type: ignore[union-attr]


def test_a_credential_from_an_unknown_issuer_is_refused(g: Group) -> None:
    stranger = Identity.generate()
    with pytest.raises(NotAuthorized, match="unknown"):
        g.issue(stranger, Identity.generate(), Role.MEMBER, T0 + DAY)


def test_an_issuer_whose_credential_had_expired_cannot_issue(g: Group) -> None:
    short = Identity.generate()
    g.issue(g.creator, short, Role.ADMIN, T0 + HOUR, expires=T0 + 5 * HOUR)
    g.issue(short, Identity.generate(), Role.MEMBER, T0 + 4 * HOUR)  # still valid: fine
    with pytest.raises(NotAuthorized, match="expired"):
        g.issue(short, Identity.generate(), Role.MEMBER, T0 + 6 * HOUR)


def test_an_issuer_revoked_before_the_issue_cannot_issue(g: Group) -> None:
    assert g.trust.add_revocation(revoke(g.creator, g.charter, g.admin.member_id, now=T0 + DAY))
    early = g.issue(g.admin, Identity.generate(), Role.MEMBER, T0 + 5 * HOUR)
    with pytest.raises(NotAuthorized, match="revoked"):
        g.issue(g.admin, Identity.generate(), Role.MEMBER, T0 + 2 * DAY)
    assert g.trust.credential(early.member_id, T0 + 2 * DAY) == early


def test_a_revocation_learnt_late_still_voids_what_the_revoked_issued_after_it(g: Group) -> None:
    late = g.issue(g.admin, Identity.generate(), Role.MEMBER, T0 + 2 * DAY)
    assert g.trust.credential(late.member_id, T0 + 3 * DAY) == late
    g.trust.add_revocation(revoke(g.creator, g.charter, g.admin.member_id, now=T0 + DAY))
    assert g.trust.credential(late.member_id, T0 + 3 * DAY) is None
    # the same facts learnt in the other order give the same verdict
    trust = Trust(g.charter)
    trust.add_credential(g.root)
    trust.add_credential(g.admin_cred)
    trust.add_revocation(revoke(g.creator, g.charter, g.admin.member_id, now=T0 + DAY))
    with pytest.raises(NotAuthorized):
        trust.add_credential(late)


def test_nobody_issues_the_creator_a_credential_but_the_creator(g: Group) -> None:
    with pytest.raises(NotAuthorized, match="only the creator"):
        g.issue(g.admin, g.creator, Role.MEMBER, T0 + DAY)
    assert g.trust.credential(g.creator.member_id, T0 + 2 * DAY) == g.root


def test_a_credential_for_another_group_is_refused(g: Group) -> None:
    other, other_root = create_charter(g.creator, "other", now=T0)
    cred = issue_credential(
        g.creator, other, g.ann.public_key, role=Role.ADMIN, name="", now=T0 + DAY,
        expires=T0 + 9 * DAY,
    )  # fmt: skip
    for item in (other_root, cred):
        with pytest.raises(NotAuthorized, match="for group"):
            g.trust.add_credential(item)
    assert g.trust.credential(g.ann.member_id, T0 + 2 * DAY) == g.ann_cred


def test_a_credential_under_another_members_key_is_refused(g: Group) -> None:
    cred = issue_credential(
        g.admin, g.charter, g.ann.public_key, role=Role.ADMIN, name="", now=T0 + DAY,
        expires=T0 + 9 * DAY,
    )  # fmt: skip
    forged = dataclasses.replace(cred, member_id=g.bob.member_id)
    forged = dataclasses.replace(forged, signature=g.admin.sign(forged.signed_bytes()))
    with pytest.raises(NotAuthorized, match="key"):
        g.trust.add_credential(forged)


# ---------------------------------------------------------------- revocations


def test_a_member_cannot_revoke(g: Group) -> None:
    with pytest.raises(NotAuthorized, match="not an administrator"):
        g.trust.add_revocation(revoke(g.ann, g.charter, g.bob.member_id, now=T0 + DAY))
    assert g.trust.credential(g.bob.member_id, T0 + 2 * DAY) == g.bob_cred


def test_nobody_revokes_the_creator(g: Group) -> None:
    for issuer in (g.admin, g.creator):
        with pytest.raises(NotAuthorized, match="creator"):
            g.trust.add_revocation(revoke(issuer, g.charter, g.creator.member_id, now=T0 + DAY))
    assert g.trust.credential(g.creator.member_id, T0 + 2 * DAY) == g.root


def test_a_revocation_for_another_group_is_refused(g: Group) -> None:
    other, _ = create_charter(g.creator, "other", now=T0)
    with pytest.raises(NotAuthorized, match="for group"):
        g.trust.add_revocation(revoke(g.creator, other, g.ann.member_id, now=T0 + DAY))


def test_revocation_ends_credentials_from_its_time_on(g: Group) -> None:
    g.trust.add_revocation(revoke(g.admin, g.charter, g.bob.member_id, now=T0 + DAY))
    assert g.trust.credential(g.bob.member_id, T0 + DAY - timedelta(microseconds=1))
    assert g.trust.credential(g.bob.member_id, T0 + DAY) is None
    assert g.trust.credential(g.bob.member_id, T0 + 2 * DAY) is None
    assert [r.member_id for r in g.trust.revocations()] == [g.bob.member_id]


def test_a_credential_is_in_force_from_its_issue_to_its_expiry(g: Group) -> None:
    cred = g.issue(g.admin, Identity.generate(), Role.MEMBER, T0 + DAY, expires=T0 + 2 * DAY)
    assert g.trust.credential(cred.member_id, T0 + DAY - timedelta(microseconds=1)) is None
    assert g.trust.credential(cred.member_id, T0 + DAY) == cred
    assert g.trust.credential(cred.member_id, T0 + 2 * DAY) == cred
    assert g.trust.credential(cred.member_id, T0 + 2 * DAY + timedelta(microseconds=1)) is None


def test_a_reissue_downgrades_latest_issued_wins(g: Group) -> None:
    later = g.issue(g.creator, g.admin, Role.MEMBER, T0 + DAY, expires=T0 + 9 * DAY)
    assert g.trust.credential(g.admin.member_id, T0 + 2 * HOUR) == g.admin_cred
    assert g.trust.credential(g.admin.member_id, T0 + 2 * DAY) == later
    # the old, longer admin credential does not come back when the new one ends
    assert g.trust.credential(g.admin.member_id, T0 + 10 * DAY) is None
    with pytest.raises(NotAuthorized, match="not an administrator"):
        g.issue(g.admin, Identity.generate(), Role.MEMBER, T0 + 2 * DAY)
    body, record = g.record(g.admin, creator=g.ann, modified=T0 + 2 * DAY)
    with pytest.raises(NotAuthorized, match="only records it created"):
        g.trust.check_record(body, record, None)
    assert {c.role for c in g.trust.credentials() if c.member_id == g.admin.member_id} == {
        Role.ADMIN,
        Role.MEMBER,
    }


def test_members_shows_who_is_in_force_revoked_or_expired_and_omits_voided(g: Group) -> None:
    carl, dan = Identity.generate("carl"), Identity.generate("dan")
    short = g.issue(g.admin, carl, Role.MEMBER, T0 + DAY, expires=T0 + 2 * DAY)
    g.trust.add_revocation(revoke(g.admin, g.charter, g.bob.member_id, now=T0 + DAY))
    voided = g.issue(g.admin, dan, Role.MEMBER, T0 + 2 * DAY)
    assert voided in g.trust.credentials()
    # learnt late: the admin was revoked before it issued dan's credential
    g.trust.add_revocation(revoke(g.creator, g.charter, g.admin.member_id, now=T0 + 36 * HOUR))
    members = g.trust.members(T0 + 3 * DAY)
    assert {cred.member_id: (cred, revoked) for cred, revoked in members} == {
        g.creator.member_id: (g.root, False),
        g.admin.member_id: (g.admin_cred, True),
        g.ann.member_id: (g.ann_cred, False),
        g.bob.member_id: (g.bob_cred, True),
        carl.member_id: (short, False),  # expired, not revoked
    }
    assert [cred.issued for cred, _ in members] == sorted(cred.issued for cred, _ in members)
    # before anyone else was issued a credential
    assert g.trust.members(T0 + 90 * timedelta(minutes=1)) == [
        (g.root, False),
        (g.admin_cred, False),
    ]


# ---------------------------------------------------------------- records


def test_an_admin_may_change_a_members_record(g: Group) -> None:
    _, held = g.record(g.ann)
    body, record = g.record(g.admin, creator=g.ann, version=3)
    g.trust.check_record(body, record, held)


def test_a_member_may_change_its_own_record(g: Group) -> None:
    _, held = g.record(g.ann)
    body, record = g.record(g.ann, version=3, data=b"new")
    g.trust.check_record(body, record, held)
    g.trust.check_record(body, record, None)


def test_a_member_changing_an_admins_record_is_not_authorized(g: Group) -> None:
    _, held = g.record(g.admin)
    body, record = g.record(g.ann, creator=g.admin, version=3)
    with pytest.raises(NotAuthorized, match="only records it created"):
        g.trust.check_record(body, record, held)
    with pytest.raises(NotAuthorized):
        g.trust.check_record(body, record, None)


def test_a_member_changing_another_members_record_is_not_authorized(g: Group) -> None:
    _, held = g.record(g.bob)
    body, record = g.record(g.ann, creator=g.bob, version=3)
    with pytest.raises(NotAuthorized):
        g.trust.check_record(body, record, held)


@pytest.mark.parametrize("field", ["type", "created", "creator", "id"])
def test_fields_that_never_change_are_checked_against_the_held_version(
    g: Group, field: str
) -> None:
    _, held = g.record(g.ann)
    changed: dict[str, Any] = {
        "type": uuid.UUID("33333333-3333-4333-8333-333333333333"),
        "created": T0 + 4 * HOUR,
        "id": uuid.UUID("44444444-4444-4444-8444-444444444444"),
    }
    for signer in (g.ann, g.admin):
        if field == "creator":
            body, record = g.record(signer, creator=g.bob, version=3)
        else:
            body, record = g.record(signer, creator=g.ann, version=3, **{field: changed[field]})
        # the id is derived from type, creation time and creator: a change of any of
        # them is another id (or, kept, an id that is not theirs)
        with pytest.raises(InvalidRecord, match="its id differs|its id is not one"):
            g.trust.check_record(body, record, held)


def test_a_member_cannot_take_over_its_own_record_for_someone_else(g: Group) -> None:
    _, held = g.record(g.ann)
    body, record = g.record(g.ann, creator=g.bob, version=3)
    with pytest.raises((InvalidRecord, NotAuthorized)):
        g.trust.check_record(body, record, held)


def test_a_record_outliving_its_signers_credentials_is_not_authorized(g: Group) -> None:
    body, record = g.record(g.ann, expires=g.ann_cred.expires + timedelta(microseconds=1))
    with pytest.raises(NotAuthorized, match="outlives"):
        g.trust.check_record(body, record, None)
    body, record = g.record(g.ann, expires=g.ann_cred.expires)
    g.trust.check_record(body, record, None)


def test_records_are_judged_by_the_signers_standing_when_modified(g: Group) -> None:
    g.trust.add_revocation(revoke(g.admin, g.charter, g.ann.member_id, now=T0 + DAY))
    body, record = g.record(g.ann, modified=T0 + DAY - timedelta(microseconds=1))
    g.trust.check_record(body, record, None)
    for modified in (T0 + DAY, T0 + 2 * DAY):
        body, record = g.record(g.ann, modified=modified)
        with pytest.raises(NotAuthorized, match="revoked signer"):
            g.trust.check_record(body, record, None)


def test_an_unknown_signer_is_not_authorized(g: Group) -> None:
    body, record = g.record(Identity.generate())
    with pytest.raises(NotAuthorized, match="unknown"):
        g.trust.check_record(body, record, None)


def test_a_record_signed_with_another_key_has_a_bad_signature(g: Group) -> None:
    body, record = g.record(g.ann)
    forged = dataclasses.replace(record, signature=g.bob.sign(body))
    with pytest.raises(InvalidRecord, match="bad signature"):
        g.trust.check_record(body, forged, None)


def test_every_flipped_bit_of_a_record_body_is_refused(g: Group) -> None:
    body, record = g.record(g.ann, attributes='<attributes><attribute name="a" type="int">1'
                            "</attribute></attributes>")  # fmt: skip
    for tampered in flips(body):
        with pytest.raises(RecordsError):
            g.trust.check_record(tampered, record, None)


def test_a_record_must_be_the_body_that_was_signed(g: Group) -> None:
    body, record = g.record(g.ann)
    with pytest.raises(InvalidRecord, match="differs from the body"):
        g.trust.check_record(body, dataclasses.replace(record, data=b"other"), None)


def test_a_record_of_another_group_is_refused(g: Group) -> None:
    other, _ = create_charter(g.creator, "other", now=T0)
    body, record = g.record(g.ann, group_id=other.group_id)
    with pytest.raises(InvalidRecord, match="group"):
        g.trust.check_record(body, record, None)


# ---------------------------------------------------------------- key files


def test_a_key_file_is_created_private_and_loaded_again(tmp_path: Path) -> None:
    path = tmp_path / "groups" / "identity.key"
    me = Identity.load_or_create(path, "ann")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    again = Identity.load(path)
    assert (again.member_id, again.name) == (me.member_id, "ann")
    assert Identity.load_or_create(path).member_id == me.member_id
    assert Identity.load_or_create(path, "ann b").name == "ann b"
    assert Identity.load(path).name == "ann b"
    assert "PRIVATE" not in repr(me) and me.member_id in repr(me)
    assert sorted(p.name for p in path.parent.iterdir()) == ["identity.key", "identity.name"]
    assert stat.S_IMODE(path.with_suffix(".name").stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o602])
def test_a_key_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chmod(path, mode)
    with pytest.raises(GroupError, match=f"{path}.*chmod 600 {path}"):
        Identity.load(path)
    with pytest.raises(GroupError, match="chmod 600"):
        Identity.load_or_create(path)


def test_a_key_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    Identity.load_or_create(real)
    link = tmp_path / "identity.key"
    link.symlink_to(real)
    with pytest.raises(GroupError, match=f"{link} is a symbolic link"):
        Identity.load(link)
    with pytest.raises(GroupError, match="symbolic link"):
        Identity.load_or_create(link)
    dangling = tmp_path / "dangling.key"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(GroupError, match="symbolic link"):
        Identity.load_or_create(dangling)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_another_users_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.load_or_create(path)
    os.chown(path, 65534, 65534)
    with pytest.raises(GroupError, match="belongs to uid 65534"):
        Identity.load(path)


def test_a_missing_or_foreign_key_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    with pytest.raises(GroupError, match="no member key"):
        Identity.load(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(GroupError, match="no readable"):
        Identity.load(path)
    os.unlink(path)
    os.mkdir(path, 0o700)
    with pytest.raises(GroupError, match="not a regular file"):
        Identity.load(path)


def test_an_id_that_is_not_derived_from_its_creator_is_refused(g: Group) -> None:
    """A member cannot give its own record the id of another's record."""
    _, theirs = g.record(g.bob)
    body, mine = g.record(g.ann, id=theirs.id)
    with pytest.raises(InvalidRecord, match="its id is not one"):
        g.trust.check_record(body, mine, None)
