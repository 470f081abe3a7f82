"""The SUMO backend (libsumo in process by default, TraCI over a socket when configured) and the
simulation loop that runs controllers above the safety layer."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cityward.traffic.backend import EmergencyVehicle, Intersection, Phase, SignalBackend
from cityward.traffic.controllers import Controller, create
from cityward.traffic.safety import SafetyGuard, SafetyRules

log = logging.getLogger("cityward.traffic")
Api = Literal["libsumo", "traci"]


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
    """Signals and lane detectors of a running SUMO simulation."""

    def __init__(self, args: Sequence[str], api: Api = "libsumo") -> None:
        self.api_kind = api
        self.t = _api(api)
        self.t.start([sumo_binary(), *args])
        self._closed = False
        self._intersections = [self._read(tls) for tls in self.t.trafficlight.getIDList()]

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

    def emergency_vehicles(self) -> Sequence[EmergencyVehicle]:
        v = self.t.vehicle
        out = []
        for vid in v.getIDList():
            if v.getVehicleClass(vid) != "emergency":
                continue
            route = v.getRoute(vid)
            idx = v.getRouteIndex(vid)
            out.append(
                EmergencyVehicle(
                    vid,
                    v.getLaneID(vid),
                    float(v.getLanePosition(vid)),
                    float(v.getSpeed(vid)),
                    tuple(route[max(idx, 0) :]),
                )
            )
        return out

    def pending(self) -> int:
        """Vehicles still expected (loaded and not yet arrived, or waiting to depart)."""
        return int(self.t.simulation.getMinExpectedNumber())

    def advance(self) -> None:
        self.t.simulationStep()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.t.close()


@dataclass
class RunStats:
    steps: int = 0
    decisions: int = 0
    decide_s: float = 0.0  # time spent in controllers' decide()
    forced_switches: int = 0
    wall_s: float = 0.0
    states: list[dict[str, str]] = field(default_factory=list)  # per step, when recorded


def control_loop(
    backend: SignalBackend,
    controller: str,
    end: float,
    *,
    rules: SafetyRules | None = None,
    config: dict[str, Any] | None = None,
    on_step: Callable[[float, dict[str, SafetyGuard]], None] | None = None,
    record_states: bool = False,
) -> RunStats:
    """Run ``controller`` on every intersection of ``backend`` until time ``end``."""
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
    start = time.perf_counter()
    while now < end:
        for tls, guard in guards.items():
            if guard.can_switch(now):
                t0 = time.perf_counter()
                want = controllers[tls].decide(now, guard.current, guard.green_for(now))
                stats.decide_s += time.perf_counter() - t0
                stats.decisions += 1
                if want is not None:
                    guard.request(want, now)
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
