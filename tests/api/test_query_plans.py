"""Every way the store can run a page query returns the same pages (both backends).

The adaptive path scans a first window of entities, then scans on or starts from an index
(store/base.py, Store._adaptive). Real windows are thousands of entities; here the window and
the cost weights are shrunk so that each branch runs on a small data set, and every page is
checked against the answer computed in Python.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.bank.store import Store

E = "/ngsi-ld/v1/entities"
N = 240


def sensor(n: int, rng: random.Random) -> dict[str, Any]:
    return {
        "id": f"urn:ngsi-ld:Sensor:S{n:04d}",
        "type": "Sensor" if n % 7 else "Other",
        "a": {"type": "Property", "value": rng.randrange(100)},
        "b": {"type": "Property", "value": rng.randrange(4)},
        "name": {"type": "Property", "value": f"s{n % 13}"},
    }


QUERIES: list[tuple[str, Any]] = [
    ("a>90;b==2", lambda e: e["a"] > 90 and e["b"] == 2),
    ("a>50;b==1", lambda e: e["a"] > 50 and e["b"] == 1),
    ("a<3", lambda e: e["a"] < 3),
    ("b==3", lambda e: e["b"] == 3),
    ('name=="s4";a>=10', lambda e: e["name"] == "s4" and e["a"] >= 10),
    ("a==200", lambda e: False),
]


@pytest.mark.parametrize("weight", [0.0001, 4.0, 1e9], ids=["drive", "default", "scan"])
@pytest.mark.parametrize("window", [1, 17, 5000])
def test_every_plan_pages_alike(
    client: TestClient,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    weight: float,
    window: int,
) -> None:
    rng = random.Random(7)
    items = [sensor(n, rng) for n in range(N)]
    for start in range(0, N, 100):
        r = client.post("/ngsi-ld/v1/entityOperations/create", json=items[start : start + 100])
        assert r.status_code == 201, r.text
    monkeypatch.setattr(type(store), "FIRST_WINDOW", window)
    monkeypatch.setattr(type(store), "DRIVER_WEIGHT", weight)
    values = [
        {"id": i["id"], "type": i["type"], **{k: i[k]["value"] for k in ("a", "b", "name")}}
        for i in items
    ]
    for q, pred in QUERIES:
        want = [v["id"] for v in values if v["type"] == "Sensor" and pred(v)]
        for limit, offset in [(5, 0), (5, 3), (20, 11), (100, 0), (1000, 0)]:
            r = client.get(
                E,
                params={"type": "Sensor", "q": q, "limit": limit, "offset": offset},
                headers={"Accept": "application/json"},
            )
            assert r.status_code == 200, r.text
            got = [e["id"] for e in r.json()]
            assert got == want[offset : offset + limit], (q, limit, offset)
