"""Parsers for the NGSI-LD query languages (q, type expressions, scopeQ) into small typed ASTs.

Lexing rules (the spec grammar leaves these open; they are ours):

* No whitespace is allowed anywhere, except inside quoted strings and unquoted patterns.
* An attribute path is segments joined by ``.``, then optionally ``[key.key]``.  A segment is
  either a term (ASCII letters, digits, ``_``) or an IRI: anything that starts with a scheme
  (``[A-Za-z][A-Za-z0-9+-]*:``, which also covers compact IRIs such as ``ex:speed``).  An IRI
  runs until one of ``= < > ; | ( ) [ ] { } , "``, whitespace, ``!=``/``!~``, ``~=`` or a
  ``.``.  The exception is the authority of ``scheme://host.name/``, where dots are kept; so
  ``https://example.org/speed.observedAt`` is the IRI ``https://example.org/speed`` with
  metadata ``observedAt``.  An IRI whose path contains ``.`` cannot be written in q; use a
  term or a compact IRI for it.
* A last segment named observedAt, unitCode, datasetId, createdAt or modifiedAt (after at
  least one other segment) is metadata, not a sub-attribute.
* Member keys inside ``[...]`` are any printable characters except ``.``, ``[`` and ``]``;
  ``attr[en]`` and ``attr[*]`` (language maps) use the same syntax.
* Unquoted values: numbers, ``true``/``false``, DateTime ``YYYY-MM-DDThh:mm:ss[.f]`` then
  ``Z``, ``z`` or an offset ``+hh:mm``/``-hh:mm`` (RFC 3339; a ``+`` in a URL is written
  ``%2B``), Date, Time ``hh:mm:ss[.f][Z]``, and URIs (a scheme then any characters up to
  ``; | ( ) ,`` or whitespace).  Any other bare word is an error.  A DateTime keeps its text
  as written; ``utc_instant`` gives the instant it stands for.
* Patterns after ``~=``/``!~=`` may be quoted (``"..."``: the text between the quotes is the
  regex verbatim, a ``\\"`` pair does not end it) or unquoted: then the regex ends at the first
  ``;``, ``|`` or unbalanced ``)`` outside a ``[...]`` class, a ``(...)`` group or a ``\\``
  escape.  So ``name~=(a|b)c`` is one pattern, while ``name~=a|b`` is a pattern OR ``b``.
  A pattern must be in the subset of regular expressions that Python's re and PostgreSQL
  read alike (``portable_regex`` below); anything else is an error naming what is not allowed.
* Linked-entity paths (``rel{attr}``) are rejected: they need join, which is not supported.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, NoReturn, TypeAlias, TypeVar, cast

from cityward.bank.errors import BadRequestData

META_NAMES = frozenset({"observedAt", "unitCode", "datasetId", "createdAt", "modifiedAt"})
MAX_DEPTH = 32  # nesting of parentheses; deeper input is rejected rather than risk recursion


# --- q AST ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Path:
    """An attribute path: attribute name, sub-attribute names, metadata name, [member] keys."""

    attr: str
    subs: tuple[str, ...] = ()
    meta: str | None = None
    member: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Num:
    """A number literal (always held as a float, like the index)."""

    value: float


@dataclass(frozen=True, slots=True)
class Str:
    """A double-quoted string literal, already unescaped."""

    value: str


@dataclass(frozen=True, slots=True)
class Bool:
    """The literal true or false."""

    value: bool


@dataclass(frozen=True, slots=True)
class DateTime:
    """An unquoted DateTime literal such as 2024-01-01T00:00:00Z, as written."""

    text: str


@dataclass(frozen=True, slots=True)
class Date:
    """An unquoted Date literal such as 2024-01-01."""

    text: str


@dataclass(frozen=True, slots=True)
class Time:
    """An unquoted Time literal such as 12:00:00."""

    text: str


@dataclass(frozen=True, slots=True)
class Uri:
    """An unquoted URI literal such as urn:ngsi-ld:Person:1."""

    value: str


Value: TypeAlias = Num | Str | Bool | DateTime | Date | Time | Uri
Comparable: TypeAlias = Num | Str | DateTime | Date | Time


@dataclass(frozen=True, slots=True)
class Range:
    """An inclusive range low..high (both numbers, or both strings/dates)."""

    low: Comparable
    high: Comparable


@dataclass(frozen=True, slots=True)
class ValueList:
    """Two or more values: == means any of them, != means none of them."""

    items: tuple[Value, ...]


Op: TypeAlias = Literal["==", "!=", ">", ">=", "<", "<="]


@dataclass(frozen=True, slots=True)
class Exists:
    """``attr``: the attribute (path) exists."""

    path: Path


@dataclass(frozen=True, slots=True)
class NotExists:
    """``!attr``: the attribute (path) does not exist."""

    path: Path


@dataclass(frozen=True, slots=True)
class Compare:
    """``attr <op> value``; ranges and value lists only come with == and !=."""

    path: Path
    op: Op
    value: Value | Range | ValueList


@dataclass(frozen=True, slots=True)
class Match:
    """``attr~=regex`` (or ``!~=`` when negated): a string value matches the pattern."""

    path: Path
    pattern: str
    negated: bool = False


@dataclass(frozen=True, slots=True)
class And:
    """All items hold (``;``). Items are never And themselves (the parser flattens)."""

    items: tuple[QExpr, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """Any item holds (``|``). Items are never Or themselves (the parser flattens)."""

    items: tuple[QExpr, ...]


QExpr: TypeAlias = Exists | NotExists | Compare | Match | And | Or


# --- type and scope ASTs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TypeName:
    """One entity type as written (a term or an IRI), not yet expanded."""

    name: str


@dataclass(frozen=True, slots=True)
class TypeAnd:
    """The entity has all these types (``;``)."""

    items: tuple[TypeExpr, ...]


@dataclass(frozen=True, slots=True)
class TypeOr:
    """The entity has any of these types (``,`` or ``|``)."""

    items: tuple[TypeExpr, ...]


TypeExpr: TypeAlias = TypeName | TypeAnd | TypeOr


@dataclass(frozen=True, slots=True)
class ScopePattern:
    """A scope pattern: its levels; "+" is any one level, a last "#" is this level and below."""

    levels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ScopeAnd:
    """All scope patterns hold (``;``)."""

    items: tuple[ScopeExpr, ...]


@dataclass(frozen=True, slots=True)
class ScopeOr:
    """Any scope pattern holds (``,`` or ``|``)."""

    items: tuple[ScopeExpr, ...]


ScopeExpr: TypeAlias = ScopePattern | ScopeAnd | ScopeOr


# --- lexical helpers ---------------------------------------------------------------------------

_TERM_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_NAME_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+\-]*:")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_NAME_STOP = frozenset('=<>;|()[]{},"')
_VALUE_STOP = frozenset(";|(),")
_IRI_BAD = frozenset('<>"{}|\\^`')
# RFC 3339 date-time: the zone is Z, z (section 5.6 allows it) or a numeric offset
_DATETIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DATETIME_NO_Z = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?Z?")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SCOPE_LEVEL = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_OPERATORS: tuple[str, ...] = ("==", "!=", ">=", "<=", "!~=", "~=", ">", "<")
_ORDER_OPS: dict[str, Op] = {">": ">", ">=": ">=", "<": "<", "<=": "<="}
_N = TypeVar("_N")


def _valid_date(y: str, m: str, d: str) -> bool:
    try:
        _dt.date(int(y), int(m), int(d))
    except ValueError:
        return False
    return True


def _valid_time(h: str, mi: str, s: str) -> bool:
    return int(h) < 24 and int(mi) < 60 and int(s) < 60


def _valid_offset(zone: str) -> bool:
    return zone in ("Z", "z") or (int(zone[1:3]) < 24 and int(zone[4:6]) < 60)


def utc_instant(text: str) -> str | None:
    """The instant of an RFC 3339 date-time (zone ``Z``, ``z`` or ``+hh:mm``/``-hh:mm``) in
    the bank's fixed-width UTC form ``YYYY-MM-DDThh:mm:ss.ffffffZ``, whose text order is time
    order; None when ``text`` is no such date-time, or its instant lies outside years 1-9999.

    Fraction digits beyond six are cut, not rounded, as indexer.normalize_timestamp does.
    """
    m = _DATETIME.fullmatch(text)
    if m is None:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    if not (_valid_date(y, mo, d) and _valid_time(h, mi, s) and _valid_offset(zone)):
        return None
    micro = ((frac or ".")[1:] + "000000")[:6]
    if zone in ("Z", "z") or zone[1:] == "00:00":
        return f"{y}-{mo}-{d}T{h}:{mi}:{s}.{micro}Z"
    offset = _dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    local = _dt.datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), int(micro))
    try:
        utc = local - offset if zone[0] == "+" else local + offset
    except OverflowError:  # 0001-01-01T00:00:00+01:00 was in year 0
        return None
    return utc.isoformat(timespec="microseconds") + "Z"  # strftime drops a year's leading 0s


def _valid_type_name(name: str) -> bool:
    if all(c in _TERM_CHARS for c in name):
        return True
    m = _URI_SCHEME.match(name)
    return (
        m is not None
        and m.end() < len(name)
        and all(c > " " and c != "\x7f" and c not in _IRI_BAD for c in name)
    )


class _Parser:
    """A cursor over one input string, shared by the three grammars."""

    def __init__(self, text: str, field: str) -> None:
        self.text = text
        self.n = len(text)
        self.pos = 0
        self.field = field
        self.depth = 0

    def fail(self, msg: str, pos: int | None = None) -> NoReturn:
        p = self.pos if pos is None else pos
        where = f"at position {p} ({self.text[p : p + 15]!r})" if p < self.n else "at the end"
        shown = self.text if len(self.text) <= 120 else self.text[:117] + "..."
        raise BadRequestData(f"Invalid {self.field} {shown!r}: {msg} {where}", field=self.field)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < self.n else ""

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"parentheses nested deeper than {MAX_DEPTH}")

    def expect_close(self) -> None:
        if self.peek() != ")":
            self.fail("expected ')'")
        self.pos += 1
        self.depth -= 1

    # -- q -------------------------------------------------------------------------------------

    def q_or(self) -> QExpr:
        items = [self.q_and()]
        while self.peek() == "|":
            self.pos += 1
            items.append(self.q_and())
        return _flatten(Or, items)

    def q_and(self) -> QExpr:
        items = [self.q_primary()]
        while self.peek() == ";":
            self.pos += 1
            items.append(self.q_primary())
        return _flatten(And, items)

    def q_primary(self) -> QExpr:
        if self.peek() == "(":
            self.pos += 1
            self.enter()
            inner = self.q_or()
            self.expect_close()
            return inner
        return self.q_term()

    def at_term_end(self) -> bool:
        return self.pos >= self.n or self.text[self.pos] in ";|)"

    def q_term(self) -> QExpr:
        if self.peek() == "!" and not self.text.startswith("!=", self.pos):
            self.pos += 1
            path = self.path()
            if not self.at_term_end():
                self.fail("'!attr' takes no operator or value")
            return NotExists(path)
        path = self.path()
        if self.at_term_end():
            return Exists(path)
        op = next((o for o in _OPERATORS if self.text.startswith(o, self.pos)), None)
        if op is None:
            self.fail("expected an operator (== != > >= < <= ~= !~=) or the end of the term")
        self.pos += len(op)
        term: QExpr
        if op in ("~=", "!~="):
            term = Match(path, self.pattern(), op == "!~=")
        elif op in ("==", "!="):
            term = Compare(path, "==" if op == "==" else "!=", self.equality_value())
        else:
            start = self.pos
            v = self.value()
            if self.text.startswith("..", self.pos):
                self.fail("a range needs == or !=")
            if self.peek() == ",":
                self.fail("a value list needs == or !=")
            if isinstance(v, (Bool, Uri)):
                self.fail("ordering operators compare numbers, strings and dates only", start)
            term = Compare(path, _ORDER_OPS[op], v)
        if not self.at_term_end():
            self.fail("unexpected character after the value")
        return term

    def path(self) -> Path:
        start = self.pos
        segs = [self.segment()]
        while self.peek() == ".":
            self.pos += 1
            segs.append(self.segment())
        member: tuple[str, ...] = ()
        if self.peek() == "[":
            self.pos += 1
            keys = [self.member_key()]
            while self.peek() == ".":
                self.pos += 1
                keys.append(self.member_key())
            if self.peek() != "]":
                self.fail("expected ']' after the member path")
            self.pos += 1
            member = tuple(keys)
        if self.peek() == "{":
            self.fail("linked-entity queries (rel{attr}) need join, which is not supported")
        if self.peek() in (".", "["):
            self.fail("nothing may follow a member path")
        meta = None
        if len(segs) > 1 and segs[-1] in META_NAMES:
            meta = segs.pop()
            if member:
                self.fail(f"metadata {meta} has no members", start)
        for s in segs[1:]:
            if s in META_NAMES:
                self.fail(f"metadata {s} must be the last segment of a path", start)
        return Path(segs[0], tuple(segs[1:]), meta, member)

    def name_stop(self, i: int, dots: bool) -> bool:
        c = self.text[i]
        if c in _NAME_STOP or c <= " " or c == "\x7f":
            return True
        if c == ".":
            return dots
        nxt = self.text[i + 1 : i + 2]
        if c == "!":
            return nxt in ("=", "~")
        if c == "~":
            return nxt == "="
        return False

    def segment(self) -> str:
        start = i = self.pos
        m = _NAME_SCHEME.match(self.text, i)
        if m is not None:
            i = m.end()
            if self.text.startswith("//", i):
                i += 2
                while i < self.n and self.text[i] != "/" and not self.name_stop(i, dots=False):
                    i += 1
            while i < self.n and not self.name_stop(i, dots=True):
                i += 1
            if i == m.end():
                self.fail("an IRI needs something after its scheme", start)
            name = self.text[start:i]
            if any(c in _IRI_BAD for c in name):
                self.fail("invalid character in an IRI", start)
        else:
            while i < self.n and self.text[i] in _TERM_CHARS:
                i += 1
            if i == start:
                self.fail("expected an attribute name")
            if i < self.n and not self.name_stop(i, dots=True):
                self.fail("invalid character in an attribute name", i)
            name = self.text[start:i]
        self.pos = i
        return name

    def member_key(self) -> str:
        start = i = self.pos
        while i < self.n and self.text[i] not in ".[]" and self.text[i] > " ":
            i += 1
        if i == start:
            self.fail("expected a member name")
        self.pos = i
        return self.text[start:i]

    def equality_value(self) -> Value | Range | ValueList:
        start = self.pos
        first = self.value()
        if self.text.startswith("..", self.pos):
            self.pos += 2
            second = self.value()
            if self.peek() == "," or self.text.startswith("..", self.pos):
                self.fail("a range is exactly two values")
            if isinstance(first, (Bool, Uri)) or isinstance(second, (Bool, Uri)):
                self.fail("a range needs two numbers or two strings/dates", start)
            if isinstance(first, Num) != isinstance(second, Num):
                self.fail("a range needs two numbers or two strings/dates", start)
            return Range(first, second)
        if self.peek() != ",":
            return first
        items = [first]
        while self.peek() == ",":
            self.pos += 1
            items.append(self.value())
        if self.text.startswith("..", self.pos):
            self.fail("a value list cannot hold ranges")
        return ValueList(tuple(items))

    def value_end(self, i: int) -> bool:
        return i >= self.n or self.text[i] in _VALUE_STOP or self.text.startswith("..", i)

    def value(self) -> Value:
        t, i = self.text, self.pos
        c = self.peek()
        if c == '"':
            end = self.string_end(i)
            try:
                s = json.loads(t[i : end + 1])
            except json.JSONDecodeError as exc:
                self.fail(f"invalid string literal ({exc.msg})", i + exc.pos)
            self.pos = end + 1
            return Str(s)
        m = _DATETIME.match(t, i)
        if m is not None and self.value_end(m.end()):
            if utc_instant(m.group()) is None:
                self.fail("invalid DateTime")
            self.pos = m.end()
            return DateTime(m.group())
        m = _DATE.match(t, i)
        if m is not None and self.value_end(m.end()):
            if not _valid_date(*m.groups()):
                self.fail("invalid Date")
            self.pos = m.end()
            return Date(m.group())
        m = _TIME.match(t, i)
        if m is not None and self.value_end(m.end()):
            h, mi, s_, _ = m.groups()
            if not _valid_time(h, mi, s_):
                self.fail("invalid Time")
            self.pos = m.end()
            return Time(m.group())
        m = _NUMBER.match(t, i)
        if m is not None and self.value_end(m.end()):
            num = float(m.group())
            if not math.isfinite(num):
                self.fail("number out of range")
            self.pos = m.end()
            return Num(num)
        for word, flag in (("true", True), ("false", False)):
            if t.startswith(word, i) and self.value_end(i + len(word)):
                self.pos = i + len(word)
                return Bool(flag)
        m = _URI_SCHEME.match(t, i)
        if m is not None:
            j = m.end()
            while j < self.n and t[j] not in _VALUE_STOP and t[j] > " " and t[j] != "\x7f":
                j += 1
            uri = t[i:j]
            if j == m.end() or any(ch in _IRI_BAD for ch in uri):
                self.fail("invalid URI")
            self.pos = j
            return Uri(uri)
        if c.isalpha() or c == "_":
            self.fail('bare words are not values; quote strings ("...")')
        lexemes = (_DATETIME_NO_Z, _DATE, _TIME, _NUMBER)
        partial = [m.end() for rx in lexemes if (m := rx.match(t, i))]
        if partial:  # a number, date or time that runs into something else
            self.fail("unexpected character after the value", max(partial))
        self.fail('expected a value (number, "string", true, false, date, time or URI)')

    def string_end(self, i: int) -> int:
        """Index of the closing quote of the string that opens at i (backslash pairs skipped)."""
        j = i + 1
        while j < self.n:
            c = self.text[j]
            if c == "\\":
                j += 2
            elif c == '"':
                return j
            else:
                j += 1
        self.fail("unterminated string", i)

    def pattern(self) -> str:
        start = self.pos
        if self.peek() == '"':
            end = self.string_end(start)
            pat = self.text[start + 1 : end]
            self.pos = end + 1
        else:
            i, depth, t = start, 0, self.text
            while i < self.n:
                c = t[i]
                if c == "\\":
                    i += 2
                    continue
                if c == "[":
                    i += 1
                    if t.startswith("^", i):
                        i += 1
                    if t.startswith("]", i):
                        i += 1  # a ']' first in a class is a literal
                    while i < self.n and t[i] != "]":
                        i += 2 if t[i] == "\\" else 1
                    i += 1
                    continue
                if c == "(":
                    depth += 1
                elif c == ")":
                    if depth == 0:
                        break
                    depth -= 1
                elif c in ";|" and depth == 0:
                    break
                i += 1
            i = min(i, self.n)
            pat = t[start:i]
            if not pat:
                self.fail("expected a pattern")
            self.pos = i
        try:
            portable_regex(pat)
        except re.error as exc:  # RegexNotPortable says what the portable subset lacks
            at = start + (1 if self.text[start] == '"' else 0) + (exc.pos or 0)
            self.fail(f"invalid pattern ({exc.msg})", at)
        return pat

    # -- type expressions ----------------------------------------------------------------------

    def t_or(self) -> TypeExpr:
        items = [self.t_and()]
        while self.peek() in (",", "|"):
            self.pos += 1
            items.append(self.t_and())
        return _flatten(TypeOr, items)

    def t_and(self) -> TypeExpr:
        items = [self.t_primary()]
        while self.peek() == ";":
            self.pos += 1
            items.append(self.t_primary())
        return _flatten(TypeAnd, items)

    def t_primary(self) -> TypeExpr:
        if self.peek() == "(":
            self.pos += 1
            self.enter()
            inner = self.t_or()
            self.expect_close()
            return inner
        start = i = self.pos
        while i < self.n and self.text[i] not in ",|;()":
            i += 1
        name = self.text[start:i]
        if not name:
            self.fail("expected a type name")
        if not _valid_type_name(name):
            self.fail("a type is a name (letters, digits, _) or an IRI", start)
        self.pos = i
        return TypeName(name)

    # -- scopeQ --------------------------------------------------------------------------------

    def s_or(self) -> ScopeExpr:
        items = [self.s_and()]
        while self.peek() in (",", "|"):
            self.pos += 1
            items.append(self.s_and())
        return _flatten(ScopeOr, items)

    def s_and(self) -> ScopeExpr:
        items = [self.s_primary()]
        while self.peek() == ";":
            self.pos += 1
            items.append(self.s_primary())
        return _flatten(ScopeAnd, items)

    def s_primary(self) -> ScopeExpr:
        if self.peek() == "(":
            self.pos += 1
            self.enter()
            inner = self.s_or()
            self.expect_close()
            return inner
        if self.peek() != "/":
            self.fail("a scope pattern starts with '/'")
        levels: list[str] = []
        while self.peek() == "/":
            self.pos += 1
            c = self.peek()
            if levels and levels[-1] == "#":
                self.fail("'#' must be the last level", self.pos - 1)
            if c in ("+", "#"):
                levels.append(c)
                self.pos += 1
                continue
            m = _SCOPE_LEVEL.match(self.text, self.pos)
            if m is None:
                self.fail("a scope level starts with a letter, then letters, digits or _")
            levels.append(m.group())
            self.pos = m.end()
        if self.pos < self.n and self.text[self.pos] not in ",|;)":
            self.fail("invalid character in a scope pattern")
        return ScopePattern(tuple(levels))


def _flatten(cls: Callable[[tuple[_N, ...]], _N], items: list[_N]) -> _N:
    """One item stays itself; nested nodes of the same kind merge into one n-ary node."""
    if len(items) == 1:
        return items[0]
    flat: list[_N] = []
    for item in items:
        if type(item) is cls:
            flat.extend(cast(Any, item).items)
        else:
            flat.append(item)
    return cls(tuple(flat))


def _parser(text: str, field: str) -> _Parser:
    p = _Parser(text, field)
    if not text:
        p.fail("empty expression")
    return p


def _done(p: _Parser) -> None:
    if p.pos < p.n:
        p.fail("unexpected ')'" if p.peek() == ")" else "unexpected character")


def parse_q(text: str) -> QExpr:
    """Parse an NGSI-LD q string; raise BadRequestData(field="q") on any syntax error."""
    p = _parser(text, "q")
    node = p.q_or()
    _done(p)
    return node


def parse_type_expr(text: str) -> TypeExpr:
    """Parse an entity type selection such as ``(A;B)|C``; errors have field="type"."""
    p = _parser(text, "type")
    node = p.t_or()
    _done(p)
    return node


def parse_scope_q(text: str) -> ScopeExpr:
    """Parse a scopeQ such as ``(/Madrid/#;/CompanyA)|/B/+``; errors have field="scopeQ"."""
    p = _parser(text, "scopeQ")
    node = p.s_or()
    _done(p)
    return node


# --- portable regular expressions --------------------------------------------------------------
#
# q patterns and idPattern run as Python ``re`` on SQLite (and in the in-process evaluator)
# and as PostgreSQL's ARE engine on PostgreSQL. The two dialects read many patterns
# differently (\b is a word boundary in one and a backspace in the other, [[:alpha:]] is a
# class in one and two literal brackets in the other) or refuse what the other takes (named
# groups, scoped flags). So a pattern must be written in the subset below, which is parsed
# here and written out once per engine: no pattern reaches either engine as the client wrote
# it. The subset, in Python's notation:
#
# * literal characters; ``\`` before any character that is not an ASCII letter or digit is
#   that character; ``\n \t \r \f \v``, ``\xhh`` (exactly two hex digits), ``\uhhhh`` and
#   ``\Uhhhhhhhh``
# * ``.`` (any character, a newline too); ``[...]`` and ``[^...]`` with characters, ranges
#   and ``\d \w \s`` (``]`` first, ``-`` first or last, or escaped; ``[`` escaped)
# * ``\d \D \w \W \s \S`` in ASCII: [0-9], [0-9A-Za-z_], [ \t\n\v\f\r]
# * ``^`` and ``\A``: the start of the text; ``$`` and ``\Z``: its very end (Python's $ would
#   also match before a newline that ends the text); ``\b`` / ``\B``: an ASCII word boundary /
#   none
# * groups ``(...)``, ``(?:...)``, lookahead ``(?=...)`` and ``(?!...)``, alternation ``|``
# * ``* + ?`` and ``{n}``, ``{n,}``, ``{n,m}`` (n <= m <= 255), each optionally lazy (``?``)
# * ``(?i)`` at the very start: ASCII letters match either case (other letters do not fold)
#
# Everything else is refused, naming what is not allowed: named groups and back references,
# lookbehind, atomic groups, other or non-leading flags, POSIX classes, \N{...}, octal
# escapes, possessive quantifiers, {,n}, and PostgreSQL's own escapes (\m \M \y \Y); so are
# patterns past the limits below, which PostgreSQL compiles too slowly or not at all.
# Matching is a search (the pattern may match anywhere unless anchored) and gives the same
# answer on both engines: tests/bank/test_regex_portable.py runs them side by side.

_ASCII_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_Ranges: TypeAlias = tuple[tuple[int, int], ...]
_DIGITS: _Ranges = ((0x30, 0x39),)
_WORD: _Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_SPACE: _Ranges = ((0x09, 0x0D), (0x20, 0x20))
_CLASS_ESCAPES: dict[str, _Ranges] = {"d": _DIGITS, "w": _WORD, "s": _SPACE}
_CHAR_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_BOUND = re.compile(r"\{(?:[0-9]+(?:,[0-9]*)?|,[0-9]+)\}")
MAX_REPEAT = 255  # PostgreSQL refuses larger bounds ("invalid repetition count(s)")
# The pattern's size with every bounded repeat written out (a{3} is 3); PostgreSQL compiles
# repeats that way and refuses large ones as "too complex" ((a{255}){255} is).
MAX_REGEX_SIZE = 5_000
# Assertions in a row make PostgreSQL's compile time grow exponentially: (?:\b|\B) ten times
# over is "too complex" after half a second. Within these counts it stays in milliseconds.
MAX_ASSERTIONS = 16
MAX_BOUNDARIES = 8


class RegexNotPortable(re.error):
    """A pattern outside the subset that both stores read alike (a ``re.error``, so that
    callers that validate with ``re.compile`` refuse it the same way)."""


@dataclass(frozen=True, slots=True)
class PortableRegex:
    """One validated pattern written for each engine; both are searches with the same answer."""

    python: str  # for Python's re (SQLite's regexp() and the in-process evaluator)
    postgres: str  # for PostgreSQL's ~, applied with COLLATE "C" (ASCII case folding)


def _lit(cp: int) -> str:
    """A literal character, written so that neither engine can read it as syntax."""
    c = chr(cp)
    if c in _ASCII_ALNUM:
        return c
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def _class(ranges: _Ranges, negated: bool = False) -> str:
    body = "".join(_lit(lo) if lo == hi else f"{_lit(lo)}-{_lit(hi)}" for lo, hi in ranges)
    return "[" + ("^" if negated else "") + body + "]"


_W = _class(_WORD)
# word boundaries spelt out with lookaround (the same text for both engines): Python's \B never
# matches an empty text before 3.14, and both engines' \w would follow the locale
_BOUNDARY = f"(?:(?<={_W})(?!{_W})|(?<!{_W})(?={_W}))"
_NOT_BOUNDARY = f"(?:(?<={_W})(?={_W})|(?<!{_W})(?!{_W}))"


class _Node(NamedTuple):
    """A parsed piece of a pattern, written for both engines."""

    py: str
    pg: str
    size: int  # with its repeats written out
    empty: bool  # it can match without consuming a character
    empty_assert: bool  # ... and then through an assertion (^ $ \A \Z \b \B, lookahead)


class _RegexReader:
    """Recursive descent over one pattern, writing both engines' texts as it goes."""

    def __init__(self, text: str) -> None:
        self.t = text
        self.n = len(text)
        self.i = 0
        self.depth = 0
        self.assertions = 0
        self.boundaries = 0

    def fail(self, msg: str, pos: int | None = None) -> NoReturn:
        raise RegexNotPortable(msg, self.t, self.i if pos is None else pos)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.t[j] if j < self.n else ""

    def run(self) -> PortableRegex:
        for i, c in enumerate(self.t):
            if c == "\x00" or "\ud800" <= c <= "\udfff":  # no text in either store holds one
                self.fail(f"the character {c!r} is not allowed", i)
        icase = self.t.startswith("(?i)")
        if icase:
            self.i = 4
        node = self.alternation()
        if self.i < self.n:  # only an unbalanced ')' stops the top level early
            self.fail("unbalanced parenthesis")
        if node.size > MAX_REGEX_SIZE:
            self.fail(
                f"the pattern is too large: {node.size} characters with its repeats written "
                f"out, at most {MAX_REGEX_SIZE}",
                0,
            )
        # Python: (?s) makes '.' match a newline as PostgreSQL's '.' does; (?a) keeps (?i) to
        # ASCII letters, as PostgreSQL's case folding is under COLLATE "C".
        flags = "i" if icase else ""
        return PortableRegex(f"(?as{flags}){node.py}", f"(?s{flags}){node.pg}")

    def alternation(self) -> _Node:
        branches = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.sequence())
        return _Node(
            "|".join(b.py for b in branches),
            "|".join(b.pg for b in branches),
            sum(b.size for b in branches),
            any(b.empty for b in branches),
            any(b.empty_assert for b in branches),
        )

    def sequence(self) -> _Node:
        items: list[_Node] = []
        while self.i < self.n and self.peek() not in "|)":
            start = self.i
            item = self.atom()
            if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.bound_ahead()):
                if item.empty_assert:
                    # PostgreSQL compiles repeated assertions into exponentially many states
                    # ((?:\b|^)* a few times over takes seconds), and they mean nothing more
                    self.fail(
                        f"{self.t[start : self.i]!r} cannot be repeated: it can match no "
                        "character, through ^ $ \\A \\Z \\b \\B or a lookahead",
                        self.i,
                    )
                q, factor, optional = self.quantifier()
                item = _Node(
                    item.py + q, item.pg + q, item.size * factor, item.empty or optional, False
                )
            items.append(item)
        empty = all(i.empty for i in items)
        return _Node(
            "".join(i.py for i in items),
            "".join(i.pg for i in items),
            sum(i.size for i in items),
            empty,
            empty and any(i.empty_assert for i in items),
        )

    def bound_ahead(self) -> bool:
        return _BOUND.match(self.t, self.i) is not None

    def quantifier(self) -> tuple[str, int, bool]:
        """The quantifier's text, the factor it multiplies the size by, and whether it may
        match nothing (a minimum of 0)."""
        c = self.peek()
        if c == "{":
            end = self.t.index("}", self.i)
            body = self.t[self.i + 1 : end]
            low_text, comma, high_text = body.partition(",")
            if not low_text:
                self.fail("a repeat {,n} is not allowed: write {0,n}")
            low = int(low_text)
            high = int(high_text) if high_text else None
            if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
                self.fail(f"a repeat count above {MAX_REPEAT} is not allowed")
            if high is not None and high < low:
                self.fail(f"the repeat {{{body}}} has its bounds the wrong way round")
            self.i = end + 1
            if not comma:
                q, factor = f"{{{low}}}", max(low, 1)
            elif high is None:
                q, factor = f"{{{low},}}", low + 1
            else:
                q, factor = f"{{{low},{high}}}", max(high, 1)
            optional = low == 0
        else:
            self.i += 1
            q, factor, optional = c, 2 if c == "+" else 1, c != "+"
        if self.peek() == "?":  # lazy: the same matches for a search, only a different extent
            self.i += 1
            q += "?"
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and self.bound_ahead()):
            self.fail("a repeat of a repeat (such as a** or a possessive a*+) is not allowed")
        return q, factor, optional

    def assertion(self, py: str, pg: str, boundary: bool = False) -> _Node:
        self.count_assertion(boundary)
        return _Node(py, pg, 1, True, True)

    def count_assertion(self, boundary: bool = False) -> None:
        # Sequences of assertions make PostgreSQL's compile time grow exponentially too
        self.assertions += 1
        self.boundaries += boundary
        if self.assertions > MAX_ASSERTIONS:
            self.fail(
                f"more than {MAX_ASSERTIONS} of ^ $ \\A \\Z \\b \\B and lookaheads are not allowed"
            )
        if self.boundaries > MAX_BOUNDARIES:
            self.fail(f"more than {MAX_BOUNDARIES} of \\b and \\B are not allowed")

    def atom(self) -> _Node:
        c = self.peek()
        if c == "(":
            return self.group()
        if c == "[":
            text = self.bracket()
            return _Node(text, text, 1, False, False)
        if c == ".":
            self.i += 1
            return _Node(".", ".", 1, False, False)
        if c == "^":
            self.i += 1
            return self.assertion("^", "^")
        if c == "$":
            # Python's $ also matches before a newline that ends the text; \Z does not
            self.i += 1
            return self.assertion("\\Z", "$")
        if c == "\\":
            return self.escape()
        if c in "*+?":
            self.fail(f"nothing to repeat before {c!r}")
        if c == "{":
            self.fail(
                "nothing to repeat before '{'" if self.bound_ahead() else "write \\{ for a '{'"
            )
        if c in "]}":
            self.fail(f"write \\{c} for a {c!r}")
        self.i += 1
        lit = _lit(ord(c))
        return _Node(lit, lit, 1, False, False)

    def group(self) -> _Node:
        start = self.i
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"groups nested deeper than {MAX_DEPTH}")
        lookahead = False
        if self.t.startswith("(?", self.i):
            kind = self.t[self.i + 2 : self.i + 4]
            if not kind:
                self.fail("missing ), unterminated group")
            if kind[:1] == ":":
                self.i += 3
            elif kind[:1] in ("=", "!"):
                self.i += 3
                lookahead = True
            elif kind in ("<=", "<!"):
                self.fail("lookbehind (?<=...) and (?<!...) is not allowed")
            elif kind[:1] in ("P", "<"):
                self.fail("named groups and references ((?P<name>...), (?P=name)) are not allowed")
            elif kind[:1] == "#":
                self.fail("comments (?#...) are not allowed")
            elif kind[:1] == ">":
                self.fail("atomic groups (?>...) are not allowed")
            elif kind[:1] == "(":
                self.fail("conditional groups (?(...)...) are not allowed")
            else:
                self.fail(
                    "inline flags are not allowed, except (?i) at the very start of the pattern"
                )
        else:
            self.i += 1
        opener = self.t[self.i - 3 : self.i] if lookahead else "(?:"
        if lookahead:
            self.count_assertion()
        inner = self.alternation()
        if self.peek() != ")":
            self.fail("missing ), unterminated group", start)
        self.i += 1
        self.depth -= 1
        # groups never capture: a match needs no groups, and they cost both engines work
        py, pg = f"{opener}{inner.py})", f"{opener}{inner.pg})"
        if lookahead:
            return _Node(py, pg, inner.size + 1, True, True)
        return _Node(py, pg, inner.size + 1, inner.empty, inner.empty_assert)

    def escape(self) -> _Node:
        start = self.i
        c = self.peek(1)
        if c == "":
            self.fail("a pattern cannot end with a lone \\")
        self.i += 2
        if c in ("A", "Z"):
            return self.assertion("\\" + c, "\\" + c)
        if c == "b":
            return self.assertion(_BOUNDARY, _BOUNDARY, boundary=True)
        if c == "B":
            return self.assertion(_NOT_BOUNDARY, _NOT_BOUNDARY, boundary=True)
        if c.lower() in _CLASS_ESCAPES:
            text = _class(_CLASS_ESCAPES[c.lower()], negated=c.isupper())
            return _Node(text, text, 1, False, False)
        self.i = start
        lit = _lit(self.char_escape())
        return _Node(lit, lit, 1, False, False)

    def char_escape(self) -> int:
        """The code point of an escape that stands for one character (self.i at the \\)."""
        start = self.i
        c = self.peek(1)
        self.i += 2
        if c in _CHAR_ESCAPES:
            return _CHAR_ESCAPES[c]
        if c in _HEX_ESCAPES:
            width = _HEX_ESCAPES[c]
            digits = self.t[self.i : self.i + width]
            if len(digits) != width or not set(digits) <= _HEX_DIGITS:
                self.fail(f"\\{c} needs exactly {width} hex digits", start)
            self.i += width
            cp = int(digits, 16)
            if cp == 0 or 0xD800 <= cp <= 0xDFFF or cp > 0x10FFFF:
                self.fail(f"\\{c}{digits} is not a character a text can hold", start)
            return cp
        if c.isdigit() and c.isascii():
            self.fail("back references and octal escapes (\\1, \\0) are not allowed", start)
        if c == "N":
            self.fail("named characters \\N{...} are not allowed: write \\uhhhh", start)
        if c in _ASCII_ALNUM:
            allowed = "\\d \\D \\w \\W \\s \\S \\b \\B \\A \\Z \\n \\t \\r \\f \\v \\x \\u \\U"
            self.fail(f"the escape \\{c} is not allowed (allowed: {allowed})", start)
        return ord(c)

    def bracket(self) -> str:
        start = self.i
        self.i += 1
        negated = self.peek() == "^"
        if negated:
            self.i += 1
        first = self.i
        ranges: list[tuple[int, int]] = []
        while True:
            c = self.peek()
            if c == "":
                self.fail("missing ], unterminated [...]", start)
            if c == "]" and self.i > first:
                self.i += 1
                break
            lo_at = self.i
            item = self.class_item(first)
            if isinstance(item, tuple):
                ranges.extend(item)
                continue
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.i += 1
                if self.t[lo_at] == "-" or self.peek() == "-":
                    self.fail("write \\- for a '-' that ends a range", lo_at)
                hi = self.class_item(first)
                if isinstance(hi, tuple):
                    self.fail("a range needs a character at each end", lo_at)
                if hi < item:
                    self.fail(f"the range {self.t[lo_at : self.i]} is the wrong way round", lo_at)
                ranges.append((item, hi))
            else:
                ranges.append((item, item))
        return _class(tuple(ranges), negated)

    def class_item(self, first: int) -> int | _Ranges:
        """One character (a code point) or a class escape's ranges inside [...]."""
        c = self.peek()
        if c == "\\":
            e = self.peek(1)
            if e == "":
                self.fail("missing ], unterminated [...]")
            if e in _CLASS_ESCAPES:
                self.i += 2
                return _CLASS_ESCAPES[e]
            if e.lower() in _CLASS_ESCAPES:
                self.fail(f"\\{e} is not allowed inside [...]: write [^...] instead")
            if e in "bBAZ":
                self.fail(f"\\{e} is not allowed inside [...]")
            return self.char_escape()
        if c == "[":
            self.fail(
                "write \\[ for a '[' inside [...]; POSIX classes such as [:alpha:] are not allowed"
            )
        if c == "-" and self.i != first and self.peek(1) != "]":
            self.fail("write \\- for a '-' inside [...] (or put it first or last)")
        self.i += 1
        return ord(c)


@functools.lru_cache(maxsize=1024)
def full_match(pattern: str) -> str:
    """A pattern that must match a whole text, as the search portable_regex takes: anchored
    at both ends, a leading ``(?i)`` kept at the very start where the subset allows it."""
    flags = "(?i)" if pattern.startswith("(?i)") else ""
    return f"{flags}^(?:{pattern[len(flags) :]})$"


def portable_regex(pattern: str) -> PortableRegex:
    """The pattern written for each engine; RegexNotPortable (a re.error) when it is outside
    the subset that both read alike (see above)."""
    out = _RegexReader(pattern).run()
    re.compile(out.python)  # a bug here must not reach SQLite as a 500
    return out


# --- rendering (the inverse of parsing; used for logs, stored subscriptions and tests) ----------


def render_path(path: Path) -> str:
    """The q text of an attribute path."""
    text = path.attr + "".join("." + s for s in path.subs)
    if path.meta is not None:
        text += "." + path.meta
    if path.member:
        text += "[" + ".".join(path.member) + "]"
    return text


def render_value(value: Value | Range | ValueList) -> str:
    """The q text of a value, a range or a value list."""
    if isinstance(value, Range):
        return render_value(value.low) + ".." + render_value(value.high)
    if isinstance(value, ValueList):
        return ",".join(render_value(v) for v in value.items)
    if isinstance(value, Num):
        v = value.value
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    if isinstance(value, Str):
        return json.dumps(value.value, ensure_ascii=False)
    if isinstance(value, Bool):
        return "true" if value.value else "false"
    if isinstance(value, Uri):
        return value.value
    return value.text


def _render_pattern(pattern: str) -> str:
    # Always quoted, so that ; | ) in the pattern are safe; a bare " gets a backslash, which
    # does not change what the regex matches.
    out, i = ['"'], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        out.append('\\"' if c == '"' else c)
        i += 1
    out.append('"')
    return "".join(out)


def render_q(expr: QExpr) -> str:
    """The q text of an expression; parse_q(render_q(x)) == x for flattened expressions."""
    if isinstance(expr, Or):
        return "|".join(render_q(i) for i in expr.items)
    if isinstance(expr, And):
        return ";".join(
            "(" + render_q(i) + ")" if isinstance(i, Or) else render_q(i) for i in expr.items
        )
    if isinstance(expr, Exists):
        return render_path(expr.path)
    if isinstance(expr, NotExists):
        return "!" + render_path(expr.path)
    if isinstance(expr, Match):
        op = "!~=" if expr.negated else "~="
        return render_path(expr.path) + op + _render_pattern(expr.pattern)
    return render_path(expr.path) + expr.op + render_value(expr.value)


def render_type_expr(expr: TypeExpr) -> str:
    """The text of a type selection (OR written as ',')."""
    if isinstance(expr, TypeName):
        return expr.name
    if isinstance(expr, TypeOr):
        return ",".join(render_type_expr(i) for i in expr.items)
    return ";".join(
        "(" + render_type_expr(i) + ")" if isinstance(i, TypeOr) else render_type_expr(i)
        for i in expr.items
    )


def render_scope_q(expr: ScopeExpr) -> str:
    """The text of a scopeQ (OR written as ',')."""
    if isinstance(expr, ScopePattern):
        return "/" + "/".join(expr.levels)
    if isinstance(expr, ScopeOr):
        return ",".join(render_scope_q(i) for i in expr.items)
    return ";".join(
        "(" + render_scope_q(i) + ")" if isinstance(i, ScopeOr) else render_scope_q(i)
        for i in expr.items
    )
