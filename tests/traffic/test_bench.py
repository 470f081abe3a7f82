"""`cityward traffic bench`, short: every registered controller on a real RESCO scenario."""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from cityward.cli import app
from cityward.traffic.bench import COLUMNS, find_scenarios, sumo_time
from cityward.traffic.controllers import load_builtin
from tests.conftest import shared_path


def bench(out: Path, *args: str) -> Result:
    """``cityward traffic bench`` on the shared scenarios, results to ``out``."""
    scenarios = shared_path("data", "traffic")
    return CliRunner().invoke(
        app,
        ["traffic", "bench", *args, "--scenarios", str(scenarios), "--output", str(out)],
    )


def test_bench_runs_every_controller_and_keeps_sumos_outputs(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # ten simulated minutes of cologne1 (its hour starts at 25200 s)
    result = bench(out, "--scenario", "cologne1", "--seeds", "1", "--end", "25800")
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert {r["controller"] for r in rows} == set(load_builtin())
    with (out / "results.csv").open() as fh:
        assert list(csv.DictReader(fh).fieldnames or []) == COLUMNS
    for r in rows:
        assert list(r) == COLUMNS
        trip = out / "cologne1" / r["controller"] / "1" / "tripinfo.xml"
        root = ET.parse(trip).getroot()
        finished = [t for t in root.iter("tripinfo") if float(t.get("arrival", "-1")) >= 0]
        assert r["completed"] == len(finished) > 50
        assert 0 < r["avg_delay_s"] < 600
        assert r["co2_kg"] > 0
    assert "published best" in result.output


def test_bench_refuses_unknown_names(tmp_path: Path) -> None:
    scenarios = shared_path("data", "traffic")
    runner = CliRunner()
    r = runner.invoke(
        app, ["traffic", "bench", "--scenario", "nowhere", "--scenarios", str(scenarios)]
    )
    assert r.exit_code == 2 and "unknown scenario" in r.output
    r = runner.invoke(
        app,
        [
            "traffic",
            "bench",
            "--scenario",
            "cologne1",
            "--controller",
            "magic",
            "--scenarios",
            str(scenarios),
        ],
    )
    assert r.exit_code == 2 and "unknown controller" in r.output


def test_bench_with_emergency_vehicles_pairs_each_run_and_reports_free_flow(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench"
    result = bench(
        out,
        "--scenario",
        "cologne3",
        "--controller",
        "adaptive",
        "--seeds",
        "2",
        "--ev-per-hour",
        "12",
        "--end",
        "26400",
    )
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert [r["ev_per_hour"] for r in rows] == [0.0, 12.0]
    plain, with_ev = rows
    assert plain["ev_count"] == 0 and plain["ev_travel_time_s"] is None
    assert with_ev["ev_count"] == 4
    run = out / "cologne3" / "adaptive" / "2" / "ev12"
    free = ET.parse(run / "free_flow_tripinfo.xml").getroot()
    free_by_id = {t.get("id"): float(t.get("duration", "nan")) for t in free.iter("tripinfo")}
    assert len(free_by_id) == 4
    # compared over the runs that finished within the simulated time
    main = ET.parse(run / "tripinfo.xml").getroot()
    done = [
        t.get("id")
        for t in main.iter("tripinfo")
        if t.get("vType") == "cw_emergency" and float(t.get("arrival", "-1")) >= 0
    ]
    assert done
    free_times = [free_by_id[i] for i in done]
    assert with_ev["ev_free_flow_time_s"] == pytest.approx(sum(free_times) / len(free_times))
    # with preemption they get through at close to free-flow time (a run can beat the free-flow
    # run by a second or two: insertion and lane choice differ)
    free_mean = with_ev["ev_free_flow_time_s"]
    assert 0.9 * free_mean <= with_ev["ev_travel_time_s"] < 2 * max(free_times)
    assert "emergency vehicles, 12 per hour" in result.output


def test_the_control_run_drives_the_same_runs_as_ordinary_cars(tmp_path: Path) -> None:
    """``run_one(ev_as_cars=True)``: the emergency runs' routes and departures, as cars that no
    signal preempts for, left out of the others' figures like emergency vehicles."""
    from cityward.traffic.bench import find_scenarios, run_one
    from cityward.traffic.emergency import CONTROL_TYPE, EV_TYPE

    sc = find_scenarios(shared_path("data", "traffic"))["cologne3"]
    rows = {
        cars: run_one(
            sc, "adaptive", 2, tmp_path / str(cars), end=26400, ev_per_hour=12, ev_as_cars=cars
        )
        for cars in (False, True)
    }
    trips = {
        cars: {
            t.get("id"): t.get("vType")
            for t in ET.parse(tmp_path / str(cars) / "tripinfo.xml").getroot().iter("tripinfo")
            if str(t.get("id")).startswith("emergency_")
        }
        for cars in rows
    }
    assert set(trips[True]) == set(trips[False]) and len(trips[True]) == 4
    assert set(trips[True].values()) == {CONTROL_TYPE}
    assert set(trips[False].values()) == {EV_TYPE}
    assert rows[False]["_ev_served"] == 4 and rows[True]["_ev_served"] == 0
    assert rows[True]["ev_travel_time_s"] is None and rows[True]["ev_count"] == 4


def test_sumo_times_and_unreadable_scenarios(tmp_path: Path) -> None:
    """SUMO reads 1:00:00 as 3600 s; cityward failed on it with a traceback, and one
    half-written .sumocfg in the folder stopped every scenario of it, without its name."""
    assert sumo_time("3600") == 3600.0
    assert sumo_time("0:10:00") == 600.0
    assert sumo_time("1:00:00:00") == 86400.0
    assert sumo_time("2:30.5") == 150.5
    for bad in ("", "1::2", "a:00", "1:2:3:4:5", "nan"):
        with pytest.raises(ValueError):
            sumo_time(bad)
    for name, body in (
        ("hms", '<configuration><time><begin value="0:00:00"/><end value="1:00:00"/></time>'),
        ("draft", "<configuration><time>"),
        ("odd", '<configuration><time><end value="soon"/></time></configuration>'),
    ):
        (tmp_path / name).mkdir()
        text = body if name != "hms" else body + "</configuration>"
        (tmp_path / name / f"{name}.sumocfg").write_text(text)
    found = find_scenarios(tmp_path)
    assert list(found) == ["hms"] and (found["hms"].begin, found["hms"].end) == (0.0, 3600.0)
    r = CliRunner().invoke(
        app, ["traffic", "run", "--sumocfg", str(tmp_path / "draft" / "draft.sumocfg")]
    )
    flat = "".join(c for c in r.output if not c.isspace() and c != "\u2502")  # rich's box
    assert r.exit_code == 2 and "draft/draft.sumocfg:noelementfound" in flat, r.output


def test_bench_refuses_an_end_before_a_scenarios_begin_and_empty_seeds(tmp_path: Path) -> None:
    """cologne1 begins at 25200 s: --end 600 failed inside SUMO with a traceback, and an end
    at its begin gave a silent nan; "--seeds ," a KeyError after an empty run."""
    for end in ("600", "25200"):
        r = bench(tmp_path / "b", "--scenario", "cologne1", "--seeds", "1", "--end", end)
        assert r.exit_code == 2, r.output
        assert "cologne1beginsat25200s" in "".join(r.output.split()), r.output
    r = bench(tmp_path / "b", "--scenario", "cologne1", "--seeds", ",")
    assert r.exit_code == 2 and "seedsmustbeintegers" in "".join(r.output.split()), r.output
