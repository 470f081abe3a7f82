"""Instances and aggregates from real SQLite and PostgreSQL, checked against plain Python."""

from __future__ import annotations

import math
import statistics
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cityward.bank.errors import BadRequestData
from cityward.bank.query.indexer import path_id
from cityward.bank.temporal import (
    AGGR_METHODS,
    AggregateBucket,
    HistoryInstance,
    TemporalQuery,
    aggregate_sql,
    create_postgres,
    instance_row,
    parse_temporal_query,
)
from tests.bank.temporal import reference as ref
from tests.bank.temporal.conftest import HistoryDb

A = "https://ex.org/speed"
B = "https://ex.org/status"
NOW = "2030-01-01T00:00:00.000000Z"
MIN = 60_000_000
HOUR = 60 * MIN
BASE = ref.us("2024-01-10T00:00:00Z")
ALL = ",".join(AGGR_METHODS)


def payload(value: Any) -> dict[str, Any]:
    if isinstance(value, tuple):  # ("rel", uri)
        return {"type": "Relationship", "object": value[1]}
    return {"type": "Property", "value": value}


def store(db: HistoryDb, specs: list[dict[str, Any]]) -> list[ref.Rec]:
    """Insert instances described by dicts (e, iri, ds, obs, created, modified in µs, value)."""
    recs: list[ref.Rec] = []
    rows = []
    for n, spec in enumerate(specs):
        times = {
            "observedAt": spec["obs"],
            "createdAt": spec.get("created", spec["obs"]),
            "modifiedAt": spec.get("modified", spec["obs"]),
        }
        inst = payload(spec["value"])
        inst["unitCode"] = f"N{n}"  # tells which record an answer is
        if spec.get("ds"):
            inst["datasetId"] = spec["ds"]
        for key, t in times.items():
            inst[key] = ref.iso(t)
        e, iri = spec.get("e", 1), spec.get("iri", A)
        recs.append(ref.Rec(n, e, iri, spec.get("ds"), times, inst))
        rows.append(instance_row(e, iri, inst, NOW))
    db.insert(rows)
    return recs


def got_instances(found: list[HistoryInstance]) -> dict[tuple[int, str], list[tuple[int, str]]]:
    # the answer is grouped by (entity, attribute) in path-id order
    keys = [(i.e, i.path) for i in found]
    assert keys == sorted(keys)
    out: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for i in found:
        assert i.path == path_id(i.iri)
        out.setdefault((i.e, i.iri), []).append((int(i.inst["unitCode"][1:]), i.time))
    return out


def want_instances(expected: list[tuple[int, str, int, str]]) -> dict[Any, list[tuple[int, str]]]:
    out: dict[tuple[int, str], list[tuple[int, str]]] = {}
    for e, iri, n, t in expected:
        out.setdefault((e, iri), []).append((n, t))
    return out


def check_instances(
    db: HistoryDb,
    recs: list[ref.Rec],
    q: TemporalQuery,
    pks: list[int],
    attrs: list[str] | None = None,
    limit: int | None = None,
) -> None:
    found = db.instances(q, pks, attrs, limit)
    assert got_instances(found) == want_instances(ref.instances(recs, q, pks, attrs, limit))


def _key(b: ref.Bucket) -> tuple[Any, ...]:
    return (b[0], b[1], b[2] is not None, b[2] or "", b[3])


def check_aggregates(
    db: HistoryDb,
    recs: list[ref.Rec],
    q: TemporalQuery,
    pks: list[int],
    attrs: list[str] | None = None,
) -> list[AggregateBucket]:
    found = db.aggregate(q, pks, attrs)
    got = sorted(
        (
            (b.e, b.iri, b.ds, b.start, b.end, {str(k): v for k, v in b.values.items()})
            for b in found
        ),
        key=_key,
    )
    want = sorted(ref.aggregate(recs, q, pks, attrs), key=_key)
    assert [b[:5] for b in got] == [b[:5] for b in want]
    for g, w in zip(got, want, strict=True):
        assert list(g[5]) == list(q.aggr_methods)
        for m in q.aggr_methods:
            assert ref.close(g[5][m], w[5][m]), (m, g, w)
    return found


def series(values: list[Any], start: int = BASE, step: int = 10 * MIN, **kw: Any) -> list[Any]:
    return [{"obs": start + i * step, "value": v, **kw} for i, v in enumerate(values)]


# --------------------------------------------------------------------------------- instances


TIMERELS = [
    {},
    {"timerel": "before", "timeAt": "2024-01-10T05:00:00Z"},
    {"timerel": "after", "timeAt": "2024-01-10T05:00:00Z"},
    {"timerel": "between", "timeAt": "2024-01-10T02:00:00Z", "endTimeAt": "2024-01-10T06:00:00Z"},
]


def shuffled_times(n: int) -> list[dict[str, Any]]:
    """Instances whose createdAt and modifiedAt orders differ from the observedAt order."""
    return [
        {
            "obs": BASE + i * 20 * MIN,
            "created": BASE + ((i * 7) % n) * 20 * MIN,
            "modified": BASE + ((i * 11) % n) * 20 * MIN + MIN,
            "value": float(i),
            "e": 1 + i % 2,
            "iri": A if i % 3 else B,
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("prop", ["observedAt", "createdAt", "modifiedAt"])
@pytest.mark.parametrize("timerel", TIMERELS, ids=["all", "before", "after", "between"])
def test_instances_time_filter(db: HistoryDb, prop: str, timerel: dict[str, str]) -> None:
    recs = store(db, shuffled_times(30))
    q = parse_temporal_query({**timerel, "timeproperty": prop})
    check_instances(db, recs, q, [1, 2])
    check_instances(db, recs, q, [2], [A])
    found = db.instances(q, [1, 2])
    assert found  # the window holds some of each query
    assert all(i.time == i.inst[prop] for i in found)


def test_window_edges(db: HistoryDb) -> None:
    recs = store(db, series([1, 2, 3], start=ref.us("2024-01-10T05:00:00Z") - 1, step=1))
    at = "2024-01-10T05:00:00Z"  # the second instance sits exactly on it
    before = db.instances(parse_temporal_query({"timerel": "before", "timeAt": at}), [1])
    after = db.instances(parse_temporal_query({"timerel": "after", "timeAt": at}), [1])
    assert [i.inst["value"] for i in before] == [1]  # before is exclusive
    assert [i.inst["value"] for i in after] == [2, 3]  # after is inclusive
    between = {"timerel": "between", "timeAt": at, "endTimeAt": "2024-01-10T05:00:00.000001Z"}
    assert [i.inst["value"] for i in db.instances(parse_temporal_query(between), [1])] == [2]
    check_instances(db, recs, parse_temporal_query(between), [1])


@pytest.mark.parametrize("prop", ["observedAt", "createdAt", "modifiedAt"])
def test_last_n(db: HistoryDb, prop: str) -> None:
    recs = store(db, shuffled_times(40))
    for n in (1, 3, 100):
        q = parse_temporal_query({"lastN": str(n), "timeproperty": prop})
        check_instances(db, recs, q, [1, 2])
        check_instances(db, recs, q, [1, 2], [B])
    q = parse_temporal_query({"lastN": "2", "timerel": "before", "timeAt": "2024-01-10T04:00:00Z"})
    found = db.instances(q, [1, 2])
    # the last two before timeAt of each (entity, attribute), oldest first
    assert len(found) == 8
    check_instances(db, recs, q, [1, 2])


def test_last_n_ties_keep_insertion_order(db: HistoryDb) -> None:
    recs = store(db, [{"obs": BASE, "value": v} for v in range(5)])
    found = db.instances(parse_temporal_query({"lastN": "3"}), [1])
    assert [i.inst["value"] for i in found] == [2, 3, 4]
    assert [i.id for i in found] == sorted(i.id for i in found)
    check_instances(db, recs, parse_temporal_query({"lastN": "3"}), [1])


def test_limit_per_attribute(db: HistoryDb) -> None:
    recs = store(db, shuffled_times(30))
    check_instances(db, recs, TemporalQuery(), [1, 2], limit=2)
    check_instances(db, recs, parse_temporal_query({"lastN": "4"}), [1, 2], limit=2)
    check_instances(db, recs, parse_temporal_query({"lastN": "2"}), [1, 2], limit=4)


def test_attributes_and_entities_are_selected(db: HistoryDb) -> None:
    c = "https://ex.org/third"
    recs = store(
        db,
        [
            *series([1, 2], iri=A),
            *series([3], iri=B),
            *series([4], iri=c),
            *series([5, 6], iri=A, e=2),
            *series([7], iri=c, e=3),
        ],
    )
    everything = db.instances(TemporalQuery(), [1])
    assert sorted(i.inst["value"] for i in everything) == [1, 2, 3, 4]
    assert {i.iri for i in db.instances(TemporalQuery(), [1, 3], [c])} == {c}
    assert db.instances(TemporalQuery(), []) == []
    assert db.instances(TemporalQuery(), [99]) == []
    assert db.instances(TemporalQuery(), [1], ["https://ex.org/none"]) == []
    check_instances(db, recs, TemporalQuery(), [1, 2, 3])
    check_instances(db, recs, TemporalQuery(), [1, 2, 3], [A, c])


def test_instance_without_observed_at_uses_receive_time(db: HistoryDb) -> None:
    inst = {"type": "Property", "value": 3}
    db.insert([instance_row(1, A, inst, "2024-01-10T01:02:03Z")])
    (found,) = db.instances(TemporalQuery(), [1])
    assert found.time == "2024-01-10T01:02:03.000000Z"
    assert "observedAt" not in found.inst
    assert found.inst["createdAt"] == found.inst["modifiedAt"] == "2024-01-10T01:02:03.000000Z"


# -------------------------------------------------------------------------------- aggregates


def agg(**params: str) -> TemporalQuery:
    return parse_temporal_query({"aggrMethods": ALL, **params}, aggregated=True)


def test_every_method_per_hour(db: HistoryDb) -> None:
    values = [3.5, -1.0, 7.25, 7.25, 0.0, 12.0, 1e9 + 0.5, 1e9 - 0.25, 1e9, 2.0, True, False]
    recs = store(db, series(values, step=23 * MIN))
    buckets = check_aggregates(db, recs, agg(aggrPeriodDuration="PT1H"), [1])
    first = buckets[0]
    assert (first.start, first.end) == (
        "2024-01-10T00:00:00.000000Z",
        "2024-01-10T01:00:00.000000Z",
    )
    assert first.values["totalCount"] == 3
    assert first.values["min"] == -1.0
    check_aggregates(db, recs, agg(), [1])
    check_aggregates(db, recs, agg(aggrPeriodDuration="PT7M"), [1])
    check_aggregates(db, recs, agg(aggrPeriodDuration="P1D"), [1])


def test_stddev_of_large_values(db: HistoryDb) -> None:
    # cancellation in sum(x^2) - sum(x)^2 / n would lose every digit here
    deltas = [0.125, 0.5, -0.25, 0.0, 0.375]
    values = [1.7e9 + d for d in deltas]  # exact doubles
    recs = store(db, series(values))
    (bucket,) = check_aggregates(db, recs, agg(), [1])
    stddev = bucket.values["stddev"]
    assert isinstance(stddev, float)
    assert abs(stddev - statistics.pstdev(deltas)) < 1e-9


DBL_MAX = 1.7976931348623157e308
HUGE: list[tuple[list[float], dict[str, float | None]]] = [  # values: some of the answers
    ([1e308, 1e308], {"sum": None, "avg": 1e308, "stddev": 0.0, "sumsq": None}),
    ([1e308, 1e308, -1e308], {"sum": 1e308, "avg": 1e308 / 3, "sumsq": None}),
    ([1e200, -1e200], {"sum": 0.0, "avg": 0.0, "stddev": 1e200, "sumsq": None}),
    ([-DBL_MAX, DBL_MAX], {"sum": 0.0, "avg": 0.0, "stddev": DBL_MAX, "sumsq": None}),
    ([DBL_MAX, DBL_MAX, DBL_MAX], {"sum": None, "avg": DBL_MAX, "max": DBL_MAX}),
    ([1.4e154, 1.4e154], {"sumsq": None, "sum": 2.8e154, "stddev": 0.0}),
    ([9e153, 9e153], {"sumsq": 1.62e308}),
    ([1e-200, 3e-200], {"sumsq": 0.0, "sum": 4e-200}),  # x * x underflows: PostgreSQL failed
]


@pytest.mark.parametrize(("values", "expected"), HUGE, ids=[str(v) for v, _ in HUGE])
def test_totals_past_the_double_range(
    db: HistoryDb, values: list[float], expected: dict[str, float | None]
) -> None:
    # A sum or sumsq beyond ±1.8e308 is null (JSON has no infinity); avg and stddev, which lie
    # within the values' range, are given. PostgreSQL failed (NumericValueOutOfRange), SQLite
    # gave infinity, also for avg and stddev.
    recs = store(db, series(values))
    for q in (agg(), agg(aggrPeriodDuration="PT1H")):
        (bucket,) = check_aggregates(db, recs, q, [1])
        for method, value in expected.items():
            got = {str(k): v for k, v in bucket.values.items()}
            assert ref.close(got[method], value), (method, got)


def test_one_overflowing_period_leaves_the_others_alone(db: HistoryDb) -> None:
    # Only a response with an overflow is computed again; its other periods keep their
    # answers (to the last bit on SQLite; PostgreSQL's exact sums may round the last bit
    # differently), tiny values included.
    small = [0.1, 0.2, 0.3, 1e-300, 5e-324, 1e-160]
    specs = [{"obs": BASE, "value": 1e308}, {"obs": BASE + MIN, "value": 1e308}]
    specs += [{"obs": BASE + (i + 1) * HOUR, "value": v} for i, v in enumerate(small)]
    specs += series(small, e=2)  # all in one period of another entity
    recs = store(db, specs)
    q = agg(aggrPeriodDuration="PT1H")
    found = check_aggregates(db, recs, q, [1, 2])
    assert len(found) == 1 + len(small) + 1
    assert found[0].values["sum"] is None and found[0].values["avg"] == 1e308
    (alone,) = db.aggregate(q, [2])  # no overflow in this response
    (together,) = [b for b in found if b.e == 2]
    singles = [b for b in found if b.e == 1 and b.values["totalCount"] == 1]
    for m in q.aggr_methods:
        want, got = alone.values[m], together.values[m]
        assert want is not None and got is not None
        assert want == got if db.dialect == "sqlite" else math.isclose(want, got, rel_tol=1e-15)
    for b in singles:
        x, sumsq = b.values["min"], b.values["sumsq"]
        assert isinstance(x, float) and x in small and b.values["sum"] == b.values["avg"] == x
        assert b.values["stddev"] == 0.0 and sumsq is not None
        assert math.isclose(sumsq, x * x, rel_tol=1e-15, abs_tol=5e-324)


def test_row_on_a_bucket_edge_opens_the_next_bucket(db: HistoryDb) -> None:
    edge = ref.us("2024-01-10T11:00:00Z")
    recs = store(
        db, [{"obs": t, "value": v} for t, v in [(edge - HOUR, 1), (edge - 1, 2), (edge, 4)]]
    )
    q = agg(aggrPeriodDuration="PT1H", timerel="after", timeAt="2024-01-10T10:00:00Z")
    first, second = check_aggregates(db, recs, q, [1])
    assert (first.values["sum"], second.values["sum"]) == (3.0, 4.0)
    assert second.start == "2024-01-10T11:00:00.000000Z"


def test_gaps_are_left_out(db: HistoryDb) -> None:
    times = ["2024-01-10T10:10:00Z", "2024-01-10T10:50:00Z", "2024-01-10T13:20:00Z"]
    recs = store(db, [{"obs": ref.us(t), "value": 1} for t in times])
    q = agg(aggrPeriodDuration="PT1H", timerel="after", timeAt="2024-01-10T10:00:00Z")
    buckets = check_aggregates(db, recs, q, [1])
    assert [(b.start[11:16], b.end[11:16], b.values["totalCount"]) for b in buckets] == [
        ("10:00", "11:00", 2),
        ("13:00", "14:00", 1),
    ]
    # without timeAt the periods start at the first instance
    buckets = check_aggregates(db, recs, agg(aggrPeriodDuration="PT1H"), [1])
    assert [b.start[11:16] for b in buckets] == ["10:10", "13:10"]


def test_before_aligns_to_time_at(db: HistoryDb) -> None:
    recs = store(db, series(list(range(20)), step=17 * MIN))
    q = agg(aggrPeriodDuration="PT1H", timerel="before", timeAt="2024-01-10T04:30:00Z")
    buckets = check_aggregates(db, recs, q, [1])
    assert [b.start[11:16] for b in buckets] == ["23:30", "00:30", "01:30", "02:30", "03:30"]
    assert buckets[-1].end == "2024-01-10T04:30:00.000000Z"


def test_between_clips_the_last_bucket(db: HistoryDb) -> None:
    recs = store(db, series(list(range(30)), step=10 * MIN))
    q = agg(
        aggrPeriodDuration="PT1H",
        timerel="between",
        timeAt="2024-01-10T01:00:00Z",
        endTimeAt="2024-01-10T03:30:00Z",
    )
    buckets = check_aggregates(db, recs, q, [1])
    assert [(b.start[11:16], b.end[11:16]) for b in buckets] == [
        ("01:00", "02:00"),
        ("02:00", "03:00"),
        ("03:00", "03:30"),
    ]


def test_whole_window(db: HistoryDb) -> None:
    recs = store(db, series([1, 2, 3, 4], step=HOUR))
    (bucket,) = check_aggregates(db, recs, agg(), [1])
    assert (bucket.start, bucket.end) == (
        "2024-01-10T00:00:00.000000Z",
        "2024-01-10T03:00:00.000000Z",
    )
    q = agg(timerel="after", timeAt="2024-01-10T00:30:00Z")
    (bucket,) = check_aggregates(db, recs, q, [1])
    assert (bucket.start[11:16], bucket.end[11:16], bucket.values["sum"]) == ("00:30", "03:00", 9.0)
    q = agg(timerel="before", timeAt="2024-01-10T02:30:00Z", aggrPeriodDuration="P0D")
    (bucket,) = check_aggregates(db, recs, q, [1])
    assert (bucket.start[11:16], bucket.end[11:16], bucket.values["sum"]) == ("00:00", "02:30", 6.0)
    assert (
        check_aggregates(db, recs, agg(timerel="after", timeAt="2025-01-01T00:00:00Z"), [1]) == []
    )


def test_calendar_months(db: HistoryDb) -> None:
    times = [
        "2024-01-31T00:00:00Z",
        "2024-02-28T23:59:59Z",
        "2024-02-29T00:00:00Z",  # exactly on the second edge (Jan 31 + 1 month, clamped)
        "2024-03-30T12:00:00Z",
        "2024-03-31T00:00:00Z",
        "2024-06-15T00:00:00Z",
        "2025-02-01T00:00:00Z",
    ]
    recs = store(db, [{"obs": ref.us(t), "value": i} for i, t in enumerate(times)])
    q = agg(aggrPeriodDuration="P1M", timerel="after", timeAt="2024-01-31T00:00:00Z")
    buckets = check_aggregates(db, recs, q, [1])
    assert [(b.start[:10], b.end[:10], b.values["totalCount"]) for b in buckets] == [
        ("2024-01-31", "2024-02-29", 2),
        ("2024-02-29", "2024-03-31", 2),
        ("2024-03-31", "2024-04-30", 1),
        ("2024-05-31", "2024-06-30", 1),
        ("2025-01-31", "2025-02-28", 1),
    ]
    check_aggregates(db, recs, agg(aggrPeriodDuration="P1M"), [1])
    check_aggregates(db, recs, agg(aggrPeriodDuration="P1Y"), [1])
    check_aggregates(
        db, recs, agg(aggrPeriodDuration="P3M", timerel="before", timeAt=times[-1]), [1]
    )


def test_non_numeric_values(db: HistoryDb) -> None:
    values: list[Any] = [
        "red",
        "green",
        "red",
        ("rel", "urn:a"),
        ("rel", "urn:a"),
        {"b": 1, "a": 2},
    ]
    values += [{"a": 2, "b": 1}, [1, 2], [1, 2], 5, 5.0, "5"]
    recs = store(db, series(values, iri=B))
    (bucket,) = check_aggregates(db, recs, agg(), [1])
    # "red", "green", urn:a, the object (key order does not matter), the list, 5, "5"
    assert (bucket.values["totalCount"], bucket.values["distinctCount"]) == (12, 7)
    only_text = store(db, series(["x", "y"], iri=A, e=2))
    (bucket,) = check_aggregates(db, recs + only_text, agg(), [2])
    assert bucket.values["sum"] is None and bucket.values["stddev"] is None


def test_datasets_are_aggregated_apart(db: HistoryDb) -> None:
    specs = series([1, 2, 3, 4], step=20 * MIN) + series([10, 20, 30], step=40 * MIN, ds="urn:ds:b")
    specs += series([100], ds="urn:ds:a") + series([7, 8], e=2)
    recs = store(db, specs)
    buckets = check_aggregates(db, recs, agg(aggrPeriodDuration="PT1H"), [1, 2])
    assert [(b.e, b.ds) for b in buckets] == [
        (1, None),
        (1, None),
        (1, "urn:ds:a"),
        (1, "urn:ds:b"),
        (1, "urn:ds:b"),
        (2, None),
    ]
    check_aggregates(db, recs, agg(), [1, 2])
    check_aggregates(db, recs, agg(aggrPeriodDuration="P1M"), [1, 2])


@pytest.mark.parametrize("prop", ["createdAt", "modifiedAt"])
def test_system_time_buckets(db: HistoryDb, prop: str) -> None:
    recs = store(db, shuffled_times(40))
    for period in ("PT1H", "PT45M", "P1M"):
        check_aggregates(db, recs, agg(aggrPeriodDuration=period, timeproperty=prop), [1, 2])
    q = agg(
        aggrPeriodDuration="PT1H", timeproperty=prop, timerel="after", timeAt="2024-01-10T03:10:00Z"
    )
    check_aggregates(db, recs, q, [1, 2], [A])


def test_aggregation_needs_methods() -> None:
    with pytest.raises(BadRequestData) as err:
        aggregate_sql("sqlite", TemporalQuery(), [1])
    assert err.value.field == "aggrMethods"


# -------------------------------------------------------------------------------- properties

STEPS = [MIN, 15 * MIN]
PERIODS = [None, "PT1H", "PT15M", "PT7M", "PT1H30M", "P1D", "P1W", "P1M", "P2M", "P1Y"]
VALUES = st.one_of(
    st.integers(-50, 50),
    st.sampled_from([0.25, -3.5, 1e6 + 0.5]),
    st.booleans(),
    st.sampled_from(["a", "b", ("rel", "urn:x"), ("rel", "urn:y")]),
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int, int]:
    step = draw(st.sampled_from(STEPS))
    span = draw(st.sampled_from([100, 12_000]))
    grid = st.integers(0, span)
    specs = [
        {
            "e": draw(st.sampled_from([1, 2])),
            "iri": draw(st.sampled_from([A, B])),
            "ds": draw(st.sampled_from([None, None, None, "urn:ds:x"])),
            "obs": BASE + draw(grid) * step,
            "created": BASE + draw(grid) * step,
            "modified": BASE + draw(grid) * step,
            "value": draw(VALUES),
        }
        for _ in range(draw(st.integers(0, 30)))
    ]
    return specs, step, span


@st.composite
def time_filters(draw: st.DrawFn, step: int, span: int) -> dict[str, str]:
    out: dict[str, str] = {
        "timeproperty": draw(st.sampled_from(["observedAt", "createdAt", "modifiedAt"]))
    }
    timerel = draw(st.sampled_from([None, "before", "after", "between"]))
    if timerel is not None:
        # on the grid (so instances sit on the window and bucket edges) or off it
        at = BASE + draw(st.integers(-5, span + 5)) * step + draw(st.sampled_from([0, 0, 7 * MIN]))
        out["timerel"] = timerel
        out["timeAt"] = ref.iso(at)
        if timerel == "between":
            out["endTimeAt"] = ref.iso(at + draw(st.integers(1, span)) * step)
    return out


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(data=st.data())
def test_instances_match_python(db: HistoryDb, data: st.DataObject) -> None:
    specs, step, span = data.draw(scenarios())
    params = data.draw(time_filters(step, span))
    last_n = data.draw(st.sampled_from([None, 1, 2, 5]))
    if last_n is not None:
        params["lastN"] = str(last_n)
    q = parse_temporal_query(params)
    attrs = data.draw(st.sampled_from([None, [A], [A, B]]))
    limit = data.draw(st.sampled_from([None, 1, 3]))
    db.clear()
    recs = store(db, specs)
    check_instances(db, recs, q, [1, 2], attrs, limit)


@SETTINGS
@given(data=st.data())
def test_aggregates_match_python(db: HistoryDb, data: st.DataObject) -> None:
    specs, step, span = data.draw(scenarios())
    params = data.draw(time_filters(step, span))
    methods = data.draw(st.lists(st.sampled_from(AGGR_METHODS), min_size=1, unique=True))
    params["aggrMethods"] = ",".join(methods)
    period = data.draw(st.sampled_from(PERIODS))
    if period is not None:
        params["aggrPeriodDuration"] = period
    q = parse_temporal_query(params, aggregated=True)
    pks = data.draw(st.sampled_from([[1], [1, 2]]))
    attrs = data.draw(st.sampled_from([None, [A], [A, B]]))
    db.clear()
    recs = store(db, specs)
    check_aggregates(db, recs, q, pks, attrs)


def test_times_before_1970(db: HistoryDb) -> None:
    # negative microseconds: bucket arithmetic must floor, not truncate towards zero
    times = ["1969-12-31T22:30:00Z", "1969-12-31T23:59:59.999999Z", "1970-01-01T00:00:00Z"]
    times += ["1970-01-01T00:30:00Z", "1969-11-30T12:00:00Z"]
    recs = store(db, [{"obs": ref.us(t), "value": i} for i, t in enumerate(times)])
    for params in (
        {"aggrPeriodDuration": "PT1H"},
        {"aggrPeriodDuration": "PT1H", "timerel": "before", "timeAt": "1970-01-01T00:45:00Z"},
        {"aggrPeriodDuration": "P1M"},
        {"aggrPeriodDuration": "P1M", "timerel": "after", "timeAt": "1969-11-30T00:00:00Z"},
        {"aggrPeriodDuration": "P1M", "timerel": "before", "timeAt": "1970-01-31T00:00:00Z"},
    ):
        check_aggregates(db, recs, agg(**params), [1])
    check_instances(db, recs, parse_temporal_query({"lastN": "2"}), [1])


END_PERIODS: list[dict[str, str]] = [
    {"aggrPeriodDuration": "P8000Y"},
    {"aggrPeriodDuration": "P10000Y"},
    {"aggrPeriodDuration": "P1D"},
    {"aggrPeriodDuration": "PT7H"},
    {"aggrPeriodDuration": "P1M"},
    {"aggrPeriodDuration": "P5M"},
    {"aggrPeriodDuration": "P3650000D"},
    {"aggrPeriodDuration": "P1D", "timerel": "after", "timeAt": "9999-12-31T23:00:00Z"},
    {"aggrPeriodDuration": "P1M", "timerel": "after", "timeAt": "9999-12-31T23:00:00Z"},
    {"aggrPeriodDuration": "P1Y", "timerel": "after", "timeAt": "5000-06-15T00:00:00Z"},
    # before: periods end at timeAt and run back past 0001-01-01
    {"aggrPeriodDuration": "P1Y", "timerel": "before", "timeAt": "0001-06-01T00:00:00Z"},
    {"aggrPeriodDuration": "P8000Y", "timerel": "before", "timeAt": "2024-06-01T00:00:00Z"},
    {"aggrPeriodDuration": "P10000Y", "timerel": "before", "timeAt": "9999-12-31T23:00:00Z"},
    {"aggrPeriodDuration": "P3650000D", "timerel": "before", "timeAt": "9999-01-01T00:00:00Z"},
    {"aggrPeriodDuration": "P30D", "timerel": "before", "timeAt": "0001-02-10T00:00:00Z"},
    {
        "aggrPeriodDuration": "P1D",
        "timerel": "between",
        "timeAt": "0001-01-01T00:00:00Z",
        "endTimeAt": "9999-12-31T23:59:59.999999Z",
    },
]


@pytest.mark.parametrize("params", END_PERIODS, ids=[" ".join(p.values()) for p in END_PERIODS])
def test_periods_are_cut_at_the_ends_of_time(db: HistoryDb, params: dict[str, str]) -> None:
    # A period that would end after 9999-12-31T23:59:59.999999Z ends there and holds the
    # instances up to that last time; one that would start before 0001-01-01 starts there.
    # Both stores failed, or dropped the attribute silently.
    times = ["0001-01-01T00:00:00Z", "0001-03-01T00:00:00Z", "2024-01-01T00:00:00Z"]
    times += ["2024-02-01T00:00:00Z", "9999-12-31T12:00:00Z", "9999-12-31T23:59:59.999999Z"]
    recs = store(db, [{"obs": ref.us(t), "value": i} for i, t in enumerate(times)])
    q = agg(**params)
    found = check_aggregates(db, recs, q, [1])
    # every instance of the window is in some period
    assert sum(b.values["totalCount"] or 0 for b in found) == sum(ref.in_window(r, q) for r in recs)


def test_last_period_ends_at_the_last_time(db: HistoryDb) -> None:
    last = "9999-12-31T23:59:59.999999Z"
    store(db, series([1, 2], start=ref.us("2024-01-01T00:00:00Z"), step=31 * 24 * 60 * MIN))
    found = db.aggregate(agg(aggrMethods="totalCount", aggrPeriodDuration="P8000Y"), [1])
    assert [(b.start, b.end, b.values) for b in found] == [
        ("2024-01-01T00:00:00.000000Z", last, {"totalCount": 2})
    ]
    db.clear()
    store(
        db,
        series(
            [1, 2],
            start=ref.us("9999-12-31T12:00:00Z"),
            step=ref.us(last) - ref.us("9999-12-31T12:00:00Z"),
        ),
    )
    for period in ("P1D", "P1M", "PT13H"):
        found = db.aggregate(agg(aggrMethods="totalCount", aggrPeriodDuration=period), [1])
        assert [(b.start, b.end, b.values) for b in found] == [
            ("9999-12-31T12:00:00.000000Z", last, {"totalCount": 2})
        ], period


@pytest.mark.postgres
@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata"])
def test_postgres_session_time_zone_does_not_matter(pg: psycopg.Connection[Any], zone: str) -> None:
    create_postgres(pg)
    pg.execute(f"SET TimeZone = '{zone}'")
    db = HistoryDb("postgres", pg)
    # around a DST change in New York, and on month ends in UTC that are another day locally
    times = ["2024-03-09T23:30:00Z", "2024-03-10T07:30:00Z", "2024-03-31T23:00:00Z"]
    times += ["2024-04-01T00:00:00Z", "2024-04-30T23:59:59Z"]
    recs = store(db, [{"obs": ref.us(t), "value": i} for i, t in enumerate(times)])
    for period in ("P1D", "P1M", "PT5H"):
        check_aggregates(db, recs, agg(aggrPeriodDuration=period), [1])
        q = agg(aggrPeriodDuration=period, timerel="after", timeAt="2024-03-01T00:00:00Z")
        check_aggregates(db, recs, q, [1])
    check_instances(db, recs, TemporalQuery(), [1])
