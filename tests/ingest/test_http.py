"""HTTP push: POST /ingest/{source} with a device key, through the governed API on SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import Settings
from cityward.governance.policy import Role
from tests.ingest.helpers import MAPPING, message, stored_readings


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], SqliteStore]]:
    settings = Settings(
        data_dir=tmp_path,
        context_fetch=False,
        ingest={
            "enabled": True,
            "sources": [{"name": "air", "adapter": "http", "mapping": MAPPING}],
            "writer": {"max_delay_ms": 5},
        },
    )
    store = SqliteStore(tmp_path / "bank.db")
    app = create_app(settings, store)
    ids = app.state.governance.identities
    _, key = ids.create_device_key("aq-box", [r"urn:ngsi-ld:AirQualityObserved:s[0-4]"], [])
    headers = {
        "device": {"X-API-Key": key},
        "operator": {
            "Authorization": f"Bearer {ids.issue(Role.OPERATOR, ['environment-monitoring'])}"
        },
    }
    with TestClient(app) as client:
        yield client, headers, store


def _post(client: TestClient, headers: dict[str, str], body: Any, raw: bytes | None = None) -> Any:
    return client.post(
        "/ingest/air", content=raw if raw is not None else orjson.dumps(body), headers=headers
    )


def test_a_device_pushes_one_or_many_messages(api: Any) -> None:
    client, h, store = api
    r = _post(client, h["device"], message(1, devices=5))
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1}
    r = _post(client, h["device"], [message(n, devices=5) for n in range(2, 12)])
    assert r.status_code == 200 and r.json() == {"accepted": 10}
    lines = b"\n".join(orjson.dumps(message(n, devices=5)) for n in range(12, 15))
    assert _post(client, h["device"], None, raw=lines).json() == {"accepted": 3}
    # a retry after a lost answer is recognised: nothing is stored twice
    assert (
        _post(client, h["device"], [message(n, devices=5) for n in range(1, 6)]).status_code == 200
    )
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(1, 15)]


def test_a_bad_message_is_refused_and_its_neighbours_are_written(api: Any) -> None:
    client, h, store = api
    msgs: list[Any] = [message(n, devices=5) for n in range(6)]
    msgs[2] = {"dev": "s2", "n": 2, "ts": 1}  # no no2
    msgs[4] = {"dev": "s9", "n": 4, "ts": 1, "no2": 3}  # not the device's entity
    r = _post(client, h["device"], msgs)
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["accepted"] == 4
    errors = {e["index"]: e for e in body["errors"]}
    assert errors[2]["field"] == "$.no2" and "missing" in errors[2]["reason"]
    assert errors[4]["field"] == "id" and "s9" in errors[4]["reason"]
    assert sorted(v for _, v in stored_readings(store)) == [0.0, 1.0, 3.0, 5.0]
    dead = client.app.state.ingest.dead_letters.entries("air")
    assert [d.field for d in dead] == ["$.no2", "id"]


def test_errors_are_problem_details(api: Any) -> None:
    client, h, _ = api
    r = _post(client, h["device"], {"dev": "s1", "n": 1, "ts": 1})
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["title"] and r.json()["detail"].startswith("no message of the push")
    r = client.post("/ingest/nope", content=b"{}", headers=h["device"])
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    r = _post(client, {}, message(1))
    assert r.status_code == 401
    r = _post(client, h["operator"], message(1))
    assert r.status_code == 400, r.text
    assert "device key" in r.json()["detail"]
    r = _post(client, h["device"], None, raw=b"{oops")
    assert r.status_code == 400 and r.json()["detail"].startswith("no message")
    # the source writes into [ingest] tenant: another tenant's header was silently ignored
    r = client.post(
        "/ingest/air",
        content=orjson.dumps(message(1)),
        headers={**h["device"], "NGSILD-Tenant": "city-b"},
    )
    assert r.status_code == 400 and r.json()["field"] == "NGSILD-Tenant", r.text
    r = _post(client, h["device"], [])  # it was a 500 (IndexError)
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "the push holds no message" and r.json()["field"] == "$"


def test_a_push_may_not_change_an_entity_of_a_source_its_token_may_not_write(
    tmp_path: Path,
) -> None:
    """With ``device_key = false`` and an id template whose type part the pusher shapes, an
    environment operator's push reached a traffic camera's entity (the push checked the
    mapping's type only; the writer checked nothing): the camera became an
    AirQualityObserved too. The API refuses that write; so does the push now."""
    mapping = {**MAPPING, "id": "urn:ngsi-ld:{$.kind}:{$.dev}"}
    settings = Settings(
        data_dir=tmp_path,
        context_fetch=False,
        ingest={
            "enabled": True,
            "sources": [
                {
                    "name": "air",
                    "adapter": "http",
                    "mapping": mapping,
                    "options": {"device_key": False},
                }
            ],
            "writer": {"max_delay_ms": 5},
        },
    )
    store = SqliteStore(tmp_path / "bank.db")
    app = create_app(settings, store)
    ids = app.state.governance.identities
    admin = {"Authorization": f"Bearer {ids.issue(Role.ADMIN, ['*'])}"}
    air = {"Authorization": f"Bearer {ids.issue(Role.OPERATOR, ['environment-monitoring'])}"}
    camera = "urn:ngsi-ld:Camera:c1"
    with TestClient(app) as client:
        r = client.post(
            "/ngsi-ld/v1/entities",
            json={"id": camera, "type": "Camera", "status": "ok"},
            headers=admin,
        )
        assert r.status_code == 201, r.text
        # the same operator through the NGSI-LD API: refused
        r = client.post(f"/ngsi-ld/v1/entities/{camera}/attrs", json={"no2": 1}, headers=air)
        assert r.status_code == 403, r.text
        push = [
            {"kind": "Camera", "dev": "c1", "n": 1, "ts": 1_700_000_000_000, "no2": 99},
            {"kind": "AirQualityObserved", "dev": "s1", "n": 2, "ts": 1_700_000_000_000, "no2": 7},
        ]
        r = client.post("/ingest/air", content=orjson.dumps(push), headers=air)
        assert r.status_code == 207, r.text
        assert r.json()["accepted"] == 1
        (error,) = r.json()["errors"]
        assert error["index"] == 0 and error["field"] == "id", error
        doc = client.get(f"/ngsi-ld/v1/entities/{camera}", headers=admin).json()
        assert doc["type"] == "Camera" and "no2" not in doc, doc
        r = client.get("/ngsi-ld/v1/entities/urn:ngsi-ld:AirQualityObserved:s1", headers=air)
        assert r.status_code == 200 and r.json()["no2"]["value"] == 7, r.text
        # refused, not remembered: the same message is refused again, not taken for a repeat
        r = client.post("/ingest/air", content=orjson.dumps(push[:1]), headers=air)
        assert r.status_code == 400 and r.json()["field"] == "id", r.text
    store.close()
