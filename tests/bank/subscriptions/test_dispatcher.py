"""Delivery for real: an HTTP receiver, the Mosquitto broker, dead endpoints and restarts.

No test measures time: each waits (with a generous timeout that only stops a broken test from
hanging) for something to happen, then checks counts and order.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cityward.bank.jsonld import CORE_CONTEXT_URL, Context
from cityward.bank.model import EntityParser
from cityward.bank.subscriptions.dispatcher import (
    DeliveryResult,
    Dispatcher,
    Http1Transport,
    HttpTransport,
    RetryPolicy,
    Transport,
)
from cityward.bank.subscriptions.matcher import ChangeEvent, SubscriptionIndex
from cityward.bank.subscriptions.model import Subscription, parse_subscription
from cityward.bank.subscriptions.outbox import OutboxItem
from tests.bank.subscriptions.conftest import (
    MqttSubscriber,
    OutboxFactory,
    Receiver,
    run,
    until,
)

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
FAST = RetryPolicy(base_s=0.01, factor=2.0, max_s=0.2, jitter=0.1, max_attempts=0)


def subscription(core: Context, uri: str, **notification: Any) -> Subscription:
    body = {
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": {"endpoint": {"uri": uri, **notification}},
    }
    return parse_subscription(body, core, now=NOW - timedelta(days=1))


def change(core: Context, n: int, speed: float) -> ChangeEvent:
    doc = EntityParser(core).entity(
        {"id": f"urn:ngsi-ld:Vehicle:V{n}", "type": "Vehicle", "speed": speed}
    )
    doc["createdAt"] = doc["modifiedAt"] = "2024-06-01T11:00:00.000000Z"
    return ChangeEvent(doc["id"], None, doc)


def plain(endpoint: str, n: int, key: str = "k") -> OutboxItem:
    return OutboxItem(
        id=f"urn:ngsi-ld:Notification:{n}",
        subscription_id="urn:ngsi-ld:Subscription:S1",
        endpoint=endpoint,
        payload={"headers": {"Content-Type": "application/json"}, "body": {"n": n}},
        key=key,
    )


@pytest.fixture(params=["http1", "httpx"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def make_transport(kind: str, timeout: float = 10.0) -> Transport:
    """Made inside the running loop; the test closes it (the dispatcher does not own it)."""
    if kind == "http1":
        return Http1Transport(timeout=timeout)
    return HttpTransport(timeout=timeout)


def test_retry_policy_is_exponential_capped_and_seeded() -> None:
    policy = RetryPolicy(base_s=1, factor=2, max_s=10, jitter=0)
    rng = random.Random(0)
    assert [policy.delay(n, rng) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    jittered = RetryPolicy(base_s=1, factor=2, max_s=100, jitter=0.5)
    a = [jittered.delay(n, random.Random("s")) for n in range(1, 5)]
    b = [jittered.delay(n, random.Random("s")) for n in range(1, 5)]
    assert a == b
    assert all(2**n <= d <= 1.5 * 2**n for n, d in enumerate(a))
    assert policy.delay(10_000, rng) == 10  # no overflow


def test_http_delivery_end_to_end(
    outboxes: OutboxFactory, receiver: Receiver, core: Context, transport_kind: str
) -> None:
    """Matcher -> outbox -> dispatcher -> a real HTTP server; stats follow the results."""
    sub = subscription(core, receiver.url(), receiverInfo=[{"key": "X-Api-Key", "value": "k1"}])
    index = SubscriptionIndex([sub])
    ob = outboxes()
    results: list[DeliveryResult] = []

    def on_result(r: DeliveryResult) -> None:
        results.append(r)
        sub.stats.record(r.ok, r.at)

    async def main() -> None:
        http = make_transport(transport_kind)
        async with Dispatcher(ob, http=http, on_result=on_result, seed=1) as dispatcher:
            for n in range(5):
                items = index.notifications(change(core, n, 10.0 * n), lambda *_: core, tenant="t1")
                ob.add(items)
                dispatcher.wake()
            await until(lambda: len(receiver.requests) == 5, "5 notifications")
            await until(lambda: len(results) == 5, "5 results")
        await http.aclose()
        assert ob.pending() == 0  # delivered rows are deleted

    run(main())
    assert all(r.ok and r.final and r.item.attempts == 1 for r in results)
    first = receiver.requests[0]
    assert first.path == "/notify"
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["Link"] == (
        f'<{CORE_CONTEXT_URL}>; rel="http://www.w3.org/ns/json-ld#context"; '
        'type="application/ld+json"'
    )
    assert first.headers["X-Api-Key"] == "k1"
    assert first.headers["NGSILD-Tenant"] == "t1"
    bodies = [r.body for r in receiver.requests]
    assert {b["data"][0]["id"] for b in bodies} == {f"urn:ngsi-ld:Vehicle:V{n}" for n in range(5)}
    assert all(b["type"] == "Notification" and b["subscriptionId"] == sub.id for b in bodies)
    assert sub.stats.times_sent == 5 and sub.stats.status == "ok"


def test_ld_json_delivery(outboxes: OutboxFactory, receiver: Receiver, core: Context) -> None:
    sub = subscription(core, receiver.url("/ld"), accept="application/ld+json")
    ob = outboxes()

    async def main() -> None:
        async with Dispatcher(ob) as dispatcher:
            ob.add(SubscriptionIndex([sub]).notifications(change(core, 1, 5), lambda *_: core))
            dispatcher.wake()
            await until(lambda: len(receiver.requests) == 1, "one notification")

    run(main())
    [req] = receiver.requests
    assert req.headers["Content-Type"] == "application/ld+json"
    assert "Link" not in req.headers
    assert req.body["@context"] == CORE_CONTEXT_URL


@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_mqtt_delivery(
    outboxes: OutboxFactory, mqtt_subscriber: MqttSubscriber, core: Context, qos: str
) -> None:
    sub = subscription(
        core,
        mqtt_subscriber.url(),
        receiverInfo=[{"key": "X-Source", "value": "cityward"}],
        notifierInfo=[{"key": "MQTT-QoS", "value": qos}],
    )
    ob = outboxes()
    results: list[DeliveryResult] = []

    async def main() -> None:
        async with Dispatcher(ob, on_result=results.append) as dispatcher:
            for n in range(3):
                ob.add(SubscriptionIndex([sub]).notifications(change(core, n, n), lambda *_: core))
            dispatcher.wake()
            await until(lambda: len(mqtt_subscriber.received()) == 3, "3 MQTT messages")
            await until(lambda: len(results) == 3, "3 results")

    run(main())
    assert all(r.ok for r in results)
    messages = mqtt_subscriber.received()
    for msg in messages:
        assert set(msg) == {"metadata", "body"}
        assert msg["metadata"]["Content-Type"] == "application/json"
        assert msg["metadata"]["Link"].startswith(f"<{CORE_CONTEXT_URL}>")
        assert msg["metadata"]["X-Source"] == "cityward"
        assert msg["body"]["type"] == "Notification"
        assert msg["body"]["subscriptionId"] == sub.id
    ids = [m["body"]["data"][0]["id"] for m in messages]
    assert sorted(ids) == [f"urn:ngsi-ld:Vehicle:V{n}" for n in range(3)]


def test_mqtt5_delivery(
    outboxes: OutboxFactory, mqtt_subscriber: MqttSubscriber, core: Context
) -> None:
    sub = subscription(
        core,
        mqtt_subscriber.url(),
        notifierInfo=[
            {"key": "MQTT-Version", "value": "mqtt5.0"},
            {"key": "MQTT-QoS", "value": "1"},
        ],
    )
    ob = outboxes()

    async def main() -> None:
        async with Dispatcher(ob) as dispatcher:
            ob.add(SubscriptionIndex([sub]).notifications(change(core, 1, 1), lambda *_: core))
            dispatcher.wake()
            await until(lambda: len(mqtt_subscriber.received()) == 1, "one MQTT message")

    run(main())


def test_unreachable_broker_is_retried(outboxes: OutboxFactory, closed_port: int) -> None:
    ob = outboxes()
    ob.add([plain(f"mqtt://127.0.0.1:{closed_port}/t", 1)])
    results: list[DeliveryResult] = []

    async def main() -> None:
        async with Dispatcher(ob, policy=FAST, on_result=results.append):
            await until(lambda: len(results) >= 2, "two failed attempts")

    run(main())
    assert not any(r.ok for r in results) and not any(r.final for r in results)
    assert "connect" in (results[0].error or "")
    assert ob.pending() == 1


def test_dead_endpoint_does_not_hold_up_a_live_one(
    outboxes: OutboxFactory, receiver: Receiver, closed_port: int, transport_kind: str
) -> None:
    dead = f"http://127.0.0.1:{closed_port}/dead"
    live = receiver.url("/live")
    ob = outboxes()
    for n in range(20):  # interleaved, the dead endpoint first
        ob.add([plain(dead, n, key=f"k{n % 4}"), plain(live, n, key=f"k{n % 4}")])

    async def main() -> Dispatcher:
        http = make_transport(transport_kind)
        dispatcher = Dispatcher(ob, http=http, policy=FAST, seed=7, lanes=4)
        await dispatcher.start()
        await until(lambda: len(receiver.on("/live")) == 20, "all live notifications")
        stats = dispatcher.endpoint_stats(dead)
        assert stats is not None
        await until(lambda: stats.failures >= 5, "five attempts at the dead endpoint")
        await dispatcher.stop()
        await http.aclose()
        return dispatcher

    dispatcher = run(main())
    got = [r.body["n"] for r in receiver.on("/live")]
    assert sorted(got) == list(range(20))
    for k in range(4):  # one key, one lane: in order
        lane = [n for n in got if n % 4 == k]
        assert lane == sorted(lane)
    stats = dispatcher.endpoint_stats(dead) or _no_stats()
    assert stats.delivered == 0 and stats.attempts == stats.failures
    # back-off: the delays follow the seeded policy and grow until the cap
    rng = random.Random(f"7|{dead}")
    expected = [FAST.delay(n, rng) for n in range(1, len(stats.delays) + 1)]
    assert stats.delays == expected
    growing = [d for d in stats.delays if d < FAST.max_s]
    assert growing == sorted(growing) and len(set(growing)) == len(growing)
    # nothing of the dead endpoint was lost; the attempts were recorded
    rows = [i for i in ob.items() if i.endpoint == dead]
    assert len(rows) == 20
    assert sum(i.attempts for i in rows) == stats.failures
    assert all(i.endpoint == dead for i in ob.items())


def _no_stats() -> Any:
    raise AssertionError("no stats for the dead endpoint")


def test_hanging_endpoint_does_not_hold_up_a_live_one(
    outboxes: OutboxFactory, receiver: Receiver, blackhole: int, transport_kind: str
) -> None:
    hanging = f"http://127.0.0.1:{blackhole}/hang"
    ob = outboxes()
    for n in range(10):
        ob.add([plain(hanging, n, key=f"k{n}"), plain(receiver.url("/live"), n, key=f"k{n}")])

    async def main() -> None:
        http = make_transport(transport_kind, timeout=60.0)
        dispatcher = Dispatcher(ob, http=http, stop_grace=0.1)
        await dispatcher.start()
        await until(lambda: len(receiver.on("/live")) == 10, "all live notifications")
        stats = dispatcher.endpoint_stats(hanging)
        # every lane of the hanging endpoint is still waiting for its first answer
        assert stats is not None and stats.attempts > 0
        assert stats.failures == 0 and stats.delivered == 0
        await dispatcher.stop()
        await http.aclose()

    run(main())
    rows = ob.items()
    assert len(rows) == 10 and all(i.endpoint == hanging for i in rows)
    assert all(i.attempts == 0 for i in rows)  # cut off by the stop, not failed


def test_failures_then_success(
    outboxes: OutboxFactory, receiver: Receiver, transport_kind: str
) -> None:
    receiver.statuses.extend([500, 503])
    ob = outboxes()
    ob.add([plain(receiver.url(), 1)])
    results: list[DeliveryResult] = []

    async def main() -> None:
        http = make_transport(transport_kind)
        async with Dispatcher(ob, http=http, policy=FAST, on_result=results.append):
            await until(lambda: any(r.ok for r in results), "a success")
        await http.aclose()

    run(main())
    assert [(r.ok, r.item.attempts, r.error, r.final) for r in results] == [
        (False, 1, "HTTP 500", False),
        (False, 2, "HTTP 503", False),
        (True, 3, None, True),
    ]
    assert len(receiver.requests) == 3 and ob.pending() == 0


def test_gives_up_after_max_attempts(outboxes: OutboxFactory, receiver: Receiver) -> None:
    receiver.default = 400
    ob = outboxes()
    ob.add([plain(receiver.url(), 1), plain(receiver.url(), 2)])
    results: list[DeliveryResult] = []
    policy = RetryPolicy(base_s=0.001, max_s=0.01, max_attempts=3)

    async def main() -> Dispatcher:
        async with Dispatcher(ob, policy=policy, on_result=results.append) as dispatcher:
            await until(lambda: sum(r.final for r in results) == 2, "both given up")
        return dispatcher

    dispatcher = run(main())
    assert len(receiver.requests) == 6
    finals = [r for r in results if r.final]
    assert all(not r.ok and r.item.attempts == 3 for r in finals)
    assert dispatcher.given_up == 2 and ob.pending() == 0


def test_never_gives_up_by_default(outboxes: OutboxFactory, receiver: Receiver) -> None:
    """Delivery is at least once: the default policy dropped a notification after 12 failed
    attempts (about 15 minutes of a receiver's downtime), with the back-off shortened here."""
    receiver.statuses.extend([503] * 20)  # down for more than 12 attempts, then back
    ob = outboxes()
    ob.add([plain(receiver.url(), 1)])
    results: list[DeliveryResult] = []
    policy = replace(RetryPolicy(), base_s=0.001, max_s=0.005)  # the default's other fields

    async def main() -> None:
        async with Dispatcher(ob, policy=policy, on_result=results.append):
            await until(lambda: any(r.final for r in results), "a final result")

    run(main())
    assert [(r.ok, r.item.attempts) for r in results if r.final] == [(True, 21)]
    assert len(receiver.requests) == 21 and ob.pending() == 0


def test_wake_from_another_thread(outboxes: OutboxFactory, receiver: Receiver) -> None:
    """With polling practically off, only wake() can start the delivery."""
    ob = outboxes()

    async def main() -> None:
        async with Dispatcher(ob, poll_interval=3600) as dispatcher:

            def writer() -> None:
                ob.add([plain(receiver.url(), 1)])
                dispatcher.wake()

            thread = threading.Thread(target=writer)
            thread.start()
            await asyncio.to_thread(thread.join)
            await until(lambda: len(receiver.requests) == 1, "the woken delivery")

    run(main())


def test_restart_delivers_what_was_enqueued(
    outboxes: OutboxFactory, receiver: Receiver, core: Context
) -> None:
    """Enqueued while no dispatcher runs; a new process (new connections) delivers it all."""
    sub = subscription(core, receiver.url("/after-restart"))
    writer = outboxes()
    for n in range(10):
        writer.add(SubscriptionIndex([sub]).notifications(change(core, n, n), lambda *_: core))
    writer.db.close()

    restarted = outboxes()

    async def main() -> None:
        async with Dispatcher(restarted):
            await until(lambda: len(receiver.requests) == 10, "10 notifications")

    run(main())
    ids = sorted(r.body["data"][0]["id"] for r in receiver.requests)
    assert ids == sorted(f"urn:ngsi-ld:Vehicle:V{n}" for n in range(10))
    assert restarted.pending() == 0


def test_restart_after_a_crash_mid_delivery(outboxes: OutboxFactory, receiver: Receiver) -> None:
    """Rows a dead dispatcher had claimed (leased for an hour) go out at once after a restart."""
    crashed = outboxes()
    crashed.add([plain(receiver.url("/crash"), n, key=f"k{n}") for n in range(6)])
    claimed = crashed.claim(4, lease_s=3600)  # then the process is killed: no release
    assert len(claimed) == 4
    crashed.db.close()

    restarted = outboxes()

    async def main() -> None:
        async with Dispatcher(restarted, poll_interval=3600):
            await until(lambda: len(receiver.requests) == 6, "all 6, leased ones included")

    run(main())
    assert sorted(r.body["n"] for r in receiver.requests) == list(range(6))


def test_stop_gives_leases_back(outboxes: OutboxFactory, closed_port: int) -> None:
    ob = outboxes()
    ob.add([plain(f"http://127.0.0.1:{closed_port}/x", n) for n in range(3)])
    results: list[DeliveryResult] = []

    async def main() -> None:
        async with Dispatcher(ob, policy=FAST, takeover=False, on_result=results.append):
            await until(lambda: len(results) >= 1, "a failed attempt")

    run(main())
    # after a graceful stop nothing is leased: a dispatcher that does not take over gets all
    assert len(ob.claim(10)) == 3


def test_a_cooldown_holds_back_its_own_subscription_only(
    outboxes: OutboxFactory, receiver: Receiver
) -> None:
    """A subscription's cooldown was applied to its endpoint: after one failure of A (cooldown
    30 s) every subscription notifying the same URI waited 30 s, not the back-off."""
    receiver.statuses.append(500)
    ob = outboxes()

    def item(sub: str, n: int, cooldown: float | None = None) -> OutboxItem:
        base = plain(receiver.url(), n, key=sub)
        payload = base.payload if cooldown is None else {**base.payload, "cooldown": cooldown}
        return replace(base, subscription_id=f"urn:ngsi-ld:Subscription:{sub}", payload=payload)

    ob.add([item("A", 1, cooldown=30.0)])
    results: list[DeliveryResult] = []

    async def main() -> None:
        # one lane: B's row comes behind A's held one in it, and must go past it
        async with Dispatcher(ob, policy=FAST, on_result=results.append, lanes=1) as dispatcher:
            await until(lambda: len(results) == 1, "A's failed attempt")
            ob.add([item("B", 2), item("A", 3, cooldown=30.0), item("B", 4)])
            dispatcher.wake()
            await until(lambda: len(results) == 3, "B's notifications", timeout=10)
            await asyncio.sleep(0.3)  # A's would have gone by now without its cooldown

    run(main())
    assert [(r.item.subscription_id[-1], r.item.body["n"], r.ok) for r in results] == [
        ("A", 1, False),
        ("B", 2, True),
        ("B", 4, True),
    ]
    assert sorted(i.body["n"] for i in ob.items()) == [1, 3]  # A's wait, in order


def test_a_topic_the_broker_refuses_is_not_published(
    outboxes: OutboxFactory, mqtt_subscriber: MqttSubscriber
) -> None:
    """A subscription stored before topics were checked may name one (a NUL in it): Mosquitto
    drops the connection on it, the one every subscription to that broker shares, and the QoS 0
    messages written on it before the drop were lost while reported sent."""
    bad = mqtt_subscriber.url().rsplit("/", 1)[0] + "/a%00b"
    ob = outboxes()
    for n in range(20):
        ob.add([plain(bad, n, key=f"bad{n}"), plain(mqtt_subscriber.url(), n, key=f"k{n}")])
    results: list[DeliveryResult] = []
    policy = RetryPolicy(base_s=0.01, max_s=0.05, max_attempts=2)

    async def main() -> None:
        async with Dispatcher(ob, policy=policy, on_result=results.append):
            await until(lambda: sum(r.final for r in results) == 40, "every row settled")
            await asyncio.sleep(0.3)  # the last messages are on their way

    run(main())
    refused = [r for r in results if r.item.endpoint == bad]
    assert len(refused) == 40 and not any(r.ok for r in refused)
    assert all("U+0000" in (r.error or "") for r in refused)
    assert sorted(m["body"]["n"] for m in mqtt_subscriber.received()) == list(range(20))
