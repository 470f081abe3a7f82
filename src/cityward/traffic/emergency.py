"""Emergency vehicles for benchmarks: random long runs added to a SUMO scenario, and their
free-flow times (the same routes on the empty network, signals off).

The runs are planned from the network alone and a seed: entry-to-exit routes found by SUMO's
router, preferring those that cross the most signalised intersections, departing at random
times that leave them time to finish within the scenario.
"""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cityward.traffic.preemption import edge_of
from cityward.traffic.sumo import SumoBackend

EV_TYPE = "cw_emergency"  # metrics recognise emergency vehicles by "emergency" in the vType
# the same runs driven as ordinary cars (a control: what adding any six vehicles does to the
# others' delay); "emergency" in the id keeps them out of the others' figures too
CONTROL_TYPE = "cw_emergency_as_car"
FINISH_S = 900.0  # the last run departs this long before the end


@dataclass(frozen=True, slots=True)
class PlannedRun:
    id: str
    depart: float
    edges: tuple[str, ...]


def net_file(cfg: Path) -> Path:
    """The network file named by a .sumocfg."""
    root = ET.parse(cfg).getroot()
    net = root.find("./input/net-file")
    if net is None or not net.get("value"):
        raise ValueError(f"{cfg}: no <net-file> in <input>")
    return (cfg.parent / str(net.get("value")).split(",")[0]).resolve()


def _ensure_type(backend: SumoBackend) -> None:
    vt = backend.t.vehicletype
    if CONTROL_TYPE not in vt.getIDList():
        vt.copy("DEFAULT_VEHTYPE", CONTROL_TYPE)
        vt.setSpeedFactor(CONTROL_TYPE, 1.0)
        vt.setSpeedDeviation(CONTROL_TYPE, 0.0)
    if EV_TYPE not in vt.getIDList():
        vt.copy("DEFAULT_VEHTYPE", EV_TYPE)
        vt.setVehicleClass(EV_TYPE, "emergency")
        vt.setSpeedFactor(EV_TYPE, 1.0)
        vt.setSpeedDeviation(EV_TYPE, 0.0)
        vt.setColor(EV_TYPE, (255, 0, 0, 255))
        # siren on: at junctions without signals others give way (SUMO's impatience 1 makes
        # it take the right of way when others can brake); red lights it still obeys
        vt.setImpatience(EV_TYPE, 1.0)


def plan_runs(
    backend: SumoBackend, per_hour: float, begin: float, end: float, seed: int
) -> list[PlannedRun]:
    """``per_hour`` emergency runs per simulated hour between ``begin`` and ``end``."""
    if per_hour <= 0:
        return []
    rng = random.Random(seed)
    best = run_routes(backend, rng)
    count = max(1, round(per_hour * (end - begin) / 3600.0))
    last = max(begin + 60.0, end - FINISH_S)
    times = sorted(rng.uniform(begin + 60.0, last) for _ in range(count))
    return [
        PlannedRun(f"emergency_{n}", round(dep), rng.choice(best)) for n, dep in enumerate(times)
    ]


def run_routes(backend: SumoBackend, rng: random.Random) -> list[tuple[str, ...]]:
    """Up to five entry-to-exit routes, those crossing the most signals first (ties: longest)."""
    t = backend.t
    _ensure_type(backend)
    succ: dict[str, set[str]] = {}  # edge -> edges it leads to (no turnarounds)
    pred: dict[str, set[str]] = {}
    for lane in t.lane.getIDList():
        if lane.startswith(":"):
            continue
        e = edge_of(lane)
        succ.setdefault(e, set())
        pred.setdefault(e, set())
        for nxt in backend.successors(lane):
            succ[e].add(edge_of(nxt))
            pred.setdefault(edge_of(nxt), set()).add(e)
    edges = sorted(succ)
    sources = [e for e in edges if not pred[e]] or edges
    sinks = [e for e in edges if not succ[e]] or edges
    signalled = {
        (edge_of(i), edge_of(o)) for x in backend.intersections() for i, o in x.links if i and o
    }
    scored: dict[tuple[str, ...], tuple[int, float]] = {}
    for _ in range(60):
        a, b = rng.choice(sources), rng.choice(sinks)
        if a == b:
            continue
        found = t.simulation.findRoute(a, b, vType=EV_TYPE)
        route = tuple(found.edges)
        pairs = [(route[k], route[k + 1]) for k in range(len(route) - 1)]
        if len(route) < 2 or any(y not in succ.get(x, ()) for x, y in pairs):  # a U-turn
            continue
        crossings = sum(p in signalled for p in pairs)
        if crossings:
            scored[route] = (crossings, float(found.travelTime))
    if not scored:
        raise ValueError("no route for emergency vehicles crosses a signalised intersection")
    return sorted(scored, key=lambda r: scored[r], reverse=True)[:5]


def add_runs(backend: SumoBackend, runs: Sequence[PlannedRun], *, as_cars: bool = False) -> None:
    """Put planned runs into a running simulation (``as_cars``: as ordinary cars, which no
    signal preempts for, instead of emergency vehicles)."""
    _ensure_type(backend)
    t = backend.t
    for r in runs:
        t.route.add(f"{r.id}_route", list(r.edges))
        t.vehicle.add(
            r.id,
            f"{r.id}_route",
            typeID=CONTROL_TYPE if as_cars else EV_TYPE,
            depart=str(r.depart),
            departLane="best",
            departSpeed="max",
        )


def free_flow_times(net: Path, runs: Sequence[PlannedRun], out_dir: Path) -> dict[str, float]:
    """Travel time of each run alone on the network with every signal off (SUMO's tripinfo
    of that run is kept at ``out_dir/free_flow_tripinfo.xml``)."""
    if not runs:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    trips = out_dir / "free_flow_tripinfo.xml"
    b = SumoBackend(
        [
            "-n",
            str(net),
            "--tls.all-off",
            "true",
            "--no-step-log",
            "--no-warnings",
            "--duration-log.disable",
            "--time-to-teleport",
            "-1",
            "--begin",
            "0",
            "--tripinfo-output",
            str(trips),
        ]
    )
    try:
        # one at a time, far enough apart that they never meet
        add_runs(b, [PlannedRun(r.id, 600.0 * n, r.edges) for n, r in enumerate(runs)])
        limit = 600.0 * len(runs) + 7200.0
        while b.pending() and b.time() < limit:
            b.advance()
    finally:
        b.close()
    return travel_times(trips)


def travel_times(tripinfo: Path) -> dict[str, float]:
    """Duration of every completed emergency run in a tripinfo file."""
    out: dict[str, float] = {}
    for _, elem in ET.iterparse(tripinfo):
        if elem.tag == "tripinfo" and elem.get("vType") == EV_TYPE:
            if float(elem.get("arrival", "-1")) >= 0 and not elem.get("vaporized"):
                out[str(elem.get("id"))] = float(elem.get("duration", "nan"))
            elem.clear()
    return out
