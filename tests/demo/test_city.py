"""The demo city's SUMO scenario (real netgenerate, netconvert and libsumo) and its KPIs."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cityward.demo import city as city_module
from cityward.demo.city import CENTRE, DemoCity, build_city, profile, sumo_tool
from cityward.demo.kpi import KpiMeter, KpiSample, baseline_at, load_baseline, run_baseline
from cityward.traffic.bankfeed import _Geo, _net_has_projection
from cityward.traffic.sumo import sumo_binary

MORNING = 8 * 3600.0  # the city's second 0 is midnight: 8:00 is in the morning peak

TINY_OSM = """<?xml version="1.0" encoding="UTF-8"?>
<osm version="0.6" generator="cityward tests">
  <node id="1" lat="51.0543" lon="3.7150"/>
  <node id="2" lat="51.0543" lon="3.7215"><tag k="highway" v="traffic_signals"/></node>
  <node id="3" lat="51.0543" lon="3.7280"/>
  <node id="4" lat="51.0500" lon="3.7215"/>
  <node id="5" lat="51.0586" lon="3.7215"/>
  <node id="6" lat="51.0543" lon="3.7250"/>
  <node id="7" lat="51.0570" lon="3.7250"/>
  <way id="10"><nd ref="1"/><nd ref="2"/><nd ref="6"/><nd ref="3"/>
    <tag k="highway" v="primary"/><tag k="name" v="Korenmarkt"/></way>
  <way id="11"><nd ref="4"/><nd ref="2"/><nd ref="5"/><tag k="highway" v="primary"/></way>
  <way id="12"><nd ref="6"/><nd ref="7"/><tag k="highway" v="residential"/></way>
  <way id="13"><nd ref="5"/><nd ref="7"/><tag k="highway" v="footway"/></way>
</osm>
"""


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> DemoCity:
    """The default grid, ten hours of demand (up to the end of the morning peak)."""
    return build_city(tmp_path_factory.mktemp("city"), hours=10)


@pytest.fixture
def sumo() -> Iterator[Any]:
    """libsumo, closed afterwards (one simulation per process: other tests use it too)."""
    import libsumo

    try:
        yield libsumo
    finally:
        libsumo.close()


def metres(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance between two (lon, lat) points: the WGS84 ellipsoid's radii of curvature at
    their mean latitude (within centimetres over a few km)."""
    e2 = 0.00669437999014
    phi = math.radians((a[1] + b[1]) / 2)
    w = 1 - e2 * math.sin(phi) ** 2
    ky = math.radians(6378137.0 * (1 - e2) / w**1.5)  # metres per degree of latitude
    kx = math.radians(6378137.0 / math.sqrt(w) * math.cos(phi))  # ... of longitude
    return math.hypot((a[0] - b[0]) * kx, (a[1] - b[1]) * ky)


def location(net: Path) -> dict[str, str]:
    """The attributes of a network's <location> element."""
    for _, elem in ET.iterparse(net, events=("start",)):
        if elem.tag == "location":
            return dict(elem.attrib)
    raise AssertionError(f"{net} has no <location>")


def test_grid_is_georeferenced_around_the_centre(city: DemoCity, sumo: Any) -> None:
    sumo.start([sumo_binary(), "-n", str(city.net), "--no-step-log"])
    geo = {
        j: tuple(sumo.simulation.convertGeo(*sumo.junction.getPosition(j)))
        for j in sumo.junction.getIDList()
        if not j.startswith(":")
    }
    assert len(sumo.trafficlight.getIDList()) == 16  # the inner junctions, not the fringe ends
    assert all(metres(p, CENTRE) < 1000 for p in geo.values())
    # columns A-D run west to east, rows 0-3 south to north, 200 m apart
    assert geo["B1"][0] > geo["A1"][0] and geo["A2"][1] > geo["A1"][1]
    assert metres(geo["A1"], geo["B1"]) == pytest.approx(200, abs=0.05)
    assert metres(geo["A1"], geo["A2"]) == pytest.approx(200, abs=0.05)
    middle = tuple(sum(geo[j][k] for j in ("B1", "C1", "B2", "C2")) / 4 for k in (0, 1))
    assert metres((middle[0], middle[1]), CENTRE) < 1.0
    # what the data bank feed reads
    assert _net_has_projection(sumo)
    lon, lat = _Geo(sumo).lonlat(*sumo.junction.getPosition("B1"))
    assert metres((lon, lat), geo["B1"]) < 0.01


def test_location_element_is_consistent(city: DemoCity) -> None:
    attrs = location(city.net)
    assert attrs["convBoundary"] == "0.00,0.00,1000.00,1000.00"
    assert attrs["netOffset"] == "500.00,500.00"
    w, s, e, n = (float(v) for v in attrs["origBoundary"].split(","))
    assert w < CENTRE[0] < e and s < CENTRE[1] < n
    assert metres((w, s), (e, s)) == pytest.approx(1000, abs=2)
    assert "+proj=tmerc" in attrs["projParameter"] and "+lat_0=51.0543" in attrs["projParameter"]


def test_traffic_moves_and_the_meter_measures_it(city: DemoCity, sumo: Any) -> None:
    sumo.start(
        [
            sumo_binary(),
            "-c",
            str(city.sumocfg),
            "--begin",
            f"{MORNING:g}",
            "--no-step-log",
            "--no-warnings",
        ]
    )
    meter = KpiMeter(window_s=300, sample_every_s=10)
    samples: list[KpiSample] = []
    moving = 0
    while sumo.simulation.getTime() < MORNING + 600:
        sumo.simulationStep()
        now = sumo.simulation.getTime()
        s = meter.step(sumo, now)
        if s is not None:
            samples.append(s)
        if now % 60 == 0:
            moving = max(
                moving, sum(sumo.vehicle.getSpeed(v) > 1 for v in sumo.vehicle.getIDList())
            )
    assert moving > 20
    assert [s.t for s in samples[:3]] == [MORNING + 1, MORNING + 10, MORNING + 20]
    assert len(samples) == 61
    last = samples[-1]
    assert last.arrived > 20 and 0 <= last.mean_delay_s < 300
    assert last.co2_g_per_s > 0 and last.vehicles > 10
    # memory stays bounded: only running vehicles are remembered
    assert len(meter._loss) == sumo.vehicle.getIDCount()


def test_demand_follows_the_day(city: DemoCity) -> None:
    meta = json.loads((city.directory / "city.json").read_text())
    per_hour = meta["demand"]["per_hour"]
    assert len(per_hour) == 10
    assert max(per_hour[:5]) < 250 and 1200 <= per_hour[8] <= 1800
    assert 1200 <= meta["demand"]["peak_per_hour"] <= 1800
    assert profile(3 * 3600) < 0.1 < 0.9 < profile(8.5 * 3600)
    departs = [
        float(line.split('depart="')[1].split('"')[0])
        for line in city.routes.open()
        if "<trip " in line
    ]
    assert departs == sorted(departs) and len(departs) == meta["demand"]["trips"]
    cfg = city.sumocfg.read_text()
    assert 'value="city.net.xml"' in cfg and '<end value="36000"/>' in cfg
    assert (city.begin, city.end) == (0.0, 36000.0)


def test_build_is_reused_and_rebuilt_when_asked_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the work of a build, counted: SUMO's tools run and the demand written (both real)
    work: list[str] = []

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            work.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(city_module, "_run", counted("tool", city_module._run))
    monkeypatch.setattr(city_module, "write_demand", counted("demand", city_module.write_demand))
    first = build_city(tmp_path, hours=1, seed=3)
    assert "tool" in work and "demand" in work
    files = (first.net, first.routes, first.sumocfg, tmp_path / "city.json")
    stamps = [f.stat().st_mtime_ns for f in files]
    routes = first.routes.read_bytes()
    work.clear()
    again = build_city(tmp_path, hours=1, seed=3)
    assert work == [], f"reusing the city ran {work}"
    assert again == first and [f.stat().st_mtime_ns for f in files] == stamps
    other = build_city(tmp_path, hours=1, seed=4)
    assert work != [], "a different seed did not rebuild"
    assert other.routes.read_bytes() != routes
    assert json.loads((tmp_path / "city.json").read_text())["params"]["seed"] == 4
    # the same seed gives the same demand
    assert build_city(tmp_path, hours=1, seed=3).routes.read_bytes() == routes
    # a city missing a file is rebuilt; no temporary folder is left behind
    first.routes.unlink()
    assert build_city(tmp_path, hours=1, seed=3).routes.read_bytes() == routes
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "city.json",
        "city.net.xml",
        "city.rou.xml",
        "city.sumocfg",
    ]
    small = build_city(tmp_path, hours=1, rows=2, cols=3, spacing=150)
    assert location(small.net)["convBoundary"] == "0.00,0.00,600.00,450.00"


def test_grid_parameters_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows"):
        build_city(tmp_path, rows=1)
    with pytest.raises(ValueError, match="hours"):
        build_city(tmp_path, hours=0)


def test_osm_extract_becomes_a_georeferenced_city(tmp_path: Path, sumo: Any) -> None:
    osm = tmp_path / "tiny.osm"
    osm.write_text(TINY_OSM)
    city = build_city(tmp_path / "osm", osm=osm, hours=9)
    assert location(city.net)["projParameter"].startswith("+proj=utm")
    sumo.start([sumo_binary(), "-c", str(city.sumocfg), "--begin", f"{MORNING:g}", "--no-step-log"])
    (tls,) = sumo.trafficlight.getIDList()  # the mapped signal
    lonlat = sumo.simulation.convertGeo(*sumo.junction.getPosition(tls))
    assert metres(lonlat, (3.7215, 51.0543)) < 5
    departed = 0
    for _ in range(600):
        sumo.simulationStep()
        departed += sumo.simulation.getDepartedNumber()
    assert departed > 20
    # edited OSM data is a different city
    osm.write_text(TINY_OSM.replace('lon="3.7280"', 'lon="3.7300"'))
    stamp = city.net.stat().st_mtime_ns
    build_city(tmp_path / "osm", osm=osm, hours=9)
    assert city.net.stat().st_mtime_ns != stamp


def test_broken_osm_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.osm"
    bad.write_text('<osm version="0.6">\n<node id="1" lat="51" lon="3">\n</osm>\n')
    with pytest.raises(ValueError, match=r"broken\.osm") as err:
        build_city(tmp_path / "city", osm=bad)
    assert "netconvert" in str(err.value)
    assert not (tmp_path / "city" / "city.json").exists()
    with pytest.raises(FileNotFoundError):
        build_city(tmp_path / "city", osm=tmp_path / "missing.osm")


def test_failing_tool_reports_command_and_stderr(tmp_path: Path) -> None:
    from cityward.demo.city import _run

    tool = sumo_tool("netgenerate")
    with pytest.raises(RuntimeError, match="netgenerate") as err:
        _run([tool, "--grid", "--no-such-option", "-o", str(tmp_path / "x.net.xml")])
    assert "no-such-option" in str(err.value)
    with pytest.raises(RuntimeError, match="could not run"):
        _run([str(tmp_path / "netgenerate")])


def test_baseline_runs_apart_and_is_reused(city: DemoCity, tmp_path: Path) -> None:
    out = tmp_path / "baseline.json"
    assert run_baseline(city, out, until=900) == out
    doc = json.loads(out.read_text())
    # apart: another process simulated. (A bound on the caller's CPU against the run's time
    # failed late in a full run: spawning a child from a large test process cost the caller
    # 0.33 s of CPU while the 900 simulated seconds took 0.06 s.)
    assert doc["pid"] != os.getpid()
    assert doc["complete"] and doc["until"] == 900 and doc["city"]["grid"]["rows"] == 4
    samples = load_baseline(out)
    assert len(samples) == 91 and samples[-1].t == 900
    assert any(s.arrived for s in samples) and all(s.co2_g_per_s >= 0 for s in samples)
    assert baseline_at(samples, 455.5) == next(s for s in samples if s.t == 450)
    assert baseline_at(samples, 0.5) is None
    # reused: a shorter run is covered by the file, a longer one is not
    stamp = out.stat().st_mtime_ns
    run_baseline(city, out, until=600)
    assert out.stat().st_mtime_ns == stamp
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_samples_survive_json_without_nan() -> None:
    s = KpiSample(10.0, math.nan, 1.5, 3, 0)
    d = s.to_json()
    assert d["mean_delay_s"] is None and "NaN" not in json.dumps(d)
    back = KpiSample.from_json(d)
    assert math.isnan(back.mean_delay_s) and back.co2_g_per_s == 1.5
