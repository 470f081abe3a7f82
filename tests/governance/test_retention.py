"""Retention deletes exactly the history past each source's retention, on both backends."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from cityward.bank.history import History, settle
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.temporal.times import us_to_datetime
from cityward.governance.events import Action, AuditRecord
from cityward.governance.retention import Retention
from cityward.governance.sources import UNDECLARED, Catalog, DataSource

NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC)
CORE = ContextResolver(allow_fetch=False).core
AIR = "urn:ngsi-ld:AirQualityObserved:A1"
CAM = "urn:ngsi-ld:Camera:C1"
CAM_AIR = "urn:ngsi-ld:Camera:C2"  # an air type, but the camera id pattern wins
NOISE_AIR = "urn:ngsi-ld:Mixed:M1"  # types of two sources: the first one decides (noise)
AIR_NOISE = "urn:ngsi-ld:Mixed:M2"  # (air)
THING = "urn:ngsi-ld:Thing:T1"  # undeclared
GONE = "urn:ngsi-ld:AirQualityObserved:GONE"  # deleted later: its history is undeclared
# alerts derived from a source belong to it, whatever their type (air's here)
FROM_CAMS = "urn:ngsi-ld:Alert:from:cams:X1"
FROM_NOISE = "urn:ngsi-ld:Alert:from:noise:X2"
FROM_NOWHERE = "urn:ngsi-ld:Alert:from:removed-source:X3"  # no such source: undeclared


class ListSink:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def record_nowait(self, rec: AuditRecord) -> None:
        self.records.append(rec)


def source(sid: str, retention: str, **kw: Any) -> DataSource:
    return DataSource(
        id=sid,
        name=sid,
        purposes=("test",),
        legal_basis="test",
        owner="test",
        retention=retention,
        **kw,
    )


def catalog() -> Catalog:
    sources = [
        source("air", "P1Y", types=("AirQualityObserved",)),
        source("cams", "P90D", id_patterns=(r"urn:ngsi-ld:Camera:.*",)),
        source("noise", "P2Y", types=("NoiseLevelObserved",)),
    ]
    expand = {t: CORE.expand(t) for s in sources for t in s.types}
    return Catalog(sources, expand)


def cutoffs() -> dict[str, datetime]:
    return {
        "air": NOW.replace(year=NOW.year - 1),
        "cams": NOW - timedelta(days=90),
        "noise": NOW.replace(year=NOW.year - 2),
        UNDECLARED: NOW - timedelta(days=30),
    }


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_city(store: Store) -> Bank:
    """Entities of every kind with history every 20 days over the past 3 years."""
    bank = Bank(store)
    History(store, bank)
    parser = EntityParser(CORE)
    kinds = {
        AIR: ["AirQualityObserved"],
        CAM: ["Device"],
        CAM_AIR: ["AirQualityObserved"],
        NOISE_AIR: ["NoiseLevelObserved", "AirQualityObserved"],
        AIR_NOISE: ["AirQualityObserved", "NoiseLevelObserved"],
        THING: ["Thing"],
        GONE: ["AirQualityObserved"],
        FROM_CAMS: ["AirQualityObserved"],
        FROM_NOISE: ["Thing"],
        FROM_NOWHERE: ["AirQualityObserved"],
    }
    start = NOW - timedelta(days=3 * 365)
    step = 0
    while (t := start + timedelta(days=20 * step, hours=step % 24)) < NOW:
        stamp = iso(t)
        docs = [
            parser.entity(
                {
                    "id": eid,
                    "type": types,
                    "reading": {"type": "Property", "value": step, "observedAt": stamp},
                    # a second attribute, two instances: several paths and datasetIds
                    "level": [
                        {"type": "Property", "value": step * 2, "observedAt": stamp},
                        {
                            "type": "Property",
                            "value": step * 3,
                            "observedAt": stamp,
                            "datasetId": "urn:ngsi-ld:Dataset:b",
                        },
                    ],
                }
            )
            for eid, types in kinds.items()
        ]
        bank.batch_upsert("", docs, "update")
        # the same id in another tenant: a different entity, retention covers it too
        other = parser.entity(
            {
                "id": AIR,
                "type": "AirQualityObserved",
                "reading": {"type": "Property", "value": step, "observedAt": stamp},
            }
        )
        bank.batch_upsert("city2", [other], "update")
        step += 1
    bank.delete("", GONE)
    return bank


def history(store: Store) -> dict[int, tuple[str, datetime]]:
    """Every history row: id -> (expected source id, obs)."""
    settle(store)
    cat = catalog()
    ents = {
        int(pk): (eid, doc)
        for pk, eid, doc in store.select("SELECT pk, eid, doc FROM entities", [])
    }
    out: dict[int, tuple[str, datetime]] = {}
    for rid, e, obs in store.select("SELECT id, e, obs FROM attr_history", []):
        when = us_to_datetime(obs) if isinstance(obs, int) else obs
        ent = ents.get(int(e))
        if ent is None:
            sid = UNDECLARED
        else:
            sid = cat.source_of(ent[0], orjson.loads(ent[1])["type"]).id
        out[int(rid)] = (sid, when)
    return out


def test_retention_deletes_exactly_the_expired_rows(store: Store) -> None:
    write_city(store)
    before = history(store)
    cuts = cutoffs()
    expired = {rid for rid, (sid, obs) in before.items() if obs < cuts[sid]}
    kept = set(before) - expired
    by_source = {sid: 0 for sid in cuts}
    for rid in expired:
        by_source[before[rid][0]] += 1
    # every source has rows on both sides of its cutoff, so the test can fail both ways
    for sid in cuts:
        assert by_source[sid] > 0, sid
        assert any(s == sid for s, _ in (before[r] for r in kept)), sid

    sink = ListSink()
    retention = Retention(store, catalog(), sink, batch=7)
    report = retention.run_once(now=NOW)

    after = {int(r[0]) for r in store.select("SELECT id FROM attr_history", [])}
    assert after == kept
    assert report.deleted == by_source
    assert report.total == len(expired)
    assert report.cutoffs == cuts
    assert not report.interrupted and report.error is None

    assert len(sink.records) == 1
    rec = sink.records[0]
    assert rec.action is Action.RETENTION and rec.actor == "cityward"
    assert rec.count == len(expired)
    assert rec.extra == {**by_source, "partitions_dropped": report.partitions_dropped}

    if store.dialect == "postgres":
        # the oldest cutoff is noise's 2 years: whole months before it go as partitions
        assert "attr_history_p202304" in report.partitions_dropped
        assert "attr_history_p202303" in report.partitions_dropped
        assert all(p < "attr_history_p202403" for p in report.partitions_dropped)
        assert report.partition_rows > 0
        assert store.select("SELECT to_regclass('attr_history_p202304')", []) == [(None,)]
        assert store.select("SELECT to_regclass('attr_history_p202503')", []) != [(None,)]
    else:
        assert report.partitions_dropped == []

    # a second run finds nothing more, and is audited all the same
    again = retention.run_once(now=NOW)
    assert again.total == 0
    assert len(sink.records) == 2 and sink.records[1].count == 0
    assert {int(r[0]) for r in store.select("SELECT id FROM attr_history", [])} == kept


def test_concurrent_runs_delete_each_row_once(store: Store) -> None:
    """Two retention workers (as in two processes) at once: same result, rows counted once."""
    write_city(store)
    before = history(store)
    cuts = cutoffs()
    kept = {rid for rid, (sid, obs) in before.items() if obs >= cuts[sid]}
    expected = {sid: 0 for sid in cuts}
    for rid, (sid, _) in before.items():
        if rid not in kept:
            expected[sid] += 1
    sinks = [ListSink(), ListSink()]
    workers = [Retention(store, catalog(), sink, batch=5) for sink in sinks]
    reports: list[Any] = []
    errors: list[BaseException] = []

    def run(w: Retention) -> None:
        try:
            reports.append(w.run_once(now=NOW))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert {int(r[0]) for r in store.select("SELECT id FROM attr_history", [])} == kept
    total = {sid: sum(r.deleted[sid] for r in reports) for sid in cuts}
    assert total == expected
    dropped = [p for r in reports for p in r.partitions_dropped]
    assert len(dropped) == len(set(dropped))
    assert all(len(s.records) == 1 for s in sinks)


def test_scheduler_runs_and_stops_promptly(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    sink = ListSink()
    retention = Retention(store, catalog(), sink)
    retention.start(interval_s=0.05)
    deadline = time.monotonic() + 5
    while len(sink.records) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) >= 2, "the scheduler did not run twice (interval 0.05 s) in 5 s"
    retention.stop()
    assert not retention.running
    assert not any(t.name == "cityward-retention" for t in threading.enumerate())
    n = len(sink.records)
    time.sleep(0.15)
    assert len(sink.records) == n
    # promptly: stop() wakes the scheduler out of its wait between runs instead of letting
    # the interval run out. With an hour's interval the thread can only have ended within
    # stop()'s join (10 s, against microseconds expected) if it was woken: no stopwatch.
    retention.start(interval_s=3600)
    deadline = time.monotonic() + 5
    while len(sink.records) < n + 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sink.records) == n + 1, "a restarted scheduler did not run at once"
    with caplog.at_level(logging.WARNING, logger="cityward.governance.retention"):
        retention.stop(timeout_s=10)
    alive = [t for t in threading.enumerate() if t.name == "cityward-retention"]
    assert not alive, "stop() did not wake the scheduler from its 3600 s wait"
    assert "did not stop" not in caplog.text
    assert not retention.running
    # a direct run after stop() works normally
    assert not retention.run_once(now=NOW).interrupted


def _raw(path: Path) -> bytes:
    data = b""
    for f in (path, path.with_name(path.name + "-wal")):
        if f.exists():
            data += f.read_bytes()
    return data


def test_sqlite_deleted_values_leave_no_bytes_behind(tmp_path: Path) -> None:
    path = tmp_path / "bank.db"
    store = SqliteStore(path)
    bank = Bank(store)
    History(store, bank)
    parser = EntityParser(CORE)

    def secret(n: int) -> str:
        return f"SECRET-RETAINED-XYZ-{n:03d}-END"

    # ten values of one camera, 200 down to 20 days old: cams keep 90 days
    ages = [200 - 20 * n for n in range(10)]
    for n, age in enumerate(ages):
        body = {
            "id": CAM,
            "type": "Device",
            "note": {
                "type": "Property",
                "value": secret(n),
                "observedAt": iso(NOW - timedelta(age)),
            },
        }
        bank.batch_upsert("", [parser.entity(body)], "update")
    old = [n for n, age in enumerate(ages) if age > 90]
    recent = [n for n, age in enumerate(ages) if age < 90]
    assert old and recent

    sink = ListSink()
    report = Retention(store, catalog(), sink, batch=3).run_once(now=NOW)
    assert report.deleted["cams"] == len(old)
    raw = _raw(path)
    for n in old:
        assert secret(n).encode() not in raw, n
    store.close()
    raw = _raw(path)
    for n in old:
        assert secret(n).encode() not in raw, n
    for n in recent:
        assert secret(n).encode() in raw, n
    assert len(sink.records) == 1


def test_history_stamped_in_the_future_goes_once_received_past_retention(store: Store) -> None:
    """observedAt is the client's word: a row is deleted once observed or received (modified)
    before its cutoff. ``created`` (the instance's first createdAt) decides nothing."""
    bank = Bank(store)
    History(store, bank)
    parser = EntityParser(CORE)
    noise = "urn:ngsi-ld:NoiseLevelObserved:N1"
    t0 = datetime.now(UTC)  # the bank stamps the real time as the time it received a value
    future = "2099-01-01T00:00:00Z"
    for eid, kind, stamps in [
        (AIR, "AirQualityObserved", [iso(t0), future]),
        (noise, "NoiseLevelObserved", [future]),
    ]:
        for stamp in stamps:
            body = {
                "id": eid,
                "type": kind,
                "reading": {"type": "Property", "value": stamp, "observedAt": stamp},
            }
            bank.batch_upsert("", [parser.entity(body)], "update")
    settle(store)
    pk = {eid: int(p) for p, eid in store.select("SELECT pk, eid FROM entities", [])}

    def rows() -> set[tuple[str, str]]:
        out = set()
        for e, inst in store.select("SELECT e, inst FROM attr_history", []):
            eid = next(k for k, v in pk.items() if v == int(e))
            out.add((eid, orjson.loads(inst)["value"]))
        return out

    assert rows() == {(AIR, iso(t0)), (AIR, future), (noise, future)}
    # a long-lived attribute: its instance was first created long ago (air keeps a year)
    old = t0 - timedelta(days=800)
    store_old: Any = old if store.dialect == "postgres" else int(old.timestamp() * 1_000_000)
    with store.write("", create_tenant=False) as txn:
        txn.execute("UPDATE attr_history SET created = ?", [store_old])

    retention = Retention(store, catalog(), ListSink())
    report = retention.run_once(now=t0 + timedelta(days=1))
    assert report.total == 0  # received and observed within every retention
    assert rows() == {(AIR, iso(t0)), (AIR, future), (noise, future)}

    # 400 days on: air (P1Y) drops both of its rows, the future one as received 400 days ago;
    # noise (P2Y) keeps its own
    report = retention.run_once(now=t0 + timedelta(days=400))
    assert report.deleted["air"] == 2
    assert report.total == 2
    assert rows() == {(noise, future)}
    # ... until it too was received longer ago than its retention
    report = retention.run_once(now=t0 + timedelta(days=2 * 366 + 1))
    assert report.deleted["noise"] == 1 and rows() == set()


def test_a_retention_reaching_before_year_one_keeps_everything_and_spares_the_run(
    store: Store,
) -> None:
    """The configuration takes retentions up to 10,000 years (an archive kept for good):
    P5000Y, or P1000000D, put the cutoff before year 1 and every run raised before deleting
    anything, of any source, unaudited."""
    write_city(store)
    before = history(store)
    for forever in ("P5000Y", "P1000000D", "P9999Y"):
        sources = [
            source("air", forever, types=("AirQualityObserved",)),
            source("cams", "P90D", id_patterns=(r"urn:ngsi-ld:Camera:.*",)),
        ]
        cat = Catalog(sources, {"AirQualityObserved": CORE.expand("AirQualityObserved")})
        sink = ListSink()
        report = Retention(store, cat, sink).run_once(now=NOW)
        assert report.error is None and len(sink.records) == 1, forever
        assert report.cutoffs["air"] == datetime(1, 1, 1, tzinfo=UTC), forever
    after = {int(r[0]) for r in store.select("SELECT id FROM attr_history", [])}
    cams = {rid for rid, (sid, obs) in before.items() if sid == "cams"}
    expired = {rid for rid in cams if before[rid][1] < NOW - timedelta(days=90)}
    assert expired and not expired & after  # the other source's expired rows went
    air = {rid for rid, (sid, _) in before.items() if sid == "air"}
    assert air <= after  # and the archive kept all of its own


def test_a_deleted_entitys_history_goes_after_the_shortest_retention(store: Store) -> None:
    """Orphaned history followed the undeclared source's retention (30 days): a deleted
    entity's values of a 7-day source stayed 30 days, longer than the register says."""
    write_city(store)  # GONE: an air-quality entity deleted, its history left
    before = history(store)
    gone = {rid: obs for rid, (sid, obs) in before.items() if sid == UNDECLARED}
    gone_ids = {
        int(r[0])
        for r in store.select(
            "SELECT id FROM attr_history WHERE e NOT IN (SELECT pk FROM entities)", []
        )
    }
    assert gone_ids and gone_ids <= set(gone)
    sources = [
        source("air", "P1Y", types=("AirQualityObserved",)),
        source("short", "P7D", types=("Thing",)),
    ]
    cat = Catalog(sources, {t: CORE.expand(t) for s in sources for t in s.types})
    Retention(store, cat, ListSink()).run_once(now=NOW)
    after = {int(r[0]) for r in store.select("SELECT id FROM attr_history", [])}
    assert not {rid for rid in gone_ids if gone[rid] < NOW - timedelta(days=7)} & after
    kept = {rid for rid in gone_ids if gone[rid] >= NOW - timedelta(days=7)}
    assert kept <= after


def test_a_history_row_in_the_last_month_of_year_9999_spares_the_run(store: Store) -> None:
    """One forged observedAt in 9999-12 gives PostgreSQL the partition attr_history_p999912,
    whose end (year 10000) no datetime holds: every run raised before deleting anything."""
    bank = Bank(store)
    History(store, bank)
    parser = EntityParser(CORE)
    for stamp in ("2020-01-15T00:00:00Z", "2026-01-20T00:00:00Z", "9999-12-15T00:00:00Z"):
        reading = {"type": "Property", "value": stamp, "observedAt": stamp}
        body = {"id": THING, "type": "Thing", "r": reading}
        bank.batch_upsert("", [parser.entity(body)], "update")
    settle(store)
    sink = ListSink()
    report = Retention(store, catalog(), sink).run_once(now=NOW)  # undeclared: 30 days
    assert report.error is None and len(sink.records) == 1
    assert report.deleted[UNDECLARED] == 2
    left = [orjson.loads(r[0])["value"] for r in store.select("SELECT inst FROM attr_history")]
    assert left == ["9999-12-15T00:00:00Z"]  # received now: within retention
    if store.dialect == "postgres":
        assert report.partitions_dropped == ["attr_history_p202001"]
