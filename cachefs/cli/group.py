"""``cachefs group ...``: this machine's member key and its group memberships.

A group lives in the groups directory (``--groups-dir``, else
``$CACHEFS_GROUPS_DIR``, else per user or /var/lib/cachefs/groups for root),
one per member: several members can share a machine, each with its own
directory.  A command that opens a group with an engine first syncs with it
within ``--timeout``; an unreachable engine is one warning line, then the
command works on the member's local database, and what it changes stays in
the outbox until a later command (or process) reaches the engine.  The
live group (``pin``, ``unpin``, the nodes and pins ``status`` shows) is
cachefs.cli.grouplive.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from cachefs.cli.grouplive import add_pin_commands, read_live
from cachefs.cli.groupsession import (
    DEFAULT_INVITE_LIFETIME,
    choose_group,
    engine_options,
    expiry,
    family,
    groups_dir,
    iso,
    now_utc,
    open_session,
    read_input,
    run,
    shown_time,
    when,
)
from cachefs.cli.options import AddCommand, non_empty, size

# The record store (and the Redis client under it) is imported by the commands that
# use it, not by every cachefs command: it would double the start-up time of all.
# -- the group commands ------------------------------------------------------------------


def add_group_commands(add: AddCommand) -> None:
    leaf = family(
        add,
        "group",
        "create, join and inspect groups (group records)",
        "A group is a set of members (each a key pair on some machine) sharing signed "
        "records through an engine (Redis). The creator is its first administrator; an "
        "administrator invites members (by the public key `cachefs group identity` shows "
        "them) and may revoke them. See docs/records.md.",
    )
    create = leaf(
        "create",
        "create a group, with this member as its administrator",
        "Create group NAME in this member's groups directory, this member (its key is "
        "created on first use) its first administrator.",
    )
    create.add_argument("name", metavar="NAME", help="letters, digits, . _ -, at most 64")
    create.add_argument(
        "--engine",
        metavar="URL",
        help="redis://[user:password@]host[:port][/db] or rediss:// (TLS); without it the "
        "group stays on this machine until members join with one",
    )
    create.add_argument(
        "--max-record-size",
        metavar="SIZE",
        type=size,
        default=1 << 20,
        help="the largest encoded record the group takes, fixed for good (default: 1M)",
    )
    create.add_argument("--name", dest="member_name", metavar="TEXT", help="your name in it")
    engine_options(create)
    create.set_defaults(run=cmd_create)

    identity = leaf(
        "identity",
        "show this member's id and public key (creating the key on first use)",
        "Print this member's id and the public key an administrator needs to invite it "
        "(cachefs group invite GROUP PUBLIC_KEY). The private key is created on first use "
        "in the groups directory (identity.key, mode 0600) and never leaves it.",
    )
    identity.add_argument("--name", metavar="TEXT", help="set this member's human name")
    identity.add_argument("--json", action="store_true", help="print JSON")
    identity.set_defaults(run=cmd_identity)

    inv = leaf(
        "invite",
        "issue credentials to a member (administrators)",
        "Write an invitation for the member whose public key is PUBLIC_KEY: the group's "
        "charter and a credential signed by you. The member runs cachefs group join FILE. "
        "A credential cannot outlive yours; re-inviting a member replaces its role and "
        "expiry.",
    )
    inv.add_argument("group", metavar="GROUP")
    inv.add_argument("public_key", metavar="PUBLIC_KEY", help="as cachefs group identity shows it")
    inv.add_argument(
        "--role",
        choices=("member", "admin"),
        default="member",
        help="member: may change its own records; admin: any record, and may "
        "invite and revoke (default: member)",
    )
    inv.add_argument(
        "--expires",
        metavar="WHEN",
        type=expiry,
        help="when the credential ends: a duration (90d) or a date-time (default: 90d)",
    )
    inv.add_argument("--member-name", metavar="TEXT", default="", help="the member's name")
    inv.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        type=non_empty,
        help="write the invitation there (mode 0600) instead of to stdout",
    )
    engine_options(inv)
    inv.set_defaults(run=cmd_invite)

    joining = leaf(
        "join",
        "join a group with an invitation",
        "Join the group an invitation (cachefs group invite) was written for, as this "
        "member; checks the invitation's chain of credentials to the group's creator.",
    )
    joining.add_argument("file", metavar="FILE", type=non_empty, help="the invitation")
    joining.add_argument(
        "--name",
        metavar="NAME",
        help="the name this machine knows the group by (default: the name its creator "
        "gave it); for a second group of the same name",
    )
    joining.add_argument(
        "--engine",
        metavar="URL",
        help="the group's engine: redis://[user:password@]host[:port][/db] "
        "or rediss:// (without it the group stays on this machine)",
    )
    engine_options(joining)
    joining.set_defaults(run=cmd_join)

    rev = leaf(
        "revoke",
        "revoke a member (administrators)",
        "Revoke MEMBER_ID: every member refuses its changes from now on (its records "
        "stay until they expire or an administrator deletes them). The creator cannot be "
        "revoked.",
    )
    rev.add_argument("group", metavar="GROUP")
    rev.add_argument("member_id", metavar="MEMBER_ID")
    engine_options(rev)
    rev.set_defaults(run=cmd_revoke)

    status = leaf(
        "status",
        "show a group: engine, members, records, outbox, live nodes and pins",
        "Show the group's id, its engine and whether it answers now, this member's role "
        "and credential expiry, the members known, live records and tombstones, changes "
        "waiting in the outbox, and changes rejected while catching up; then every live "
        "node (each mount of the group: host, mount point, source, cache, hit ratio, bytes "
        "from the origin, the hosted cache and its local cache, its progress on each group "
        "pin) and the group pins.",
    )
    status.add_argument(
        "group", metavar="GROUP", nargs="?", help="the group (default: the only one joined)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    engine_options(status)
    status.set_defaults(run=cmd_status)

    add_pin_commands(leaf)

    listing = leaf(
        "list",
        "list the groups this member is in",
        "One line per group: name, id, this member's role and expiry, engine.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON lines")
    listing.set_defaults(run=cmd_list)


def cmd_identity(args: argparse.Namespace) -> int:
    from cachefs.records.groups import IDENTITY_FILE
    from cachefs.records.identity import Identity, encode_key

    me = Identity.load_or_create(groups_dir(args) / IDENTITY_FILE, args.name)
    shown = {"member_id": me.member_id, "name": me.name, "public_key": encode_key(me.public_key)}
    if args.json:
        print(json.dumps(shown))
        return 0
    print(f"member id   {me.member_id}")
    if me.name:
        print(f"name        {me.name}")
    print(f"public key  {shown['public_key']}")
    print(f"(an administrator invites you with: cachefs group invite GROUP {shown['public_key']})")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from cachefs.records.groups import IDENTITY_FILE, create_group, parse_engine_url
    from cachefs.records.identity import Identity

    directory = groups_dir(args)
    engine = parse_engine_url(args.engine) if args.engine else None
    me = Identity.load_or_create(directory / IDENTITY_FILE, args.member_name)
    membership = create_group(
        directory,
        args.name,
        me,
        engine=engine,
        max_record_size=args.max_record_size,
        now=now_utc(),
    )
    print(
        f"created group {membership.name} ({membership.charter.group_id}); "
        f"you ({me.member_id}) are its administrator"
    )
    if engine is not None:
        run(_publish_only, args, membership.name)
    return 0


async def _publish_only(args: argparse.Namespace, name: str) -> None:
    async with open_session(args, name) as session:
        await session.publish()


def cmd_join(args: argparse.Namespace) -> int:
    from cachefs.records.groups import IDENTITY_FILE, join, parse_engine_url
    from cachefs.records.identity import Identity

    directory = groups_dir(args)
    engine = parse_engine_url(args.engine) if args.engine else None
    me = Identity.load(directory / IDENTITY_FILE)
    invitation = read_input(Path(args.file), "the invitation", 1 << 20)
    membership = join(directory, invitation, me, engine=engine, name=args.name)
    own = membership.credential
    print(
        f"joined group {membership.name} ({membership.charter.group_id}) as {own.role} "
        f"{me.member_id}; credentials expire {shown_time(own.expires)}"
    )
    if engine is not None:
        run(_publish_only, args, membership.name)
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    return run(_invite, args)


async def _invite(args: argparse.Namespace) -> int:
    import base64

    import trio

    from cachefs.records.credentials import Role
    from cachefs.records.errors import GroupError
    from cachefs.records.groups import invite
    from cachefs.records.identity import decode_key, write_file
    from cachefs.records.model import ApplyResult

    key = decode_key(args.public_key)
    async with open_session(args, args.group) as session:
        group = session.group
        now = group.records.clock.now()
        expires = when(args.expires or DEFAULT_INVITE_LIFETIME, now)
        blob = invite(
            group.membership,
            group.identity,
            key,
            role=Role(args.role),
            name=args.member_name,
            expires=expires,
            now=now,
        )
        # the credential is published now too, so that every member knows it
        cred = base64.b64decode(json.loads(blob)["chain"][0])
        if (
            await group.records.arrivals.apply_credential(cred, publish=True)
            is ApplyResult.REJECTED
        ):
            raise GroupError("the credential just issued does not verify: is your own valid?")
        if args.output:
            await trio.to_thread.run_sync(write_file, Path(args.output), blob)
            print(
                f"wrote the invitation of {args.member_name or 'the member'} "
                f"({args.role}, until {iso(expires)}) to {args.output}"
            )
        else:
            sys.stdout.buffer.write(blob + (b"" if blob.endswith(b"\n") else b"\n"))
            sys.stdout.flush()
        await session.publish()
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    return run(_revoke, args)


async def _revoke(args: argparse.Namespace) -> int:
    async with open_session(args, args.group) as session:
        await session.group.revoke(args.member_id)
        print(f"revoked {args.member_id} in group {session.group.name}")
        await session.publish()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    name = choose_group(groups_dir(args), args.group, "cachefs group status GROUP").name
    return run(_status, args, name)


async def _status(args: argparse.Namespace, name: str) -> int:
    from cachefs.records.redislog import redact

    async with open_session(args, name) as session:
        group = session.group
        stats = await group.statistics()
        mine = group.records.trust.credential(group.identity.member_id, group.records.clock.now())
        revoked: dict[str, datetime] = {}
        for rev in group.revoked():
            revoked[rev.member_id] = min(rev.revoked, revoked.get(rev.member_id, rev.revoked))
        members = [
            {
                "id": cred.member_id,
                "name": cred.name,
                "role": str(cred.role),
                "expires": iso(cred.expires),
                "revoked": iso(revoked[cred.member_id]) if is_revoked else None,
            }
            for cred, is_revoked in group.members()
        ]
        expiries = [shown_time(cred.expires) for cred, _ in group.members()]
        live = await read_live(group)
    engine = redact(group.engine) if group.engine else None
    if args.json:
        shown = {
            "group": group.name,
            "group_id": group.group_id,
            "engine": engine,
            "reachable": session.reachable if engine else None,
            "member": {
                "id": group.identity.member_id,
                "name": group.identity.name,
                "role": str(mine.role) if mine else None,
                "expires": iso(mine.expires) if mine else None,
            },
            "members": members,
            "live_records": stats.live_records,
            "tombstones": stats.tombstones,
            "outbox": stats.outbox,
            "rejected": group.rejected,
            **live.to_json(),
        }
        print(json.dumps(shown, indent=2))
        return 0
    you = (
        f"{mine.role}, credentials expire {shown_time(mine.expires)}"
        if mine
        else "no valid credentials (expired or revoked)"
    )
    reach = "reachable" if session.reachable else "unreachable"
    rows = [
        ("group", f"{group.name} ({group.group_id})"),
        ("engine", f"{engine} ({reach})" if engine else "none (this machine only)"),
        ("you", f"{group.identity.member_id} {group.identity.name}".strip() + f": {you}"),
        ("records", f"{stats.live_records} live, {stats.tombstones} tombstones"),
        ("outbox", f"{stats.outbox} changes not yet published"),
        ("rejected", f"{group.rejected} changes refused (by this process)"),
        ("members", str(len(members))),
    ]
    for label, value in rows:
        print(f"{label:<9} {value}")
    for m, until in zip(members, expiries, strict=True):
        end = f"revoked {m['revoked']}" if m["revoked"] else f"expires {until}"
        print(f"  {m['id']}  {m['role']:<6}  {end}  {m['name']}".rstrip())
    for line in live.lines():
        print(line)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cachefs.records.groups import list_memberships
    from cachefs.records.redislog import redact

    for m in list_memberships(groups_dir(args)):
        own = m.credential
        row = {
            "group": m.name,
            "group_id": m.charter.group_id,
            "role": str(own.role),
            "expires": iso(own.expires),
            "engine": redact(m.engine) if m.engine else None,
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"{m.name}  {m.charter.group_id}  {own.role}  expires "
                f"{shown_time(own.expires)}  engine {row['engine'] or 'none'}"
            )
    return 0
