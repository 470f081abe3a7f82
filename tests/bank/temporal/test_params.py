"""Temporal query parameters: defaults, the window they make, and every 400 they answer."""

from __future__ import annotations

from typing import Any

import pytest

from cityward.bank.errors import BadRequestData, NgsiError, OperationNotSupported
from cityward.bank.temporal import TemporalQuery, parse_temporal_query
from cityward.bank.temporal.duration import Duration

T1 = "2024-01-01T10:00:00Z"
T2 = "2024-01-01T11:00:00Z"


def test_defaults() -> None:
    q = parse_temporal_query({"q": "speed>3", "type": "Vehicle"})  # other parameters ignored
    assert q == TemporalQuery()
    assert (q.timerel, q.time_at, q.timeproperty, q.last_n) == (None, None, "observedAt", None)
    assert (q.lower, q.upper, q.column, q.aggr_methods, q.aggr_period) == (
        None,
        None,
        "obs",
        (),
        None,
    )


@pytest.mark.parametrize(
    ("params", "lower", "upper"),
    [
        ({"timerel": "after", "timeAt": T1}, "2024-01-01T10:00:00.000000Z", None),
        ({"timerel": "before", "timeAt": T1}, None, "2024-01-01T10:00:00.000000Z"),
        (
            {"timerel": "between", "timeAt": T1, "endTimeAt": T2},
            "2024-01-01T10:00:00.000000Z",
            "2024-01-01T11:00:00.000000Z",
        ),
    ],
)
def test_window(params: dict[str, Any], lower: str | None, upper: str | None) -> None:
    q = parse_temporal_query(params)
    assert (q.lower, q.upper) == (lower, upper)


def test_normalized_datetimes() -> None:
    q = parse_temporal_query(
        {
            "timerel": "between",
            "timeAt": "2024-01-01T10:00:00.123456789Z",
            "endTimeAt": "2024-01-01T10:00:00.5Z",
        }
    )
    assert q.time_at == "2024-01-01T10:00:00.123456Z"
    assert q.end_time_at == "2024-01-01T10:00:00.500000Z"


@pytest.mark.parametrize(("prop", "column"), [("createdAt", "created"), ("modifiedAt", "modified")])
def test_timeproperty(prop: str, column: str) -> None:
    q = parse_temporal_query({"timeproperty": prop})
    assert (q.timeproperty, q.column) == (prop, column)


def test_last_n() -> None:
    assert parse_temporal_query({"lastN": "5"}).last_n == 5
    assert parse_temporal_query({"lastN": 7}).last_n == 7  # a temporalQ body number


def test_aggregation() -> None:
    q = parse_temporal_query(
        {"aggrMethods": "max, avg,totalCount,avg", "aggrPeriodDuration": "PT1H"},
        aggregated=True,
    )
    assert q.aggr_methods == ("max", "avg", "totalCount")
    assert q.aggr_period == Duration(months=0, micros=3_600_000_000, text="PT1H")
    assert (
        parse_temporal_query({"aggrMethods": "sum", "aggrPeriodDuration": "P0D"}).aggr_period
        is None
    )
    every = "totalCount,distinctCount,sum,avg,min,max,stddev,sumsq"
    assert ",".join(parse_temporal_query({"aggrMethods": every}).aggr_methods) == every


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"timerel": "after"}, "timeAt"),
        ({"timerel": "during", "timeAt": T1}, "timerel"),
        ({"timerel": "After", "timeAt": T1}, "timerel"),
        ({"timerel": ""}, "timerel"),
        ({"timeAt": T1}, "timerel"),
        ({"endTimeAt": T2}, "timerel"),
        ({"timerel": "between", "timeAt": T1}, "endTimeAt"),
        ({"timerel": "between", "timeAt": T2, "endTimeAt": T1}, "endTimeAt"),
        ({"timerel": "between", "timeAt": T1, "endTimeAt": T1}, "endTimeAt"),
        ({"timerel": "after", "timeAt": T1, "endTimeAt": T2}, "endTimeAt"),
        ({"timerel": "after", "timeAt": "2024-01-01T10:00:00+02:00"}, "timeAt"),
        ({"timerel": "after", "timeAt": "2024-01-01T10:00:00"}, "timeAt"),
        ({"timerel": "after", "timeAt": "2024-01-01"}, "timeAt"),
        ({"timerel": "after", "timeAt": "2024-02-30T10:00:00Z"}, "timeAt"),
        ({"timerel": "after", "timeAt": 1704103200}, "timeAt"),
        ({"timerel": "between", "timeAt": T1, "endTimeAt": "tomorrow"}, "endTimeAt"),
        ({"timeproperty": "observedat"}, "timeproperty"),
        ({"timeproperty": "foo"}, "timeproperty"),
        ({"lastN": "0"}, "lastN"),
        ({"lastN": 0}, "lastN"),
        ({"lastN": "-1"}, "lastN"),
        ({"lastN": "1.5"}, "lastN"),
        ({"lastN": "abc"}, "lastN"),
        ({"lastN": ""}, "lastN"),
        ({"lastN": True}, "lastN"),
        ({"lastN": 2.0}, "lastN"),
        ({"aggrMethods": "median"}, "aggrMethods"),
        ({"aggrMethods": "avg,"}, "aggrMethods"),
        ({"aggrMethods": ""}, "aggrMethods"),
        ({"aggrMethods": "AVG"}, "aggrMethods"),
        ({"aggrPeriodDuration": "1 hour"}, "aggrPeriodDuration"),
        ({"aggrPeriodDuration": "P1M1D"}, "aggrPeriodDuration"),
        ({"aggrMethods": ["avg"]}, "aggrMethods"),
    ],
)
def test_bad_request(params: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequestData) as err:
        parse_temporal_query(params)
    assert err.value.field == field
    assert err.value.status == 400


def test_aggregated_needs_methods() -> None:
    with pytest.raises(BadRequestData) as err:
        parse_temporal_query({"aggrPeriodDuration": "PT1H"}, aggregated=True)
    assert err.value.field == "aggrMethods"


def test_deleted_at_is_not_supported() -> None:
    with pytest.raises(NgsiError) as err:
        parse_temporal_query({"timeproperty": "deletedAt"})
    assert isinstance(err.value, OperationNotSupported)
    assert (err.value.field, err.value.status) == ("timeproperty", 422)
