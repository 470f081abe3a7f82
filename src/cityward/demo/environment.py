"""The demo city's environment stations: air quality and noise with a daily rhythm and incidents.

Each station's readings follow the traffic's daily profile (:func:`cityward.demo.city.profile`:
quiet nights, morning and evening peaks) plus measurement noise, and now and then an injected
incident that the anomaly service should notice:

- ``spike``: a local source (a fire, a construction site): NO2 and PM10 x2.5-4, noise +15-25 dB;
- ``frozen``: the sensor sticks at its last value (a fault, not an event in the city).

Incidents start at random (about one per station per ``incident_every_h`` hours) and last 10 to
25 simulated minutes. Everything is drawn from one seeded generator, so a run is repeatable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from cityward.demo.city import profile

AIR = "AirQualityObserved"
NOISE = "NoiseLevelObserved"
KINDS = ("spike", "frozen")


@dataclass
class Incident:
    kind: str
    start: float
    end: float


@dataclass
class Station:
    id: str
    type: str  # AIR or NOISE
    bias: float = 1.0  # a busy street reads higher than a park
    incident: Incident | None = None
    last: dict[str, float] = field(default_factory=dict)
    incidents: list[Incident] = field(default_factory=list)  # every one injected so far


def normal(kind: str, load: float, bias: float, rng: random.Random) -> dict[str, float]:
    """Readings without an incident at traffic ``load`` (0..1 of the daily peak)."""
    if kind == AIR:
        return {
            "no2": max(1.0, bias * (12.0 + 38.0 * load) + rng.gauss(0, 2.5)),
            "pm10": max(1.0, bias * (10.0 + 14.0 * load) + rng.gauss(0, 1.5)),
        }
    return {"LAeq": max(30.0, 44.0 + 10.0 * bias * load + 8.0 * load + rng.gauss(0, 1.2))}


class Stations:
    """Readings of all stations, one call per simulated minute (or any step)."""

    def __init__(
        self, stations: list[Station], *, seed: int = 11, incident_every_h: float = 3.0
    ) -> None:
        self.stations = stations
        self.rng = random.Random(seed)
        self.incident_every_h = incident_every_h

    def read(self, t: float, dt: float) -> list[tuple[Station, dict[str, float]]]:
        """Every station's readings at simulation time ``t`` (s after midnight), ``dt`` s after
        the previous call."""
        load = profile(t)
        out = []
        p_start = dt / (self.incident_every_h * 3600.0)
        for s in self.stations:
            if s.incident is not None and t >= s.incident.end:
                s.incident = None
            if s.incident is None and self.rng.random() < p_start:
                s.incident = Incident(
                    self.rng.choice(KINDS), t, t + self.rng.uniform(600.0, 1500.0)
                )
                s.incidents.append(s.incident)
            values = normal(s.type, load, s.bias, self.rng)
            if s.incident is not None and s.incident.kind == "frozen" and s.last:
                values = dict(s.last)
            elif s.incident is not None and s.incident.kind == "spike":
                if s.type == AIR:
                    factor = self.rng.uniform(2.5, 4.0)
                    values = {k: v * factor for k, v in values.items()}
                else:
                    values = {"LAeq": values["LAeq"] + self.rng.uniform(15.0, 25.0)}
            s.last = values
            out.append((s, values))
        return out


UNITS = {"no2": "GQ", "pm10": "GQ", "LAeq": "2N"}


def fragment(station: Station, values: dict[str, float], at: str) -> dict[str, Any]:
    """The NGSI-LD update of one station's readings, observed at ``at``."""
    doc: dict[str, Any] = {"id": station.id, "type": station.type}
    for name, value in values.items():
        doc[name] = {
            "type": "Property",
            "value": round(value, 1),
            "unitCode": UNITS[name],
            "observedAt": at,
        }
    return doc


def demo_stations(entities: list[dict[str, Any]]) -> list[Station]:
    """The stations among the demo's seeded entities, each with its own bias."""
    rng = random.Random(5)
    return [
        Station(e["id"], e["type"], bias=rng.uniform(0.7, 1.3))
        for e in entities
        if e["type"] in (AIR, NOISE)
    ]


# -- the stations as devices: they push their own JSON to /ingest/{source} ----------------------
AIR_SOURCE = "air-stations"
NOISE_SOURCE = "noise-stations"
SOURCE_OF = {AIR: AIR_SOURCE, NOISE: NOISE_SOURCE}
STATION_PATTERNS = [
    r"urn:ngsi-ld:AirQualityObserved:demo-\d+",
    r"urn:ngsi-ld:NoiseLevelObserved:demo-\d+",
]


def payload(station: Station, values: dict[str, float], at: str) -> dict[str, Any]:
    """What a station sends: its own short JSON, not NGSI-LD (the ingest mapping makes that)."""
    return {
        "station": station.id.rsplit(":", 1)[1],
        "at": at,
        **{name: round(value, 1) for name, value in values.items()},
    }


def ingest_sources() -> list[dict[str, Any]]:
    """The ``[ingest]`` sources of the demo's stations (HTTP push, one per entity type)."""

    def source(name: str, entity_type: str, attrs: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "adapter": "http",
            "options": {"max_messages": 5000},
            "mapping": {
                "entity_type": entity_type,
                "id": f"urn:ngsi-ld:{entity_type}:{{$.station}}",
                "timestamp": {"path": "$.at", "format": "iso8601"},
                "attributes": {a: {"path": f"$.{a}", "unit": u} for a, u in attrs.items()},
            },
        }

    return [
        source(AIR_SOURCE, AIR, {"no2": UNITS["no2"], "pm10": UNITS["pm10"]}),
        source(NOISE_SOURCE, NOISE, {"LAeq": UNITS["LAeq"]}),
    ]
