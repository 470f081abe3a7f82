"""A temporal query with ``attrs`` matches the entities that hold an instance of one of the
attributes in the time window, whether the entity still has the attribute or it was deleted.

Both backends (the ``client`` fixture runs each test on SQLite and PostgreSQL).
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

E = "/ngsi-ld/v1/entities"
T = "/ngsi-ld/v1/temporal/entities"
POST_QUERY = "/ngsi-ld/v1/temporal/entityOperations/query"
GONE = "urn:ngsi-ld:Sensor:Gone"  # temperature deleted; its history at 10:00 and 11:00
LATE = "urn:ngsi-ld:Sensor:Late"  # has temperature now, observed at 12:00
EARLY = "urn:ngsi-ld:Sensor:Early"  # has temperature now, observed at 10:00 only
NEVER = "urn:ngsi-ld:Sensor:Never"  # never had temperature


def prop(v: Any, t: str) -> dict[str, Any]:
    return {"type": "Property", "value": v, "observedAt": t}


@pytest.fixture
def sensors(client: TestClient) -> TestClient:
    body = {
        "id": GONE,
        "type": "Sensor",
        "temperature": prop(20, "2024-05-01T10:00:00Z"),
        "hum": prop(5, "2024-05-01T12:00:00Z"),
    }
    assert client.post(E, json=body).status_code == 201
    r = client.patch(f"{E}/{GONE}/attrs", json={"temperature": prop(21, "2024-05-01T11:00:00Z")})
    assert r.status_code == 204, r.text
    assert client.delete(f"{E}/{GONE}/attrs/temperature").status_code == 204
    body = {"id": LATE, "type": "Sensor", "temperature": prop(30, "2024-05-01T12:00:00Z")}
    assert client.post(E, json=body).status_code == 201
    body = {"id": EARLY, "type": "Sensor", "temperature": prop(40, "2024-05-01T10:00:00Z")}
    assert client.post(E, json=body).status_code == 201
    body = {"id": NEVER, "type": "Sensor", "hum": prop(7, "2024-05-01T12:00:00Z")}
    assert client.post(E, json=body).status_code == 201
    return client


def window(timerel: str, at: str, end: str | None = None) -> dict[str, str]:
    out = {"timerel": timerel, "timeAt": f"2024-05-01T{at}:00Z"}
    if end is not None:
        out["endTimeAt"] = f"2024-05-01T{end}:00Z"
    return out


def found(client: TestClient, **params: str) -> dict[str, list[Any]]:
    """{entity id: its temperature instances' values} of a query by attrs=temperature."""
    r = client.get(T, params={"type": "Sensor", "attrs": "temperature", **params})
    assert r.status_code == 200, r.text
    return {e["id"]: [i["value"] for i in e.get("temperature", [])] for e in r.json()}


# (window, the entities matched with their temperatures): an entity whose temperature
# instances all lie outside the window is not matched, whether it has temperature now or not
CASES = [
    (window("after", "11:30"), {LATE: [30]}),
    (window("before", "10:30"), {GONE: [20], EARLY: [40]}),
    (window("between", "10:30", "11:30"), {GONE: [21]}),
    (window("between", "12:30", "13:00"), {}),
]


@pytest.mark.parametrize(("params", "expected"), CASES)
def test_attrs_matches_instances_in_the_window(
    sensors: TestClient, params: dict[str, str], expected: dict[str, list[Any]]
) -> None:
    # the old query matched GONE by any instance of its history and LATE/EARLY by their
    # current state: both returned with no instance when the window held none of them
    assert found(sensors, **params) == expected
    # the count and the entity paging count the same entities
    r = sensors.get(T, params={"type": "Sensor", "attrs": "temperature", "count": "true", **params})
    assert r.headers["NGSILD-Results-Count"] == str(len(expected))
    r = sensors.get(T, params={"attrs": "temperature", "limit": "1", **params})
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()] == sorted(expected, key=list(expected).index)[:1]
    # lastN keeps the newest instances of what the window holds: the same entities
    assert found(sensors, lastN="1", **params) == {k: v[-1:] for k, v in expected.items()}
    # the POST query and the aggregated form match the same entities
    query = {"type": "Query", "entities": [{"type": "Sensor"}], "attrs": ["temperature"]}
    r = sensors.post(POST_QUERY, json={**query, "temporalQ": params})
    assert r.status_code == 200, r.text
    assert {e["id"]: [i["value"] for i in e["temperature"]] for e in r.json()} == expected
    aggr = {"options": "aggregatedValues", "aggrMethods": "sum,totalCount"}
    r = sensors.get(T, params={"type": "Sensor", "attrs": "temperature", **aggr, **params})
    assert r.status_code == 200, r.text
    sums = {e["id"]: e["temperature"]["sum"][0][0] for e in r.json()}
    assert sums == {k: float(sum(v)) for k, v in expected.items()}


def test_attrs_window_on_the_timeproperty(sensors: TestClient) -> None:
    # the window applies to the timeproperty asked for: every instance was received (its
    # modifiedAt) after 2020 and none before, whatever its observedAt
    assert found(sensors, timeproperty="modifiedAt", **window("before", "10:30")) == {}
    early = {"timerel": "before", "timeAt": "2020-01-01T00:00:00Z", "timeproperty": "modifiedAt"}
    assert found(sensors, **early) == {}
    late = {"timerel": "after", "timeAt": "2020-01-01T00:00:00Z", "timeproperty": "modifiedAt"}
    assert found(sensors, **late) == {GONE: [20, 21], LATE: [30], EARLY: [40]}


def test_attrs_needs_an_instance_not_the_attribute(sensors: TestClient) -> None:
    # an entity that has temperature now but whose history of it was deleted holds no
    # instance of it in any window: not matched, as one whose history lies outside the window
    assert found(sensors) == {GONE: [20, 21], LATE: [30], EARLY: [40]}  # no timerel: all
    r = sensors.delete(f"{T}/{EARLY}/attrs/temperature", params={"deleteAll": "true"})
    assert r.status_code == 204, r.text
    assert "temperature" in sensors.get(f"{E}/{EARLY}").json()
    assert found(sensors) == {GONE: [20, 21], LATE: [30]}
    assert found(sensors, **window("before", "10:30")) == {GONE: [20]}
    # without attrs the entities are selected by their current state alone
    r = sensors.get(T, params={"type": "Sensor", **window("between", "12:30", "13:00")})
    assert r.status_code == 200, r.text
    assert sorted(e["id"] for e in r.json()) == sorted([GONE, LATE, EARLY, NEVER])
