"""What makes a group trust a member, a credential, a revocation or a record.

Policy:

- An administrator issues credentials and revocations.  Either counts only if
  its issuer was an administrator in force strictly before the moment it
  claims (the creator: at that moment), so every chain runs back in time to
  the creator and none can loop.  The creator cannot be revoked, and only it
  issues its own credentials.
- A member's credential in force at a time is the latest-issued valid one
  issued by then: a re-issue replaces the earlier ones, also to downgrade a
  role or shorten an expiry.  A revocation ends every credential of the
  member from its time on.
- What a member trusts is recomputed from everything it has verified, so the
  order in which credentials and revocations arrive does not change the
  verdict; an item whose issuer is not known yet is refused (add issuers
  first).  Times are those the signer claims: Trust never reads a clock.
- A record counts only if signed by a member in force when it claims to have
  been changed, not outliving that member's credentials; a member (not an
  administrator) changes only the records it created.
"""

from __future__ import annotations

import logging
from datetime import datetime

from cachefs.records.credentials import Charter, Credential, Revocation, Role, time_text
from cachefs.records.errors import InvalidRecord, NotAuthorized
from cachefs.records.identity import KEY_SIZE, member_id_of, verify
from cachefs.records.model import EncodingError, Record, decode_record, micros, record_id

__all__ = ["Trust"]

log = logging.getLogger(__name__)


class Trust:
    """What a member knows to check everything that arrives: the charter, every credential
    and revocation it has verified.  Redis and snapshot files are untrusted."""

    def __init__(self, charter: Charter) -> None:
        if charter.group_id != charter.derived_id() or not verify(
            charter.creator_key, charter.signed_bytes(), charter.signature
        ):
            raise NotAuthorized(f"the charter of group {charter.group_id} does not verify")
        self.charter = charter
        self.creator_id = member_id_of(charter.creator_key)
        self._creds: dict[str, list[Credential]] = {}  # by member, in order of issue
        self._revs: dict[str, list[Revocation]] = {}  # by member, in order of time
        self._valid: dict[Credential | Revocation, bool] = {}
        self._dirty = False

    def _is_root(self, cred: Credential) -> bool:
        return cred.member_id == cred.issuer_id == self.creator_id

    def _issuer_key(self, issuer_id: str, item: Credential | Revocation) -> bytes | None:
        if issuer_id == self.creator_id:
            return self.charter.creator_key
        if isinstance(item, Credential) and item.member_id == issuer_id:
            return item.public_key
        known = self._creds.get(issuer_id)
        return known[0].public_key if known else None

    def _in_force(
        self, member_id: str, at: int, valid: dict[Credential | Revocation, bool] | None = None
    ) -> Credential | None:
        valid = self._valid if valid is None else valid
        for rev in self._revs.get(member_id, ()):
            if micros(rev.revoked) > at:
                break
            if valid.get(rev, False):
                return None
        for cred in reversed(self._creds.get(member_id, ())):
            if micros(cred.issued) <= at and valid.get(cred, False):
                return cred if at <= micros(cred.expires) else None
        return None

    def _issuer_problem(
        self,
        issuer_id: str,
        when: datetime,
        valid: dict[Credential | Revocation, bool] | None = None,
    ) -> str | None:
        """Why ``issuer_id`` could not sign an item dated ``when``, if it could not."""
        at = micros(when)
        if issuer_id != self.creator_id:
            at -= 1
        cred = self._in_force(issuer_id, at, valid)
        if cred is None:
            return f"its issuer {issuer_id} {self._why_not(issuer_id, at)} at {time_text(when)}"
        if cred.role is not Role.ADMIN:
            return f"its issuer {issuer_id} was not an administrator at {time_text(when)}"
        return None

    def _why_not(self, member_id: str, at: int) -> str:
        """Why a member had no credential in force at ``at`` (for messages)."""
        if any(
            micros(r.revoked) <= at and self._valid.get(r) for r in self._revs.get(member_id, ())
        ):
            return "was revoked"
        if any(
            micros(c.issued) <= at and self._valid.get(c) for c in self._creds.get(member_id, ())
        ):
            return "had expired credentials"
        return "was not a member yet" if member_id in self._creds else "is unknown"

    def _refresh(self) -> None:
        """Recompute every item's validity in time order: an item depends only
        on earlier ones (or on the creator's own credentials)."""
        if not self._dirty:
            return
        items: list[tuple[int, int, Credential | Revocation]] = []
        for creds in self._creds.values():
            items += ((micros(c.issued), 0 if self._is_root(c) else 1, c) for c in creds)
        for revs in self._revs.values():
            items += ((micros(r.revoked), 1, r) for r in revs)
        items.sort(key=lambda entry: entry[:2])
        # built aside and swapped in whole: the database thread may be reading
        valid: dict[Credential | Revocation, bool] = {}
        for _, _, item in items:
            if isinstance(item, Credential) and self._is_root(item):
                valid[item] = True
            else:
                time = item.issued if isinstance(item, Credential) else item.revoked
                valid[item] = self._issuer_problem(item.issuer_id, time, valid) is None
        self._valid = valid
        self._dirty = False

    def add_credential(self, cred: Credential) -> bool:
        """Verify and keep ``cred``; False if already known."""
        what = f"credential of member {cred.member_id}"
        if cred.group_id != self.charter.group_id:
            raise NotAuthorized(f"{what} is for group {cred.group_id}, not {self.charter.group_id}")
        if cred in self._creds.get(cred.member_id, ()):
            return False
        if len(cred.public_key) != KEY_SIZE or member_id_of(cred.public_key) != cred.member_id:
            raise NotAuthorized(f"{what}: the key is not that member's")
        if micros(cred.expires) <= micros(cred.issued):
            raise NotAuthorized(f"{what}: it expires before it is issued")
        if cred.member_id == self.creator_id and cred.issuer_id != self.creator_id:
            raise NotAuthorized(f"{what}: only the creator issues its own credentials")
        if self._is_root(cred) and cred.role is not Role.ADMIN:
            raise NotAuthorized(f"{what}: the creator is always an administrator")
        key = self._issuer_key(cred.issuer_id, cred)
        if key is None:
            raise NotAuthorized(f"{what}: its issuer {cred.issuer_id} is unknown here")
        if not verify(key, cred.signed_bytes(), cred.signature):
            raise NotAuthorized(f"{what}: the signature does not verify")
        if not self._is_root(cred):
            self._refresh()
            problem = self._issuer_problem(cred.issuer_id, cred.issued)
            if problem:
                raise NotAuthorized(f"{what}: {problem}")
        # copied, not changed in place: a reader in another thread may be iterating
        creds = [*self._creds.get(cred.member_id, ()), cred]
        self._creds[cred.member_id] = sorted(creds, key=lambda c: (micros(c.issued), c.signature))
        self._dirty = True
        return True

    def add_revocation(self, rev: Revocation) -> bool:
        """Verify and keep ``rev``; False if already known."""
        what = f"revocation of member {rev.member_id}"
        if rev.group_id != self.charter.group_id:
            raise NotAuthorized(f"{what} is for group {rev.group_id}, not {self.charter.group_id}")
        if rev in self._revs.get(rev.member_id, ()):
            return False
        if rev.member_id == self.creator_id:
            raise NotAuthorized(f"{what}: the creator of a group cannot be revoked")
        key = self._issuer_key(rev.issuer_id, rev)
        if key is None:
            raise NotAuthorized(f"{what}: its issuer {rev.issuer_id} is unknown here")
        if not verify(key, rev.signed_bytes(), rev.signature):
            raise NotAuthorized(f"{what}: the signature does not verify")
        self._refresh()
        problem = self._issuer_problem(rev.issuer_id, rev.revoked)
        if problem:
            raise NotAuthorized(f"{what}: {problem}")
        revs = [*self._revs.get(rev.member_id, ()), rev]
        self._revs[rev.member_id] = sorted(revs, key=lambda r: (micros(r.revoked), r.signature))
        self._dirty = True
        return True

    def credential(self, member_id: str, at: datetime) -> Credential | None:
        """The member's credential in force at ``at``: the latest-issued valid
        one issued by then, if ``at`` is before its expiry and the member was
        not revoked at or before ``at``."""
        self._refresh()
        return self._in_force(member_id, micros(at))

    def credentials(self) -> list[Credential]:
        """Every credential verified so far (also those since superseded)."""
        every = [c for creds in self._creds.values() for c in creds]
        return sorted(every, key=lambda c: (micros(c.issued), c.member_id, c.signature))

    def members(self, at: datetime) -> list[tuple[Credential, bool]]:
        """Every member at ``at`` with its credential and whether it is revoked:
        the credential in force, else the latest valid one issued by then (expired
        or revoked).  A credential issued later, or one whose issuer has since been
        revoked before issuing it, does not count; a member left with none is not
        listed.  In order of issue."""
        self._refresh()
        when = micros(at)
        found: list[tuple[Credential, bool]] = []
        for member_id, creds in self._creds.items():
            cred = self._in_force(member_id, when)
            if cred is not None:
                found.append((cred, False))
                continue
            latest = [c for c in creds if micros(c.issued) <= when and self._valid.get(c)]
            if latest:
                revoked = any(
                    micros(r.revoked) <= when and self._valid.get(r)
                    for r in self._revs.get(member_id, ())
                )
                found.append((latest[-1], revoked))
        return sorted(found, key=lambda entry: (micros(entry[0].issued), entry[0].member_id))

    def revocations(self) -> list[Revocation]:
        every = [r for revs in self._revs.values() for r in revs]
        return sorted(every, key=lambda r: (micros(r.revoked), r.member_id, r.signature))

    def check_record(self, body: bytes, record: Record, held: Record | None) -> None:
        """Refuse ``record`` (whose canonical bytes are ``body``) unless its
        signer may make this change to ``held`` (the version held, if any)."""
        try:
            group_id, signed = decode_record(body, record.signature)
        except EncodingError as e:
            raise InvalidRecord(f"record {record.id}: {e}") from None
        what = f"record {signed.id}"
        if group_id != self.charter.group_id:
            raise InvalidRecord(f"{what} is of group {group_id:.40}, not {self.charter.group_id}")
        if signed != record:
            raise InvalidRecord(f"{what} differs from the body it was signed as")
        assert signed.created is not None
        if signed.id != record_id(group_id, signed.creator, signed.type, signed.created):
            raise InvalidRecord(f"{what}: its id is not one its creator's record can have")
        assert signed.modified is not None  # decode_record sets it
        signer = signed.modified_by
        cred = self.credential(signer, signed.modified)
        if cred is None:
            raise NotAuthorized(f"{what}: unknown, expired or revoked signer {signer:.40}")
        if not verify(cred.public_key, body, signed.signature):
            raise InvalidRecord(f"{what}: bad signature")
        if held is not None:
            for field in ("id", "type", "created", "creator"):
                if getattr(signed, field) != getattr(held, field):
                    raise InvalidRecord(f"{what}: its {field} differs from the version held")
        if signed.expires > cred.expires:
            raise NotAuthorized(
                f"{what} outlives its signer's credentials ({time_text(cred.expires)})"
            )
        if cred.role is not Role.ADMIN and signed.creator != signer:
            raise NotAuthorized(
                f"{what}: member {signer} may change only records it created "
                f"(this one is {signed.creator:.40}'s)"
            )
