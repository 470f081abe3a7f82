"""The change feed over NATS JetStream: outbox, relay, followers, processes that die."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.changes import Change, ChangeFeed
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bus.feed import (
    ChangeBus,
    ChangeFollower,
    ChangeOutbox,
    ChangeRelay,
    decode_change,
    tenant_token,
)
from cityward.bus.nats import JetStream
from cityward.bus.settings import BusSettings
from cityward.config import Settings
from tests.bus.conftest import Collector, sensor, wait_until, write
from tests.conftest import PG_URL, ROOT, drop_pg_store, make_pg_store


def follower(
    js: JetStream, settings: BusSettings, feed: ChangeFeed, durable: str | None, batch: int = 50
) -> ChangeFollower:
    return ChangeFollower(
        js,
        feed,
        stream=settings.changes_stream,
        subject_filter=settings.changes_subject + ".>",
        durable=durable,
        deliver="all",
        batch=batch,
        ack_wait_s=settings.ack_wait_s,
    )


def relay(store: Store, outbox: ChangeOutbox, js: JetStream) -> ChangeRelay:
    return ChangeRelay(store, outbox, js, batch=100, poll_s=0.05)


def outbox_bank(store: Store, settings: BusSettings) -> tuple[Bank, ChangeOutbox]:
    """A bank whose writes go to the change outbox only (NATS mode)."""
    bank = Bank(store)
    outbox = ChangeOutbox(store, settings.changes_subject)
    bank.hooks.append(outbox)
    bank.publish_local = False
    return bank, outbox


@contextmanager
def relayed(
    store: Store, outbox: ChangeOutbox, js: JetStream, settings: BusSettings, durable: str
) -> Iterator[Collector]:
    """A durable follower hearing the stream, and a relay emptying the outbox into it."""
    feed = ChangeFeed()
    seen = Collector(feed)
    f = follower(js, settings, feed, durable=durable)
    f.start()
    r = relay(store, outbox, js)
    r.start()
    try:
        yield seen
    finally:
        r.stop()
        f.stop()


def checksum(keys: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(repr(sorted(keys)).encode()).hexdigest()


def fail(txn: WriteTxn, changes: list[Change]) -> None:
    raise RuntimeError("a hook after the outbox fails: the write rolls back")


def test_outbox_commits_and_rolls_back_with_the_write(store: Store) -> None:
    bank = Bank(store)
    outbox = ChangeOutbox(store, "cw.changes")
    bank.hooks.append(outbox)
    bank.batch_upsert("", [sensor(1, 1.5)], "update")
    bank.batch_upsert("city.2", [sensor(2)], "update")
    rows = outbox.pending()
    assert [r.subject for r in rows] == ["cw.changes.default", "cw.changes.x-636974792e32"]
    assert rows[1].msg_id == f"{outbox.store_id}:{rows[1].seq}" and rows[0].seq < rows[1].seq
    change = decode_change(rows[0].body)
    assert (change.tenant, change.entity_id, change.before, change.kind) == (
        "",
        "urn:ngsi-ld:Sensor:S1",
        None,
        "created",
    )
    assert change.after == store.get("", "urn:ngsi-ld:Sensor:S1")
    assert change.after is not None and change.at == change.after["modifiedAt"]

    bank.hooks.append(fail)
    with pytest.raises(RuntimeError, match="rolls back"):
        bank.batch_upsert("", [sensor(3)], "update")
    assert store.get("", "urn:ngsi-ld:Sensor:S3") is None
    assert outbox.pending() == rows
    # a second outbox on the same database shares its id: any node relays under the same ids
    assert ChangeOutbox(store).store_id == outbox.store_id
    assert tenant_token("") == "default" and tenant_token("north-1") == "north-1"


def test_rows_of_a_dead_relay_are_delivered_later_exactly_once(
    sqlite_store: SqliteStore, js: JetStream, bus_settings: BusSettings
) -> None:
    bank, outbox = outbox_bank(sqlite_store, bus_settings)
    write(bank, 30)  # committed, but its process died before its relay ran
    rows = outbox.pending()
    assert len(rows) == 30
    # ... and another died after publishing the first ten, before deleting them
    js.publish_many([(r.subject, r.body.encode(), r.msg_id) for r in rows[:10]])

    feed = ChangeFeed()
    seen = Collector(feed)
    f = follower(js, bus_settings, feed, durable="after-crash")
    f.start()
    r = relay(sqlite_store, outbox, js)
    r.start()
    try:
        wait_until(lambda: len(seen.changes) >= 30, what="30 changes")
        wait_until(lambda: not outbox.pending(), what="an empty outbox")
        assert js.stream_messages(bus_settings.changes_stream) == 30  # the ten not twice
        write(bank, 1, prefix="END")  # everything before the sentinel arrived before it
        wait_until(lambda: seen.has("urn:ngsi-ld:Sensor:END0"), what="the sentinel")
    finally:
        r.stop()
        f.stop()
    assert len(seen.changes) == 31
    in_order = [f"urn:ngsi-ld:Sensor:S{i}" for i in range(30)]
    assert [c.entity_id for c in seen.changes[:30]] == in_order
    assert seen.changes[0].after == sqlite_store.get("", "urn:ngsi-ld:Sensor:S0")
    assert r.published == 31  # it republished the ten; the stream dropped them (above)


def test_the_feed_comes_back_when_its_stream_is_made_anew(
    sqlite_store: SqliteStore, bus_settings: BusSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NATS that came back without its store (or a deleted stream): the relay answered "no
    responders" for ever with every change queued, and the durable follower's consumer, gone
    with the stream, fetched nothing for ever, silently."""
    import cityward.bus.feed as feed_module

    monkeypatch.setattr(feed_module, "CONSUMER_CHECK_S", 0.3)
    bank = Bank(sqlite_store)
    bus = ChangeBus(bus_settings, sqlite_store, bank, name="cityward-test-lost")
    feed = ChangeFeed()
    seen = Collector(feed)
    bus.follow(feed, durable="lost", deliver="all")
    bus.start()
    try:
        write(bank, 2)
        wait_until(lambda: len(seen.changes) >= 2, what="the first changes")
        assert bus.js.delete_stream(bus_settings.changes_stream)  # the store is gone
        write(bank, 3, prefix="AFTER")
        wait_until(lambda: seen.has("urn:ngsi-ld:Sensor:AFTER2"), what="the changes after")
        wait_until(lambda: not bus.outbox.pending(), what="an empty outbox")
    finally:
        bus.stop()
    after = [c.entity_id for c in seen.changes if "AFTER" in c.entity_id]
    assert after == [f"urn:ngsi-ld:Sensor:AFTER{i}" for i in range(3)]


def test_a_durable_follower_acknowledges_only_what_its_listeners_settled(
    sqlite_store: SqliteStore, js: JetStream, bus_settings: BusSettings
) -> None:
    """The anomaly service only queues what the feed hands it; the follower acknowledged each
    batch as soon as it was queued, so a node killed with a backlog lost the queued changes
    for good. With ``settle`` a batch is acknowledged once it is handled."""
    bank, outbox = outbox_bank(sqlite_store, bus_settings)
    write(bank, 5)
    r = relay(sqlite_store, outbox, js)
    r.start()
    try:
        wait_until(lambda: not outbox.pending(), what="an empty outbox")
    finally:
        r.stop()

    def run(settled: bool, until: Callable[[list[Change]], bool]) -> list[Change]:
        feed = ChangeFeed()
        seen = Collector(feed)
        f = ChangeFollower(
            js,
            feed,
            stream=bus_settings.changes_stream,
            subject_filter=bus_settings.changes_subject + ".>",
            durable="settled",
            deliver="all",
            ack_wait_s=bus_settings.ack_wait_s,
            settle=lambda timeout_s: settled,
        )
        f.start()
        try:
            wait_until(lambda: until(seen.changes), what="the changes")
        finally:
            f.stop()
        return seen.changes

    five = [f"urn:ngsi-ld:Sensor:S{i}" for i in range(5)]
    # a node whose service never got through its queue, stopped (as if killed)
    assert [c.entity_id for c in run(False, lambda got: len(got) >= 5)][:5] == five
    # the next node gets them again, handles them, and acknowledges
    assert {c.entity_id for c in run(True, lambda got: len(got) >= 5)} == set(five)
    write(bank, 1, prefix="END")
    r = relay(sqlite_store, outbox, js)
    r.start()
    try:
        after = run(True, lambda got: any(c.entity_id.endswith("END0") for c in got))
    finally:
        r.stop()
    assert [c.entity_id for c in after] == ["urn:ngsi-ld:Sensor:END0"]  # nothing again


def test_a_change_larger_than_nats_takes_does_not_stop_the_feed(
    sqlite_store: SqliteStore, js: JetStream, bus_settings: BusSettings
) -> None:
    """An update of an entity of 600 kB (the bank takes 8 MB) is a change of 1.2 MB with its
    before and after, over NATS's 1 MB: the relay retried it for ever, and no later change of
    any entity reached any follower."""
    from tests.bus.conftest import PARSER

    bank, outbox = outbox_bank(sqlite_store, bus_settings)
    big = "urn:ngsi-ld:Sensor:BIG"
    for text in ("a" * 600_000, "b" * 600_000):
        doc = {"id": big, "type": "Sensor", "note": {"type": "Property", "value": text}}
        assert not bank.batch_upsert("", [PARSER.entity(doc)], "update").errors
    write(bank, 3)
    with relayed(sqlite_store, outbox, js, bus_settings, "big-change") as seen:
        wait_until(lambda: seen.has("urn:ngsi-ld:Sensor:S2"), what="the changes after it")
        wait_until(lambda: not outbox.pending(), what="an empty outbox")
    ids = [c.entity_id for c in seen.changes]
    assert ids == [big, big] + [f"urn:ngsi-ld:Sensor:S{i}" for i in range(3)]
    created, updated = seen.changes[0], seen.changes[1]
    assert created.after is not None and len(created.after["attrs"]) == 1  # it fitted
    # the update did not fit whole: its documents are cut to the entity's id and type
    assert updated.before is not None and updated.before["attrs"] == {}
    assert updated.after is not None and updated.after["id"] == big
    assert updated.after["type"] == created.after["type"]


@pytest.mark.postgres
def test_two_nodes_on_one_postgres_see_every_change(bus_settings: BusSettings) -> None:
    store_a = make_pg_store()
    assert store_a.schema is not None
    store_b = PostgresStore(PG_URL, schema=store_a.schema, max_size=4)
    bank_a, bank_b = Bank(store_a), Bank(store_b)
    bus_a = ChangeBus(bus_settings, store_a, bank_a, name="node-a")
    bus_b = ChangeBus(bus_settings, store_b, bank_b, name="node-b")
    on_a, on_b = Collector(bank_a.feed), Collector(bank_b.feed)
    bus_a.follow(bank_a.feed, deliver="all")
    bus_b.follow(bank_b.feed, deliver="all")
    try:
        bus_a.start()
        bus_b.start()
        threads = [
            threading.Thread(target=write, args=(bank_a, 40, "A")),
            threading.Thread(target=write, args=(bank_b, 40, "B")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        write(bank_a, 5, "A", value=1.0, tenant="t2")  # another tenant
        write(bank_a, 1, prefix="END")
        wait_until(lambda: on_a.has("urn:ngsi-ld:Sensor:END0"), what="the sentinel on A")
        wait_until(lambda: on_b.has("urn:ngsi-ld:Sensor:END0"), what="the sentinel on B")
    finally:
        bus_a.stop()
        bus_b.stop()
        store_b.close()
        drop_pg_store(store_a)
    for seen in (on_a, on_b):
        keys = seen.pairs()
        assert len(keys) == 86 and len(set(keys)) == 86  # each change once, on each node
    assert checksum(on_a.pairs()) == checksum(on_b.pairs())
    by_id = {c.entity_id: c for c in on_b.changes if c.tenant == ""}
    a5 = by_id["urn:ngsi-ld:Sensor:A5"]
    assert a5.kind == "created" and a5.after is not None and a5.after["id"] == a5.entity_id
    assert {c.tenant for c in on_b.changes} == {"", "t2"}
    # one relay at a time publishes the oldest rows: per entity, changes come in write order
    assert bus_a.relay.published + bus_b.relay.published == 86


def test_durable_follower_takes_over_where_the_last_one_stopped(
    sqlite_store: SqliteStore, js: JetStream, bus_settings: BusSettings
) -> None:
    bank = Bank(sqlite_store)
    bus = ChangeBus(bus_settings, sqlite_store, bank)
    bus.start()
    try:
        feed_1, feed_2 = ChangeFeed(), ChangeFeed()
        first, second = Collector(feed_1), Collector(feed_2)
        f1 = follower(js, bus_settings, feed_1, durable="anomaly", batch=5)

        def stop_midway(changes: Sequence[Change]) -> None:
            if len(first.changes) >= 50:
                f1.stop()  # from its own thread: stops after this batch is acknowledged

        feed_1.subscribe(stop_midway)
        f1.start()
        write(bank, 200)
        wait_until(lambda: not f1.running, what="the first follower to stop")
        f1.stop()
        assert 50 <= len(first.changes) < 55  # it stopped after the batch that crossed 50
        f2 = follower(js, bus_settings, feed_2, durable="anomaly", batch=50)
        f2.start()
        try:
            wait_until(lambda: len(first.changes) + len(second.changes) >= 200, what="200")
            write(bank, 1, prefix="END")
            wait_until(lambda: second.has("urn:ngsi-ld:Sensor:END0"), what="the sentinel")
        finally:
            f2.stop()
    finally:
        bus.stop()
    keys = first.pairs() + second.pairs()[:-1]
    assert len(keys) == 200 and len(set(keys)) == 200
    expected = [
        (str(eid), str(doc_at))
        for eid, doc_at in sqlite_store.select("SELECT eid, modified FROM entities")
        if not str(eid).endswith("END0")
    ]
    assert checksum(keys) == checksum(expected)


def test_a_killed_followers_batch_goes_to_the_next_one(
    sqlite_store: SqliteStore, js: JetStream, bus_settings: BusSettings
) -> None:
    bank = Bank(sqlite_store)
    bus = ChangeBus(bus_settings, sqlite_store, bank)
    bus.start()
    dead_js = JetStream(bus_settings.nats_url, name="dying")
    dead_js.connect()
    hang = threading.Event()
    try:
        feed_1, feed_2 = ChangeFeed(), ChangeFeed()
        first, second = Collector(feed_1), Collector(feed_2)

        # the first follower hangs inside its first batch, before acknowledging it
        def hung(changes: Sequence[Change]) -> None:
            hang.wait(30)

        feed_1.subscribe(hung)
        f1 = follower(dead_js, bus_settings, feed_1, durable="alerts", batch=10)
        f1.start()
        write(bank, 30)
        wait_until(lambda: len(first.changes) > 0, what="the first batch")
        dead_js.close()  # its connection goes, as when the process is killed
        f2 = follower(js, bus_settings, feed_2, durable="alerts", batch=50)
        f2.start()
        try:
            # those never delivered at once, the hung batch after ack_wait (1 s)
            wait_until(lambda: len(second.changes) >= 30, what="all 30 on the second")
        finally:
            f2.stop()
    finally:
        hang.set()
        f1.stop()
        bus.stop()
    assert sorted(second.pairs()) == sorted(set(second.pairs()))
    assert 0 < len(first.changes) <= 10 and set(first.pairs()) <= set(second.pairs())


def test_a_killed_writer_process_loses_no_committed_change(
    tmp_path: Path, js: JetStream, bus_settings: BusSettings
) -> None:
    db = tmp_path / "bank.db"
    store = SqliteStore(db)
    feed = ChangeFeed()
    seen = Collector(feed)
    f = follower(js, bus_settings, feed, durable="survivor", batch=200)
    f.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.bus.writer_process", str(db), bus_settings.model_dump_json()],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n", proc.stderr.read() if proc.stderr else ""

        def written() -> int:
            return int(store.select("SELECT count(*) FROM entities")[0][0])

        wait_until(lambda: written() >= 300 and len(seen.changes) >= 50, what="the writer")
        proc.send_signal(signal.SIGKILL)  # mid-write, mid-relay
        assert proc.wait(10) == -signal.SIGKILL
        committed = {
            (str(e), str(m)) for e, m in store.select("SELECT eid, modified FROM entities")
        }
        # the restart: a new process's relay finds what the killed one left in the outbox
        bank = Bank(store)
        bus = ChangeBus(bus_settings, store, bank, name="restarted")
        bus.start()
        try:
            write(bank, 1, prefix="END")
            wait_until(lambda: seen.has("urn:ngsi-ld:Sensor:END0"), timeout=20, what="sentinel")
        finally:
            bus.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
        f.stop()
        store.close()
    keys = [k for k in seen.pairs() if not k[0].endswith("END0")]
    assert len(keys) == len(set(keys)), "a change reached the follower twice"
    assert set(keys) == committed
    assert len(committed) >= 300


def test_the_app_in_nats_mode(tmp_path: Path, bus_settings: BusSettings) -> None:
    from cityward.anomaly.settings import AnomalySettings

    settings = Settings(
        data_dir=tmp_path,
        no_auth=True,
        context_fetch=False,
        bus=bus_settings,
        anomaly=AnomalySettings(enabled=True),
    )
    store = SqliteStore(tmp_path / "bank.db")
    app = create_app(settings, store)
    bank = app.state.runtime.bank
    assert not bank.publish_local
    seen = Collector(bank.feed)
    with TestClient(app) as client:
        level = {"type": "Property", "value": 3}
        body = {"id": "urn:ngsi-ld:Sensor:api1", "type": "Sensor", "level": level}
        assert client.post("/ngsi-ld/v1/entities", json=body).status_code == 201
        body["id"] = "urn:ngsi-ld:Sensor:END0"
        assert client.post("/ngsi-ld/v1/entities", json=body).status_code == 201
        wait_until(lambda: seen.has("urn:ngsi-ld:Sensor:END0"), what="the sentinel")
        anomaly_follower = app.state.bus.followers[1]
        assert anomaly_follower.durable == "anomaly"
        wait_until(lambda: anomaly_follower.received >= 2, what="the anomaly follower")
    assert [c.entity_id for c in seen.changes] == [
        "urn:ngsi-ld:Sensor:api1",
        "urn:ngsi-ld:Sensor:END0",
    ]
