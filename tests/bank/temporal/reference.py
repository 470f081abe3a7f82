"""Plain-Python answers to temporal queries, written independently of the SQL, to test it."""

from __future__ import annotations

import calendar
import math
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import orjson

from cityward.bank.temporal import TemporalQuery

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PAYLOADS = ("value", "object", "languageMap", "valueList", "objectList", "json", "vocab")


def us(text: str) -> int:
    """Microseconds since the epoch of a ``...Z`` DateTime (through datetime, not times.py)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return (dt - EPOCH) // timedelta(microseconds=1)


def iso(micros: int) -> str:
    dt = EPOCH + timedelta(microseconds=micros)
    return f"{dt.year:04d}" + dt.strftime("-%m-%dT%H:%M:%S.%fZ")  # %Y does not pad year 1


@dataclass
class Rec:
    """One recorded instance as the test wrote it (``n``: the order it was inserted)."""

    n: int
    e: int
    iri: str
    ds: str | None
    times: dict[str, int]  # observedAt / createdAt / modifiedAt -> microseconds
    inst: dict[str, Any] = field(default_factory=dict)

    def num(self) -> float | None:
        v = self.inst.get("value")
        if self.inst.get("type") != "Property" or isinstance(v, (str, list, dict)) or v is None:
            return None
        return float(v)

    def payload(self) -> str:
        member = next(p for p in PAYLOADS if p in self.inst)
        return orjson.dumps(self.inst[member], option=orjson.OPT_SORT_KEYS).decode()


def window(q: TemporalQuery) -> tuple[int | None, int | None]:
    lo = us(q.time_at) if q.time_at and q.timerel in ("after", "between") else None
    hi = None
    if q.timerel == "before":
        hi = us(q.time_at) if q.time_at else None
    elif q.timerel == "between" and q.end_time_at:
        hi = us(q.end_time_at)
    return lo, hi


def in_window(rec: Rec, q: TemporalQuery) -> bool:
    t = rec.times[q.timeproperty]
    lo, hi = window(q)
    return (lo is None or t >= lo) and (hi is None or t < hi)


def instances(
    recs: list[Rec], q: TemporalQuery, pks: list[int], attrs: list[str] | None, limit: int | None
) -> list[tuple[int, str, int, str]]:
    """(e, iri, n, time) of the expected instances, in the expected order."""
    out: list[tuple[int, str, int, str]] = []
    series: dict[tuple[int, str], list[Rec]] = {}
    for r in recs:
        if r.e in pks and (attrs is None or r.iri in attrs) and in_window(r, q):
            series.setdefault((r.e, r.iri), []).append(r)
    prop = q.timeproperty
    for (e, iri), rs in sorted(series.items()):
        rs.sort(key=lambda r: (r.times[prop], r.n))
        cap = q.last_n if limit is None else limit if q.last_n is None else min(q.last_n, limit)
        if cap is not None:
            rs = rs[-cap:] if q.last_n is not None else rs[:cap]
        out.extend((e, iri, r.n, iso(r.times[prop])) for r in rs)
    return out


# the first and last times the bank holds; a period past either is cut there (docs/api.md)
FIRST = us("0001-01-01T00:00:00Z")
LAST = us("9999-12-31T23:59:59.999999Z")


def add_months(micros: int, n: int) -> int:
    dt = EPOCH + timedelta(microseconds=micros)
    y, m = divmod(dt.year * 12 + dt.month - 1 + n, 12)
    if y > 9999:
        return LAST + 1
    if y < 1:
        return FIRST
    day = min(dt.day, calendar.monthrange(y, m + 1)[1])
    moved = dt.replace(year=y, month=m + 1, day=day)
    return (moved - EPOCH) // timedelta(microseconds=1)


def bucket(t: int, origin: int, q: TemporalQuery) -> tuple[int, int]:
    """[start, end) of the period holding ``t``, before clipping to the window."""
    period = q.aggr_period
    assert period is not None
    if not period.calendar:
        k = (t - origin) // period.micros
        return origin + k * period.micros, origin + (k + 1) * period.micros
    k = 0
    while add_months(origin, k * period.months) > t:
        k -= 1
    while add_months(origin, (k + 1) * period.months) <= t:
        k += 1
    return add_months(origin, k * period.months), add_months(origin, (k + 1) * period.months)


def _double(x: Fraction) -> float | None:
    """An exact value as a double; None past the double range (JSON has no infinity)."""
    try:
        return float(x)
    except OverflowError:
        return None


def methods(recs: list[Rec], names: tuple[str, ...]) -> dict[str, Any]:
    """The aggregates of exact arithmetic: sum and sumsq are None past the double range, avg
    and stddev (within the values' range) never are."""
    nums = [x for x in (r.num() for r in recs) if x is not None]
    out: dict[str, Any] = {}
    for m in names:
        if m == "totalCount":
            out[m] = len(recs)
        elif m == "distinctCount":
            out[m] = len(set(nums)) + len({r.payload() for r in recs if r.num() is None})
        elif not nums:
            out[m] = None
        elif m == "sum":
            out[m] = _double(sum(map(Fraction, nums), Fraction(0)))
        elif m == "avg":
            out[m] = float(sum(map(Fraction, nums), Fraction(0)) / len(nums))
        elif m == "min":
            out[m] = min(nums)
        elif m == "max":
            out[m] = max(nums)
        elif m == "stddev":
            out[m] = statistics.pstdev(nums)
        elif m == "sumsq":
            out[m] = _double(sum((Fraction(x) ** 2 for x in nums), Fraction(0)))
    return out


Bucket = tuple[int, str, str | None, str, str, dict[str, Any]]


def aggregate(
    recs: list[Rec], q: TemporalQuery, pks: list[int], attrs: list[str] | None
) -> list[Bucket]:
    """(e, iri, ds, start, end, values) of the expected non-empty periods, unordered."""
    prop = q.timeproperty
    lo, hi = window(q)
    attrs_of: dict[tuple[int, str], list[Rec]] = {}
    for r in recs:
        if r.e in pks and (attrs is None or r.iri in attrs) and in_window(r, q):
            attrs_of.setdefault((r.e, r.iri), []).append(r)
    out: list[Bucket] = []
    for (e, iri), rs in attrs_of.items():
        # periods start at timeAt, or at the attribute's first instance in the window
        origin = us(q.time_at) if q.time_at else min(r.times[prop] for r in rs)
        groups: dict[tuple[str | None, int, int], list[Rec]] = {}
        for r in rs:
            span = (0, 0) if q.aggr_period is None else bucket(r.times[prop], origin, q)
            groups.setdefault((r.ds, *span), []).append(r)
        for (ds, s, t), members in groups.items():
            if q.aggr_period is None:
                first = min(r.times[prop] for r in members)
                last = max(r.times[prop] for r in members)
                start, end = (first if lo is None else lo), (last if hi is None else hi)
            else:
                start = max(s if lo is None else max(s, lo), FIRST)
                end = min(t if hi is None else min(t, hi), LAST)
            out.append((e, iri, ds, iso(start), iso(end), methods(members, q.aggr_methods)))
    return out


def close(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
