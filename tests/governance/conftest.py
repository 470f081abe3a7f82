"""A governed API (authentication on) over each backend, with a token per role."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.store import Store
from cityward.config import Settings
from cityward.governance.policy import Role
from cityward.governance.runtime import Governance

E = "/ngsi-ld/v1/entities"
TRAFFIC = "urn:ngsi-ld:TrafficFlowObserved:t1"
AIR = "urn:ngsi-ld:AirQualityObserved:a1"
CROWD = "urn:ngsi-ld:CrowdFlowObserved:c1"
UNDECLARED = "urn:ngsi-ld:Thing:u1"
DEVICE_OWN = "urn:ngsi-ld:TrafficFlowObserved:loop-7"


@dataclass
class Governed:
    client: TestClient
    app: FastAPI
    gov: Governance
    headers: dict[str, dict[str, str]]  # role name (or "device", "operator-air") -> headers

    def as_(self, who: str) -> dict[str, str]:
        return self.headers[who]


def _entities() -> list[dict[str, object]]:
    point = {"type": "Point", "coordinates": [3.72, 51.05]}
    loc = {"type": "GeoProperty", "value": point}
    return [
        {"id": TRAFFIC, "type": "TrafficFlowObserved", "intensity": 10, "location": loc},
        {"id": AIR, "type": "AirQualityObserved", "no2": 30, "location": loc},
        {"id": CROWD, "type": "CrowdFlowObserved", "peopleCount": 12, "location": loc},
        {"id": UNDECLARED, "type": "Thing", "level": 1},
    ]


@pytest.fixture
def governed(store: Store, tmp_path: Path) -> Iterator[Governed]:
    settings = Settings(data_dir=tmp_path, context_fetch=False)
    app = create_app(settings, store)
    gov: Governance = app.state.governance
    ids = gov.identities
    headers: dict[str, dict[str, str]] = {"public": {}}

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    headers["operator"] = bearer(ids.issue(Role.OPERATOR, ["traffic-management"]))
    headers["operator-air"] = bearer(ids.issue(Role.OPERATOR, ["environment-monitoring"]))
    headers["analyst"] = bearer(ids.issue(Role.ANALYST, ["traffic-management"]))
    headers["auditor"] = bearer(ids.issue(Role.AUDITOR, []))
    headers["admin"] = bearer(ids.issue(Role.ADMIN, ["*"]))
    _, key = ids.create_device_key("loop-7", [DEVICE_OWN], [])
    headers["device"] = {"X-API-Key": key}
    with TestClient(app) as client:
        r = client.post(
            "/ngsi-ld/v1/entityOperations/upsert", json=_entities(), headers=headers["admin"]
        )
        assert r.status_code in (201, 204), r.text
        yield Governed(client, app, gov, headers)
