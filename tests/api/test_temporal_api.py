"""The temporal API end to end: writes record history, /temporal answers from it."""

from __future__ import annotations

from contextlib import nullcontext
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.api.routes import temporal as temporal_routes
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore

E = "/ngsi-ld/v1/entities"
T = "/ngsi-ld/v1/temporal/entities"
PROBLEM = "https://uri.etsi.org/ngsi-ld/errors/"
V1 = "urn:ngsi-ld:Vehicle:V1"
TIMES = ["2024-05-01T10:10:00Z", "2024-05-01T10:40:00Z", "2024-05-01T11:20:00Z"]
SPEEDS = [10, 20, 60]


def speed(v: float, t: str) -> dict[str, Any]:
    return {"type": "Property", "value": v, "observedAt": t, "unitCode": "KMH"}


def load(client: TestClient) -> None:
    body = {"id": V1, "type": "Vehicle", "speed": speed(SPEEDS[0], TIMES[0])}
    assert client.post(E, json=body).status_code == 201
    for v, t in zip(SPEEDS[1:], TIMES[1:], strict=True):
        r = client.patch(f"{E}/{V1}/attrs", json={"speed": speed(v, t)})
        assert r.status_code == 204, r.text
    # an unchanged value is not a change: no new instance
    r = client.patch(f"{E}/{V1}/attrs", json={"speed": speed(SPEEDS[-1], TIMES[-1])})
    assert r.status_code == 204


def values(client: TestClient, **params: str) -> list[Any]:
    r = client.get(f"{T}/{V1}", params=params)
    assert r.status_code == 200, r.text
    return [i["value"] for i in r.json()["speed"]]


def test_instances_windows_and_last_n(client: TestClient) -> None:
    load(client)
    r = client.get(f"{T}/{V1}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == V1 and body["type"] == "Vehicle"
    insts = body["speed"]
    assert [i["value"] for i in insts] == SPEEDS
    assert [i["observedAt"] for i in insts] == TIMES
    assert all(i["unitCode"] == "KMH" for i in insts)
    assert len({i["instanceId"] for i in insts}) == 3
    assert all(i["instanceId"].startswith("urn:ngsi-ld:Instance:") for i in insts)
    assert values(client, lastN="2") == SPEEDS[1:]
    assert values(client, timerel="after", timeAt=TIMES[1]) == SPEEDS[1:]
    assert values(client, timerel="before", timeAt=TIMES[1]) == SPEEDS[:1]
    assert values(client, timerel="between", timeAt=TIMES[0], endTimeAt=TIMES[2]) == SPEEDS[:2]


def test_temporal_values_and_aggregates(client: TestClient) -> None:
    load(client)
    r = client.get(f"{T}/{V1}", params={"options": "temporalValues"})
    assert r.status_code == 200, r.text
    tv = r.json()["speed"]
    assert tv["type"] == "Property"
    assert [v for v, _ in tv["values"]] == SPEEDS
    r = client.get(
        f"{T}/{V1}",
        params={
            "options": "aggregatedValues",
            "aggrMethods": "sum,avg,max,totalCount",
            "aggrPeriodDuration": "PT1H",
            "timerel": "after",
            "timeAt": "2024-05-01T10:00:00Z",
        },
    )
    assert r.status_code == 200, r.text
    agg = r.json()["speed"]
    # hour 10:00-11:00 holds 10 and 20, hour 11:00-12:00 holds 60
    assert [v for v, _, _ in agg["sum"]] == [30, 60]
    assert [v for v, _, _ in agg["avg"]] == [15, 60]
    assert [v for v, _, _ in agg["max"]] == [20, 60]
    assert [v for v, _, _ in agg["totalCount"]] == [2, 1]
    starts = [s for _, s, _ in agg["sum"]]
    assert starts[0].startswith("2024-05-01T10:00:00") and starts[1].startswith("2024-05-01T11:00")


def test_query_and_post_query(client: TestClient) -> None:
    load(client)
    other = {"id": "urn:ngsi-ld:Vehicle:V2", "type": "Vehicle", "speed": speed(99, TIMES[0])}
    assert client.post(E, json=other).status_code == 201
    r = client.get(T, params={"type": "Vehicle", "q": "speed>50", "lastN": "1"})
    assert r.status_code == 200, r.text
    got = {e["id"]: [i["value"] for i in e["speed"]] for e in r.json()}
    assert got == {V1: [60], "urn:ngsi-ld:Vehicle:V2": [99]}
    query = {
        "type": "Query",
        "entities": [{"type": "Vehicle", "id": V1}],
        "temporalQ": {"timerel": "before", "timeAt": TIMES[2]},
    }
    r = client.post("/ngsi-ld/v1/temporal/entityOperations/query", json=query)
    assert r.status_code == 200, r.text
    (entity,) = r.json()
    assert [i["value"] for i in entity["speed"]] == SPEEDS[:2]


def test_times_with_a_lowercase_z(client: TestClient) -> None:
    """RFC 3339 (5.6) allows a lowercase z; timeAt, endTimeAt and a written observedAt ending
    in z were refused with 400."""
    load(client)
    lower = [t[:-1] + "z" for t in TIMES]
    assert values(client, timerel="after", timeAt=lower[1]) == SPEEDS[1:]
    assert values(client, timerel="between", timeAt=lower[0], endTimeAt=lower[2]) == SPEEDS[:2]
    r = client.patch(f"{E}/{V1}/attrs", json={"speed": speed(70, "2024-05-01T12:00:00.5z")})
    assert r.status_code == 204, r.text
    r = client.get(f"{T}/{V1}", params={"timerel": "after", "timeAt": "2024-05-01T11:30:00z"})
    assert r.status_code == 200, r.text
    assert [(i["value"], i["observedAt"]) for i in r.json()["speed"]] == [
        (70, "2024-05-01T12:00:00.5Z")
    ]


def test_errors(client: TestClient) -> None:
    load(client)
    cases: list[tuple[dict[str, str], str]] = [
        ({"timerel": "between", "timeAt": TIMES[0]}, "endTimeAt"),
        ({"timerel": "after"}, "timeAt"),
        ({"timerel": "sometime", "timeAt": TIMES[0]}, "timerel"),
        ({"lastN": "0"}, "lastN"),
        ({"options": "aggregatedValues"}, "aggrMethods"),
        ({"options": "aggregatedValues", "aggrMethods": "median"}, "aggrMethods"),
        (
            {"options": "aggregatedValues", "aggrMethods": "sum", "aggrPeriodDuration": "1h"},
            "aggrPeriodDuration",
        ),
    ]
    for params, field in cases:
        r = client.get(f"{T}/{V1}", params=params)
        assert r.status_code == 400, (params, r.text)
        problem = r.json()
        assert problem["type"] == PROBLEM + "BadRequestData", params
        assert problem["field"] == field, params
    r = client.get(f"{T}/urn:ngsi-ld:Vehicle:nobody")
    assert r.status_code == 404 and r.json()["type"] == PROBLEM + "ResourceNotFound"


def test_temporal_writes(client: TestClient) -> None:
    V9 = "urn:ngsi-ld:Vehicle:V9"
    body = {
        "id": V9,
        "type": "Vehicle",
        "speed": [speed(30, TIMES[1]), speed(10, TIMES[0])],
    }
    r = client.post(T, json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"{T}/{V9}"
    # the entity exists with the newest instance as its current state
    assert client.get(f"{E}/{V9}").json()["speed"]["value"] == 30
    r = client.post(f"{T}/{V9}/attrs", json={"speed": speed(50, TIMES[2])})
    assert r.status_code == 204, r.text
    r = client.post(
        T, json={"id": V9, "type": "Vehicle", "speed": speed(5, "2024-04-30T00:00:00Z")}
    )
    assert r.status_code == 204, r.text
    insts = client.get(f"{T}/{V9}").json()["speed"]
    assert [i["value"] for i in insts] == [5, 10, 30, 50]
    # the current state is untouched by appended history
    assert client.get(f"{E}/{V9}").json()["speed"]["value"] == 30

    r = client.delete(f"{T}/{V9}/attrs/speed/{insts[0]['instanceId']}")
    assert r.status_code == 204, r.text
    assert [i["value"] for i in client.get(f"{T}/{V9}").json()["speed"]] == [10, 30, 50]
    r = client.delete(f"{T}/{V9}/attrs/speed/{insts[0]['instanceId']}")
    assert r.status_code == 404
    r = client.patch(f"{T}/{V9}/attrs/speed/{insts[1]['instanceId']}", json={})
    assert r.status_code == 422 and r.json()["type"] == PROBLEM + "OperationNotSupported"

    assert client.delete(f"{T}/{V9}/attrs/speed").status_code == 204
    assert "speed" not in client.get(f"{T}/{V9}").json()
    assert client.delete(f"{T}/{V9}/attrs/speed").status_code == 404
    assert client.delete(f"{T}/{V9}").status_code == 204
    assert client.get(f"{T}/{V9}").status_code == 404
    assert client.get(f"{E}/{V9}").status_code == 404

    r = client.post(f"{T}/urn:ngsi-ld:Vehicle:none/attrs", json={"speed": speed(1, TIMES[0])})
    assert r.status_code == 404
    r = client.post(T, json={"id": "not a uri", "type": "Vehicle", "speed": speed(1, TIMES[0])})
    assert r.status_code == 400
    r = client.post(T, json={"id": V9, "speed": speed(1, TIMES[0])})
    assert r.status_code == 400 and r.json()["field"] == "type"


LAST = "9999-12-31T23:59:59.999999Z"


def aggregated(client: TestClient, eid: str, **params: str) -> dict[str, Any]:
    r = client.get(f"{T}/{eid}", params={"options": "aggregatedValues", **params})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_periods_past_9999_end_at_the_last_time(client: TestClient) -> None:
    # A period that would end after 9999-12-31T23:59:59.999999Z ends there (and holds the
    # instances up to that time); one that would start before 0001-01-01 starts there.
    # SQLite left the attribute out, PostgreSQL answered 500, both 500 for P1D.
    early = [speed(1, "2024-01-01T00:00:00Z"), speed(2, "2024-02-01T00:00:00Z")]
    late = [speed(3, "9999-12-31T12:00:00Z"), speed(4, LAST)]
    for eid, insts in (("urn:h:1", early), ("urn:h:2", late)):
        r = client.post(T, json={"id": eid, "type": "H", "speed": insts})
        assert r.status_code == 201, r.text
    count = {"aggrMethods": "totalCount"}
    got = aggregated(client, "urn:h:1", aggrPeriodDuration="P8000Y", **count)
    assert got["speed"]["totalCount"] == [[2, "2024-01-01T00:00:00.000000Z", LAST]]
    for period in ("P1D", "P1M", "PT13H"):
        got = aggregated(client, "urn:h:2", aggrPeriodDuration=period, **count)
        assert got["speed"]["totalCount"] == [[2, "9999-12-31T12:00:00.000000Z", LAST]], period
    before = {"timerel": "before", "timeAt": "2024-06-01T00:00:00Z"}
    for period in ("P8000Y", "P3650000D"):
        got = aggregated(client, "urn:h:1", aggrPeriodDuration=period, **before, **count)
        assert got["speed"]["totalCount"] == [
            [2, "0001-01-01T00:00:00.000000Z", "2024-06-01T00:00:00.000000Z"]
        ], period


def test_totals_past_the_double_range_are_null(client: TestClient) -> None:
    # sum and sumsq past ±1.8e308 are null; avg and stddev lie within the values' range and
    # are given. PostgreSQL answered 500 (NumericValueOutOfRange), SQLite null for all four.
    times = ["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"]
    body = {"id": "urn:h:3", "type": "H", "speed": [speed(1e308, t) for t in times]}
    assert client.post(T, json=body).status_code == 201
    got = aggregated(client, "urn:h:3", aggrMethods="sum,avg,stddev,sumsq,max,totalCount")
    span = ["2024-01-01T00:00:00.000000Z", "2024-01-02T00:00:00.000000Z"]
    assert got["speed"] == {
        "type": "Property",
        "sum": [[None, *span]],
        "avg": [[1e308, *span]],
        "stddev": [[0.0, *span]],
        "sumsq": [[None, *span]],
        "max": [[1e308, *span]],
        "totalCount": [[2, *span]],
    }
    # a value whose square underflows: PostgreSQL answered 500 (underflow) for sumsq
    body = {"id": "urn:h:4", "type": "H", "speed": [speed(1e-200, t) for t in times]}
    assert client.post(T, json=body).status_code == 201
    got = aggregated(client, "urn:h:4", aggrMethods="sum,sumsq")
    assert got["speed"]["sum"] == [[2e-200, *span]] and got["speed"]["sumsq"] == [[0.0, *span]]


def test_created_state_is_the_newest_instant(client: TestClient) -> None:
    # observedAt was compared as text: "...00Z" sorted after "...00.500Z", so POST made the
    # older instance the entity's current state
    insts = [speed(2, "2024-01-01T10:00:00.500Z"), speed(1, "2024-01-01T10:00:00Z")]
    r = client.post(T, json={"id": "urn:h:5", "type": "H", "speed": insts})
    assert r.status_code == 201, r.text
    assert client.get(f"{E}/urn:h:5").json()["speed"]["value"] == 2


def test_created_state_of_an_instance_without_observed_at_is_the_histories_newest(
    client: TestClient,
) -> None:
    # an instance without observedAt is filed at the write time (the newest), but counted as
    # the oldest for the entity's state: the entity showed 1, lastN=1 gave 2
    insts = [{"type": "Property", "value": 2}, speed(1, "2024-01-01T10:00:00Z")]
    r = client.post(T, json={"id": "urn:h:6", "type": "H", "speed": insts})
    assert r.status_code == 201, r.text
    assert client.get(f"{E}/urn:h:6").json()["speed"]["value"] == 2
    newest = client.get(f"{T}/urn:h:6", params={"lastN": "1"}).json()["speed"]
    assert [i["value"] for i in (newest if isinstance(newest, list) else [newest])] == [2]


def test_instance_ids_are_ascii_digits_within_64_bits(client: TestClient) -> None:
    # str.isdigit() let other scripts' digits through: ARABIC-INDIC TWO deleted instance 2,
    # SUPERSCRIPT TWO gave a 500; beyond 64 bits SQLite gave a 500
    load(client)
    ids = [i["instanceId"] for i in client.get(f"{T}/{V1}").json()["speed"]]
    assert "urn:ngsi-ld:Instance:2" in ids
    prefix = "urn:ngsi-ld:Instance:"
    for bad in ("\u0662", "\u00b2", "9" * 23, str(2**63), "+2", " 2", ""):
        r = client.delete(f"{T}/{V1}/attrs/speed/{prefix}{bad}")
        assert r.status_code == 404, (bad, r.text)
        problem = r.json()
        assert problem["type"] == PROBLEM + "ResourceNotFound", bad
        assert problem["field"] == "instanceId", bad
    assert [i["instanceId"] for i in client.get(f"{T}/{V1}").json()["speed"]] == ids


def test_last_n_of_a_tie_is_the_last_write(client: TestClient, store: Store) -> None:
    # PostgreSQL: the history ids came from a sequence with CACHE 100, a block per pooled
    # connection, so a later write on another connection got a smaller id and lastN, which
    # breaks ties of time by id, gave an older write
    t = TIMES[0]
    r = client.post(E, json={"id": V1, "type": "Vehicle", "speed": speed(0, t)})
    assert r.status_code == 201, r.text
    holding = store.pool.connection if isinstance(store, PostgresStore) else nullcontext
    for v, busy in ((1, False), (2, True), (3, True)):
        with holding() if busy else nullcontext():  # another request holds a connection
            r = client.patch(f"{E}/{V1}/attrs", json={"speed": speed(v, t)})
            assert r.status_code == 204, r.text
    assert values(client, lastN="1") == [3]
    assert values(client) == [0, 1, 2, 3]


def minute(m: int, day: int = 1) -> str:
    return f"2024-01-{day:02d}T00:{m:02d}:00Z"


def follow(client: TestClient, eid: str, newest: bool) -> dict[str, list[Any]]:
    """Every attribute's values over all pages, continuing from each 206's Content-Range as a
    client does: after its end (timeAt 1 µs later), or with lastN before its start."""
    params = {"lastN": "100"} if newest else {}
    seen: dict[str, list[Any]] = {}
    for _ in range(20):
        r = client.get(f"{T}/{eid}", params=params)
        assert r.status_code in (200, 206), r.text
        for name, insts in r.json().items():
            if name not in ("id", "type"):
                seen.setdefault(name, []).extend(i["value"] for i in insts)
        if r.status_code == 200:
            return seen
        unit, _, rest = r.headers["content-range"].partition(" ")
        assert unit == "date-time" and rest.endswith("/*"), rest
        first, last = rest.removesuffix("/*").split("Z-")
        if newest:
            params = {"lastN": "100", "timerel": "before", "timeAt": first + "Z"}
        else:
            after = datetime.fromisoformat(last.replace("Z", "+00:00")) + timedelta(microseconds=1)
            params = {"timerel": "after", "timeAt": after.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    raise AssertionError("no end of pages")


def post_series(client: TestClient, eid: str, attrs: dict[str, list[str]]) -> None:
    """``attrs``: name -> observedAt of each instance; the values are 0, 1, 2, ..."""
    body: dict[str, Any] = {"id": eid, "type": "H"}
    for name, times in attrs.items():
        body[name] = [speed(i, t) for i, t in enumerate(times)]
    r = client.post(T, json=body)
    assert r.status_code == 201, r.text


def test_pages_of_several_cut_attributes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the 206 range was the union of the cut ranges and the other attributes were not trimmed
    # to it: continuing after its end lost the rest of the earlier attribute (a's 5, 6, 7)
    monkeypatch.setattr(temporal_routes, "INSTANCE_LIMIT", 5)
    attrs = {
        "a": [minute(m) for m in range(8)],
        "b": [minute(m, day=2) for m in range(8)],
        "c": [minute(30), minute(30, day=2)],  # never cut, but trimmed to each page's range
    }
    post_series(client, "urn:h:p", attrs)
    for newest in (False, True):
        seen = follow(client, "urn:h:p", newest)
        assert {k: sorted(v) for k, v in seen.items()} == {
            k: list(range(len(v))) for k, v in attrs.items()
        }, newest


def test_pages_never_cut_a_timestamp(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # a 206 cut inside instances of one time could not be continued: after its end skipped
    # the rest of the tie, at its end repeated the part sent
    monkeypatch.setattr(temporal_routes, "INSTANCE_LIMIT", 5)
    times = [minute(m) for m in (0, 1, 2, 3, 3, 3, 3, 4, 5, 6)]
    post_series(client, "urn:h:t", {"a": times})
    # more than a page at one time: the page holds that whole tie
    post_series(client, "urn:h:w", {"a": [minute(0)] * 7 + [minute(1)]})
    for newest in (False, True):
        assert sorted(follow(client, "urn:h:t", newest)["a"]) == list(range(10)), newest
        assert sorted(follow(client, "urn:h:w", newest)["a"]) == list(range(8)), newest
    r = client.get(f"{T}/urn:h:t")
    assert r.status_code == 206
    assert [i["value"] for i in r.json()["a"]] == [0, 1, 2]
    assert r.headers["content-range"] == (
        "date-time 2024-01-01T00:00:00.000000Z-2024-01-01T00:02:00.000000Z/*"
    )
    r = client.get(f"{T}/urn:h:w")
    assert r.status_code == 206 and [i["value"] for i in r.json()["a"]] == list(range(7))


TIMES_D = [f"2024-01-01T10:{m}:00.000000Z" for m in ("00", "10", "20", "30")]


def test_datasets_are_separate_series(client: TestClient) -> None:
    # aggregatedValues and temporalValues grouped by attribute only: the datasets' instances
    # were mixed into one series (and one list of periods) without their datasetId
    ds = "urn:ngsi-ld:Dataset:b"
    insts = [
        speed(10, "2024-01-01T10:00:00Z"),
        {**speed(100, "2024-01-01T10:10:00Z"), "datasetId": ds},
        {**speed(300, "2024-01-01T10:20:00Z"), "datasetId": ds},
        speed(12, "2024-01-01T10:30:00Z"),
    ]
    assert client.post(T, json={"id": "urn:h:d", "type": "H", "speed": insts}).status_code == 201
    got = aggregated(client, "urn:h:d", aggrMethods="avg", aggrPeriodDuration="PT1H")
    span = ["2024-01-01T10:00:00.000000Z", "2024-01-01T11:00:00.000000Z"]
    assert got["speed"] == [
        {"type": "Property", "avg": [[11.0, *span]]},
        {"type": "Property", "avg": [[200.0, *span]], "datasetId": ds},
    ]
    r = client.get(f"{T}/urn:h:d", params={"options": "temporalValues"})
    assert r.status_code == 200, r.text
    assert r.json()["speed"] == [
        {"type": "Property", "values": [[10, TIMES_D[0]], [12, TIMES_D[3]]]},
        {"type": "Property", "values": [[100, TIMES_D[1]], [300, TIMES_D[2]]], "datasetId": ds},
    ]
    # an attribute without datasets renders as before: one object
    r = client.post(T, json={"id": "urn:h:e", "type": "H", "speed": insts[:1]})
    assert r.status_code == 201, r.text
    got = aggregated(client, "urn:h:e", aggrMethods="avg")
    assert got["speed"] == {"type": "Property", "avg": [[10.0, TIMES_D[0], TIMES_D[0]]]}


def test_an_instance_without_observed_at_carries_its_time(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an instance without observedAt is filed, filtered and paged at the time the bank
    # received it, but the normalized answer showed it with no time at all
    load(client)
    for v in (70, 80):
        r = client.patch(f"{E}/{V1}/attrs", json={"speed": {"type": "Property", "value": v}})
        assert r.status_code == 204, r.text
    r = client.get(f"{T}/{V1}")
    assert r.status_code == 200, r.text
    insts = r.json()["speed"]
    assert [i["value"] for i in insts] == [*SPEEDS, 70, 80]
    assert [i["observedAt"] for i in insts[:3]] == TIMES
    received = [i["modifiedAt"] for i in insts[3:]]
    assert received[0] < received[1]  # two writes, one after the other
    # the time shown is the one the history files it at: filters match it there
    assert all("observedAt" not in i and "createdAt" not in i for i in insts[3:])
    assert all("modifiedAt" not in i for i in insts[:3])  # sysAttrs not asked for
    assert values(client, timerel="after", timeAt=received[1]) == [80]
    assert 70 not in values(client, timerel="before", timeAt=received[0])
    assert values(client, timerel="between", timeAt=received[0], endTimeAt=received[1]) == [70]
    # with sysAttrs both system times, as on every instance
    r = client.get(f"{T}/{V1}", params={"options": "sysAttrs"})
    assert [i["modifiedAt"] for i in r.json()["speed"][3:]] == received
    assert all("createdAt" in i for i in r.json()["speed"])
    # the entity query renders the same way
    r = client.get(T, params={"type": "Vehicle", "lastN": "1"})
    assert r.status_code == 200, r.text
    assert r.json()[0]["speed"] == [
        {
            "type": "Property",
            "value": 80,
            "instanceId": insts[4]["instanceId"],
            "modifiedAt": received[1],
        }
    ]
    # a page cut after such an instance ends at the time it shows
    monkeypatch.setattr(temporal_routes, "INSTANCE_LIMIT", 4)
    r = client.get(f"{T}/{V1}")
    assert r.status_code == 206, r.text
    assert [i["value"] for i in r.json()["speed"]] == [*SPEEDS, 70]
    assert r.headers["content-range"] == f"date-time {normalize(TIMES[0])}-{received[0]}/*"


def normalize(t: str) -> str:
    return t[:-1] + ".000000Z"


def test_aggregates_of_a_deleted_attribute_keep_its_kind(client: TestClient) -> None:
    # the kind came from the current entity: an attribute deleted from it (its history kept)
    # was reported as a Property whatever it was
    rel = {"type": "Relationship", "object": "urn:ngsi-ld:Person:P1", "observedAt": TIMES[0]}
    body = {"id": V1, "type": "Vehicle", "owner": rel, "speed": speed(SPEEDS[0], TIMES[0])}
    assert client.post(E, json=body).status_code == 201
    rel2 = {**rel, "object": "urn:ngsi-ld:Person:P2", "observedAt": TIMES[1]}
    assert client.patch(f"{E}/{V1}/attrs", json={"owner": rel2}).status_code == 204
    r = client.delete(f"{E}/{V1}/attrs/owner")
    assert r.status_code == 204, r.text
    got = aggregated(client, V1, aggrMethods="totalCount,distinctCount")
    span = [normalize(TIMES[0]), normalize(TIMES[1])]
    assert got["owner"] == {
        "type": "Relationship",
        "totalCount": [[2, *span]],
        "distinctCount": [[2, *span]],
    }
    assert got["speed"]["type"] == "Property"
    r = client.get(
        T,
        params={
            "type": "Vehicle",
            "options": "aggregatedValues",
            "aggrMethods": "totalCount",
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()[0]["owner"]["type"] == "Relationship"
