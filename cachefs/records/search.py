"""Searching records: the ``<peersearch>`` query and the index.

A query is XML with one top element, ``and``, ``or`` or ``clause``::

    <peersearch><and>
      <clause attrib="size" type="int" compare="greater">1048576</clause>
      <clause attrib="owner" type="string">ann*</clause>
    </and></peersearch>

What a query means (where the reference leaves it open, this is our choice):

- ``and`` and ``or`` hold at least one child each; a clause has ``attrib``
  and ``type`` (string, int or date), ``compare`` (equal, notequal, less,
  greater, lessorequal, greaterorequal, in lower case; equal when absent) and its value as
  text, which int and date clauses require and a string clause may leave
  empty.  Anything else (unknown elements or XML attributes, text between
  elements, a DTD or entity declaration, more than 1 MiB, 32 levels or 1000
  clauses) is INVALID_SEARCH.
- Missing attribute: a record without the attribute never matches the
  clause, ``notequal`` included (a missing attribute is not "not equal").
- Type mismatch: a clause matches only attributes of its own type: an int
  clause never matches a string attribute ``"5"``, nor a date one.
- Case: attribute names match case-insensitively; string values compare
  case-insensitively, as their Unicode casefold (``Ann`` equals ``ann``).
  Strings order by code point of the casefolded text.  A string value is
  taken exactly, whitespace included.
- Wildcards: in a string clause comparing equal or notequal, ``*`` matches any
  run of characters (also none) and ``?`` exactly one; ``\\*``, ``\\?`` and
  ``\\\\`` stand for the character itself, any other backslash is
  INVALID_SEARCH.  Wildcards are matched against the casefolded value, so
  ``?`` is one character of that (rare letters such as ß fold to two).  A
  wildcard in a less/greater/lessorequal/greaterorequal clause is
  INVALID_SEARCH (an escaped ``\\*`` is allowed there).
- int: decimal, optional sign, 64-bit signed.  date: a W3C date-time form
  (``2026``, ``2026-12``, ``2026-12-31``, ``2026-12-31T07:00Z``,
  ``...T07:00:00.5+01:00``); no zone means UTC; dates compare as instants
  and a partial date names its first instant (``2026`` is 2026-01-01T00:00Z,
  so ``equal 2026`` is not "during 2026": use greaterorequal and less);
  fractions of a second past the microsecond are dropped.
- The reserved attributes (peerrecordid, peerrecordtype, peercreatorid,
  peerlastmodifiedby: strings; peercreationtime, peerlastmodificationtime:
  dates) are searchable like any other.

``--where`` (cachefs.records.where) is the same query written for a shell.

Every clause is one search of an index of ``attrs``: equal and the ordering
compares, and a wildcard pattern with a literal prefix, search a range of
it, never every record.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args

from cachefs.records.attributes import (
    INT,
    INT_MAX,
    INT_MIN,
    NAME,
    Attribute,
    AttrType,
    XmlElement,
    attr_type,
    parse_date,
    parse_xml,
    shown,
)
from cachefs.records.errors import InvalidSearch
from cachefs.records.model import micros

__all__ = [
    "ATTRS_SCHEMA",
    "HEADER_COLUMNS",
    "And",
    "Clause",
    "Compare",
    "Or",
    "Query",
    "compile_query",
    "index_rows",
    "parse_search",
]

log = logging.getLogger(__name__)

# Both value indexes end with record_id, so a clause is answered from the index alone.
ATTRS_SCHEMA: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS attrs (record_id TEXT NOT NULL, name TEXT NOT NULL, "
    "type TEXT NOT NULL, ival INTEGER, sval TEXT)",
    "CREATE INDEX IF NOT EXISTS attrs_int ON attrs(name, type, ival, record_id)",
    "CREATE INDEX IF NOT EXISTS attrs_str ON attrs(name, type, sval, record_id)",
    "CREATE INDEX IF NOT EXISTS attrs_record ON attrs(record_id)",
)

# The reserved attributes are the records table's own columns (indexed there), not
# rows of attrs: ids and member ids are lower case already, times in microseconds.
HEADER_COLUMNS: dict[str, tuple[str, AttrType]] = {
    "peerrecordid": ("id", "string"),
    "peerrecordtype": ("type", "string"),
    "peercreatorid": ("creator", "string"),
    "peerlastmodifiedby": ("modified_by", "string"),
    "peercreationtime": ("created", "date"),
    "peerlastmodificationtime": ("modified", "date"),
}

Compare = Literal["equal", "notequal", "less", "greater", "lessorequal", "greaterorequal"]
COMPARES: tuple[Compare, ...] = get_args(Compare)
_SQL_OP = {
    "equal": "=",
    "notequal": "!=",
    "less": "<",
    "greater": ">",
    "lessorequal": "<=",
    "greaterorequal": ">=",
}
MAX_CLAUSES = 1000
# SQLite refuses compounds of more than 500 SELECTs; longer and/or are split.
_COMPOUND_CHUNK = 200


@dataclass(frozen=True)
class Clause:
    attrib: str
    type: AttrType
    compare: Compare
    value: str  # the query's text, wildcards and escapes kept


@dataclass(frozen=True)
class And:
    children: tuple[Query, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Query, ...]


Query = Clause | And | Or


# -- the index ---------------------------------------------------------------


def index_rows(
    record_id: str, attrs: Sequence[Attribute]
) -> list[tuple[str, str, str, int | None, str | None]]:
    """The ``attrs`` rows of one record: (record_id, name, type, ival, sval)."""
    rows: list[tuple[str, str, str, int | None, str | None]] = []
    for attr in attrs:
        value = attr.value
        name = attr.name.casefold()
        if isinstance(value, datetime):
            rows.append((record_id, name, attr.type, micros(value), None))
        elif isinstance(value, int):
            rows.append((record_id, name, attr.type, value, None))
        else:
            rows.append((record_id, name, attr.type, None, value.casefold()))
    return rows


# -- values ------------------------------------------------------------------

_STAR, _ONE = object(), object()


def _pattern(text: str) -> list[str | object]:
    """*text* as literal characters and wildcards (_STAR, _ONE)."""
    out: list[str | object] = []
    chars = iter(text)
    for c in chars:
        if c == "*":
            out.append(_STAR)
        elif c == "?":
            out.append(_ONE)
        elif c == "\\":
            escaped = next(chars, "")
            if escaped not in ("*", "?", "\\"):
                bad = "\\" + escaped
                raise InvalidSearch(
                    f"bad escape {shown(bad)} in {shown(text)}: only \\*, \\? and \\\\ are allowed"
                )
            out.append(escaped)
        else:
            out.append(c)
    return out


def _glob(pattern: list[str | object]) -> str:
    """A GLOB pattern over casefolded text: SQLite's own * ? [ are bracketed."""
    out = []
    for part in pattern:
        if part is _STAR:
            out.append("*")
        elif part is _ONE:
            out.append("?")
        else:
            for c in str(part).casefold():
                out.append(f"[{c}]" if c in "*?[" else c)
    return "".join(out)


def _condition(clause: Clause) -> tuple[str, list[object]]:
    """The WHERE condition on ``attrs`` for *clause* (InvalidSearch if its
    attrib, type, compare or value is not valid)."""
    where = f"clause on {shown(clause.attrib)}"
    if not isinstance(clause.attrib, str) or NAME.fullmatch(clause.attrib) is None:
        raise InvalidSearch(f"attrib {shown(clause.attrib)}: use 1 to 64 letters and digits")
    if clause.compare not in COMPARES:
        raise InvalidSearch(f"{where}: unknown compare {shown(clause.compare)}")
    op = _SQL_OP[clause.compare]
    head: list[object] = []
    if clause.type == "int":
        text = clause.value.strip()
        if INT.fullmatch(text) is None or not INT_MIN <= int(text) <= INT_MAX:
            raise InvalidSearch(f"{where}: {shown(text)} is not a 64-bit integer")
        return f"{{ival}} {op} ?", [*head, int(text)]
    if clause.type == "date":
        try:
            instant = parse_date(clause.value.strip())
        except ValueError as e:
            raise InvalidSearch(f"{where}: {e}") from None
        return f"{{ival}} {op} ?", [*head, micros(instant)]
    if clause.type != "string":
        raise InvalidSearch(f"{where}: unknown type {shown(clause.type)} (use string, int or date)")
    pattern = _pattern(clause.value)
    if all(isinstance(part, str) for part in pattern):
        return f"{{sval}} {op} ?", [*head, "".join(map(str, pattern)).casefold()]
    if clause.compare not in ("equal", "notequal"):
        raise InvalidSearch(
            f"{where}: wildcards work only with equal and notequal (escape them as \\* \\?)"
        )
    glob = "GLOB" if clause.compare == "equal" else "NOT GLOB"
    return f"{{sval}} {glob} ?", [*head, _glob(pattern)]


# -- <peersearch> --------------------------------------------------------------


def parse_search(xml: str) -> Query:
    """The query *xml* states; InvalidSearch (one line) if it is not one."""
    if not xml.strip():
        raise InvalidSearch("the query is empty: give a <peersearch> document")
    root = parse_xml(xml, InvalidSearch, "the search XML")
    if root.tag != "peersearch":
        raise InvalidSearch(f"the root element is <{root.tag}>, not <peersearch>")
    _no_attrib_or_text(root)
    if len(root.children) != 1:
        raise InvalidSearch(
            f"<peersearch> holds {len(root.children)} elements: give exactly one of"
            " <and>, <or>, <clause>"
        )
    count = [0]
    return _node(root.children[0], count)


def _no_attrib_or_text(element: XmlElement) -> None:
    if element.attrib:
        raise InvalidSearch(
            f"<{element.tag}> takes no XML attributes (got {shown(sorted(element.attrib))})"
        )
    if element.joined_text().strip():
        raise InvalidSearch(f"<{element.tag}> holds text where elements are expected")


def _node(element: XmlElement, count: list[int]) -> Query:
    if element.tag in ("and", "or"):
        _no_attrib_or_text(element)
        if not element.children:
            raise InvalidSearch(f"<{element.tag}> needs at least one child")
        children = tuple(_node(child, count) for child in element.children)
        return And(children) if element.tag == "and" else Or(children)
    if element.tag != "clause":
        raise InvalidSearch(f"unknown element <{element.tag}>: use <and>, <or>, <clause>")
    count[0] += 1
    if count[0] > MAX_CLAUSES:
        raise InvalidSearch(f"more than {MAX_CLAUSES} clauses")
    extra = set(element.attrib) - {"attrib", "type", "compare"}
    if extra:
        raise InvalidSearch(f"<clause> takes attrib, type and compare (got {shown(sorted(extra))})")
    if element.children:
        raise InvalidSearch("a <clause> holds its value as text, not elements")
    attrib = element.attrib.get("attrib")
    written = element.attrib.get("type")
    if attrib is None or written is None:
        raise InvalidSearch("every <clause> needs attrib and type")
    type_ = attr_type(written)
    if type_ is None:
        raise InvalidSearch(f"clause on {shown(attrib)}: unknown type {shown(written)}")
    compare = _compare(element.attrib.get("compare", "equal"))
    if compare is None:
        raise InvalidSearch(
            f"clause on {shown(attrib)}: unknown compare {shown(element.attrib['compare'])}"
            f" (use {', '.join(COMPARES)})"
        )
    value = element.joined_text()
    if type_ != "string":
        value = value.strip()
        if not value:
            raise InvalidSearch(f"clause on {shown(attrib)}: an {type_} clause needs a value")
    clause = Clause(attrib, type_, compare, value)
    _condition(clause)
    return clause


def _compare(text: str) -> Compare | None:
    for known in COMPARES:
        if text == known:
            return known
    return None


# -- SQL -----------------------------------------------------------------------


def compile_query(query: Query) -> tuple[str, list[object]]:
    """SQL selecting the distinct ``record_id`` values of ``attrs`` that
    *query* matches, and its parameters; InvalidSearch for an invalid clause."""
    sql, params = _compile(query)
    if isinstance(query, Clause):  # one clause: the same record once
        sql = f"SELECT DISTINCT record_id FROM ({sql})"
    return sql, params


def _compile(query: Query) -> tuple[str, list[object]]:
    if isinstance(query, Clause):
        condition, params = _condition(query)
        header = HEADER_COLUMNS.get(query.attrib.casefold())
        if header is None:
            where = condition.format(ival="ival", sval="sval")
            sql = f"SELECT record_id FROM attrs WHERE name = ? AND type = ? AND {where}"
            return sql, [query.attrib.casefold(), query.type, *params]
        column, kind = header
        if kind != query.type:  # a clause of another type matches nothing
            return "SELECT id AS record_id FROM records WHERE 0", []
        where = condition.format(ival=column, sval=column)
        return f"SELECT id AS record_id FROM records WHERE {where}", params
    if not query.children:
        raise InvalidSearch(f"<{type(query).__name__.lower()}> needs at least one child")
    joiner = " INTERSECT " if isinstance(query, And) else " UNION "
    terms: list[tuple[str, list[object]]] = []
    for child in query.children:
        sql, params = _compile(child)
        if not isinstance(child, Clause) and len(child.children) > 1:
            sql = f"SELECT record_id FROM ({sql})"
        terms.append((sql, params))
    while len(terms) > _COMPOUND_CHUNK:
        terms = [
            (
                f"SELECT record_id FROM ({joiner.join(sql for sql, _ in chunk)})",
                [p for _, params in chunk for p in params],
            )
            for chunk in (
                terms[i : i + _COMPOUND_CHUNK] for i in range(0, len(terms), _COMPOUND_CHUNK)
            )
        ]
    return joiner.join(sql for sql, _ in terms), [p for _, params in terms for p in params]
