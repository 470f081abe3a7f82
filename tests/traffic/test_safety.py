"""Every controller, on a real SUMO network, obeys the safety rules on every step.

The rules are checked from the signal states SUMO reports, against a conflict table read from
the network's own program here in the test (links never green together there conflict).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from cityward.traffic.controllers import load_builtin
from cityward.traffic.safety import SafetyGuard, SafetyRules
from cityward.traffic.sumo import SumoBackend, control_loop, scenario_args

YELLOW, ALL_RED = 3.0, 2.0
RULES = SafetyRules(min_green=6, yellow=YELLOW, all_red=ALL_RED, max_red=90)
END = 600.0
GREEN = set("Gg")


def conflicts_from_program(backend: SumoBackend) -> dict[str, set[tuple[int, int]]]:
    out = {}
    for tls in backend.t.trafficlight.getIDList():
        logic = backend.t.trafficlight.getAllProgramLogics(tls)[0]
        together: set[tuple[int, int]] = set()
        width = len(logic.phases[0].state)
        for p in logic.phases:
            g = [i for i, c in enumerate(p.state) if c in GREEN]
            together |= {(a, b) for a in g for b in g}
        out[tls] = {(a, b) for a in range(width) for b in range(width)} - together
    return out


def runs(states: list[str], link: int) -> list[tuple[str, int, int]]:
    """Maximal runs of one link's signal: (kind, first step, length); kind is g, y or r."""
    kinds = ["g" if s[link] in GREEN else ("y" if s[link] in "yY" else "r") for s in states]
    out: list[tuple[str, int, int]] = []
    for n, k in enumerate(kinds):
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1], out[-1][2] + 1)
        else:
            out.append((k, n, 1))
    return out


@pytest.mark.parametrize("controller", sorted(load_builtin()))
def test_controller_respects_the_safety_rules(controller: str, grid_cfg: Path) -> None:
    backend = SumoBackend([*scenario_args(grid_cfg, seed=3), "--end", str(END)])
    queued: dict[str, list[set[str]]] = defaultdict(list)

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        for tls, g in guards.items():
            queued[tls].append({lane for lane in g.x.in_lanes if backend.queue(lane) > 0})

    try:
        conflicts = conflicts_from_program(backend)
        xs = {x.id: x for x in backend.intersections()}
        stats = control_loop(
            backend, controller, END, rules=RULES, on_step=on_step, record_states=True
        )
    finally:
        backend.close()
    assert stats.steps == int(END) and len(xs) == 9
    switches = 0
    for tls, x in xs.items():
        states = [s[tls] for s in stats.states]
        # 1. never two conflicting links green together
        for n, s in enumerate(states):
            g = [i for i, c in enumerate(s) if c in GREEN]
            bad = [(a, b) for a in g for b in g if (a, b) in conflicts[tls]]
            assert not bad, f"{controller} {tls} step {n}: conflicting greens {bad} in {s}"
        for link in range(len(states[0])):
            r = runs(states, link)
            for k, (kind, first, length) in enumerate(r):
                nxt = r[k + 1][0] if k + 1 < len(r) else None
                if kind == "g" and nxt is not None:
                    switches += 1
                    # 2. a green that ends lasted the minimum green (the first may be cut short
                    # only by the start of the simulation)
                    assert first == 0 or length >= RULES.min_green, (tls, link, first, length)
                    # 3. it ends in yellow, for the yellow time
                    assert nxt == "y", f"{tls} link {link} went from green to red at {first}"
                if kind == "y" and nxt is not None:
                    assert length == YELLOW, (tls, link, first, length)
                    assert nxt == "r"
            # 4. all-red: after any link's yellow, no conflicting link turns green within all_red
        for n in range(1, len(states)):
            newly = {
                i for i, c in enumerate(states[n]) if c in GREEN and states[n - 1][i] not in GREEN
            }
            for i in newly:
                for back in range(1, int(ALL_RED) + 1):
                    if n - back < 0:
                        break
                    prev = states[n - back]
                    foes_yellow = [
                        j for j, c in enumerate(prev) if c in "yY" and (i, j) in conflicts[tls]
                    ]
                    assert not foes_yellow, f"{tls} step {n}: {i} green right after yellow"
        # 5. no lane with vehicles waiting stays red longer than max_red (plus the clearance)
        limit = RULES.max_red + YELLOW + ALL_RED + RULES.clearance_extension + 2
        waiting_red: dict[str, int] = defaultdict(int)
        for n, s in enumerate(states):
            green_lanes = {x.links[i][0] for i, c in enumerate(s) if c in GREEN}
            for lane in x.in_lanes:
                if lane in queued[tls][n] and lane not in green_lanes:
                    waiting_red[lane] += 1
                    assert waiting_red[lane] <= limit, f"{controller} {tls} {lane} starved at {n}"
                else:
                    waiting_red[lane] = 0
    assert switches > 20, "the controllers should have switched phases"


def test_a_controller_cannot_show_a_phase_outside_the_program(grid_cfg: Path) -> None:
    backend = SumoBackend([*scenario_args(grid_cfg, seed=1), "--end", "60"])
    try:
        x = backend.intersections()[0]
        guard = SafetyGuard(backend, x, RULES, backend.time())
        from dataclasses import replace

        forged = replace(x.greens[0], index=99, state="G" * len(x.greens[0].state))
        with pytest.raises(ValueError):
            guard.request(forged, backend.time())
        # and a switch before the minimum green is refused
        assert not guard.request(x.greens[1], backend.time() + 1)
        assert guard.request(x.greens[1], backend.time() + RULES.min_green)
    finally:
        backend.close()


def test_no_green_starts_across_a_vehicle_standing_in_the_junction() -> None:
    """ingolstadt21's gneJ257: left turners wait inside the junction for a gap. A green that
    crosses their path starts only once they have left (or after the longest extension)."""
    from tests.conftest import shared_path

    cfg = shared_path("data", "traffic", "resco", "ingolstadt21", "ingolstadt21.sumocfg")
    backend = SumoBackend([*scenario_args(cfg, seed=2), "--end", "58500"])
    extended: dict[str, int] = defaultdict(int)
    held_before: dict[str, bool] = defaultdict(bool)  # the all-red was extended last step
    crossed: list[tuple[float, str]] = []
    shown: dict[str, str] = {}

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        for tls, g in guards.items():
            state = backend.state(tls)
            before = shown.get(tls, state)
            shown[tls] = state
            starting = frozenset(
                i for i, c in enumerate(state) if c in GREEN and before[i] not in GREEN
            )
            ended = frozenset(i for i, c in enumerate(before) if c in "yY")
            # a green starting now must not cross a vehicle standing on an ended movement's
            # path, unless the guard had held the all-red up to the longest extension
            if starting and not held_before[tls] and backend.conflict_in_box(tls, ended, starting):
                crossed.append((now, tls))
            held_before[tls] = g.extensions > extended[tls]
            extended[tls] = g.extensions

    try:
        control_loop(backend, "adaptive", 58500.0, on_step=on_step)
    finally:
        backend.close()
    assert not crossed, crossed[:5]
    assert sum(extended.values()) > 0, "no all-red was extended: the check saw nothing"
