"""cityward's adaptive controller: keep a green while it still serves vehicles, then serve the
movement with the most pressure, never feeding a movement whose exit is full.

Each step after the minimum green it compares, from the vehicles on the approaches:

- the *running demand* of the current green: vehicles on its lanes that are queued at the stop
  line or will reach it within ``horizon`` seconds (they would cross if the green is kept);
- the *queue pressure* of every other green: vehicles halted on its approach lanes minus the
  vehicles queued on the exits they feed (Varaiya's pressure, on queues rather than counts).

It keeps the current green while its running demand is at least the best pressure elsewhere
(Advanced-MP, Zhang et al. 2022), and switches to the phase of highest pressure otherwise.
Movements whose exit lane is nearly full are left out of both sides: a green there moves
nobody and only blocks the junction (spillback), which is how plain max pressure gridlocks
larger networks. ``max_green`` bounds a green while others wait.
"""

from __future__ import annotations

from pydantic import Field

from cityward.traffic.backend import Intersection, Phase, SignalBackend
from cityward.traffic.controllers import Controller, ControllerConfig

VEHICLE_SPACE_M = 7.5  # a stopped car and its gap


class AdaptiveConfig(ControllerConfig):
    horizon: float = Field(
        default=8.0, ge=1.0, le=60.0, description="Seconds ahead a moving vehicle counts."
    )
    max_green: float = Field(
        default=90.0, ge=10.0, le=300.0, description="Longest green while others wait."
    )
    full_exit: float = Field(
        default=0.85, gt=0.0, le=1.0, description="Exit occupancy (0-1) that blocks a movement."
    )


class Adaptive(Controller):
    name = "adaptive"
    summary = (
        "cityward's own: keeps a green while vehicles still use it, then the highest queue "
        "pressure; never feeds a full exit"
    )
    Config = AdaptiveConfig

    def __init__(
        self, intersection: Intersection, backend: SignalBackend, config: ControllerConfig
    ) -> None:
        super().__init__(intersection, backend, config)
        # per green phase: {incoming lane: its exit lanes under that phase}
        self.moves: dict[int, dict[str, tuple[str, ...]]] = {}
        for g in intersection.greens:
            m: dict[str, list[str]] = {}
            for i, o in intersection.lanes_of(g):
                m.setdefault(i, []).append(o)
            self.moves[g.index] = {i: tuple(dict.fromkeys(os)) for i, os in m.items()}

    def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
        assert isinstance(self.config, AdaptiveConfig)
        cfg = self.config
        b = self.backend
        lane_cache: dict[str, tuple[int, int]] = {}
        exit_cache: dict[str, tuple[int, bool]] = {}

        def lane(lane_id: str) -> tuple[int, int]:
            """(halted, arriving within the horizon) on an approach lane."""
            got = lane_cache.get(lane_id)
            if got is None:
                halted = arriving = 0
                for dist, speed in b.approaching(lane_id):
                    if speed < 0.1:
                        halted += 1
                    elif dist <= speed * cfg.horizon:
                        arriving += 1
                got = lane_cache[lane_id] = (halted, arriving)
            return got

        def exit_(lane_id: str) -> tuple[int, bool]:
            """(halted, full) on an exit lane."""
            got = exit_cache.get(lane_id)
            if got is None:
                if not lane_id:
                    got = (0, False)
                else:
                    n = b.count(lane_id)
                    full = n * VEHICLE_SPACE_M >= cfg.full_exit * b.lane_length(lane_id)
                    got = (b.queue(lane_id), full)
                exit_cache[lane_id] = got
            return got

        def open_lanes(phase: Phase) -> list[tuple[str, tuple[str, ...]]]:
            out = []
            for i, outs in self.moves[phase.index].items():
                free = tuple(o for o in outs if not exit_(o)[1])
                if free:
                    out.append((i, free))
            return out

        running = 0
        for i, _ in open_lanes(current):
            h, a = lane(i)
            running += h + a
        best, best_p = current, 0.0
        for g in self.x.greens:
            if g.index == current.index:
                continue
            p = 0.0
            for i, outs in open_lanes(g):
                h, _ = lane(i)
                p += h - sum(exit_(o)[0] for o in outs) / len(outs)
            if p > best_p:
                best, best_p = g, p
        if best is current:
            return None
        if running >= best_p and green_for < cfg.max_green:
            return None
        return best
