"""Query builders over ``attr_history``: instances and per-period aggregates, per dialect.

Builders return ``(sql, params)`` with ``?`` placeholders for SQLite and ``%s`` for psycopg;
``decode_*`` turn the fetched rows into dialect-neutral objects (times as ``...ffffffZ`` texts).

Aggregation runs in SQL only. Periods ("buckets") are aligned to timeAt when the query has one
(also for ``before``: timeAt is then the end of the last bucket), else to the first instance
of each attribute in the window. Buckets without instances are left out. A bucket is reported
clipped to the window (``between`` may end inside the last bucket). Without
aggrPeriodDuration the whole window is one bucket, reported as [timeAt or first instance,
endTimeAt/timeAt or last instance].

* No GROUP BY over a computed bucket: SQLite sorts every row for it (~340 ms for 1M rows) and
  PostgreSQL plans a sort too (it cannot estimate the bucket count). Instead a recursive CTE
  walks the non-empty buckets of each attribute, one index seek each (the first time at or
  after the previous bucket's end), and each bucket is aggregated over its own index range
  (~80 ms for 1M rows on SQLite, index-only). SQLite has no multi-column scalar subquery: the
  aggregates come packed in one text, REALs written with 17 digits so they round-trip.
  PostgreSQL aggregates each bucket in a LATERAL subquery.
* Calendar periods (P1M, P1Y): the bucket edges ``origin + k months`` (day clamped to the
  month's end) are enumerated between the first and last instance, each bucket aggregated
  over its index range. Same edges on both backends (PostgreSQL's timestamp + interval).
* The ends of time: a bucket that would end after 9999-12-31T23:59:59.999999Z ends there (its
  SQL bound is the microsecond after, so it holds the instances up to that last time), and
  one that would start before 0001-01-01T00:00:00Z starts there. SQLite's date functions give
  NULL past year 9999 and PostgreSQL's timestamps stop before 4714 BC, so edges are cut
  before either computes them.
* datasetId: each (attribute, datasetId) is aggregated separately. lastN keeps the last N
  instances per (entity, attribute), all datasetIds together.
* stddev is the population standard deviation. SQLite computes the variance from sums
  shifted by a value of the same bucket (no catastrophic cancellation for values far from
  0), the square root is taken here; PostgreSQL uses stddev_pop.
* Run the PostgreSQL queries with ``POSTGRES_OPTIONS`` (JIT off).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeAlias

import orjson

from cityward.bank.errors import BadRequestData
from cityward.bank.query.indexer import path_id
from cityward.bank.temporal.params import AggrMethod, TemporalQuery
from cityward.bank.temporal.times import (
    FIRST_US,
    LAST_US,
    datetime_to_us,
    iso_to_us,
    us_to_datetime,
    us_to_iso,
)

Dialect: TypeAlias = Literal["sqlite", "postgres"]
Value: TypeAlias = int | float | None

# libpq options for connections that run these queries on PostgreSQL. The planner's row
# estimates for the bucket CTEs are guesses (a recursive CTE, generate_series, LATERAL per
# bucket) that easily pass jit_above_cost, and JIT-compiling a plan that then reads a few
# index ranges costs 0.1-1.5 s; these queries never gain from JIT.
POSTGRES_OPTIONS = "-c jit=off"

# the payload member of each attribute kind (an instance has exactly one of them)
_PAYLOADS = ("value", "object", "languageMap", "valueList", "objectList", "json", "vocab")
_MARK = re.compile(r":p_([a-z0-9_]+)")
# Bucket edges past the times the bank holds are cut to these: the first time, and the end of
# time (the microsecond after the last, an exclusive bound); month numbers are year * 12 +
# month - 1. PostgreSQL's timestamps reach further, but psycopg loads years 1-9999 only.
_END_US = LAST_US + 1
_FIRST_MONTH = 1 * 12
_END_MONTH = 10_000 * 12
_PG_FIRST = "'0001-01-01 00:00:00+00'::timestamptz"
_PG_LAST = "'9999-12-31 23:59:59.999999+00'::timestamptz"
_PG_END = "'10000-01-01 00:00:00+00'::timestamptz"
# Wide aggregation on SQLite: values scaled by 2^-64 sum up without overflow (2^63 rows of the
# largest double stay below 2^1023), by 2^-544 before they are squared. The scaling is exact
# but for values below 2^-958 (2^-478 squared), which only matter beside a total that
# overflowed. On PostgreSQL: the greatest double, and half the least subnormal rounded up (a
# numeric below it would round to 0, which float8 refuses as an underflow).
_SCALE = 64
_SCALE_SQ = 544
_PG_MAX = "1.7976931348623157e308"
_PG_TINY = "2.4703282292062328e-324"


@dataclass(frozen=True, slots=True)
class HistoryInstance:
    """One recorded instance; ``time`` is its timeproperty, ``inst`` the instance with its
    createdAt/modifiedAt restored."""

    e: int
    path: int
    iri: str
    id: int
    ds: str | None
    time: str
    inst: dict[str, Any]


@dataclass(frozen=True, slots=True)
class AggregateBucket:
    """The aggregates of one attribute (and datasetId) over the period ``[start, end)``."""

    e: int
    path: int
    iri: str
    ds: str | None
    start: str
    end: str
    values: dict[AggrMethod, Value]


class _Sql:
    """SQL written with ``:p_name`` markers, rendered to positional placeholders.

    Fragments (the time window) appear several times in one statement; markers let them be
    written once and still bind positionally (sqlite3 ``?``, psycopg ``%s``).
    """

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.values: dict[str, Any] = {}

    def time(self, iso: str) -> Any:
        """A time parameter as the backend stores it."""
        us = iso_to_us(iso)
        return us if self.dialect == "sqlite" else us_to_datetime(us)

    def render(self, sql: str) -> tuple[str, list[Any]]:
        params: list[Any] = []
        mark = "?" if self.dialect == "sqlite" else "%s"

        def sub(m: re.Match[str]) -> str:
            params.append(self.values[m.group(1)])
            return mark

        return _MARK.sub(sub, sql), params


def _prepare(
    dialect: Dialect, q: TemporalQuery, pks: Sequence[int], attrs: Sequence[str] | None
) -> tuple[_Sql, str]:
    """Bind the shared values; return the builder and the series CTEs (``s(e, path)``)."""
    if dialect not in ("sqlite", "postgres"):
        raise ValueError(f"unknown dialect {dialect!r}")
    b = _Sql(dialect)
    keys = sorted({int(pk) for pk in pks})
    paths = None if attrs is None else sorted({path_id(iri) for iri in attrs})
    _bind_window(b, q)
    if dialect == "sqlite":
        b.values["pks"] = orjson.dumps(keys).decode()
        pk_cte = "pk(e) AS (SELECT value FROM json_each(:p_pks))"
        if paths is not None:
            b.values["paths"] = orjson.dumps(paths).decode()
            return b, (
                f"{pk_cte}, s(e, path) AS (SELECT pk.e, a.value FROM pk, json_each(:p_paths) a)"
            )
    else:
        b.values["pks"] = keys
        pk_cte = "pk(e) AS (SELECT unnest(:p_pks::bigint[]))"
        if paths is not None:
            b.values["paths"] = paths
            return b, (
                f"{pk_cte}, s(e, path) AS "
                "(SELECT pk.e, a.path FROM pk, unnest(:p_paths::bigint[]) a(path))"
            )
    # Every attribute of the entities: walk the distinct paths of each entity in the index,
    # one seek per attribute, instead of reading all of its history.
    return b, (
        f"{pk_cte}, s0(e, path) AS ("
        "SELECT pk.e, (SELECT min(x.path) FROM attr_history x WHERE x.e = pk.e) FROM pk "
        "UNION ALL SELECT s0.e, (SELECT min(x.path) FROM attr_history x "
        "WHERE x.e = s0.e AND x.path > s0.path) FROM s0 WHERE s0.path IS NOT NULL), "
        "s(e, path) AS (SELECT e, path FROM s0 WHERE path IS NOT NULL)"
    )


def _bind_window(b: _Sql, q: TemporalQuery) -> None:
    """Bind the time window's bounds (``:p_lo``, ``:p_hi``) that :func:`_window` names."""
    if q.lower is not None:
        b.values["lo"] = b.time(q.lower)
    if q.upper is not None:
        b.values["hi"] = b.time(q.upper)


def _window(q: TemporalQuery, alias: str) -> str:
    """`` AND ...`` conditions of the time window on ``alias``'s time column."""
    col = f"{alias}.{q.column}"
    out = ""
    if q.lower is not None:
        out += f" AND {col} >= :p_lo"
    if q.upper is not None:
        out += f" AND {col} < :p_hi"
    return out


# ---------------------------------------------------------------------------------------------
# instances


def instances_sql(
    dialect: Dialect,
    q: TemporalQuery,
    pks: Sequence[int],
    attrs: Sequence[str] | None = None,
    *,
    limit: int | None = None,
) -> tuple[str, list[Any]]:
    """Instances of the entities ``pks`` (of the attributes ``attrs``, IRIs; None: all) in the
    time window, ascending by (e, path, time, id).

    With ``q.last_n`` only the newest N of each (entity, attribute) are kept; ``limit`` caps
    each (entity, attribute) too (the oldest ``limit``, or the newest when lastN is set), for
    the caller's 206 paging: ask for one more than you send to know there is more.
    Rows decode with ``decode_instances``.
    """
    b, series = _prepare(dialect, q, pks, attrs)
    col = q.column
    cap = q.last_n
    if limit is not None:
        cap = limit if cap is None else min(cap, limit)
    order = "DESC" if q.last_n is not None else "ASC"
    if cap is not None:
        b.values["n"] = int(cap)
    cols = "h.e, h.path, a.iri, h.id, h.ds, h.obs, h.created, h.modified, h.inst"
    if dialect == "sqlite":
        if cap is None:
            body = (
                f"FROM s CROSS JOIN attr_history h JOIN attr_history_attrs a ON a.path = h.path "
                f"WHERE h.e = s.e AND h.path = s.path{_window(q, 'h')}"
            )
        else:
            # The ids of each attribute's first/last N come from its index, newest first by
            # reading it backwards; the rows are then fetched by rowid.
            body = (
                "FROM s CROSS JOIN attr_history h JOIN attr_history_attrs a ON a.path = h.path "
                "WHERE h.id IN (SELECT x.id FROM attr_history x WHERE x.e = s.e "
                f"AND x.path = s.path{_window(q, 'x')} "
                f"ORDER BY x.{col} {order}, x.id {order} LIMIT :p_n)"
            )
    else:
        tail = "" if cap is None else f" ORDER BY x.{col} {order}, x.id {order} LIMIT :p_n"
        body = (
            "FROM s CROSS JOIN LATERAL (SELECT x.* FROM attr_history x "
            f"WHERE x.e = s.e AND x.path = s.path{_window(q, 'x')}{tail}) h "
            "JOIN attr_history_attrs a ON a.path = h.path"
        )
    sql = f"WITH RECURSIVE {series} SELECT {cols} {body} ORDER BY h.e, h.path, h.{col}, h.id"
    return b.render(sql)


def recorded_attrs_sql(
    dialect: Dialect, attrs: Sequence[str], q: TemporalQuery | None = None
) -> tuple[str, list[Any]]:
    """A condition on ``e`` (a row of ``entities``), with ``?`` placeholders as the store's
    query conditions have: the history holds an instance of one of the attributes ``attrs``
    (IRIs) in the time window of ``q`` (on its timeproperty; None or no timerel: at any time),
    whether or not the entity still has the attribute. One index range seek per attribute
    (per month partition on PostgreSQL, those of the window when it is on observedAt): the
    (e, path, time) index of the timeproperty. On SQLite, settle the staged rows
    (bank.history) first."""
    if dialect not in ("sqlite", "postgres"):
        raise ValueError(f"unknown dialect {dialect!r}")
    paths = sorted({path_id(iri) for iri in attrs})
    if not paths:
        return "1 = 0", []
    params: list[Any] = list(paths)
    window = ""
    if q is not None:
        b = _Sql(dialect)
        col = f"h.{q.column}"
        if q.lower is not None:
            window += f" AND {col} >= ?"
            params.append(b.time(q.lower))
        if q.upper is not None:
            window += f" AND {col} < ?"
            params.append(b.time(q.upper))
    marks = ", ".join("?" * len(paths))
    # OFFSET 0: PostgreSQL would rewrite a correlated EXISTS into a hash over every matching
    # row (see cityward.bank.query.sqlgen); it stays a per-entity seek
    per_row = " OFFSET 0" if dialect == "postgres" else ""
    return (
        f"EXISTS (SELECT 1 FROM attr_history h WHERE h.e = e.pk AND h.path IN ({marks})"
        f"{window}{per_row})",
        params,
    )


def kinds_sql(
    dialect: Dialect, q: TemporalQuery, keys: Sequence[tuple[int, int, str | None]]
) -> tuple[str, list[Any]]:
    """The kind (``type``) of the newest instance in the time window of each (entity pk,
    attribute path, datasetId) of ``keys`` (None: the default instance): rows
    ``(e, path, ds, type)``, ``type`` NULL when the window holds no such instance.

    Per datasetId, not per attribute: the datasets of one attribute are separate series, and
    each may be of another kind (a Property under one datasetId, a Relationship under
    another). One index range per key, read newest first up to its first instance of that
    datasetId.
    """
    if dialect not in ("sqlite", "postgres"):
        raise ValueError(f"unknown dialect {dialect!r}")
    b = _Sql(dialect)
    _bind_window(b, q)
    col = q.column
    rows = sorted(
        {(int(e), int(path), ds) for e, path, ds in keys}, key=lambda k: (k[0], k[1], k[2] or "")
    )
    if dialect == "sqlite":
        b.values["keys"] = orjson.dumps([list(k) for k in rows]).decode()
        keys_cte = (
            "k(e, path, ds) AS (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
            "json_extract(value, '$[2]') FROM json_each(:p_keys))"
        )
        kind = "json_extract(x.inst, '$.type')"
        same_ds = "x.ds IS k.ds"
    else:
        b.values.update(ke=[k[0] for k in rows], kp=[k[1] for k in rows], kd=[k[2] for k in rows])
        keys_cte = (
            "k(e, path, ds) AS (SELECT * FROM "
            "unnest(:p_ke::bigint[], :p_kp::bigint[], :p_kd::text[]))"
        )
        kind = "x.inst::json ->> 'type'"
        same_ds = "x.ds IS NOT DISTINCT FROM k.ds"
    sql = (
        f"WITH {keys_cte} SELECT k.e, k.path, k.ds, (SELECT {kind} FROM attr_history x "
        f"WHERE x.e = k.e AND x.path = k.path AND {same_ds}{_window(q, 'x')} "
        f"ORDER BY x.{col} DESC, x.id DESC LIMIT 1) FROM k"
    )
    return b.render(sql)


def _iso(dialect: Dialect, value: Any) -> str:
    if dialect == "sqlite":
        return us_to_iso(int(value))
    assert isinstance(value, datetime)
    return us_to_iso(datetime_to_us(value))


def decode_instances(
    dialect: Dialect, q: TemporalQuery, rows: Sequence[Sequence[Any]]
) -> list[HistoryInstance]:
    """The rows of ``instances_sql`` as HistoryInstance objects."""
    out: list[HistoryInstance] = []
    which = {"obs": 5, "created": 6, "modified": 7}[q.column]
    for row in rows:
        e, path, iri, id_, ds, _, created, modified, raw = row[:9]
        inst = orjson.loads(raw)
        inst["createdAt"] = _iso(dialect, created)
        inst["modifiedAt"] = _iso(dialect, modified)
        out.append(
            HistoryInstance(
                e=int(e),
                path=int(path),
                iri=str(iri),
                id=int(id_),
                ds=ds,
                time=_iso(dialect, row[which]),
                inst=inst,
            )
        )
    return out


def decode_instance_values(
    q: TemporalQuery, rows: Sequence[Sequence[Any]]
) -> list[tuple[int, str, str | None, dict[str, Any]]]:
    """The rows of ``instances_sql`` as (time in microseconds, attribute IRI, datasetId,
    instance): for readers of the values (the anomaly service's warm start), without the
    API's ISO texts, which were a third of such a reader's time."""
    which = {"obs": 5, "created": 6, "modified": 7}[q.column]
    return [(_us(row[which]), str(row[2]), row[4], orjson.loads(row[8])) for row in rows]


# ---------------------------------------------------------------------------------------------
# aggregation


def _fmt(expr: str) -> str:
    """A REAL as text that parses back to the same double ('' for NULL)."""
    return f"CASE WHEN {expr} IS NULL THEN '' ELSE printf('%!.17g', {expr}) END"


def _variance(d: str) -> str:
    """The population variance of the shifted values ``d`` (a shift keeps the difference of
    the sums from cancelling out for values far from 0)."""
    return f"((sum({d} * {d}) - sum({d}) * sum({d}) / count(x.num)) / count(x.num))"


def _wide(plain: str, scaled: str, mark: str = "") -> str:
    """``plain`` where it is finite, else ``scaled`` (marked): a bucket without overflow keeps
    its double-precision answer to the last bit."""
    return (
        f"CASE WHEN count(x.num) = 0 THEN '' WHEN abs({plain}) <= :p_max "
        f"THEN printf('%!.17g', {plain}) ELSE '{mark}' || printf('%!.17g', {scaled}) END"
    )


def _sqlite_fields(methods: Sequence[AggrMethod], whole: bool, col: str, wide: bool) -> str:
    """The packed aggregates of alias ``x`` (``bk.c`` is the stddev shift of the bucket).

    A total past the double range is infinity in SQLite (and inf - inf is NULL); decoding
    notices it, and ``wide`` runs again: there values scaled by 2^-64 (2^-544 before they are
    squared) are summed and scaled back, which cannot overflow for 2^63 rows.
    """
    payload = "json_extract(x.inst, " + ", ".join(f"'$.{p}'" for p in _PAYLOADS) + ")"
    variance = _variance("(x.num - bk.c)")
    exprs = {
        "totalCount": "count(*)",
        "distinctCount": (
            f"count(DISTINCT x.num) + count(DISTINCT CASE WHEN x.num IS NULL THEN {payload} END)"
        ),
        "sum": _fmt("sum(x.num)"),
        "avg": _fmt("avg(x.num)"),
        "min": _fmt("min(x.num)"),
        "max": _fmt("max(x.num)"),
        # the variance; sqrt is taken in decode (SQLite may lack math functions)
        "stddev": (
            f"CASE WHEN count(x.num) = 0 THEN '' WHEN {variance} IS NULL THEN 'NaN' "
            f"ELSE printf('%!.17g', {variance}) END"
        ),
        "sumsq": _fmt("sum(x.num * x.num)"),
    }
    if wide:
        lo, sq = "x.num * :p_down", "(x.num * :p_down_sq)"
        exprs["sum"] = _wide("sum(x.num)", f"sum({lo}) * :p_up")
        # the mean lies within the values: never past the range, whatever rounding does
        mean = f"sum({lo}) / count(x.num) * :p_up"
        exprs["avg"] = _wide("avg(x.num)", f"min(max({mean}, min(x.num)), max(x.num))")
        exprs["sumsq"] = _wide("sum(x.num * x.num)", f"sum({sq} * {sq}) * :p_up_sq * :p_up_sq")
        # S: the variance of the values scaled by 2^-544 (decode takes the root, scales back)
        exprs["stddev"] = _wide(variance, _variance(f"({sq} - bk.c * :p_down_sq)"), "S")
    fields = [exprs[m] for m in methods]
    if whole:  # the first and last instance time of each datasetId
        fields += [f"min(x.{col})", f"max(x.{col})"]
    # parenthesized: || binds tighter than + in SQLite
    return " || ',' || ".join(f"({f})" for f in fields)


def _first(q: TemporalQuery, alias: str, fn: str = "min") -> str:
    """The first (or last) time of the attribute ``alias`` in the window: an index seek."""
    return (
        f"(SELECT {fn}(x.{q.column}) FROM attr_history x "
        f"WHERE x.e = {alias}.e AND x.path = {alias}.path{_window(q, 'x')})"
    )


def _sqlite_aggregate(
    b: _Sql, q: TemporalQuery, series: str, methods: Sequence[AggrMethod], wide: bool
) -> str:
    col = q.column
    win = _window(q, "x")
    period = q.aggr_period
    whole = period is None
    upper = f" AND x.{col} < :p_hi" if q.upper is not None else ""

    # SQLite seeks an index on one lower and one upper bound only, picked when the statement is
    # prepared: "t >= :lo AND t >= bucket_start" would scan each bucket from the window start.
    # So a bucket's bounds and the window's are folded into one max()/min() each.
    def above(expr: str) -> str:
        return f"max({expr}, :p_lo)" if q.lower is not None else expr

    def below(expr: str) -> str:
        return f"min({expr}, :p_hi)" if q.upper is not None else expr

    def shift(alias: str, lower: str | None) -> str:
        """A number of the bucket that starts at ``lower``: stddev sums are taken relative to
        it, so that their difference does not cancel out for values far from 0."""
        if "stddev" not in methods:
            return "0"
        since = win if lower is None else f" AND x.{col} >= {above(lower)}{upper}"
        return (
            f"(SELECT x.num FROM attr_history x WHERE x.e = {alias}.e AND x.path = {alias}.path "
            f"AND x.num IS NOT NULL{since} ORDER BY x.{col} LIMIT 1)"
        )

    if q.time_at is not None:
        b.values["origin"] = b.time(q.time_at)
        origin = ":p_origin"
    else:
        origin = _first(q, "s")
    ctes = [
        series,
        "g(e, path, o, has_ds) AS (SELECT s.e, s.path, "
        f"{origin}, EXISTS (SELECT 1 FROM attr_history x WHERE x.e = s.e AND x.path = s.path "
        "AND x.ds IS NOT NULL) FROM s)",
    ]
    # bk: one row per bucket. MATERIALIZED: its c must be a value, not a subquery that SQLite
    # could copy into the aggregates and run for every row.
    bk = "bk(e, path, has_ds, bs, be, c) AS MATERIALIZED"
    if period is None:
        ctes.append(
            f"{bk} (SELECT e, path, has_ds, 0, 0, {shift('g', None)} FROM g "
            f"WHERE {_first(q, 'g')} IS NOT NULL)"
        )
    elif not period.calendar:
        w = period.micros

        def start(t: str) -> str:  # the start of the bucket holding t (floor, also before o)
            return f"({t} - ((({t} - o) % {w}) + {w}) % {w})"

        # one index seek per non-empty bucket: the first time at or after the bucket's end
        ctes.append(
            f"lp(e, path, o, has_ds, t) AS (SELECT e, path, o, has_ds, {_first(q, 'g')} "
            "FROM g UNION ALL SELECT e, path, o, has_ds, "
            f"(SELECT min(x.{col}) FROM attr_history x WHERE x.e = lp.e AND x.path = lp.path "
            f"AND x.{col} >= {above(start('lp.t') + f' + {w}')}{upper}) "
            "FROM lp WHERE lp.t IS NOT NULL)"
        )
        ctes.append(
            f"{bk} (SELECT e, path, has_ds, {start('t')}, {start('t')} + {w}, "
            f"{shift('lp', 't')} FROM lp WHERE t IS NOT NULL)"
        )
    else:
        m = period.months

        def secs(us: str) -> str:  # floor to whole seconds (times before 1970 are negative)
            return f"(({us}) - ((({us}) % 1000000) + 1000000) % 1000000) / 1000000"

        def month_no(us: str) -> str:  # year * 12 + month - 1
            return (
                f"(CAST(strftime('%Y', {secs(us)}, 'unixepoch') AS INTEGER) * 12 + "
                f"CAST(strftime('%m', {secs(us)}, 'unixepoch') AS INTEGER) - 1)"
            )

        def fdiv(a: str) -> str:
            return f"((({a}) - (((({a}) % {m}) + {m}) % {m})) / {m})"

        def add_months(n: str) -> str:  # o + n months, the day clamped to the month's length
            tm = f"(omn + {n})"
            base = f"printf('%04d-%02d-01', {tm} / 12, {tm} % 12 + 1)"
            # the month's length by hand: strftime gives NULL for December 9999 + 1 month
            y = f"({tm} / 12)"
            leap = f"({y} % 4 = 0 AND ({y} % 100 <> 0 OR {y} % 400 = 0))"
            dim = (
                f"(CASE {tm} % 12 WHEN 1 THEN 28 + {leap} WHEN 3 THEN 30 WHEN 5 THEN 30 "
                "WHEN 8 THEN 30 WHEN 10 THEN 30 ELSE 31 END)"
            )
            at = (
                f"((CAST(strftime('%s', {base}) AS INTEGER) + (min(oday, {dim}) - 1) * 86400)"
                " * 1000000 + otod)"
            )
            return (
                f"(CASE WHEN {tm} >= {_END_MONTH} THEN {_END_US} "
                f"WHEN {tm} < {_FIRST_MONTH} THEN {FIRST_US} ELSE {at} END)"
            )

        ctes.append(
            "g2(e, path, o, has_ds, tf) AS (SELECT * FROM (SELECT e, path, o, has_ds, "
            f"{_first(q, 'g')} AS tf FROM g) WHERE tf IS NOT NULL)"
        )
        # One index seek per non-empty period, as for hours and days: instances spread over
        # centuries have hundreds of thousands of months between them, mostly empty (every
        # period from the first to the last took 4 s for 0001 to 9999 by months). Two rows a
        # period: one with t, the first time in it, whose k (the period's number) the next
        # row computes; from k, the next row seeks the first time after the period.
        kc = fdiv(f"{month_no('t')} - omn")  # t's month's period, or the one after t's
        ctes.append(
            "g3(e, path, has_ds, omn, oday, otod, t, k) AS (SELECT e, path, has_ds, "
            f"{month_no('o')}, CAST(strftime('%d', {secs('o')}, 'unixepoch') AS INTEGER), "
            "((o % 86400000000) + 86400000000) % 86400000000, tf, NULL FROM g2 "
            "UNION ALL SELECT e, path, has_ds, omn, oday, otod, CASE WHEN k IS NULL THEN t "
            f"ELSE (SELECT min(x.{col}) FROM attr_history x WHERE x.e = g3.e "
            f"AND x.path = g3.path AND x.{col} >= {above(add_months(f'(k + 1) * {m}'))}{upper}) "
            f"END, CASE WHEN k IS NULL THEN {kc} - ({add_months(f'{kc} * {m}')} > t) END "
            "FROM g3 WHERE t IS NOT NULL)"
        )
        ctes.append(
            f"b0(e, path, has_ds, bs, be) AS (SELECT e, path, has_ds, "
            f"{add_months(f'k * {m}')}, {add_months(f'(k + 1) * {m}')} FROM g3 "
            "WHERE k IS NOT NULL)"
        )
        ctes.append(f"{bk} (SELECT e, path, has_ds, bs, be, {shift('b0', 'bs')} FROM b0)")
    if whole:
        cond = f"x.e = bk.e AND x.path = bk.path{win}"
    else:
        cond = (
            f"x.e = bk.e AND x.path = bk.path AND x.{col} >= {above('bk.bs')} "
            f"AND x.{col} < {below('bk.be')}"
        )
    fields = _sqlite_fields(methods, whole, col, wide)
    if wide:
        b.values.update(
            max=sys.float_info.max,
            down=2.0**-_SCALE,
            up=2.0**_SCALE,
            down_sq=2.0**-_SCALE_SQ,
            up_sq=2.0**_SCALE_SQ,
        )
    plain = (
        f"(SELECT CASE WHEN count(*) > 0 THEN char(31) || {fields} END "
        f"FROM attr_history x WHERE {cond})"
    )
    # only attributes with datasetIds pay for grouping (a sort of each bucket's rows)
    grouped = (
        "(SELECT group_concat(ifnull(y.ds, '') || char(31) || y.f, char(30)) FROM "
        f"(SELECT x.ds AS ds, {fields} AS f FROM attr_history x WHERE {cond} GROUP BY x.ds) y)"
    )
    # MATERIALIZED: else SQLite may inline r and run the aggregate twice (WHERE and SELECT)
    ctes.append(
        "r AS MATERIALIZED (SELECT bk.e, bk.path, bk.bs, bk.be, "
        f"CASE WHEN bk.has_ds THEN {grouped} ELSE {plain} END AS agg FROM bk)"
    )
    return (
        "WITH RECURSIVE " + ", ".join(ctes) + " SELECT r.e, r.path, a.iri, r.bs, r.be, r.agg "
        "FROM r JOIN attr_history_attrs a ON a.path = r.path WHERE r.agg IS NOT NULL "
        "ORDER BY r.e, r.path, r.bs"
    )


def _pg_double(expr: str) -> str:
    """A numeric as double precision: NULL past its range, 0 below its least subnormal
    (PostgreSQL refuses both conversions)."""
    return (
        f"(CASE WHEN abs({expr}) > {_PG_MAX} THEN NULL WHEN abs({expr}) < {_PG_TINY} "
        f"THEN 0::float8 ELSE ({expr})::float8 END)"
    )


def _pg_aggregates(methods: Sequence[AggrMethod], wide: bool) -> str:
    """The aggregates of alias ``x``, one column each.

    float8 arithmetic raises NumericValueOutOfRange past the double range (sum, avg and
    stddev_pop accumulate sums of squares; x * x also on underflow); ``wide`` then runs it
    again in numeric (exact from the values' shortest texts; float8::numeric keeps only 15
    digits). Four times slower, so only then.
    """
    payload = "coalesce(" + ", ".join(f"x.inst::json -> '{p}'" for p in _PAYLOADS) + ")::text"
    if wide:
        n = "x.num::text::numeric"
        exact = {
            "sum": _pg_double(f"sum({n})"),
            # the mean lies within the values: the clamp only catches rounding
            "avg": _pg_double(f"least(greatest(sum({n}) / count(x.num), min({n})), max({n}))"),
            "stddev": _pg_double(f"stddev_pop({n})"),
            "sumsq": _pg_double(f"sum({n} * {n})"),
        }
    exprs = {
        "totalCount": "count(*)",
        "distinctCount": (
            f"count(DISTINCT x.num) + count(DISTINCT CASE WHEN x.num IS NULL THEN {payload} END)"
        ),
        "sum": "sum(x.num)",
        "avg": "avg(x.num)",
        "min": "min(x.num)",
        "max": "max(x.num)",
        "stddev": "stddev_pop(x.num)",
        "sumsq": "sum(x.num * x.num)",
    }
    if wide:
        exprs.update(exact)
    return ", ".join(f"{exprs[m]} AS v{i}" for i, m in enumerate(methods))


def _pg_aggregate(
    b: _Sql, q: TemporalQuery, series: str, methods: Sequence[AggrMethod], wide: bool
) -> str:
    col = q.column
    win = _window(q, "x")
    period = q.aggr_period
    if q.time_at is not None:
        b.values["origin"] = b.time(q.time_at)
        origin = ":p_origin::timestamptz"
    else:
        origin = _first(q, "s")
    if period is not None and not period.calendar:
        # The origin moved to the first bucket edge after 0001-01-01 (the same edges): before
        # it, date_bin would compute an edge before 4714 BC, which PostgreSQL refuses, for a
        # bucket that starts at 0001-01-01 anyway.
        origin = f"date_bin(:p_w::interval, {_PG_FIRST} + :p_w::interval, {origin})"
    ctes = [series, f"g AS (SELECT s.e, s.path, {origin} AS o FROM s)"]
    # Buckets are enumerated first and each is aggregated over its own index range, like on
    # SQLite: a GROUP BY over computed buckets is planned with a sort of every row (the
    # planner cannot estimate the bucket count), three times slower than this.
    cond = f"x.e = bk.e AND x.path = bk.path{win}"
    extra = ""
    if period is None:
        ctes.append("bk AS (SELECT e, path FROM g)")
        extra = f"min(x.{col}) AS bs, max(x.{col}) AS be, "
        bounds = "r.bs, r.be"
    elif not period.calendar:
        # hours and seconds, never days: timestamptz + '1 day' follows the session time zone's
        # DST changes (23 or 25 hours); psycopg would send a timedelta as days
        hours, rest = divmod(period.micros, 3_600_000_000)
        b.values["w"] = f"{hours} hours {rest // 1_000_000}.{rest % 1_000_000:06d} seconds"

        def start(t: str, o: str) -> str:  # times before o are in the bucket cut at 0001
            return (
                f"(CASE WHEN {t} >= {o} THEN date_bin(:p_w::interval, {t}, {o}) "
                f"ELSE {_PG_FIRST} END)"
            )

        def end(t: str, o: str) -> str:
            return f"(CASE WHEN {t} >= {o} THEN {start(t, o)} + :p_w::interval ELSE {o} END)"

        # one index seek per non-empty bucket: the first time at or after the bucket's end
        ctes.append(
            f"lp AS (SELECT g.e, g.path, g.o, {_first(q, 'g')} AS t FROM g UNION ALL "
            f"SELECT lp.e, lp.path, lp.o, (SELECT min(x.{col}) FROM attr_history x "
            f"WHERE x.e = lp.e AND x.path = lp.path{win} "
            f"AND x.{col} >= {end('lp.t', 'lp.o')}) "
            "FROM lp WHERE lp.t IS NOT NULL)"
        )
        ctes.append(
            f"bk AS (SELECT e, path, {start('t', 'o')} AS bs, "
            f"{end('t', 'o')} AS be FROM lp WHERE t IS NOT NULL)"
        )
        cond += f" AND x.{col} >= bk.bs AND x.{col} < bk.be"
        bounds = "bk.bs, bk.be"
    else:
        m = period.months

        def month_no(ts: str) -> str:
            return f"(extract(year FROM {ts})::int * 12 + extract(month FROM {ts})::int - 1)"

        def fdiv(a: str) -> str:
            return f"floor(({a})::numeric / {m})::int"

        def add_months(n: str) -> str:  # in UTC: timestamp + interval clamps the day
            tm = f"({month_no('lp.ou')} + {n})"
            return (
                f"(CASE WHEN {tm} >= {_END_MONTH} THEN {_PG_END} "
                f"WHEN {tm} < {_FIRST_MONTH} THEN {_PG_FIRST} "
                f"ELSE (lp.ou + make_interval(months => {n})) AT TIME ZONE 'UTC' END)"
            )

        # one index seek per non-empty period, in two rows a period (see _sqlite_aggregate)
        t_utc = "lp.t AT TIME ZONE 'UTC'"
        kc = fdiv(f"{month_no(t_utc)} - {month_no('lp.ou')}")
        ctes.append(
            "lp AS (SELECT g.e, g.path, g.o AT TIME ZONE 'UTC' AS ou, "
            f"{_first(q, 'g')} AS t, NULL::int AS k FROM g UNION ALL "
            "SELECT lp.e, lp.path, lp.ou, CASE WHEN lp.k IS NULL THEN lp.t ELSE "
            f"(SELECT min(x.{col}) FROM attr_history x WHERE x.e = lp.e AND x.path = lp.path"
            f"{win} AND x.{col} >= {add_months(f'(lp.k + 1) * {m}')}) END, "
            f"CASE WHEN lp.k IS NULL THEN {kc} - "
            f"(CASE WHEN {add_months(f'{kc} * {m}')} > lp.t THEN 1 ELSE 0 END) END "
            "FROM lp WHERE lp.t IS NOT NULL)"
        )
        ctes.append(
            f"bk AS (SELECT lp.e, lp.path, {add_months(f'lp.k * {m}')} AS bs, "
            f"{add_months(f'(lp.k + 1) * {m}')} AS be FROM lp WHERE lp.k IS NOT NULL)"
        )
        cond += f" AND x.{col} >= bk.bs AND x.{col} < bk.be"
        bounds = "bk.bs, bk.be"
    if period is not None:  # the end of time as the last time (psycopg loads no year 10000)
        bounds = f"bk.bs, least(bk.be, {_PG_LAST})"
    vals = ", ".join(f"r.v{i}" for i in range(len(methods)))
    return (
        "WITH RECURSIVE " + ", ".join(ctes) + f" SELECT bk.e, bk.path, a.iri, r.ds, {bounds}, "
        f"{vals} FROM bk CROSS JOIN LATERAL (SELECT x.ds, {extra}{_pg_aggregates(methods, wide)} "
        f"FROM attr_history x WHERE {cond} GROUP BY x.ds) r "
        "JOIN attr_history_attrs a ON a.path = bk.path ORDER BY 1, 2, 4 NULLS FIRST, 5"
    )


def aggregate_sql(
    dialect: Dialect,
    q: TemporalQuery,
    pks: Sequence[int],
    attrs: Sequence[str] | None = None,
    *,
    wide: bool = False,
) -> tuple[str, list[Any]]:
    """``q.aggr_methods`` per period of ``q.aggr_period`` (None: the whole window) for each
    (entity, attribute, datasetId) of the entities ``pks`` and attributes ``attrs`` (IRIs;
    None: all). Rows decode with ``decode_aggregates`` (the same ``wide``).

    sum, avg, stddev and sumsq are computed in double precision, where a total may pass its
    range (PostgreSQL then fails, SQLite gives infinity); ``wide`` computes them without
    that limit, at a cost: ``aggregates`` runs it only when the first attempt overflows. A
    sum or sumsq past the double range is then None; avg and stddev always have a value.
    """
    if not q.aggr_methods:
        raise BadRequestData("aggregatedValues needs aggrMethods", field="aggrMethods")
    b, series = _prepare(dialect, q, pks, attrs)
    if dialect == "sqlite":
        sql = _sqlite_aggregate(b, q, series, q.aggr_methods, wide)
    else:
        sql = _pg_aggregate(b, q, series, q.aggr_methods, wide)
    return b.render(sql)


class AggregateOverflow(Exception):
    """A total passed the double range: the aggregation must run again, wide."""


def aggregates(
    select: Callable[[str, list[Any]], Sequence[Sequence[Any]]],
    dialect: Dialect,
    q: TemporalQuery,
    pks: Sequence[int],
    attrs: Sequence[str] | None = None,
) -> list[AggregateBucket]:
    """``aggregate_sql`` run with ``select`` and decoded: in double precision, and again wide
    when a total overflowed it (see aggregate_sql), so that both stores give one answer."""
    import psycopg

    sql, params = aggregate_sql(dialect, q, pks, attrs)
    try:
        return decode_aggregates(dialect, q, select(sql, params))
    except (AggregateOverflow, psycopg.errors.NumericValueOutOfRange):
        pass
    sql, params = aggregate_sql(dialect, q, pks, attrs, wide=True)
    return decode_aggregates(dialect, q, select(sql, params), wide=True)


def _number(method: AggrMethod, text: str, wide: bool) -> Value:
    if text == "":
        return None
    if method in ("totalCount", "distinctCount"):
        return int(text)
    if text.startswith("S"):  # wide stddev: the variance of the values scaled by 2^-544
        return math.sqrt(max(float(text[1:]), 0.0)) * 2.0**_SCALE_SQ
    v = float(text)
    if not math.isfinite(v):  # SQLite's Inf, or NaN for inf - inf
        if not wide:
            raise AggregateOverflow(method)
        return None  # a total past the double range (JSON has no infinity)
    if method == "stddev":  # SQLite gives the variance; rounding can make it a hair below 0
        return math.sqrt(max(v, 0.0))
    return v


def _clip(q: TemporalQuery, start: int, end: int, whole: bool) -> tuple[str, str]:
    lo = None if q.lower is None else iso_to_us(q.lower)
    hi = None if q.upper is None else iso_to_us(q.upper)
    if whole:  # [lower or first instance, upper or last instance]
        return us_to_iso(start if lo is None else lo), us_to_iso(end if hi is None else hi)
    if lo is not None:
        start = max(start, lo)
    if hi is not None:
        end = min(end, hi)
    # a bucket cut at the end of time ends at the last time there is (and holds it)
    return us_to_iso(max(start, FIRST_US)), us_to_iso(min(end, LAST_US))


def _us(value: Any) -> int:
    if isinstance(value, datetime):
        return datetime_to_us(value.astimezone(UTC))
    return int(value)


def decode_aggregates(
    dialect: Dialect, q: TemporalQuery, rows: Sequence[Sequence[Any]], *, wide: bool = False
) -> list[AggregateBucket]:
    """The rows of ``aggregate_sql`` as buckets ordered by (e, path, datasetId, start).

    AggregateOverflow when a total passed the double range (SQLite) and ``wide`` is not set.
    """
    methods = q.aggr_methods
    whole = q.aggr_period is None
    out: list[tuple[tuple[int, int, bool, str, int], AggregateBucket]] = []

    def add(e: int, path: int, iri: str, ds: str | None, s: int, t: int, vals: list[Value]) -> None:
        start, end = _clip(q, s, t, whole)
        bucket = AggregateBucket(
            e=e,
            path=path,
            iri=iri,
            ds=ds,
            start=start,
            end=end,
            values=dict(zip(methods, vals, strict=True)),
        )
        out.append(((e, path, ds is not None, ds or "", s), bucket))

    for row in rows:
        if dialect == "sqlite":
            e, path, iri, bs, be, packed = row
            for entry in str(packed).split("\x1e"):
                ds_text, _, fields = entry.partition("\x1f")
                parts = fields.split(",")
                vals = [_number(m, p, wide) for m, p in zip(methods, parts, strict=False)]
                s, t = (int(parts[-2]), int(parts[-1])) if whole else (int(bs), int(be))
                add(int(e), int(path), str(iri), ds_text or None, s, t, vals)
        else:
            e, path, iri, ds, bs, be, *raw = row
            vals = []
            for m, v in zip(methods, raw, strict=True):
                vals.append(None if v is None else int(v) if m.endswith("Count") else float(v))
            add(int(e), int(path), str(iri), ds, _us(bs), _us(be), vals)
    out.sort(key=lambda item: item[0])
    return [bucket for _, bucket in out]
