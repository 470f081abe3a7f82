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
* Unquoted values: numbers, ``true``/``false``, DateTime ``YYYY-MM-DDThh:mm:ss[.f]Z``, Date,
  Time ``hh:mm:ss[.f][Z]``, and URIs (a scheme then any characters up to ``; | ( ) ,`` or
  whitespace).  Any other bare word is an error.
* Patterns after ``~=``/``!~=`` may be quoted (``"..."``: the text between the quotes is the
  regex verbatim, a ``\\"`` pair does not end it) or unquoted: then the regex ends at the first
  ``;``, ``|`` or unbalanced ``)`` outside a ``[...]`` class, a ``(...)`` group or a ``\\``
  escape.  So ``name~=(a|b)c`` is one pattern, while ``name~=a|b`` is a pattern OR ``b``.
* Linked-entity paths (``rel{attr}``) are rejected: they need join, which is not supported.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeAlias, TypeVar, cast

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
_DATETIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?Z"
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
            y, mo, d, h, mi, s_, _ = m.groups()
            if not (_valid_date(y, mo, d) and _valid_time(h, mi, s_)):
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
            re.compile(pat)
        except re.error as exc:
            self.fail(f"invalid pattern ({exc.msg})", start + (exc.pos or 0))
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
