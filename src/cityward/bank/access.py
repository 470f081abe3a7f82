"""Per-request access restrictions the data bank enforces, whoever calls it.

The governance layer sets :data:`current_access` for each request (a context variable, so it
follows the request into the worker thread that runs the bank call). Internal callers (the demo,
retention, tests of the bank itself) leave it unset and are not restricted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from cityward.bank.errors import NgsiError
from cityward.bank.query.sqlgen import Conjunct

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
    conjunct: Callable[[Dialect], Conjunct | None]


current_access: ContextVar[Access | None] = ContextVar("cityward_access", default=None)


def selection_conjunct(
    types: Sequence[str], patterns: Sequence[str], negate: bool, dialect: Dialect
) -> Conjunct:
    """Entities of one of ``types`` (expanded IRIs) or with an id fully matching a pattern.

    With ``negate``: entities of none of them. Always a per-entity probe: it restricts a query
    that something else drives.
    """
    parts: list[str] = []
    params: list[object] = []
    per_row = " OFFSET 0" if dialect == "postgres" else ""
    if types:
        marks = ", ".join("?" * len(types))
        parts.append(
            f"EXISTS (SELECT 1 FROM etypes t WHERE t.e = e.pk AND t.type IN ({marks}){per_row})"
        )
        params.extend(types)
    for p in patterns:
        parts.append("e.eid ~ ?" if dialect == "postgres" else "regexp(?, e.eid)")
        params.append(f"^(?:{p})$")
    body = " OR ".join(parts) if parts else "1 = 0"
    probe = f"NOT ({body})" if negate else f"({body})"
    return Conjunct(probe, list(params))


def check_read(eid: str, types: Sequence[str]) -> None:
    access = current_access.get()
    if access is not None:
        err = access.read(eid, types)
        if err is not None:
            raise err


def write_error(eid: str, types: Sequence[str]) -> NgsiError | None:
    access = current_access.get()
    return None if access is None else access.write(eid, types)
