"""The batching writer on real SQLite (and PostgreSQL): each reading once, in order, bounded."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cityward.bank.store import Store, WriteTxn
from cityward.bank.store.sqlite import SqliteStore
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.settings import IngestSettings
from cityward.ingest.worker import IngestWorker
from tests.conftest import drop_pg_store, make_pg_store
from tests.ingest.helpers import (
    MAPPING,
    bank_with_history,
    message,
    refusing,
    settings,
    stored_readings,
)


def _worker(store: Store, tmp: Path, **writer: Any) -> IngestWorker:
    bank = bank_with_history(store)
    return IngestWorker(bank, settings("http", {}, **writer), DeadLetters(tmp / "dl.db"))


def _feed(worker: IngestWorker, msgs: list[dict[str, Any]]) -> list[str | None]:
    outcomes: list[str | None] = [None] * len(msgs)
    settled = threading.Semaphore(0)

    def done_for(i: int) -> Any:
        def done(why: str | None) -> None:
            outcomes[i] = why
            settled.release()

        return done

    for i, m in enumerate(msgs):
        worker.intakes["air"].receive(orjson.dumps(m), done=done_for(i))
    for _ in msgs:
        assert settled.acquire(timeout=30)
    return outcomes


@pytest.fixture
def sqlite(tmp_path: Path) -> Iterator[Store]:
    store = SqliteStore(tmp_path / "bank.db")
    yield store
    store.close()


def test_every_reading_once_with_its_history(sqlite: Store, tmp_path: Path) -> None:
    w = _worker(sqlite, tmp_path)
    w.start()
    try:
        msgs = [message(n, devices=7) for n in range(300)]
        assert _feed(w, msgs) == [None] * 300
        # the same messages again (a broker's redelivery, a device's retry) change nothing
        assert _feed(w, msgs[:120]) == [None] * 120
    finally:
        w.stop()
    got = stored_readings(sqlite)
    assert sorted(got) == sorted(
        (f"urn:ngsi-ld:AirQualityObserved:s{n % 7}", float(n)) for n in range(300)
    )
    assert w.writer.stats.written == 300
    assert w.writer.stats.duplicates == 120
    # the current value is each device's last reading (a batch holds several per entity)
    doc = sqlite.get("", "urn:ngsi-ld:AirQualityObserved:s3")
    assert doc is not None
    no2 = doc["attrs"]["https://uri.etsi.org/ngsi-ld/default-context/no2"][0]
    assert no2["value"] == max(n for n in range(300) if n % 7 == 3)


def test_a_failed_write_leaves_no_key_and_is_retried(sqlite: Store, tmp_path: Path) -> None:
    w = _worker(sqlite, tmp_path)
    failures = [2]

    def flaky(txn: WriteTxn, changes: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("disk I/O error (simulated)")

    w.bank.hooks.append(flaky)
    w.start()
    try:
        assert _feed(w, [message(n) for n in range(40)]) == [None] * 40
    finally:
        w.stop()
    assert w.writer.stats.write_failures == 2
    assert len(stored_readings(sqlite)) == 40
    keys = sqlite.select("SELECT count(*) FROM ingest_keys")[0][0]
    assert keys == 40


def test_a_refused_reading_is_a_dead_letter_and_its_neighbours_are_written(
    sqlite: Store, tmp_path: Path
) -> None:
    as_device = refusing(":s3")
    bank = bank_with_history(sqlite)
    w = IngestWorker(
        bank, settings("http", {}), DeadLetters(tmp_path / "dl.db"), write_context=as_device
    )
    w.start()
    try:
        outcomes = _feed(w, [message(n, devices=10) for n in range(30)])
    finally:
        w.stop()
    refused = [n for n, why in enumerate(outcomes) if why is not None]
    assert refused == [3, 13, 23]
    assert all("is not yours" in (outcomes[n] or "") for n in refused)
    assert len(stored_readings(sqlite)) == 27
    letters = w.dead_letters.entries("air")
    assert [orjson.loads(d.payload)["n"] for d in letters] == [3, 13, 23]


def test_a_slow_store_holds_the_adapters_back(sqlite: Store, tmp_path: Path) -> None:
    """Backpressure: a store that writes slowly makes put() wait; memory stays bounded."""
    w = _worker(sqlite, tmp_path, max_pending=50, batch_size=20)

    def slow(txn: WriteTxn, changes: Any) -> None:
        time.sleep(0.02)

    w.bank.hooks.append(slow)
    w.start()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], w.writer.pending)
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert _feed(w, [message(n, devices=500) for n in range(600)]) == [None] * 600
    finally:
        stop.set()
        watcher.join()
        w.stop()
    assert w.writer.stats.waits > 0  # the intake had to wait for room
    assert peak[0] <= 50 + 20  # queued + the batch in hand: never more
    assert len(stored_readings(sqlite)) == 600


@pytest.mark.postgres
def test_exactly_once_on_postgres(tmp_path: Path) -> None:
    store = make_pg_store()
    try:
        w = _worker(store, tmp_path)
        w.start()
        try:
            msgs = [message(n, devices=9) for n in range(200)]
            assert _feed(w, msgs) == [None] * 200
            assert _feed(w, msgs[50:150]) == [None] * 100
        finally:
            w.stop()
        got = stored_readings(store)
        assert len(got) == 200
        assert sum(v for _, v in got) == sum(range(200))
    finally:
        drop_pg_store(store)


@pytest.mark.postgres
def test_a_reading_the_store_cannot_take_is_a_dead_letter_not_a_stall(tmp_path: Path) -> None:
    """A value PostgreSQL cannot index (a text too long for a B-tree row) failed its whole
    batch, and the writer retried it for ever, every reading behind it held up. The batch is
    now halved until that reading is alone: it becomes a dead letter, the rest are written."""
    store = make_pg_store()
    try:
        mapping = {
            **MAPPING,
            "attributes": {**MAPPING["attributes"], "note": {"path": "$.note", "kind": "string"}},
        }
        config = IngestSettings.model_validate(
            {
                "sources": [{"name": "air", "adapter": "http", "options": {}, "mapping": mapping}],
                "writer": {"max_delay_ms": 200},
            }
        )
        w = IngestWorker(bank_with_history(store), config, DeadLetters(tmp_path / "dl.db"))
        msgs = [{**message(n, devices=40), "note": "ok"} for n in range(40)]
        msgs[17]["note"] = os.urandom(6000).hex()  # 12,000 characters that do not compress
        w.start()
        try:
            outcomes = _feed(w, msgs)
        finally:
            w.stop()
        assert [n for n, why in enumerate(outcomes) if why is not None] == [17]
        assert "the store cannot take it" in (outcomes[17] or "")
        assert sorted(v for _, v in stored_readings(store)) == [n for n in range(40) if n != 17]
        (letter,) = w.dead_letters.entries("air")
        assert orjson.loads(letter.payload)["n"] == 17 and "index row" in letter.reason
    finally:
        drop_pg_store(store)


def test_a_value_no_store_can_write_is_a_dead_letter_not_a_stall(
    sqlite: Store, tmp_path: Path
) -> None:
    """A reading whose document cannot be written as JSON (an integer past 64 bits: the
    mapping refuses those now, this is the net below it) failed its batch with a TypeError,
    and the writer retried that batch for ever."""
    from cityward.ingest.writer import Reading

    w = _worker(sqlite, tmp_path, max_delay_ms=200)
    no2 = "https://uri.etsi.org/ngsi-ld/default-context/no2"
    outcomes: dict[int, str | None] = {}
    settled = threading.Semaphore(0)

    def reading(n: int, value: Any) -> Reading:
        def done(why: str | None) -> None:
            outcomes[n] = why
            settled.release()

        frag = {
            "id": f"urn:ngsi-ld:AirQualityObserved:s{n}",
            "type": ["https://uri.etsi.org/ngsi-ld/default-context/AirQualityObserved"],
            "attrs": {no2: [{"type": "Property", "value": value}]},
        }
        return Reading("air", f"m:{n}", frag, done, raw=orjson.dumps({"n": n}))

    w.start()
    try:
        w.writer.put_many([reading(n, 2**70 if n == 5 else n) for n in range(10)])
        for _ in range(10):
            assert settled.acquire(timeout=30), f"the writer stalled: {w.status()}"
    finally:
        w.stop()
    assert [n for n, why in sorted(outcomes.items()) if why is not None] == [5]
    assert "the store cannot take it" in (outcomes[5] or "")
    assert sorted(v for _, v in stored_readings(sqlite)) == [n for n in range(10) if n != 5]
    (letter,) = w.dead_letters.entries("air")
    assert orjson.loads(letter.payload) == {"n": 5}


def test_readings_stamped_at_receipt_are_all_written(sqlite: Store, tmp_path: Path) -> None:
    """A mapping without message_id and timestamp: a device's readings that arrive together
    (a backlog) are each written; keyed by the millisecond of receipt, most were dropped as
    repeats."""
    mapping = {k: v for k, v in MAPPING.items() if k not in ("message_id", "timestamp")}
    config = IngestSettings.model_validate(
        {
            "sources": [{"name": "air", "adapter": "http", "options": {}, "mapping": mapping}],
            "writer": {"max_delay_ms": 50},
        }
    )
    w = IngestWorker(bank_with_history(sqlite), config, DeadLetters(tmp_path / "dl.db"))
    w.start()
    try:
        assert _feed(w, [message(n, devices=1) for n in range(100)]) == [None] * 100
    finally:
        w.stop()
    assert sorted(v for _, v in stored_readings(sqlite)) == list(range(100))
    assert w.writer.stats.duplicates == 0


def test_an_unexpected_error_mapping_a_message_is_a_dead_letter(
    sqlite: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The net under every adapter: an error nobody foresaw (here one made to happen) keeps
    the message as a dead letter and the adapter goes on. Uncaught, an OverflowError of the
    mapping ended the MQTT reader thread."""
    w = _worker(sqlite, tmp_path)
    intake = w.intakes["air"]
    apply = intake.mapping.apply

    def failing(payload: Any, **kw: Any) -> Any:
        if payload.get("n") == 3:
            raise OverflowError("date value out of range")
        return apply(payload, **kw)

    monkeypatch.setattr(intake.mapping, "apply", failing)
    w.start()
    try:
        outcomes = _feed(w, [message(n) for n in range(6)])
    finally:
        w.stop()
    assert [n for n, why in enumerate(outcomes) if why is not None] == [3]
    assert "internal error" in (outcomes[3] or "") and "OverflowError" in (outcomes[3] or "")
    assert sorted(v for _, v in stored_readings(sqlite)) == [0, 1, 2, 4, 5]
    (letter,) = w.dead_letters.entries("air")
    assert orjson.loads(letter.payload)["n"] == 3


def test_the_intake_builds_what_the_request_parser_builds() -> None:
    """The intake's own stored form of a mapped update equals the general parser's."""
    from cityward.bank.jsonld import ContextResolver
    from cityward.bank.model import EntityParser
    from cityward.ingest.adapters import Intake
    from cityward.ingest.mapping import Mapping, MappingConfig

    config = MappingConfig.model_validate(
        {
            "entity_type": "AirQualityObserved",
            "id": "urn:ngsi-ld:AirQualityObserved:{$.dev}",
            "timestamp": {"path": "$.ts", "format": "epoch_s"},
            "location": {"lon": "$.gps[0]", "lat": "$.gps[1]"},
            "attributes": {
                "no2": {"path": "$.no2", "unit": "GQ"},
                "count": {"path": "$.c", "kind": "integer"},
                "status": {"path": "$.s", "kind": "string"},
                "ok": {"path": "$.ok", "kind": "boolean"},
            },
        }
    )
    parser = EntityParser(ContextResolver(allow_fetch=False).core)
    got: list[Any] = []

    class Catch:
        def put(self, reading: Any, timeout: float | None = None) -> bool:
            got.append(reading.fragment)
            return True

        pending = 0

        def wait_idle(self, timeout: float) -> bool:
            return True

    intake = Intake("t", Mapping(config), Catch(), None, parser)  # type: ignore[arg-type]
    msg = {
        "dev": "a1",
        "ts": 1_790_000_000,
        "gps": [3.7, 51.0],
        "no2": "4.5",
        "c": 3,
        "s": 7,
        "ok": True,
    }
    intake.receive(orjson.dumps(msg))
    update = Mapping(config).apply(msg)
    assert got == [parser.entity(update.fragment(), "create")]


@pytest.mark.postgres
def test_nodes_starting_together_on_a_new_database() -> None:
    """Several processes creating their tables at once on a new PostgreSQL schema (an ingest
    writer, an API node...) must not trip over each other in the catalog."""
    import uuid

    from cityward.bank.jsonld import ContextResolver
    from cityward.bank.store.postgres import PostgresStore
    from cityward.bank.subscriptions.service import Subscriptions
    from cityward.bus.feed import ChangeOutbox
    from cityward.config import GovernanceSettings
    from cityward.governance.identity import Identities
    from cityward.ingest.writer import create_tables
    from tests.conftest import PG_URL

    schema = f"test_{uuid.uuid4().hex[:12]}"
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    stores: list[PostgresStore] = []

    def node(tmp: Path) -> None:
        try:
            barrier.wait(10)
            store = PostgresStore(PG_URL, schema=schema, max_size=2)
            stores.append(store)
            bank = bank_with_history(store)
            Subscriptions(store, bank, ContextResolver(allow_fetch=False))
            Identities(GovernanceSettings(), tmp, store)
            ChangeOutbox(store)
            create_tables(store)
        except BaseException as exc:
            errors.append(exc)

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        threads = [threading.Thread(target=node, args=(Path(tmp) / str(n),)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    try:
        assert errors == []
    finally:
        for s in stores[1:]:
            s.close()
        if stores:
            drop_pg_store(stores[0])


def _keys(store: Store) -> list[tuple[str, int]]:
    return [(str(k), int(at)) for k, at in store.select("SELECT key, at FROM ingest_keys", [])]


def _add_keys(store: Store, keys: list[tuple[str, int]], *sql: str) -> None:
    """Put delivery keys (key, at) of the source "air" in the key table, after ``sql``."""
    with store.write("", create_tenant=True) as txn:
        for statement in sql:
            txn.execute(statement)
        for key, at in keys:
            txn.execute(
                "INSERT INTO ingest_keys (source, key, at) VALUES (?, ?, ?)", ["air", key, at]
            )


def test_old_keys_are_forgotten_a_step_at_a_time_counted_from_the_newest(
    store: Store, tmp_path: Path
) -> None:
    w = _worker(store, tmp_path)
    # 25 keys of long ago, 10 of later, 5 of the newest time (all long before today's clock)
    ages = [1000] * 25 + [5000] * 10 + [9000] * 5
    _add_keys(store, [(f"m:{n}", at) for n, at in enumerate(ages)])
    # window 3600 s back from the newest key (9000): the 35 keys before 5400 go, 10 a step
    left = [w.writer._purge_step(3600, rows=10) for _ in range(4)]
    assert left == [True, True, True, False]
    assert sorted(at for _, at in _keys(store)) == [9000] * 5
    # the clock is days past every key, but nothing else is older than the window: a worker
    # that was stopped keeps the keys of its last writes (their redelivery is a repeat)
    assert w.writer._purge_step(3600, rows=10) is False
    assert len(_keys(store)) == 5
    # the tick between batches does the same, once a newer key moves the window on
    _add_keys(store, [("m:new", 12601)])
    w.writer._purged_at = 0.0
    w.writer._maybe_purge()
    assert _keys(store) == [("m:new", 12601)]


def test_a_message_stored_under_the_earlier_key_form_is_still_a_repeat(
    store: Store, tmp_path: Path
) -> None:
    from cityward.ingest.mapping import Mapping, MappingConfig
    from cityward.ingest.settings import IngestSettings
    from cityward.ingest.writer import KEYS_SQL
    from tests.ingest.helpers import MAPPING

    by_time = {k: v for k, v in MAPPING.items() if k != "message_id"}  # keys: entity and time
    upd = Mapping(MappingConfig.model_validate(by_time)).apply(message(1))
    assert upd.message_key.startswith("o:")
    # a key table as an earlier version left it: the key of message 1 in the form t:<id>@<time>
    _add_keys(store, [(f"t:{upd.entity_id}@{upd.observed_at}", 5000)], *KEYS_SQL[:2])
    conf = IngestSettings.model_validate(
        {
            "sources": [{"name": "air", "adapter": "http", "options": {}, "mapping": by_time}],
            "writer": {"max_delay_ms": 20},
        }
    )
    w = IngestWorker(bank_with_history(store), conf, DeadLetters(tmp_path / "dl.db"))
    assert w.writer._legacy_until == 5000
    w.start()
    try:
        # message 1 again (a redelivery across the upgrade) and message 2, new
        assert _feed(w, [message(1), message(2)]) == [None, None]
    finally:
        w.stop()
    assert stored_readings(store) == [("urn:ngsi-ld:AirQualityObserved:s2", 2.0)]
    assert w.writer.stats.duplicates == 1 and w.writer.stats.written == 1
    # the keys just written are today's: the earlier one (at 5000) falls out of the window,
    # and with it the last key of the earlier form, which is then not looked up any more
    assert w.writer._purge_step(3600) is False
    assert w.writer._legacy_until is None
    assert sorted(k[:2] for k, _ in _keys(store)) == ["o:", "o:"]
    again = IngestWorker(bank_with_history(store), conf, DeadLetters(tmp_path / "dl2.db"))
    assert again.writer._legacy_until is None


def test_a_new_key_table_has_no_keys_of_the_earlier_form(store: Store, tmp_path: Path) -> None:
    w = _worker(store, tmp_path)
    assert w.writer._legacy_until is None
    rows = store.select("SELECT k, v FROM ingest_meta", [])
    assert [(str(k), int(v)) for k, v in rows] == [("form", 2)]
