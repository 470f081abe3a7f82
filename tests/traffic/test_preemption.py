"""Emergency-vehicle preemption on a real SUMO grid, under every registered controller.

Emergency vehicles (vClass emergency) cross the 3x3 grid on routes through three signals. With
preemption, the signals ahead of each are green before it reaches their stop line; without it
(same seed, same routes), some arrive at red. No conflicting greens on any step.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import pytest

from cityward.traffic.controllers import load_builtin
from cityward.traffic.emergency import EV_TYPE, PlannedRun, add_runs, free_flow_times
from cityward.traffic.preemption import Preemption, edge_of
from cityward.traffic.safety import SafetyGuard, SafetyRules
from cityward.traffic.sumo import SumoBackend, control_loop, scenario_args
from tests.conftest import shared_path

END = 700.0
RULES = SafetyRules(min_green=6, yellow=3.0, all_red=2.0, max_red=90)
GREEN = set("Gg")


def straight_routes(backend: SumoBackend) -> list[tuple[str, str, str, str, str]]:
    """Routes that cross three signals in a row (fringe to fringe through the grid)."""
    t = backend.t
    signalled = {(edge_of(i), edge_of(o)) for x in backend.intersections() for i, o in x.links if i}
    edges = [e for e in t.edge.getIDList() if not e.startswith(":")]
    out = []
    for a in edges:
        for b in edges:
            if a == b:
                continue
            r = tuple(t.simulation.findRoute(a, b).edges)
            pairs = list(itertools.pairwise(r))
            if sum(p in signalled for p in pairs) >= 3 and len(r) == 5:
                out.append(r)
    return sorted(set(out))[:6]


class Arrivals:
    """The signal each emergency vehicle shows at its stop line, from its second signal on: the
    first is only ~100 m after the vehicle enters, less than the worst-case lead time (a switch
    under way, its minimum green, ours), so the signals after it are judged."""

    def __init__(self, backend: SumoBackend) -> None:
        self.backend = backend
        self.seen: list[str] = []
        self._pending: dict[str, tuple[str, int]] = {}

    def step(self) -> None:
        v = self.backend.t.vehicle
        for vid in v.getIDList():
            if v.getTypeID(vid) != EV_TYPE:
                continue
            nxt = v.getNextTLS(vid)
            if not nxt:
                continue
            tls, link, dist, _ = nxt[0]
            if dist < 8.0 and self._pending.get(vid) != (tls, link):
                if vid in self._pending:
                    self.seen.append(self.backend.state(tls)[link])
                self._pending[vid] = (tls, link)


def run(grid_cfg: Path, controller: str, preemption: bool) -> tuple[list[str], int, dict[str, int]]:
    """(signal seen by each EV arriving at a stop line, steps, conflicting-green count)."""
    backend = SumoBackend([*scenario_args(grid_cfg, seed=5), "--end", str(END)])
    arrivals = Arrivals(backend)
    bad: dict[str, int] = defaultdict(int)
    try:
        routes = straight_routes(backend)
        assert len(routes) >= 4
        runs = [PlannedRun(f"ev{n}", 120.0 + 70.0 * n, r) for n, r in enumerate(routes)]
        add_runs(backend, runs)
        xs = {x.id: x for x in backend.intersections()}

        def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
            arrivals.step()
            for tls, x in xs.items():
                s = backend.state(tls)
                g = [i for i, c in enumerate(s) if c in GREEN]
                if any((a, b) not in x.compatible for a in g for b in g):
                    bad[tls] += 1

        stats = control_loop(
            backend, controller, END, rules=RULES, on_step=on_step, preemption=preemption
        )
    finally:
        backend.close()
    return arrivals.seen, stats.steps, bad


@pytest.mark.parametrize("controller", sorted(load_builtin()))
def test_preemption_gives_green_before_the_emergency_vehicle_arrives(
    controller: str, grid_cfg: Path
) -> None:
    with_pre, steps, bad = run(grid_cfg, controller, preemption=True)
    assert steps == int(END)
    assert not bad, f"conflicting greens during preemption: {dict(bad)}"
    assert len(with_pre) >= 8, "every emergency vehicle should meet three signals"
    red = [c for c in with_pre if c not in GREEN]
    assert not red, f"{controller}: {len(red)} of {len(with_pre)} arrivals at red/yellow"
    without, _, _ = run(grid_cfg, controller, preemption=False)
    assert any(c not in GREEN for c in without), "without preemption some should meet red"


def test_free_flow_time_is_measured_on_the_empty_network(grid_cfg: Path) -> None:
    backend = SumoBackend([*scenario_args(grid_cfg, seed=5), "--end", "10"])
    try:
        routes = straight_routes(backend)[:2]
        length = sum(backend.lane_length(f"{e}_0") for e in routes[0])
    finally:
        backend.close()
    runs = [PlannedRun(f"ev{n}", 0.0, r) for n, r in enumerate(routes)]
    free = free_flow_times(grid_cfg.parent / "grid.net.xml", runs, grid_cfg.parent / "ff")
    assert set(free) == {"ev0", "ev1"}
    # at most the speed limit (13.89 m/s), not much slower with no one else and no signals
    assert length / 13.89 <= free["ev0"] + 1.0 <= 1.5 * length / 13.89 + 10.0


def test_the_switch_waits_for_the_latest_moment_and_no_other_green_starts_meanwhile(
    grid_cfg: Path,
) -> None:
    """A signal showing another green when an emergency vehicle's request starts keeps serving
    it until the switch must begin; meanwhile it starts no green that does not serve the
    vehicle (a green that serves it may still end while there is time to come back), and the
    vehicle still meets green (the test above)."""
    backend = SumoBackend([*scenario_args(grid_cfg, seed=5), "--end", str(END)])
    deferred = 0  # steps a request was on while another green kept running
    wrong: list[tuple[float, str]] = []  # greens started while reserved, not serving the EV
    watcher: dict[str, Preemption] = {}
    switching: dict[str, bool] = {}
    try:
        routes = straight_routes(backend)
        add_runs(backend, [PlannedRun(f"ev{n}", 120.0 + 70.0 * n, r) for n, r in enumerate(routes)])

        def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
            nonlocal deferred
            # a second view of the state the loop saw this step: preemption's requests
            pre = watcher.setdefault("p", Preemption(backend, guards))
            pre.update(now)
            for tls, g in guards.items():
                t = g.transition
                d = pre.decide(tls, now) if pre.requests else None
                began = t is not None and not switching.get(tls)
                if began and d is not None and not d.links <= t.target.green_links():  # type: ignore[union-attr]
                    # a switch began this step while reserved, to a green not serving it: only
                    # allowed away from a green serving it that could still come back in time
                    r = next(r for r in pre.requests[tls] if not r.expired)
                    back = 2 * (g.yellow + g.all_red) + g.rules.min_green + r.clear_s
                    if not (d.links <= g.current.green_links() and r.eta > back):
                        wrong.append((now, tls))
                switching[tls] = t is not None
                other = g.in_green and d is not None and not d.links <= g.current.green_links()
                if other and d is not None and not d.switch:
                    deferred += 1

        control_loop(backend, "adaptive", END, rules=RULES, on_step=on_step)
    finally:
        backend.close()
    assert deferred > 0, "some requests should find another green that can run on a while"
    assert not wrong, f"greens started for others while reserved: {wrong}"


def _arterial_ratios(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int, **off: object
) -> tuple[float, float]:
    """arterial4x4 with 6 emergency vehicles an hour, ``seed``: their travel over free-flow
    time as preemption is, and again with the module settings ``off`` changed."""
    from cityward.traffic import preemption
    from cityward.traffic.bench import find_scenarios, run_one

    sc = find_scenarios(shared_path("data", "traffic"))["arterial4x4"]
    now = run_one(sc, "adaptive", seed, tmp_path / "now", ev_per_hour=6)
    for name, value in off.items():
        monkeypatch.setattr(preemption, name, value)
    other = run_one(sc, "adaptive", seed, tmp_path / "other", ev_per_hour=6)
    free = now["ev_free_flow_time_s"]
    assert free == other["ev_free_flow_time_s"]
    return now["ev_travel_time_s"] / free, other["ev_travel_time_s"] / free


def test_a_spillback_ahead_of_an_emergency_vehicle_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """arterial4x4 (oversaturated), seed 3: emergency vehicles on the eastbound arterial wait
    behind cars that cannot change into a left-turn lane queued back from the next signal but
    one. Flushing that approach (and serving a request again once its vehicle moves) must cut
    their travel time; same seed and runs, one run without the flush for comparison."""
    ratio, before = _arterial_ratios(
        tmp_path, monkeypatch, 3, FLUSH=False, FLUSH_OWN=False, REVIVE_M=float("inf")
    )
    # measured: 1.55 against 3.19 (1.62 before the flush of the vehicle's own approach)
    assert ratio < 0.75 * before, (ratio, before)


def test_an_emergency_vehicles_own_approach_is_flushed_when_it_spills_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """arterial4x4, seed 2: an emergency vehicle stands at its next signal behind a car that
    waits to change into the left-turn lane, queued full; the vehicle's own through green does
    not empty that lane. Asking for the green that serves its whole approach does; same seed
    and runs, one run without it for comparison."""
    ratio, before = _arterial_ratios(tmp_path, monkeypatch, 2, FLUSH_OWN=False)
    # measured: 1.24 against 1.30 (1.27 against 1.49 before max_red was enforced ahead of the
    # controller, which serves the starved side streets sooner with or without the flush)
    assert ratio < 0.97 * before, (ratio, before)


def _slow_road_run(grid_cfg: Path) -> tuple[int, list[str]]:
    """Emergency runs across the grid with every road limited to 20 km/h: (steps with some
    signal reserved for one of them, signal seen by each at the stop lines after its first)."""
    backend = SumoBackend([*scenario_args(grid_cfg, seed=5), "--end", str(END)])
    reserved = 0
    arrivals = Arrivals(backend)
    watcher: dict[str, Preemption] = {}
    try:
        t = backend.t
        for lane in t.lane.getIDList():
            if not lane.startswith(":"):
                t.lane.setMaxSpeed(lane, 20 / 3.6)
        routes = straight_routes(backend)
        add_runs(backend, [PlannedRun(f"ev{n}", 120.0 + 90.0 * n, r) for n, r in enumerate(routes)])

        def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
            nonlocal reserved
            pre = watcher.setdefault("p", Preemption(backend, guards))
            pre.update(now)
            reserved += sum(1 for rs in pre.requests.values() if any(not r.expired for r in rs))
            arrivals.step()

        control_loop(backend, "adaptive", END, rules=RULES, on_step=on_step)
    finally:
        backend.close()
    return reserved, arrivals.seen


def test_on_a_slow_road_arrival_is_estimated_at_its_speed_limit(
    grid_cfg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On roads limited to 20 km/h an emergency vehicle's arrival is estimated at 20 km/h, not
    at the 50 km/h used elsewhere: its signals are reserved for it much later (a 50 km/h
    estimate held their greens for a vehicle still far up the road), and it still meets green
    at every signal."""
    from cityward.traffic import preemption

    reserved, arrivals = _slow_road_run(grid_cfg)
    monkeypatch.setattr(preemption, "SLOW_ROAD_MS", 0.0)  # the 50 km/h estimate everywhere
    reserved_before, arrivals_before = _slow_road_run(grid_cfg)
    assert len(arrivals) >= 8 and len(arrivals_before) >= 8
    assert all(c in GREEN for c in arrivals), arrivals
    assert all(c in GREEN for c in arrivals_before), arrivals_before
    assert reserved < 0.7 * reserved_before, (reserved, reserved_before)


def test_an_emergency_vehicle_waiting_behind_anothers_green_keeps_its_request(
    grid_cfg: Path,
) -> None:
    """ev2 stood at its stop line while a slow ev1 held the conflicting green: after 30 s
    without progress its request expired, as if blocked further on, and never came back (it
    cannot get 20 m closer than the stop line). ev1 crossed at 160 s; ev2, its approach held
    red by an operator's override, waited for max_red: it entered at 283 s."""
    from cityward.traffic.backend import Override

    backend = SumoBackend([*scenario_args(grid_cfg, seed=2), "--end", "500"])
    v = backend.t.vehicle
    backend.t.vehicletype.copy("DEFAULT_VEHTYPE", "ev")
    backend.t.vehicletype.setVehicleClass("ev", "emergency")
    backend.t.route.add("r1", ["A1B1", "B1C1", "C1right1"])
    backend.t.route.add("r2", ["B0B1", "B1B2", "B2top1"])
    entered: dict[str, float] = {}

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        ids = set(v.getIDList())
        if now == 100:
            v.add("ev1", "r1", typeID="ev", depart="now", departPos="0")
        if now == 104:
            v.add("ev2", "r2", typeID="ev", depart="now")
        if "ev1" in ids and v.getRoadID("ev1") == "A1B1":
            v.setSpeed("ev1", 1.0 if v.getLanePosition("ev1") > 60 else -1)  # crawls at the end
        for e in ("ev1", "ev2"):
            if e in ids and v.getRoadID(e).startswith(":B1"):
                entered.setdefault(e, now)

    try:
        control_loop(
            backend,
            "fixed-time",
            330.0,
            on_step=on_step,
            overrides={"B1": Override(phase=2, by="op")},
        )
    finally:
        backend.close()
    assert entered["ev1"] < entered["ev2"] < entered["ev1"] + 60, entered  # measured: 160, 193
