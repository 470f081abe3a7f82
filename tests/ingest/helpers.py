"""Shared pieces of the ingest tests: a mapping, a bank on real SQLite, what the bank holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cityward.bank.history import History
from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.ingest.settings import IngestSettings

AQ = "https://uri.etsi.org/ngsi-ld/default-context/"
MAPPING: dict[str, Any] = {
    "entity_type": "AirQualityObserved",
    "id": "urn:ngsi-ld:AirQualityObserved:{$.dev}",
    "message_id": "$.n",
    "timestamp": {"path": "$.ts", "format": "epoch_ms"},
    "attributes": {"no2": {"path": "$.no2", "required": True}},
}


def settings(adapter: str, options: dict[str, Any], **writer: Any) -> IngestSettings:
    return IngestSettings.model_validate(
        {
            "sources": [
                {"name": "air", "adapter": adapter, "options": options, "mapping": MAPPING}
            ],
            "writer": {"max_delay_ms": 20, **writer},
        }
    )


def message(n: int, devices: int = 50) -> dict[str, Any]:
    return {"dev": f"s{n % devices}", "n": n, "ts": 1_790_000_000_000 + n * 1000, "no2": n}


def bank_with_history(store: Store) -> Bank:
    bank = Bank(store)
    History(store, bank)
    return bank


def stored_readings(store: Store) -> list[tuple[str, float]]:
    """(entity id, no2) of every no2 reading in the attribute history."""
    rows = store.select(
        "SELECT e.eid, h.num FROM attr_history h JOIN entities e ON e.pk = h.e "
        "JOIN attr_history_attrs a ON a.path = h.path WHERE a.iri = ?",
        [AQ + "no2"],
    )
    return [(str(e), float(v)) for e, v in rows]


def data_dir(tmp: Path) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    return d
