"""Per-request access restrictions the data bank enforces, whoever calls it.

The governance layer sets :data:`current_access` for each request (a context variable, so it
follows the request into the worker thread that runs the bank call). Internal callers (the demo,
retention, tests of the bank itself) leave it unset and are not restricted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cityward.bank.errors import NgsiError
from cityward.bank.query.qlang import full_match
from cityward.bank.query.sqlgen import Conjunct, regex_condition

if TYPE_CHECKING:
    Dialect = Literal["sqlite", "postgres"]


@dataclass(frozen=True, slots=True)
class Access:
    """What the current request may touch.

    ``read``/``write`` return the error for an entity (id, expanded types) the request may not
    read or change, or None. ``conjunct`` restricts every entity query to what may be read.
    """

    read: Callable[[str, Sequence[str]], NgsiError | None]
    write: Callable[[str, Sequence[str]], NgsiError | None]
    # (dialect, the query's own type list or None) -> the restriction, None when not needed
    conjunct: Callable[[Dialect, frozenset[str] | None], Conjunct | None]
    # the documents a query answered with (for the audit of personal data)
    returned: Callable[[Sequence[Mapping[str, Any]]], None]


current_access: ContextVar[Access | None] = ContextVar("cityward_access", default=None)


def selection_conjunct(
    visible_types: Sequence[str],
    hidden_types: Sequence[str],
    visible_patterns: Sequence[str],
    hidden_patterns: Sequence[str],
    undeclared: bool,
    dialect: Dialect,
    derived: DerivedIds | None = None,
) -> Conjunct:
    """The entities a token may see (see governance.sources.Selection), as a per-entity probe.

    Types are expanded IRIs. Always a probe, never a driver: it restricts a query that its
    own conditions drive. ``derived`` ids are decided first, by their prefix alone.
    """
    params: list[object] = []
    per_row = " OFFSET 0" if dialect == "postgres" else ""

    def patterns(items: Sequence[str]) -> str:
        if not items:
            return "0 = 1"
        parts = []
        for p in items:
            # validated at load (governance.sources), written out for the store's engine
            sql, args = regex_condition("e.eid", full_match(p), dialect)
            parts.append(sql)
            params.extend(args)
        return "(" + " OR ".join(parts) + ")"

    def types(items: Sequence[str]) -> str:
        if not items:
            return "0 = 1"
        params.extend(items)
        marks = ", ".join("?" * len(items))
        return f"EXISTS (SELECT 1 FROM etypes t WHERE t.e = e.pk AND t.type IN ({marks}){per_row})"

    # built in text order, so that the parameters line up with their marks
    vp = patterns(visible_patterns)
    hp = patterns(hidden_patterns)
    vt = types(visible_types)
    rest = "1 = 1" if undeclared else "0 = 1"
    ht = types(hidden_types) if undeclared else ""
    fallback = f"(NOT {ht})" if undeclared and hidden_types else rest
    sql = f"({vp} OR (NOT {hp} AND ({vt} OR {fallback})))"
    if derived is None:
        return Conjunct(sql, list(params))
    # the derived ids the token may see, and the rest for the others only
    first = derived_conjunct(derived, undeclared)
    return Conjunct(
        f"({first.probe} AND (substr(e.eid, 1, {len(derived.prefix)}) = ? OR {sql}))",
        [*first.probe_params, derived.prefix, *params],
    )


@dataclass(frozen=True, slots=True)
class DerivedIds:
    """Ids that start with ``prefix`` belong to the source their next segment names: those
    starting with one of ``visible`` may be seen; ``known`` are the prefixes of every declared
    source (the others follow the undeclared source)."""

    prefix: str
    visible: Sequence[str]
    known: Sequence[str]


def derived_conjunct(derived: DerivedIds, undeclared: bool) -> Conjunct:
    """True for the entities whose id is not derived and for the derived ones the token may
    see (those of a source not ``known`` when ``undeclared`` data is visible).

    Prefix tests are ``substr`` comparisons, the same on both engines and cheaper than a regex.
    """
    prefix = derived.prefix
    params: list[object] = [prefix]

    def starts(prefixes: Sequence[str]) -> list[str]:
        parts = []
        for p in prefixes:
            parts.append(f"substr(e.eid, 1, {len(p)}) = ?")
            params.append(p)
        return parts

    seen = starts(derived.visible)
    if undeclared:
        others = starts(derived.known)
        seen.append(f"NOT ({' OR '.join(others)})" if others else "1 = 1")
    allowed = " OR ".join(seen) if seen else "0 = 1"
    return Conjunct(f"(substr(e.eid, 1, {len(prefix)}) <> ? OR {allowed})", params)


def check_read(eid: str, types: Sequence[str]) -> None:
    access = current_access.get()
    if access is not None:
        err = access.read(eid, types)
        if err is not None:
            raise err


def write_error(eid: str, types: Sequence[str]) -> NgsiError | None:
    access = current_access.get()
    return None if access is None else access.write(eid, types)
