"""The [anomaly] settings: defaults, the documented example, and precise errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cityward.anomaly.detectors import DEFAULT
from cityward.anomaly.settings import (
    AnomalySettings,
    DetectorWatch,
    TrafficIncidentWatch,
    default_watches,
)
from cityward.config import Settings, load_settings

DOCS = Path(__file__).resolve().parents[2] / "docs" / "anomaly.md"


def test_off_by_default_with_a_sensible_watch_set() -> None:
    settings = Settings().anomaly
    assert settings.enabled is False
    assert [(w.key, w.entity_type, w.category, w.sub_category) for w in settings.watches] == [
        ("traffic-incident", "TrafficFlowObserved", "traffic", None),
        ("air-no2", "AirQualityObserved", "environment", "airPollution"),
        ("air-pm10", "AirQualityObserved", "environment", "airPollution"),
        ("air-pm25", "AirQualityObserved", "environment", "airPollution"),
        ("noise-laeq", "NoiseLevelObserved", "environment", None),
    ]
    assert len(default_watches()) == 5


def test_defaults_are_filled_in() -> None:
    # the platform's default detector is the ensemble: one alarm per incident at a score of
    # 0.5 (then quiet for its dead time), so one point opens; high is a tail 100 times rarer
    assert DEFAULT == "ensemble"
    w = DetectorWatch(entity_type="TrafficFlowObserved", attribute="averageVehicleSpeed")
    assert w.key == "TrafficFlowObserved-averageVehicleSpeed"
    assert w.levels == pytest.approx((0.5, 0.995, 0.5))
    assert (w.opens_after, w.close_after, w.warmup, w.detector) == (1, 6, 288, "default")
    # a detector that declares no hints (the windowed Gaussian: a smooth tail probability)
    # gets the service's own defaults: 0.999, a tail 100 times rarer, and runs of 3
    g = DetectorWatch(
        entity_type="TrafficFlowObserved",
        attribute="averageVehicleSpeed",
        detector="windowed-gaussian",
    )
    assert g.levels == pytest.approx((0.999, 0.99999, 0.999))
    assert (g.opens_after, g.close_after, g.warmup) == (3, 6, 288)
    rule = TrafficIncidentWatch(kind="traffic-incident", entity_type="TrafficFlowObserved")
    assert rule.levels == pytest.approx((0.5, 0.995, 0.5))
    assert rule.category == "traffic"


def test_settings_survive_the_trip_to_worker_processes() -> None:
    settings = Settings(anomaly={"enabled": True})
    assert Settings.model_validate_json(settings.model_dump_json()).anomaly == settings.anomaly


def test_the_documented_example_is_valid(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.S)
    example = next(b for b in blocks if "[anomaly]" in b)
    path = tmp_path / "cityward.toml"
    path.write_text(example)
    anomaly = load_settings(path).anomaly
    assert anomaly.enabled
    assert [w.key for w in anomaly.watches] == [
        "traffic-incident",
        "ring-speed",
        "air-no2",
        "pump-vibration",
    ]
    # ring-speed: the platform's default detector (the ensemble) with its own thresholds
    ring = anomaly.watches[1]
    assert isinstance(ring, DetectorWatch) and ring.detector == "default"
    assert ring.levels == pytest.approx((0.5, 0.995, 0.5))
    assert ring.opens_after == 1
    assert tomllib.loads(example)["anomaly"]["max_streams"] == anomaly.max_streams == 20000


def watch(**fields: Any) -> dict[str, Any]:
    return {"entity_type": "TrafficFlowObserved", "attribute": "averageVehicleSpeed", **fields}


@pytest.mark.parametrize(
    ("anomaly", "where", "message"),
    [
        (
            {"watches": [watch(detector="nope")]},
            "anomaly.watches.0.detector.detector",
            "detector 'nope' is not registered; one of: ",
        ),
        (
            # 'default' is the ensemble: its config is checked
            {"watches": [watch(detector_config={"dead_time": -1})]},
            "anomaly.watches.0.detector.detector_config",
            "settings of detector 'default': dead_time: Input should be greater than or equal to 0",
        ),
        (
            {"watches": [watch(detector="windowed-gaussian", detector_config={"window": 1})]},
            "anomaly.watches.0.detector.detector_config",
            "settings of detector 'windowed-gaussian': window: Input should be greater than or "
            "equal to 2",
        ),
        (
            {"watches": [watch(kind="bogus")]},
            "anomaly.watches.0",
            "Input tag 'bogus' found using _kind() does not match any of the expected tags: "
            "'detector', 'traffic-incident'",
        ),
        (
            {"watches": [{"kind": "traffic-incident", "entity_type": "X", "rule": {"horizon": 1}}]},
            "anomaly.watches.0.traffic-incident.rule.horizon",
            "Input should be greater than or equal to 10",
        ),
        (
            {"watches": [watch(entity_type="Pump")]},
            "anomaly.watches.0.detector",
            "category is required for entity type 'Pump'",
        ),
        (
            {"watches": [watch(entity_type="Alert")]},
            "anomaly.watches.0.detector.entity_type",
            "the anomaly service writes Alert entities; it cannot watch them",
        ),
        (
            {"watches": [watch(threshold=0.9, high_threshold=0.5)]},
            "anomaly.watches.0.detector",
            "high_threshold (0.5) must not be below threshold (0.9)",
        ),
        (
            {"watches": [watch(threshold=0.9, clear_threshold=0.95)]},
            "anomaly.watches.0.detector",
            "clear_threshold (0.95) must not be above threshold (0.9)",
        ),
        (
            {"watches": [watch(threshold=1.5)]},
            "anomaly.watches.0.detector.threshold",
            "Input should be less than or equal to 1",
        ),
        (
            {"watches": [watch(sub_category="jam")]},
            "anomaly.watches.0.detector.sub_category",
            "'jam' is not an Alert subCategory of the Smart Data Model",
        ),
        (
            {"watches": [watch(id_pattern="(")]},
            "anomaly.watches.0.detector.id_pattern",
            "id_pattern '(' is not a valid regex",
        ),
        (  # a named group: Python's re took it, the API's idPattern does not
            {"watches": [watch(id_pattern="urn:(?P<site>north):.*")]},
            "anomaly.watches.0.detector.id_pattern",
            "id_pattern 'urn:(?P<site>north):.*' is not a valid regex of the subset both stores "
            "read alike",
        ),
        (
            {"watches": [watch(), watch()]},
            "anomaly",
            "watch names must be unique; repeated: TrafficFlowObserved-averageVehicleSpeed",
        ),
        (  # two default names that differ only where the cleaning made '-'
            {"watches": [watch(attribute="Δp"), watch(name="mine"), watch(attribute="Σp")]},
            "anomaly",
            "repeated: TrafficFlowObserved--p (watches 0, 2; 0, 2 named by default "
            "<type>-<attribute>, characters outside A-Za-z0-9._- made '-' and cut at 64: give "
            "them a name)",
        ),
        (
            {"watches": [watch(treshold=0.9)]},
            "anomaly.watches.0.detector.treshold",
            "Extra inputs are not permitted",
        ),
        ({"max_streams": 0}, "anomaly.max_streams", "Input should be greater than or equal to 1"),
    ],
)
def test_bad_settings_name_the_field(anomaly: dict[str, Any], where: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(anomaly=anomaly)
    (error,) = info.value.errors()
    assert ".".join(str(p) for p in error["loc"]) == where
    assert message in error["msg"]


def test_settings_class_is_strict() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        AnomalySettings.model_validate({"enable": True})


def test_id_pattern_selects_the_ids_that_idpattern_selects() -> None:
    """A watch's id_pattern ran in Python's re, where \\w takes any letter and a named group
    is allowed; the API's idPattern and governance's id patterns read the portable subset
    (ASCII classes, the whole id). One pattern now selects the same entities everywhere."""
    from cityward.bank.query.qlang import full_match
    from cityward.bank.query.sqlgen import compile_pattern

    ids = ["urn:x:abc", "urn:x:é", "URN:X:abc", "urn:x:abc:1", "urn:x:", "urn:x:a_b"]
    for pattern in (r"urn:x:\w+", r"(?i)urn:x:[a-c]+", "urn:x:.*", r"urn:x:[^:]*"):
        w = DetectorWatch(
            entity_type="TrafficFlowObserved", attribute="intensity", id_pattern=pattern
        )
        api = compile_pattern(full_match(pattern))
        assert [i for i in ids if w.matches_id(i)] == [i for i in ids if api.search(i)], pattern
    w = DetectorWatch(entity_type="TrafficFlowObserved", attribute="intensity", id_pattern=r"\w+")
    assert w.matches_id("abc") and not w.matches_id("é")
