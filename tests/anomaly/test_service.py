"""The anomaly service on a real SQLite data bank and its real change feed.

Entities are written through the bank (as ingestion does); the service follows the feed on
its own thread and writes Alert entities back; the tests read them from the bank.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.anomaly.detectors import create
from cityward.anomaly.service import ALERT_ID_PREFIX, SERVICE_ID, AnomalyService, ConfigurationError
from cityward.anomaly.settings import (
    DEFAULT_CLOSE_AFTER,
    DEFAULT_WARMUP,
    AnomalySettings,
    DetectorWatch,
    TrafficIncidentWatch,
    local_name,
)
from cityward.api.app import create_app
from cityward.bank.changes import Change
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.config import GovernanceSettings, Settings
from cityward.governance.policy import Role
from cityward.governance.sources import DataSource
from tests.conftest import shared_path

PARSER = EntityParser(ContextResolver(allow_fetch=False).core)
FLOW = "TrafficFlowObserved"
SENSOR = "urn:ngsi-ld:TrafficFlowObserved:loop-1"
STEP = timedelta(minutes=5)
T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday


@pytest.fixture
def bank(store: Store) -> Bank:
    """A bank on each backend (SQLite and PostgreSQL: the ``store`` fixture)."""
    return Bank(store)


def iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def observe(bank: Bank, eid: str, t: datetime | None, **values: Any) -> None:
    """Write one reading of a road sensor (attributes with observedAt ``t``), as an ingestion
    upsert does."""
    entity: dict[str, Any] = {"id": eid, "type": FLOW}
    for name, value in values.items():
        attr: dict[str, Any] = {"type": "Property", "value": value}
        if t is not None:
            attr["observedAt"] = iso(t)
        entity[name] = attr
    result = bank.batch_upsert("", [PARSER.entity(entity)], "update")
    assert not result.errors, result.errors


def alerts(bank: Bank) -> list[dict[str, Any]]:
    """Every Alert in the bank, attributes by short name (values, objects, @value of dates)."""
    out = []
    for doc in bank.store.iter_docs(""):
        if local_name(doc["type"][0]) != "Alert":
            continue
        flat: dict[str, Any] = {"id": doc["id"]}
        for iri, instances in doc["attrs"].items():
            inst = instances[0]
            value = inst.get("object", inst.get("value"))
            if isinstance(value, dict) and "@value" in value:
                value = value["@value"]
            flat[local_name(iri)] = value
        out.append(flat)
    return out


def when(value: str) -> datetime:
    return datetime.fromisoformat(value)


def speed_watch(**overrides: Any) -> DetectorWatch:
    return DetectorWatch(entity_type=FLOW, attribute="averageVehicleSpeed", **overrides)


#: the windowed Gaussian with its own settings: a smooth tail-probability score, no warm-up
#: of its own and no dead time, read with the service's own defaults (0.999, high 0.99999,
#: runs of 3). The tests of the service's machinery pin it, so that their counts and timings
#: stay exact whatever the platform's default detector is (the ensemble, since it became the
#: default, learns 150 values before scoring and is quiet after an alarm).
GAUSSIAN: dict[str, Any] = {
    "detector": "windowed-gaussian",
    "detector_config": {"window": 6400, "step": 100},
}


def gaussian_watch(**overrides: Any) -> DetectorWatch:
    return speed_watch(**GAUSSIAN, **overrides)


def run_service(
    bank: Bank, *watches: DetectorWatch | TrafficIncidentWatch, **kw: Any
) -> AnomalyService:
    service = AnomalyService(bank, AnomalySettings(enabled=True, watches=list(watches), **kw))
    service.start()
    return service


def normal_speed(rng: random.Random, t: datetime) -> float:
    """A road's speed: a daily pattern (slower at rush hours) plus noise."""
    h = t.hour + t.minute / 60
    rush = math.exp(-((h - 8) ** 2) / 2) + math.exp(-((h - 17) ** 2) / 2)
    return round(55 - 12 * rush + rng.gauss(0, 2), 2)


# -- one incident, one alert ---------------------------------------------------------------
def test_one_incident_raises_one_alert_and_closes_it(bank: Bank) -> None:
    # the hysteresis itself (a run of 3 opens, 6 normal points close, exact validFrom and
    # validTo): the windowed Gaussian pinned (see GAUSSIAN)
    rng = random.Random(1)
    service = run_service(bank, gaussian_watch())
    try:
        t = T0
        for _ in range(300):
            observe(bank, SENSOR, t, averageVehicleSpeed=normal_speed(rng, t))
            t += STEP
        incident_start = t
        for _ in range(12):  # speed collapses for an hour
            observe(bank, SENSOR, t, averageVehicleSpeed=round(8 + rng.gauss(0, 1), 2))
            t += STEP
        recovered = t
        for _ in range(60):
            observe(bank, SENSOR, t, averageVehicleSpeed=normal_speed(rng, t))
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()

    found = alerts(bank)
    assert len(found) == 1, found
    alert = found[0]
    assert alert["id"].startswith(ALERT_ID_PREFIX)
    assert alert["alertSource"] == SENSOR
    assert alert["category"] == "traffic"
    assert alert["alertStatus"] == "closed"
    assert alert["dataProvider"] == SERVICE_ID
    assert alert["anomalousProperty"] == "averageVehicleSpeed"
    assert when(alert["validFrom"]) == incident_start
    assert when(alert["validTo"]) == recovered
    assert alert["severity"] in ("medium", "high")
    assert alert["anomalyScore"] >= 0.999
    assert "averageVehicleSpeed" in alert["description"]
    assert "sigma below expected" in alert["description"]
    assert alert["data"]["watch"] == "TrafficFlowObserved-averageVehicleSpeed"
    assert alert["data"]["detector"] == "windowed-gaussian"
    assert alert["data"]["threshold"] == 0.999
    stats = service.snapshot()
    # open and close: one write each, or one when both fell in the same batch
    assert (stats.opened, stats.closed, stats.lost_writes, stats.errors) == (1, 1, 0, 0)
    assert 1 <= stats.writes <= 2


class Mirrored:
    """Writes speeds of SENSOR into the bank and feeds the same values to a detector of the
    watch's settings: what the service's stream sees, as (time, score, level)."""

    def __init__(self, bank: Bank, watch: DetectorWatch) -> None:
        self.bank = bank
        self.reference = create(watch.detector, watch.detector_config)
        self.seen: list[tuple[datetime, float, float]] = []

    def feed(self, t: datetime, x: float) -> None:
        observe(self.bank, SENSOR, t, averageVehicleSpeed=x)
        ts = t.timestamp()
        r = self.reference
        self.seen.append((t, r.score_one(x, ts), r.level(x, ts)))
        r.learn_one(x, ts)


def test_an_incident_longer_than_the_dead_time_is_one_alert(bank: Bank) -> None:
    # the ensemble alarms once, then is quiet for dead_time values whatever it sees: the open
    # alert must live on its level (the score with the quiet set aside), neither closing in
    # the quiet nor opening a second alert when the detector alarms again after it
    dead_time = 8
    watch = speed_watch(detector="ensemble", detector_config={"dead_time": dead_time})
    threshold, _, clear = watch.levels
    assert (threshold, clear, watch.opens_after) == (0.5, 0.5, 1)  # the ensemble's own
    rng = random.Random(7)
    mirror = Mirrored(bank, watch)
    feed, seen = mirror.feed, mirror.seen

    service = run_service(bank, watch)
    try:
        t = T0
        for _ in range(2 * 288):  # two days of normal (the time-of-day view takes part)
            feed(t, normal_speed(rng, t))
            t += STEP
        incident_start = t
        for _ in range(12):  # speed collapses for an hour: longer than the dead time
            feed(t, round(8 + rng.gauss(0, 1), 2))
            t += STEP
        assert service.wait_idle()
        (alert,) = alerts(bank)
        assert alert["alertStatus"] == "open", "closed while the values are still anomalous"
        assert when(alert["validFrom"]) == incident_start
        assert [i.alert_id for i in service.open_alerts().values()] == [alert["id"]]
        recovered = t
        for _ in range(40):
            feed(t, normal_speed(rng, t))
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()

    # the premise: the detector's score alone would have closed the incident in the quiet
    # (close_after points below clear) and opened a second alert when it alarmed again
    during = [(score, level) for at, score, level in seen if incident_start <= at < recovered]
    assert all(level >= threshold for _, level in during), "the incident, as the detector sees it"
    assert during[0][0] >= threshold  # the alarm, at the first point
    assert all(score == 0.0 for score, _ in during[1 : dead_time + 1])  # then quiet
    assert dead_time >= watch.close_after
    assert any(score >= threshold for score, _ in during[dead_time + 1 :]), "alarms again"
    # one alert, closed at the first of close_after normal levels after the incident
    after = [(at, level) for at, _, level in seen if at >= recovered]
    first_normal = next(
        i
        for i in range(len(after))
        if all(level < clear for _, level in after[i : i + watch.close_after])
    )
    (closed,) = alerts(bank)
    assert closed["id"] == alert["id"]
    assert closed["alertStatus"] == "closed"
    assert closed["data"]["closed"] == "normal again"
    assert when(closed["validTo"]) == after[first_normal][0]
    assert recovered <= when(closed["validTo"]) <= recovered + 3 * STEP
    assert closed["data"]["detector"] == "ensemble"
    assert closed["data"]["threshold"] == 0.5
    stats = service.snapshot()
    assert (stats.opened, stats.closed, stats.errors) == (1, 1, 0)


def test_normal_stream_raises_no_alert(bank: Bank) -> None:
    rng = random.Random(2)
    service = run_service(bank, speed_watch())
    try:
        t = T0
        for _ in range(600):  # two days and a bit, daily pattern and noise
            observe(bank, SENSOR, t, averageVehicleSpeed=normal_speed(rng, t))
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()
    assert alerts(bank) == []
    stats = service.snapshot()
    assert stats.points == 600
    assert stats.opened == 0


# -- restart -------------------------------------------------------------------------------
def open_one_alert(
    bank: Bank,
    watch: DetectorWatch,
    normal: Callable[[datetime], float],
    n: int,
    t: datetime,
    before: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], datetime, AnomalyService]:
    """A service run of ``n`` normal readings from ``t`` (``before(i)`` called ahead of the
    i-th), then an incident it is stopped in: the alert left open, the time after it, and the
    stopped service."""
    service = run_service(bank, watch)
    try:
        for i in range(n):
            if before is not None:
                before(i)
            observe(bank, SENSOR, t, averageVehicleSpeed=normal(t))
            t += STEP
        for _ in range(5):
            observe(bank, SENSOR, t, averageVehicleSpeed=5.0)
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()
    (opened,) = alerts(bank)
    assert opened["alertStatus"] == "open"
    return opened, t, service


def test_restart_does_not_duplicate_an_open_alert(bank: Bank) -> None:
    rng = random.Random(3)
    opened, t, _ = open_one_alert(
        bank, speed_watch(), lambda t: normal_speed(rng, t), DEFAULT_WARMUP + 20, T0
    )
    second = run_service(bank, speed_watch())
    try:
        assert [i.alert_id for i in second.open_alerts().values()] == [opened["id"]]
        assert second.snapshot().restored == 1
        # a fresh detector learns the normal first (warm-up: no decision, the alert stays
        # open), then sees the incident still going on
        for _ in range(DEFAULT_WARMUP):
            observe(bank, SENSOR, t, averageVehicleSpeed=normal_speed(rng, t))
            t += STEP
        for _ in range(6):
            observe(bank, SENSOR, t, averageVehicleSpeed=5.0)
            t += STEP
        assert second.wait_idle()
        assert len(alerts(bank)) == 1, "the incident still open must not raise a second alert"
        for _ in range(DEFAULT_CLOSE_AFTER + 30):
            observe(bank, SENSOR, t, averageVehicleSpeed=normal_speed(rng, t))
            t += STEP
        assert second.wait_idle()
    finally:
        second.stop()
    (closed,) = alerts(bank)
    assert closed["id"] == opened["id"]
    assert closed["alertStatus"] == "closed"
    assert second.snapshot().opened == 0


@pytest.mark.parametrize("change", ["source deleted", "watch narrowed"])
def test_an_open_alert_whose_source_is_gone_after_a_restart_is_closed(
    bank: Bank, change: str
) -> None:
    """While the service was down the sensor was decommissioned, or the watch's id_pattern
    narrowed to leave it out: no reading of it would ever close its alert, which stayed open
    for ever."""
    rng = random.Random(1)
    watch = gaussian_watch(name="speed", warmup=50)
    start = T0 + timedelta(hours=10)
    opened, _, _ = open_one_alert(bank, watch, lambda _: round(55 + rng.gauss(0, 2), 2), 100, start)
    if change == "source deleted":
        bank.delete("", SENSOR)
    else:
        ring = "urn:ngsi-ld:TrafficFlowObserved:ring-.*"
        watch = gaussian_watch(name="speed", warmup=50, id_pattern=ring)
    second = run_service(bank, watch)
    try:
        assert second.open_alerts() == {}
        assert second.snapshot().restored == 0
    finally:
        second.stop()
    (closed,) = alerts(bank)
    assert closed["id"] == opened["id"] and closed["alertStatus"] == "closed"
    assert closed["validTo"]


def test_a_restarted_service_warms_its_streams_from_the_recorded_history(store: Store) -> None:
    """After a restart the detector first learns the attribute's recorded history: the first
    new value may already be judged (cold, it would take a day of 5-minute readings, 288
    values, before any alert), the past raises nothing, and what the history showed as normal
    stays normal."""
    from cityward.bank.history import History

    bank = Bank(store)
    History(store, bank)
    rng = random.Random(3)

    def speed() -> float:  # a steady road (the default detector's first day is plain)
        return round(50 + rng.gauss(0, 2), 2)

    t = T0
    first = run_service(bank, speed_watch())
    try:
        for _ in range(DEFAULT_WARMUP + 20):
            observe(bank, SENSOR, t, averageVehicleSpeed=speed())
            t += STEP
        assert first.wait_idle()
    finally:
        first.stop()
    assert alerts(bank) == []

    second = run_service(bank, speed_watch())
    try:
        for _ in range(3):
            observe(bank, SENSOR, t, averageVehicleSpeed=speed())
            t += STEP
        assert second.wait_idle()
        assert alerts(bank) == [], "the warm-up on the history alerted"
        assert second.snapshot().warmed == DEFAULT_WARMUP + 20  # all of them (< warm_start)
        observe(bank, SENSOR, t, averageVehicleSpeed=5.0)
        assert second.wait_idle()
    finally:
        second.stop()
    (alert,) = alerts(bank)
    assert alert["alertStatus"] == "open" and when(alert["validFrom"]) == t

    # without warm_start the restarted stream is blind for its warm-up
    t += STEP
    third = run_service(bank, speed_watch(name="cold"), warm_start=0)
    try:
        observe(bank, SENSOR, t, averageVehicleSpeed=5.0)
        assert third.wait_idle()
        assert third.snapshot().warmed == 0
    finally:
        third.stop()
    assert len(alerts(bank)) == 1


def test_open_alert_of_a_removed_watch_is_closed_on_start(bank: Bank) -> None:
    t = T0
    # the restart machinery: a detector that scores from its 3rd value (the windowed Gaussian
    # pinned, see GAUSSIAN), so that 20 values and one outlier open an alert
    first = run_service(bank, gaussian_watch(warmup=5, open_after=1))
    try:
        for n in range(20):
            observe(bank, SENSOR, t, averageVehicleSpeed=50.0 + n % 3)
            t += STEP
        observe(bank, SENSOR, t, averageVehicleSpeed=500.0)
        assert first.wait_idle()
    finally:
        first.stop()
    assert [a["alertStatus"] for a in alerts(bank)] == ["open"]
    other = DetectorWatch(entity_type=FLOW, attribute="occupancy")
    second = run_service(bank, other)
    second.stop()
    (alert,) = alerts(bank)
    assert alert["alertStatus"] == "closed"
    assert alert["data"]["closed"] == "watch no longer configured"


# -- bad input -----------------------------------------------------------------------------
def test_malformed_values_are_counted_not_fatal(bank: Bank) -> None:
    rng = random.Random(4)
    # the counting of bad values, and an outlier still seen after them, at 80 values: the
    # windowed Gaussian pinned (see GAUSSIAN; the ensemble learns 150 before scoring)
    service = run_service(bank, gaussian_watch(warmup=20))
    try:
        t = T0
        for n in range(80):
            if n == 60:
                observe(bank, SENSOR, t, averageVehicleSpeed="n/a")
            elif n == 61:
                observe(bank, SENSOR, t, averageVehicleSpeed=True)
            elif n == 62:
                observe(bank, SENSOR, t, averageVehicleSpeed={"kmh": 50})
            elif n == 63:
                observe(bank, SENSOR, T0, averageVehicleSpeed=52.0)  # older than the last one
            else:
                observe(bank, SENSOR, t, averageVehicleSpeed=normal_speed(rng, t))
            t += STEP
        observe(bank, SENSOR, t, averageVehicleSpeed=500.0)  # still watching: an outlier
        observe(bank, SENSOR, None, averageVehicleSpeed=51.0)  # no observedAt: the write time
        assert service.wait_idle()
    finally:
        service.stop()
    stats = service.snapshot()
    assert stats.skipped["non-numeric value"] == 3
    assert stats.skipped["observedAt not after the previous one"] == 1
    assert stats.skipped["no observedAt (write time used)"] == 1
    assert stats.errors == 0
    assert stats.points == 80 - 4 + 2
    assert stats.opened == 1  # the outlier reaches high_threshold: one point opens
    assert len(alerts(bank)) == 1


def test_streams_are_capped_least_recently_used_first(
    bank: Bank, caplog: pytest.LogCaptureFixture
) -> None:
    service = run_service(bank, speed_watch(), max_streams=2)
    try:
        with caplog.at_level(logging.INFO, logger="cityward.anomaly"):
            for n in range(3):
                observe(bank, f"{SENSOR}-{n}", T0, averageVehicleSpeed=50.0)
            observe(bank, f"{SENSOR}-0", T0 + STEP, averageVehicleSpeed=50.0)  # evicts -1
            assert service.wait_idle()
    finally:
        service.stop()
    stats = service.snapshot()
    assert (stats.streams, stats.evicted) == (2, 2)
    assert "anomaly.max_streams" in caplog.text
    assert f"of {SENSOR}-0" in caplog.text  # forgotten, then seen again: a new stream
    assert f"of {SENSOR}-1" in caplog.text


def test_a_failed_alert_write_is_retried(bank: Bank) -> None:
    failures = {"left": 2}

    def flaky(txn: WriteTxn, changes: list[Change]) -> None:
        # a real write hook of the bank, failing the way a busy SQLite file does
        if failures["left"] and any("Alert" in t for c in changes for t in c.types):
            failures["left"] -= 1
            raise sqlite3.OperationalError("database is locked")

    bank.hooks.append(flaky)
    # the retries, on an alert opened after 20 values: the windowed Gaussian pinned (GAUSSIAN)
    service = run_service(bank, gaussian_watch(warmup=5, open_after=1), retry_interval_s=0.05)
    try:
        t = T0
        for n in range(20):
            observe(bank, SENSOR, t, averageVehicleSpeed=50.0 + n % 3)
            t += STEP
        observe(bank, SENSOR, t, averageVehicleSpeed=500.0)
        for n in range(5):  # the feed follower goes on meanwhile
            t += STEP
            observe(bank, SENSOR, t, averageVehicleSpeed=50.0 + n % 3)
        assert service.wait_idle(timeout_s=30)
    finally:
        service.stop()
    stats = service.snapshot()
    assert stats.write_failures == 2
    assert (stats.writes, stats.lost_writes, stats.errors) == (1, 0, 0)
    assert stats.points == 26
    assert [a["alertStatus"] for a in alerts(bank)] == ["open"]


# -- the traffic-incident rule -------------------------------------------------------------
def traffic(rng: random.Random, t: datetime) -> dict[str, float]:
    """A road sensor's normal readings: rush hours busier and slower, plus noise."""
    h = t.hour + t.minute / 60
    rush = math.exp(-((h - 8) ** 2) / 2) + math.exp(-((h - 17) ** 2) / 2)
    return {
        "occupancy": round(max(0.0, 0.05 + 0.25 * rush + rng.gauss(0, 0.01)), 4),
        "averageVehicleSpeed": round(55 - 30 * rush + rng.gauss(0, 2), 2),
        "intensity": max(0, round(20 + 100 * rush + rng.gauss(0, 5))),
    }


def replay_days(bank: Bank, rng: random.Random, days: float, step: timedelta) -> datetime:
    t = T0
    while t < T0 + timedelta(days=days):
        observe(bank, SENSOR, t, **traffic(rng, t))
        t += step
    return t


INCIDENT = TrafficIncidentWatch(kind="traffic-incident", entity_type=FLOW)


def test_traffic_rule_fires_on_occupancy_up_and_speed_down(bank: Bank) -> None:
    rng = random.Random(5)
    step = timedelta(minutes=10)
    service = run_service(bank, INCIDENT)
    try:
        t = replay_days(bank, rng, 2.42, step)  # Monday, Tuesday, Wednesday until ~10:00
        start = t
        for _ in range(6):  # a blockage: the queue sits on the loop, few vehicles pass
            observe(bank, SENSOR, t, occupancy=0.45, averageVehicleSpeed=9.0, intensity=4)
            t += step
        for _ in range(12):
            observe(bank, SENSOR, t, **traffic(rng, t))
            t += step
        assert service.wait_idle()
    finally:
        service.stop()
    # every reading handled (the rule's subCategory and severity once landed in the wrong
    # fields of the scored point: the hysteresis then failed on every point of an incident)
    assert service.snapshot().errors == 0
    (alert,) = alerts(bank)
    assert alert["category"] == "traffic"
    assert alert["subCategory"] == "carAccident"
    assert alert["severity"] == "high"
    assert when(alert["validFrom"]) == start
    assert alert["alertStatus"] == "closed"
    assert "occupancy" in alert["description"] and "sigma above expected" in alert["description"]
    assert "averageVehicleSpeed" in alert["description"] and "% below" in alert["description"]
    assert alert["anomalousProperty"] == "occupancy, averageVehicleSpeed, intensity"
    assert alert["data"]["rule"] == "traffic-incident"


def test_a_reading_from_a_clock_gone_wrong_does_not_stop_its_stream(bank: Bank) -> None:
    """One reading stamped 2099: scored, it made every later reading "not after the previous
    one", and the stream was blind until a restart. It is counted and left out."""
    rng = random.Random(2)

    def glitch(i: int) -> None:
        if i == 100:
            observe(bank, SENSOR, datetime(2099, 1, 1, tzinfo=UTC), averageVehicleSpeed=55.0)

    _, _, service = open_one_alert(
        bank,
        gaussian_watch(warmup=50),
        lambda _: round(55 + rng.gauss(0, 2), 2),
        200,
        T0 + timedelta(hours=10),
        before=glitch,
    )
    snap = service.snapshot()
    assert snap.skipped["observedAt far ahead of its receipt"] == 1
    assert snap.skipped["observedAt not after the previous one"] == 0
    assert [a["alertStatus"] for a in alerts(bank)] == ["open"]


def test_sentinel_values_at_the_limits_of_a_double_are_not_learnt(bank: Bank) -> None:
    """A device sending 1e308 and -1e308 (no reading): learnt, they kept the default detector
    alarming, and its alert never closed. They are counted and left out."""
    rng = random.Random(1)
    t = T0 + timedelta(hours=10)
    service = run_service(bank, speed_watch())
    try:
        for n in range(1300):
            value = {300: 1e308, 301: -1e308}.get(n, round(55 + rng.gauss(0, 2), 2))
            observe(bank, SENSOR, t, averageVehicleSpeed=value)
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()
    assert service.snapshot().skipped["value beyond any measurement"] == 2
    assert [a["alertStatus"] for a in alerts(bank)] in ([], ["closed"])


def test_a_broken_intensity_counter_leaves_the_traffic_rule_on(bank: Bank) -> None:
    """intensity is optional: when the counter stops reporting (its last value stays on the
    entity, observed ever longer ago), the rule goes on with occupancy and speed. Every reading
    was refused as "inputs observed too far apart", and the blockage raised nothing."""
    rng = random.Random(5)
    step = timedelta(minutes=10)
    service = run_service(bank, INCIDENT)
    try:
        t = replay_days(bank, rng, 2.0, step)
        for _ in range(60):  # the counter is broken from here on
            reading = traffic(rng, t)
            del reading["intensity"]
            observe(bank, SENSOR, t, **reading)
            t += step
        start = t
        for _ in range(6):
            observe(bank, SENSOR, t, occupancy=0.45, averageVehicleSpeed=9.0)
            t += step
        assert service.wait_idle()
    finally:
        service.stop()
    snap = service.snapshot()
    assert snap.skipped["inputs observed too far apart"] == 0
    assert snap.skipped["optional input observed too far apart, left out"] > 0
    (alert,) = alerts(bank)
    assert when(alert["validFrom"]) == start
    assert alert["anomalousProperty"] == "occupancy, averageVehicleSpeed"


def test_a_restarted_traffic_rule_warms_from_the_recorded_history(store: Store) -> None:
    """The traffic-incident rule combines several attributes: after a restart it learns their
    recorded history as the live path reads it (the latest of each input at each time), so a
    blockage right after the restart is judged at once."""
    from cityward.bank.history import History

    bank = Bank(store)
    History(store, bank)
    rng = random.Random(5)
    step = timedelta(minutes=10)
    first = run_service(bank, INCIDENT)
    try:
        t = replay_days(bank, rng, 2.42, step)
        assert first.wait_idle()
    finally:
        first.stop()
    recorded = first.snapshot().points
    assert alerts(bank) == []

    second = run_service(bank, INCIDENT)
    try:
        start = t
        for _ in range(6):
            observe(bank, SENSOR, t, occupancy=0.45, averageVehicleSpeed=9.0, intensity=4)
            t += step
        assert second.wait_idle()
    finally:
        second.stop()
    assert second.snapshot().warmed == recorded  # every recorded reading, as the first saw it
    (alert,) = alerts(bank)
    assert alert["subCategory"] == "carAccident" and when(alert["validFrom"]) == start

    cold = run_service(bank, INCIDENT.model_copy(update={"name": "cold"}), warm_start=0)
    try:
        observe(bank, SENSOR, t, occupancy=0.45, averageVehicleSpeed=9.0, intensity=4)
        assert cold.wait_idle()
    finally:
        cold.stop()
    assert cold.snapshot().warmed == 0 and len(alerts(bank)) == 1


def test_traffic_rule_quiet_when_busy_but_flowing(bank: Bank) -> None:
    rng = random.Random(6)
    step = timedelta(minutes=10)
    service = run_service(bank, INCIDENT)
    try:
        t = replay_days(bank, rng, 2.42, step)
        for _ in range(6):  # far more traffic than usual at this hour, at normal speed
            observe(bank, SENSOR, t, occupancy=0.3, averageVehicleSpeed=52.0, intensity=150)
            t += step
        assert service.wait_idle()
    finally:
        service.stop()
    assert alerts(bank) == []
    assert service.snapshot().points > 300


# -- end to end: a NAB realTraffic series --------------------------------------------------
# The platform's default detector (the ensemble) at its default thresholds (0.5, one point
# opens): speed_6005 (one labelled window, 2,500 points) raises two alerts, one inside the
# window; speed_7578 (four windows, 1,127 points) raises four, three inside windows.
@pytest.mark.parametrize("series", ["speed_6005", "speed_7578"])
def test_nab_traffic_series_raises_alert_inside_labelled_window(bank: Bank, series: str) -> None:
    key = f"realTraffic/{series}.csv"
    data = shared_path("data", "nab", "data", "realTraffic", f"{series}.csv")
    labels = shared_path("data", "nab", "labels", "combined_windows.json")
    windows = [(when(a), when(b)) for a, b in json.loads(labels.read_text())[key]]
    windows = [(a.replace(tzinfo=UTC), b.replace(tzinfo=UTC)) for a, b in windows]
    eid = f"urn:ngsi-ld:TrafficFlowObserved:nab-{series}"
    service = run_service(bank, speed_watch())  # the default detector and thresholds
    try:
        with data.open(newline="") as fh:
            for row in csv.DictReader(fh):
                t = datetime.fromisoformat(row["timestamp"]).replace(tzinfo=UTC)
                observe(bank, eid, t, averageVehicleSpeed=float(row["value"]))
        assert service.wait_idle(timeout_s=120)
    finally:
        service.stop()
    found = alerts(bank)
    starts = [when(a["validFrom"]) for a in found]
    inside = [s for s in starts if any(a <= s <= b for a, b in windows)]
    assert inside, f"no alert inside {windows}; alerts from {starts}"
    assert len(found) <= 10, "hysteresis: a few alerts, not one per anomalous point"
    assert all(a["alertSource"] == eid for a in found)
    # the platform's default, read with the default detector's own threshold
    assert all(a["data"]["detector"] == "default" for a in found)
    assert all(a["data"]["threshold"] == 0.5 for a in found)


# -- inside `cityward serve` ---------------------------------------------------------------
def test_serve_runs_the_service_audited_as_its_own_identity(tmp_path: Path) -> None:
    # the audit identity, on an alert opened after 20 values: the windowed Gaussian pinned
    anomaly = AnomalySettings(enabled=True, watches=[gaussian_watch(warmup=5, open_after=1)])
    settings = Settings(data_dir=tmp_path, context_fetch=False, no_auth=True, anomaly=anomaly)
    app = create_app(settings)
    with TestClient(app) as client:
        service: AnomalyService = app.state.anomaly
        assert service.running
        t = T0
        for n in range(21):
            speed = 500.0 if n == 20 else 50.0 + n % 3
            body = [
                {
                    "id": SENSOR,
                    "type": FLOW,
                    "averageVehicleSpeed": {
                        "type": "Property",
                        "value": speed,
                        "observedAt": iso(t),
                    },
                }
            ]
            r = client.post("/ngsi-ld/v1/entityOperations/upsert?options=update", json=body)
            assert r.status_code in (201, 204), r.text
            t += STEP
        assert service.wait_idle()
        r = client.get("/ngsi-ld/v1/entities", params={"type": "Alert"})
        assert r.status_code == 200
        (alert,) = r.json()
        assert alert["alertSource"]["object"] == SENSOR
        audit = app.state.governance.audit
        audit.flush()
        records = audit.query(actor=SERVICE_ID, action="write")
        assert [rec["entity_ids"] for rec in records] == [[alert["id"], SENSOR]]
        assert records[0]["role"] == "operator"
    assert not service.running  # stopped with the app


def test_serve_refuses_to_write_alerts_no_source_declares(tmp_path: Path) -> None:
    source = DataSource(
        id="traffic",
        name="Traffic detectors",
        types=(FLOW,),
        purposes=("traffic-management",),
        legal_basis="public task",
        retention="P1Y",
        owner="City",
    )
    settings = Settings(
        data_dir=tmp_path,
        context_fetch=False,
        no_auth=True,
        governance=GovernanceSettings(sources=[source]),
        anomaly=AnomalySettings(enabled=True),
    )
    with pytest.raises(ConfigurationError, match="declares the type 'Alert'"):
        create_app(settings)


def test_a_strong_incident_in_the_quiet_after_an_earlier_one_still_opens(bank: Bank) -> None:
    # the ensemble stays quiet for dead_time values after an alarm, whatever it sees; once the
    # first alert has closed, a second incident whose level reaches the high threshold opens a
    # second alert even though the detector's score is still 0
    dead_time = 300
    watch = speed_watch(detector="ensemble", detector_config={"dead_time": dead_time})
    _, high, _ = watch.levels
    rng = random.Random(11)
    mirror = Mirrored(bank, watch)
    feed, seen = mirror.feed, mirror.seen

    service = run_service(bank, watch)
    try:
        t = T0
        for _ in range(2 * 288):
            feed(t, normal_speed(rng, t))
            t += STEP
        for _ in range(3):  # a short slowdown: one alert
            feed(t, round(20 + rng.gauss(0, 1), 2))
            t += STEP
        for _ in range(30):
            feed(t, normal_speed(rng, t))
            t += STEP
        second = t
        for _ in range(12):  # the road stops, well inside the first alarm's quiet time
            feed(t, 0.0)
            t += STEP
        for _ in range(30):
            feed(t, normal_speed(rng, t))
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()
    # the premise: the detector is quiet (score 0) through the second incident, but its level
    # reaches the high threshold
    during = [(score, level) for at, score, level in seen if second <= at < second + 12 * STEP]
    assert all(score == 0.0 for score, _ in during)
    assert max(level for _, level in during) >= high
    got = sorted(alerts(bank), key=lambda a: when(a["validFrom"]))
    assert len(got) == 2, [(a["validFrom"], a["alertStatus"]) for a in got]
    assert got[0]["alertStatus"] == "closed"
    assert second <= when(got[1]["validFrom"]) < second + 12 * STEP


# -- what the hunt found -------------------------------------------------------------------
def test_an_alert_deleted_while_open_is_not_brought_back_half(bank: Bank) -> None:
    # an operator deletes an open alert; the service's close of it used to upsert, creating a
    # partial Alert (validTo, status, score, data: no category, no source)
    service = run_service(bank, gaussian_watch(warmup=5, open_after=1))
    try:
        t = T0
        for n in range(20):
            observe(bank, SENSOR, t, averageVehicleSpeed=50.0 + n % 3)
            t += STEP
        observe(bank, SENSOR, t, averageVehicleSpeed=500.0)
        t += STEP
        assert service.wait_idle()
        (alert,) = alerts(bank)
        assert alert["alertStatus"] == "open"
        bank.delete("", alert["id"])
        for n in range(12):  # normal again: the service closes the incident
            observe(bank, SENSOR, t, averageVehicleSpeed=50.0 + n % 3)
            t += STEP
        assert service.wait_idle()
        assert service.open_alerts() == {}
    finally:
        service.stop()
    assert alerts(bank) == []
    stats = service.snapshot()
    assert (stats.opened, stats.deleted, stats.lost_writes, stats.errors) == (1, 1, 0, 0)


def test_an_alert_opened_after_a_run_carries_the_run_peak_value_and_time(bank: Bank) -> None:
    # open_after 3 (and no point high enough to open at once): the alert opens on the run's
    # third point, but its value and score time are those of the run's peak (the first, the
    # farthest from normal), not of the point that opened it
    watch = gaussian_watch(warmup=5, open_after=3, threshold=0.99, high_threshold=1.0)
    service = run_service(bank, watch)
    try:
        t = T0
        for n in range(150):
            observe(bank, SENSOR, t, averageVehicleSpeed=50.0 + n % 3)
            t += STEP
        peak_at = t
        for speed in (55.0, 54.0, 53.5):
            observe(bank, SENSOR, t, averageVehicleSpeed=speed)
            t += STEP
        assert service.wait_idle()
    finally:
        service.stop()
    (alert,) = alerts(bank)
    assert when(alert["validFrom"]) == peak_at
    assert alert["data"]["value"] == 55.0
    assert alert["data"]["peakScore"] < 1.0
    doc = bank.store.get("", alert["id"])
    assert doc is not None
    (score,) = doc["attrs"][PARSER.ctx.expand("anomalyScore")]
    assert when(score["observedAt"]) == peak_at


def test_a_jam_that_turns_out_an_accident_changes_the_alert_sub_category(bank: Bank) -> None:
    rng = random.Random(5)
    step = timedelta(minutes=10)
    service = run_service(bank, INCIDENT)
    try:
        t = replay_days(bank, rng, 2.42, step)
        for _ in range(4):  # a queue sits on the loop, vehicles still pass: a jam
            normal = traffic(rng, t)
            observe(
                bank,
                SENSOR,
                t,
                occupancy=0.45,
                averageVehicleSpeed=9.0,
                intensity=normal["intensity"],
            )
            t += step
        assert service.wait_idle()
        (jam,) = alerts(bank)
        assert jam["subCategory"] == "trafficJam"
        for _ in range(3):  # few pass any more: an accident or obstruction
            observe(bank, SENSOR, t, occupancy=0.45, averageVehicleSpeed=9.0, intensity=4)
            t += step
        assert service.wait_idle()
    finally:
        service.stop()
    (alert,) = alerts(bank)
    assert alert["id"] == jam["id"]
    assert alert["subCategory"] == "carAccident"
    assert alert["severity"] == "high"
    assert "possible accident" in alert["description"]


def test_an_alert_is_read_only_with_the_purposes_of_its_source(tmp_path: Path) -> None:
    # an Alert carries its source's value, reason and place: an environment-monitoring token
    # that gets 403 on a traffic sensor read the sensor's alert ("speed 500 vs 50"), and any
    # operator an undeclared (so personal) source's. The alert now belongs to its source.
    heart = "urn:ngsi-ld:DeviceMeasurement:heart-rate-of-alice"
    HEART = "DeviceMeasurement"  # no source declares it: undeclared, so personal
    watches = [
        gaussian_watch(warmup=5, open_after=1),
        DetectorWatch(
            entity_type="DeviceMeasurement",
            attribute="numValue",
            category="health",
            warmup=5,
            open_after=1,
            **GAUSSIAN,
        ),
    ]
    anomaly = AnomalySettings(enabled=True, watches=watches)
    settings = Settings(data_dir=tmp_path, context_fetch=False, anomaly=anomaly)
    E = "/ngsi-ld/v1/entities"
    UPSERT = "/ngsi-ld/v1/entityOperations/upsert"
    loc = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [3.72, 51.05]}}

    def reading(eid: str, kind: str, name: str, value: float, t: datetime) -> dict[str, Any]:
        attr = {"type": "Property", "value": value, "observedAt": iso(t)}
        return {"id": eid, "type": kind, name: attr, "location": loc}

    app = create_app(settings)
    ids = app.state.governance.identities

    def bearer(role: Role, purposes: list[str]) -> dict[str, str]:
        return {"Authorization": f"Bearer {ids.issue(role, purposes)}"}

    admin = bearer(Role.ADMIN, ["*"])
    road = bearer(Role.OPERATOR, ["traffic-management"])
    air = bearer(Role.OPERATOR, ["environment-monitoring"])
    safety = bearer(Role.OPERATOR, ["public-safety"])
    with TestClient(app) as client:
        service: AnomalyService = app.state.anomaly
        t = T0
        for n in range(21):
            spike = n == 20
            body = [
                reading(SENSOR, FLOW, "averageVehicleSpeed", 500.0 if spike else 50.0 + n % 3, t),
                reading(heart, HEART, "numValue", 190.0 if spike else 60.0 + n % 3, t),
            ]
            r = client.post(UPSERT, json=body, headers=admin)
            assert r.status_code in (201, 204), r.text
            t += STEP
        assert service.wait_idle()
        assert service.snapshot().lost_writes == 0

        def visible(headers: dict[str, str]) -> dict[str, dict[str, Any]]:
            r = client.get(E, params={"type": "Alert"}, headers=headers)
            assert r.status_code == 200, r.text
            return {a["alertSource"]["object"]: a for a in r.json()}

        every = visible(admin)
        assert set(every) == {SENSOR, heart}
        assert every[SENSOR]["id"].startswith("urn:ngsi-ld:Alert:from:traffic-detectors:")
        assert every[heart]["id"].startswith("urn:ngsi-ld:Alert:from:undeclared:")
        assert set(visible(road)) == {SENSOR}
        assert visible(air) == {} and visible(safety) == {}
        for eid, headers in ((every[SENSOR]["id"], air), (every[heart]["id"], road)):
            assert client.get(f"{E}/{eid}", headers=headers).status_code == 403
        # the alerts stay open: a restarted service reads them back (it reads them with every
        # purpose) and closes them when the readings are normal again
        service.stop()
        service = AnomalyService(service.bank, anomaly, governance=app.state.governance)
        service.start()
        assert service.snapshot().restored == 2
        for n in range(12):
            body = [
                reading(SENSOR, FLOW, "averageVehicleSpeed", 50.0 + n % 3, t),
                reading(heart, HEART, "numValue", 60.0 + n % 3, t),
            ]
            r = client.post(UPSERT, json=body, headers=admin)
            assert r.status_code in (201, 204), r.text
            t += STEP
        assert service.wait_idle()
        closed = visible(admin)
        assert {a["alertStatus"]["value"] for a in closed.values()} == {"closed"}
        assert {a["id"] for a in closed.values()} == {a["id"] for a in every.values()}
        service.stop()


def test_an_open_alert_whose_source_became_more_restricted_is_closed_on_start(
    tmp_path: Path,
) -> None:
    # opened while the sensor's source was as open as the alerts' (a plain alert), then the
    # catalog restricts the source: the restarted service went on writing the sensor's new
    # values and reasons into the plain alert, which environment-monitoring may read
    common: dict[str, Any] = {"legal_basis": "public task", "retention": "P1Y", "owner": "City"}

    def settings(*purposes: str) -> Settings:
        sources = [
            DataSource(id="traffic", name="Traffic", types=(FLOW,), purposes=purposes, **common),
            DataSource(
                id="alerts",
                name="Alerts",
                types=("Alert",),
                purposes=("traffic-management", "environment-monitoring"),
                **common,
            ),
        ]
        anomaly = AnomalySettings(enabled=True, watches=[gaussian_watch(warmup=5, open_after=1)])
        governance = GovernanceSettings(sources=sources)
        return Settings(
            data_dir=tmp_path, context_fetch=False, anomaly=anomaly, governance=governance
        )

    def post(client: TestClient, headers: dict[str, str], speed: float, t: datetime) -> None:
        attr = {"type": "Property", "value": speed, "observedAt": iso(t)}
        body = [{"id": SENSOR, "type": FLOW, "averageVehicleSpeed": attr}]
        r = client.post("/ngsi-ld/v1/entityOperations/upsert", json=body, headers=headers)
        assert r.status_code in (201, 204), r.text

    t = T0
    app = create_app(settings("traffic-management", "environment-monitoring"))
    admin = {"Authorization": f"Bearer {app.state.governance.identities.issue(Role.ADMIN, ['*'])}"}
    with TestClient(app) as client:
        for n in range(21):
            post(client, admin, 500.0 if n == 20 else 50.0 + n % 3, t)
            t += STEP
        assert app.state.anomaly.wait_idle()
        r = client.get("/ngsi-ld/v1/entities", params={"type": "Alert"}, headers=admin)
        (first,) = r.json()
    assert first["id"].startswith(ALERT_ID_PREFIX)

    app = create_app(settings("traffic-management"))
    ids = app.state.governance.identities
    admin = {"Authorization": f"Bearer {ids.issue(Role.ADMIN, ['*'])}"}
    air = {"Authorization": f"Bearer {ids.issue(Role.OPERATOR, ['environment-monitoring'])}"}
    with TestClient(app) as client:
        service: AnomalyService = app.state.anomaly
        assert service.open_alerts() == {}  # the plain alert was closed, not adopted
        post(client, admin, 900.0, t)
        assert service.wait_idle()
        found = client.get("/ngsi-ld/v1/entities", params={"type": "Alert"}, headers=admin).json()
        seen = client.get("/ngsi-ld/v1/entities", params={"type": "Alert"}, headers=air).json()
    by_id = {a["id"]: a for a in found}
    old = by_id.pop(first["id"])
    assert old["alertStatus"]["value"] == "closed"
    assert old["data"]["value"]["closed"] == "its source's data source is more restricted now"
    assert old["data"]["value"]["value"] == 500.0  # nothing of the new reading went into it
    (new,) = by_id.values()
    assert new["id"].startswith("urn:ngsi-ld:Alert:from:traffic:")
    assert new["data"]["value"]["value"] == 900.0
    assert [a["id"] for a in seen] == [first["id"]]
