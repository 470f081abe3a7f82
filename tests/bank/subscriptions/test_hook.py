"""The whole path on the real bank: write -> hook -> outbox (same transaction) -> receiver."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cityward.bank.changes import Change
from cityward.bank.errors import AlreadyExists
from cityward.bank.jsonld import CORE_CONTEXT_URL, Context, ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.subscriptions import (
    Dispatcher,
    NotificationHook,
    Outbox,
    PostgresOutboxDB,
    SqliteOutboxDB,
    parse_subscription,
)
from tests.bank.subscriptions.conftest import OutboxFactory, Receiver, run, until


def outbox_of(store: Store) -> Outbox:
    if isinstance(store, SqliteStore):
        return Outbox(SqliteOutboxDB(store.path))
    assert isinstance(store, PostgresStore)
    return Outbox(PostgresOutboxDB(store.pool))


def test_bank_writes_notify_through_the_outbox(
    store: Store, receiver: Receiver, core: Context, resolver: ContextResolver
) -> None:
    bank = Bank(store)
    outbox = outbox_of(store)
    sub = parse_subscription(
        {
            "type": "Subscription",
            "entities": [{"type": "Vehicle"}],
            "notificationTrigger": ["entityCreated", "attributeUpdated", "entityDeleted"],
            "notification": {"endpoint": {"uri": receiver.url()}, "format": "keyValues"},
        },
        core,
        now=datetime.now(UTC) - timedelta(seconds=1),
    )
    other = parse_subscription(
        {
            "type": "Subscription",
            "entities": [{"type": "Vehicle"}],
            "notification": {"endpoint": {"uri": receiver.url("/other-tenant")}},
        },
        core,
    )
    parser = EntityParser(core)
    eid = "urn:ngsi-ld:Vehicle:V1"

    async def main() -> None:
        dispatcher = Dispatcher(outbox, poll_interval=3600)  # only wake() starts deliveries
        hook = NotificationHook(outbox, resolver.resolve, dispatcher)
        hook.load("", [sub])
        hook.put("elsewhere", other)
        bank.hooks.append(hook)
        bank.feed.subscribe(hook.committed)
        async with dispatcher:
            entity = parser.entity({"id": eid, "type": "Vehicle", "speed": 10})
            await asyncio.to_thread(bank.create, "", entity)
            with pytest.raises(AlreadyExists):  # a failed write notifies nobody
                await asyncio.to_thread(bank.create, "", entity)
            frag = parser.entity({"speed": 20}, "merge", path_id=eid)
            await asyncio.to_thread(bank.merge, "", eid, frag)
            await asyncio.to_thread(bank.delete, "", eid)
            await until(lambda: len(receiver.requests) == 3, "three notifications")
        assert hook.enqueued == 3 and outbox.pending() == 0

    run(main())
    bodies = [r.body for r in receiver.requests]  # one entity, one lane: in write order
    assert [b["triggerReason"] for b in bodies] == [
        "entityCreated",
        "attributeUpdated",
        "entityDeleted",
    ]
    assert [b["data"][0]["speed"] for b in bodies] == [10, 20, "urn:ngsi-ld:null"]
    assert bodies[2]["data"][0]["deletedAt"]
    assert receiver.on("/other-tenant") == []
    outbox.db.close()


@dataclass
class Txn:
    conn: Any


def test_hook_survives_an_unavailable_context(
    outboxes: OutboxFactory, core: Context, resolver: ContextResolver
) -> None:
    """A remote jsonldContext that cannot be fetched now must not fail the entity write."""
    ob = outboxes()
    sub = parse_subscription(
        {
            "type": "Subscription",
            "entities": [{"type": "Vehicle"}],
            "jsonldContext": "https://contexts.example.invalid/city.jsonld",
            "notification": {"endpoint": {"uri": "http://127.0.0.1:9/n"}},
        },
        core,
    )
    hook = NotificationHook(ob, resolver.resolve)
    hook.load("", [sub])
    doc = EntityParser(core).entity({"id": "urn:ngsi-ld:Vehicle:V1", "type": "Vehicle", "a": 1})
    doc["createdAt"] = doc["modifiedAt"] = "2024-06-01T11:00:00.000000Z"
    with ob.db.transaction() as conn:
        hook(Txn(conn), [Change("", 1, doc["id"], None, doc, "2024-06-01T11:00:00.000000Z")])
    [item] = ob.items()
    assert item.headers["Link"].startswith(f"<{CORE_CONTEXT_URL}>")
    assert item.body["data"][0]["a"] == {"type": "Property", "value": 1}
    hook.remove("", sub.id)
    assert hook.get("", sub.id) is None
