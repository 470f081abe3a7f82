"""One notification dispatcher per database, and on PostgreSQL per schema."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.subscriptions.dispatcher import EndpointStats, RetryPolicy
from cityward.bank.subscriptions.model import Subscription, apply_patch, parse_subscription
from cityward.bank.subscriptions.service import Subscriptions
from tests.bank.subscriptions.conftest import Received, Receiver, until
from tests.conftest import drop_pg_store, make_pg_store


@pytest.mark.postgres
def test_one_dispatcher_per_schema() -> None:
    """Two deployments in different schemas of one database each deliver their own
    notifications; two processes of one deployment (one schema) share one dispatcher."""
    resolver = ContextResolver(allow_fetch=False)
    a, b = make_pg_store(), make_pg_store()
    a2 = PostgresStore(a.url, schema=a.schema, max_size=2)  # a second process of deployment a
    subs = [Subscriptions(s, Bank(s), resolver) for s in (a, b, a2)]

    async def run() -> list[bool]:
        for s in subs:
            await s.start()
        try:
            return [s.dispatching for s in subs]
        finally:
            for s in subs:
                await s.stop()

    try:
        assert asyncio.run(run()) == [True, True, False]
        # once a's dispatcher stopped, its second process takes the lock
        assert asyncio.run(_starts(subs[2])) is True
    finally:
        a2.close()
        drop_pg_store(a)
        drop_pg_store(b)


async def _starts(sub: Subscriptions) -> bool:
    await sub.start()
    try:
        return sub.dispatching
    finally:
        await sub.stop()


def test_throttling_survives_changes_to_the_subscriptions(
    store: Store, core: Context, resolver: ContextResolver
) -> None:
    """Any change to the subscriptions (this process's own, or another's) rebuilt the matching
    index, and with it went when each subscription last fired: a throttled subscription then
    notified again at the next write (its delivery counters, the fallback, lag behind)."""
    other: Store = (
        SqliteStore(store.path)
        if isinstance(store, SqliteStore)
        else PostgresStore(store.url, schema=store.schema, max_size=2)  # type: ignore[attr-defined]
    )
    here = Subscriptions(store, Bank(store), resolver)
    elsewhere = Subscriptions(other, Bank(other), resolver)  # another process of the database
    since = datetime.now(UTC) - timedelta(seconds=1)

    def sub(n: int, **extra: Any) -> Subscription:
        body = {
            "id": f"urn:ngsi-ld:Subscription:{n}",
            "type": "Subscription",
            "entities": [{"type": "Building" if n else "Vehicle"}],
            "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}},
            **extra,
        }
        return parse_subscription(body, core, now=since)

    parser = EntityParser(core)
    eid = "urn:ngsi-ld:Vehicle:V1"
    speed = iter(range(100))

    def write(own_change: bool) -> None:
        # after its own change the index is current: the write need not reload it
        assert (here._version == here._read_version()) is own_change
        here.bank.merge("", eid, parser.entity({"speed": next(speed)}, "merge", path_id=eid))

    try:
        here.create("", sub(0, throttling=60))
        here.bank.create("", parser.entity({"id": eid, "type": "Vehicle", "speed": -1}))
        here.create("", sub(1))
        write(own_change=True)
        here.replace("", sub(1, description="changed"))
        write(own_change=True)
        elsewhere.create("", sub(2))
        write(own_change=False)
        here.delete("", sub(1).id)
        write(own_change=True)
        fired = [i for i in here.outbox.items() if i.subscription_id == sub(0).id]
        assert len(fired) == 1  # the create; the writes after it fell in the window
    finally:
        for s in (here, elsewhere):
            s.outbox.db.close()
        other.close()


# --------------------------------------------------------------------------------------------
# Two processes of one database: "here" delivers, "elsewhere" only enqueues

V1 = "urn:ngsi-ld:Vehicle:V1"


@pytest.fixture
def processes(
    store: Store, resolver: ContextResolver
) -> Iterator[tuple[Subscriptions, Subscriptions]]:
    other: Store = (
        SqliteStore(store.path)
        if isinstance(store, SqliteStore)
        else PostgresStore(store.url, schema=store.schema, max_size=2)  # type: ignore[attr-defined]
    )
    here = Subscriptions(store, Bank(store), resolver)
    elsewhere = Subscriptions(other, Bank(other), resolver)
    yield here, elsewhere
    for s in (here, elsewhere):
        s.outbox.db.close()
    other.close()


def _sub(core: Context, n: int, uri: str, **extra: Any) -> Subscription:
    body = {
        "id": f"urn:ngsi-ld:Subscription:{n}",
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": {"format": "keyValues", "endpoint": {"uri": uri}},
        **extra,
    }
    return parse_subscription(body, core, now=datetime.now(UTC) - timedelta(seconds=1))


def _speeds(requests: list[Received]) -> list[Any]:
    return [d["speed"] for r in requests for d in r.body["data"]]


def test_the_delivering_process_follows_the_others_changes(
    processes: tuple[Subscriptions, Subscriptions], core: Context, receiver: Receiver
) -> None:
    """The process that delivers reloaded the subscriptions only when it wrote an entity
    itself: the periodic subscriptions other processes created never fired, and the results
    of their notifications were not counted."""
    here, elsewhere = processes
    parser = EntityParser(core)
    changes = _sub(core, 1, receiver.url("/changes"))
    periodic = _sub(core, 2, receiver.url("/periodic"), timeInterval=1)

    async def main() -> None:
        await here.start()
        try:
            await asyncio.to_thread(elsewhere.create, "", changes)
            entity = parser.entity({"id": V1, "type": "Vehicle", "speed": 1})
            await asyncio.to_thread(elsewhere.bank.create, "", entity)
            await until(lambda: len(receiver.on("/changes")) == 1, "the change notification")
            await until(lambda: here.get("", changes.id).stats.times_sent == 1, "the count")
            await asyncio.to_thread(here.flush_stats)
            assert elsewhere.get("", changes.id).stats.times_sent == 1
            await asyncio.to_thread(elsewhere.create, "", periodic)
            await until(lambda: len(receiver.on("/periodic")) == 1, "a periodic notification")
            await asyncio.to_thread(elsewhere.delete, "", periodic.id)
            await until(lambda: here.hook.get("", periodic.id) is None, "the deletion seen")
            later = datetime.now(UTC) + timedelta(days=1)
            assert [i.subscription_id for i in here.periodic_due(later)] == []
        finally:
            await here.stop()

    asyncio.run(main())


@pytest.mark.parametrize("by", ["here", "elsewhere"])
def test_queued_notifications_follow_a_new_endpoint(
    processes: tuple[Subscriptions, Subscriptions],
    core: Context,
    receiver: Receiver,
    closed_port: int,
    by: str,
) -> None:
    """Each queued notification kept the endpoint of its enqueue: after a PATCH of a dead
    endpoint, they kept failing there and only the new ones reached the new endpoint."""
    here, elsewhere = processes
    actor = here if by == "here" else elsewhere
    parser = EntityParser(core)
    dead = f"http://127.0.0.1:{closed_port}/n"
    sub = _sub(core, 1, dead)
    actor.create("", sub)
    actor.bank.create("", parser.entity({"id": V1, "type": "Vehicle", "speed": 0}))
    for speed in (1, 2):
        actor.bank.merge("", V1, parser.entity({"speed": speed}, "merge", path_id=V1))
    moved = apply_patch(sub, {"notification": {"endpoint": {"uri": receiver.url()}}}, core)

    async def main() -> None:
        await here.start()  # claims all three at once
        try:
            await until(
                lambda: (here.dispatcher.endpoint_stats(dead) or EndpointStats(dead)).failures > 0,
                "a failed attempt",
            )
            await asyncio.to_thread(actor.replace, "", moved)
            await until(lambda: len(receiver.requests) == 3, "the queued notifications", 10)
            entity = parser.entity({"speed": 3}, "merge", path_id=V1)
            await asyncio.to_thread(actor.bank.merge, "", V1, entity)
            await until(lambda: len(receiver.requests) == 4, "a new notification", 10)
        finally:
            await here.stop()

    asyncio.run(main())
    assert _speeds(receiver.requests) == [0, 1, 2, 3]
    assert here.outbox.pending() == 0


@pytest.mark.parametrize("by", ["here", "elsewhere"])
def test_a_deleted_subscription_notifies_no_more(
    processes: tuple[Subscriptions, Subscriptions],
    core: Context,
    receiver: Receiver,
    by: str,
) -> None:
    """Its queued notifications outlived the subscription, and were delivered once its
    endpoint was back."""
    here, elsewhere = processes
    actor = here if by == "here" else elsewhere
    parser = EntityParser(core)
    gone, kept = _sub(core, 1, receiver.url()), _sub(core, 2, receiver.url())
    actor.create("", gone)
    receiver.default = 503
    actor.bank.create("", parser.entity({"id": V1, "type": "Vehicle", "speed": 0}))
    for speed in (1, 2):
        actor.bank.merge("", V1, parser.entity({"speed": speed}, "merge", path_id=V1))
    here.dispatcher.policy = RetryPolicy(base_s=0.01, max_s=0.05)

    async def main() -> int:
        await here.start()
        try:
            await until(lambda: len(receiver.requests) > 0, "a failed attempt")
            await until(lambda: here.hook.get("", gone.id) is not None, "it known here")
            await asyncio.to_thread(actor.delete, "", gone.id)
            # the delivering process sees another's change when it next writes (or ticks)
            other = parser.entity({"id": "urn:ngsi-ld:Building:B1", "type": "Building"})
            await asyncio.to_thread(here.bank.create, "", other)
            assert here.outbox.pending() == 0
            with receiver.lock:
                receiver.default = 204
                back = len(receiver.requests)
            await asyncio.to_thread(actor.create, "", kept)
            entity = parser.entity({"speed": 3}, "merge", path_id=V1)
            await asyncio.to_thread(actor.bank.merge, "", V1, entity)
            await until(lambda: here.outbox.pending() == 0, "the delivery")
            await until(lambda: here.get("", kept.id).stats.times_sent == 1, "its result")
        finally:
            await here.stop()
        return back

    back = asyncio.run(main())
    assert [r.body["subscriptionId"] for r in receiver.requests[back:]] == [kept.id]


def test_two_updates_at_once_both_count(
    processes: tuple[Subscriptions, Subscriptions], core: Context
) -> None:
    """A PATCH read the subscription, patched it and wrote it back whole: of two at once the
    second undid the first (24 of 40 pairs in the hunt). update() reads inside its write, so
    the second waits for the first and patches what it wrote."""
    import dataclasses
    import threading

    here, elsewhere = processes
    sid = _sub(core, 1, "http://127.0.0.1:9/n").id
    here.create("", _sub(core, 1, "http://127.0.0.1:9/n"))
    inside, go_on = threading.Event(), threading.Event()

    def slow_rename(current: Subscription) -> Subscription:
        inside.set()
        assert go_on.wait(10)
        return dataclasses.replace(current, subscription_name="renamed")

    first = threading.Thread(target=here.update, args=("", sid, slow_rename))
    first.start()
    assert inside.wait(10)
    seen: list[str | None] = []

    def describe(current: Subscription) -> Subscription:
        seen.append(current.subscription_name)
        return dataclasses.replace(current, description="described")

    second = threading.Thread(target=elsewhere.update, args=("", sid, describe))
    second.start()
    second.join(0.3)
    assert second.is_alive() and not seen  # waits for the first write to end
    go_on.set()
    first.join(10)
    second.join(10)
    assert seen == ["renamed"]
    got = here.get("", sid)
    assert (got.subscription_name, got.description) == ("renamed", "described")
