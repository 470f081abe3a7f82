"""/jsonldContexts: hosted contexts are served and resolved locally; cached ones listed."""

from __future__ import annotations

from fastapi.testclient import TestClient

C = "/ngsi-ld/v1/jsonldContexts"
E = "/ngsi-ld/v1/entities"
PROBLEM = "https://uri.etsi.org/ngsi-ld/errors/"


def test_hosted_context_lifecycle(client: TestClient) -> None:
    ctx = {"@context": {"speed": "https://example.org/speed", "Car": "https://example.org/Car"}}
    r = client.post(C, json=ctx)
    assert r.status_code == 201, r.text
    location = r.headers["location"]
    local_id = location.rsplit("/", 1)[1]
    assert location == f"{C}/{local_id}"

    r = client.get(f"{C}/{local_id}")
    assert r.status_code == 200 and r.json() == ctx

    url = f"http://testserver{location}"
    assert client.get(C).json() == [url]
    (details,) = client.get(C, params={"details": "true", "kind": "Hosted"}).json()
    assert details["URL"] == url and details["localId"] == local_id
    assert details["kind"] == "Hosted" and "createdAt" in details
    assert client.get(C, params={"kind": "Cached"}).json() == []

    # a request naming the hosted context expands with it, without any network
    link = f'<{url}>; rel="http://www.w3.org/ns/json-ld#context"; type="application/ld+json"'
    car = {"id": "urn:ngsi-ld:Car:1", "type": "Car", "speed": {"type": "Property", "value": 3}}
    r = client.post(E, json=car, headers={"Link": link})
    assert r.status_code == 201, r.text
    r = client.get(f"{E}/urn:ngsi-ld:Car:1")
    assert r.json()["type"] == "https://example.org/Car"
    assert "https://example.org/speed" in r.json()
    (details,) = client.get(C, params={"details": "true"}).json()
    assert details["numberOfHits"] >= 1 and "lastUsage" in details

    # other tenants do not see it
    other = {"NGSILD-Tenant": "t2"}
    assert client.get(f"{C}/{local_id}", headers=other).status_code == 404

    r = client.delete(f"{C}/{local_id}", params={"reload": "true"})
    assert r.status_code == 400 and r.json()["type"] == PROBLEM + "BadRequestData"
    assert client.delete(f"{C}/{local_id}").status_code == 204
    assert client.get(f"{C}/{local_id}").status_code == 404
    assert client.delete(f"{C}/{local_id}").status_code == 404
    r = client.post(E, json={**car, "id": "urn:ngsi-ld:Car:2"}, headers={"Link": link})
    # the URL is gone: the test client's fake host cannot be fetched either
    assert r.status_code in (503, 504), r.text
    assert r.json()["type"] == PROBLEM + "LdContextNotAvailable"


def test_bad_requests(client: TestClient) -> None:
    for body in ({"no": "context"}, [1], {"@context": 5}):
        r = client.post(C, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["type"] == PROBLEM + "BadRequestData"
    r = client.get(C, params={"kind": "Strange"})
    assert r.status_code == 400 and r.json()["title"]
    r = client.get(C, params={"details": "maybe"})
    assert r.status_code == 400
    assert client.get(f"{C}/nothing-here").status_code == 404
