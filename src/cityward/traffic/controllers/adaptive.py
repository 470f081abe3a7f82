"""cityward's adaptive controller: serve the green that moves the most vehicles over the next
few seconds, counting the lost time of a switch, and never feed a movement whose exit is full.

Each step after the minimum green it looks ``horizon`` seconds ahead, ``horizon`` being
``horizon_factor`` times the intersection's own lost time per switch (yellow + all-red, from the
network's program, so nothing is tuned per scenario):

- *keep*: how many vehicles on the current green's approaches would cross the stop line within
  the horizon if the green is kept;
- *switch to p*: how many vehicles on p's approaches would cross within the horizon if p got
  green after the lost time.

Vehicles cross in a queue-discharge model: each accelerates from its speed toward 50 km/h, and
one vehicle per lane passes at most every 2 s (saturation headway). The green switches to the
best p when p would move more vehicles than keeping does (or after ``max_green`` while others
wait). Under light traffic this gaps out as soon as the current approach empties; under heavy
traffic it keeps greens long enough that switching losses do not eat the capacity, which a
count-based rule such as max pressure does not see.

Approaches are read upstream of the stop line (see ``SignalBackend.approach``). A movement whose
exit is nearly full (the exit lane, with the lanes after it when it is only a junction stub) is
left out of both sides: a green there moves nobody and only blocks the junction (spillback).

A lane fed by other lanes whose queue reaches back over ``spill_fill`` (60 %) of its length (a
lane of at least ``spill_length`` m) counts its crossings with weight 1 + ``spill_weight`` (2):
each vehicle it lets go also frees room for the movements upstream that feed it. Without this,
a full left-turn lane loses the count against two moving lanes of a side street again and
again while its queue shuts the junctions behind it. A network entry backs up outside the
network and short lanes fill in normal traffic, so neither counts.

What the model cannot see, the stop line shows: a lane of the current green whose first vehicle
has stood at the line for ``stuck_s`` seconds is not moving, whatever the model predicts (a
permissive turn finding no gap in the oncoming flow, a blocked exit beyond the detection reach,
a vehicle that cannot change into its turning lane). Such a lane counts for nothing on the keep
side, and for nothing on the side of any other green that gives it no more than it has now (no
new link and no protected green where it had permissive green), so the green goes to a phase
that can actually move someone instead of ping-ponging between two that cannot. (Only with a
backend that reports positions and speeds: queue counters alone cannot tell a standing first
vehicle from a discharging queue.)
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from cityward.traffic.backend import HALTED_MS, Intersection, Phase, SignalBackend
from cityward.traffic.controllers import Controller, ControllerConfig

VEHICLE_SPACE_M = 7.5  # a stopped car and its gap
HEADWAY_S = 2.0  # saturation headway: one vehicle per lane every 2 s at best
ACCEL = 2.6  # m/s2, a passenger car's typical acceleration
CRUISE = 13.9  # m/s, 50 km/h
AT_LINE_M = 5.0  # a vehicle this close to the stop line and standing is waiting at the line


def time_to(dist: float, speed: float) -> float:
    """Seconds to cover ``dist`` from ``speed``, accelerating up to the cruise speed."""
    if speed >= CRUISE:
        return dist / speed
    ramp = (CRUISE * CRUISE - speed * speed) / (2 * ACCEL)
    if dist <= ramp:
        return float((-speed + (speed * speed + 2 * ACCEL * dist) ** 0.5) / ACCEL)
    return (CRUISE - speed) / ACCEL + (dist - ramp) / CRUISE


def crossing(vehicles: list[tuple[float, float]], delay: float, horizon: float) -> int:
    """Vehicles (distance to stop line, speed; nearest first) over the line within ``horizon``
    seconds when the green starts after ``delay`` seconds; one per ``HEADWAY_S`` at most."""
    n = 0
    last = -HEADWAY_S
    for dist, speed in vehicles:
        t = time_to(dist, speed)
        if delay:
            # a moving vehicle reaches the line and waits; a stopped one starts at green
            t = max(t, delay) if speed >= 0.1 else delay + t
        last = max(t, last + HEADWAY_S)
        if last > horizon:
            break
        n += 1
    return n


class AdaptiveConfig(ControllerConfig):
    horizon_factor: float = Field(
        default=2.0,
        ge=1.0,
        le=10.0,
        description="Look-ahead, in multiples of the intersection's lost time per switch.",
    )
    max_green: float = Field(
        default=45.0, ge=10.0, le=300.0, description="Longest green while others wait."
    )
    full_exit: float = Field(
        default=0.85, gt=0.0, le=1.0, description="Exit occupancy (0-1) that blocks a movement."
    )
    spill_weight: float = Field(
        default=1.0,
        ge=0.0,
        le=10.0,
        description="Extra weight of a crossing from an incoming lane that is full (spilling "
        "back) and fed by other lanes: each vehicle it lets go also frees room upstream.",
    )
    spill_fill: float = Field(
        default=0.6,
        gt=0.0,
        le=1.0,
        description="Share of a lane's length holding vehicles from which it counts as "
        "spilling back.",
    )
    spill_length: float = Field(
        default=100.0,
        ge=0.0,
        le=1000.0,
        description="Shortest incoming lane (m) whose filling counts as spillback; shorter "
        "lanes fill with a few vehicles in normal traffic.",
    )
    stuck_s: float = Field(
        default=4.0,
        ge=0.0,
        le=60.0,
        description="Seconds the first vehicle of a green lane may stand at the stop line "
        "before the lane counts as blocked.",
    )


class Adaptive(Controller):
    name = "adaptive"
    summary = (
        "cityward's own: the green that moves the most vehicles over the next seconds, "
        "counting switch losses; never feeds a full exit"
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
        # per green phase: {incoming lane: {link index: "G" or "g"}}
        self.signals: dict[int, dict[str, dict[int, str]]] = {}
        for g in intersection.greens:
            sig: dict[str, dict[int, str]] = {}
            for k in sorted(g.green_links()):
                lane = intersection.links[k][0]
                if lane:
                    sig.setdefault(lane, {})[k] = g.state[k]
            self.signals[g.index] = sig
        self.lost_time = intersection.yellow_time + intersection.all_red_time
        # lane of the current green -> since when its first vehicle stands at the stop line
        self._standing: dict[str, float] = {}

    def offers_more(self, phase: Phase, current: Phase, lane: str) -> bool:
        """Whether ``phase`` gives ``lane`` a link it has no green for now, or protected green
        where it now has permissive green."""
        now = self.signals[current.index].get(lane, {})
        return any(
            k not in now or (c == "G" and now[k] == "g")
            for k, c in self.signals[phase.index].get(lane, {}).items()
        )

    def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
        assert isinstance(self.config, AdaptiveConfig)
        cfg = self.config
        b = self.backend
        horizon = cfg.horizon_factor * max(self.lost_time, 1.0)
        seen: dict[str, list[tuple[float, float]]] = {}
        full: dict[str, bool] = {}

        def vehicles(lane: str) -> list[tuple[float, float]]:
            got = seen.get(lane)
            if got is None:
                got = seen[lane] = sorted(b.approaching(lane))  # nearest first, once
            return got

        def packed(lanes: Sequence[str], share: float) -> bool:
            """Whether vehicles cover ``share`` of the lanes' length."""
            return sum(b.count(x) for x in lanes) * VEHICLE_SPACE_M >= share * sum(
                b.lane_length(x) for x in lanes
            )

        def blocked(lane: str) -> bool:
            got = full.get(lane)
            if got is None:
                chain = b.exit_lanes(lane) if lane else ()
                got = full[lane] = bool(chain) and packed(chain, cfg.full_exit)
            return got

        # lanes of the current green whose first vehicle has stood at the line for stuck_s
        stuck: set[str] = set()
        standing = self._standing
        for lane in self.moves[current.index] if b.positions else ():
            v = vehicles(lane)
            if v and v[0][0] < AT_LINE_M and v[0][1] < HALTED_MS:
                if now - standing.setdefault(lane, now) >= cfg.stuck_s:
                    stuck.add(lane)
            else:
                standing.pop(lane, None)
        for lane in [x for x in standing if x not in self.moves[current.index]]:
            del standing[lane]  # a lane's wait at red is no sign of blockage

        weights: dict[str, float] = {}

        def weight(lane: str) -> float:
            """1, or 1 + spill_weight for a long lane, fed by others, that is filling up."""
            got = weights.get(lane)
            if got is None:
                spilling = (
                    b.lane_length(lane) >= cfg.spill_length
                    and packed((lane,), cfg.spill_fill)
                    and not b.is_entry(lane)
                )
                got = weights[lane] = 1.0 + cfg.spill_weight if spilling else 1.0
            return got

        def moved(phase: Phase, delay: float) -> float:
            keep = phase.index == current.index
            return sum(
                crossing(vehicles(i), delay, horizon) * weight(i)
                for i, outs in self.moves[phase.index].items()
                if not all(blocked(o) for o in outs)
                and not (i in stuck and (keep or not self.offers_more(phase, current, i)))
            )

        best, best_n = current, 0.0
        for g in self.x.greens:
            if g.index != current.index:
                n = moved(g, self.lost_time)
                if n > best_n:
                    best, best_n = g, n
        if best is current:
            return None
        if moved(current, 0.0) >= best_n and green_for < cfg.max_green:
            return None
        return best
