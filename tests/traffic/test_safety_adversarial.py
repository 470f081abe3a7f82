"""The safety guard against controllers, overrides and situations that try to get round it.

Each case below once broke a rule on real SUMO: a forged phase object showed any state, a
controller that switched the moment minimum green ended (the built-in max-pressure too) kept
an approach red far past max_red, a second control loop on one simulation jumped to its first
green without yellow, a closed movement switched max_red off for the whole intersection, and
three situations ended the whole run (a removed emergency vehicle, a program wider than its
links, a controller asking for a phase that is not a green).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cityward.traffic.backend import Override, Phase
from cityward.traffic.controllers import REGISTRY, Controller
from cityward.traffic.safety import SafetyGuard, SafetyRules
from cityward.traffic.sumo import SumoBackend, control_loop, scenario_args
from tests.traffic.conftest import build_grid

GREEN = set("Gg")


@pytest.fixture(scope="module")
def incoming_cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2x2 grid whose signals give each approach a green of its own (four greens)."""
    folder = tmp_path_factory.mktemp("incoming")
    return build_grid(folder, seed=3, period=1.5, end=400, number=2, lanes=1, layout="incoming")


@pytest.fixture
def controller() -> Iterator[Callable[[type[Controller]], str]]:
    """Registers a controller class for one test (plugins register themselves on definition)
    and takes it out of the registry afterwards."""
    names: list[str] = []

    def use(cls: type[Controller]) -> str:
        names.append(cls.name)
        return cls.name

    yield use
    for name in names:
        REGISTRY.pop(name, None)


def program(folder: Path, name: str, *greens: str) -> Path:
    """An additional file giving signal A0 a static program of ``greens`` (30 s each), each
    followed by 3 s of yellow on its green links."""
    phases = "".join(
        f'  <phase duration="30" state="{g}"/>\n'
        f'  <phase duration="3" state="{"".join("y" if c in GREEN else c for c in g)}"/>\n'
        for g in greens
    )
    add = folder / f"{name}.add.xml"
    add.write_text(
        f'<additional>\n <tlLogic id="A0" type="static" programID="{name}" offset="0">\n'
        f"{phases} </tlLogic>\n</additional>\n"
    )
    return add


def conflicts(x_phases: tuple[Phase, ...]) -> set[tuple[int, int]]:
    """Links never green together in the network's program."""
    together: set[tuple[int, int]] = set()
    width = len(x_phases[0].state)
    for p in x_phases:
        g = [i for i, c in enumerate(p.state) if c in GREEN]
        together |= {(a, b) for a in g for b in g}
    return {(a, b) for a in range(width) for b in range(width)} - together


def conflicting_greens(states: list[dict[str, str]], backend: SumoBackend) -> list[str]:
    bad = []
    for x in backend.intersections():
        foes = conflicts(x.phases)
        for n, s in enumerate(states):
            g = [i for i, c in enumerate(s[x.id]) if c in GREEN]
            if any((a, b) in foes for a in g for b in g):
                bad.append(f"{x.id} step {n}: {s[x.id]}")
    return bad


def test_a_forged_phase_object_shows_only_the_networks_own_phase(
    grid_cfg: Path, controller: Callable[[type[Controller]], str]
) -> None:
    """The guard checked the phase's index and showed the object's state: a controller that
    returned another green with every link green showed that at every intersection."""

    class Forged(Controller):
        name = "test-forged-phase"

        def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
            other = next(g for g in self.x.greens if g.index != current.index)
            return replace(other, state="G" * len(other.state))

    backend = SumoBackend([*scenario_args(grid_cfg, seed=1), "--end", "120"])
    try:
        stats = control_loop(backend, controller(Forged), 120.0, record_states=True)
        assert conflicting_greens(stats.states, backend) == []
        assert len({s["A0"] for s in stats.states}) > 2  # it did switch
    finally:
        backend.close()


def _longest_red_waits(
    backend: SumoBackend,
) -> tuple[dict[tuple[str, str], int], Callable[[float, dict[str, SafetyGuard]], None]]:
    """Per (signal, lane): the longest run of steps a lane with vehicles waiting on its approach
    stood at red, and the on_step hook that measures it from SUMO's own states."""
    xs = {x.id: x for x in backend.intersections()}
    red: dict[tuple[str, str], int] = defaultdict(int)
    worst: dict[tuple[str, str], int] = defaultdict(int)

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        for tls, x in xs.items():
            s = backend.state(tls)
            green_lanes = {x.links[i][0] for i, c in enumerate(s) if c in GREEN}
            for lane in x.in_lanes:
                waiting = any(backend.queue(p) for p, _ in backend.approach(lane))
                if waiting and lane not in green_lanes:
                    red[(tls, lane)] += 1
                    worst[(tls, lane)] = max(worst[(tls, lane)], red[(tls, lane)])
                else:
                    red[(tls, lane)] = 0

    return worst, on_step


@pytest.mark.parametrize("which", ["switch-at-every-chance", "max-pressure"])
def test_max_red_holds_against_a_controller_that_switches_the_moment_it_may(
    incoming_cfg: Path, controller: Callable[[type[Controller]], str], which: str
) -> None:
    """The controller was asked before the guard checked max_red, and a controller that
    switched the moment min_green ended always came first: approaches waited 250-288 s at red
    (max-pressure: 107 s) against a max_red of 30."""

    class PingPong(Controller):
        name = "test-ping-pong"

        def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
            a, b = self.x.greens[0], self.x.greens[1]
            return b if current.index == a.index else a

    name = controller(PingPong) if which != "max-pressure" else "max-pressure"
    rules = SafetyRules(min_green=5, max_red=30)
    backend = SumoBackend([*scenario_args(incoming_cfg, seed=1), "--end", "300"])
    try:
        assert all(len(x.greens) == 4 for x in backend.intersections())
        worst, on_step = _longest_red_waits(backend)
        stats = control_loop(backend, name, 300.0, rules=rules, on_step=on_step)
    finally:
        backend.close()
    # max_red, then the switch: the green it ends keeps its minimum, yellow, all-red
    limit = rules.max_red + rules.min_green + 3 + 2 + rules.clearance_extension + 2
    assert stats.forced_switches > 0
    over = {k: v for k, v in worst.items() if v > limit}
    assert not over, (over, limit)


def test_a_second_control_loop_on_one_simulation_clears_before_its_first_green(
    grid_cfg: Path,
) -> None:
    """The demo runs a warm-up loop, then the live one, on one simulation. Each new guard
    showed its first green at once, from whatever the signals showed: 19 hand-overs went
    straight from a green, or a yellow, to a conflicting green."""
    backend = SumoBackend([*scenario_args(grid_cfg, seed=2), "--end", "400"])
    states: list[dict[str, str]] = []
    try:
        for end in (37.0, 74.0, 111.0, 148.0):  # hand-overs in the middle of cycles
            states += control_loop(
                backend, "max-pressure", end, rules=SafetyRules(all_red=2), record_states=True
            ).states
        assert conflicting_greens(states, backend) == []
        for x in backend.intersections():
            foes = conflicts(x.phases)
            for n in range(1, len(states)):
                before, now = states[n - 1][x.id], states[n][x.id]
                for i, c in enumerate(now):
                    if c in GREEN and before[i] not in GREEN:
                        # a link turns green only after every foe has gone through red
                        assert not any(
                            (i, j) in foes and before[j] not in "rR" for j in range(len(before))
                        ), (x.id, n, before, now)
    finally:
        backend.close()


def test_a_closed_movement_does_not_switch_max_red_off_for_the_others(
    grid_cfg: Path, tmp_path: Path
) -> None:
    """A lane no green serves was always the oldest waiting lane: the guard looked at it alone,
    found no green for it and forced nothing, so an operator's held phase kept the other
    approach red 224-235 s against a max_red of 30."""
    # one movement never green: its links are red in every phase
    add = program(tmp_path, "closed", "GGGgrrrrGGGgrrrr", "rrrrGGGgrrrrrrrr")
    rules = SafetyRules(max_red=30)
    backend = SumoBackend([*scenario_args(grid_cfg, seed=1), "-a", str(add), "--end", "300"])
    try:
        worst, on_step = _longest_red_waits(backend)
        control_loop(
            backend,
            "fixed-time",
            300.0,
            rules=rules,
            on_step=on_step,
            overrides={"A0": Override(phase=0, by="operator")},
        )
        x = next(x for x in backend.intersections() if x.id == "A0")
    finally:
        backend.close()
    served = {lane for g in x.greens for lane, _ in x.lanes_of(g)}
    limit = rules.max_red + rules.min_green + 3 + 2 + rules.clearance_extension + 2
    waits = {lane: w for (tls, lane), w in worst.items() if tls == "A0" and lane in served}
    assert waits and max(waits.values()) <= limit, waits


def test_what_once_ended_the_whole_run_now_ends_nothing(
    grid_cfg: Path,
    tmp_path: Path,
    controller: Callable[[type[Controller]], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An emergency vehicle removed from the network (SUMO does not list it as arrived), a
    program with more state characters than links, and a controller asking for a phase that
    is not a green each raised out of the control loop: no intersection was controlled after."""

    class Missing(Controller):
        name = "test-missing-phase"

        def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
            if self.x.id == "C0":
                return replace(current, index=99)
            return next(g for g in self.x.greens if g.index != current.index)

    # a 17th state character for A0's 16 links (SUMO takes it: an unused index)
    add = program(tmp_path, "wide", "GGGgrrrrGGGgrrrrG", "rrrrGGGgrrrrGGGgr")
    backend = SumoBackend([*scenario_args(grid_cfg, seed=1), "-a", str(add), "--end", "200"])
    v = backend.t.vehicle
    route = backend.t.simulation.findRoute("left0A0", "C2right2").edges
    backend.t.route.add("ev-route", route)
    backend.t.vehicletype.copy("DEFAULT_VEHTYPE", "ev")
    backend.t.vehicletype.setVehicleClass("ev", "emergency")
    v.add("amb", "ev-route", typeID="ev", depart="now")
    removed: list[float] = []

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        if not removed and "amb" in v.getIDList() and v.getRoadID("amb") == route[2]:
            v.remove("amb")  # towed away, or its GPS feed ended
            removed.append(now)

    try:
        with caplog.at_level(logging.ERROR, logger="cityward.traffic"):
            stats = control_loop(
                backend, controller(Missing), 200.0, on_step=on_step, record_states=True
            )
    finally:
        backend.close()
    assert removed and stats.steps == 200
    assert len({s["A0"] for s in stats.states}) > 2  # the wide program's signal switched
    assert len({s["C1"] for s in stats.states}) > 2  # the others went on switching
    assert "intersection C0: 99 is not a green phase of C0" in caplog.text
