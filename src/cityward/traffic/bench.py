"""``cityward traffic bench``: controllers x scenarios x seeds in SUMO, with SUMO's own outputs.

Every run keeps SUMO's tripinfo file at OUT/<scenario>/<controller>/<seed>/tripinfo.xml, and the
figures in OUT/results.json and OUT/results.csv are computed from those files alone
(cityward.traffic.metrics), so anyone can recompute them.
"""

from __future__ import annotations

import csv
import logging
import math
import statistics
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cityward.traffic.emergency import (
    add_runs,
    free_flow_times,
    net_file,
    plan_runs,
    travel_times,
)
from cityward.traffic.metrics import parse_tripinfo
from cityward.traffic.sumo import SumoBackend, control_loop, scenario_args

log = logging.getLogger("cityward.traffic")

COLUMNS = [
    "scenario",
    "controller",
    "seed",
    "ev_per_hour",
    "avg_delay_s",
    "avg_trip_time_s",
    "avg_waiting_time_s",
    "completed",
    "inserted",
    "never_inserted",
    "co2_kg",
    "fuel_l",
    "ev_count",
    "ev_travel_time_s",
    "ev_free_flow_time_s",
]
# best published average delay (s) per scenario: the RESCO authors' result files
PUBLISHED_BEST = {
    "grid4x4": 32.95,
    "arterial4x4": 654.13,
    "cologne1": 26.05,
    "cologne3": 23.99,
    "cologne8": 21.62,
    "ingolstadt1": 20.90,
    "ingolstadt7": 31.19,
    "ingolstadt21": 59.64,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    cfg: Path
    begin: float
    end: float


def sumo_time(text: str) -> float:
    """A time as SUMO reads it in a configuration: seconds ("3600", "25.5") or
    [[days:]hours:]minutes:seconds ("1:00:00", "1:00:00:00"); ValueError otherwise."""
    parts = text.strip().split(":")
    if len(parts) > 4 or not all(parts):
        raise ValueError(f"{text!r} is not a time (seconds, or [[d:]h:]m:s)")
    value = 0.0
    for part, unit in zip(reversed(parts), (1, 60, 3600, 86400), strict=False):
        number = float(part)  # ValueError for anything else
        if not math.isfinite(number):
            raise ValueError(f"{text!r} is not a time (seconds, or [[d:]h:]m:s)")
        value += number * unit
    return value


def read_sumocfg_times(cfg: Path) -> tuple[float, float]:
    """(begin, end) of a SUMO configuration (0 and 3600 when it sets none); ValueError naming
    the file when it is not XML or its times are not times."""
    try:
        tree = ET.parse(cfg).getroot()
        begin = tree.find("./time/begin")
        end = tree.find("./time/end")
        return (
            sumo_time(begin.get("value", "0")) if begin is not None else 0.0,
            sumo_time(end.get("value", "3600")) if end is not None else 3600.0,
        )
    except (ET.ParseError, ValueError) as exc:
        raise ValueError(f"{cfg}: {exc}") from exc


def find_scenarios(root: Path) -> dict[str, Scenario]:
    """Every ``<name>/<name>.sumocfg`` under ``root`` (RESCO and LibSignal layouts). A file
    that cannot be read is left out with a warning naming it: one half-written draft must not
    stop every other scenario of the folder."""
    out: dict[str, Scenario] = {}
    for cfg in sorted(root.glob("**/*.sumocfg")):
        try:
            begin, end = read_sumocfg_times(cfg)
        except ValueError as exc:
            log.warning("scenario left out: %s", exc)
            continue
        out[cfg.stem] = Scenario(cfg.stem, cfg, begin, end)
    return out


def run_one(
    scenario: Scenario,
    controller: str,
    seed: int,
    out_dir: Path,
    *,
    end: float | None = None,
    ev_per_hour: float = 0.0,
    ev_as_cars: bool = False,
) -> dict[str, Any]:
    """One simulation; returns a results row (and writes SUMO's outputs to ``out_dir``).

    ``ev_as_cars`` drives the emergency runs as ordinary cars: a control run that shows what
    adding the same vehicles, with no preemption, does to the others' delay."""
    stop = end if end is not None else scenario.end
    backend = SumoBackend([*scenario_args(scenario.cfg, seed, out_dir), "--end", str(stop)])
    try:
        runs = plan_runs(backend, ev_per_hour, backend.time(), stop, seed)
        add_runs(backend, runs, as_cars=ev_as_cars)
        stats = control_loop(backend, controller, stop)
        n_x = len(backend.intersections())
    finally:
        backend.close()
    m = parse_tripinfo(out_dir / "tripinfo.xml", stop)
    ev_travel: float | None = None
    ev_free: float | None = None
    ev_worst: float | None = None
    if runs and not ev_as_cars:
        done = travel_times(out_dir / "tripinfo.xml")
        free = free_flow_times(net_file(scenario.cfg), runs, out_dir)
        both = [r.id for r in runs if r.id in done and r.id in free]
        if both:
            ev_travel = statistics.mean(done[i] for i in both)
            ev_free = statistics.mean(free[i] for i in both)
            ev_worst = max(done[i] / free[i] for i in both)
    row: dict[str, Any] = {
        "scenario": scenario.name,
        "controller": controller,
        "seed": seed,
        "ev_per_hour": ev_per_hour,
        "avg_delay_s": m.avg_delay_s,
        "avg_trip_time_s": m.avg_trip_time_s,
        "avg_waiting_time_s": m.avg_waiting_time_s,
        "completed": m.completed,
        "inserted": m.inserted,
        "never_inserted": m.never_inserted,
        "co2_kg": m.co2_kg,
        "fuel_l": m.fuel_l,
        "ev_count": m.ev_count,
        "ev_travel_time_s": ev_travel,
        "ev_free_flow_time_s": ev_free,
        "_ev_worst_ratio": ev_worst,
        "_ev_completed": m.ev_completed,
        "_ev_served": len(stats.preemption.served) if stats.preemption else 0,
        # not in the results columns: the cost of control
        "_decide_ms_per_intersection": (
            stats.decide_s * 1000 / stats.decisions if stats.decisions else 0.0
        ),
        "_wall_s": stats.wall_s,
        "_intersections": n_x,
    }
    return row


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    clean = [{k: r.get(k) for k in COLUMNS} for r in rows]
    (out / "results.json").write_bytes(orjson.dumps(clean, option=orjson.OPT_INDENT_2))
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(clean)


def summary(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Median over seeds of each figure, per (scenario, controller)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["controller"]), []).append(r)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key, rs in groups.items():
        out[key] = {
            k: statistics.median(float(r[k]) for r in rs)
            for k in ("avg_delay_s", "avg_trip_time_s", "completed", "never_inserted", "co2_kg")
        }
        out[key]["decide_ms"] = statistics.median(r["_decide_ms_per_intersection"] for r in rs)
        out[key]["wall_s"] = statistics.median(r["_wall_s"] for r in rs)
    return out


def ev_summary(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (scenario, controller), medians over seeds of the emergency-vehicle figures, and the
    change of the other vehicles' average delay against the same seed without emergency
    vehicles (in %)."""
    rows = list(rows)
    base = {
        (r["scenario"], r["controller"], r["seed"]): r["avg_delay_s"]
        for r in rows
        if not r["ev_per_hour"]
    }
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["ev_per_hour"] and r["ev_travel_time_s"] is not None:
            groups.setdefault((r["scenario"], r["controller"]), []).append(r)
    out: dict[tuple[str, str], dict[str, float]] = {}
    for key, rs in groups.items():
        changes = [
            100.0 * (r["avg_delay_s"] / base[(r["scenario"], r["controller"], r["seed"])] - 1.0)
            for r in rs
            if (r["scenario"], r["controller"], r["seed"]) in base
        ]
        out[key] = {
            "ev_travel_time_s": statistics.median(r["ev_travel_time_s"] for r in rs),
            "ev_free_flow_time_s": statistics.median(r["ev_free_flow_time_s"] for r in rs),
            "ratio": statistics.median(
                r["ev_travel_time_s"] / r["ev_free_flow_time_s"] for r in rs
            ),
            "worst_ratio": max(r["_ev_worst_ratio"] for r in rs),
            "delay_change_pct": statistics.median(changes) if changes else float("nan"),
        }
    return out
