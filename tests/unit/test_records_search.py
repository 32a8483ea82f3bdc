from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from xml.sax.saxutils import escape

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.records.attributes import Attribute, derived_attributes
from cachefs.records.errors import InvalidSearch
from cachefs.records.model import Record, micros
from cachefs.records.search import (
    ATTRS_SCHEMA,
    And,
    Clause,
    Or,
    Query,
    compile_query,
    index_rows,
    parse_search,
)
from cachefs.records.where import where_to_xml

# -- helpers -------------------------------------------------------------------


def open_index() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    for statement in ATTRS_SCHEMA:
        db.execute(statement)
    db.execute(
        "CREATE TABLE records (id TEXT PRIMARY KEY, type TEXT, creator TEXT, "
        "modified_by TEXT, created INTEGER, modified INTEGER)"
    )
    return db


def store(db: sqlite3.Connection, records: dict[str, Sequence[Attribute]]) -> None:
    for rid, attrs in records.items():
        db.execute("INSERT INTO records (id) VALUES (?)", (rid,))
        db.executemany("INSERT INTO attrs VALUES (?,?,?,?,?)", index_rows(rid, attrs))


def found(db: sqlite3.Connection, query: Query | str) -> set[str]:
    if isinstance(query, str):
        query = parse_search(query)
    sql, params = compile_query(query)
    rows = db.execute(f"SELECT id FROM records WHERE id IN ({sql})", params).fetchall()
    return {r[0] for r in rows}


def search(body: str) -> str:
    return f"<peersearch>{body}</peersearch>"


def clause(attrib: str, type_: str, value: str, compare: str | None = None) -> str:
    compare_attr = "" if compare is None else f' compare="{compare}"'
    return f'<clause attrib="{attrib}" type="{type_}"{compare_attr}>{value}</clause>'


@pytest.fixture
def db() -> Iterator[sqlite3.Connection]:
    db = open_index()
    store(
        db,
        {
            "ann": [
                Attribute("Owner", "string", "Ann Smith"),
                Attribute("size", "int", 2 << 20),
                Attribute("when", "date", datetime(2026, 6, 15, 12, tzinfo=UTC)),
                Attribute("pattern", "string", "a*b?c\\d[e]"),
            ],
            "bob": [
                Attribute("owner", "string", "bob"),
                Attribute("size", "int", 512),
                Attribute("when", "date", datetime(2026, 1, 1, tzinfo=UTC)),
            ],
            "carl": [Attribute("size", "string", "5"), Attribute("owner", "string", "ANNA")],
            "dora": [],
        },
    )
    yield db
    db.close()


# -- parsing -------------------------------------------------------------------


def test_parse_structure_and_default_compare() -> None:
    xml = search(
        "<and>\n  "
        + clause("size", "int", " 5 ", "greater")
        + "<or>"
        + clause("owner", "string", "ann*")
        + clause("when", "date", "2026", "less")
        + "</or></and>"
    )
    assert parse_search(xml) == And(
        (
            Clause("size", "int", "greater", "5"),
            Or(
                (
                    Clause("owner", "string", "equal", "ann*"),
                    Clause("when", "date", "less", "2026"),
                )
            ),
        )
    )


def test_string_value_may_be_empty_and_is_kept_exactly() -> None:
    assert parse_search(search(clause("a", "string", ""))) == Clause("a", "string", "equal", "")
    assert parse_search(search(clause("a", "string", " x "))).value == " x "  # type: ignore[union-attr]


BAD_SEARCHES = {
    "empty": "",
    "not well-formed": "<peersearch><clause attrib='a' type='int'>5</peersearch>",
    "not XML": "size > 5",
    "root": "<search>" + clause("a", "int", "5") + "</search>",
    "root with XML attributes": '<peersearch v="1">' + clause("a", "int", "5") + "</peersearch>",
    "no top element": search(""),
    "two top elements": search(clause("a", "int", "5") + clause("b", "int", "6")),
    "two documents": search(clause("a", "int", "5")) + search(clause("a", "int", "5")),
    "text at the top": search("hello" + clause("a", "int", "5")),
    "unknown element": search("<not>" + clause("a", "int", "5") + "</not>"),
    "unknown nested element": search("<and><clause2 attrib='a' type='int'>5</clause2></and>"),
    "and with no child": search("<and/>"),
    "or with no child": search("<and>" + clause("a", "int", "5") + "<or> </or></and>"),
    "text inside and": search("<and>x" + clause("a", "int", "5") + "</and>"),
    "XML attribute on or": search('<or x="1">' + clause("a", "int", "5") + "</or>"),
    "missing attrib": search("<clause type='int'>5</clause>"),
    "missing type": search("<clause attrib='a'>5</clause>"),
    "unknown type": search(clause("a", "float", "1.5")),
    "unknown XML attribute": search("<clause attrib='a' type='int' case='yes'>5</clause>"),
    "bad compare": search(clause("a", "int", "5", "like")),
    "compare in capitals": search(clause("a", "int", "5", "EQUAL")),
    "bad attrib name": search(clause("a-b", "int", "5")),
    "element inside clause": search(clause("a", "string", "<b/>")),
    "int without value": search(clause("a", "int", " ")),
    "int not a number": search(clause("a", "int", "five")),
    "int with fraction": search(clause("a", "int", "1.5")),
    "int with size suffix": search(clause("a", "int", "1M")),
    "int above 64 bits": search(clause("a", "int", str(1 << 63))),
    "int with a wildcard": search(clause("a", "int", "5*")),
    "date without value": search(clause("a", "date", "")),
    "date not a date": search(clause("a", "date", "tomorrow")),
    "date month 13": search(clause("a", "date", "2026-13")),
    "date with a wildcard": search(clause("a", "date", "2026-*")),
    "bad escape": search(clause("a", "string", "a\\b")),
    "escaped quote": search(clause("a", "string", '\\"')),
    "trailing backslash": search(clause("a", "string", "ab\\")),
    "star with less": search(clause("a", "string", "ab*", "less")),
    "question mark with greaterorequal": search(clause("a", "string", "a?", "greaterorequal")),
    "DTD": '<!DOCTYPE peersearch [<!ENTITY a "size">]>'
    + search("<clause attrib='&a;' type='int'>5</clause>"),
    "too deep": search("<and>" * 32 + clause("a", "int", "5") + "</and>" * 32),
    "too many clauses": search("<or>" + clause("a", "int", "5") * 1001 + "</or>"),
    "larger than 1 MiB": search("<or>" + clause("a", "string", "x" * 1000) * 1100 + "</or>"),
}


@pytest.mark.parametrize("xml", BAD_SEARCHES.values(), ids=BAD_SEARCHES.keys())
def test_invalid_search(xml: str) -> None:
    with pytest.raises(InvalidSearch) as info:
        parse_search(xml)
    message = str(info.value)
    assert message.startswith("INVALID_SEARCH: ")
    assert "\n" not in message
    assert len(message) < 300


def test_entities_are_refused_not_expanded() -> None:
    laughs = (
        '<!DOCTYPE peersearch [<!ENTITY l "lol"><!ENTITY l2 "&l;&l;&l;&l;&l;&l;&l;&l;">'
        '<!ENTITY l3 "&l2;&l2;&l2;&l2;&l2;&l2;&l2;&l2;">]>' + search(clause("a", "string", "&l3;"))
    )
    with pytest.raises(InvalidSearch, match="DTD or an entity"):
        parse_search(laughs)


def test_limits_are_inclusive() -> None:
    deepest = search("<and>" * 30 + clause("a", "int", "5") + "</and>" * 30)
    assert isinstance(parse_search(deepest), And)
    widest = parse_search(search("<or>" + clause("a", "int", "5") * 1000 + "</or>"))
    assert isinstance(widest, Or)
    assert len(widest.children) == 1000


def test_compile_refuses_what_parse_refuses() -> None:
    for query in [
        Clause("a", "int", "equal", "x"),
        Clause("a b", "string", "equal", "x"),
        Clause("a", "string", "less", "x*"),
        And(()),
    ]:
        with pytest.raises(InvalidSearch):
            compile_query(query)


# -- what a query finds --------------------------------------------------------


@pytest.mark.parametrize(
    ("xml", "ids"),
    [
        # names are case-insensitive, string values too
        (search(clause("OWNER", "string", "ann smith")), {"ann"}),
        (search(clause("owner", "string", "ANN*")), {"ann", "carl"}),
        (search(clause("owner", "string", "ann?")), {"carl"}),
        (search(clause("owner", "string", "*")), {"ann", "bob", "carl"}),
        (search(clause("owner", "string", "ann*", "notequal")), {"bob"}),
        (search(clause("owner", "string", "bob", "notequal")), {"ann", "carl"}),
        # a missing attribute never matches, notequal included
        (search(clause("pattern", "string", "x", "notequal")), {"ann"}),
        (search(clause("nothere", "string", "*", "notequal")), set()),
        # a clause matches only attributes of its own type
        (search(clause("size", "int", "5")), set()),
        (search(clause("size", "string", "5")), {"carl"}),
        (search(clause("size", "int", "512", "notequal")), {"ann"}),
        (search(clause("size", "int", "1024", "greater")), {"ann"}),
        (search(clause("size", "int", "512", "lessorequal")), {"bob"}),
        (search(clause("size", "int", "512", "greaterorequal")), {"ann", "bob"}),
        # escapes make wildcards and backslashes literal; GLOB's [ ] are literal too
        (search(clause("pattern", "string", "a\\*b\\?c\\\\d[e]")), {"ann"}),
        (search(clause("pattern", "string", "a\\*b\\?c\\\\d[E]")), {"ann"}),
        (search(clause("pattern", "string", "a\\*b\\?c\\\\d[?]")), {"ann"}),
        (search(clause("pattern", "string", "*[e*")), {"ann"}),
        (search(clause("pattern", "string", "a*e")), set()),
        (search(clause("pattern", "string", "ab*")), set()),
        (search(clause("pattern", "string", "a\\*", "greater")), {"ann"}),
        # strings order by their casefolded text
        (search(clause("owner", "string", "B", "less")), {"ann", "carl"}),
        # dates compare as instants; no zone is UTC; a partial date is its first instant
        (search(clause("when", "date", "2026")), {"bob"}),
        (search(clause("when", "date", "2026-06-15T14:00+02:00")), {"ann"}),
        (search(clause("when", "date", "2026-06-15T12:00")), {"ann"}),
        (search(clause("when", "date", "2026-02", "greaterorequal")), {"ann"}),
        (
            search(
                "<and>"
                + clause("when", "date", "2026", "greaterorequal")
                + clause("when", "date", "2027", "less")
                + "</and>"
            ),
            {"ann", "bob"},
        ),
        (
            search(
                "<or>" + clause("size", "int", "512") + clause("owner", "string", "a*") + "</or>"
            ),
            {"ann", "bob", "carl"},
        ),
        (
            search(
                "<and><or>"
                + clause("size", "int", "512")
                + clause("owner", "string", "a*")
                + "</or>"
                + clause("size", "int", "0", "greater")
                + "</and>"
            ),
            {"ann", "bob"},
        ),
    ],
)
def test_semantics(db: sqlite3.Connection, xml: str, ids: set[str]) -> None:
    assert found(db, xml) == ids


def test_reserved_attributes_are_searchable() -> None:
    db = open_index()
    record = Record(
        type=uuid.UUID(int=7),
        expires=datetime(2027, 1, 1, tzinfo=UTC),
        id=uuid.UUID(int=9),
        creator="mcreator",
        modified_by="mcreator",
        created=datetime(2026, 1, 1, tzinfo=UTC),
        modified=datetime(2026, 3, 1, tzinfo=UTC),
    )
    rid = str(record.id)
    head = {a.name: a.value for a in derived_attributes(record)}
    db.execute(
        "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
        (rid, str(record.type), record.creator, record.modified_by)
        + (micros(head["peercreationtime"]), micros(head["peerlastmodificationtime"])),  # type: ignore[arg-type]
    )
    assert found(db, search(clause("peerrecordid", "string", rid.upper()))) == {rid}
    assert found(db, search(clause("PeerCreatorId", "string", "mcreat*"))) == {rid}
    assert found(db, search(clause("peercreationtime", "date", "2026-01-01"))) == {rid}
    later = clause("peerlastmodificationtime", "date", "2026-02", "greater")
    assert found(db, search(later)) == {rid}
    # a clause of another type than the attribute's matches nothing
    assert found(db, search(clause("peercreationtime", "string", "*"))) == set()


def test_a_thousand_clauses_run() -> None:
    db = open_index()
    store(db, {f"r{i}": [Attribute("n", "int", i)] for i in range(0, 2000, 3)})
    wide_or = search("<or>" + "".join(clause("n", "int", str(i)) for i in range(1000)) + "</or>")
    assert found(db, wide_or) == {f"r{i}" for i in range(0, 1000, 3)}
    wide_and = search("<and>" + clause("n", "int", "3") * 1000 + "</and>")
    assert found(db, wide_and) == {"r3"}


@pytest.mark.parametrize(
    ("xml", "detail"),
    [
        (search(clause("size", "int", "5")), "ival=?"),
        (search(clause("size", "int", "5", "less")), "ival<?"),
        (search(clause("size", "int", "5", "greater")), "ival>?"),
        (search(clause("size", "int", "5", "greaterorequal")), "ival>?"),
        (search(clause("when", "date", "2026", "lessorequal")), "ival<?"),
        (search(clause("owner", "string", "Ann")), "sval=?"),
        (search(clause("owner", "string", "b", "greater")), "sval>?"),
        (search(clause("owner", "string", "ann*")), "sval>? AND sval<?"),
        (search(clause("owner", "string", "a\\*b?")), "sval>? AND sval<?"),
        (search(clause("owner", "string", "*ann")), "name=? AND type=?"),
        (search(clause("size", "int", "5", "notequal")), "name=? AND type=?"),
        (
            search(
                "<and>" + clause("size", "int", "5", "less") + clause("o", "string", "a") + "</and>"
            ),
            "ival<?",
        ),
    ],
)
def test_clauses_search_an_index(db: sqlite3.Connection, xml: str, detail: str) -> None:
    sql, params = compile_query(parse_search(xml))
    plan = [
        row[-1]
        for row in db.execute(
            f"EXPLAIN QUERY PLAN SELECT id FROM records WHERE id IN ({sql})", params
        )
    ]
    attrs_steps = [step for step in plan if " attrs " in f"{step} "]
    assert attrs_steps, plan
    for step in attrs_steps:
        assert step.startswith("SEARCH attrs USING "), plan
        assert "INDEX attrs_" in step, plan
    assert any(detail in step for step in attrs_steps), plan
    assert not any(step.startswith("SCAN attrs") for step in plan), plan


# -- --where -------------------------------------------------------------------


def test_where_example_from_the_docs() -> None:
    assert where_to_xml("size>1M and owner=ann*") == (
        '<peersearch><and><clause attrib="size" type="int" compare="greater">1048576</clause>'
        '<clause attrib="owner" type="string" compare="equal">ann*</clause></and></peersearch>'
    )


@pytest.mark.parametrize(
    ("where", "query"),
    [
        ("a=1", Clause("a", "int", "equal", "1")),
        ("a != -2K", Clause("a", "int", "notequal", "-2048")),
        ("a<=1.5KiB", Clause("a", "int", "lessorequal", "1536")),
        ("a>=5b", Clause("a", "int", "greaterorequal", "5")),
        ("a<ann", Clause("a", "string", "less", "ann")),
        ('a="1"', Clause("a", "string", "equal", "1")),
        ("a='it\\'s *'", Clause("a", "string", "equal", "it's *")),
        ('a="say \\"hi\\" \\* \\\\"', Clause("a", "string", "equal", 'say "hi" \\* \\\\')),
        ("a=''", Clause("a", "string", "equal", "")),
        ("a:string=2026-01-01", Clause("a", "string", "equal", "2026-01-01")),
        ("a:int='7'", Clause("a", "int", "equal", "7")),
        ("when>2026-12-31", Clause("when", "date", "greater", "2026-12-31T00:00:00Z")),
        (
            "when<2026-12-31T08:00:00.5+01:00",
            Clause("when", "date", "less", "2026-12-31T07:00:00.500000Z"),
        ),
        ("when:date=2026", Clause("when", "date", "equal", "2026-01-01T00:00:00Z")),
        ("v=1.5.2", Clause("v", "string", "equal", "1.5.2")),
        ("a=1 AND b=2 Or c=3", Or((And((Clause("a", "int", "equal", "1"),
                                       Clause("b", "int", "equal", "2"))),
                                  Clause("c", "int", "equal", "3")))),
        ("a=1 and (b=2 or c=3)", And((Clause("a", "int", "equal", "1"),
                                      Or((Clause("b", "int", "equal", "2"),
                                          Clause("c", "int", "equal", "3")))))),
        ("((a=1))", Clause("a", "int", "equal", "1")),
        ("order=1 or and=2", Or((Clause("order", "int", "equal", "1"),
                                 Clause("and", "int", "equal", "2")))),
        ("a=x and(b=y)", And((Clause("a", "string", "equal", "x"),
                              Clause("b", "string", "equal", "y")))),
    ],
)  # fmt: skip
def test_where(where: str, query: Query) -> None:
    assert parse_search(where_to_xml(where)) == query


@pytest.mark.parametrize(
    "where",
    [
        "",
        "   ",
        "size",
        "size>",
        "size 5",
        ">5",
        "a=1 b=2",
        "a=1 and",
        "a=1 or or b=2",
        "(a=1",
        "a=1)",
        "()",
        "a:float=1",
        "a=1.5",
        "a=9000000T",
        "a:int=ann",
        "a:date=tomorrow",
        "a=2026-13-01",
        "a='open",
        'a="x"y',
        "a<ann*",
        "a=x\\y",
        "a-b=1",
        "(" * 40 + "a=1" + ")" * 40,
        " or ".join(["a=1"] * 1001),
    ],
)
def test_where_refuses(where: str) -> None:
    with pytest.raises(InvalidSearch) as info:
        where_to_xml(where)
    message = str(info.value)
    assert message.startswith("INVALID_SEARCH: ")
    assert "\n" not in message
    assert len(message) < 300


# -- against a plain reference filter ----------------------------------------------

NAMES = ["size", "owner", "tag", "when"]
ALPHABET = "aAbB*?\\[]ßÉé "
# string values records often hold, and queries often aim at
STRINGS = ["", "a", "Ab", "a[b]", "[x", "]", "a*b", "?q", "\\", "x\\*", "ß", "SS", "É*", "b?C"]
strings = st.one_of(st.sampled_from(STRINGS), st.text(ALPHABET, max_size=4))
INTS = [-(1 << 63), -5, 0, 1, 5, 1024, (1 << 63) - 1]
# date text as a query writes it -> the instant it names, as a reference would read it
DATES = {
    "2026": datetime(2026, 1, 1, tzinfo=UTC),
    "2026-06": datetime(2026, 6, 1, tzinfo=UTC),
    "2026-06-15": datetime(2026, 6, 15, tzinfo=UTC),
    "2026-06-15T12:00Z": datetime(2026, 6, 15, 12, tzinfo=UTC),
    "2026-06-15T13:00+01:00": datetime(2026, 6, 15, 12, tzinfo=UTC),
    "2026-06-15T12:00:00.5": datetime(2026, 6, 15, 12, 0, 0, 500000, tzinfo=UTC),
    "2026-06-14T23:30:00-01:30": datetime(2026, 6, 15, 1, 0, tzinfo=UTC),
}
# the same instants in the form where_to_xml writes
CANONICAL = {
    datetime(2026, 1, 1, tzinfo=UTC): "2026-01-01T00:00:00Z",
    datetime(2026, 6, 1, tzinfo=UTC): "2026-06-01T00:00:00Z",
    datetime(2026, 6, 15, tzinfo=UTC): "2026-06-15T00:00:00Z",
    datetime(2026, 6, 15, 12, tzinfo=UTC): "2026-06-15T12:00:00Z",
    datetime(2026, 6, 15, 12, 0, 0, 500000, tzinfo=UTC): "2026-06-15T12:00:00.500000Z",
    datetime(2026, 6, 15, 1, 0, tzinfo=UTC): "2026-06-15T01:00:00Z",
}
COMPARES = ["equal", "notequal", "less", "greater", "lessorequal", "greaterorequal"]
OPS = {"equal": "=", "notequal": "!=", "less": "<", "greater": ">"}
OPS |= {"lessorequal": "<=", "greaterorequal": ">="}

# A query in the test's own terms: ("clause", name, type, compare, value) where value
# is a token list for strings (("lit", c), ("star",), ("one",)), an int, or a date text.
TQuery = tuple


def mixed_case(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda ups: "".join(c.upper() if up else c for c, up in zip(name, ups, strict=True))
    )


@st.composite
def records(draw: st.DrawFn) -> list[Attribute]:
    attrs = []
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4)):
        written = draw(mixed_case(name))
        kind = draw(st.sampled_from(["string", "int", "date"]))
        if kind == "string":
            attrs.append(Attribute(written, "string", draw(strings)))
        elif kind == "int":
            value = draw(st.one_of(st.sampled_from(INTS), st.integers(-10, 10)))
            attrs.append(Attribute(written, "int", value))
        else:
            attrs.append(Attribute(written, "date", draw(st.sampled_from(list(DATES.values())))))
    return attrs


@st.composite
def clauses(draw: st.DrawFn) -> TQuery:
    name = draw(st.sampled_from(NAMES).flatmap(mixed_case))
    kind = draw(st.sampled_from(["string", "int", "date"]))
    compare = draw(st.sampled_from(COMPARES))
    if kind == "int":
        value: object = draw(st.one_of(st.sampled_from(INTS), st.integers(-10, 10)))
    elif kind == "date":
        value = draw(st.sampled_from(list(DATES)))
    else:
        # a pool value with some characters changed in case or into wildcards
        wildcards = compare in ("equal", "notequal")
        edits = ["keep", "swapcase", "one", "star"] if wildcards else ["keep", "swapcase"]
        tokens: list[tuple[str, ...]] = []
        for c in draw(strings):
            edit = draw(st.sampled_from(edits))
            if edit in ("keep", "swapcase"):
                tokens.append(("lit", c if edit == "keep" else c.swapcase()))
            else:
                tokens.append((edit,))
        if wildcards and draw(st.booleans()):
            tokens.insert(draw(st.integers(0, len(tokens))), ("star",))
        value = tuple(tokens)
    return ("clause", name, kind, compare, value)


def queries(min_children: int = 1) -> st.SearchStrategy[TQuery]:
    return st.recursive(
        clauses(),
        lambda children: st.tuples(
            st.sampled_from(["and", "or"]),
            st.lists(children, min_size=min_children, max_size=3).map(tuple),
        ),
        max_leaves=8,
    )


def value_text(tokens: tuple[tuple[str, ...], ...]) -> str:
    """A string clause's value as a query writes it (escapes where needed)."""
    out = []
    for token in tokens:
        if token[0] == "star":
            out.append("*")
        elif token[0] == "one":
            out.append("?")
        else:
            c = token[1]
            out.append("\\" + c if c in "*?\\" else c)
    return "".join(out)


def to_xml(q: TQuery) -> str:
    if q[0] == "clause":
        _, name, kind, compare, value = q
        if kind == "string":
            text = value_text(value)
        elif kind == "int":
            text = str(value)
        else:
            text = value
        return clause(name, kind, escape(text), compare)
    return f"<{q[0]}>{''.join(to_xml(c) for c in q[1])}</{q[0]}>"


def wild_match(tokens: list[tuple[str, ...]], text: str) -> bool:
    """Does the whole of *text* match *tokens*, one character at a time?"""
    if not tokens:
        return text == ""
    head, rest = tokens[0], tokens[1:]
    if head[0] == "star":
        return any(wild_match(rest, text[i:]) for i in range(len(text) + 1))
    if not text:
        return False
    if head[0] == "one" or head[1] == text[0]:
        return wild_match(rest, text[1:])
    return False


def holds(compare: str, left: object, right: object) -> bool:
    return {
        "equal": left == right,
        "notequal": left != right,
        "less": left < right,  # type: ignore[operator]
        "greater": left > right,  # type: ignore[operator]
        "lessorequal": left <= right,  # type: ignore[operator]
        "greaterorequal": left >= right,  # type: ignore[operator]
    }[compare]


def reference(q: TQuery, attrs: list[Attribute]) -> bool:
    if q[0] == "and":
        return all(reference(c, attrs) for c in q[1])
    if q[0] == "or":
        return any(reference(c, attrs) for c in q[1])
    _, name, kind, compare, value = q
    held = [a for a in attrs if a.name.casefold() == name.casefold() and a.type == kind]
    if not held:
        return False
    have = held[0].value
    if kind == "int":
        return holds(compare, have, value)
    if kind == "date":
        return holds(compare, have, DATES[value])
    assert isinstance(have, str)
    # literal characters casefold one by one (ß becomes s s)
    tokens: list[tuple[str, ...]] = []
    for t in value:
        if t[0] == "lit":
            tokens.extend(("lit", c) for c in t[1].casefold())
        else:
            tokens.append(t)
    if any(t[0] != "lit" for t in tokens):
        matched = wild_match(tokens, have.casefold())
        return matched if compare == "equal" else not matched
    return holds(compare, have.casefold(), "".join(t[1] for t in tokens))


@settings(max_examples=200, deadline=None)
@given(st.lists(records(), max_size=8), queries())
def test_search_agrees_with_a_reference_filter(stored: list[list[Attribute]], q: TQuery) -> None:
    db = open_index()
    store(db, {f"r{i}": attrs for i, attrs in enumerate(stored)})
    expected = {f"r{i}" for i, attrs in enumerate(stored) if reference(q, attrs)}
    assert found(db, search(to_xml(q))) == expected


def to_where(q: TQuery, typed: bool) -> str:
    if q[0] in ("and", "or"):
        return f" {q[0]} ".join(
            f"({to_where(c, typed)})" if c[0] != "clause" else to_where(c, typed) for c in q[1]
        )
    _, name, kind, compare, value = q
    head = f"{name}:{kind}" if typed else name
    if kind == "string":
        text = '"' + value_text(value).replace('"', '\\"') + '"'
    elif kind == "int":
        text = str(value)
    else:
        text = value if typed or len(value) >= 10 else f"{value}-01-01"[:10]
    return f"{head} {OPS[compare]} {text}"


def canonical(q: TQuery, typed: bool) -> TQuery:
    """*q* as where_to_xml writes it back (dates in UTC with seconds)."""
    if q[0] in ("and", "or"):
        return (q[0], tuple(canonical(c, typed) for c in q[1]))
    _, name, kind, compare, value = q
    if kind == "date":
        value = CANONICAL[DATES[value]]
    return ("clause", name, kind, compare, value)


@settings(max_examples=120, deadline=None)
@given(st.lists(records(), max_size=5), queries(min_children=2), st.booleans())
def test_where_compiles_to_the_same_query(
    stored: list[list[Attribute]], q: TQuery, typed: bool
) -> None:
    where = to_where(q, typed)
    compiled = parse_search(where_to_xml(where))
    assert compiled == parse_search(search(to_xml(canonical(q, typed))))
    db = open_index()
    store(db, {f"r{i}": attrs for i, attrs in enumerate(stored)})
    expected = {f"r{i}" for i, attrs in enumerate(stored) if reference(q, attrs)}
    assert found(db, compiled) == expected


@st.composite
def aimed_patterns(draw: st.DrawFn, values: list[str]) -> tuple[tuple[str, ...], ...]:
    """A wildcard pattern made from one of *values*: some characters change case
    or become wildcards, and a ``*`` may be added."""
    tokens: list[tuple[str, ...]] = []
    for c in draw(st.sampled_from(values)) if values else "":
        edit = draw(st.sampled_from(["keep", "keep", "swapcase", "one", "star"]))
        if edit in ("keep", "swapcase"):
            tokens.append(("lit", c if edit == "keep" else c.swapcase()))
        else:
            tokens.append((edit,))
    if draw(st.booleans()):
        tokens.insert(draw(st.integers(0, len(tokens))), ("star",))
    return tuple(tokens)


@settings(max_examples=200, deadline=None)
@given(
    st.data(), st.lists(strings, min_size=1, max_size=10), st.sampled_from(["equal", "notequal"])
)
def test_wildcards_agree_with_a_reference_matcher(
    data: st.DataObject, values: list[str], compare: str
) -> None:
    pattern = data.draw(aimed_patterns(values))
    q = ("clause", "s", "string", compare, pattern)
    stored = [[Attribute("s", "string", v)] for v in values]
    db = open_index()
    store(db, {f"r{i}": attrs for i, attrs in enumerate(stored)})
    expected = {f"r{i}" for i, attrs in enumerate(stored) if reference(q, attrs)}
    assert found(db, search(to_xml(q))) == expected
