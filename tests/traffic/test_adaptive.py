"""The adaptive controller's decisions on hand-set detector readings (no simulator needed: the
readings are what a radar would report)."""

from __future__ import annotations

from collections.abc import Sequence

from cityward.traffic.backend import Intersection, Phase, SignalBackend
from cityward.traffic.controllers import create


def phase(i: int, state: str) -> Phase:
    return Phase(i, state, 30.0, 5.0, 50.0)


class Readings(SignalBackend):
    """A backend whose lane readings the test sets; signals are not driven here."""

    positions = True

    def __init__(self, x: Intersection) -> None:
        self.x = x
        self.vehicles: dict[str, list[tuple[float, float]]] = {}

    def intersections(self) -> Sequence[Intersection]:
        return [self.x]

    def time(self) -> float:
        return 0.0

    def state(self, tls: str) -> str:
        return self.x.phases[0].state

    def set_state(self, tls: str, state: str) -> None:
        raise AssertionError("controllers never set states")

    def queue(self, lane: str) -> int:
        return sum(1 for _, v in self.vehicles.get(lane, []) if v < 0.1)

    def count(self, lane: str) -> int:
        return len(self.vehicles.get(lane, []))

    def approaching(self, lane: str) -> Sequence[tuple[float, float]]:
        return self.vehicles.get(lane, [])


# two approaches: a (links 0, 1: through and a turn), b (link 2); phase 2 protects a's turn
X = Intersection(
    "x",
    (
        phase(0, "GgG"),
        phase(1, "yyy"),
        phase(2, "rGr"),
        phase(3, "ryr"),
        phase(4, "rrG"),
        phase(5, "rry"),
    ),
    (("a", "out1"), ("a", "out2"), ("b", "out3")),
)
QUEUE = [(1.0 + 7.5 * k, 0.0) for k in range(6)]  # six cars standing, the first at the line
# two approaches, a green each: a (link 0) and b (link 1)
TWO_WAY = Intersection(
    "x",
    (phase(0, "Gr"), phase(1, "yr"), phase(2, "rG"), phase(3, "ry")),
    (("a", "o1"), ("b", "o2")),
)


def test_a_lane_whose_first_car_stands_at_green_stops_counting() -> None:
    x = TWO_WAY
    b = Readings(x)
    ctl = create("adaptive", x, b, {"stuck_s": 3.0})
    b.vehicles = {"a": list(QUEUE), "b": [(1.0, 0.0), (8.5, 0.0)]}
    green_a, green_b = x.greens
    # six cars on a would move if a's queue discharges: keep the green
    assert ctl.decide(10.0, green_a, 10.0) is None
    assert ctl.decide(12.0, green_a, 12.0) is None
    # the first car is still standing 3 s later: a is blocked (an exit beyond the detectors),
    # b moves someone
    assert ctl.decide(13.0, green_a, 13.0) == green_b


def test_a_moving_first_car_resets_the_wait() -> None:
    x = TWO_WAY
    b = Readings(x)
    ctl = create("adaptive", x, b, {"stuck_s": 3.0})
    b.vehicles = {"a": list(QUEUE), "b": [(1.0, 0.0)]}
    green_a, _ = x.greens
    assert ctl.decide(10.0, green_a, 10.0) is None
    b.vehicles["a"] = [(0.5, 3.0), *QUEUE[1:]]  # the queue is moving
    assert ctl.decide(12.0, green_a, 12.0) is None
    b.vehicles["a"] = list(QUEUE)
    assert ctl.decide(14.0, green_a, 14.0) is None  # standing again, but only for 0 s


def test_a_stuck_lane_counts_only_where_it_gets_more() -> None:
    b = Readings(X)
    ctl = create("adaptive", X, b, {"stuck_s": 0.0})
    all_go, turn, _ = X.greens
    # a's first car waits to turn across the oncoming flow (permissive g): it counts for the
    # phase that protects the turn, not for keeping the current green
    b.vehicles = {"a": list(QUEUE), "b": [(30.0, 10.0)]}
    assert ctl.decide(10.0, all_go, 10.0) == turn
    # standing under the protected turn too: a counts for phase 0 (it adds the through link),
    # so the controller does not stay in a phase that moves nobody
    assert ctl.decide(20.0, turn, 10.0) == all_go


def test_without_positions_the_stop_line_rule_is_off() -> None:
    x = TWO_WAY
    b = Readings(x)
    b.positions = False  # queue counters only: a standing car and a discharging queue look alike
    ctl = create("adaptive", x, b, {"stuck_s": 0.0})
    b.vehicles = {"a": list(QUEUE), "b": [(1.0, 0.0)]}
    green_a, _ = x.greens
    assert ctl.decide(10.0, green_a, 10.0) is None
    assert ctl.decide(30.0, green_a, 30.0) is None
