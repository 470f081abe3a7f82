"""The demo city: a small set of georeferenced sensors written into the data bank.

This grows into the full simulated city (traffic in SUMO, environment stations, anomalies) as
those capabilities land; today it seeds realistic current readings only.
"""

from __future__ import annotations

import math
import random
from typing import Any

from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser, now_iso
from cityward.bank.service import Bank

# Ghent, Belgium: the demo grid is centred on its Korenmarkt.
CENTRE = (3.7215, 51.0543)


def demo_entities(
    n_junctions: int = 36, seed: int = 7, *, detectors: bool = True
) -> list[dict[str, Any]]:
    """Traffic detectors (unless ``detectors`` is false: the live simulation writes its own),
    air-quality and noise stations on a grid around the centre."""
    rng = random.Random(seed)
    now = now_iso()[:19] + "Z"
    side = max(1, int(math.sqrt(n_junctions)))
    out: list[dict[str, Any]] = []
    for n in range(n_junctions):
        lon = CENTRE[0] + ((n % side) - side / 2) * 0.004
        lat = CENTRE[1] + ((n // side) - side / 2) * 0.0028
        point = {"type": "Point", "coordinates": [round(lon, 6), round(lat, 6)]}
        if detectors:
            out.append(
                {
                    "id": f"urn:ngsi-ld:TrafficFlowObserved:demo-{n:03d}",
                    "type": "TrafficFlowObserved",
                    "location": {"type": "GeoProperty", "value": point},
                    "intensity": {
                        "type": "Property",
                        "value": rng.randint(40, 900),
                        "observedAt": now,
                    },
                    "occupancy": {
                        "type": "Property",
                        "value": round(rng.uniform(0.02, 0.6), 3),
                        "observedAt": now,
                    },
                    "averageVehicleSpeed": {
                        "type": "Property",
                        "value": round(rng.uniform(12, 55), 1),
                        "unitCode": "KMH",
                        "observedAt": now,
                    },
                    "laneId": {"type": "Property", "value": n % 3 + 1},
                }
            )
        if n % 6 == 0:
            out.append(
                {
                    "id": f"urn:ngsi-ld:AirQualityObserved:demo-{n:03d}",
                    "type": "AirQualityObserved",
                    "location": {"type": "GeoProperty", "value": point},
                    "no2": {
                        "type": "Property",
                        "value": round(rng.uniform(8, 60), 1),
                        "unitCode": "GQ",
                        "observedAt": now,
                    },
                    "pm10": {
                        "type": "Property",
                        "value": round(rng.uniform(5, 45), 1),
                        "unitCode": "GQ",
                        "observedAt": now,
                    },
                }
            )
        if n % 9 == 4:
            out.append(
                {
                    "id": f"urn:ngsi-ld:NoiseLevelObserved:demo-{n:03d}",
                    "type": "NoiseLevelObserved",
                    "location": {"type": "GeoProperty", "value": point},
                    "LAeq": {
                        "type": "Property",
                        "value": round(rng.uniform(48, 75), 1),
                        "unitCode": "2N",
                        "observedAt": now,
                    },
                }
            )
    return out


def seed_city(bank: Bank, *, detectors: bool = True) -> int:
    """Write the demo entities (creating the ones that are missing); returns how many were new."""
    parser = EntityParser(ContextResolver(allow_fetch=False).core)
    docs = [parser.entity(e) for e in demo_entities(detectors=detectors)]
    result = bank.batch_upsert("", docs, "update")
    return len(result.created)
