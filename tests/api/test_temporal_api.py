"""The temporal API end to end: writes record history, /temporal answers from it."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

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
