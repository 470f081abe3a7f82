"""A cityward writer in NATS mode, run as a subprocess by test_feed.py and killed there.

Usage: python -m tests.bus.writer_process DB_PATH SETTINGS_JSON
Writes Sensor entities W0, W1, ... one transaction each, for ever, with the outbox hook and
the relay running; prints "started" once the relay runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cityward.bank.service import Bank
from cityward.bank.store.sqlite import SqliteStore
from cityward.bus.feed import ChangeBus
from cityward.bus.settings import BusSettings
from tests.bus.conftest import sensor


def main() -> None:
    store = SqliteStore(Path(sys.argv[1]))
    bank = Bank(store)
    bus = ChangeBus(BusSettings.model_validate_json(sys.argv[2]), store, bank, name="writer")
    bus.start()
    print("started", flush=True)
    i = 0
    while True:
        bank.batch_upsert("", [sensor(i, float(i), prefix="W")], "update")
        i += 1


if __name__ == "__main__":
    main()
