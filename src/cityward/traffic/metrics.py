"""Per-run traffic metrics computed from SUMO's own tripinfo output.

Run SUMO with :func:`sumo_output_args` and pass the resulting ``tripinfo.xml``
to :func:`parse_tripinfo`. With those options SUMO (checked against 1.28) writes
one ``<tripinfo>`` element for every loaded vehicle:

* **completed**: ``arrival >= 0`` and an empty ``vaporized`` attribute;
* **unfinished**: departed (``depart >= 0``) but still driving at the end
  (``arrival="-1"``, ``vaporized="end"``, partial ``duration``/``timeLoss``/
  ``waitingTime``/emissions up to the end) or removed early (``vaporized`` set to
  e.g. ``collision``/``traci``);
* **never inserted**: still waiting for insertion at the end
  (``--tripinfo-output.write-undeparted``): ``depart="-1"``, ``timeLoss="0"``
  and ``departDelay`` = *time the simulation stopped* - *desired departure*.

Definitions (all times in seconds):

* **delay** (RESCO: Ault & Sharon, "Reinforcement Learning Benchmarks for Traffic
  Signal Control", NeurIPS 2021 Datasets & Benchmarks; ``resco_benchmark/utils/
  readXML.py``): per vehicle ``timeLoss + departDelay``, averaged over *all*
  vehicles, i.e. completed + unfinished (their partial values as written) + never
  inserted. For the never-inserted ones this is ``departDelay``, which SUMO
  computes as ``end_time - desired depart`` -- exactly RESCO's term for vehicles
  that never entered. RESCO reconstructs that set from the route file (vehicles
  desired after the last departure); SUMO's ``write-undeparted`` list is exact.
* **trip time**: ``duration`` averaged over completed vehicles.
* **waiting time**: ``waitingTime`` averaged over departed vehicles
  (completed + unfinished).
* **CO2 / fuel**: sums of ``<emissions CO2_abs fuel_abs>`` over all vehicles
  (emissions of unfinished vehicles up to the end included). Since SUMO 1.14 both
  are in mg; fuel is converted to litres with the gasoline density 742 g/l, the
  value SUMO itself uses for ``--emissions.volumetric-fuel`` with its default
  (petrol) emission class. Diesel fleets would need 836 g/l; do not combine with
  ``--emissions.volumetric-fuel`` (fuel_abs would then be ml).
* **emergency vehicles**: ``vType`` id containing ``emergency``
  (case-insensitive) or listed in ``emergency_vtypes`` (tripinfo carries no
  vClass; use :func:`emergency_vtypes_from_files` to collect the vTypes with
  ``vClass="emergency"``). ``ev_travel_time_s`` is the mean ``duration`` of the
  completed ones. The average delay is that of all *other* vehicles, so runs with and
  without emergency vehicles compare directly.

Averages over an empty set are ``nan``.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GASOLINE_DENSITY_G_PER_L",
    "RunMetrics",
    "emergency_vtypes_from_files",
    "parse_tripinfo",
    "sumo_output_args",
]

GASOLINE_DENSITY_G_PER_L = 742.0
_MG_PER_KG = 1e6
_TIME_EPS = 1e-6


def sumo_output_args(out_dir: Path) -> list[str]:
    """SUMO options that write what :func:`parse_tripinfo` needs to ``out_dir/tripinfo.xml``.

    ``out_dir`` must exist. Boolean options get an explicit ``true`` so the list can be
    appended anywhere in a command line (also for ``traci.start``/``libsumo``).
    """
    return [
        "--tripinfo-output",
        str(out_dir / "tripinfo.xml"),
        "--tripinfo-output.write-unfinished",
        "true",
        "--tripinfo-output.write-undeparted",
        "true",
        "--device.emissions.probability",
        "1",
    ]


@dataclass(frozen=True)
class RunMetrics:
    """Aggregate metrics of one simulation run (see the module docstring)."""

    avg_delay_s: float
    avg_trip_time_s: float
    avg_waiting_time_s: float
    completed: int
    inserted: int
    never_inserted: int
    co2_kg: float
    fuel_l: float
    ev_count: int
    ev_travel_time_s: float | None
    vehicles: int
    ev_completed: int = 0

    @property
    def unfinished(self) -> int:
        """Departed vehicles that did not complete their trip (still driving or removed)."""
        return self.inserted - self.completed


def _time(value: str | None) -> float:
    """A SUMO time attribute: seconds, or ``[D:]HH:MM:SS`` with --human-readable-time."""
    if value is None or value == "":
        return 0.0
    if ":" not in value:
        return float(value)
    sign = -1.0 if value.startswith("-") else 1.0
    seconds = 0.0
    for part, factor in zip(
        reversed(value.lstrip("-").split(":")), (1.0, 60.0, 3600.0, 86400.0), strict=False
    ):
        seconds += float(part) * factor
    return sign * seconds


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def emergency_vtypes_from_files(paths: Iterable[Path]) -> frozenset[str]:
    """Ids of the ``<vType vClass="emergency">`` definitions in route/additional files."""
    found: set[str] = set()
    for path in paths:
        for _, elem in ET.iterparse(path, events=("end",)):
            if elem.tag == "vType" and elem.get("vClass") == "emergency":
                found.add(elem.get("id", ""))
            if elem.tag in ("vehicle", "trip", "flow", "vType", "route", "person"):
                elem.clear()
    found.discard("")
    return frozenset(found)


def parse_tripinfo(path: Path, end_time: float, emergency_vtypes: Iterable[str] = ()) -> RunMetrics:
    """Stream-parse a tripinfo file written with :func:`sumo_output_args`.

    ``end_time`` is the absolute simulation time the run was meant to stop at (e.g.
    the sumocfg ``<end>``). The delay of never-inserted vehicles is SUMO's
    ``departDelay``, which is relative to the time SUMO actually stopped; a file
    with departures or arrivals after ``end_time`` therefore raises ``ValueError``.
    """
    ev_types = frozenset(emergency_vtypes)
    vehicles = completed = inserted = never_inserted = 0
    delay_sum = trip_sum = wait_sum = 0.0
    co2_mg = fuel_mg = 0.0
    ev_count = ev_completed = 0
    ev_time_sum = 0.0

    root: ET.Element | None = None
    for event, elem in ET.iterparse(path, events=("start", "end")):
        if root is None:
            root = elem
            continue
        if event != "end" or elem.tag != "tripinfo":
            continue

        vehicles += 1
        depart = _time(elem.get("depart"))
        delay = _time(elem.get("timeLoss")) + _time(elem.get("departDelay"))
        vtype = elem.get("vType", "")
        is_ev = vtype in ev_types or "emergency" in vtype.lower()
        ev_count += is_ev
        if not is_ev:
            delay_sum += delay

        if depart < 0:
            never_inserted += 1
        else:
            inserted += 1
            arrival = _time(elem.get("arrival"))
            if depart > end_time + _TIME_EPS or arrival > end_time + _TIME_EPS:
                vid = elem.get("id")
                raise ValueError(
                    f"{path}: vehicle {vid!r} departs/arrives after end_time={end_time}"
                )
            wait_sum += _time(elem.get("waitingTime"))
            if arrival >= 0 and not elem.get("vaporized"):
                completed += 1
                duration = _time(elem.get("duration"))
                trip_sum += duration
                if is_ev:
                    ev_completed += 1
                    ev_time_sum += duration

        emissions = elem.find("emissions")
        if emissions is not None:
            co2_mg += float(emissions.get("CO2_abs", "0"))
            fuel_mg += float(emissions.get("fuel_abs", "0"))
        root.clear()

    return RunMetrics(
        avg_delay_s=_mean(delay_sum, vehicles - ev_count),
        avg_trip_time_s=_mean(trip_sum, completed),
        avg_waiting_time_s=_mean(wait_sum, inserted),
        completed=completed,
        inserted=inserted,
        never_inserted=never_inserted,
        co2_kg=co2_mg / _MG_PER_KG,
        fuel_l=fuel_mg / 1000.0 / GASOLINE_DENSITY_G_PER_L,
        ev_count=ev_count,
        ev_travel_time_s=ev_time_sum / ev_completed if ev_completed else None,
        vehicles=vehicles,
        ev_completed=ev_completed,
    )
