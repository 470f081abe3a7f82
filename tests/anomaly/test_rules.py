"""The traffic-incident rule on its own: its math, what it learns, its memory, its settings."""

from __future__ import annotations

import doctest
import math
import random
from datetime import UTC, datetime, timedelta
from types import ModuleType

import pytest
from pydantic import ValidationError

from cityward.anomaly import rules, service, settings
from cityward.anomaly.rules import (
    ExpStat,
    TrafficIncidentConfig,
    TrafficIncidentRule,
    Verdict,
    create_rule,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
STEP = timedelta(minutes=5)


def learn(rule: TrafficIncidentRule, days: float, occ: float, speed: float, flow: float) -> float:
    """Feed ``days`` of steady readings around the given levels; returns the next time."""
    rng = random.Random(7)
    t = T0
    while t < T0 + timedelta(days=days):
        values = {
            "occupancy": occ * (1 + rng.gauss(0, 0.05)),
            "averageVehicleSpeed": speed * (1 + rng.gauss(0, 0.05)),
            "intensity": flow * (1 + rng.gauss(0, 0.05)),
        }
        rule.process(values, t.timestamp())
        t += STEP
    return t.timestamp()


def reading(occ: float, speed: float, flow: float) -> dict[str, float]:
    return {"occupancy": occ, "averageVehicleSpeed": speed, "intensity": flow}


def new_rule(**config: object) -> TrafficIncidentRule:
    rule = create_rule("traffic-incident", dict(config))
    assert isinstance(rule, TrafficIncidentRule)
    return rule


def test_score_is_one_half_when_both_criteria_are_just_met() -> None:
    # with no deviation the floor sets the scale: sd = 0.25 x mean occupancy (0.1) = 0.025;
    # occupancy 3 sd above (0.175) and speed 40% below (30 of 50): m = 1, score 0.5
    rule = new_rule(deviation_floor=0.25, min_slot_points=1)
    t = T0.timestamp()
    for n in range(10):
        rule.process(reading(0.1, 50.0, 100.0), t + n * 300)
    v = rule.process(reading(0.175, 30.0, 100.0), t + 3000)
    assert v.score == pytest.approx(0.5, abs=1e-6)


def test_each_sensor_learns_its_own_normal() -> None:
    """No absolute thresholds: what is a jam on a quiet road is ordinary on a busy one."""
    quiet, busy = new_rule(), new_rule()
    t = learn(quiet, 3, occ=0.05, speed=60, flow=30)
    assert learn(busy, 3, occ=0.40, speed=25, flow=30) == t
    jam = reading(0.40, 25.0, 30.0)
    on_quiet = quiet.process(jam, t)
    # m = min(z / 3, 0.58 / 0.4) = 1.45: score 1 / (1 + exp(-4 x 0.45))
    assert on_quiet.score == pytest.approx(1 / (1 + math.exp(-4 * (0.5833 / 0.4 - 1))), abs=0.01)
    assert on_quiet.sub_category == "trafficJam"
    assert "occupancy" in on_quiet.reason and "sigma above expected" in on_quiet.reason
    assert "averageVehicleSpeed 58% below (25 vs 60" in on_quiet.reason
    assert busy.process(jam, t).score < 0.05


def test_busy_but_flowing_is_no_incident_and_a_blockage_is_an_accident() -> None:
    rule = new_rule()
    t = learn(rule, 3, occ=0.10, speed=50, flow=40)
    assert rule.process(reading(0.35, 48.0, 120.0), t).score < 0.05  # more cars, same speed
    slow_night_car = reading(0.11, 20.0, 2.0)  # speed down, occupancy normal
    assert rule.process(slow_night_car, t + 300).score < 0.05
    blockage = rule.process(reading(0.45, 8.0, 5.0), t + 600)
    assert blockage == Verdict(blockage.score, blockage.reason, "carAccident", "high")
    assert blockage.score > 0.98
    assert "vehicles queue but few pass" in blockage.reason


def test_times_of_day_have_their_own_normal() -> None:
    rule = new_rule(min_slot_points=5)
    rng = random.Random(3)
    t = T0
    while t < T0 + timedelta(days=3):  # slow and busy every day from 8 to 9
        rush = t.hour == 8
        values = reading(0.45 if rush else 0.08, 20.0 if rush else 55.0, 80.0)
        rule.process({k: v * (1 + rng.gauss(0, 0.03)) for k, v in values.items()}, t.timestamp())
        t += STEP
    eight, noon = T0 + timedelta(days=3, hours=8, minutes=10), T0 + timedelta(days=3, hours=12)
    assert rule.process(reading(0.45, 20.0, 80.0), eight.timestamp()).score < 0.05
    assert rule.process(reading(0.45, 20.0, 80.0), noon.timestamp()).score > 0.9


def test_no_score_before_the_sensor_has_a_normal() -> None:
    rule = new_rule(min_slot_points=5)
    scores = [rule.process(reading(0.9, 1.0, 1.0), T0.timestamp() + n).score for n in range(5)]
    assert scores == [0.0] * 5


def test_memory_does_not_grow_with_the_stream() -> None:
    def size(rule: TrafficIncidentRule) -> int:
        normals = [rule.occ, rule.speed, rule.flow]
        return sum(len(n.slots) + 1 for n in normals if n is not None)

    rule = new_rule()
    learn(rule, 1, occ=0.1, speed=50, flow=40)
    after_a_day = size(rule)
    learn(rule, 20, occ=0.1, speed=50, flow=40)
    assert size(rule) == after_a_day == 3 * (2 * 24 + 1)


def test_exp_stat_follows_drift_in_constant_memory() -> None:
    s = ExpStat(horizon=50)
    for _ in range(1000):
        s.add(10.0)
    for _ in range(500):
        s.add(20.0)
    assert s.mean == pytest.approx(20.0, abs=0.01)
    assert math.isfinite(s.sd)


def test_time_slots_follow_the_configured_zone_and_weekends() -> None:
    rule = new_rule(timezone="Europe/Brussels")
    monday_0030_utc = datetime(2024, 1, 1, 0, 30, tzinfo=UTC).timestamp()  # 01:30 in Brussels
    assert rule.slot(monday_0030_utc) == 1
    saturday = datetime(2024, 1, 6, 12, 0, tzinfo=UTC).timestamp()
    assert rule.slot(saturday) == 24 + 13


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"timezone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"speed": "occupancy"}, "must be different attributes"),
        ({"speed_drop": 1.5}, "less than 1"),
        ({"slots_per_day": 0}, "greater than or equal to 1"),
        ({"speeed": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_rule_settings_say_what_is_wrong(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrafficIncidentConfig.model_validate(config)


def test_unknown_rule_is_named() -> None:
    with pytest.raises(KeyError, match="no rule named 'nope'; registered: traffic-incident"):
        create_rule("nope")


@pytest.mark.parametrize("module", [rules, service, settings])
def test_doctests(module: ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0


@pytest.mark.parametrize("name", sorted(rules.RULES))
def test_every_rule_keeps_the_streaming_contract(name: str) -> None:
    """Deterministic, scores in [0, 1], and a prefix scores the same whatever follows."""

    def run(n: int) -> list[float]:
        rule = create_rule(name)
        required, optional = rule.inputs()
        rng = random.Random(11)
        out = []
        for i in range(n):
            values = {a: rng.uniform(0.0, 1.0) * (50 if i % 97 else 5) for a in required}
            values.update({a: rng.uniform(0.0, 100.0) for a in optional})
            out.append(rule.process(values, T0.timestamp() + 300 * i).score)
        return out

    full = run(3000)
    assert all(0.0 <= s <= 1.0 for s in full)
    assert run(3000) == full
    assert run(1000) == full[:1000]
