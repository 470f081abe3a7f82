"""A camera's governance ``source`` decides who reads what the camera writes: its Camera entity,
its flows and its event Alerts (with a snapshot, a place and a description), through the real
bank sink, API and tokens of several purposes, and ``vision run`` refuses a camera whose
entities the catalog would give to another source."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cityward.api.app import create_app
from cityward.bank.history import History
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.config import GovernanceSettings, Settings
from cityward.governance.policy import Role
from cityward.governance.retention import Retention
from cityward.governance.sources import Catalog, DataSource, SourceKind
from cityward.vision.analytics import VisionEvent
from cityward.vision.cli import source_problem
from cityward.vision.emitter import BankSink, CameraEmitter, SnapshotStore
from cityward.vision.settings import CameraSettings

E = "/ngsi-ld/v1/entities"
FLOWS = "(TrafficFlowObserved|ItemFlowObserved|CrowdFlowObserved)"
COMMON: dict[str, Any] = {"legal_basis": "public task", "owner": "City"}
#: the docs/governance.md example: station exit cameras, read for public safety only
STATION = DataSource(
    id="station-cameras",
    name="Station exit cameras",
    kind=SourceKind.CAMERA,
    types=("CrowdFlowObserved",),
    id_patterns=(
        "urn:ngsi-ld:Camera:station-exit",
        f"urn:ngsi-ld:{FLOWS}:camera:station-exit:.+",
    ),
    purposes=("public-safety",),
    retention="P30D",
    **COMMON,
)
ALERTS = DataSource(
    id="alerts",
    name="Alerts",
    kind=SourceKind.DERIVED,
    types=("Alert",),
    purposes=("traffic-management", "environment-monitoring", "public-safety"),
    retention="P2Y",
    **COMMON,
)
#: as the built-in one, read for traffic management only here, its flow patterns narrowed to
#: its own camera (the built-in ones match every camera's flows: see the last test)
TRAFFIC_CAMERAS = DataSource(
    id="traffic-cameras",
    name="Traffic cameras",
    kind=SourceKind.CAMERA,
    types=("Camera", "ItemFlowObserved"),
    id_patterns=(f"urn:ngsi-ld:{FLOWS}:camera:kouter:.+", "urn:ngsi-ld:Alert:camera:.+"),
    purposes=("traffic-management",),
    retention="P30D",
    **COMMON,
)
EVENT = VisionEvent(
    "pedestrian_on_road",
    "road",
    10,
    2.0,
    "person",
    "medium",
    "traffic",
    "pedestrianOnRoad",
    "person on the roadway for 2 s",
    (1, 2, 3, 4),
    2.0,
)
Bearer = Callable[..., dict[str, str]]


def _camera(cid: str, **kw: Any) -> CameraSettings:
    rules = [{"type": "line", "name": "exit", "line": [[0, 100], [480, 100]]}]
    return CameraSettings(id=cid, url="x.mp4", location=(3.71, 51.03), rules=rules, **kw)


def _write(store: Store, tmp_path: Path, cameras: list[CameraSettings]) -> dict[str, list[str]]:
    """What each camera writes (status, one interval of counts, one event with a snapshot),
    through the bank sink as `vision run` does; per camera: Camera id, flow ids, Alert id."""
    bank = Bank(store)
    History(store, bank)
    sink = BankSink(bank)
    snaps = SnapshotStore(tmp_path / "vision" / "snapshots", 30 * 86400, base=tmp_path)
    out: dict[str, list[str]] = {}
    for cam in cameras:
        em = CameraEmitter(cam, sink, snapshots=snaps)
        em.status("running", 5.0)
        flows = em.flows(60.0, {"exit": {"type": "line", "in": {"person": 3, "car": 1}}})
        sink.put(flows)
        alert = em.alert(EVENT, np.zeros((270, 480, 3), np.uint8))
        assert "snapshot" in alert
        sink.put([alert], urgent=True)
        out[cam.id] = [em.urn, *(d["id"] for d in flows), alert["id"]]
    assert sink.wait_idle(30)
    sink.close()
    assert sink.refused == 0 and sink.dropped == 0
    return out


def _app(store: Store, tmp_path: Path, sources: list[DataSource]) -> tuple[Any, Bearer]:
    settings = Settings(
        data_dir=tmp_path, context_fetch=False, governance=GovernanceSettings(sources=sources)
    )
    app = create_app(settings, store)
    identities = app.state.governance.identities

    def bearer(*purposes: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {identities.issue(Role.OPERATOR, list(purposes))}"}

    return app, bearer


def _ids(c: TestClient, headers: dict[str, str], **params: str) -> set[str]:
    r = c.get(E, params={"limit": "1000", **params}, headers=headers)
    assert r.status_code == 200, r.text
    return {e["id"] for e in r.json()}


def test_a_public_safety_cameras_alert_is_not_read_with_environment_monitoring(
    store: Store, tmp_path: Path
) -> None:
    """The hunter's case: the Alert of a `station-cameras` camera (public safety only) was
    `urn:ngsi-ld:Alert:camera:...`, which the station source's patterns do not cover: it
    belonged to 'alerts', and an environment-monitoring token read its snapshot path, place
    and description (and it was kept two years, not the camera's 30 days)."""
    written = _write(store, tmp_path, [_camera("station-exit", source="station-cameras")])
    camera, *flows, alert = written["station-exit"]
    app, bearer = _app(store, tmp_path, [STATION, ALERTS])
    env, safety = bearer("environment-monitoring"), bearer("public-safety")
    with TestClient(app) as c:
        for eid in (camera, *flows, alert):
            r = c.get(f"{E}/{eid}", headers=env)
            assert r.status_code == 403, (eid, r.text)
            assert r.json()["missingPermission"] == "purpose:public-safety", eid
            assert c.get(f"{E}/{eid}", headers=safety).status_code == 200, eid
        assert _ids(c, env, type="Alert") == set()
        assert _ids(c, env, type="*", local="true") == set()
        assert _ids(c, safety, type="Alert") == {alert}
        assert _ids(c, safety, type="*", local="true") == {camera, *flows, alert}
        r = c.get("/ngsi-ld/v1/temporal/entities", params={"type": "Alert"}, headers=env)
        assert r.status_code == 200 and r.json() == [], r.text
        # kept with the camera's retention (30 days), not with the alerts' (2 years)
        sql = "SELECT count(*) FROM attr_history h JOIN entities x ON x.pk = h.e WHERE x.eid = ?"
        assert store.select(sql, [alert])[0][0] > 0
        catalog = app.state.governance.catalog
        later = datetime.now(UTC) + timedelta(days=40)
        report = Retention(store, catalog, None).run_once(now=later)
        assert report.deleted["alerts"] == 0
        assert store.select(sql, [alert])[0][0] == 0


def test_each_camera_is_read_with_its_own_sources_purposes(store: Store, tmp_path: Path) -> None:
    """Two cameras, one on the traffic cameras' source (the default, whose patterns cover
    `urn:ngsi-ld:Alert:camera:`: its ids stay as they were), one on the station's: the station
    camera's Alert matched the traffic cameras' pattern, so traffic management read it and
    public safety, the purpose of its own source, could not."""
    station = _camera("station-exit", source="station-cameras")
    kouter = _camera("kouter")
    written = _write(store, tmp_path, [station, kouter])
    station_alert, kouter_alert = written["station-exit"][-1], written["kouter"][-1]
    assert kouter_alert.startswith("urn:ngsi-ld:Alert:camera:kouter:")
    app, bearer = _app(store, tmp_path, [STATION, TRAFFIC_CAMERAS, ALERTS])
    road, safety = bearer("traffic-management"), bearer("public-safety")
    with TestClient(app) as c:
        assert _ids(c, road, type="*", local="true") == set(written["kouter"])
        assert _ids(c, safety, type="*", local="true") == set(written["station-exit"])
        r = c.get(f"{E}/{station_alert}", headers=road)
        assert r.status_code == 403
        assert r.json()["missingPermission"] == "purpose:public-safety"
        assert c.get(f"{E}/{station_alert}", headers=safety).status_code == 200
        assert c.get(f"{E}/{kouter_alert}", headers=road).status_code == 200
        assert c.get(f"{E}/{kouter_alert}", headers=safety).status_code == 403
    # `vision run` starts both
    catalog = Catalog([STATION, TRAFFIC_CAMERAS, ALERTS])
    assert source_problem(station, catalog) is None
    assert source_problem(kouter, catalog) is None


def _config(tmp_path: Path, station_patterns: list[str]) -> Path:
    patterns = ", ".join(f'"{p}"' for p in station_patterns)
    text = f"""
[[governance.sources]]
id = "station-cameras"
name = "Station exit cameras"
kind = "camera"
types = ["CrowdFlowObserved"]
id_patterns = [{patterns}]
purposes = ["public-safety"]
legal_basis = "public task"
retention = "P30D"
owner = "City"

[[governance.sources]]
id = "alerts"
name = "Alerts"
kind = "derived"
types = ["Alert"]
purposes = ["traffic-management", "environment-monitoring", "public-safety"]
legal_basis = "public task"
retention = "P2Y"
owner = "City"

[vision]
models_dir = "{tmp_path / "no-models"}"

[[vision.cameras]]
id = "station-exit"
url = "{tmp_path / "missing.mp4"}"
source = "station-cameras"
rules = [{{ type = "line", name = "exit", line = [[0, 100], [480, 100]] }}]
"""
    path = tmp_path / "city.toml"
    path.write_text(text)
    return path


def test_vision_run_refuses_a_camera_whose_entities_belong_to_another_source(
    tmp_path: Path,
) -> None:
    """`station-cameras` as in docs/governance.md covers the station's counts, not the
    camera's own Camera entity (undeclared data) nor its line's vehicle and bicycle flows
    (those matched nothing either): the camera started all the same."""
    from cityward.cli import app as cli_app

    runner = CliRunner()
    args = ["vision", "run", "--data-dir", str(tmp_path / "data"), "--no-live", "--exit-when-done"]
    config = _config(tmp_path, ["urn:ngsi-ld:CrowdFlowObserved:camera:station-exit:.+"])
    r = runner.invoke(cli_app, [*args, str(config)], env={"COLUMNS": "400"})
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert (
        "camera station-exit: field 'source': its entities must belong to its source "
        "'station-cameras' alone, but in the governance catalog "
        "urn:ngsi-ld:Camera:station-exit (Camera) goes to 'undeclared'; " in out
    )
    flow = "urn:ngsi-ld:TrafficFlowObserved:camera:station-exit:exit:in"
    assert f"{flow} (TrafficFlowObserved) goes to 'undeclared'" in out
    assert "urn:ngsi-ld:CrowdFlowObserved:camera:station-exit:exit " not in out  # covered
    suggested = "urn:ngsi-ld:(ItemFlowObserved|TrafficFlowObserved):camera:station-exit:.+"
    assert (
        "To fix: add to the id_patterns of source 'station-cameras': "
        f"'urn:ngsi-ld:Camera:station-exit', '{suggested}'" in out
    )
    # with the patterns it suggests, the camera passes the check (and stops later, on its
    # missing model or video)
    config = _config(tmp_path, ["urn:ngsi-ld:Camera:station-exit", suggested])
    r = runner.invoke(cli_app, [*args, str(config)], env={"COLUMNS": "400"})
    assert r.exit_code == 2 and "its entities must belong" not in r.output, r.output


def test_a_camera_whose_flows_another_sources_pattern_matches_is_refused() -> None:
    """The built-in traffic cameras' patterns match every camera's flows: by id a station
    camera's flows belong to the station's source (declared first), but a query lists them to
    the traffic cameras' purposes too. The check accepted it, as the catalog's lookup by id
    gives them to the station."""
    patterns = (f"urn:ngsi-ld:{FLOWS}:camera:.+", "urn:ngsi-ld:Alert:camera:.+")
    broad = DataSource.model_validate({**TRAFFIC_CAMERAS.model_dump(), "id_patterns": patterns})
    station = _camera("station-exit", source="station-cameras")
    catalog = Catalog([STATION, broad, ALERTS])
    flow = "urn:ngsi-ld:TrafficFlowObserved:camera:station-exit:exit:in"
    assert catalog.source_of(flow, ["TrafficFlowObserved"]).id == "station-cameras"
    problem = source_problem(station, catalog)
    assert problem is not None
    assert f"{flow} (TrafficFlowObserved) matches an id pattern of 'traffic-cameras'" in problem
    assert "narrow the id_patterns of source 'traffic-cameras'" in problem
    assert "urn:ngsi-ld:Camera:station-exit" not in problem  # its own pattern, no other
