"""/ngsi-ld/v1/subscriptions end to end: the API, the write path, real HTTP and MQTT delivery."""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import Settings
from tests.bank.subscriptions.conftest import MqttSubscriber, Receiver
from tests.conftest import PG_URL

S = "/ngsi-ld/v1/subscriptions"
E = "/ngsi-ld/v1/entities"
PROBLEM = "https://uri.etsi.org/ngsi-ld/errors/"
V1 = "urn:ngsi-ld:Vehicle:V1"


def wait(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def subscription(sid: str, uri: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": sid,
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "watchedAttributes": ["speed"],
        "notification": {"attributes": ["speed"], "endpoint": {"uri": uri}},
        **extra,
    }


def test_subscription_lifecycle_and_http_delivery(client: TestClient, receiver: Receiver) -> None:
    sid = "urn:ngsi-ld:Subscription:s1"
    r = client.post(S, json=subscription(sid, receiver.url(), q="speed>40"))
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"{S}/{sid}"
    r = client.post(S, json=subscription(sid, receiver.url()))
    assert r.status_code == 409 and r.json()["type"] == PROBLEM + "AlreadyExists"

    got = client.get(f"{S}/{sid}").json()
    assert got["id"] == sid and got["status"] == "active"
    assert got["watchedAttributes"] == ["speed"] and got["q"] == "speed>40"
    assert [s["id"] for s in client.get(S).json()] == [sid]

    slow = {"id": V1, "type": "Vehicle", "speed": {"type": "Property", "value": 10}}
    assert client.post(E, json=slow).status_code == 201  # q does not match: no notification
    r = client.patch(f"{E}/{V1}/attrs", json={"speed": {"type": "Property", "value": 55}})
    assert r.status_code == 204, r.text
    wait(lambda: len(receiver.requests) >= 1, "the HTTP notification")
    note = receiver.requests[0].body
    assert note["type"] == "Notification" and note["subscriptionId"] == sid
    assert [(d["id"], d["speed"]["value"]) for d in note["data"]] == [(V1, 55)]
    assert len(receiver.requests) == 1  # the create did not match q
    wait(
        lambda: client.get(f"{S}/{sid}").json()["notification"].get("timesSent") == 1,
        "timesSent",
    )

    r = client.patch(f"{S}/{sid}", json={"isActive": False})
    assert r.status_code == 204, r.text
    assert client.get(f"{S}/{sid}").json()["status"] == "paused"
    r = client.patch(f"{S}/{sid}", json={"notification": {"endpoint": {"uri": "nope"}}})
    assert r.status_code == 400 and r.json()["type"] == PROBLEM + "BadRequestData"

    assert client.delete(f"{S}/{sid}").status_code == 204
    assert client.get(f"{S}/{sid}").status_code == 404
    assert client.delete(f"{S}/{sid}").status_code == 404


def test_mqtt_delivery_next_to_a_dead_endpoint(
    client: TestClient, mqtt_subscriber: MqttSubscriber, closed_port: int
) -> None:
    dead = subscription("urn:ngsi-ld:Subscription:dead", f"http://127.0.0.1:{closed_port}/x")
    live = subscription("urn:ngsi-ld:Subscription:mqtt", mqtt_subscriber.url())
    for body in (dead, live):
        assert client.post(S, json=body).status_code == 201
    for n in range(3):
        body = {"id": f"urn:ngsi-ld:Vehicle:{n}", "type": "Vehicle"}
        body["speed"] = {"type": "Property", "value": n}
        assert client.post(E, json=body).status_code == 201
    wait(lambda: len(mqtt_subscriber.received()) == 3, "three MQTT notifications")
    ids = sorted(m["body"]["data"][0]["id"] for m in mqtt_subscriber.received())
    assert ids == [f"urn:ngsi-ld:Vehicle:{n}" for n in range(3)]
    wait(
        lambda: bool(
            client.get(f"{S}/urn:ngsi-ld:Subscription:dead")
            .json()["notification"]
            .get("lastFailure")
        ),
        "the dead endpoint's failure",
    )


def test_bad_subscriptions(client: TestClient) -> None:
    for body, field in [
        ({"type": "Subscription"}, None),
        (subscription("not a uri", "http://x/"), "id"),
        (subscription("urn:x:1", "ftp://x/"), "notification.endpoint.uri"),
    ]:
        r = client.post(S, json=body)
        assert r.status_code == 400, r.text
        assert r.json()["type"] == PROBLEM + "BadRequestData"
        if field is not None:
            assert r.json()["field"] == field
    assert client.get(f"{S}/urn:ngsi-ld:Subscription:none").status_code == 404


def test_one_notification_per_batch(client: TestClient, receiver: Receiver) -> None:
    sub = subscription("urn:ngsi-ld:Subscription:batch", receiver.url())
    assert client.post(S, json=sub).status_code == 201
    batch = [
        {
            "id": f"urn:ngsi-ld:Vehicle:{n}",
            "type": "Vehicle",
            "speed": {"type": "Property", "value": n},
        }
        for n in range(5)
    ]
    r = client.post("/ngsi-ld/v1/entityOperations/create", json=batch)
    assert r.status_code == 201, r.text
    wait(lambda: len(receiver.requests) >= 1, "the batch notification")
    time.sleep(0.3)  # a second notification would have been sent with the first
    (req,) = receiver.requests
    assert [d["id"] for d in req.body["data"]] == [b["id"] for b in batch]
    assert [d["speed"]["value"] for d in req.body["data"]] == list(range(5))


@pytest.mark.parametrize("op", ["upsert", "update", "merge"])
def test_every_item_of_a_repeated_entity_is_notified(
    client: TestClient, receiver: Receiver, op: str
) -> None:
    """A batch naming V1 twice (speed 1, then 2) notified only the last value: the bank made
    one change of V1 from the stored document to the last item's. Sent one by one, a
    subscription sees both; in one batch, its one notification carries both, in order."""
    assert client.post(E, json={"id": V1, "type": "Vehicle"}).status_code == 201
    sid = "urn:ngsi-ld:Subscription:repeats"
    assert client.post(S, json=subscription(sid, receiver.url())).status_code == 201
    batch = [
        {"id": V1, "type": "Vehicle", "speed": {"type": "Property", "value": v}} for v in (1, 2)
    ]
    r = client.post(f"/ngsi-ld/v1/entityOperations/{op}", json=batch)
    assert r.status_code == 204, r.text
    wait(lambda: len(receiver.requests) >= 1, "the batch's notification")
    time.sleep(0.3)  # a second notification would have been sent with the first
    seen = [d["speed"]["value"] for q in receiver.requests for d in q.body["data"]]
    assert seen == [1, 2]


def test_periodic_notifications(client: TestClient, receiver: Receiver) -> None:
    for n, speed in [(1, 10), (2, 90)]:
        body: dict[str, Any] = {"id": f"urn:ngsi-ld:Vehicle:{n}", "type": "Vehicle"}
        body["speed"] = {"type": "Property", "value": speed}
        assert client.post(E, json=body).status_code == 201
    sub = {
        "id": "urn:ngsi-ld:Subscription:every-second",
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "q": "speed>50",
        "timeInterval": 1,
        "notification": {"attributes": ["speed"], "endpoint": {"uri": receiver.url()}},
    }
    r = client.post(S, json=sub)
    assert r.status_code == 201, r.text
    wait(lambda: len(receiver.requests) >= 2, "two periodic notifications")
    first, second = receiver.requests[:2]
    assert second.at - first.at >= 0.8  # one interval apart, give or take the tick
    for req in (first, second):
        assert req.body["subscriptionId"] == sub["id"]
        assert [(d["id"], d["speed"]["value"]) for d in req.body["data"]] == [
            ("urn:ngsi-ld:Vehicle:2", 90)
        ]
    # a change is not a trigger for a periodic subscription, the state it sends is current
    r = client.patch(
        f"{E}/urn:ngsi-ld:Vehicle:1/attrs", json={"speed": {"type": "Property", "value": 70}}
    )
    assert r.status_code == 204
    wait(
        lambda: any(len(q.body["data"]) == 2 for q in receiver.requests),
        "a periodic notification with both vehicles",
    )
    assert client.patch(f"{S}/{sub['id']}", json={"isActive": False}).status_code == 204
    time.sleep(2.0)  # a notification may have been on its way when it was paused
    count = len(receiver.requests)
    time.sleep(1.5)
    assert len(receiver.requests) == count


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_delivery_counters_survive_a_restart(
    backend: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = Settings(data_dir=tmp_path, context_fetch=False, no_auth=True)
    schema = f"test_{uuid.uuid4().hex[:12]}"

    def open_store() -> Store:
        if backend == "sqlite":
            return SqliteStore(tmp_path / "bank.db")
        return PostgresStore(PG_URL, schema=schema, max_size=4)

    sid = "urn:ngsi-ld:Subscription:counted"
    with TestClient(create_app(settings, open_store())) as client:
        assert client.post(S, json=subscription(sid, receiver.url())).status_code == 201
        body = {"id": V1, "type": "Vehicle", "speed": {"type": "Property", "value": 1}}
        assert client.post(E, json=body).status_code == 201
        wait(lambda: len(receiver.requests) == 1, "the notification")
        wait(
            lambda: client.get(f"{S}/{sid}").json()["notification"].get("timesSent") == 1,
            "timesSent",
        )
    store = open_store()
    try:
        with TestClient(create_app(settings, store)) as client:
            got = client.get(f"{S}/{sid}").json()["notification"]
            assert got["timesSent"] == 1 and got["lastSuccess"]
            assert client.delete(f"{S}/{sid}").status_code == 204
            assert store.select("SELECT count(*) FROM subscription_stats")[0][0] == 0
    finally:
        if backend == "postgres":
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("qos", ["1", "2"])
def test_mqtt_qos_1_and_2_never_stall_the_server(backend: str, qos: str, tmp_path: Path) -> None:
    """paho acknowledges on its network thread while the event loop publishes: a lock taken on
    both sides deadlocked the loop after a few writes, and every API request hung after it.
    The API runs in a thread of its own here, so that a hang fails the test instead of
    blocking it (the hung thread is left behind)."""
    settings = Settings(data_dir=tmp_path, context_fetch=False, no_auth=True)
    schema = f"test_{uuid.uuid4().hex[:12]}"
    store: Store = (
        SqliteStore(tmp_path / "bank.db")
        if backend == "sqlite"
        else PostgresStore(PG_URL, schema=schema, max_size=4)
    )
    # one topic (endpoint) each, so that their lanes publish while the others are acknowledged
    topics = [MqttSubscriber() for _ in range(3)]
    subs = [f"urn:ngsi-ld:Subscription:qos{n}" for n in range(len(topics))]
    writes = 150
    answered: list[int] = []
    failure: list[BaseException] = []

    def api() -> None:
        try:
            with TestClient(create_app(settings, store)) as client:
                for sid, topic in zip(subs, topics, strict=True):
                    body = subscription(sid, topic.url())
                    body["notification"]["endpoint"]["notifierInfo"] = [
                        {"key": "MQTT-QoS", "value": qos}
                    ]
                    answered.append(client.post(S, json=body).status_code)
                for n in range(writes):
                    entity = {
                        "id": f"urn:ngsi-ld:Vehicle:{n}",
                        "type": "Vehicle",
                        "speed": {"type": "Property", "value": n},
                    }
                    answered.append(client.post(E, json=entity).status_code)
                wait(
                    lambda: len(seen()) == len(subs) * writes,
                    "every notification",
                    timeout=30,
                )
        except BaseException as exc:
            failure.append(exc)

    def seen() -> set[tuple[str, str]]:  # QoS 1 may deliver twice: count distinct ones
        return {
            (m["body"]["subscriptionId"], m["body"]["data"][0]["id"])
            for topic in topics
            for m in topic.received()
        }

    for topic in topics:
        topic.start()
    thread = threading.Thread(target=api, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), (
        f"the server hung: {len(answered)} of {len(subs) + writes} requests answered"
    )
    if failure:
        raise failure[0]
    try:
        assert answered == [201] * (len(subs) + writes)
        assert seen() == {(sid, f"urn:ngsi-ld:Vehicle:{n}") for sid in subs for n in range(writes)}
    finally:
        for topic in topics:
            topic.stop()
        store.close()
        if backend == "postgres":
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize(
    ("member", "value", "field"),
    [
        pytest.param(
            "uri", "mqtt://127.0.0.1:1883/a%00b", "notification.endpoint.uri", id="nul-topic"
        ),
        pytest.param("uri", "http://[::1/x", "notification.endpoint.uri", id="bad-host"),
        pytest.param("throttling", 1e20, "throttling", id="throttling-1e20"),
        pytest.param("throttling", 10**30, "throttling", id="throttling-10e30"),
        pytest.param("timeInterval", 1e308, "timeInterval", id="timeInterval-1e308"),
        pytest.param("timeout", 10**40, "notification.endpoint.timeout", id="timeout-10e40"),
        pytest.param("cooldown", 1e308, "notification.endpoint.cooldown", id="cooldown-1e308"),
        pytest.param(
            "receiverInfo",
            [{"key": "X-Label", "value": "Zürich → Genève"}],
            "notification.endpoint.receiverInfo",
            id="receiverInfo-not-latin1",
        ),
        pytest.param("id", "urn:ngsi-ld:Subscription:" + "x" * 3000, "id", id="long-id"),
    ],
)
def test_harmful_subscriptions_are_refused_naming_the_field(
    client: TestClient, member: str, value: Any, field: str
) -> None:
    """Each was stored (201) and then broke something: the tenant's list and GET (500), the
    shared MQTT connection, every delivery, or the write on PostgreSQL only."""
    sub = subscription("urn:ngsi-ld:Subscription:harm", "http://127.0.0.1:9/x")
    sub.pop("watchedAttributes")
    if member in ("uri", "timeout", "cooldown", "receiverInfo"):
        sub["notification"]["endpoint"][member] = value
    else:
        sub[member] = value
    r = client.post(S, json=sub)
    assert r.status_code == 400, r.text
    problem = r.json()
    assert problem["type"] == PROBLEM + "BadRequestData" and problem["field"] == field
    r = client.get(S)
    assert r.status_code == 200 and r.json() == []


def test_an_entity_s_notifications_arrive_in_order(client: TestClient, receiver: Receiver) -> None:
    """A write of several entities makes one notification, keyed by its subscription; one of
    a single entity was keyed by the entity. Keyed apart they took different lanes: when the
    batch's notification failed and was retried, the receiver got V1's newer state first and
    its older state last."""
    sid = "urn:ngsi-ld:Subscription:reorder"
    assert zlib.crc32(sid.encode()) % 4 != zlib.crc32(V1.encode()) % 4  # apart when keyed apart
    receiver.statuses.append(500)
    receiver.delays.append(1.0)  # the batch's notification fails, and late
    assert client.post(S, json=subscription(sid, receiver.url())).status_code == 201
    batch = [
        {"id": eid, "type": "Vehicle", "speed": {"type": "Property", "value": 1}}
        for eid in (V1, "urn:ngsi-ld:Vehicle:V2")
    ]
    assert client.post("/ngsi-ld/v1/entityOperations/create", json=batch).status_code == 201
    wait(lambda: len(receiver.requests) >= 1, "the batch's notification")
    r = client.patch(f"{E}/{V1}/attrs", json={"speed": {"type": "Property", "value": 2}})
    assert r.status_code == 204, r.text
    wait(lambda: len(receiver.requests) >= 3, "the retry and the update's notification")
    time.sleep(0.3)  # anything more would have come by now
    seen = [d["speed"]["value"] for q in receiver.requests for d in q.body["data"] if d["id"] == V1]
    assert seen == [1, 1, 2]  # the failed attempt, its retry, then the newer state


def test_throttling_lets_a_whole_write_through(client: TestClient, receiver: Receiver) -> None:
    """Throttling decided per entity: the first entity of a batch stamped the subscription, so
    the write's one notification held only that entity and the others were never notified."""
    sid = "urn:ngsi-ld:Subscription:throttled"
    assert client.post(S, json=subscription(sid, receiver.url(), throttling=60)).status_code == 201
    batch = [
        {
            "id": f"urn:ngsi-ld:Vehicle:{n}",
            "type": "Vehicle",
            "speed": {"type": "Property", "value": n},
        }
        for n in range(3)
    ]
    assert client.post("/ngsi-ld/v1/entityOperations/create", json=batch).status_code == 201
    wait(lambda: len(receiver.requests) >= 1, "the batch's notification")
    r = client.patch(
        "/ngsi-ld/v1/entities/urn:ngsi-ld:Vehicle:0/attrs",
        json={"speed": {"type": "Property", "value": 9}},
    )
    assert r.status_code == 204  # within the throttling window: no notification
    time.sleep(0.5)  # a second notification would have been sent by now
    (req,) = receiver.requests
    assert [d["id"] for d in req.body["data"]] == [b["id"] for b in batch]


def test_patch_takes_a_merge_patch(client: TestClient, receiver: Receiver) -> None:
    """A subscription PATCH is a JSON merge patch: application/merge-patch+json was a 415."""
    sid = "urn:ngsi-ld:Subscription:mp"
    assert client.post(S, json=subscription(sid, receiver.url())).status_code == 201
    r = client.patch(
        f"{S}/{sid}",
        content=b'{"isActive": false}',
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 204, r.text
    assert client.get(f"{S}/{sid}").json()["status"] == "paused"


def test_an_inline_context_is_not_named_by_a_core_link(
    client: TestClient, receiver: Receiver
) -> None:
    """With an inline @context the data was compacted with it while the Link header named the
    core context, so a receiver read Car as the default context's Car: the notification now
    uses the core context, Car its full IRI."""
    import orjson

    ctx = {"Car": "http://example.org/Car", "velocity": "http://example.org/velocity"}
    body = {
        "id": "urn:ngsi-ld:Subscription:inline",
        "type": "Subscription",
        "entities": [{"type": "Car"}],
        "notification": {"endpoint": {"uri": receiver.url(), "accept": "application/json"}},
        "@context": [ctx, "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.9.jsonld"],
    }
    r = client.post(S, content=orjson.dumps(body), headers={"Content-Type": "application/ld+json"})
    assert r.status_code == 201, r.text
    car = {"id": "urn:ngsi-ld:Car:C1", "type": "Car", "velocity": {"type": "Property", "value": 3}}
    r = client.post(
        E,
        content=orjson.dumps({**car, "@context": [ctx]}),
        headers={"Content-Type": "application/ld+json"},
    )
    assert r.status_code == 201, r.text
    wait(lambda: len(receiver.requests) >= 1, "the notification")
    req = receiver.requests[0]
    assert "ngsi-ld-core-context" in {k.lower(): v for k, v in req.headers.items()}["link"]
    (data,) = req.body["data"]
    assert data["type"] == "http://example.org/Car"
    assert data["http://example.org/velocity"]["value"] == 3
