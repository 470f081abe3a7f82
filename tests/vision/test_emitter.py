"""The vision worker's bank sink: what the cameras count reaches the data bank's history."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.history import History
from cityward.bank.service import Bank
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import Settings
from cityward.vision.emitter import BankSink, CameraEmitter
from cityward.vision.settings import CameraSettings


class Outage:
    """The real bank, unreachable while ``down`` is set (every write raises, as a database
    that went away does)."""

    def __init__(self, bank: Bank) -> None:
        self.bank = bank
        self.down = threading.Event()
        self.refused = 0

    def batch_upsert(self, *args: Any, **kw: Any) -> Any:
        if self.down.is_set():
            self.refused += 1
            raise ConnectionError("the database is unreachable")
        return self.bank.batch_upsert(*args, **kw)


def test_every_interval_counted_during_a_bank_outage_reaches_the_history(
    tmp_path: Path,
) -> None:
    """The sink merged queued updates of one entity: three minutes of counts queued while
    the bank was away (3, 5 and 2 cars) reached it as one update of 2 cars."""
    store = SqliteStore(tmp_path / "cityward.db")
    real = Bank(store)
    History(store, real)  # as `vision run` sets it up
    bank = Outage(real)
    bank.down.set()
    sink = BankSink(bank)
    emitter = CameraEmitter(CameraSettings(id="cam1", url="x.mp4", interval_s=60), sink)
    for k, cars in enumerate((3, 5, 2), 1):
        sink.put(emitter.flows(60.0 * k, {"north": {"type": "line", "in": {"car": cars}}}))
    deadline = threading.Event()
    while bank.refused < 1 and not deadline.wait(0.05):
        pass
    bank.down.clear()
    assert sink.wait_idle(30)
    sink.close()
    assert sink.dropped == 0 and sink.refused == 0
    eid = "urn:ngsi-ld:TrafficFlowObserved:camera:cam1:north:in"
    settings = Settings(data_dir=tmp_path, no_auth=True, context_fetch=False)
    with TestClient(create_app(settings, store)) as api:
        r = api.get(f"/ngsi-ld/v1/temporal/entities/{eid}", params={"options": "temporalValues"})
        assert r.status_code == 200, r.text
        doc = r.json()
    store.close()
    values = [v for v, _ in doc["intensity"]["values"]]
    assert values == [3, 5, 2], doc


def test_updates_the_bank_never_took_are_counted_when_the_sink_closes(tmp_path: Path) -> None:
    """With the bank away at shutdown, close() gave up after its wait and what was queued
    went unsaid: dropped stayed 0."""
    store = SqliteStore(tmp_path / "cityward.db")
    bank = Outage(Bank(store))
    bank.down.set()
    sink = BankSink(bank)
    emitter = CameraEmitter(CameraSettings(id="cam1", url="x.mp4", interval_s=60), sink)
    docs = emitter.flows(60.0, {"north": {"type": "line", "in": {"car": 3}}})
    sink.put(docs)
    sink.close(timeout_s=1.0)
    assert sink.written == 0 and sink.dropped == len(docs)
    store.close()


def test_the_last_partial_interval_is_written_only_when_some_of_it_passed() -> None:
    """A clip that ended on an interval's boundary wrote one more interval of zero length and
    zero counts after the last full one, which became every flow's newest value."""

    class Sink:
        def put(self, entities: Any, *, urgent: bool = False) -> None:
            pass

    def cars_in(docs: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
        return [
            (
                d["intensity"]["value"],
                d["dateObservedFrom"]["value"]["@value"],
                d["dateObservedTo"]["value"]["@value"],
            )
            for d in docs
            if d["id"].endswith(":TrafficFlowObserved:camera:cam1:north:in")
        ]

    emitter = CameraEmitter(CameraSettings(id="cam1", url="x.mp4", interval_s=60), Sink())
    at = [
        emitter.at(t).isoformat(timespec="milliseconds").replace("+00:00", "Z") for t in (0, 60, 75)
    ]
    assert cars_in(emitter.flows(60.0, {"north": {"type": "line", "in": {"car": 4}}})) == [
        (4, at[0], at[1])
    ]
    assert emitter.rest(60.0, {"north": {"type": "line"}}) == []  # ended on the boundary
    last = emitter.rest(75.0, {"north": {"type": "line", "in": {"car": 1}}})
    assert cars_in(last) == [(1, at[1], at[2])]
    assert CameraEmitter(CameraSettings(id="c2", url="x.mp4"), Sink()).rest(0.0, {}) == []


def test_a_cameras_alerts_name_its_source_and_the_check_sees_every_id_it_writes() -> None:
    """A camera's Alerts were `urn:ngsi-ld:Alert:camera:...` whatever its source, so the
    catalog gave a public-safety camera's events to whichever source that id matched; those of
    the built-in `traffic-cameras` source keep that id (its patterns cover it)."""
    from cityward.vision.analytics import VisionEvent
    from cityward.vision.emitter import emitted_ids

    class Sink:
        def put(self, entities: Any, *, urgent: bool = False) -> None:
            pass

    event = VisionEvent(
        "crowd", "square", 3, 1.0, "person", "high", "security", "crowdRisk", "x", (0, 0, 1, 1)
    )
    rules = [
        {"type": "line", "name": "north", "line": [[0, 1], [9, 1]]},
        {"type": "speed"},
        {"type": "zone", "name": "z", "polygon": [[0, 0], [9, 0], [9, 9]]},
        {"type": "crowd", "name": "square", "polygon": [[0, 0], [9, 0], [9, 9]]},
        {"type": "stopped", "polygon": [[0, 0], [9, 0], [9, 9]]},
    ]
    aggregates: dict[str, dict[str, Any]] = {
        "north": {"type": "line", "in": {"car": 1}},
        "speed": {"type": "speed", "mean_speed_kmh": {"car": 40.0}, "tracks": {"car": 2}},
        "z": {"type": "zone", "entries": {"person": 1, "car": 2}},
        "square": {"type": "crowd", "peak": 4},
        "stopped": {"type": "stopped"},
    }
    for source, prefix in (
        ("traffic-cameras", "urn:ngsi-ld:Alert:camera:cam1:"),
        ("station-cameras", "urn:ngsi-ld:Alert:from:station-cameras:camera:cam1:"),
    ):
        camera = CameraSettings(id="cam1", url="x.mp4", source=source, rules=rules)
        emitter = CameraEmitter(camera, Sink())
        alert = emitter.alert(event, None)
        assert alert["id"].startswith(prefix) and len(alert["id"]) == len(prefix) + 20
        written = [emitter.camera_entity("running"), *emitter.flows(60.0, aggregates), alert]
        checked = emitted_ids(camera)
        assert {(d["id"], d["type"]) for d in written[:-1]} == set(checked[:-1])
        assert checked[-1] == (prefix + "0" * 20, "Alert")
