"""Compile q, type and scopeQ ASTs to SQL conditions over ``attr_index`` and ``etypes``.

Every function returns ``(sql, params)``: a boolean SQL expression about the entity row
aliased ``e`` and its ``?`` parameters.  The SQL text never holds a literal ``?`` or ``%``
(the PostgreSQL store rewrites ``?`` to ``%s``); every value, LIKE-free range bound and
pattern travels as a parameter.

Index use: positive terms are ``e.pk IN (SELECT i.e FROM attr_index i WHERE i.path = ? AND
<value condition>)``, which the (path, num) and (path, txt) indexes answer; negative ones are
``NOT EXISTS (... i.e = e.pk ...)``, answered through the (e) index.  Text order uses binary
collation (``COLLATE BINARY`` in SQLite, ``COLLATE "C"`` in PostgreSQL): declare
``attr_index.txt`` with that collation so that the (path, txt) index serves ordering too.
"""

from __future__ import annotations

import functools
import re
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import regex

from cityward.bank.errors import OperationNotSupported
from cityward.bank.query.indexer import (
    SCOPE_PATH,
    TIMESTAMP_META,
    UNINDEXED_META,
    VT_BOOL,
    VT_DATETIME,
    VT_NUMBER,
    VT_STRING,
    VT_URI,
    instant_text,
    literal_text,
    path_id,
    path_key,
)
from cityward.bank.query.qlang import (
    And,
    Bool,
    Date,
    DateTime,
    Exists,
    Match,
    NotExists,
    Num,
    Or,
    QExpr,
    Range,
    ScopeAnd,
    ScopeExpr,
    ScopeOr,
    ScopePattern,
    Str,
    Time,
    TypeAnd,
    TypeExpr,
    TypeName,
    Uri,
    Value,
    ValueList,
    full_match,
    portable_regex,
)

Dialect: TypeAlias = Literal["sqlite", "postgres"]
Expand: TypeAlias = Callable[[str], str]
Textual: TypeAlias = Str | Uri | DateTime | Date | Time
# the value types a literal's text is compared with: strings (and URIs for == with a string
# or URI); a literal that is a DateTime or Date is also compared with DateTime values (vt 5),
# as its instant (indexer.instant_text)
STRING_VTS = (VT_STRING,)
EQUAL_VTS = (VT_STRING, VT_URI)
# what a pattern (~=) searches: strings, and DateTime values as their UTC text
MATCH_VTS = f"{VT_STRING}, {VT_DATETIME}"


REGEX_FLAGS = regex.DOTALL  # PostgreSQL's default: '.' also matches a newline
# Python's re backtracks without limit: (a+)+b took exponential time on a long run of a's
# that ends in no b, and held a query's thread (SQLite), or the subscription matcher inside a
# write, for ever. The regex module reads the portable subset as re does (version 0, the
# default) and gives up a search after a time limit: REGEX_TIMEOUT_S a value. PostgreSQL's
# engine does not backtrack like this; there the subset's limits suffice. The limit is wall
# time, waiting for the CPU included: at 50 ms a loaded machine (the demo's simulation, a
# browser) failed a governance pattern on a 40-character id. An ordinary search takes
# microseconds; a runaway one is stopped within a second.
REGEX_TIMEOUT_S = 1.0


class RegexTooCostly(Exception):
    """A search gave up after REGEX_TIMEOUT_S on one value (``pattern`` as run)."""

    def __init__(self, pattern: str) -> None:
        super().__init__(
            f"the pattern takes too long to search a value (more than {REGEX_TIMEOUT_S:g} s): "
            "nested or adjacent repeats such as (a+)+ or a*a* can make a search take "
            "exponential time; write the pattern without them"
        )
        self.pattern = pattern


class BoundedPattern:
    """A compiled pattern whose searches give up after ``timeout`` seconds (RegexTooCostly);
    None: no limit (the operator's own patterns, checked at load)."""

    __slots__ = ("_rx", "text", "timeout")

    def __init__(self, text: str, flags: int = 0, timeout: float | None = REGEX_TIMEOUT_S) -> None:
        self.text = text
        self.timeout = timeout
        try:
            self._rx = regex.compile(text, flags)
        except regex.error as exc:  # a re.error, as callers that validate patterns expect
            raise re.error(str(exc), text) from exc

    def search(self, value: str) -> regex.Match[str] | None:
        try:
            return self._rx.search(value, timeout=self.timeout)
        except TimeoutError as exc:
            raise RegexTooCostly(self.text) from exc


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> BoundedPattern:
    """A q pattern or idPattern compiled as SQLite and the Python evaluator apply it.

    Only the portable subset is taken (qlang.portable_regex), so that it matches what
    PostgreSQL matches; outside it, RegexNotPortable (a re.error).
    """
    return BoundedPattern(portable_regex(pattern).python)


@functools.lru_cache(maxsize=256)
def id_pattern_matcher(pattern: str, what: str = "id pattern") -> BoundedPattern:
    """An operator's id pattern from the configuration (governance sources, anomaly watches),
    read as the API reads ``idPattern``: the portable subset, matched against the whole id,
    and, checked at load, without a time limit (a loaded machine must not turn one away).

    ValueError (``what`` and the pattern named, and the position of what is outside the
    subset) otherwise: PostgreSQL runs some of them too, and a pattern Python reads one way
    and PostgreSQL another (or not at all) would select other entities on each store.
    """
    anchored = full_match(pattern)
    try:
        return BoundedPattern(portable_regex(anchored).python, timeout=None)
    except re.error as exc:
        shift = len(anchored) - len(pattern) - 2  # what full_match put before it
        where = "" if exc.pos is None else f" at position {max(exc.pos - shift, 0)}"
        raise ValueError(
            f"{what} {pattern!r} is not a valid regex of the subset both stores read alike: "
            f"{exc.msg}{where}"
        ) from exc


@functools.lru_cache(maxsize=512)
def _raw_pattern(pattern: str) -> BoundedPattern:
    return BoundedPattern(pattern, REGEX_FLAGS)


_gave_up = threading.local()  # the pattern of the last search that gave up, per thread


def take_regex_timeout() -> str | None:
    """The pattern whose search in regexp() gave up on this thread since the last call (SQLite
    reports only "user-defined function raised exception"), or None."""
    pattern: str | None = getattr(_gave_up, "pattern", None)
    _gave_up.pattern = None
    return pattern


def _sqlite_regexp(pattern: str | None, value: str | None) -> int | None:
    # The pattern arrives as written for Python (PortableRegex.python), so it is compiled as
    # it is.
    if pattern is None or value is None:
        return None  # SQL NULL in, NULL out: a WHERE treats it as no match
    try:
        return 1 if _raw_pattern(pattern).search(value) else 0
    except RegexTooCostly:
        _gave_up.pattern = pattern
        raise


def register_sqlite_functions(conn: sqlite3.Connection) -> None:
    """Register ``regexp(pattern, value)`` (Python ``re.search``) on a SQLite connection."""
    conn.create_function("regexp", 2, _sqlite_regexp, deterministic=True)


def regex_condition(column: str, pattern: str, dialect: Dialect) -> tuple[str, list[Any]]:
    """SQL that ``column`` matches ``pattern`` (a search), one parameter; the pattern must be
    in the portable subset (RegexNotPortable otherwise), written out for the dialect.

    PostgreSQL applies it under COLLATE "C": its case folding (``(?i)``) then covers ASCII
    letters only, as Python's re.ASCII does, whatever the database's collation.
    """
    rx = portable_regex(pattern)
    if dialect == "postgres":
        return f'{column} COLLATE "C" ~ ?', [rx.postgres]
    return f"regexp(?, {column})", [rx.python]


def text_comparisons(
    cmps: list[tuple[str, Textual]], timestamp: bool
) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    """The comparisons ``txt <op> text`` of a term on strings, and on DateTime values (None
    when the term does not compare with those). Shared with the evaluator, which mirrors the SQL.

    Timestamp paths (observedAt) hold normalized strings, never DateTime values.
    """
    plain = [(op, literal_text(v, timestamp)) for op, v in cmps]
    if timestamp:
        return plain, None
    instants: list[tuple[str, str]] = []
    for op, v in cmps:
        instant = instant_text(v)
        if instant is None:
            return plain, None
        instants.append((op, instant))
    return plain, instants


class _Compiler:
    """Collects SQL fragments and their parameters, in order."""

    def __init__(self, dialect: Dialect, correlated: bool = False) -> None:
        if dialect not in ("sqlite", "postgres"):
            raise ValueError(f"unknown SQL dialect {dialect!r}")
        self.dialect = dialect
        # correlated: probe the rows of the entity at hand (EXISTS ... i.e = e.pk), the fast form
        # when entities are scanned in order; otherwise list matching entities (e.pk IN ...).
        self.correlated = correlated
        # PostgreSQL rewrites a correlated EXISTS into a hash over every matching row of the
        # index; OFFSET 0 keeps it a per-entity check (its planner leaves such subqueries alone).
        self.per_row = " OFFSET 0" if dialect == "postgres" else ""
        self.params: list[Any] = []
        self.binary = ' COLLATE "C"' if dialect == "postgres" else " COLLATE BINARY"

    def p(self, value: Any) -> str:
        self.params.append(value)
        return "?"

    def regex(self, pattern: str) -> str:
        sql, params = regex_condition("i.txt", pattern, self.dialect)
        self.params.extend(params)
        return sql

    def txt(self, vts: tuple[int, ...], cmps: list[tuple[str, str]]) -> str:
        """Rows of these value types whose txt compares so; order under binary collation."""
        vt = f"i.vt = {vts[0]}" if len(vts) == 1 else f"i.vt IN ({', '.join(map(str, vts))})"
        conds = [vt]
        for op, text in cmps:
            conds.append(f"i.txt {op} {self.p(text)}{'' if op == '=' else self.binary}")
        return "(" + " AND ".join(conds) + ")"

    def textual(self, vts: tuple[int, ...], cmps: list[tuple[str, Textual]], ts: bool) -> str:
        """A term on strings of ``vts`` (compared as written) and DateTime values (as an
        instant). Each part is one index range on (path, vt, txt); two parts, an OR of two."""
        plain, instants = text_comparisons(cmps, ts)
        if instants is None:
            return self.txt(vts, plain)
        if instants == plain:  # already the UTC form: one comparison serves both
            return self.txt((*vts, VT_DATETIME), plain)
        return f"({self.txt(vts, plain)} OR {self.txt((VT_DATETIME,), instants)})"

    # -- row subqueries ---------------------------------------------------------------------------

    def some_row(self, path: str, cond: Callable[[], str] | None = None) -> str:
        """The entity has a row at this path (satisfying cond)."""
        if self.correlated:
            sql = "EXISTS (SELECT 1 FROM attr_index i WHERE i.e = e.pk AND i.path = "
        else:
            sql = "e.pk IN (SELECT i.e FROM attr_index i WHERE i.path = "
        sql += self.p(path_id(path))
        if cond is not None:
            sql += " AND " + (self._probe(cond()) if self.correlated else cond())
        return sql + (self.per_row + ")" if self.correlated else ")")

    def _probe(self, cond: str) -> str:
        """A value condition inside a per-entity probe.

        SQLite would otherwise answer ``i.e = e.pk AND i.path = ? AND i.vt = 1 AND i.num > ?``
        from the (path, vt, num) index, walking the whole value range once per entity; a unary +
        on the value columns leaves it the (e, path) key: one seek per entity.
        """
        if self.dialect != "sqlite":
            return cond
        return cond.replace("i.num", "+i.num").replace("i.txt", "+i.txt").replace("i.vt", "+i.vt")

    def no_row(self, path: str, cond: Callable[[], str] | None = None) -> str:
        """The entity has no row at this path (satisfying cond)."""
        sql = "NOT EXISTS (SELECT 1 FROM attr_index i WHERE i.e = e.pk AND i.path = " + self.p(
            path_id(path)
        )
        if cond is not None:
            sql += " AND " + self._probe(cond())
        return sql + self.per_row + ")"

    # -- value conditions on one row (alias i) -----------------------------------------------------

    def equals(self, v: Value, ts: bool) -> str:
        if isinstance(v, Num):
            return f"(i.vt = {VT_NUMBER} AND i.num = {self.p(v.value)})"
        if isinstance(v, Bool):
            return f"(i.vt = {VT_BOOL} AND i.num = {self.p(1.0 if v.value else 0.0)})"
        # A quoted string or a URI also matches a Relationship's object.
        vts = EQUAL_VTS if isinstance(v, (Str, Uri)) else STRING_VTS
        return self.textual(vts, [("=", v)], ts)

    def value_cond(self, value: Value | Range | ValueList, ts: bool) -> str:
        if isinstance(value, ValueList):
            return "(" + " OR ".join(self.equals(v, ts) for v in value.items) + ")"
        if isinstance(value, Range):
            low, high = value.low, value.high
            if isinstance(low, Num) and isinstance(high, Num):
                lo, hi = self.p(low.value), self.p(high.value)
                return f"(i.vt = {VT_NUMBER} AND i.num >= {lo} AND i.num <= {hi})"
            if isinstance(low, Num) or isinstance(high, Num):
                raise ValueError("a range mixes a number and a string")  # the parser forbids it
            return self.textual(STRING_VTS, [(">=", low), ("<=", high)], ts)
        return self.equals(value, ts)

    def ordered(self, op: str, v: Value, ts: bool) -> str:
        if isinstance(v, Num):
            return f"(i.vt = {VT_NUMBER} AND i.num {op} {self.p(v.value)})"
        if isinstance(v, (Bool, Uri)):
            raise ValueError(f"{op} cannot compare with {v!r}")  # the parser forbids it
        # Strings and dates order among strings (and DateTimes) only, never a Relationship.
        return self.textual(STRING_VTS, [(op, v)], ts)

    # -- q -----------------------------------------------------------------------------------------

    def q(self, expr: QExpr, expand: Expand) -> str:
        if isinstance(expr, And):
            return "(" + " AND ".join(self.q(i, expand) for i in expr.items) + ")"
        if isinstance(expr, Or):
            return "(" + " OR ".join(self.q(i, expand) for i in expr.items) + ")"
        if expr.path.meta in UNINDEXED_META:
            raise OperationNotSupported(
                f"q on attribute {expr.path.meta} is not supported (observedAt, unitCode and "
                "datasetId are)",
                field="q",
            )
        path = path_key(expr.path, expand)
        if isinstance(expr, Exists):
            return self.some_row(path)
        if isinstance(expr, NotExists):
            return self.no_row(path)
        if isinstance(expr, Match):

            def matched() -> str:
                return f"i.vt IN ({MATCH_VTS}) AND " + self.regex(expr.pattern)

            if expr.negated:
                return f"({self.some_row(path)} AND {self.no_row(path, matched)})"
            return self.some_row(path, matched)
        ts = expr.path.meta in TIMESTAMP_META
        if expr.op == "==":
            return self.some_row(path, lambda: self.value_cond(expr.value, ts))
        if expr.op == "!=":
            # Exists, and no value equals (is in the range / list); differing types count as !=.
            return (
                f"({self.some_row(path)} AND "
                f"{self.no_row(path, lambda: self.value_cond(expr.value, ts))})"
            )
        value = expr.value
        if isinstance(value, (Range, ValueList)):
            raise ValueError("ranges and value lists need == or !=")  # the parser forbids it
        return self.some_row(path, lambda: self.ordered(expr.op, value, ts))

    # -- types and scopes ------------------------------------------------------------------------

    def types(self, expr: TypeExpr, expand: Expand) -> str:
        if isinstance(expr, TypeName):
            if self.correlated:
                return (
                    "EXISTS (SELECT 1 FROM etypes t WHERE t.e = e.pk AND t.type = "
                    + self.p(expand(expr.name))
                    + self.per_row
                    + ")"
                )
            return (
                "e.pk IN (SELECT t.e FROM etypes t WHERE t.type = "
                + self.p(expand(expr.name))
                + ")"
            )
        if isinstance(expr, TypeAnd):
            return "(" + " AND ".join(self.types(i, expand) for i in expr.items) + ")"
        names = [i for i in expr.items if isinstance(i, TypeName)]
        parts: list[str] = []
        if names:
            # All plain alternatives in one IN list: one index probe per name, one subquery.
            marks = ", ".join(self.p(expand(n.name)) for n in names)
            if self.correlated:
                parts.append(
                    f"EXISTS (SELECT 1 FROM etypes t WHERE t.e = e.pk AND t.type IN ({marks})"
                    f"{self.per_row})"
                )
            else:
                parts.append(f"e.pk IN (SELECT t.e FROM etypes t WHERE t.type IN ({marks}))")
        # Built after the IN list so that the parameters stay in text order.
        parts.extend(self.types(i, expand) for i in expr.items if not isinstance(i, TypeName))
        return "(" + " OR ".join(parts) + ")"

    def scope(self, expr: ScopeExpr) -> str:
        if isinstance(expr, ScopeAnd):
            return "(" + " AND ".join(self.scope(i) for i in expr.items) + ")"
        if isinstance(expr, ScopeOr):
            return "(" + " OR ".join(self.scope(i) for i in expr.items) + ")"
        return self.some_row(SCOPE_PATH, self.scope_cond(expr))

    def scope_cond(self, pattern: ScopePattern) -> Callable[[], str] | None:
        levels = pattern.levels
        below = levels[-1] == "#"
        fixed = levels[:-1] if below else levels
        if not fixed:
            return None  # "/#": any scope at all
        b = self.binary
        if "+" not in fixed:
            scope = "/" + "/".join(fixed)
            if not below:
                return lambda: "i.txt = " + self.p(scope)
            # "/A/#": "/A" itself, or between "/A/" and "/A0" ('0' follows '/' in code order).
            return lambda: (
                f"(i.txt = {self.p(scope)} OR (i.txt >= {self.p(scope + '/')}{b}"
                f" AND i.txt < {self.p(scope + '0')}{b}))"
            )
        prefix = fixed[: fixed.index("+")]
        rx = "^" + "".join("/[^/]+" if lv == "+" else "/" + lv for lv in fixed)
        rx += "(/.*)?$" if below else "$"

        def cond() -> str:
            sql = ""
            if prefix:
                # The fixed levels before the first '+' narrow the index range first.
                start = "/" + "/".join(prefix)
                sql = f"i.txt >= {self.p(start + '/')}{b} AND i.txt < {self.p(start + '0')}{b} AND "
            return sql + self.regex(rx)

        return cond


def compile_q(expr: QExpr, expand: Expand, dialect: Dialect = "sqlite") -> tuple[str, list[Any]]:
    """SQL condition on ``e`` that holds exactly for the entities a q expression matches."""
    c = _Compiler(dialect)
    return c.q(expr, expand), c.params


def compile_type_expr(
    expr: TypeExpr, expand: Expand, dialect: Dialect = "sqlite"
) -> tuple[str, list[Any]]:
    """SQL condition on ``e`` for a type selection, over the ``etypes`` table."""
    c = _Compiler(dialect)
    return c.types(expr, expand), c.params


def compile_scope_q(expr: ScopeExpr, dialect: Dialect = "sqlite") -> tuple[str, list[Any]]:
    """SQL condition on ``e`` for a scopeQ, over the scope rows of ``attr_index``."""
    c = _Compiler(dialect)
    return c.scope(expr), c.params


def compile_attrs_any(
    iris: list[str], dialect: Dialect = "sqlite", correlated: bool = False
) -> tuple[str, list[Any]]:
    """SQL condition on ``e``: the entity has at least one of these (expanded) attributes."""
    c = _Compiler(dialect)
    if not iris:
        return "1 = 0", []
    marks = ", ".join(c.p(path_id(iri)) for iri in iris)
    if correlated:
        return (
            f"EXISTS (SELECT 1 FROM attr_index i WHERE i.e = e.pk AND i.path IN ({marks})"
            f"{c.per_row})",
            c.params,
        )
    return f"e.pk IN (SELECT i.e FROM attr_index i WHERE i.path IN ({marks}))", c.params


@dataclass(frozen=True)
class Conjunct:
    """One AND-ed part of a query, in the two shapes the store's planner chooses between.

    ``probe`` is checked per entity (correlated EXISTS: cheap when many entities match and a
    page fills quickly in creation order). ``driver``, when the part is one positive index
    lookup, is a ``SELECT`` of the matching entity pks: the cheap start when few match.
    """

    probe: str
    probe_params: list[Any]
    driver: str | None = None
    driver_params: list[Any] = field(default_factory=list)


_IN_PREFIX = "e.pk IN ("


def _single_subquery(sql: str) -> str | None:
    """The inner SELECT when ``sql`` is exactly one ``e.pk IN (SELECT ...)`` term."""
    if not sql.startswith(_IN_PREFIX) or not sql.endswith(")"):
        return None
    depth = 0
    for n, ch in enumerate(sql[len(_IN_PREFIX) - 1 :], start=len(_IN_PREFIX) - 1):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0 and n != len(sql) - 1:
                return None
    return sql[len(_IN_PREFIX) : -1]


def _conjunct(build: Callable[[_Compiler], str], dialect: Dialect) -> Conjunct:
    probe_c = _Compiler(dialect, correlated=True)
    probe = build(probe_c)
    list_c = _Compiler(dialect)
    driver = _single_subquery(build(list_c))
    return Conjunct(probe, probe_c.params, driver, list_c.params if driver else [])


def q_conjuncts(expr: QExpr, expand: Expand, dialect: Dialect = "sqlite") -> list[Conjunct]:
    """The top-level AND parts of a q expression, each as probe and (maybe) driver."""
    items = expr.items if isinstance(expr, And) else (expr,)
    return [
        _conjunct(functools.partial(_Compiler.q, expr=it, expand=expand), dialect) for it in items
    ]


def type_conjuncts(expr: TypeExpr, expand: Expand, dialect: Dialect = "sqlite") -> list[Conjunct]:
    """The AND parts of a type selection, each as probe and (maybe) driver."""
    items = expr.items if isinstance(expr, TypeAnd) else (expr,)
    return [
        _conjunct(functools.partial(_Compiler.types, expr=it, expand=expand), dialect)
        for it in items
    ]


def scope_conjuncts(expr: ScopeExpr, dialect: Dialect = "sqlite") -> list[Conjunct]:
    """The AND parts of a scopeQ, each as probe and (maybe) driver."""
    items = expr.items if isinstance(expr, ScopeAnd) else (expr,)
    return [_conjunct(functools.partial(_Compiler.scope, expr=it), dialect) for it in items]


def attrs_conjunct(iris: list[str], dialect: Dialect = "sqlite") -> Conjunct:
    """``attrs``: the entity has one of these attributes, as probe and driver."""
    probe, probe_params = compile_attrs_any(iris, dialect, correlated=True)
    listed, params = compile_attrs_any(iris, dialect)
    driver = _single_subquery(listed)
    return Conjunct(probe, probe_params, driver, params if driver else [])
