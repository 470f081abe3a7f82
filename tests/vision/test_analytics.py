"""Analytics rules on constructed track sequences: each fires when it should and not otherwise,
once per incident; interval aggregates reset; configs are validated with clear errors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cv2
import numpy as np
import pytest

from cityward.vision.analytics import (
    REGISTRY,
    CameraGeometry,
    Crossing,
    Rule,
    RuleConfigError,
    VisionEvent,
    build_rules,
    map_points,
)
from cityward.vision.detections import BICYCLE, PERSON, Detections
from cityward.vision.tracker import ByteTracker

CAR, TRUCK = 2, 7
#: 10 image pixels = 1 ground metre, no perspective
SCALE_H = [[0.1, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 1.0]]
SQUARE = [(0.0, 0.0), (1000.0, 0.0), (1000.0, 1000.0), (0.0, 1000.0)]

# one object: (tracker id, class id, anchor x, anchor y); boxes are 40 px wide, 60 px high
Obj = tuple[int, int, float, float]


def frame(objs: Iterable[Obj], w: float = 40, h: float = 60) -> Detections:
    objs = list(objs)
    xyxy = [(x - w / 2, y - h, x + w / 2, y) for _, _, x, y in objs]
    return Detections(
        np.array(xyxy, np.float32).reshape(-1, 4),
        np.full(len(objs), 0.9, np.float32),
        np.array([c for _, c, _, _ in objs], np.int32),
        np.array([i for i, _, _, _ in objs], np.int32),
    )


def run(
    rule: Rule,
    scene: Callable[[float], Iterable[Obj]],
    seconds: float,
    fps: float = 10,
    t0: float = 0.0,
    f0: int = 0,
) -> list[Crossing | VisionEvent]:
    """Feed ``rule`` the objects ``scene(t)`` for ``seconds``; all outputs."""
    out: list[Crossing | VisionEvent] = []
    for k in range(round(seconds * fps)):
        t = t0 + k / fps
        out += rule.update(f0 + k, t, frame(scene(t)))
    return out


def one(config: Mapping[str, Any], geometry: CameraGeometry | None = None) -> Rule:
    return build_rules([config], geometry)[0]


def events(outs: list[Crossing | VisionEvent]) -> list[VisionEvent]:
    return [o for o in outs if isinstance(o, VisionEvent)]


# --- line ----------------------------------------------------------------------------------


LINE: dict[str, Any] = {"type": "line", "name": "stop-line", "line": [[100, 300], [900, 300]]}


def test_line_counts_by_class_and_direction() -> None:
    rule = one(LINE)

    def scene(t: float) -> list[Obj]:
        return [
            (1, CAR, 300, 100 + 100 * t),  # down: from the left side (above) to the right
            (2, TRUCK, 500, 150 + 80 * t),  # down too
            (3, PERSON, 700, 500 - 60 * t),  # up: right to left
            (4, CAR, 50, 100 + 100 * t),  # passes beside the line's end: not counted
        ]

    outs = run(rule, scene, 5)
    crossings = [o for o in outs if isinstance(o, Crossing)]
    assert {(c.class_name, c.direction) for c in crossings} == {
        ("car", "in"),
        ("truck", "in"),
        ("person", "out"),
    }
    assert len(crossings) == 3
    assert all(c.line == "stop-line" for c in crossings)
    car = next(c for c in crossings if c.class_name == "car")
    assert 1.9 <= car.time_s <= 2.2  # the anchor is clearly past y=300 (+8 px) at ~2.08 s
    agg = rule.interval()
    assert agg["in"] == {"car": 1, "truck": 1}
    assert agg["out"] == {"person": 1}
    assert agg["total"] == 3 and agg["rule"] == "stop-line" and agg["type"] == "line"
    again = rule.interval()
    assert again["in"] == {} and again["out"] == {} and again["total"] == 0


def test_line_in_side_left_flips_directions() -> None:
    rule = one({**LINE, "in_side": "left"})
    outs = run(rule, lambda t: [(1, CAR, 300, 100 + 100 * t)], 5)
    assert [o.direction for o in outs if isinstance(o, Crossing)] == ["out"]


def test_line_jitter_on_the_line_counts_once() -> None:
    rule = one(LINE)

    def scene(t: float) -> list[Obj]:
        if t < 2.5:
            return [(1, CAR, 300, 200 + 50 * t)]  # reaches y=325, clearly across
        return [(1, CAR, 300, 300 + 6 * np.sin(7 * t))]  # then dithers within 6 px

    outs = run(rule, scene, 12)
    assert len(outs) == 1 and isinstance(outs[0], Crossing) and outs[0].direction == "in"


def test_line_counts_once_per_direction_per_track() -> None:
    rule = one(LINE)
    # a track swinging far back and forth over the line five times
    outs = run(rule, lambda t: [(1, CAR, 300, 300 + 100 * np.sin(2 * t))], 12)
    assert sorted(o.direction for o in outs if isinstance(o, Crossing)) == ["in", "out"]


# --- zone ----------------------------------------------------------------------------------


def test_zone_occupancy_and_dwell() -> None:
    rule = one(
        {
            "type": "zone",
            "name": "bay",
            "polygon": [[0, 0], [500, 0], [500, 500], [0, 500]],
            "exit_grace_s": 0.5,
        }
    )

    def scene(t: float) -> list[Obj]:
        objs: list[Obj] = [(1, CAR, 200, 300)]  # parked all along
        if t < 3.0:
            objs.append((2, PERSON, 300, 300))  # in for 3 s, then gone outside
        else:
            objs.append((2, PERSON, 800, 300))
        if 1.0 <= t < 2.0:
            objs.append((3, PERSON, 100, 100))  # in for 1 s, then no longer seen
        return objs

    run(rule, scene, 10)
    agg = rule.interval()
    assert agg["occupancy"] == {"car": 1}
    assert agg["occupancy_total"] == 1
    assert agg["peak"] == 3
    # 1 car for 10 s + 1 person 3 s + 1 person 1 s over ~9.9 s
    assert agg["mean_occupancy"] == pytest.approx(1 + 4 / 9.9, abs=0.05)
    assert agg["entries"] == {"car": 1, "person": 2}
    assert agg["departures"] == {"person": 2}
    assert agg["mean_dwell_s"]["person"] == pytest.approx((2.9 + 0.9) / 2, abs=0.05)
    assert "car" not in agg["mean_dwell_s"]
    # the next interval starts afresh: only the car, nobody entered or left
    run(rule, lambda t: [(1, CAR, 200, 300)], 2, t0=10, f0=100)
    agg = rule.interval()
    assert agg["peak"] == 1 and agg["entries"] == {} and agg["departures"] == {}
    assert agg["mean_occupancy"] == pytest.approx(1.0)


# --- speed ---------------------------------------------------------------------------------


def test_speed_from_known_homography() -> None:
    rule = one({"type": "speed", "name": "s"}, CameraGeometry(homography=SCALE_H))

    def scene(t: float) -> list[Obj]:
        return [(1, CAR, 100 + 100 * t, 400), (2, CAR, 100 + 50 * t, 600)]  # 10 and 5 m/s

    assert run(rule, scene, 5) == []  # no limit: no events
    agg = rule.interval()
    assert agg["tracks"] == {"car": 2}
    assert agg["mean_speed_kmh"]["car"] == pytest.approx((36 + 18) / 2, rel=0.01)
    assert 18 < agg["p85_speed_kmh"]["car"] <= 36.01
    assert rule.interval()["tracks"] == {}


def test_speed_with_a_perspective_homography() -> None:
    # a real camera: a 20 m x 40 m stretch of road seen in perspective
    img = np.array([[400, 700], [900, 700], [700, 300], [560, 300]], np.float32)
    ground = np.array([[0, 0], [20, 0], [20, 40], [0, 40]], np.float32)
    h = cv2.getPerspectiveTransform(img, ground)
    geo = CameraGeometry(homography=h.tolist())
    probe = np.array([[650, 500], [420, 690]], np.float32)
    assert np.allclose(map_points(h, probe), cv2.perspectiveTransform(probe[None], h)[0], atol=1e-3)
    back = np.linalg.inv(h)
    rule = one({"type": "speed", "speed_limit_kmh": 30, "min_over_s": 0.5}, geo)

    def scene(t: float) -> list[Obj]:
        # on the ground: a car at 10 m/s (36 km/h) up the road, a bicycle at 4 m/s
        car, bike = map_points(back, [[8, 2 + 10 * t], [15, 5 + 4 * t]])
        return [(1, CAR, car[0], car[1]), (2, BICYCLE, bike[0], bike[1])]

    outs = run(rule, scene, 3)
    evs = events(outs)
    assert len(evs) == 1  # the car, once
    assert evs[0].kind == "speeding" and evs[0].class_name == "car"
    assert evs[0].value == pytest.approx(36, rel=0.02)
    assert evs[0].category == "traffic" and evs[0].severity == "medium"
    agg = rule.interval()
    assert agg["mean_speed_kmh"]["car"] == pytest.approx(36, rel=0.02)
    assert agg["mean_speed_kmh"]["bicycle"] == pytest.approx(14.4, rel=0.02)


def test_speed_needs_a_homography() -> None:
    with pytest.raises(RuleConfigError, match="homography"):
        one({"type": "speed", "name": "s"})


# --- stopped -------------------------------------------------------------------------------


NO_STOP: dict[str, Any] = {"type": "stopped", "polygon": [[0, 0], [400, 0], [400, 400], [0, 400]]}


def test_stopped_in_zone_fires_once() -> None:
    rule = one({**NO_STOP, "min_stopped_s": 30})

    def scene(t: float) -> list[Obj]:
        x = min(100 + 50 * t, 300.0)  # drives in, stops at x=300 after 4 s
        return [(1, CAR, x + np.sin(9 * t), 200)]  # detector jitter of a pixel

    outs = run(rule, scene, 60, fps=2)
    evs = events(outs)
    assert len(evs) == 1
    e = evs[0]
    assert (e.kind, e.sub_category, e.category) == ("stopped", "carStopped", "traffic")
    assert 33.5 <= e.time_s <= 35  # stopped at t=4 s, fires 30 s later
    assert rule.interval()["events"] == 1
    assert rule.interval()["events"] == 0


def test_stopped_outside_zone_or_briefly_does_not_fire() -> None:
    rule = one({**NO_STOP, "min_stopped_s": 30})
    # parked for a minute just outside the zone
    assert run(rule, lambda t: [(1, CAR, 600, 200)], 60, fps=2) == []
    # stops 20 s in the zone, then drives off; a person standing there is not a vehicle
    outs = run(
        rule,
        lambda t: [(2, CAR, 200 if t < 20 else 200 + 40 * (t - 20), 200), (3, PERSON, 100, 100)],
        60,
        fps=2,
        t0=60,
    )
    assert outs == []


# --- wrong way -----------------------------------------------------------------------------


ONE_WAY: dict[str, Any] = {
    "type": "wrong-way",
    "polygon": [[200, 0], [600, 0], [600, 1000], [200, 1000]],
    "direction": [0, 1],  # traffic goes down the image
    "min_distance": 60,
}


def test_wrong_way_fires_for_the_wrong_way_only() -> None:
    rule = one(ONE_WAY)

    def scene(t: float) -> list[Obj]:
        return [
            (1, CAR, 300, 100 + 80 * t),  # right way
            (2, CAR, 500, 900 - 80 * t),  # wrong way
            (3, CAR, 800, 900 - 80 * t),  # wrong way but outside the one-way area
            (4, CAR, 250 + 50 * t, 500),  # crossing sideways
        ]

    outs = run(rule, scene, 8)
    evs = events(outs)
    assert len(evs) == 1
    assert evs[0].sub_category == "carWrongDirection" and evs[0].severity == "high"
    assert 0.7 <= evs[0].time_s <= 0.9  # 60 px at 80 px/s
    assert evs[0].rule == "wrong-way"


def test_wrong_way_in_ground_coordinates() -> None:
    geo = CameraGeometry(homography=SCALE_H)
    rule = one({**ONE_WAY, "space": "ground", "min_distance": 5}, geo)
    outs = run(rule, lambda t: [(1, CAR, 300, 100 + 80 * t), (2, CAR, 500, 900 - 80 * t)], 8)
    evs = events(outs)
    assert len(evs) == 1 and evs[0].value is not None and evs[0].value >= 5
    with pytest.raises(RuleConfigError, match="homography"):
        one({**ONE_WAY, "space": "ground"})


# --- pedestrian ----------------------------------------------------------------------------


ROAD: dict[str, Any] = {
    "type": "pedestrian",
    "polygon": [[0, 400], [1000, 400], [1000, 600], [0, 600]],
}


def test_pedestrian_on_road() -> None:
    rule = one({**ROAD, "min_s": 2})

    def scene(t: float) -> list[Obj]:
        return [
            (1, PERSON, 100, 300 + 40 * t),  # walks onto the road at t=2.5 s and stays
            (2, PERSON, 500, 300),  # on the pavement
            (3, PERSON, 700, 500 if 2 <= t < 3 else 300),  # one second on the road
            (4, CAR, 900, 500),  # cars belong on the road
            (5, PERSON, 300, 500),  # a cyclist...
            (6, BICYCLE, 300, 510),  # ...riding this bicycle
        ]

    outs = run(rule, scene, 10)
    evs = events(outs)
    assert len(evs) == 1
    e = evs[0]
    assert (e.class_name, e.sub_category, e.kind) == (
        "person",
        "pedestrianOnRoad",
        "pedestrian_on_road",
    )
    assert 4.4 <= e.time_s <= 4.7


# --- crowd ---------------------------------------------------------------------------------


def crowd_scene(count: Callable[[float], int]) -> Callable[[float], list[Obj]]:
    def scene(t: float) -> list[Obj]:
        return [(i + 1, PERSON, 100 + 30 * i, 300) for i in range(count(t))]

    return scene


PLAZA: dict[str, Any] = {"type": "crowd", "polygon": [[0, 0], [1000, 0], [1000, 1000], [0, 1000]]}


def test_crowd_just_under_threshold_does_not_fire() -> None:
    rule = one({**PLAZA, "max_count": 10, "min_s": 3})
    assert run(rule, crowd_scene(lambda t: 10), 30) == []  # at the threshold, not over
    # over it, but not for long enough
    assert run(rule, crowd_scene(lambda t: 11 if t % 5 < 2 else 10), 30, t0=30) == []
    agg = rule.interval()
    assert agg["peak"] == 11 and agg["count"] == 10


def test_crowd_fires_once_and_rearms_with_hysteresis() -> None:
    rule = one({**PLAZA, "max_count": 10, "min_s": 3, "rearm_ratio": 0.8})

    def count(t: float) -> int:
        if t < 10:
            return 12  # over: fires once at ~3 s
        if t < 15:
            return 9  # below the threshold but above 8: still disarmed
        if t < 25:
            return 12  # over again: no new event
        if t < 30:
            return 5  # well below: re-armed
        return 12  # over again: a second event

    outs = run(rule, crowd_scene(count), 40)
    evs = events(outs)
    assert [round(e.time_s) for e in evs] == [3, 33]
    assert all(e.category == "security" and e.sub_category == "crowdRisk" for e in evs)
    assert evs[0].value == 12


def test_crowd_density_with_homography() -> None:
    # the plaza is 100 m x 100 m on the ground; 0.001 persons/m² = 10 persons
    geo = CameraGeometry(homography=SCALE_H)
    rule = one({**PLAZA, "max_density": 0.001, "min_s": 1}, geo)
    assert run(rule, crowd_scene(lambda t: 10), 5) == []
    evs = events(run(rule, crowd_scene(lambda t: 14), 5, t0=5))
    assert len(evs) == 1 and evs[0].value == pytest.approx(0.0014)
    assert rule.interval()["peak_density_per_m2"] == pytest.approx(0.0014)
    with pytest.raises(RuleConfigError, match="homography"):
        one({**PLAZA, "max_density": 0.5})
    with pytest.raises(RuleConfigError, match="max_count or max_density"):
        one(PLAZA)


# --- collision -----------------------------------------------------------------------------


def test_converging_cars_that_stop_give_one_event() -> None:
    rule = one({"type": "collision"})

    def scene(t: float) -> list[Obj]:
        # head on at 100 px/s each (box 60 px high: 1.7 heights/s), meet at t=2.8 s, stop
        a = min(200 + 100 * t, 480.0)
        b = max(800 - 100 * t, 520.0)
        return [(1, CAR, a, 400), (2, CAR, b, 400), (3, PERSON, 100, 800)]

    evs = events(run(rule, scene, 12))
    assert len(evs) == 1
    e = evs[0]
    assert (e.kind, e.sub_category, e.severity, e.class_name) == (
        "collision",
        "carAccident",
        "high",
        "car+car",
    )
    assert 3.8 <= e.time_s <= 6
    assert e.box == (460.0, 340.0, 540.0, 400.0)


def test_car_and_person_collision() -> None:
    rule = one({"type": "collision"})

    def scene(t: float) -> list[Obj]:
        car = min(100 + 150 * t, 470.0)
        return [(1, CAR, car, 400), (2, PERSON, 520 if t < 2.5 else 510, 400)]

    evs = events(run(rule, scene, 10))
    assert len(evs) == 1 and evs[0].class_name == "car+person"


def test_no_collision_side_by_side_or_driving_on() -> None:
    rule = one({"type": "collision"})

    def side_by_side(t: float) -> list[Obj]:
        # two cars in adjacent lanes, boxes overlapping, both at speed, both stop at a light
        x = min(100 + 120 * t, 700.0)
        return [(1, CAR, x, 400), (2, CAR, x + 30, 420)]

    assert run(rule, side_by_side, 15) == []

    def touch_and_go(t: float) -> list[Obj]:
        # they converge and touch, but drive on
        return [(3, CAR, 200 + 100 * t, 400), (4, CAR, 800 - 100 * t, 430)]

    assert run(rule, touch_and_go, 10, t0=20) == []

    def parked(t: float) -> list[Obj]:
        return [(5, CAR, 300, 400), (6, CAR, 340, 400)]  # touching, never moved

    assert run(rule, parked, 10, t0=40) == []


# --- config and registry -------------------------------------------------------------------


def test_registry_lists_every_rule() -> None:
    assert set(REGISTRY) == {
        "line",
        "zone",
        "speed",
        "stopped",
        "wrong-way",
        "pedestrian",
        "crowd",
        "collision",
    }
    for name, cls in REGISTRY.items():
        assert cls.name == name and cls.summary


@pytest.mark.parametrize(
    ("config", "pattern"),
    [
        ({"name": "x"}, "'type' is missing"),
        ({"type": "lines"}, "no rule named 'lines'"),
        ({"type": "line", "name": "n1", "line": [[0, 0]]}, r"rule 0 \(line 'n1'\).*'line'"),
        ({"type": "line", "line": [[0, 0], [1, 1]], "colour": "red"}, "'colour'"),
        ({"type": "zone", "polygon": [[0, 0], [1, 1], [0, 1], [1, 0]]}, "'polygon'.*not simple"),
        ({"type": "stopped", "polygon": SQUARE, "min_stopped_s": -1}, "'min_stopped_s'"),
        ({"type": "wrong-way", "polygon": SQUARE, "direction": [0, 0]}, "zero vector"),
        ({"type": "crowd", "polygon": SQUARE, "max_count": "many"}, "'max_count'"),
    ],
)
def test_bad_config_names_the_field(config: dict[str, object], pattern: str) -> None:
    with pytest.raises(RuleConfigError, match=pattern):
        build_rules([config])


def test_rule_names_are_unique_and_default_to_the_type() -> None:
    rules = build_rules([{"type": "line", "line": [[0, 0], [1, 1]]}, {**LINE}])
    assert [r.rule_name for r in rules] == ["line", "stop-line"]
    with pytest.raises(RuleConfigError, match="used twice"):
        build_rules([LINE, LINE])


def test_bad_homography_is_refused() -> None:
    with pytest.raises(ValueError, match="3x3"):
        CameraGeometry(homography=[[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="singular"):
        CameraGeometry(homography=[[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match="no homography"):
        CameraGeometry().to_ground([[0, 0]])


def test_events_use_alert_severities() -> None:
    with pytest.raises(ValueError, match="severity"):
        VisionEvent("x", "r", 0, 0.0, "car", "severe", "traffic", "carStopped", "", (0, 0, 1, 1))


def test_rules_forget_tracks_not_seen() -> None:
    rule = one({**NO_STOP, "min_stopped_s": 5, "forget_s": 2})
    for k in range(200):
        rule.update(k, k * 0.5, frame([(k, CAR, 600, 200)]))  # every frame a new track id
    assert len(rule._last_seen) <= 6


# --- end to end ----------------------------------------------------------------------------


def test_tracker_output_feeds_a_line_rule() -> None:
    rng = np.random.default_rng(3)
    tracker = ByteTracker()
    rule = one(LINE)
    crossings: list[Crossing] = []
    for f in range(80):
        t = f / 10
        truth = [(300, 50 + 60 * t, CAR), (600, 550 - 50 * t, PERSON), (800, 100, CAR)]
        boxes, cls = [], []
        for x, y, c in truth:
            if f % 9 == 4 and c == PERSON:
                continue  # the detector misses the person now and then
            b = np.array([x - 20, y - 60, x + 20, y]) + rng.normal(0, 1.5, 4)
            boxes.append(b)
            cls.append(c)
        dets = Detections(
            np.array(boxes, np.float32), np.full(len(boxes), 0.8, np.float32), np.array(cls)
        )
        for o in rule.update(f, t, tracker.update(dets, t)):
            assert isinstance(o, Crossing)
            crossings.append(o)
    assert sorted((c.class_name, c.direction) for c in crossings) == [
        ("car", "in"),
        ("person", "out"),
    ]
    assert rule.interval()["total"] == 2
