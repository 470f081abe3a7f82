"""One notification dispatcher per database, and on PostgreSQL per schema."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.subscriptions.model import Subscription, parse_subscription
from cityward.bank.subscriptions.service import Subscriptions
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
