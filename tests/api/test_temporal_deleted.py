"""The temporal API over what the entity no longer holds, and over mixed kinds per datasetId.

Both backends (the ``client`` fixture runs each test on SQLite and PostgreSQL): the history
queries are built per dialect (cityward.bank.temporal.sql).
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

E = "/ngsi-ld/v1/entities"
T = "/ngsi-ld/v1/temporal/entities"
POST_QUERY = "/ngsi-ld/v1/temporal/entityOperations/query"
S1 = "urn:ngsi-ld:Sensor:S1"
S2 = "urn:ngsi-ld:Sensor:S2"
S3 = "urn:ngsi-ld:Sensor:S3"
TIMES = ["2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", "2024-05-01T12:00:00Z"]
AFTER = {"timerel": "after", "timeAt": "2024-05-01T09:00:00Z"}


def prop(v: Any, t: str, **extra: Any) -> dict[str, Any]:
    return {"type": "Property", "value": v, "observedAt": t, **extra}


def rel(obj: str, t: str, **extra: Any) -> dict[str, Any]:
    return {"type": "Relationship", "object": obj, "observedAt": t, **extra}


def temperatures(entity: dict[str, Any]) -> list[Any]:
    return [i["value"] for i in entity.get("temperature", [])]


def test_query_by_attrs_finds_an_attribute_deleted_from_the_entity(client: TestClient) -> None:
    # attrs selected on the entity's current state: once temperature was deleted from S1
    # (its history kept), the query by attrs left S1 out, while retrieving S1 showed it
    body = {"id": S1, "type": "Sensor", "temperature": prop(20, TIMES[0]), "hum": prop(5, TIMES[0])}
    assert client.post(E, json=body).status_code == 201
    r = client.patch(f"{E}/{S1}/attrs", json={"temperature": prop(21, TIMES[1])})
    assert r.status_code == 204, r.text
    assert client.delete(f"{E}/{S1}/attrs/temperature").status_code == 204
    # S2 still has temperature; S3 never had it
    body = {"id": S2, "type": "Sensor", "temperature": prop(30, TIMES[2])}
    assert client.post(E, json=body).status_code == 201
    body = {"id": S3, "type": "Sensor", "hum": prop(7, TIMES[2])}
    assert client.post(E, json=body).status_code == 201

    r = client.get(f"{T}/{S1}", params={"attrs": "temperature", **AFTER})
    assert r.status_code == 200, r.text
    retrieved = r.json()
    assert temperatures(retrieved) == [20, 21]

    r = client.get(T, params={"type": "Sensor", "attrs": "temperature", **AFTER})
    assert r.status_code == 200, r.text
    got = {e["id"]: e for e in r.json()}
    assert sorted(got) == [S1, S2]
    assert got[S1] == retrieved  # query and retrieval agree
    assert temperatures(got[S2]) == [30]
    # attrs alone qualifies the query, and the count holds the entity too
    r = client.get(T, params={"attrs": "temperature", "count": "true", **AFTER})
    assert r.status_code == 200, r.text
    assert sorted(e["id"] for e in r.json()) == [S1, S2]
    assert r.headers["NGSILD-Results-Count"] == "2"
    # the POST query, and the aggregated form
    query = {
        "type": "Query",
        "entities": [{"type": "Sensor"}],
        "attrs": ["temperature"],
        "temporalQ": AFTER,
    }
    r = client.post(POST_QUERY, json=query)
    assert r.status_code == 200, r.text
    assert {e["id"]: temperatures(e) for e in r.json()} == {S1: [20, 21], S2: [30]}
    r = client.get(
        T,
        params={
            "type": "Sensor",
            "attrs": "temperature",
            "options": "aggregatedValues",
            "aggrMethods": "sum",
            **AFTER,
        },
    )
    assert r.status_code == 200, r.text
    sums = {e["id"]: [v for v, _, _ in e["temperature"]["sum"]] for e in r.json()}
    assert sums == {S1: [41.0], S2: [30.0]}

    # A deleted entity is gone from the temporal API too: it is retrieved as 404 and queried
    # as nothing (its history rows stay keyed by a pk no entity holds any more: no id or type
    # is left to answer with), also when an entity of the same id is created again
    assert client.delete(f"{E}/{S1}").status_code == 204
    assert client.get(f"{T}/{S1}").status_code == 404
    r = client.get(T, params={"type": "Sensor", "attrs": "temperature", **AFTER})
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()] == [S2]
    body = {"id": S1, "type": "Sensor", "hum": prop(9, TIMES[2])}
    assert client.post(E, json=body).status_code == 201
    r = client.get(T, params={"type": "Sensor", "attrs": "temperature", **AFTER})
    assert [e["id"] for e in r.json()] == [S2]
    r = client.get(f"{T}/{S1}", params=AFTER)
    assert r.status_code == 200, r.text
    assert "temperature" not in r.json()


def aggregated(client: TestClient, eid: str) -> Any:
    params = {"options": "aggregatedValues", "aggrMethods": "totalCount"}
    r = client.get(f"{T}/{eid}", params=params)
    assert r.status_code == 200, r.text
    return r.json()["link"]


def test_aggregates_take_the_kind_per_dataset(client: TestClient) -> None:
    # the kind came from the attribute's newest instance, all datasetIds together: a
    # Property dataset beside a newer Relationship dataset was reported as a Relationship
    a, b = "urn:ngsi-ld:Dataset:a", "urn:ngsi-ld:Dataset:b"
    mixed = [prop(3, TIMES[0], datasetId=a), rel("urn:ngsi-ld:Thing:X", TIMES[1], datasetId=b)]
    # the entity API accepts an attribute whose datasets are of different kinds
    assert client.post(E, json={"id": S1, "type": "Sensor", "link": mixed}).status_code == 201
    # and so does the temporal API
    assert client.post(T, json={"id": S2, "type": "Sensor", "link": mixed}).status_code == 201
    for eid in (S1, S2):
        got = aggregated(client, eid)
        assert [(g["type"], g["datasetId"]) for g in got] == [("Property", a), ("Relationship", b)]
        r = client.get(f"{T}/{eid}", params={"options": "temporalValues"})
        assert [(g["type"], g["datasetId"]) for g in r.json()["link"]] == [
            ("Property", a),
            ("Relationship", b),
        ]
    # a dataset whose kind changed (a replace) keeps the kind of its newest instance, in
    # the window; the default instance is a series of its own
    r = client.patch(
        f"{E}/{S1}/attrs", json={"link": rel("urn:ngsi-ld:Thing:Y", TIMES[2], datasetId=a)}
    )
    assert r.status_code == 204, r.text
    r = client.post(f"{E}/{S1}/attrs", json={"link": prop(7, TIMES[0])})
    assert r.status_code == 204, r.text
    got = aggregated(client, S1)
    assert [(g["type"], g.get("datasetId")) for g in got] == [
        ("Property", None),
        ("Relationship", a),
        ("Relationship", b),
    ]
    params = {
        "options": "aggregatedValues",
        "aggrMethods": "totalCount",
        "timerel": "before",
        "timeAt": TIMES[2],
    }
    r = client.get(f"{T}/{S1}", params=params)
    assert r.status_code == 200, r.text
    assert [(g["type"], g.get("datasetId")) for g in r.json()["link"]] == [
        ("Property", None),
        ("Property", a),
        ("Relationship", b),
    ]
    # the query renders the same way
    params = {"type": "Sensor", "options": "aggregatedValues", "aggrMethods": "totalCount"}
    r = client.get(T, params=params)
    assert r.status_code == 200, r.text
    kinds = {e["id"]: [(g["type"], g.get("datasetId")) for g in e["link"]] for e in r.json()}
    assert kinds[S2] == [("Property", a), ("Relationship", b)]
