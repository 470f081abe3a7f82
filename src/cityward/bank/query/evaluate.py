"""Evaluate q, type and scopeQ expressions against one stored document, in Python.

The semantics are exactly those of ``sqlgen`` (the tests check this on random data): the
document is first turned into its ``attr_index`` rows with ``index_rows``, so both sides see
the same values, and the comparisons below mirror the SQL conditions one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

from cityward.bank.query.indexer import (
    TIMESTAMP_META,
    VT_BOOL,
    VT_DATETIME,
    VT_NUMBER,
    VT_STRING,
    VT_URI,
    index_rows,
    path_key,
)
from cityward.bank.query.qlang import (
    And,
    Bool,
    Exists,
    Match,
    NotExists,
    Num,
    Or,
    QExpr,
    Range,
    ScopeAnd,
    ScopeExpr,
    ScopePattern,
    Str,
    TypeAnd,
    TypeExpr,
    TypeName,
    Uri,
    Value,
    ValueList,
)
from cityward.bank.query.sqlgen import Textual, compile_pattern, text_comparisons

Cell: TypeAlias = tuple[int, float | None, str | None]
Pred: TypeAlias = Callable[[Cell], bool]
Expand: TypeAlias = Callable[[str], str]


class DocIndex:
    """A document's index rows grouped by path; build it once to test many expressions."""

    __slots__ = ("cells",)

    def __init__(self, doc: Mapping[str, Any]) -> None:
        cells: dict[str, list[Cell]] = {}
        for path, vt, num, txt in index_rows(doc):
            cells.setdefault(path, []).append((vt, num, txt))
        self.cells = cells


_STRING_VTS = frozenset({VT_STRING})
_EQUAL_VTS = frozenset({VT_STRING, VT_URI})
_MATCH_VTS = frozenset({VT_STRING, VT_DATETIME})


def _holds(txt: str, cmps: list[tuple[str, str]]) -> bool:
    return all(_compare(op, txt, text) for op, text in cmps)


def _textual(vts: frozenset[int], cmps: list[tuple[str, Textual]], ts: bool) -> Pred:
    """Mirrors _Compiler.textual: strings of ``vts`` as written, DateTime values as instants."""
    plain, instants = text_comparisons(cmps, ts)

    def pred(c: Cell) -> bool:
        vt, txt = c[0], c[2]
        if txt is None:
            return False
        if vt in vts:
            return _holds(txt, plain)
        return instants is not None and vt == VT_DATETIME and _holds(txt, instants)

    return pred


def _equals(v: Value, ts: bool) -> Pred:
    if isinstance(v, Num):
        n = v.value
        return lambda c: c[0] == VT_NUMBER and c[1] == n
    if isinstance(v, Bool):
        b = 1.0 if v.value else 0.0
        return lambda c: c[0] == VT_BOOL and c[1] == b
    return _textual(_EQUAL_VTS if isinstance(v, (Str, Uri)) else _STRING_VTS, [("=", v)], ts)


def _value_pred(value: Value | Range | ValueList, ts: bool) -> Pred:
    if isinstance(value, ValueList):
        preds = [_equals(v, ts) for v in value.items]
        return lambda c: any(p(c) for p in preds)
    if isinstance(value, Range):
        low, high = value.low, value.high
        if isinstance(low, Num) and isinstance(high, Num):
            lo, hi = low.value, high.value
            return lambda c: c[0] == VT_NUMBER and c[1] is not None and lo <= c[1] <= hi
        if isinstance(low, Num) or isinstance(high, Num):
            raise ValueError("a range mixes a number and a string")
        return _textual(_STRING_VTS, [(">=", low), ("<=", high)], ts)
    return _equals(value, ts)


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "=":
        return bool(a == b)
    if op == ">":
        return bool(a > b)
    if op == ">=":
        return bool(a >= b)
    if op == "<":
        return bool(a < b)
    return bool(a <= b)


def _ordered(op: str, v: Value, ts: bool) -> Pred:
    if isinstance(v, Num):
        n = v.value
        return lambda c: c[0] == VT_NUMBER and _compare(op, c[1], n)
    if isinstance(v, (Bool, Uri)):
        raise ValueError(f"{op} cannot compare with {v!r}")
    return _textual(_STRING_VTS, [(op, v)], ts)


def _any(cells: Iterable[Cell], pred: Pred) -> bool:
    return any(pred(c) for c in cells)


def _q(expr: QExpr, idx: DocIndex, expand: Expand) -> bool:
    if isinstance(expr, And):
        return all(_q(i, idx, expand) for i in expr.items)
    if isinstance(expr, Or):
        return any(_q(i, idx, expand) for i in expr.items)
    cells = idx.cells.get(path_key(expr.path, expand))
    if isinstance(expr, NotExists):
        return not cells
    if not cells:
        return False  # every other term needs the attribute (path) to exist
    if isinstance(expr, Exists):
        return True
    if isinstance(expr, Match):
        rx = compile_pattern(expr.pattern)
        hit = _any(cells, lambda c: c[0] in _MATCH_VTS and rx.search(c[2] or "") is not None)
        return hit != expr.negated
    ts = expr.path.meta in TIMESTAMP_META
    if expr.op == "==":
        return _any(cells, _value_pred(expr.value, ts))
    if expr.op == "!=":
        return not _any(cells, _value_pred(expr.value, ts))
    value = expr.value
    if isinstance(value, (Range, ValueList)):
        raise ValueError("ranges and value lists need == or !=")
    return _any(cells, _ordered(expr.op, value, ts))


def matches(expr: QExpr, doc: Mapping[str, Any] | DocIndex, expand: Expand) -> bool:
    """True when a stored document satisfies a q expression (same semantics as compile_q)."""
    idx = doc if isinstance(doc, DocIndex) else DocIndex(doc)
    return _q(expr, idx, expand)


def type_matches(expr: TypeExpr, doc: Mapping[str, Any], expand: Expand) -> bool:
    """True when the document's types (``doc["type"]``, expanded IRIs) satisfy the selection."""
    types = doc.get("type") or ()
    have = {types} if isinstance(types, str) else set(types)

    def ev(e: TypeExpr) -> bool:
        if isinstance(e, TypeName):
            return expand(e.name) in have
        if isinstance(e, TypeAnd):
            return all(ev(i) for i in e.items)
        return any(ev(i) for i in e.items)

    return ev(expr)


def _scope_hit(levels: tuple[str, ...], scope: str) -> bool:
    """One scope string against one pattern, level by level (no regex, unlike the SQL)."""
    if levels == ("#",):
        return True  # "/#": any scope at all
    parts = scope.split("/")[1:] if scope.startswith("/") else None
    if not parts:
        return False
    for k, want in enumerate(levels):
        if want == "#":
            return True  # the levels so far matched; "#" takes this level and everything below
        if k >= len(parts) or (want != "+" and parts[k] != want):
            return False
    return len(parts) == len(levels)


def scope_matches(expr: ScopeExpr, doc: Mapping[str, Any]) -> bool:
    """True when the document's scopes (``doc["scope"]``) satisfy a scopeQ."""
    scope = doc.get("scope") or ()
    scopes = [scope] if isinstance(scope, str) else list(scope)

    def ev(e: ScopeExpr) -> bool:
        if isinstance(e, ScopePattern):
            return any(_scope_hit(e.levels, s) for s in scopes)
        if isinstance(e, ScopeAnd):
            return all(ev(i) for i in e.items)
        return any(ev(i) for i in e.items)

    return ev(expr)
