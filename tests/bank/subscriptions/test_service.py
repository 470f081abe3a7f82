"""One notification dispatcher per database, and on PostgreSQL per schema."""

from __future__ import annotations

import asyncio

import pytest

from cityward.bank.jsonld import ContextResolver
from cityward.bank.service import Bank
from cityward.bank.store.postgres import PostgresStore
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
