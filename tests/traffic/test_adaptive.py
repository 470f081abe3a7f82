"""The adaptive controller's decisions on hand-set detector readings (no simulator needed: the
readings are what a radar would report)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


class Network(Readings):
    """Readings plus lane lengths and which lanes are network entries."""

    def __init__(self, x: Intersection, lengths: dict[str, float], entries: set[str]) -> None:
        super().__init__(x)
        self.lengths = lengths
        self.entries = entries

    def lane_length(self, lane: str) -> float:
        return self.lengths.get(lane, 300.0)

    def is_entry(self, lane: str) -> bool:
        return lane in self.entries


def spill_choice(
    length: float,
    entries: set[str],
    weight: float,
    driving: int = 20,
    spill_length: float = 100.0,
    filled: float = 1.0,
    spill_fill: float = 0.6,
) -> Phase | None:
    """a: a lane of ``length`` m, its first ``filled`` share packed with standing cars; b, on
    green: ``driving`` cars driving in. What the controller does after b's minimum green."""
    x = TWO_WAY
    b = Network(x, {"a": length}, entries)
    config = {"spill_weight": weight, "spill_length": spill_length, "spill_fill": spill_fill}
    ctl = create("adaptive", x, b, config)
    packed = int(length * filled // 7.5)
    b.vehicles = {
        "a": [(1.0 + 7.5 * k, 0.0) for k in range(packed)],
        "b": [(5.0 + 12.0 * k, 13.0) for k in range(driving)],
    }
    return ctl.decide(10.0, x.greens[1], 10.0)


def test_a_full_lane_fed_by_others_weighs_more_than_its_own_crossings() -> None:
    green_a = TWO_WAY.greens[0]
    # b moves more vehicles over the look-ahead than a would: without the weight, keep b
    assert spill_choice(120.0, set(), weight=0.0) is None
    # a is full and other lanes feed it: each car it lets go frees room upstream
    assert spill_choice(120.0, set(), weight=1.0) == green_a
    # a network entry backs up outside the network: no spillback inside
    assert spill_choice(120.0, {"a"}, weight=1.0) is None
    # a short lane fills in normal traffic: not spillback under the default length...
    assert spill_choice(60.0, set(), weight=1.0, driving=12) is None
    # ...though the same readings would count with a shorter threshold
    assert spill_choice(60.0, set(), weight=1.0, driving=12, spill_length=50.0) == green_a
    # a queue over 65 % of a 200 m lane is spilling back from 60 %, not yet from 85 %
    assert spill_choice(200.0, set(), weight=0.0, filled=0.65) is None
    assert spill_choice(200.0, set(), weight=1.0, filled=0.65) == green_a
    assert spill_choice(200.0, set(), weight=1.0, filled=0.65, spill_fill=0.85) is None


def test_sumo_knows_which_lanes_are_network_entries(grid_cfg: Path) -> None:
    """On the grid (real SUMO), the lanes from the fringe into the first signals are entries;
    the lanes between two signals are fed by others."""
    from cityward.traffic.sumo import SumoBackend, scenario_args

    backend = SumoBackend([*scenario_args(grid_cfg, seed=1), "--end", "10"])
    try:
        lanes = {i for x in backend.intersections() for i in x.in_lanes}
        entries = {lane for lane in lanes if backend.is_entry(lane)}
        inner = lanes - entries
        assert entries and inner
        # an inner lane leaves another signal; an entry lane leaves no lane of the network
        out_of_signals = {o for x in backend.intersections() for _, o in x.links if o}
        assert all(any(o == lane for o in out_of_signals) for lane in inner)
        assert not entries & out_of_signals
    finally:
        backend.close()
