from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.records.attributes import (
    Attribute,
    derived_attributes,
    format_date,
    normalize_attributes,
    parse_attr_option,
    parse_attributes,
    parse_date,
    render_attributes,
)
from cachefs.records.errors import InvalidAttributes
from cachefs.records.model import RESERVED_ATTRIBUTES, Record


def attrs_xml(*items: str) -> str:
    return "<attributes>" + "".join(items) + "</attributes>"


def attr(name: str, type_: str, value: str) -> str:
    return f'<attribute name="{name}" type="{type_}">{value}</attribute>'


def test_parse_keeps_order_case_and_types() -> None:
    xml = attrs_xml(
        attr("Owner", "string", "Ann &amp; Bob"),
        attr("size", "int", " -42 "),
        attr("when", "date", "2026-12-06T08:00:00.5+01:00"),
    )
    assert parse_attributes(xml) == (
        Attribute("Owner", "string", "Ann & Bob"),
        Attribute("size", "int", -42),
        Attribute("when", "date", datetime(2026, 12, 6, 7, 0, 0, 500000, tzinfo=UTC)),
    )


@pytest.mark.parametrize("xml", ["", "   \n", "<attributes/>", "<attributes>\n  </attributes>"])
def test_no_attributes(xml: str) -> None:
    assert parse_attributes(xml) == ()


def test_string_values_are_kept_exactly() -> None:
    xml = attrs_xml(attr("a", "string", "  two  words\n"), attr("b", "string", ""))
    assert [a.value for a in parse_attributes(xml)] == ["  two  words\n", ""]
    cdata = attrs_xml(attr("c", "string", "<![CDATA[<x> & y]]>"))
    assert parse_attributes(cdata)[0].value == "<x> & y"


def test_int_bounds() -> None:
    lo, hi = -(1 << 63), (1 << 63) - 1
    xml = attrs_xml(attr("lo", "int", str(lo)), attr("hi", "int", f"+{hi}"))
    assert [a.value for a in parse_attributes(xml)] == [lo, hi]


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<attributes><attribute name="a" type="string">&lol4;</attribute></attributes>"""

EXTERNAL_ENTITY = """<?xml version="1.0"?>
<!DOCTYPE attributes [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<attributes><attribute name="a" type="string">&x;</attribute></attributes>"""

BAD_ATTRIBUTES = {
    "not well-formed": "<attributes><attribute name='a' type='int'>5</attributes>",
    "not XML at all": "owner=ann",
    "two top elements": "<attributes/><attributes/>",
    "root": "<attrs/>",
    "root with XML attributes": '<attributes version="1"/>',
    "text in root": "<attributes>hello</attributes>",
    "unknown element": attrs_xml("<attr name='a' type='int'>5</attr>"),
    "nested element in value": attrs_xml(attr("a", "string", "<b>x</b>")),
    "missing name": attrs_xml("<attribute type='int'>5</attribute>"),
    "missing type": attrs_xml("<attribute name='a'>5</attribute>"),
    "extra XML attribute": attrs_xml("<attribute name='a' type='int' unit='kb'>5</attribute>"),
    "unknown type": attrs_xml(attr("a", "float", "1.5")),
    "empty name": attrs_xml(attr("", "int", "5")),
    "name with a dash": attrs_xml(attr("a-b", "int", "5")),
    "name with a space": attrs_xml(attr("a b", "int", "5")),
    "non-ASCII name": attrs_xml(attr("größe", "int", "5")),
    "name too long": attrs_xml(attr("a" * 65, "int", "5")),
    "reserved name": attrs_xml(attr("peercreatorid", "string", "m1")),
    "reserved name in another case": attrs_xml(attr("PeerRecordId", "string", "x")),
    "duplicate name": attrs_xml(attr("size", "int", "1"), attr("SIZE", "int", "2")),
    "int with letters": attrs_xml(attr("a", "int", "5x")),
    "int with fraction": attrs_xml(attr("a", "int", "1.5")),
    "int with underscore": attrs_xml(attr("a", "int", "1_000")),
    "int in Arabic digits": attrs_xml(attr("a", "int", "١٢")),
    "empty int": attrs_xml(attr("a", "int", "")),
    "int above 64 bits": attrs_xml(attr("a", "int", str(1 << 63))),
    "int below 64 bits": attrs_xml(attr("a", "int", str(-(1 << 63) - 1))),
    "date not a date": attrs_xml(attr("a", "date", "yesterday")),
    "date month 13": attrs_xml(attr("a", "date", "2026-13-01")),
    "date hour 25": attrs_xml(attr("a", "date", "2026-12-31T25:00Z")),
    "date zone +24:00": attrs_xml(attr("a", "date", "2026-12-31T07:00+24:00")),
    "date year 0": attrs_xml(attr("a", "date", "0000")),
    "date out of range after zone": attrs_xml(attr("a", "date", "0001-01-01T00:00+01:00")),
    "string too long": attrs_xml(attr("a", "string", "x" * (64 * 1024 + 1))),
    "billion laughs": BILLION_LAUGHS,
    "external entity": EXTERNAL_ENTITY,
    "DTD without entities": "<!DOCTYPE attributes><attributes/>",
    "undeclared entity": attrs_xml(attr("a", "string", "&lol;")),
    "too deep": "<attributes>" + "<x>" * 40 + "</x>" * 40 + "</attributes>",
    "larger than 1 MiB": attrs_xml(*(attr(f"a{i}", "string", "x" * 60000) for i in range(20))),
}


@pytest.mark.parametrize("xml", BAD_ATTRIBUTES.values(), ids=BAD_ATTRIBUTES.keys())
def test_invalid_attributes(xml: str) -> None:
    with pytest.raises(InvalidAttributes) as info:
        parse_attributes(xml)
    message = str(info.value)
    assert message.startswith("INVALID_ATTRIBUTES: ")
    assert "\n" not in message


@pytest.mark.parametrize("xml", [BILLION_LAUGHS, EXTERNAL_ENTITY])
def test_entities_are_refused_not_expanded(xml: str) -> None:
    with pytest.raises(InvalidAttributes, match="DTD or an entity"):
        parse_attributes(xml)


def test_reserved_names_allowed_when_asked() -> None:
    xml = attrs_xml(attr("peercreatorid", "string", "m1"))
    assert parse_attributes(xml, allow_reserved=True) == (
        Attribute("peercreatorid", "string", "m1"),
    )


def test_render_is_canonical() -> None:
    attrs = (
        Attribute("size", "int", 5),
        Attribute("owner", "string", "a<b & c>d\r\n"),
        Attribute("when", "date", datetime(2026, 12, 6, 8, 0, tzinfo=timezone(timedelta(hours=1)))),
        Attribute("t", "date", datetime(2026, 12, 6, 7, 0, 0, 1, tzinfo=UTC)),
    )
    assert render_attributes(attrs) == (
        '<attributes><attribute name="size" type="int">5</attribute>'
        '<attribute name="owner" type="string">a&lt;b &amp; c&gt;d&#13;\n</attribute>'
        '<attribute name="when" type="date">2026-12-06T07:00:00Z</attribute>'
        '<attribute name="t" type="date">2026-12-06T07:00:00.000001Z</attribute></attributes>'
    )
    assert parse_attributes(render_attributes(attrs)) == attrs
    assert render_attributes(()) == ""


def test_normalize() -> None:
    xml = """<?xml version="1.0" encoding="utf-8"?>
    <attributes>
      <attribute type="int" name="size"> 007 </attribute>
      <attribute name="when" type="date">2026</attribute>
    </attributes>"""
    assert normalize_attributes(xml) == (
        '<attributes><attribute name="size" type="int">7</attribute>'
        '<attribute name="when" type="date">2026-01-01T00:00:00Z</attribute></attributes>'
    )
    assert normalize_attributes("") == ""


names = st.text("abcXYZ019", min_size=1, max_size=8)
xml_text = st.text(
    st.one_of(
        st.sampled_from("\t\n\r &<>\"']"),
        st.characters(
            min_codepoint=0x20, exclude_categories=("Cs",), exclude_characters="\ufffe\uffff"
        ),
    ),
    max_size=20,
)
instants = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
values = st.one_of(
    st.tuples(st.just("string"), xml_text),
    st.tuples(st.just("int"), st.integers(-(1 << 63), (1 << 63) - 1)),
    st.tuples(st.just("date"), instants),
)


@settings(max_examples=200)
@given(st.dictionaries(names, values, max_size=6))
def test_render_then_parse_round_trips(items: dict[str, tuple[str, object]]) -> None:
    unique = {name.casefold(): (name, v) for name, v in items.items()}
    attrs = tuple(Attribute(name, t, v) for name, (t, v) in unique.values())  # type: ignore[arg-type]
    text = render_attributes(attrs)
    assert parse_attributes(text) == attrs
    assert render_attributes(parse_attributes(text)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-12", datetime(2026, 12, 1, tzinfo=UTC)),
        ("2026-12-31", datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T07:30", datetime(2026, 12, 31, 7, 30, tzinfo=UTC)),
        ("2026-12-31T07:30Z", datetime(2026, 12, 31, 7, 30, tzinfo=UTC)),
        ("2026-12-31T07:30+01:00", datetime(2026, 12, 31, 6, 30, tzinfo=UTC)),
        ("2026-12-31T23:30-01:30", datetime(2027, 1, 1, 1, 0, tzinfo=UTC)),
        ("2026-12-31T07:30:15Z", datetime(2026, 12, 31, 7, 30, 15, tzinfo=UTC)),
        ("2026-12-31T07:30:15.5Z", datetime(2026, 12, 31, 7, 30, 15, 500000, tzinfo=UTC)),
        ("2026-12-31T07:30:15.1234567Z", datetime(2026, 12, 31, 7, 30, 15, 123456, tzinfo=UTC)),
    ],
)
def test_parse_date_w3c_forms(text: str, expected: datetime) -> None:
    assert parse_date(text) == expected
    assert parse_date(text).tzinfo == UTC


@pytest.mark.parametrize(
    "text",
    [
        "",
        "26",
        "2026-1-1",
        "2026-12-31T07",
        "2026-12-31 07:30Z",
        "2026-12-31T07:30:15.Z",
        "2026-12-31Z",
        "2026-12-31T07:30+0100",
        "2026-02-30",
        "2026-12-31T07:60Z",
        "2026-12-31T07:30:60Z",
        "2026-12-31t07:30z",
        "２０２６",
    ],
)
def test_parse_date_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_date(text)


def test_format_date() -> None:
    assert format_date(datetime(2026, 12, 6, 7, tzinfo=UTC)) == "2026-12-06T07:00:00Z"
    assert format_date(datetime(2026, 12, 6, 7, 0, 0, 1, tzinfo=UTC)) == (
        "2026-12-06T07:00:00.000001Z"
    )
    assert format_date(datetime(33, 1, 2, 3, 4, 5)) == "0033-01-02T03:04:05Z"
    east = datetime(2026, 12, 6, 8, tzinfo=timezone(timedelta(hours=1)))
    assert format_date(east) == "2026-12-06T07:00:00Z"


@settings(max_examples=200)
@given(instants)
def test_format_then_parse_date_round_trips(t: datetime) -> None:
    assert parse_date(format_date(t)) == t


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("size:int=5", Attribute("size", "int", 5)),
        ("size:int=-5", Attribute("size", "int", -5)),
        ("size:int=1M", Attribute("size", "int", 1 << 20)),
        ("size:int=1.5KiB", Attribute("size", "int", 1536)),
        ("owner:string=ann", Attribute("owner", "string", "ann")),
        ("owner=ann", Attribute("owner", "string", "ann")),
        ("owner=", Attribute("owner", "string", "")),
        ("eq=a=b", Attribute("eq", "string", "a=b")),
        ("when:date=2026-12-31", Attribute("when", "date", datetime(2026, 12, 31, tzinfo=UTC))),
    ],
)
def test_parse_attr_option(text: str, expected: Attribute) -> None:
    assert parse_attr_option(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "owner",
        "=ann",
        "own er=ann",
        "size:float=1.5",
        "size:int=5Q",
        "size:int=1.5",
        "size:int=8E",
        "size:int=9000000T",
        "long=" + "x" * (64 * 1024 + 1),
        "size:int=",
        "when:date=tomorrow",
        "peercreatorid=m1",
        "PeerRecordId:string=x",
    ],
)
def test_parse_attr_option_refuses(text: str) -> None:
    with pytest.raises(InvalidAttributes) as info:
        parse_attr_option(text)
    assert repr(text[:20])[:-1] in str(info.value)
    assert "\n" not in str(info.value)


def test_attribute_checks_its_value() -> None:
    naive = Attribute("when", "date", datetime(2026, 1, 1))
    assert naive.value == datetime(2026, 1, 1, tzinfo=UTC)
    for bad in [
        ("a", "int", True),
        ("a", "int", "5"),
        ("a", "int", 1 << 63),
        ("a", "string", 5),
        ("a", "string", "bell\x07"),
        ("a", "date", "2026"),
        ("a", "date", datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))),
        ("a", "float", 1.5),
        ("a b", "string", "x"),
    ]:
        with pytest.raises(InvalidAttributes):
            Attribute(*bad)  # type: ignore[arg-type]


def test_derived_attributes() -> None:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    modified = datetime(2026, 1, 2, tzinfo=UTC)
    record = Record(
        type=uuid.UUID(int=1),
        expires=datetime(2027, 1, 1, tzinfo=UTC),
        id=uuid.UUID(int=2),
        creator="mcreator",
        modified_by="mmodifier",
        created=created,
        modified=modified,
    )
    derived = derived_attributes(record)
    assert {a.name for a in derived} == RESERVED_ATTRIBUTES
    assert set(derived) == {
        Attribute("peerrecordid", "string", str(uuid.UUID(int=2))),
        Attribute("peerrecordtype", "string", str(uuid.UUID(int=1))),
        Attribute("peercreatorid", "string", "mcreator"),
        Attribute("peerlastmodifiedby", "string", "mmodifier"),
        Attribute("peercreationtime", "date", created),
        Attribute("peerlastmodificationtime", "date", modified),
    }
    # they render and parse back, but only where reserved names are allowed
    assert parse_attributes(render_attributes(derived), allow_reserved=True) == derived
    with pytest.raises(InvalidAttributes):
        parse_attributes(render_attributes(derived))
