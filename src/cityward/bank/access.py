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
    pattern_rules: Sequence[tuple[bool, Sequence[str]]],
    undeclared: bool,
    dialect: Dialect,
    derived: DerivedIds | None = None,
    typed: bool = False,
) -> Conjunct:
    """The entities a token may see (see governance.sources.Selection), as a per-entity probe.

    It decides in the order of ``Catalog.source_of``, so that a query shows exactly what a
    retrieval by id shows: ``derived`` ids first, by their prefix alone; then the id patterns,
    ``pattern_rules`` being the catalog's patterned sources in order, as runs of one
    visibility (visible or not): the first run with a pattern that fully matches the id
    decides; then the entity's first type (in the order of its ``type`` array) that a source
    declares, ``visible_types`` or ``hidden_types`` (expanded IRIs); else ``undeclared``.

    ``typed``: every candidate already has a type that is visible or undeclared (the query's
    own types), so that only a hidden type listed before it can hide it.

    Always a probe, never a driver: it restricts a query that its own conditions drive.
    """
    params: list[object] = []

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

    def rules(runs: Sequence[tuple[bool, Sequence[str]]]) -> str:
        # built in text order, so that the parameters line up with their marks
        if not runs:
            return type_rule(visible_types, hidden_types, undeclared, dialect, params, typed)
        visible, items = runs[0]
        match = patterns(items)
        rest = rules(runs[1:])
        return f"({match} OR {rest})" if visible else f"(NOT {match} AND {rest})"

    sql = rules(pattern_rules)
    if derived is None:
        return Conjunct(sql, list(params))
    # the derived ids the token may see, and the rest for the others only
    first = derived_conjunct(derived, undeclared)
    if sql == "1 = 1":
        return first
    return Conjunct(
        f"({first.probe} AND (substr(e.eid, 1, {len(derived.prefix)}) = ? OR {sql}))",
        [*first.probe_params, derived.prefix, *params],
    )


def type_rule(
    visible: Sequence[str],
    hidden: Sequence[str],
    undeclared: bool,
    dialect: Dialect,
    params: list[object],
    typed: bool = False,
) -> str:
    """SQL true when the first of the entity's types that a source declares is ``visible``
    (with ``undeclared``: or none is declared), as ``Catalog.source_of`` reads its types.

    Index probes on ``etypes`` decide, except for an entity with types of both kinds (rare):
    its ``type`` array, in its stored document, gives the order. ``params`` receives the
    parameters in text order. ``typed``: see :func:`selection_conjunct`.
    """
    # PostgreSQL: OFFSET 0 keeps the EXISTS a per-row probe; SQLite: the unary + keeps it on
    # etypes_e (one seek, then the entity's few types), not one etypes_type seek per type
    per_row = " OFFSET 0" if dialect == "postgres" else ""
    plus = "" if dialect == "postgres" else "+"

    def has(items: Sequence[str]) -> str:
        params.extend(items)
        marks = ", ".join("?" * len(items))
        return (
            f"EXISTS (SELECT 1 FROM etypes t WHERE t.e = e.pk AND {plus}t.type IN ({marks})"
            f"{per_row})"
        )

    if not hidden:
        if typed or undeclared:
            return "1 = 1"
        return has(visible) if visible else "0 = 1"
    if not visible:
        return f"(NOT {has(hidden)})" if undeclared or typed else "0 = 1"
    # types of both kinds: one probe reads the entity's declared types (1 when all are
    # visible, 0 when none is, and the order of its type array decides when both are there)
    declared = [*visible, *hidden]
    vmarks = ", ".join("?" * len(visible))
    dmarks = ", ".join("?" * len(declared))
    if dialect == "postgres":
        elements = (
            "SELECT j.v FROM json_array_elements_text(e.doc::json -> 'type') "
            f"WITH ORDINALITY AS j(v, n) WHERE j.v IN ({dmarks}) ORDER BY j.n LIMIT 1"
        )
    else:
        elements = (
            "SELECT j.value FROM json_each(e.doc, '$.type') j "
            f"WHERE j.value IN ({dmarks}) ORDER BY j.key LIMIT 1"
        )
    params.extend([*visible, *visible, *declared, *visible, *declared])
    is_visible = f"CASE WHEN t.type IN ({vmarks}) THEN 1 ELSE 0 END"
    return (
        f"(SELECT CASE WHEN count(*) = 0 THEN {1 if typed or undeclared else 0}"
        f" WHEN min({is_visible}) = 1 THEN 1 WHEN max({is_visible}) = 0 THEN 0"
        f" WHEN ({elements}) IN ({vmarks}) THEN 1 ELSE 0 END"
        f" FROM etypes t WHERE t.e = e.pk AND {plus}t.type IN ({dmarks})) = 1"
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
