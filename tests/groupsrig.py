"""Groups for tests: a group created in one groups directory, joined from
others (one groups directory per member, as on separate machines)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cachefs.records.credentials import Role
from cachefs.records.groups import create_group, invite, join
from cachefs.records.identity import Identity

GROUP = "team"


def identity(groups_dir: Path, name: str | None = None) -> Identity:
    groups_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Identity.load_or_create(groups_dir / "identity.key", name)


def make_group(
    root: Path,
    roles: tuple[Role, ...] = (Role.MEMBER,),
    *,
    engine: str | None = None,
    max_record_size: int = 1 << 20,
    credential_lifetime: timedelta = timedelta(days=30),
    stream_maxlen: int | None = None,
) -> list[Path]:
    """The groups directories of the creator (an administrator) and of one more
    member per role in *roles*, all in group GROUP."""
    now = datetime.now(UTC)
    admin_dir = root / "m0"
    admin = identity(admin_dir, "admin")
    membership = create_group(
        admin_dir, GROUP, admin, engine=engine, max_record_size=max_record_size, now=now
    )
    dirs = [admin_dir]
    for i, role in enumerate(roles, 1):
        d = root / f"m{i}"
        member = identity(d, f"member{i}")
        invitation = invite(
            membership,
            admin,
            member.public_key,
            role=role,
            name=f"member{i}",
            expires=now + credential_lifetime,
            now=now,
        )
        join(d, invitation, member, engine=engine)
        dirs.append(d)
    if stream_maxlen is not None:
        import json

        for d in dirs:
            config = d / "groups" / GROUP / "config.json"
            data = json.loads(config.read_text())
            data["stream_maxlen"] = stream_maxlen
            config.write_text(json.dumps(data))
    return dirs
