"""/jsonldContexts: hosted contexts are served and resolved locally; cached ones listed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.model import EntityParser
from cityward.bank.store import Store
from cityward.config import Settings
from tests.bank.ctx_server import ctx_server

C = "/ngsi-ld/v1/jsonldContexts"
E = "/ngsi-ld/v1/entities"
T = "/ngsi-ld/v1/temporal/entities"
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


def _app(store: Store, tmp_path: Path, **settings: Any) -> FastAPI:
    return create_app(Settings(data_dir=tmp_path, no_auth=True, **settings), store)


def _link(url: str) -> dict[str, str]:
    return {"Link": f'<{url}>; rel="http://www.w3.org/ns/json-ld#context"'}


def test_attributes_cannot_pose_as_entity_members(client: TestClient) -> None:
    dv = "https://uri.etsi.org/ngsi-ld/default-context/"
    for name in (dv + "id", dv + "type", "ngsi-ld:scope", "ngsi-ld:createdAt"):
        car = {"id": "urn:ngsi-ld:Car:1", "type": "Car", name: {"type": "Property", "value": "X"}}
        r = client.post(E, json=car)
        assert r.status_code == 400 and r.json()["field"] == name, r.text
    car = {"id": "urn:ngsi-ld:Car:1", "type": "Car", "speed": {"type": "Property", "value": 5}}
    assert client.post(E, json=car).status_code == 201
    r = client.patch(f"{E}/urn:ngsi-ld:Car:1/attrs/{dv}id", json={"type": "Property", "value": 1})
    assert r.status_code == 400, r.text
    r = client.post(C, json={"@context": {"id": "http://x.org/id", "type": "http://x.org/type"}})
    assert r.status_code == 400 and r.json()["field"] in ("id", "type"), r.text
    r = client.get(f"{E}/urn:ngsi-ld:Car:1", params={"options": "keyValues"})
    assert r.json() == {"id": "urn:ngsi-ld:Car:1", "type": "Car", "speed": 5}


def test_contexts_stay_with_their_tenant(store: Store, tmp_path: Path) -> None:
    remote = "http://hospital-a.example/private/ctx.jsonld"
    (tmp_path / "ctx.jsonld").write_text('{"@context": {"diagnosis": "http://a.example/dx"}}')
    a, b = {"NGSILD-Tenant": "tenant-a"}, {"NGSILD-Tenant": "tenant-b"}
    app = _app(store, tmp_path, context_fetch=False, contexts={remote: tmp_path / "ctx.jsonld"})
    with TestClient(app) as client:
        client.post(E, json={"id": "urn:ngsi-ld:X:b", "type": "X"}, headers=b)
        r = client.post(C, json={"@context": {"secret": "http://a.example/secret"}}, headers=a)
        hosted = f"http://testserver{r.headers['location']}"
        patient = {"id": "urn:ngsi-ld:Patient:1", "type": "Patient", "diagnosis": "x"}
        assert client.post(E, json=patient, headers={**a, **_link(remote)}).status_code == 201
        # tenant b cannot use a's hosted context, nor see what a caused to be cached
        x = {"id": "urn:ngsi-ld:X:1", "type": "X", "secret": 1}
        r = client.post(E, json=x, headers={**b, **_link(hosted)})
        assert r.status_code == 504, r.text
        assert client.get(C, headers=b).json() == []
        cached = client.get(C, params={"details": "true"}, headers=a).json()
        assert {d["kind"] for d in cached} == {"Hosted", "Cached"}
        cached_id = next(d["localId"] for d in cached if d["kind"] == "Cached")
        assert client.get(f"{C}/{cached_id}", headers=b).status_code == 404
        assert client.delete(f"{C}/{cached_id}", headers=b).status_code == 404
        assert client.get(f"{C}/{cached_id}", headers=a).status_code == 200
        # tenant a still uses its own hosted context
        r = client.post(E, json={**x, "id": "urn:ngsi-ld:X:2"}, headers={**a, **_link(hosted)})
        assert r.status_code == 201, r.text


def test_every_use_of_a_context_counts(client: TestClient) -> None:
    r = client.post(C, json={"@context": {"speed": "http://x.example/speed"}})
    url = f"http://testserver{r.headers['location']}"
    for i in range(5):
        car = {"id": f"urn:ngsi-ld:Car:{i}", "type": "Car"}
        assert client.post(E, json=car, headers=_link(url)).status_code == 201
        assert client.get(f"{E}/urn:ngsi-ld:Car:{i}", headers=_link(url)).status_code == 200
    (details,) = client.get(C, params={"details": "true"}).json()
    assert details["numberOfHits"] == 10
    assert "lastUsage" in details


def test_contexts_on_private_addresses_are_not_fetched(store: Store, tmp_path: Path) -> None:
    with ctx_server() as srv, TestClient(_app(store, tmp_path)) as client:
        r = client.get(E, params={"type": "X"}, headers=_link(f"{srv.base}/ctx/brand"))
        assert r.status_code == 400 and r.json()["field"] == "@context", r.text
        assert srv.paths == []
        assert client.get(C, params={"kind": "Cached"}).json() == []


@pytest.mark.parametrize("how", ["patch-attr", "put-attr", "temporal-create", "temporal-append"])
def test_slow_body_context_does_not_stall_other_requests(
    store: Store, tmp_path: Path, how: str
) -> None:
    app = _app(store, tmp_path, context_timeout_s=60)
    app.state.runtime.contexts.allow_private = True  # the test's context server is loopback
    x1 = "urn:ngsi-ld:X:1"
    with ctx_server() as srv, TestClient(app) as client:
        srv.slow_wait = 10
        r = client.post(E, json={"id": x1, "type": "X", "a": {"type": "Property", "value": 1}})
        assert r.status_code == 201
        ctx = [f"{srv.base}/slow/{how}"]
        ld = {"Content-Type": "application/ld+json"}
        attr = {"type": "Property", "value": 2, "@context": ctx}
        instance = {"type": "Property", "value": 1, "observedAt": "2024-01-01T00:00:00Z"}
        temporal: dict[str, Any] = {"id": "urn:ngsi-ld:X:2", "type": "X", "@context": ctx}
        temporal["a"] = [instance]
        send: Callable[[], httpx.Response] = {
            "patch-attr": lambda: client.patch(f"{E}/{x1}/attrs/a", json=attr, headers=ld),
            "put-attr": lambda: client.put(f"{E}/{x1}/attrs/a", json=attr, headers=ld),
            "temporal-create": lambda: client.post(f"{T}", json=temporal, headers=ld),
            "temporal-append": lambda: client.post(
                f"{T}/{x1}/attrs",
                json={k: v for k, v in temporal.items() if k not in ("id", "type")},
                headers=ld,
            ),
        }[how]
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", send()))
        thread.start()
        for _ in range(1000):  # until the server is asked for the slow context
            if srv.paths:
                break
            threading.Event().wait(0.01)
        assert srv.paths
        # answered while the slow context is still being waited for
        assert client.get(f"{E}/{x1}").status_code == 200
        assert not srv.served_slow.is_set()
        srv.release.set()
        thread.join()
        assert result["r"].status_code < 300, result["r"].text


def test_a_write_outside_a_request_notifies_with_the_tenants_hosted_context(
    store: Store, tmp_path: Path
) -> None:
    # notifications of a write that no request made (ingest, the anomaly service) resolved a
    # subscription's hosted jsonldContext for the default tenant, not the subscription's: it
    # was not found, and the notification fell back to the core context
    a = {"NGSILD-Tenant": "tenant-a"}
    app = _app(store, tmp_path, context_fetch=False)
    with TestClient(app) as client:
        r = client.post(C, json={"@context": {"secret": "http://a.example/secret"}}, headers=a)
        hosted = f"http://testserver{r.headers['location']}"
        sub = {
            "type": "Subscription",
            "entities": [{"type": "X"}],
            "jsonldContext": hosted,
            "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}},
        }
        assert client.post("/ngsi-ld/v1/subscriptions", json=sub, headers=a).status_code == 201
        bank = app.state.runtime.bank
        doc = EntityParser(app.state.runtime.contexts.core).entity(
            {"id": "urn:ngsi-ld:X:1", "type": "X", "http://a.example/secret": 7}
        )
        assert not bank.batch_upsert("tenant-a", [doc], "update").errors
        items = app.state.subscriptions.outbox.items()
    [item] = [i for i in items if i.body.get("data")]
    assert item.headers["Link"].startswith(f"<{hosted}>"), item.headers
    assert item.body["data"][0]["secret"] == {"type": "Property", "value": 7}
