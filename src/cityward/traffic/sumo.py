"""The SUMO backend (libsumo in process by default, TraCI over a socket when configured) and the
simulation loop that runs controllers above the safety layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cityward.traffic.backend import (
    EmergencyVehicle,
    Intersection,
    Override,
    Phase,
    SignalBackend,
)
from cityward.traffic.controllers import Controller, create
from cityward.traffic.preemption import Preemption, PreemptionStats
from cityward.traffic.safety import SafetyGuard, SafetyRules

log = logging.getLogger("cityward.traffic")
Api = Literal["libsumo", "traci"]
SHORT_LANE_M = 30.0  # a lane shorter than this is a stub: its exits count with it


def sumo_binary(name: str = "sumo") -> str:
    """The SUMO binary of the eclipse-sumo package (no system install needed)."""
    import sumolib

    return str(sumolib.checkBinary(name))


def _api(kind: Api) -> Any:
    if kind == "libsumo":
        import libsumo

        return libsumo
    import traci

    return traci


class SumoBackend(SignalBackend):
    """Signals and lane detectors of a running SUMO simulation.

    ``reach`` is how far upstream of a stop line vehicles are seen (the approach of a lane:
    the lane and the lanes feeding it, up to the previous signal), like a radar or a chain of
    loop detectors in the field.
    """

    positions = True

    def __init__(self, args: Sequence[str], api: Api = "libsumo", reach: float = 150.0) -> None:
        self.reach = reach
        self.api_kind = api
        self.t = _api(api)
        self.t.start([sumo_binary(), *args])
        self._closed = False
        self._lengths: dict[str, float] = {}
        self._speeds: dict[str, float] = {}
        self._next: dict[str, list[str]] = {}
        self._evs: dict[str, float] = {}  # emergency vehicle id -> first seen
        self._watch_departures(self.t.vehicle.getIDList())
        self._intersections = [self._read(tls) for tls in self.t.trafficlight.getIDList()]
        self._approaches = self._find_approaches()
        self._fed = {n for nxt in self._next.values() for n in nxt}  # lanes other lanes enter
        # per signal: per link, the junction's internal lanes on its path, and their foes
        self._boxes: dict[str, tuple[list[frozenset[str]], list[frozenset[str]]]] = {}

    def _find_approaches(self) -> dict[str, tuple[tuple[str, float], ...]]:
        """Walk upstream from every signal's incoming lane, stopping at other signals."""
        ln = self.t.lane
        signalled = {i for x in self._intersections for i in x.in_lanes}
        feeders: dict[str, list[str]] = {}
        for lane in ln.getIDList():
            if lane.startswith(":"):
                continue
            for link in ln.getLinks(lane):
                if link[6] != "t":  # a turnaround feeds the opposite direction
                    self._next.setdefault(lane, []).append(link[0])
                    if lane not in signalled:
                        feeders.setdefault(link[0], []).append(lane)
        out: dict[str, tuple[tuple[str, float], ...]] = {}
        for start in signalled:
            chain = [(start, 0.0)]
            seen = {start}
            frontier = [(start, self.lane_length(start))]
            while frontier:
                lane, dist = frontier.pop()
                if dist >= self.reach:
                    continue
                for up in feeders.get(lane, ()):
                    if up not in seen:
                        seen.add(up)
                        chain.append((up, dist))
                        frontier.append((up, dist + self.lane_length(up)))
            out[start] = tuple(chain)
        return out

    def successors(self, lane: str) -> Sequence[str]:
        """The lanes a lane leads to (turnarounds left out)."""
        return self._next.get(lane, ())

    def exit_lanes(self, lane: str) -> Sequence[str]:
        if self.lane_length(lane) >= SHORT_LANE_M:
            return (lane,)
        return (lane, *self.successors(lane))

    def approach(self, lane: str) -> Sequence[tuple[str, float]]:
        return self._approaches.get(lane, ((lane, 0.0),))

    def is_entry(self, lane: str) -> bool:
        return lane not in self._fed

    def _read(self, tls: str) -> Intersection:
        tl = self.t.trafficlight
        current = tl.getProgram(tls)
        logics = tl.getAllProgramLogics(tls)
        logic = next((lg for lg in logics if lg.programID == current), logics[0])
        phases = tuple(
            Phase(
                n,
                p.state,
                float(p.duration),
                float(p.minDur if p.minDur > 0 else p.duration),
                float(p.maxDur if p.maxDur > 0 else p.duration),
            )
            for n, p in enumerate(logic.phases)
        )
        links: list[tuple[str, str]] = []
        for conns in tl.getControlledLinks(tls):
            links.append((conns[0][0], conns[0][1]) if conns else ("", ""))
        # a program may have more state characters than links (unused indices)
        width = len(phases[0].state) if phases else 0
        links += [("", "")] * (width - len(links))
        return Intersection(tls, phases, tuple(links))

    def intersections(self) -> Sequence[Intersection]:
        return self._intersections

    def time(self) -> float:
        return float(self.t.simulation.getTime())

    def state(self, tls: str) -> str:
        return str(self.t.trafficlight.getRedYellowGreenState(tls))

    def set_state(self, tls: str, state: str) -> None:
        self.t.trafficlight.setRedYellowGreenState(tls, state)

    def queue(self, lane: str) -> int:
        return int(self.t.lane.getLastStepHaltingNumber(lane))

    def count(self, lane: str) -> int:
        return int(self.t.lane.getLastStepVehicleNumber(lane))

    def approaching(self, lane: str) -> Sequence[tuple[float, float]]:
        v = self.t.vehicle
        ids = self.t.lane.getLastStepVehicleIDs
        out = []
        for part, offset in self.approach(lane):
            end = self.lane_length(part) + offset
            out += [(end - float(v.getLanePosition(i)), float(v.getSpeed(i))) for i in ids(part)]
        return out

    def _box(self, tls: str) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
        got = self._boxes.get(tls)
        if got is None:
            ln = self.t.lane
            paths: list[frozenset[str]] = []
            foes: list[frozenset[str]] = []
            for links in self.t.trafficlight.getControlledLinks(tls):
                path: set[str] = set()
                for _, _, via in links:
                    if via:
                        # the link's internal lane, and the one after an internal stop line
                        path.add(via)
                        path.update(nxt[0] for nxt in ln.getLinks(via) if nxt[0].startswith(":"))
                paths.append(frozenset(path))
                foes.append(frozenset(f for p in path for f in ln.getInternalFoes(p)))
            # a program may have more state characters than links (unused indices, as _read
            # pads them): they have no path (an IndexError ended the run at the first switch)
            width = len(self.t.trafficlight.getRedYellowGreenState(tls))
            paths += [frozenset()] * (width - len(paths))
            foes += [frozenset()] * (width - len(foes))
            got = self._boxes[tls] = (paths, foes)
        return got

    def conflict_in_box(self, tls: str, ending: frozenset[int], starting: frozenset[int]) -> bool:
        if not ending or not starting:
            return False
        paths, foes = self._box(tls)
        halted = self.t.lane.getLastStepHaltingNumber
        standing = {p for k in ending for p in paths[k] if halted(p)}
        return bool(standing) and any(standing & foes[k] for k in starting)

    def lane_length(self, lane: str) -> float:
        n = self._lengths.get(lane)
        if n is None:
            n = self._lengths[lane] = float(self.t.lane.getLength(lane))
        return n

    def lane_speed(self, lane: str) -> float | None:
        n = self._speeds.get(lane)
        if n is None:
            n = self._speeds[lane] = float(self.t.lane.getMaxSpeed(lane))
        return n

    def _watch_departures(self, ids: Sequence[str]) -> None:
        v = self.t.vehicle
        now = self.time()
        for vid in ids:
            if v.getVehicleClass(vid) == "emergency":
                self._evs.setdefault(vid, now)

    def emergency_vehicles(self) -> Sequence[EmergencyVehicle]:
        v = self.t.vehicle
        out = []
        for vid, since in list(self._evs.items()):
            try:
                route = v.getRoute(vid)
            except self.t.TraCIException:
                # removed (a collision, vaporised, an operator): not in the arrived list, and
                # asking on ended the run; asked here, not by listing every vehicle each step
                del self._evs[vid]
                continue
            idx = v.getRouteIndex(vid)
            prio = v.getParameter(vid, "priority")
            out.append(
                EmergencyVehicle(
                    vid,
                    v.getLaneID(vid),
                    float(v.getLanePosition(vid)),
                    float(v.getSpeed(vid)),
                    tuple(route[max(idx, 0) :]),
                    priority=int(prio) if prio.lstrip("-").isdigit() else 0,
                    first_seen=since,
                )
            )
        return out

    def pending(self) -> int:
        """Vehicles still expected (loaded and not yet arrived, or waiting to depart)."""
        return int(self.t.simulation.getMinExpectedNumber())

    def advance(self) -> None:
        self.t.simulationStep()
        sim = self.t.simulation
        self._watch_departures(sim.getDepartedIDList())
        if self._evs:
            for vid in sim.getArrivedIDList():
                self._evs.pop(vid, None)  # removed ones: see emergency_vehicles

    def close(self) -> None:
        """Close SUMO; quietly when it is gone already (a Ctrl-C in a terminal reaches SUMO
        too, and TraCI then fails on the closed connection)."""
        if not self._closed:
            self._closed = True
            try:
                self.t.close()
            except Exception as exc:
                log.debug("closing SUMO: %s", exc)


@dataclass
class RunStats:
    steps: int = 0
    decisions: int = 0
    decide_s: float = 0.0  # time spent in controllers' decide()
    forced_switches: int = 0
    wall_s: float = 0.0
    states: list[dict[str, str]] = field(default_factory=list)  # per step, when recorded
    preemption: PreemptionStats | None = None


def control_loop(
    backend: SignalBackend,
    controller: str,
    end: float,
    *,
    rules: SafetyRules | None = None,
    config: dict[str, Any] | None = None,
    on_step: Callable[[float, dict[str, SafetyGuard]], None] | None = None,
    record_states: bool = False,
    overrides: dict[str, Override] | None = None,
    preemption: bool = True,
) -> RunStats:
    """Run ``controller`` on every intersection of ``backend`` until time ``end``.

    ``overrides`` (tls id -> :class:`Override`) may be changed by ``on_step`` or another
    thread while the loop runs: an active override replaces the controller's choice at that
    intersection; an expired one is dropped and normal control resumes.
    """
    overrides = overrides if overrides is not None else {}
    plans: dict[tuple[str, str], Controller] = {}
    rules = rules or SafetyRules()
    now = backend.time()
    guards: dict[str, SafetyGuard] = {}
    controllers: dict[str, Controller] = {}
    for x in backend.intersections():
        if not x.greens:
            log.warning("intersection %s has no green phase: left to its own program", x.id)
            continue
        guards[x.id] = SafetyGuard(backend, x, rules, now)
        controllers[x.id] = create(controller, x, backend, config)
    stats = RunStats()
    refused: set[str] = set()  # intersections whose controller asked for a phase not there
    pre = Preemption(backend, guards) if preemption else None
    stats.preemption = pre.stats if pre is not None else None
    start = time.perf_counter()
    while now < end:
        if pre is not None:
            pre.update(now)
        for tls, guard in guards.items():
            if guard.serve_starving(now):
                # an approach kept red past max_red is served first, whatever the controller,
                # an override or a preemption would ask for now
                guard.tick(now)
                continue
            ev = pre.decide(tls, now) if pre is not None and pre.requests else None
            if ev is not None and ev.switch:
                # an emergency vehicle is coming: its green now, whatever else is asked
                if guard.can_switch(now):
                    guard.request(ev.phase, now)
            elif guard.can_switch(now):
                ov = overrides.get(tls)
                if ov is not None and not ov.active(now):
                    overrides.pop(tls, None)
                    ov = None
                if ov is not None and ov.phase is not None:
                    want: Phase | None = next(
                        (g for g in guard.x.greens if g.index == ov.phase), None
                    )
                else:
                    ctl = controllers[tls]
                    if ov is not None and ov.controller is not None:
                        key = (tls, ov.controller)
                        if key not in plans:
                            plans[key] = create(ov.controller, guard.x, backend)
                        ctl = plans[key]
                    t0 = time.perf_counter()
                    want = ctl.decide(now, guard.current, guard.green_for(now))
                    stats.decide_s += time.perf_counter() - t0
                    stats.decisions += 1
                if ev is not None and not ev.allows(guard.current, want):
                    # reserved for an emergency vehicle: hold a green that serves it, start
                    # none but one that does
                    want = None
                if want is not None:
                    try:
                        guard.request(want, now)
                    except ValueError as exc:
                        # a controller (a plugin) asking for a phase that is not a green of
                        # this intersection: it keeps its green; the other intersections go on
                        # (the error stopped control of every intersection)
                        if tls not in refused:
                            refused.add(tls)
                            log.error("intersection %s: %s; request ignored", tls, exc)
            guard.tick(now)
        if on_step is not None:
            on_step(now, guards)
        backend.advance()
        now = backend.time()
        stats.steps += 1
        if record_states:
            stats.states.append({tls: backend.state(tls) for tls in guards})
    stats.wall_s = time.perf_counter() - start
    stats.forced_switches = sum(g.forced_switches for g in guards.values())
    return stats


def scenario_args(cfg: Path, seed: int, out_dir: Path | None = None) -> list[str]:
    """SUMO options for a benchmark run of a .sumocfg scenario (RESCO protocol)."""
    args = [
        "-c",
        str(cfg),
        "--seed",
        str(seed),
        "--time-to-teleport",
        "-1",
        "--no-step-log",
        "--no-warnings",
        "--duration-log.disable",
    ]
    if out_dir is not None:
        from cityward.traffic.metrics import sumo_output_args

        out_dir.mkdir(parents=True, exist_ok=True)
        args += sumo_output_args(out_dir)
    return args
