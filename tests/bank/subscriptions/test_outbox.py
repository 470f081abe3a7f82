"""The notification outbox on real SQLite and PostgreSQL: atomic enqueue, claims, the bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.subscriptions.outbox import (
    Outbox,
    OutboxItem,
    PostgresOutboxDB,
    SqliteOutboxDB,
)
from tests.bank.subscriptions.conftest import OutboxFactory


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def item(
    n: int, endpoint: str = "http://a/n", sub: str = "urn:ngsi-ld:Subscription:S1"
) -> OutboxItem:
    return OutboxItem(
        id=f"urn:ngsi-ld:Notification:{n}",
        subscription_id=sub,
        endpoint=endpoint,
        payload={"headers": {"Content-Type": "application/json"}, "body": {"n": n}},
        tenant="t1",
        key=f"urn:e:{n % 3}",
    )


def numbers(items: list[OutboxItem]) -> list[int]:
    return [int(i.body["n"]) for i in items]


def test_schema_is_idempotent(outboxes: OutboxFactory) -> None:
    first = outboxes()
    first.add([item(1)])
    second = outboxes()  # creating the table again keeps the rows
    assert numbers(second.items()) == [1]


def test_items_round_trip(outboxes: OutboxFactory) -> None:
    ob = outboxes(clock=Clock())
    ob.add([item(1), item(2, "mqtt://b/t")])
    got = ob.items()
    assert [i.id for i in got] == ["urn:ngsi-ld:Notification:1", "urn:ngsi-ld:Notification:2"]
    assert got[0].payload == item(1).payload
    assert (got[0].tenant, got[0].key, got[0].attempts, got[0].created) == (
        "t1",
        "urn:e:1",
        0,
        1_000_000.0,
    )
    assert got[0].seq < got[1].seq
    assert ob.pending() == 2 and ob.pending_estimate() == 2


def test_claim_leases_in_order(outboxes: OutboxFactory) -> None:
    clock = Clock()
    ob = outboxes(clock=clock)
    ob.add([item(n) for n in range(5)])
    assert numbers(ob.claim(3, lease_s=60)) == [0, 1, 2]
    assert numbers(ob.claim(10, lease_s=60)) == [3, 4]
    assert ob.claim(10) == []  # all leased
    clock.t += 61
    assert numbers(ob.claim(10)) == [0, 1, 2, 3, 4]  # the leases ran out


def test_claim_skips_excluded_endpoints(outboxes: OutboxFactory) -> None:
    ob = outboxes()
    ob.add([item(1, "http://a/n"), item(2, "http://b/n"), item(3, "http://c/n")])
    got = ob.claim(10, exclude=["http://a/n", "http://c/n"])
    assert numbers(got) == [2]


def test_exchange_settles_and_claims_in_one_go(outboxes: OutboxFactory) -> None:
    clock = Clock()
    ob = outboxes(clock=clock)
    ob.add([item(n) for n in range(4)])
    a, b, *_ = ob.claim(2)
    got = ob.exchange(delivered=[a.seq], failures=[(b.seq, 1, "HTTP 500")], limit=10)
    assert numbers(got) == [2, 3]
    rows = {i.seq: i for i in ob.items()}
    assert a.seq not in rows
    assert rows[b.seq].attempts == 1
    assert ob.pending() == 3 and ob.pending_estimate() == 3


def test_release_reschedule_and_takeover(outboxes: OutboxFactory) -> None:
    clock = Clock()
    ob = outboxes(clock=clock)
    ob.add([item(n) for n in range(3)])
    claimed = ob.claim(10, lease_s=3600)
    assert ob.release([claimed[0].seq]) == 1
    assert numbers(ob.claim(10)) == [0]
    ob.reschedule(claimed[1].seq, attempts=4, at=clock.t + 30, error="refused")
    clock.t += 31
    got = ob.claim(10)
    assert numbers(got) == [1] and got[0].attempts == 4
    # a new dispatcher taking over gets everything back at once
    assert ob.release_all() == 3
    assert numbers(ob.claim(10)) == [0, 1, 2]


def test_given_back_rows_are_claimed_before_newer_ones(outboxes: OutboxFactory) -> None:
    """Claims go by seq: a stopping (or, after a crash, a restarted) dispatcher gives its
    leases back due "now", and ordered by next_attempt the newer rows it had not claimed yet
    (due since their enqueue) went first, so a subscription's notifications arrived out of
    order after a restart."""
    clock = Clock()
    ob = outboxes(clock=clock)
    ob.add([item(n) for n in range(2)])
    held = ob.claim(1, lease_s=3600)  # the queue was full: row 1 stayed in the table
    clock.t += 5
    assert ob.release([i.seq for i in held]) == 1  # a stop
    assert numbers(ob.claim(1)) == [0]
    clock.t += 5
    assert ob.release_all() == 1  # a takeover after a crash
    assert numbers(ob.claim(1)) == [0]
    assert numbers(ob.claim(1)) == [1]


def test_delete(outboxes: OutboxFactory) -> None:
    ob = outboxes()
    ob.add([item(n) for n in range(3)])
    seqs = [i.seq for i in ob.items()]
    assert ob.delete(seqs[:2]) == 2
    assert ob.delete(seqs[:2]) == 0
    assert numbers(ob.items()) == [2]
    assert ob.pending_estimate() == 1


def test_bound_per_endpoint_drops_the_oldest_of_that_endpoint(outboxes: OutboxFactory) -> None:
    ob = outboxes(max_per_endpoint=10, max_pending=1000)
    ob.add([item(n, "http://b/n", sub="urn:ngsi-ld:Subscription:B") for n in range(100, 103)])
    for n in range(25):
        ob.add([item(n, "http://dead/n")])
    dead = [i for i in ob.items() if i.endpoint == "http://dead/n"]
    assert len(dead) <= 10
    kept = numbers(dead)
    assert kept == list(range(25 - len(kept), 25))  # the newest ones, in order
    assert numbers([i for i in ob.items() if i.endpoint == "http://b/n"]) == [100, 101, 102]
    assert ob.dropped == 25 - len(kept)
    assert ob.dropped_by_endpoint == {"http://dead/n": ob.dropped}
    assert ob.dropped_by_subscription == {("t1", "urn:ngsi-ld:Subscription:S1"): ob.dropped}


def test_bound_prefers_unleased_rows(outboxes: OutboxFactory) -> None:
    ob = outboxes(max_per_endpoint=10, max_pending=1000)
    ob.add([item(n) for n in range(10)])
    leased = ob.claim(2)  # in a dispatcher's hands
    ob.add([item(10)])
    left = numbers(ob.items())
    assert [i.body["n"] for i in leased] == [0, 1]
    assert left[:2] == [0, 1] and 10 in left and len(left) == 9


def test_bound_on_the_whole_outbox(outboxes: OutboxFactory) -> None:
    ob = outboxes(max_per_endpoint=1000, max_pending=20)
    ob.add([item(n, "http://small/n") for n in range(3)])
    for n in range(30):
        ob.add([item(n, "http://big/n")])
    rows = ob.items()
    assert len(rows) <= 20
    assert numbers([i for i in rows if i.endpoint == "http://small/n"]) == [0, 1, 2]
    assert ob.dropped == 33 - len(rows)


def test_enqueue_is_part_of_the_callers_transaction(outboxes: OutboxFactory) -> None:
    ob = outboxes()
    with pytest.raises(RuntimeError), ob.db.transaction() as conn:
        ob.enqueue(conn, [item(1)])
        raise RuntimeError("the write failed")
    assert ob.pending() == 0
    with ob.db.transaction() as conn:
        ob.enqueue(conn, [item(2)])
    assert numbers(ob.items()) == [2]


def _store_outbox(store: Store) -> Outbox:
    if isinstance(store, SqliteStore):
        return Outbox(SqliteOutboxDB(store.path))
    assert isinstance(store, PostgresStore)
    return Outbox(PostgresOutboxDB(store.pool))


def test_enqueue_inside_a_store_write(store: Store, tmp_path: Path) -> None:
    """The real store's write transaction carries the notification: both or neither."""
    ob = _store_outbox(store)
    doc: dict[str, Any] = {
        "id": "urn:ngsi-ld:Vehicle:V1",
        "type": ["https://uri.etsi.org/ngsi-ld/default-context/Vehicle"],
        "createdAt": "2024-01-01T00:00:00.000000Z",
        "modifiedAt": "2024-01-01T00:00:00.000000Z",
        "attrs": {},
    }
    with pytest.raises(RuntimeError), store.write("", False) as txn:
        [pk] = txn.new_pks(1)
        txn.put([(pk, doc)], [])
        assert txn.dialect == ob.dialect
        ob.enqueue(txn.conn, [item(1)])
        raise RuntimeError("rolled back")
    assert store.get("", doc["id"]) is None and ob.pending() == 0
    with store.write("", False) as txn:
        [pk] = txn.new_pks(1)
        txn.put([(pk, doc)], [])
        ob.enqueue(txn.conn, [item(2)])
    assert store.get("", doc["id"]) is not None
    assert numbers(ob.items()) == [2]
    ob.db.close()
