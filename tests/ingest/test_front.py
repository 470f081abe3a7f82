"""MQTT received in a front process of its own, written by this one (``front_process``).

Against real Mosquitto: the dead letters the front stores itself and those the bank refuses
here, the status the front reports, and a front SIGKILLed mid-stream (respawned; every
reading the broker acknowledged ends up in the bank exactly once).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import orjson

from cityward.bank.store.sqlite import SqliteStore
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.worker import IngestWorker
from tests.ingest.brokers import Mosquitto
from tests.ingest.helpers import (
    Publisher,
    bank_with_history,
    refusing,
    settings,
    stored_readings,
)
from tests.ingest.test_mqtt import _wait


def _worker(tmp_path: Path, port: int, root: str, store: SqliteStore) -> IngestWorker:
    opts = {"port": port, "topics": [f"{root}/+"], "client_id": f"ingest-{root}"}
    return IngestWorker(
        bank_with_history(store),
        settings("mqtt", opts),
        DeadLetters(tmp_path / "dl.db"),
        write_context=refusing(":s3"),  # the bank refuses device s3's readings
        front_process=True,
    )


def _connected(worker: IngestWorker) -> None:
    """Wait until the front's MQTT session is up and subscribed."""
    _wait(lambda: worker.status()["sources"].get("air", {}).get("connected"), 30, "no front")
    time.sleep(0.5)  # the SUBACK follows the CONNACK


def test_the_front_stores_its_dead_letters_and_those_the_bank_refused(
    tmp_path: Path, broker: Mosquitto
) -> None:
    root = f"cw-front-{uuid.uuid4().hex[:8]}"
    store = SqliteStore(tmp_path / "bank.db")
    worker = _worker(tmp_path, broker.port, root, store)
    assert worker.adapters == {} and worker.front_process is not None  # MQTT runs apart
    worker.start()
    bad = {100: b"{not json", 200: orjson.dumps({"dev": "s1", "n": 1, "ts": 1})}  # no no2
    pub = Publisher(broker.port, root)
    try:
        _connected(worker)
        for n in range(300):
            pub.publish(n, bad.get(n))
        refused = [n for n in range(300) if n % 50 == 3]
        valid = 300 - len(bad) - len(refused)
        _wait(lambda: len(stored_readings(store)) == valid, 30, f"{worker.status()}")
        letters = 2 + len(refused)
        _wait(lambda: len(worker.dead_letters.entries(limit=1000)) == letters, 30, "letters")
        # the front's counts reach this process's status
        _wait(
            lambda: worker.status()["sources"]["air"]["dead_letters"] == letters,
            10,
            f"{worker.status()}",
        )
        status = worker.status()
        assert status["sources"]["air"]["messages"] == 300
        assert status["front_process"]["alive"] and status["front_process"]["spawns"] == 1
    finally:
        pub.close()
        worker.stop()
    assert worker.front_process is not None and not worker.front_process.alive
    entries = worker.dead_letters.entries("air", limit=1000)
    by_reason = {d.payload: d for d in entries}
    assert by_reason[b"{not json"].field == "$"
    # a refusal made here is stored by the front with the message as the device sent it
    refused_letters = [d for d in entries if "the bank refused it" in d.reason]
    assert sorted(orjson.loads(d.payload)["n"] for d in refused_letters) == refused
    assert all("is not yours" in d.reason and d.field == "id" for d in refused_letters)
    assert all(d.topic.startswith(root + "/") for d in refused_letters)
    values = sorted(v for _, v in stored_readings(store))
    assert values == [float(n) for n in range(300) if n not in bad and n % 50 != 3]
    store.close()


def test_a_killed_front_is_replaced_and_nothing_is_lost_or_doubled(
    tmp_path: Path, broker: Mosquitto
) -> None:
    root = f"cw-frontkill-{uuid.uuid4().hex[:8]}"
    store = SqliteStore(tmp_path / "bank.db")
    worker = _worker(tmp_path, broker.port, root, store)
    fp = worker.front_process
    assert fp is not None
    worker.start()
    total = 4000
    pub = Publisher(broker.port, root)

    def publish_all() -> None:
        for n in range(total):
            pub.publish(n)
            if n % 40 == 39:
                time.sleep(0.05)  # about 800 a second: the kill lands mid-stream

    publisher = threading.Thread(target=publish_all)
    try:
        _connected(worker)
        publisher.start()
        _wait(lambda: len(stored_readings(store)) >= 600, 60, "no progress before the kill")
        assert fp._proc is not None
        os.kill(fp._proc.pid, signal.SIGKILL)  # batches in flight: written, not acknowledged
        _wait(lambda: fp.stats.spawns == 2 and fp.alive, 30, f"no new front: {fp.stats}")
        publisher.join()
        _wait(lambda: len(pub.acked) == total, 60, f"broker acked {len(pub.acked)} of {total}")
        expected = {n for n in pub.acked if n % 50 != 3}
        _wait(lambda: len(stored_readings(store)) >= len(expected), 90, f"{worker.status()}")
        time.sleep(0.5)  # anything doubled would arrive now
    finally:
        if publisher.is_alive():
            publisher.join()
        pub.close()
        worker.stop()
    values = [v for _, v in stored_readings(store)]
    assert len(values) == len(set(values)), "a reading was stored twice"
    assert set(values) == {float(n) for n in expected}
    assert "exit code -9" in fp.stats.last_exit
    store.close()
