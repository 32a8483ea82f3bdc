"""``--where``: the shell-friendly form of a ``<peersearch>`` query.

``size>1M and (owner=ann* or owner="bob smith")`` compiles to the same XML
a user would write by hand (see cachefs.records.search for what a query
means).  ``and`` binds tighter than ``or`` (both case-insensitive),
parentheses group; operators are = != < > <= >=.  A value's type follows
its form: quoted is a string, a number (with an optional K/M/G/T/P size
suffix, 1024 powers) an int, ``YYYY-MM-DD[Thh:mm[:ss[.s]][TZD]]`` a date,
anything else a string (a number that is not whole, ``1.5``, is
INVALID_SEARCH: quote it); a name can force its type (``size:int>5``,
``tag:string=2026-01-01``).  Quoted strings take ``\\"`` and ``\\'``;
wildcards and their escapes apply inside quotes as outside.
"""

from __future__ import annotations

import re
from typing import NoReturn

from cachefs.records.attributes import (
    MAX_XML_BYTES,
    SIZE_INT,
    AttrType,
    attr_type,
    escape_text,
    format_date,
    parse_date,
    parse_size_int,
    shown,
)
from cachefs.records.errors import InvalidSearch
from cachefs.records.search import And, Clause, Compare, Or, Query, parse_search

__all__ = ["where_to_xml"]

_COMPARISON = re.compile(r"([A-Za-z0-9]+)(?::([A-Za-z]*))?\s*(!=|<=|>=|=|<|>)\s*")
_KEYWORD = re.compile(r"(and|or)(?=[\s(]|$)", re.IGNORECASE)
_UNQUOTED = re.compile(r"""[^\s()"']+""")
_WHERE_DATE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:T[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?(?:Z|[+-][0-9]{2}:[0-9]{2})?)?"
)
_WHERE_OPS: dict[str, Compare] = {
    "=": "equal",
    "!=": "notequal",
    "<": "less",
    ">": "greater",
    "<=": "lessorequal",
    ">=": "greaterorequal",
}
_MAX_PARENS = 30


def where_to_xml(text: str) -> str:
    """The ``<peersearch>`` XML of a ``--where`` expression; InvalidSearch
    (naming the place) if it is not one."""
    if len(text) > MAX_XML_BYTES:
        raise InvalidSearch("--where: longer than 1 MiB")
    parser = _Where(text)
    query = parser.expr()
    parser.skip()
    if parser.pos != len(text):
        parser.fail("expected and, or or the end")
    xml = f"<peersearch>{_to_xml(query)}</peersearch>"
    parse_search(xml)  # the limits and value checks of every query
    return xml


def _to_xml(query: Query) -> str:
    if isinstance(query, Clause):
        return (
            f'<clause attrib="{query.attrib}" type="{query.type}" compare="{query.compare}">'
            f"{escape_text(query.value)}</clause>"
        )
    tag = "and" if isinstance(query, And) else "or"
    return f"<{tag}>{''.join(_to_xml(child) for child in query.children)}</{tag}>"


class _Where:
    """A recursive-descent parser of one ``--where`` expression."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, what: str) -> NoReturn:
        near = repr(self.text[self.pos : self.pos + 24]) if self.pos < len(self.text) else "the end"
        raise InvalidSearch(f"--where: {what} at {near}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def keyword(self, word: str) -> bool:
        self.skip()
        match = _KEYWORD.match(self.text, self.pos)
        if match is None or match[1].lower() != word:
            return False
        self.pos = match.end()
        return True

    def expr(self) -> Query:
        children = [self.term()]
        while self.keyword("or"):
            children.append(self.term())
        return children[0] if len(children) == 1 else Or(tuple(children))

    def term(self) -> Query:
        children = [self.factor()]
        while self.keyword("and"):
            children.append(self.factor())
        return children[0] if len(children) == 1 else And(tuple(children))

    def factor(self) -> Query:
        self.skip()
        if self.text.startswith("(", self.pos):
            if self.depth >= _MAX_PARENS:
                self.fail(f"parentheses nested deeper than {_MAX_PARENS}")
            self.pos += 1
            self.depth += 1
            query = self.expr()
            self.skip()
            if not self.text.startswith(")", self.pos):
                self.fail("expected )")
            self.pos += 1
            self.depth -= 1
            return query
        match = _COMPARISON.match(self.text, self.pos)
        if match is None:
            self.fail("expected a comparison such as size>1M or owner=ann")
        name, written, op = match.groups()
        forced = None if written is None else attr_type(written)
        if written is not None and forced is None:
            self.fail(f"unknown type {shown(written)} (use string, int or date)")
        self.pos = match.end()
        quoted, raw = self.value()
        type_, value = self.typed(forced, quoted, raw)
        return Clause(name, type_, _WHERE_OPS[op], value)

    def value(self) -> tuple[bool, str]:
        """(quoted, text) of the value at the current position."""
        quote = self.text[self.pos : self.pos + 1]
        if quote in ('"', "'"):
            out = []
            i = self.pos + 1
            while i < len(self.text) and self.text[i] != quote:
                c = self.text[i]
                if c == "\\" and i + 1 < len(self.text):
                    following = self.text[i + 1]
                    out.append(following if following in "\"'" else c + following)
                    i += 2
                else:
                    out.append(c)
                    i += 1
            if i >= len(self.text):
                self.fail("unterminated quoted string")
            self.pos = i + 1
            return True, "".join(out)
        match = _UNQUOTED.match(self.text, self.pos)
        if match is None:
            self.fail("expected a value")
        self.pos = match.end()
        return False, match[0]

    def typed(self, forced: AttrType | None, quoted: bool, raw: str) -> tuple[AttrType, str]:
        """The type and XML value text of a comparison's value."""
        if forced == "string" or (forced is None and quoted):
            return "string", raw
        if forced == "int" or (forced is None and SIZE_INT.fullmatch(raw)):
            try:
                return "int", str(parse_size_int(raw.strip()))
            except ValueError as e:
                hint = "" if forced else " (quote a value to compare it as a string)"
                self.fail(f"{e}{hint}")
        if forced == "date" or (forced is None and _WHERE_DATE.fullmatch(raw)):
            try:
                return "date", format_date(parse_date(raw.strip()))
            except ValueError as e:
                self.fail(str(e))
        return "string", raw
