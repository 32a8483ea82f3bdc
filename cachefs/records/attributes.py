"""Record attributes: the ``<attributes>`` XML, its values and W3C dates.

A record's attributes are what a search looks at::

    <attributes><attribute name="size" type="int">5</attribute></attributes>

Policy:

- Names are ASCII letters and digits, at most 64 characters, unique within a
  record when compared case-insensitively; the case written is kept.  The six
  names the store derives from the record header (``peerrecordid`` ...) cannot
  be set, only searched.
- Types are ``string``, ``int`` (decimal, optional sign, 64-bit signed) and
  ``date`` (a W3C date-time form, see ``parse_date``).  A string value is
  taken exactly as written, whitespace included, at most 64 KiB of UTF-8; an
  int or date value may be surrounded by whitespace.
- The XML is parsed without a DTD: a document type or entity declaration is
  refused, never expanded, and the document is bounded (1 MiB, 32 levels).
- ``render_attributes`` is canonical: one line, the given order, dates in
  UTC; parsing what it renders gives back the same attributes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Literal, NoReturn, get_args
from xml.parsers import expat

from cachefs.errors import InvalidSize
from cachefs.records.errors import InvalidAttributes, RecordsError
from cachefs.records.model import RESERVED_ATTRIBUTES, Record
from cachefs.units import parse_size

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_STRING_BYTES",
    "MAX_XML_BYTES",
    "AttrType",
    "Attribute",
    "derived_attributes",
    "format_date",
    "normalize_attributes",
    "parse_attr_option",
    "parse_attributes",
    "parse_date",
    "render_attributes",
]

log = logging.getLogger(__name__)

AttrType = Literal["string", "int", "date"]
ATTR_TYPES: tuple[AttrType, ...] = get_args(AttrType)

MAX_NAME_LENGTH = 64
MAX_STRING_BYTES = 64 << 10
MAX_XML_BYTES = 1 << 20
MAX_XML_DEPTH = 32
INT_MIN = -(1 << 63)
INT_MAX = (1 << 63) - 1

NAME = re.compile(r"[A-Za-z0-9]{1,64}")
INT = re.compile(r"[+-]?[0-9]+")
SIZE_INT = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]+)?(?:[KMGTP](?:i?B)?|B)?)", re.IGNORECASE)
_DATE = re.compile(
    r"(?P<y>[0-9]{4})(?:-(?P<mo>[0-9]{2})(?:-(?P<d>[0-9]{2})"
    r"(?:T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(?::(?P<s>[0-9]{2})(?:\.(?P<f>[0-9]+))?)?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)
# Characters XML 1.0 cannot carry, not even as a character reference.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class Attribute:
    """One attribute of a record.  Building one checks it: InvalidAttributes
    for a bad name or a value not of its type; a date is kept in UTC (a naive
    one is taken as UTC)."""

    name: str
    type: AttrType
    value: str | int | datetime

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or NAME.fullmatch(self.name) is None:
            _invalid(f"attribute name {shown(self.name)}: use 1 to 64 letters and digits")
        where = f"attribute {shown(self.name)}"
        if self.type == "string":
            if not isinstance(self.value, str):
                _invalid(f"{where} of type string: the value is not text")
            if len(self.value) > MAX_STRING_BYTES // 4 and (
                len(self.value.encode("utf-8", "surrogatepass")) > MAX_STRING_BYTES
            ):
                _invalid(f"{where}: the value is longer than 64 KiB")
            if _NOT_XML.search(self.value):
                _invalid(f"{where}: the value holds a control character XML cannot carry")
        elif self.type == "int":
            if isinstance(self.value, bool) or not isinstance(self.value, int):
                _invalid(f"{where} of type int: the value is not an integer")
            if not INT_MIN <= self.value <= INT_MAX:
                _invalid(f"{where} of type int: {self.value} is outside the 64-bit range")
        elif self.type == "date":
            if not isinstance(self.value, datetime):
                _invalid(f"{where} of type date: the value is not a datetime")
            try:
                object.__setattr__(self, "value", _utc(self.value))
            except OverflowError:
                _invalid(f"{where} of type date: {self.value} is out of range in UTC")
        else:
            _invalid(f"{where}: unknown type {shown(self.type)} (use string, int or date)")


def attr_type(text: str | None) -> AttrType | None:
    """*text* as an attribute type, None if it names none."""
    for known in ATTR_TYPES:
        if text == known:
            return known
    return None


def shown(value: object) -> str:
    """*value* quoted for an error message, cut short if long."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "..." + text[-1]


def _invalid(message: str) -> NoReturn:
    raise InvalidAttributes(message)


def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


# -- dates -----------------------------------------------------------------


def parse_date(text: str) -> datetime:
    """The instant a W3C date-time form names, as an aware UTC datetime.

    Forms: ``YYYY``, ``YYYY-MM``, ``YYYY-MM-DD``, ``YYYY-MM-DDThh:mmTZD``,
    ``...:ssTZD``, ``...:ss.sTZD`` (any number of fraction digits, kept to the
    microsecond); TZD is ``Z``, ``+hh:mm`` or ``-hh:mm``, and without one the
    time is UTC.  A partial date names its first instant.  ValueError otherwise.
    """
    match = _DATE.fullmatch(text)
    if match is None:
        raise ValueError(f"{shown(text)} is not a W3C date (use 2026-12-31 or 2026-12-31T07:00Z)")
    g = match.groupdict()
    fraction = (g["f"] or "")[:6].ljust(6, "0")
    try:
        offset = timedelta(0)
        if g["tz"] and g["tz"] != "Z":
            hours, minutes = int(g["tz"][1:3]), int(g["tz"][4:6])
            if hours > 23 or minutes > 59:
                raise ValueError("bad time zone")
            offset = timedelta(hours=hours, minutes=minutes)
            if g["tz"][0] == "-":
                offset = -offset
        local = datetime(
            int(g["y"]),
            int(g["mo"] or 1),
            int(g["d"] or 1),
            int(g["h"] or 0),
            int(g["mi"] or 0),
            int(g["s"] or 0),
            int(fraction),
            tzinfo=timezone(offset),
        )
        return local.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(f"{shown(text)} is not a valid date") from None


def format_date(t: datetime) -> str:
    """W3C form in UTC: ``2026-12-06T07:00:00Z``, with ``.000001``-style
    microseconds only when there are some.  A naive datetime is taken as UTC."""
    t = _utc(t)
    text = f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}:{t.second:02d}"
    if t.microsecond:
        text += f".{t.microsecond:06d}"
    return text + "Z"


def parse_size_int(text: str) -> int:
    """An int as a command line gives it: decimal, optional sign, optional
    size suffix (K M G T P, 1024 powers, as ``1M`` or ``1.5KiB``); ValueError."""
    match = SIZE_INT.fullmatch(text)
    if match is None:
        raise ValueError(f"{shown(text)} is not an integer")
    try:
        size = parse_size(match[2])
    except InvalidSize:
        raise ValueError(f"{shown(text)} is not a whole number") from None
    value = -size if match[1] == "-" else size
    if not INT_MIN <= value <= INT_MAX:
        raise ValueError(f"{shown(text)} is outside the 64-bit range")
    return value


# -- safe XML --------------------------------------------------------------


@dataclass(slots=True)
class XmlElement:
    """An element of a parsed document: its text is the character data
    directly inside it (between its children too)."""

    tag: str
    attrib: dict[str, str]
    children: list[XmlElement] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def joined_text(self) -> str:
        return "".join(self.text)


class _Refused(Exception):
    pass


def parse_xml(text: str, error: type[RecordsError], what: str) -> XmlElement:
    """The root element of *text*; *error* (one line naming *what*) if it is
    not well-formed, too large or too deep, or declares a DTD or an entity.
    Nothing is expanded and nothing is fetched."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} is not valid Unicode text") from None
    if len(data) > MAX_XML_BYTES:
        raise error(f"{what} is longer than 1 MiB")

    parser = expat.ParserCreate(encoding="utf-8")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.buffer_text = True
    stack: list[XmlElement] = []
    roots: list[XmlElement] = []

    def refuse(*_: object) -> NoReturn:
        raise _Refused("declares a DTD or an entity, which is not allowed")

    def start(tag: str, attrib: dict[str, str]) -> None:
        if len(stack) >= MAX_XML_DEPTH:
            raise _Refused(f"is nested deeper than {MAX_XML_DEPTH} levels")
        element = XmlElement(tag, attrib)
        (stack[-1].children if stack else roots).append(element)
        stack.append(element)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        if stack:
            stack[-1].text.append(data)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.NotationDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(data, True)
    except _Refused as e:
        raise error(f"{what} {e}") from None
    except expat.ExpatError as e:
        message = expat.ErrorString(e.code) if e.code is not None else str(e)
        raise error(f"{what} is not well-formed ({message}, line {e.lineno})") from None
    return roots[0]


def escape_text(value: str) -> str:
    """*value* as XML character data that parses back to exactly *value*."""
    return (
        value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")
    )


# -- the <attributes> document ---------------------------------------------


def _value(name: str, type_: AttrType, text: str) -> str | int | datetime:
    """The value *text* gives an attribute of *type_* (InvalidAttributes)."""
    if type_ == "string":
        return text
    stripped = text.strip()
    if type_ == "int":
        if INT.fullmatch(stripped) is None:
            _invalid(f"attribute {shown(name)} of type int: {shown(stripped)} is not an integer")
        return int(stripped)
    try:
        return parse_date(stripped)
    except ValueError as e:
        _invalid(f"attribute {shown(name)} of type date: {e}")


def parse_attributes(xml: str, *, allow_reserved: bool = False) -> tuple[Attribute, ...]:
    """The attributes *xml* holds, in document order; () for an empty string.
    InvalidAttributes for anything that is not exactly the documented form."""
    if not xml.strip():
        return ()
    root = parse_xml(xml, InvalidAttributes, "the attribute XML")
    if root.tag != "attributes":
        _invalid(f"the root element is <{root.tag}>, not <attributes>")
    if root.attrib:
        _invalid(f"<attributes> takes no XML attributes (got {shown(sorted(root.attrib))})")
    if root.joined_text().strip():
        _invalid("<attributes> holds text outside <attribute> elements")
    seen: set[str] = set()
    out: list[Attribute] = []
    for element in root.children:
        if element.tag != "attribute":
            _invalid(f"unknown element <{element.tag}> in <attributes>")
        extra = set(element.attrib) - {"name", "type"}
        if extra:
            _invalid(f"<attribute> takes only name and type (got {shown(sorted(extra))})")
        name = element.attrib.get("name")
        written = element.attrib.get("type")
        if name is None or written is None:
            _invalid("every <attribute> needs a name and a type")
        if NAME.fullmatch(name) is None:
            _invalid(f"attribute name {shown(name)}: use 1 to 64 letters and digits")
        type_ = attr_type(written)
        if type_ is None:
            _invalid(
                f"attribute {shown(name)}: unknown type {shown(written)} (use string, int or date)"
            )
        if element.children:
            _invalid(f"attribute {shown(name)}: a value is text, not elements")
        key = name.casefold()
        if key in RESERVED_ATTRIBUTES and not allow_reserved:
            _invalid(f"attribute {shown(name)} is reserved: the store sets it")
        if key in seen:
            _invalid(f"attribute {shown(name)} appears twice")
        seen.add(key)
        out.append(Attribute(name, type_, _value(name, type_, element.joined_text())))
    return tuple(out)


def render_attributes(attrs: Sequence[Attribute]) -> str:
    """Canonical XML for *attrs* in the given order; "" for none."""
    if not attrs:
        return ""
    parts = ["<attributes>"]
    for attr in attrs:
        value = attr.value
        if isinstance(value, datetime):
            text = format_date(value)
        elif isinstance(value, int):
            text = str(value)
        else:
            text = escape_text(value)
        parts.append(f'<attribute name="{attr.name}" type="{attr.type}">{text}</attribute>')
    parts.append("</attributes>")
    return "".join(parts)


def normalize_attributes(xml: str) -> str:
    return render_attributes(parse_attributes(xml))


def parse_attr_option(text: str) -> Attribute:
    """An attribute as the CLI's ``--attr`` gives it: ``NAME[:TYPE]=VALUE``,
    TYPE string (the default), int (which takes size suffixes: ``size:int=1M``)
    or date.  Reserved names are refused."""
    head, sep, value = text.partition("=")
    if not sep:
        _invalid(
            f"--attr {shown(text)}: use NAME=VALUE or NAME:TYPE=VALUE (TYPE string, int, date)"
        )
    name, colon, written = head.partition(":")
    if NAME.fullmatch(name) is None:
        _invalid(f"--attr {shown(text)}: the name must be 1 to 64 letters and digits")
    type_ = attr_type(written if colon else "string")
    if type_ is None:
        _invalid(f"--attr {shown(text)}: unknown type {shown(written)} (use string, int or date)")
    if name.casefold() in RESERVED_ATTRIBUTES:
        _invalid(f"--attr {shown(text)}: {name} is reserved: the store sets it")
    try:
        if type_ == "int":
            return Attribute(name, type_, parse_size_int(value.strip()))
        return Attribute(name, type_, _value(name, type_, value))
    except ValueError as e:
        _invalid(f"--attr {shown(text)}: {e}")
    except InvalidAttributes as e:
        _invalid(f"--attr {shown(text)}: {e.detail}")


def derived_attributes(record: Record) -> tuple[Attribute, ...]:
    """The six reserved attributes of a stored record, from its header."""
    if record.id is None or record.created is None or record.modified is None:
        raise ValueError("only a stored record has derived attributes")
    return (
        Attribute("peerrecordid", "string", str(record.id)),
        Attribute("peerrecordtype", "string", str(record.type)),
        Attribute("peercreatorid", "string", record.creator),
        Attribute("peerlastmodifiedby", "string", record.modified_by),
        Attribute("peercreationtime", "date", record.created),
        Attribute("peerlastmodificationtime", "date", record.modified),
    )
