"""cityward.traffic.metrics against the real SUMO binary on a small signalised grid."""

from __future__ import annotations

import math
import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cityward.traffic.metrics import (
    GASOLINE_DENSITY_G_PER_L,
    RunMetrics,
    emergency_vtypes_from_files,
    parse_tripinfo,
    sumo_output_args,
)

END = 600.0

# Through routes of the 2x2 grid netgenerate builds (junctions A0 A1 B0 B1, fringe nodes
# left0/1, right0/1, bottom0/1, top0/1), with a headway per route in seconds. "we" gets
# 2400 veh/h into one lane behind a traffic light: a queue for insertion builds up.
ROUTES = {
    "we": ("left0A0 A0B0 B0right0", 1.5),
    "sn": ("bottom0A0 A0A1 A1top0", 4.0),
    "ew": ("right1B1 B1A1 A1left1", 4.0),
    "ns": ("top1B1 B1B0 B0bottom1", 5.0),
    "wn": ("left1A1 A1B1 B1top1", 6.0),
}


def _binary(name: str) -> str:
    sumolib = pytest.importorskip("sumolib")
    path = str(sumolib.checkBinary(name))
    if not os.path.isfile(path):
        pytest.skip(f"SUMO binary {name!r} not found")
    return path


def _env() -> dict[str, str]:
    sumo = pytest.importorskip("sumo")
    return {**os.environ, "SUMO_HOME": str(sumo.SUMO_HOME)}


def _write_routes(path: Path) -> dict[str, float]:
    """Hand-written demand; returns vehicle id -> desired departure."""
    vehicles: list[tuple[float, str, str, str]] = []
    for route, (_, headway) in ROUTES.items():
        i = 0
        while i * headway < END:
            vehicles.append((i * headway, f"{route}_{i}", route, "car"))
            i += 1
    vehicles.append((100.0, "amb_0", "sn", "ambulance"))
    vehicles.append((150.0, "fire_0", "ns", "emergency_fire"))
    vehicles.sort()
    lines = [
        "<routes>",
        '  <vType id="car" vClass="passenger"/>',
        '  <vType id="ambulance" vClass="emergency"/>',
        '  <vType id="emergency_fire" vClass="emergency"/>',
        *(f'  <route id="{r}" edges="{edges}"/>' for r, (edges, _) in ROUTES.items()),
        *(
            f'  <vehicle id="{vid}" type="{vt}" route="{r}" depart="{t:.2f}"/>'
            for t, vid, r, vt in vehicles
        ),
        "</routes>",
    ]
    path.write_text("\n".join(lines) + "\n")
    return {vid: t for t, vid, _, _ in vehicles}


@dataclass(frozen=True)
class Scenario:
    net: Path
    routes: Path
    desired_depart: dict[str, float]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    folder = tmp_path_factory.mktemp("metrics_grid")
    net = folder / "grid.net.xml"
    subprocess.run(
        [
            _binary("netgenerate"),
            "--grid",
            "--grid.number",
            "2",
            "--grid.length",
            "200",
            "--grid.attach-length",
            "150",
            "--default.lanenumber",
            "1",
            "--tls.set",
            "A0,A1,B0,B1",
            "-o",
            str(net),
        ],
        check=True,
        capture_output=True,
        env=_env(),
    )
    routes = folder / "grid.rou.xml"
    return Scenario(net, routes, _write_routes(routes))


def _run_sumo(scenario: Scenario, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            _binary("sumo"),
            "-n",
            str(scenario.net),
            "-r",
            str(scenario.routes),
            "--begin",
            "0",
            "--end",
            str(END),
            "--seed",
            "42",
            "--no-step-log",
            "true",
            *sumo_output_args(out_dir),
        ],
        check=True,
        capture_output=True,
        env=_env(),
    )
    return out_dir / "tripinfo.xml"


@pytest.fixture(scope="module")
def tripinfo(scenario: Scenario, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_sumo(scenario, tmp_path_factory.mktemp("run1"))


@pytest.fixture(scope="module")
def metrics(scenario: Scenario, tripinfo: Path) -> RunMetrics:
    return parse_tripinfo(tripinfo, END, emergency_vtypes_from_files([scenario.routes]))


def test_output_args_name_the_tripinfo_file(tmp_path: Path) -> None:
    args = sumo_output_args(tmp_path)
    assert args[args.index("--tripinfo-output") + 1] == str(tmp_path / "tripinfo.xml")
    for flag in ("--tripinfo-output.write-unfinished", "--tripinfo-output.write-undeparted"):
        assert args[args.index(flag) + 1] == "true"
    assert args[args.index("--device.emissions.probability") + 1] == "1"


def test_metrics_match_an_independent_computation(
    scenario: Scenario, tripinfo: Path, metrics: RunMetrics
) -> None:
    sumolib = pytest.importorskip("sumolib")
    trips: list[Any] = [
        t for t in sumolib.output.parse(str(tripinfo), "tripinfo") if float(t.depart) >= 0
    ]
    done = [t for t in trips if float(t.arrival) >= 0 and not t.vaporized]
    departed_ids = {t.id for t in trips}
    # RESCO: vehicles that never entered count with end_time - desired departure, taken
    # here from the route file rather than from SUMO's departDelay.
    waiting = [d for vid, d in scenario.desired_depart.items() if vid not in departed_ids]
    ev_types = emergency_vtypes_from_files([scenario.routes])
    others = [t for t in trips if t.vType not in ev_types]
    # the average delay is that of the vehicles other than emergency ones
    delay = sum(float(t.timeLoss) + float(t.departDelay) for t in others)
    delay += sum(END - d for vid, d in scenario.desired_depart.items() if vid not in departed_ids)
    n_all = len(trips) + len(waiting)
    n_others = n_all - (len(trips) - len(others))

    assert metrics.vehicles == n_all == len(scenario.desired_depart)
    assert metrics.inserted == len(trips)
    assert metrics.never_inserted == len(waiting)
    assert metrics.completed == len(done)
    assert metrics.avg_delay_s == pytest.approx(delay / n_others, rel=1e-12)
    assert metrics.avg_trip_time_s == pytest.approx(
        sum(float(t.duration) for t in done) / len(done), rel=1e-12
    )
    assert metrics.avg_waiting_time_s == pytest.approx(
        sum(float(t.waitingTime) for t in trips) / len(trips), rel=1e-12
    )
    co2_mg = sum(float(t.emissions[0].CO2_abs) for t in trips)
    fuel_mg = sum(float(t.emissions[0].fuel_abs) for t in trips)
    assert metrics.co2_kg == pytest.approx(co2_mg / 1e6, rel=1e-12)
    assert metrics.fuel_l == pytest.approx(fuel_mg / 1e3 / GASOLINE_DENSITY_G_PER_L, rel=1e-12)

    evs = [t for t in trips if t.vType in ("ambulance", "emergency_fire")]
    evs_done = [t for t in evs if t in done]
    assert metrics.ev_count == 2
    assert metrics.ev_completed == len(evs_done) >= 1
    assert metrics.ev_travel_time_s == pytest.approx(
        sum(float(t.duration) for t in evs_done) / len(evs_done), rel=1e-12
    )


def test_every_vehicle_is_accounted_for(scenario: Scenario, metrics: RunMetrics) -> None:
    assert metrics.completed > 0
    assert metrics.unfinished > 0
    assert metrics.never_inserted > 0
    assert metrics.completed + metrics.unfinished + metrics.never_inserted == len(
        scenario.desired_depart
    )


def test_emissions_are_plausible(tripinfo: Path, metrics: RunMetrics) -> None:
    completed = [
        t
        for t in ET.parse(tripinfo).getroot().iter("tripinfo")
        if float(t.get("arrival", "-1")) >= 0
    ]
    km = sum(float(t.get("routeLength", "0")) for t in completed) / 1000
    co2_g = sum(float(e.get("CO2_abs", "0")) for t in completed for e in t.iter("emissions"))
    co2_g /= 1000
    # Short congested urban trips with stops: ~420 g/km with SUMO 1.28's default petrol car.
    assert 50 <= co2_g / km <= 500
    # Totals also hold what unfinished vehicles emitted (idling in queues) until the end.
    assert metrics.co2_kg > co2_g / 1000
    assert 2 <= metrics.fuel_l * 100 / km <= 60  # litres per 100 completed vehicle-km
    # Petrol burns to ~3.1 kg CO2 per kg of fuel: checks the mg -> litre conversion.
    ratio = metrics.co2_kg / (metrics.fuel_l * GASOLINE_DENSITY_G_PER_L / 1000)
    assert 2.8 <= ratio <= 3.4


def test_emergency_vehicles_by_vclass_or_by_name(
    scenario: Scenario, tripinfo: Path, metrics: RunMetrics
) -> None:
    assert emergency_vtypes_from_files([scenario.routes]) == {"ambulance", "emergency_fire"}
    by_name_only = parse_tripinfo(tripinfo, END)
    assert by_name_only.ev_count == 1
    assert metrics.ev_count == 2


def test_fixed_seed_is_deterministic(
    scenario: Scenario, metrics: RunMetrics, tmp_path: Path
) -> None:
    again = _run_sumo(scenario, tmp_path / "run2")
    assert parse_tripinfo(again, END, emergency_vtypes_from_files([scenario.routes])) == metrics


def test_end_time_must_cover_the_run(tripinfo: Path) -> None:
    with pytest.raises(ValueError, match="after end_time"):
        parse_tripinfo(tripinfo, END / 2)


TRIPINFO = """<?xml version="1.0" encoding="UTF-8"?>
<tripinfos>
  <tripinfo id="a" depart="10.00" departDelay="2.00" arrival="70.00" duration="60.00"
      waitingTime="5.00" timeLoss="20.00" vType="car" vaporized="">
    <emissions CO2_abs="1000000.00" fuel_abs="371000.00"/>
  </tripinfo>
  <personinfo id="p" depart="0.00"><walk duration="3.00"/></personinfo>
  <tripinfo id="b" depart="00:01:40" departDelay="4.00" arrival="-1.00" duration="200.00"
      waitingTime="15.00" timeLoss="50.00" vType="Emergency_car" vaporized="end">
    <emissions CO2_abs="500000.00" fuel_abs="0.00"/>
  </tripinfo>
  <tripinfo id="c" depart="-1" departDelay="100.00" arrival="-1.00" duration="0.00"
      waitingTime="0.00" timeLoss="0.00" vType="car" vaporized="end">
    <emissions CO2_abs="0.00" fuel_abs="0.00"/>
  </tripinfo>
</tripinfos>
"""


def test_definitions_on_a_hand_written_file(tmp_path: Path) -> None:
    path = tmp_path / "tripinfo.xml"
    path.write_text(TRIPINFO)
    m = parse_tripinfo(path, 300.0)
    assert m == RunMetrics(
        avg_delay_s=(22 + 100) / 2,  # the emergency vehicle b is left out
        avg_trip_time_s=60.0,
        avg_waiting_time_s=10.0,
        completed=1,
        inserted=2,
        never_inserted=1,
        co2_kg=1.5,
        fuel_l=0.5,
        ev_count=1,
        ev_travel_time_s=None,
        vehicles=3,
        ev_completed=0,
    )
    assert m.unfinished == 1


def test_empty_file_gives_nan_averages(tmp_path: Path) -> None:
    path = tmp_path / "tripinfo.xml"
    path.write_text("<tripinfos/>\n")
    m = parse_tripinfo(path, 100.0)
    assert m.vehicles == 0
    assert math.isnan(m.avg_delay_s)
    assert math.isnan(m.avg_trip_time_s)
    assert m.ev_travel_time_s is None
