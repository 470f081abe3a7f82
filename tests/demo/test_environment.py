"""The demo's environment stations: the day's rhythm, injected incidents, repeatability."""

from __future__ import annotations

import statistics

from cityward.demo import demo_entities
from cityward.demo.environment import AIR, NOISE, Station, Stations, demo_stations, fragment

MINUTE = 60.0


def run(
    hours: float, seed: int = 3, every_h: float = 1e9
) -> list[tuple[float, str, dict[str, float]]]:
    st = Stations([Station("a", AIR), Station("n", NOISE)], seed=seed, incident_every_h=every_h)
    out = []
    t = 0.0
    while t < hours * 3600:
        for s, values in st.read(t, MINUTE):
            out.append((t, s.type, values))
        t += MINUTE
    return out


def test_the_day_shows_in_the_readings() -> None:
    day = run(24)

    def mean(kind: str, name: str, h0: int, h1: int) -> float:
        return statistics.mean(v[name] for t, k, v in day if k == kind and h0 <= t / 3600 < h1)

    assert mean(AIR, "no2", 7, 9) > 1.8 * mean(AIR, "no2", 2, 4)
    assert mean(NOISE, "LAeq", 16, 18) > mean(NOISE, "LAeq", 2, 4) + 8


def test_incidents_are_injected_and_visible() -> None:
    st = Stations([Station(f"a{i}", AIR) for i in range(10)], seed=1, incident_every_h=2)
    spikes: list[float] = []
    quiet: list[float] = []
    frozen_runs = 0
    t = 8 * 3600.0
    last: dict[str, dict[str, float]] = {}
    while t < 20 * 3600:
        for s, values in st.read(t, MINUTE):
            kind = s.incident.kind if s.incident else None
            (spikes if kind == "spike" else quiet).append(values["no2"])
            if kind == "frozen" and last.get(s.id) == values:
                frozen_runs += 1
            last[s.id] = values
        t += MINUTE
    kinds = {i.kind for s in st.stations for i in s.incidents}
    assert kinds == {"spike", "frozen"}
    assert statistics.median(spikes) > 2 * statistics.median(quiet)
    assert frozen_runs > 5


def test_repeatable_for_a_seed_and_different_for_another() -> None:
    assert run(2, seed=4, every_h=1) == run(2, seed=4, every_h=1)
    assert run(2, seed=4, every_h=1) != run(2, seed=5, every_h=1)


def test_the_demo_stations_and_their_updates() -> None:
    stations = demo_stations(demo_entities(detectors=False))
    assert {s.type for s in stations} == {AIR, NOISE}
    doc = fragment(stations[0], {"no2": 41.26, "pm10": 20.0}, "2026-11-23T08:00:00.000Z")
    assert doc["no2"] == {
        "type": "Property",
        "value": 41.3,
        "unitCode": "GQ",
        "observedAt": "2026-11-23T08:00:00.000Z",
    }
