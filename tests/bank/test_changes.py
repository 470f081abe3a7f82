"""Write hooks and the change feed: what every write reports, on both backends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.api.ngsi import Runtime
from cityward.bank.changes import Change
from cityward.bank.store import WriteTxn

E = "/ngsi-ld/v1/entities"
OPS = "/ngsi-ld/v1/entityOperations"
NS = "https://uri.etsi.org/ngsi-ld/default-context/"


def sensor(n: int, **attrs: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"id": f"urn:ngsi-ld:Sensor:{n}", "type": "Sensor"}
    for name, value in attrs.items():
        body[name] = {"type": "Property", "value": value}
    return body


def runtime(client: TestClient) -> Runtime:
    rt = client.app.state.runtime  # type: ignore[attr-defined]
    assert isinstance(rt, Runtime)
    return rt


def follow(client: TestClient) -> list[Change]:
    seen: list[Change] = []
    runtime(client).bank.feed.subscribe(seen.extend)
    return seen


def test_every_write_reports_its_changes(client: TestClient) -> None:
    seen = follow(client)
    assert client.post(E, json=sensor(1, a=1, b=2)).status_code == 201
    (c,) = seen
    assert (c.kind, c.entity_id, c.before) == ("created", "urn:ngsi-ld:Sensor:1", None)
    assert c.attrs == {NS + "a", NS + "b"}
    assert c.after is not None and c.after["attrs"][NS + "a"][0]["value"] == 1
    assert c.types == [NS + "Sensor"]

    seen.clear()
    r = client.patch(
        f"{E}/urn:ngsi-ld:Sensor:1/attrs", json={"a": {"type": "Property", "value": 5}}
    )
    assert r.status_code == 204, r.text
    (c,) = seen
    assert c.kind == "updated" and c.attrs == {NS + "a"}
    assert c.before is not None and c.before["attrs"][NS + "a"][0]["value"] == 1
    assert c.after is not None and c.after["attrs"][NS + "a"][0]["value"] == 5

    seen.clear()
    r = client.post(f"{OPS}/upsert", params={"options": "update"}, json=[sensor(1, c=3), sensor(2)])
    assert r.status_code in (201, 204), r.text
    by_id = {c.entity_id: c for c in seen}
    assert by_id["urn:ngsi-ld:Sensor:1"].kind == "updated"
    assert by_id["urn:ngsi-ld:Sensor:1"].created_attrs == {NS + "c"}
    assert by_id["urn:ngsi-ld:Sensor:2"].kind == "created"

    seen.clear()
    r = client.post(f"{OPS}/upsert", json=[sensor(1, a=5)])  # replace: b and c go
    assert r.status_code == 204, r.text
    (c,) = seen
    assert c.deleted_attrs == {NS + "b", NS + "c"} and c.attrs == {NS + "b", NS + "c"}

    seen.clear()
    r = client.post(f"{OPS}/delete", json=["urn:ngsi-ld:Sensor:1", "urn:ngsi-ld:Sensor:9"])
    assert r.status_code == 207, r.text
    (c,) = seen
    assert c.kind == "deleted" and c.after is None and c.entity_id == "urn:ngsi-ld:Sensor:1"

    seen.clear()
    assert client.delete(f"{E}/urn:ngsi-ld:Sensor:2").status_code == 204
    assert [c.kind for c in seen] == ["deleted"]


def test_a_failing_hook_undoes_the_write(client: TestClient) -> None:
    bank = runtime(client).bank
    seen = follow(client)
    calls: list[int] = []

    def hook(txn: WriteTxn, changes: list[Change]) -> None:
        calls.append(len(changes))
        raise RuntimeError("disk full")

    bank.hooks.append(hook)
    with pytest.raises(RuntimeError):
        client.post(f"{OPS}/create", json=[sensor(1, a=1), sensor(2, a=2)])
    bank.hooks.remove(hook)
    assert calls == [2]
    assert seen == []  # nothing committed, nothing published
    assert client.get(f"{E}/urn:ngsi-ld:Sensor:1").status_code == 404


def test_a_failing_follower_does_not_undo_the_write(client: TestClient) -> None:
    def broken(changes: Sequence[Change]) -> None:
        raise ValueError("bug in a follower")

    runtime(client).bank.feed.subscribe(broken)
    assert client.post(E, json=sensor(1, a=1)).status_code == 201
    assert client.get(f"{E}/urn:ngsi-ld:Sensor:1").status_code == 200


def test_unsubscribe_stops_deliveries(client: TestClient) -> None:
    seen: list[Change] = []
    handle = runtime(client).bank.feed.subscribe(seen.extend)
    client.post(E, json=sensor(1, a=1))
    handle.close()
    client.post(E, json=sensor(2, a=1))
    assert [c.entity_id for c in seen] == ["urn:ngsi-ld:Sensor:1"]


def test_async_stream(client: TestClient) -> None:
    bank = runtime(client).bank
    listening = bank.feed.listeners

    async def main() -> list[str]:
        got: list[str] = []
        stream = bank.feed.stream()

        async def consume() -> None:
            async for change in stream:
                got.append(f"{change.kind} {change.entity_id}")
                if len(got) == 3:
                    return

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)  # the stream subscribes on its first step
        await asyncio.sleep(0)
        for n in range(3):
            await asyncio.to_thread(bank.create, "", _parsed(client, sensor(n, a=n)))
        await asyncio.wait_for(task, 10)
        await stream.aclose()
        return got

    got = asyncio.run(main())
    assert got == [f"created urn:ngsi-ld:Sensor:{n}" for n in range(3)]
    assert bank.feed.listeners == listening


def _parsed(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    from cityward.bank.model import EntityParser

    rt = runtime(client)
    return EntityParser(rt.contexts.resolve(None)).entity(body, "create")
