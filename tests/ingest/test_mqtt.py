"""MQTT ingest against real Mosquitto: malformed messages, killed workers, a restarted broker.

Every reading the broker acknowledged to the publisher must end up in the bank exactly once:
counted and checksummed in the attribute history.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from cityward.bank.store import open_store
from cityward.bank.store.sqlite import SqliteStore
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.worker import IngestWorker
from tests.ingest.brokers import Mosquitto, require_shared_broker
from tests.ingest.helpers import (
    IngestRun,
    Publisher,
    bank_with_history,
    history_count,
    message,
    mqtt_source,
    settings,
    stored_readings,
)


def _wait(cond: Any, timeout: float, what: str | Callable[[], str]) -> None:
    """Wait for ``cond``; ``what`` says what failed, made when it fails when it is callable
    (a message with a count in it is then the count at the failure, not at the start)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)


def _subscribed_worker(tmp_path: Path, root: str) -> tuple[SqliteStore, IngestWorker]:
    """An in-process worker on SQLite, subscribed to ``root/+`` on the machine's broker."""
    require_shared_broker()
    store = SqliteStore(tmp_path / "bank.db")
    bank = bank_with_history(store)
    opts = {"port": 1883, "topics": [f"{root}/+"], "client_id": f"ingest-{root}"}
    worker = IngestWorker(bank, settings("mqtt", opts), DeadLetters(tmp_path / "dl.db"))
    worker.start()
    adapter: Any = worker.adapters["air"]
    assert adapter.subscribed.wait(10), adapter.status()
    return store, worker


def test_malformed_messages_become_dead_letters_and_the_rest_is_written(tmp_path: Path) -> None:
    """1% malformed payloads among valid ones, through the machine's broker at :1883."""
    root = f"cw-test-{uuid.uuid4().hex[:8]}"
    store, worker = _subscribed_worker(tmp_path, root)
    bad = {
        100: b"{not json",
        200: orjson.dumps({"dev": "s1", "n": 99_200, "ts": 1_790_000_000_000}),  # no no2
        300: orjson.dumps({"dev": "s1", "n": 99_300, "ts": 1_790_000_000_000, "no2": "high"}),
        400: orjson.dumps({"dev": "bad id!", "n": 99_400, "ts": 1, "no2": 1}),
        500: orjson.dumps([1, 2, 3]),
    }
    pub = Publisher(1883, root)
    try:
        for n in range(600):
            pub.publish(n, bad.get(n))
        valid = 600 - len(bad)
        _wait(lambda: len(pub.acked) == valid, 30, "the broker did not acknowledge everything")
        _wait(
            lambda: (
                worker.writer.stats.written == valid and len(worker.dead_letters.entries()) == 5
            ),
            30,
            f"not everything arrived: {worker.status()}",
        )
    finally:
        pub.close()
        worker.stop()
    got = stored_readings(store)
    assert sorted(v for _, v in got) == [float(n) for n in range(600) if n not in bad]
    letters = worker.dead_letters.entries("air")
    reasons = {d.payload: (d.field, d.reason) for d in letters}
    assert reasons[bad[100]][0] == "$" and "not JSON" in reasons[bad[100]][1]
    assert reasons[bad[200]] == ("$.no2", "required attribute no2 is missing")
    assert reasons[bad[300]][0] == "$.no2"
    assert reasons[bad[400]][0] == "id"
    assert all(d.topic.startswith(root + "/") for d in letters)
    store.close()


def test_large_and_small_messages_arrive_whole(tmp_path: Path) -> None:
    """The reader joins the chunks of a packet once the packet is whole (it joined and
    re-parsed its buffer at every 64 KiB, quadratic in the message's size): messages from a
    few bytes to 3 MiB, interleaved, each arrive once and whole."""
    root = f"cw-large-{uuid.uuid4().hex[:8]}"
    store, worker = _subscribed_worker(tmp_path, root)
    pub = Publisher(1883, root)
    sizes = [0, 3 << 20, 10, 65_535, 65_536, 1 << 20, 200_000, 1, 2_500_000, 70_000]
    try:
        for n, pad in enumerate(sizes):
            pub.publish(n, orjson.dumps({**message(n), "pad": "x" * pad}))
        _wait(lambda: worker.writer.stats.written == len(sizes), 60, f"{worker.status()}")
    finally:
        pub.close()
        worker.stop()
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(len(sizes))]
    assert worker.dead_letters.entries() == []
    store.close()


@pytest.mark.parametrize(
    ("protocol", "front"), [("3.1.1", "false"), ("5", "true")], ids=["3.1.1", "5-front"]
)
def test_a_backlog_kept_while_away_is_written_and_acknowledged(
    tmp_path: Path, protocol: str, front: str
) -> None:
    """Messages published while cityward was down come with the kept session, before the
    SUBACK. Their acks used to be dropped as an earlier connection's: over MQTT 3.1.1 the
    backlog stopped at Mosquitto's in-flight window of 20, over MQTT 5 at receive_maximum,
    and what was written came again on every restart."""
    require_shared_broker()
    root = f"cw-backlog-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ingest.toml"
    config.write_text(
        f"[ingest]\nfront_process = {front}\n[ingest.writer]\nmax_delay_ms = 20\n"
        + mqtt_source(1883, root).replace(
            "[ingest.sources.mapping]",
            f'protocol = "{protocol}"\nreceive_maximum = 50\n[ingest.sources.mapping]'
            if protocol == "5"
            else f'protocol = "{protocol}"\n[ingest.sources.mapping]',
        )
    )
    data = tmp_path / "data"

    def run(n: int) -> IngestRun:
        ingest = IngestRun("all", config, data, tmp_path / f"ingest-{n}.log")
        ingest.start()
        _wait(lambda: "connected to" in ingest.text(), 30, f"run {n} did not connect")
        return ingest

    run(1).stop()  # the broker now keeps the session and its subscription
    total = 300
    pub = Publisher(1883, root)
    try:
        for n in range(total):
            pub.publish(n)
        _wait(lambda: len(pub.acked) == total, 30, "the broker did not acknowledge everything")
    finally:
        pub.close()
    store = open_store(None, data)
    back = run(2)
    try:
        _wait(lambda: history_count(store) >= total, 60, f"backlog stalled: {back.text()[-2000:]}")
    finally:
        back.stop()
    again = run(3)
    time.sleep(2.0)  # what the broker still holds unacknowledged arrives now
    again.stop()
    assert "duplicates" in again.text(), again.text()[-2000:]  # a status line was written
    assert again.last("written") == 0 and again.last("duplicates") == 0, again.text()[-2000:]
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(total)]
    store.close()


# -- the fault tests: `cityward ingest run` killed, the broker restarted ----------------------
CONFIG = """
[ingest]
[ingest.writer]
max_delay_ms = 20
"""


def test_nothing_acknowledged_is_lost_or_doubled_across_kills_and_a_broker_restart(
    tmp_path: Path, broker: Mosquitto
) -> None:
    root = f"cw-fault-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "ingest.toml"
    config.write_text(CONFIG + mqtt_source(broker.port, root))
    data = tmp_path / "data"
    ingest = IngestRun("all", config, data, tmp_path / "ingest.log", status_every="0")
    ingest.start()
    store = open_store(None, data)
    # The session must exist before the first message, or the broker has no one to keep it
    # for: wait for the SUBACK ("connected" is logged once the subscription is in place). A
    # fixed pause was too short on a loaded machine: the first readings were published before
    # the subscription and the broker dropped them, as it must.
    _wait(lambda: "session present: False" in ingest.text(), 60, "ingest did not subscribe")
    total = 6000
    pub = Publisher(broker.port, root)
    faults: list[str] = []

    def publish_all() -> None:
        for n in range(total):
            pub.publish(n)
            if n % 40 == 39:
                time.sleep(0.05)  # about 800 a second: the faults land mid-stream

    def count() -> int:
        return history_count(store)

    def progress(more: int, what: str) -> None:
        # the fault must hit a worker that is busy writing, not one still starting
        target = count() + more
        _wait(lambda: count() >= target, 60, lambda: f"no progress before {what}: {faults}")

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    try:
        progress(400, "the first kill")
        assert ingest.proc is not None
        fronts = psutil.Process(ingest.proc.pid).children()  # MQTT runs in a front process
        assert [f.cmdline()[-2] for f in fronts] == ["cityward.ingest.front"]
        ingest.kill()  # SIGKILL: batches in hand are neither written nor acknowledged
        faults.append(f"ingest SIGKILL after {count()} readings")
        # the front sees its writer gone and exits without acknowledging anything more
        _, alive = psutil.wait_procs(fronts, timeout=10)
        assert not alive, "the front process outlived the process it hands readings to"
        ingest.start()
        progress(400, "the broker restart")
        broker.restart()  # the session and its queue survive on disk
        faults.append(f"broker restart after {count()} readings")
        progress(400, "the second kill")
        ingest.kill()
        faults.append(f"ingest SIGKILL after {count()} readings")
        ingest.start()
        publisher.join()
        _wait(
            lambda: len(pub.acked) == total, 60, lambda: f"broker acked {len(pub.acked)} of {total}"
        )
        _wait(lambda: count() >= total, 90, lambda: f"{count()} readings arrived after {faults}")
        time.sleep(0.5)  # anything doubled would arrive now
    finally:
        publisher.join()
        pub.close()
        ingest.stop()
    got = stored_readings(store)
    values = sorted(v for _, v in got)
    assert len(values) == len(set(values)), "a reading was stored twice"
    assert set(values) == {float(n) for n in pub.acked}
    assert sum(values) == sum(range(total))  # the checksum
    assert ingest.kills == 2 and broker.restarts == 1
    store.close()


def test_a_slow_store_leaves_the_messages_at_the_broker(tmp_path: Path, broker: Mosquitto) -> None:
    """Backpressure over MQTT: with a throttled store the worker holds at most max_pending
    readings (plus the batch in hand); the rest waits at the broker and arrives later."""
    root = f"cw-slow-{uuid.uuid4().hex[:8]}"
    store = SqliteStore(tmp_path / "bank.db")
    bank = bank_with_history(store)

    def slow(txn: Any, changes: Any) -> None:
        time.sleep(0.03)  # a store that takes 30 ms a transaction

    bank.hooks.append(slow)
    opts = {"port": broker.port, "topics": [f"{root}/+"], "client_id": f"ingest-{root}"}
    cfg = settings("mqtt", opts, max_pending=100, batch_size=50)
    worker = IngestWorker(bank, cfg, DeadLetters(tmp_path / "dl.db"))
    worker.start()
    adapter: Any = worker.adapters["air"]
    assert adapter.subscribed.wait(10), adapter.status()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], worker.writer.pending)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    pub = Publisher(broker.port, root)
    total = 2000
    try:
        for n in range(total):
            pub.publish(n)
        _wait(lambda: len(pub.acked) == total, 30, "the broker did not take everything")
        # the broker has everything; the worker has taken only a part of it
        assert len(stored_readings(store)) < total
        _wait(lambda: worker.writer.stats.written == total, 120, f"{worker.status()}")
    finally:
        stop.set()
        watcher.join()
        pub.close()
        worker.stop()
    assert worker.writer.stats.waits > 0  # the adapter had to wait for room
    assert peak[0] <= 100 + 50
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(total)]
    store.close()
