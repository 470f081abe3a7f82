"""Batches that name one entity more than once: every item counts, as if sent one by one.

The items of a batch are processed in order (NGSI-LD), and the bank writes the batch in one
transaction. It merged the items of one entity into one document and reported one change from
the stored document to the last item's: the attribute history, the change feed (anomaly
detection) and subscriptions never saw the earlier items' values.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.api.ngsi import Runtime
from cityward.bank.changes import Change
from cityward.bank.store import WriteTxn

E = "/ngsi-ld/v1/entities"
T = "/ngsi-ld/v1/temporal/entities"
OPS = "/ngsi-ld/v1/entityOperations"
NS = "https://uri.etsi.org/ngsi-ld/default-context/"
V = "urn:ngsi-ld:Vehicle:V1"
W = "urn:ngsi-ld:Vehicle:W1"

# (path, query) of each batch operation that changes existing entities
OPERATIONS = {
    "upsert": ("upsert", {}),
    "upsert-update": ("upsert", {"options": "update"}),
    "update": ("update", {}),
    "merge": ("merge", {}),
}


def speed(v: int, minute: int) -> dict[str, Any]:
    return {"type": "Property", "value": v, "observedAt": f"2024-01-01T00:{minute:02d}:00Z"}


def vehicle(eid: str, v: int, minute: int) -> dict[str, Any]:
    return {"id": eid, "type": "Vehicle", "speed": speed(v, minute)}


def follow(client: TestClient) -> list[Change]:
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    assert isinstance(rt, Runtime)
    seen: list[Change] = []
    rt.bank.feed.subscribe(seen.extend)
    return seen


def history(client: TestClient, eid: str, attr: str = "speed") -> list[Any]:
    r = client.get(f"{T}/{eid}", params={"options": "temporalValues"})
    assert r.status_code == 200, r.text
    return [v for v, _ in r.json().get(attr, {}).get("values", [])]


def speeds(changes: list[Change], eid: str) -> list[Any]:
    """The speed each change of ``eid`` left, in the order the feed gave them."""
    return [
        c.after["attrs"][NS + "speed"][0]["value"] if c.after is not None else None
        for c in changes
        if c.entity_id == eid
    ]


@pytest.mark.parametrize("op", OPERATIONS)
def test_each_item_of_a_repeated_entity_is_recorded(client: TestClient, op: str) -> None:
    path, params = OPERATIONS[op]
    r = client.post(f"{OPS}/create", json=[vehicle(V, 0, 0), vehicle(W, 0, 0)])
    assert r.status_code == 201, r.text
    seen = follow(client)
    # V twice, W between its items: each of V's items is a change of its own
    batch = [vehicle(V, 1, 1), vehicle(W, 5, 1), vehicle(V, 2, 2)]
    r = client.post(f"{OPS}/{path}", params=params, json=batch)
    assert r.status_code == 204, r.text

    assert history(client, V) == [0, 1, 2]
    assert history(client, W) == [0, 5]
    assert client.get(f"{E}/{V}").json()["speed"]["value"] == 2
    assert speeds(seen, V) == [1, 2]
    assert speeds(seen, W) == [5]
    first, second = (c for c in seen if c.entity_id == V)
    # chained: the second item's change starts where the first one's ended
    assert second.before is first.after
    assert first.attrs == second.attrs == {NS + "speed"}
    assert first.before is not None and first.before["attrs"][NS + "speed"][0]["value"] == 0


@pytest.mark.parametrize("op", ["upsert", "upsert-update"])
def test_an_entity_created_and_changed_in_one_batch(client: TestClient, op: str) -> None:
    path, params = OPERATIONS[op]
    seen = follow(client)
    batch = [vehicle(V, 1, 1), vehicle(V, 2, 2), vehicle(V, 3, 3)]
    r = client.post(f"{OPS}/{path}", params=params, json=batch)
    assert r.status_code == 201, r.text
    assert r.json() == [V]
    assert history(client, V) == [1, 2, 3]
    assert [c.kind for c in seen] == ["created", "updated", "updated"]
    assert len({c.pk for c in seen}) == 1
    assert speeds(seen, V) == [1, 2, 3]


def test_a_refused_item_between_repeats_keeps_its_neighbours(client: TestClient) -> None:
    assert client.post(E, json=vehicle(V, 0, 0)).status_code == 201
    seen = follow(client)
    bad = {"id": V, "type": "Vehicle", "speed": {"type": "Relationship"}}  # no object to switch to
    r = client.post(f"{OPS}/merge", json=[vehicle(V, 7, 7), bad, vehicle(V, 8, 8)])
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == [V]
    assert [e["entityId"] for e in body["errors"]] == [V]
    assert history(client, V) == [0, 7, 8]
    assert speeds(seen, V) == [7, 8]

    # noOverwrite refuses the second item (a exists once the first added it), not the third
    seen.clear()
    items = [
        {"id": V, "type": "Vehicle", "a": {"type": "Property", "value": 1}},
        {"id": V, "type": "Vehicle", "a": {"type": "Property", "value": 2}},
        {"id": V, "type": "Vehicle", "b": {"type": "Property", "value": 3}},
    ]
    r = client.post(f"{OPS}/update", params={"options": "noOverwrite"}, json=items)
    assert r.status_code == 207, r.text
    assert [e["entityId"] for e in r.json()["errors"]] == [V]
    assert history(client, V, "a") == [1]
    assert history(client, V, "b") == [3]
    assert [sorted(a.removeprefix(NS) for a in c.created_attrs) for c in seen] == [["a"], ["b"]]


def test_a_failed_batch_with_repeats_records_nothing(client: TestClient) -> None:
    """The items' changes are written in the batch's one transaction: a failure in a write
    hook (after the history hook ran) leaves neither the entity nor any of its history."""
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    assert isinstance(rt, Runtime)
    assert client.post(E, json=vehicle(V, 0, 0)).status_code == 201
    seen = follow(client)
    calls: list[int] = []

    def hook(txn: WriteTxn, changes: list[Change]) -> None:
        calls.append(len(changes))
        raise RuntimeError("disk full")

    rt.bank.hooks.append(hook)
    try:
        with pytest.raises(RuntimeError):
            client.post(f"{OPS}/update", json=[vehicle(V, 1, 1), vehicle(V, 2, 2)])
    finally:
        rt.bank.hooks.remove(hook)
    assert calls == [2]
    assert seen == []
    assert history(client, V) == [0]
    assert client.get(f"{E}/{V}").json()["speed"]["value"] == 0
