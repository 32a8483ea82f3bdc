"""``cachefs records ...``: add, read, change, search and watch a group's records,
and export or import a snapshot of them.

The group is ``--group NAME``, or the only group this member is in.  Every
command first catches up with the group's engine (within ``--timeout``; an
unreachable one is a warning, and the command goes on with the member's own
database).  Output: one readable line per record, or with ``--json`` every
field (times ISO 8601 UTC, data in base64, attributes as a list and as XML).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cachefs.cli.groupsession import (
    choose_group,
    engine_options,
    expiry,
    family,
    groups_dir,
    open_session,
    read_input,
    run,
    type_uuid,
    warn,
    when,
)
from cachefs.cli.options import AddCommand, non_empty
from cachefs.cli.recordsview import event_json, record_json, record_line, show
from cachefs.errors import ConfigError

if TYPE_CHECKING:  # the record store is imported by the commands (see cli.groupsession)
    from cachefs.records.attributes import Attribute


def add_records_commands(add: AddCommand) -> None:
    leaf = family(
        add,
        "records",
        "add, read, search and watch a group's records",
        "A record has a type (a UUID), an expiration, searchable attributes and opaque "
        "data; it is signed by the member that last changed it and replicated to every "
        "member of the group. See docs/records.md.",
    )

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        parser = leaf(name, help, description)
        parser.add_argument(
            "--group", metavar="NAME", help="the group (default: the only one this member is in)"
        )
        engine_options(parser)
        return parser

    add_cmd = command(
        "add",
        "add a record; prints its id",
        "Add a record of --type, expiring at --expires, with the attributes of --attr and "
        "--attributes-xml (together), and the data of --data-file. Prints the new id.",
    )
    add_cmd.add_argument(
        "--type",
        dest="record_type",
        metavar="UUID",
        type=type_uuid,
        required=True,
        help="the record's type (never changes)",
    )
    _change_options(add_cmd, required=True)
    add_cmd.add_argument(
        "--autorefresh",
        action="store_true",
        help="republish the record before it expires, as long as a process "
        "of this member has the group open (its lifetime is kept)",
    )
    add_cmd.set_defaults(run=cmd_add)

    update = command(
        "update",
        "change a record's attributes, expiration or data",
        "Change only what is given: --expires (kept or later, never earlier), the "
        "attributes (--attr and --attributes-xml REPLACE the whole set: give every "
        "attribute the record keeps; --attributes-xml /dev/null removes them all), the "
        "data (--data-file). A member may change only its own records, an administrator "
        "any. Prints the id and the new version.",
    )
    update.add_argument("id", metavar="ID", type=type_uuid)
    _change_options(update, required=False)
    update.set_defaults(run=cmd_update)

    delete = command(
        "delete", "delete a record", "Delete the record: a tombstone replaces it on every member."
    )
    delete.add_argument("id", metavar="ID", type=type_uuid)
    delete.set_defaults(run=cmd_delete)

    get = command(
        "get",
        "show a record",
        "Show the live record ID (RECORD_NOT_FOUND, exit "
        "10, if it never existed, was deleted or has expired).",
    )
    get.add_argument("id", metavar="ID", type=type_uuid)
    _json_option(get)
    get.set_defaults(run=cmd_get)

    listing = command(
        "list", "list live records", "One line per live record (of --type), in id order."
    )
    listing.add_argument("--type", dest="record_type", metavar="UUID", type=type_uuid)
    _json_option(listing)
    listing.set_defaults(run=cmd_list)

    search = command(
        "search",
        "search records by their attributes",
        "Print the live records a query matches. --xml takes a <peersearch> query; "
        '--where the same for a shell: size>1M and (owner=ann* or owner="bob smith"): '
        "= != < > <= >=, and binds tighter than or, a quoted value is a string, a number "
        "(K M G T suffixes) an int, YYYY-MM-DD[Thh:mm[:ss]][Z] a date, name:int or "
        "name:string forces a type; * and ? are wildcards in = and !=. A record lacking "
        "the attribute, or holding it with another type, never matches (not even !=); "
        "names and string values compare case-insensitively.",
    )
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--xml", metavar="QUERY", help="a <peersearch> XML query")
    query.add_argument("--where", metavar="EXPR", help="a --where expression")
    search.add_argument(
        "--show-xml",
        action="store_true",
        help="print the XML query --where compiles to, and search nothing",
    )
    _json_option(search)
    search.set_defaults(run=cmd_search)

    watch = command(
        "watch",
        "print change events until interrupted",
        "Print one JSON line per change this member sees from now on (change name and "
        "number: ADDED 1, UPDATED 2, DELETED 3, EXPIRED 4; record id, type, version), "
        "including what it catches up with first, until interrupted (Ctrl-C: exit 130).",
    )
    watch.add_argument(
        "--type",
        dest="types",
        metavar="UUID",
        type=type_uuid,
        action="append",
        help="only records of this type (repeatable)",
    )
    watch.set_defaults(run=cmd_watch)

    export = command(
        "export",
        "write a snapshot of this member's records to a file",
        "Write every record held (tombstones included), with the credentials and "
        "revocations needed to check them, to FILE (0600, replaced atomically). The format "
        "is JSON lines, described in docs/records.md.",
    )
    export.add_argument("file", metavar="FILE", type=non_empty)
    export.set_defaults(run=cmd_export)

    imp = command(
        "import",
        "merge a snapshot into this member's records",
        "Check every item of a snapshot of this group as if it came from the engine and "
        "merge by version; prints how many records were imported, already held, and "
        "rejected. Exit 14 (INVALID_RECORD) if any line was rejected (the rest is "
        "imported); a snapshot of another group is refused whole (exit 2).",
    )
    imp.add_argument("file", metavar="FILE", type=non_empty)
    imp.set_defaults(run=cmd_import)


def _change_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--expires",
        metavar="WHEN",
        type=expiry,
        required=required,
        help="a duration from now (2h, 90d; units s m h d w) or a W3C "
        "date-time (2026-12-31T00:00Z; no zone means UTC)",
    )
    parser.add_argument(
        "--attr",
        metavar="NAME[:TYPE]=VALUE",
        action="append",
        help="an attribute (repeatable): TYPE string (default), int or date, "
        "e.g. size:int=5 owner=ann when:date=2026-12-31",
    )
    parser.add_argument(
        "--attributes-xml",
        metavar="FILE",
        type=non_empty,
        help="attributes as <attributes> XML, from FILE (- for stdin)",
    )
    parser.add_argument(
        "--data-file",
        metavar="FILE",
        type=non_empty,
        help="the record's data, from FILE (- for stdin)",
    )


def _json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="every field as JSON (one object per line for several records)",
    )


# -- the commands ------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    membership = choose_group(groups_dir(args), args.group)
    attributes = _attributes(args)
    data = _data(args, membership.charter.max_record_size)
    return run(_add, args, membership.name, attributes or "", data or b"")


async def _add(args: argparse.Namespace, name: str, attributes: str, data: bytes) -> int:
    from cachefs.records.model import Record, RecordFlags

    async with open_session(args, name) as session:
        records = session.group.records
        flags = RecordFlags.AUTOREFRESH if args.autorefresh else RecordFlags(0)
        record = Record(
            type=args.record_type,
            expires=when(args.expires, records.clock.now()),
            attributes=attributes,
            data=data,
            flags=flags,
        )
        print(await records.add(record), flush=True)
        await session.publish()
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    membership = choose_group(groups_dir(args), args.group)
    attributes = _attributes(args)
    data = _data(args, membership.charter.max_record_size)
    if args.expires is None and attributes is None and data is None:
        raise ConfigError(
            "nothing to change: give --expires, --attr, --attributes-xml or --data-file"
        )
    return run(_update, args, membership.name, attributes, data)


async def _update(
    args: argparse.Namespace, name: str, attributes: str | None, data: bytes | None
) -> int:
    async with open_session(args, name) as session:
        records = session.group.records
        held = await records.get(args.id)
        changed = dataclasses.replace(
            held,
            expires=held.expires
            if args.expires is None
            else when(args.expires, records.clock.now()),
            attributes=held.attributes if attributes is None else attributes,
            data=held.data if data is None else data,
        )
        new = await records.update(changed)
        print(f"{new.id} version {new.version}", flush=True)
        await session.publish()
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    return run(_delete, args, _group_name(args))


async def _delete(args: argparse.Namespace, name: str) -> int:
    async with open_session(args, name) as session:
        await session.group.records.delete(args.id)
        print(f"deleted {args.id}", flush=True)
        await session.publish()
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    return run(_get, args, _group_name(args))


async def _get(args: argparse.Namespace, name: str) -> int:
    async with open_session(args, name) as session:
        record = await session.group.records.get(args.id)
    if args.json:
        print(json.dumps(record_json(record), indent=2))
    else:
        print(record_line(record))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    return run(_list, args, _group_name(args))


async def _list(args: argparse.Namespace, name: str) -> int:
    async with (
        open_session(args, name) as session,
        session.group.records.enum(args.record_type) as records,
    ):
        async for record in records:
            show(record, args.json)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from cachefs.records.where import where_to_xml

    query = args.xml if args.xml is not None else where_to_xml(args.where)
    if args.show_xml:
        print(query)
        return 0
    return run(_search, args, _group_name(args), query)


async def _search(args: argparse.Namespace, name: str, query: str) -> int:
    async with open_session(args, name) as session:
        for record in await session.group.records.search(query):
            show(record, args.json)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    return run(_watch, args, _group_name(args))


async def _watch(args: argparse.Namespace, name: str) -> int:
    """Print events until SIGINT or SIGTERM (exit 128 + its number).  The
    signal cancels the watch, rather than a KeyboardInterrupt raised
    wherever the code happens to be, so the session always closes cleanly."""
    import signal

    import trio

    stopped: list[int] = []
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    stopped.append(signum)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            await _print_events(args, name)
            nursery.cancel_scope.cancel()
    return 128 + stopped[0] if stopped else 0


async def _print_events(args: argparse.Namespace, name: str) -> None:
    # subscribe before catching up: what the engine brings in is printed too
    async with (
        open_session(args, name, catch_up=False) as session,
        session.group.records.events(args.types) as events,
    ):
        await session.catch_up()
        async for event in events:
            print(json.dumps(event_json(event)), flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    return run(_export, args, _group_name(args))


async def _export(args: argparse.Namespace, name: str) -> int:
    from cachefs.records.snapshot import export_snapshot

    async with open_session(args, name) as session:
        counts = await export_snapshot(session.group, Path(args.file))
    print(
        f"exported {counts.records} records, {counts.tombstones} tombstones, "
        f"{counts.credentials} credentials and {counts.revocations} revocations to "
        f"{args.file}"
    )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    return run(_import, args, _group_name(args))


async def _import(args: argparse.Namespace, name: str) -> int:
    from cachefs.records.errors import InvalidRecord
    from cachefs.records.snapshot import import_snapshot

    if getattr(args, "log_level", None) is None:
        # what the store refuses is in the report below, not also in its log
        logging.getLogger("cachefs.records.store").setLevel(logging.ERROR)
    async with open_session(args, name) as session:
        report = await import_snapshot(session.group, Path(args.file))
        await session.publish()
    print(
        f"imported {report.imported} records, {report.stale} already held (stale), "
        f"{report.rejected} rejected; {report.credentials} new credentials or revocations",
        flush=True,
    )
    if report.rejected:
        for example in report.examples:
            warn(f"{args.file}: {example}")
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(report.reasons.items()))
        raise InvalidRecord(
            f"{report.rejected} lines of {args.file} were rejected ({why}); the rest was imported"
        )
    return 0


# -- input and output --------------------------------------------------------------------


def _group_name(args: argparse.Namespace) -> str:
    return choose_group(groups_dir(args), args.group).name


def _attributes(args: argparse.Namespace) -> str | None:
    """The attribute XML --attributes-xml and --attr give together; None if neither."""
    from cachefs.records.attributes import (
        MAX_XML_BYTES,
        parse_attr_option,
        parse_attributes,
        render_attributes,
    )
    from cachefs.records.errors import InvalidAttributes

    if args.attributes_xml is None and args.attr is None:
        return None
    attrs: list[Attribute] = []
    if args.attributes_xml is not None:
        raw = read_input(Path(args.attributes_xml), "--attributes-xml", MAX_XML_BYTES)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidAttributes(f"--attributes-xml {args.attributes_xml}: not UTF-8") from None
        attrs += parse_attributes(text)
    attrs += [parse_attr_option(text) for text in args.attr or ()]
    return render_attributes(parse_attributes(render_attributes(attrs)))  # duplicates refused


def _data(args: argparse.Namespace, limit: int) -> bytes | None:
    from cachefs.records.errors import MaxRecordSizeExceeded

    if args.data_file is None:
        return None
    return read_input(Path(args.data_file), "--data-file", limit, MaxRecordSizeExceeded)
