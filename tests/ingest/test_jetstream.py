"""Ingest over NATS JetStream (issue 9): fronts publish readings, writers write them.

Against the real NATS server at 127.0.0.1:4222 and the real PostgreSQL: a test that cannot
reach either fails. Each test has a stream (and change stream) of its own and deletes them.
Every reading must be in the bank's attribute history exactly once: counted and checksummed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from cityward.bank.store.postgres import PostgresStore
from cityward.bus.nats import JetStream
from cityward.bus.settings import BusSettings
from cityward.cli import app
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.jetstream import decode_message, encode_reading
from cityward.ingest.settings import IngestSettings, IngestStreamSettings
from cityward.ingest.worker import IngestWorker
from cityward.ingest.writer import Reading
from tests.conftest import PG_URL, drop_pg_store, make_pg_store
from tests.ingest.brokers import Mosquitto, NatsServer
from tests.ingest.helpers import (
    MAPPING,
    MAPPING_TOML,
    IngestRun,
    Publisher,
    bank_with_history,
    message,
    mqtt_source,
    refusing,
    stored_readings,
)

NATS_URL = os.environ.get("CITYWARD_TEST_NATS", "nats://127.0.0.1:4222")
pytestmark = pytest.mark.postgres


def _wait(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what()
        time.sleep(0.05)


@pytest.fixture
def tag() -> Iterator[str]:
    """A name of this test's own; its streams (readings and changes) are deleted after."""
    t = uuid.uuid4().hex[:10]
    yield t
    js = JetStream(NATS_URL, name="cityward-test-cleanup", connect_timeout_s=5)
    try:
        js.connect()
        js.delete_stream(f"TEST_INGEST_{t}")
        js.delete_stream(f"TEST_CHANGES_{t}")
    finally:
        js.close()


@pytest.fixture
def pg() -> Iterator[PostgresStore]:
    store = make_pg_store()
    yield store
    drop_pg_store(store)


def _settings(tag: str, **stream: Any) -> IngestSettings:
    return IngestSettings.model_validate(
        {
            "sources": [{"name": "air", "adapter": "http", "options": {}, "mapping": MAPPING}],
            "writer": {"max_delay_ms": 20, "max_pending": 3000},
            "jetstream": {
                "stream": f"TEST_INGEST_{tag}",
                "subject": f"test.{tag}.ingest",
                "ack_wait_s": 5,
                **stream,
            },
        }
    )


def _bus() -> BusSettings:
    return BusSettings(kind="nats", nats_url=NATS_URL, connect_timeout_s=5)


def _in_stream(js: JetStream, settings: IngestSettings) -> tuple[int, list[str]]:
    """How many messages the readings' stream holds, and the keys of the readings in them
    (in stream order, repeats included)."""
    data = js.stream_data(settings.jetstream.stream)
    return len(data), [r.key for d in data for r in decode_message(d)]


def _front_and_writer(
    settings: IngestSettings, pg: PostgresStore, tmp_path: Path, **writer: Any
) -> tuple[IngestWorker, IngestWorker]:
    """A front (no bank) and a writer (the bank on ``pg``) over the test's streams, in this
    process, each with dead letters of its own; ``writer``: more arguments of the writer."""
    front = IngestWorker(
        None, settings, DeadLetters(tmp_path / "front-dl.db"), bus=_bus(), role="front"
    )
    back = IngestWorker(
        bank_with_history(pg),
        settings,
        DeadLetters(tmp_path / "writer-dl.db"),
        bus=_bus(),
        role="writer",
        **writer,
    )
    return front, back


def test_front_and_writer_in_process_each_reading_once(
    tag: str, pg: PostgresStore, tmp_path: Path
) -> None:
    """A front (no bank) and a writer (the bank on PostgreSQL) in this process, over the
    stream: readings acknowledged only after JetStream took them, many to a stream message,
    each once in the bank; repeats (a device's retry, single-reading messages of an earlier
    front) dropped by the bank's delivery keys; a refused reading a dead letter at the writer,
    raw intact."""
    settings = _settings(tag)

    as_device = refusing(":s3")

    front, writer = _front_and_writer(settings, pg, tmp_path, write_context=as_device)
    assert front.adapters and not writer.adapters  # a writer receives from the stream only
    total, devices = 2000, 37
    refused = {n for n in range(total) if n % devices == 3}
    # the front first, alone: its acknowledgements must not wait for any writer
    front.start()
    outcomes: dict[int, str | None] = {}
    settled = threading.Semaphore(0)

    def feed(numbers: range) -> None:
        for n in numbers:

            def done(why: str | None, n: int = n) -> None:
                outcomes[n] = why
                settled.release()

            front.intakes["air"].receive(orjson.dumps(message(n, devices)), done=done)
        for _ in numbers:
            assert settled.acquire(timeout=30), f"not acknowledged: {front.status()}"

    js = JetStream(NATS_URL, name="cityward-test", connect_timeout_s=5)
    js.connect()
    try:
        feed(range(total))
        # every reading settled as stored by JetStream (the front cannot know of refusals),
        # each once, in fewer messages than readings
        assert outcomes == dict.fromkeys(range(total))
        messages, keys = _in_stream(js, settings)
        assert sorted(keys) == sorted(f"m:{n}" for n in range(total))
        assert messages < total
        # a device's retry: a message of the same readings as one before has its id, and the
        # stream drops it; the rest are in the stream again, in messages of their own
        feed(range(300))
        messages, keys = _in_stream(js, settings)
        again = [int(k[2:]) for k in keys[total:]]
        assert set(again) <= set(range(300)) and len(again) == len(set(again))
        # single-reading messages, as fronts before batched messages published them, of
        # readings the bank has: only the bank's keys stop them (of a device the bank
        # accepts: a refused reading is refused again, key or not)
        late = [n for n in range(500, 700) if n not in refused]
        js.publish_many(
            [
                (
                    f"{settings.jetstream.subject}.air",
                    encode_reading(
                        Reading(
                            "air",
                            f"m:{n}",
                            front.parser.entity(
                                front.intakes["air"].mapping.apply(message(n, devices)).fragment(),
                                "create",
                            ),
                        )
                    ),
                    f"late:{n}",
                )
                for n in late
            ]
        )
        writer.start()
        stats = writer.writer.stats
        repeats = [n for n in again if n not in refused] + late
        _wait(
            lambda: (
                stats.written + stats.refused == total + len(again) - len(repeats) + len(late)
                and stats.written == total - len(refused)
                and stats.duplicates == len(repeats)
                and writer.puller is not None
                and writer.puller.stats.acked == total + len(again) + len(late)
            ),
            60,
            lambda: f"not everything arrived: {writer.status()}",
        )
    finally:
        front.stop()
        writer.stop()
    got = stored_readings(pg)
    values = sorted(v for _, v in got)
    assert values == [float(n) for n in range(total) if n not in refused]  # once each
    assert sum(values) == sum(range(total)) - sum(refused)  # the checksum
    letters = writer.dead_letters.entries("air", limit=1000)
    # a refused reading is refused again when it comes again (it has no key in the bank)
    again_refused = [n for n in again if n in refused]
    assert sorted(orjson.loads(d.payload)["n"] for d in letters) == sorted(
        [*refused, *again_refused]
    )
    assert all("is not yours" in d.reason for d in letters)
    # everything was acknowledged: the shared consumer has nothing left for anyone
    try:
        s = settings.jetstream
        left = js.pull(s.stream, s.durable, s.subject + ".>", batch=10, timeout=0.5)
        assert left == []
    finally:
        js.close()


def _feed(worker: IngestWorker, numbers: range, pad: int = 0) -> tuple[threading.Thread, list[int]]:
    """Receive ``numbers`` at ``worker``'s front on a thread of their own (a full front
    blocks the receiving thread, as it blocks an adapter); the list fills with the numbers
    the front acknowledged."""
    acked: list[int] = []

    def settled(n: int) -> Callable[[str | None], None]:
        def done(why: str | None) -> None:
            if why is None:
                acked.append(n)

        return done

    def run() -> None:
        for n in numbers:
            payload = {**message(n, 37), "pad": "x" * pad}
            worker.intakes["air"].receive(orjson.dumps(payload), done=settled(n))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, acked


def test_the_stream_keeps_only_unwritten_readings_and_a_full_one_holds_fronts_back(
    tag: str, pg: PostgresStore, tmp_path: Path
) -> None:
    """The readings' stream is a work queue: a message leaves it once a writer has written
    and acknowledged its readings (with limits retention every reading stayed on the NATS
    server's disk for max_age_s, a week by default). Bounded by max_bytes, a full stream
    refuses new messages: the front retries, stops acknowledging, and its adapter waits;
    nothing is dropped, and once a writer drains the stream everything is in the bank once."""
    limit = 1 << 20
    settings = _settings(tag, max_bytes=limit, message_readings=20)
    front, writer = _front_and_writer(settings, pg, tmp_path)
    total = 1500  # about 3.4 MB of stream messages with their 2 KB raw payloads
    js = JetStream(NATS_URL, name="cityward-test", connect_timeout_s=5)
    js.connect()
    front.start()
    try:
        feeder, acked = _feed(front, range(total), pad=2000)
        assert front.front is not None
        stats = front.front.stats
        _wait(
            lambda: stats.publish_failures >= 3,
            60,
            lambda: f"the stream never refused: {front.status()}",
        )
        # full: filled up to its limit, the rest held back at the front, unacknowledged. (None
        # may be acknowledged yet: a front's first publish round can hold more than the
        # stream takes, and its readings are acknowledged only when all of them are stored.)
        held = len(acked)
        assert limit // 2 < js.stream_bytes(settings.jetstream.stream) <= limit
        assert held < total
        assert "maximum bytes" in stats.last_error or "resources" in stats.last_error, (
            stats.last_error
        )
        writer.start()
        _wait(
            lambda: len(acked) == total,
            120,
            lambda: f"{len(acked)} of {total} acknowledged: {front.status()} {writer.status()}",
        )
        feeder.join(10)
        assert writer.writer is not None
        _wait(
            lambda: (
                writer.writer.stats.written == total
                and js.stream_messages(settings.jetstream.stream) == 0
            ),
            60,
            lambda: (
                f"{js.stream_messages(settings.jetstream.stream)} messages left in the "
                f"stream: {writer.status()}"
            ),
        )
    finally:
        front.stop()
        writer.stop()
        js.close()
    values = sorted(v for _, v in stored_readings(pg))
    assert values == [float(n) for n in range(total)]  # each once
    assert sum(values) == sum(range(total))


def test_a_stream_made_with_limits_retention_keeps_working(
    tag: str, pg: PostgresStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A readings' stream an earlier cityward made (limits retention), which NATS cannot turn
    into a work queue: fronts and writers go on with it, and a warning says how to convert it."""
    settings = _settings(tag)
    s = settings.jetstream
    js = JetStream(NATS_URL, name="cityward-test", connect_timeout_s=5)
    js.connect()
    try:
        assert js.ensure_stream(s.stream, [s.subject + ".>"]) == "limits"
        worker = IngestWorker(
            bank_with_history(pg),
            settings,
            DeadLetters(tmp_path / "dl.db"),
            bus=_bus(),
            role="all",
        )
        with caplog.at_level("WARNING", logger="cityward.bus.nats"):
            worker.start()
        try:
            warned = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
            assert warned and f"nats stream rm {s.stream}" in warned[0], caplog.text
            feeder, acked = _feed(worker, range(200))
            _wait(lambda: len(acked) == 200, 60, lambda: f"{len(acked)}: {worker.status()}")
            feeder.join(10)
        finally:
            worker.stop()
        # limits: the written readings are still in the stream, as before
        assert js.stream_messages(s.stream) > 0
    finally:
        js.close()
    assert sorted(v for _, v in stored_readings(pg)) == [float(n) for n in range(200)]


def test_roles_need_nats_and_names_are_checked(tmp_path: Path) -> None:
    settings = _settings("x")
    with pytest.raises(ValueError, match='needs \\[bus\\] kind = "nats"'):
        IngestWorker(None, settings, DeadLetters(tmp_path / "dl.db"), role="front")
    with pytest.raises(ValueError, match="writes into a bank"):
        IngestWorker(None, settings, DeadLetters(tmp_path / "dl.db"), bus=_bus(), role="writer")
    with pytest.raises(ValidationError, match="letters, digits"):
        IngestStreamSettings(stream="INGEST.X")
    with pytest.raises(ValidationError, match="dot-separated"):
        IngestStreamSettings(subject="cityward.ingest.>")
    # the command line: in memory mode there is one role
    config = tmp_path / "c.toml"
    config.write_text(_replay_config("x", "memory", tmp_path / "r.jsonl"))
    result = CliRunner().invoke(
        app,
        ["ingest", "run", "--config", str(config), "--role", "writer"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 2, result.output
    assert 'needs [bus] kind = "nats"' in result.output


# -- the fault test: `cityward ingest run --role writer` SIGKILLed mid-stream ------------------
CONFIG = """
[bus]
kind = "{kind}"
nats_url = "{nats}"
connect_timeout_s = 5
changes_stream = "TEST_CHANGES_{tag}"
changes_subject = "test.{tag}.changes"
changes_max_age_s = 600

[ingest]
[ingest.writer]
max_delay_ms = 20
batch_size = 500
max_pending = 1500
[ingest.jetstream]
stream = "TEST_INGEST_{tag}"
subject = "test.{tag}.ingest"
max_age_s = 600
ack_wait_s = 2
pull_batch = 500
"""


def _replay_config(tag: str, kind: str, replay: Path) -> str:
    source = '[[ingest.sources]]\nname = "air"\nadapter = "replay"\n[ingest.sources.options]\n'
    source += f'path = "{replay}"\n' + MAPPING_TOML
    return CONFIG.format(tag=tag, kind=kind, nats=NATS_URL) + source


def test_a_writer_killed_mid_stream_loses_and_doubles_nothing(
    tag: str, pg: PostgresStore, tmp_path: Path
) -> None:
    total = 12_000
    bank_with_history(pg)  # the history tables, so that counting works before a writer runs
    replay = tmp_path / "readings.jsonl"
    replay.write_bytes(b"\n".join(orjson.dumps(message(n)) for n in range(total)) + b"\n")
    config = tmp_path / "ingest.toml"
    config.write_text(_replay_config(tag, "nats", replay))
    # the writers write into the test's schema, selected by the URL as a deployment would
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{pg.schema}"

    def writer(name: str) -> IngestRun:
        data = tmp_path / name
        return IngestRun("writer", config, data, tmp_path / f"{name}.log", "--database-url", url)

    a, b = writer("writer-a"), writer("writer-b")
    front = IngestRun(
        "front", config, tmp_path / "front", tmp_path / "front.log", "--exit-when-done"
    )

    def count() -> int:
        return int(pg.select("SELECT count(*) FROM attr_history")[0][0])

    def state() -> str:
        return (
            f"{count()} of {total} in the bank\nA: {a.text()[-1500:]}\nB: {b.text()[-1500:]}\n"
            f"front: {front.text()[-1500:]}"
        )

    try:
        a.start()
        b.start()
        front.start()
        # the kill must hit a writer that is busy writing, not one still starting
        _wait(lambda: count() >= total // 4 and a.last("written") > 0, 40, state)
        a.kill()  # SIGKILL: its batch in hand is neither written nor acknowledged
        killed_after = count()
        a.start()  # the same writer back (as a supervisor would), beside B
        assert front.proc is not None
        front.proc.wait(40)  # --exit-when-done: the whole file is in the stream
        assert front.proc.returncode == 0, front.text()[-3000:]
        assert f"published {total:,}" in front.text()
        _wait(lambda: count() >= total, 40, state)
        time.sleep(2.5)  # past ack_wait: anything redelivered and doubled would land now
    finally:
        front.stop()
        for w in (a, b):
            w.stop()
    got = stored_readings(pg)
    values = sorted(v for _, v in got)
    assert len(values) == len(set(values)), "a reading was stored twice"
    assert values == [float(n) for n in range(total)]
    assert sum(values) == sum(range(total))  # the checksum
    assert 0 < killed_after < total, state()
    # the killed writer's unacknowledged readings went round again (B or A's restart took
    # them); their delivery keys turned the ones it had committed into duplicates
    assert a.last("redelivered") + b.last("redelivered") > 0, state()
    assert pg.select("SELECT count(*) FROM ingest_keys")[0][0] == total


def test_a_front_killed_and_nats_restarted_mid_stream_lose_and_double_nothing(
    tag: str, pg: PostgresStore, tmp_path: Path, broker: Mosquitto
) -> None:
    """MQTT -> front -> JetStream -> writer -> PostgreSQL, with NATS of the test's own: the
    front SIGKILLed twice (what it published but had not acknowledged to the broker comes
    again, in messages of its own; the delivery keys make it a no-op) and the NATS
    server restarted once (its file store keeps the stream; fronts and writers reconnect and
    retry). Every reading the broker acknowledged is in the bank exactly once."""
    nats = NatsServer(tmp_path / "nats")
    nats.start()
    root = f"cw-jsf-{tag}"
    config = tmp_path / "ingest.toml"
    config.write_text(
        CONFIG.format(tag=tag, kind="nats", nats=nats.url) + mqtt_source(broker.port, root)
    )
    bank_with_history(pg)
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{pg.schema}"
    writer = IngestRun(
        "writer", config, tmp_path / "writer", tmp_path / "writer.log", "--database-url", url
    )
    front = IngestRun("front", config, tmp_path / "front", tmp_path / "front.log")
    total = 6000
    faults: list[str] = []

    def count() -> int:
        return int(pg.select("SELECT count(*) FROM attr_history")[0][0])

    def state() -> str:
        return (
            f"{count()} of {total} in the bank after {faults}\n"
            f"writer: {writer.text()[-1500:]}\nfront: {front.text()[-1500:]}"
        )

    def progress(more: int, what: str) -> None:
        target = count() + more
        _wait(lambda: count() >= target, 60, lambda: f"no progress before {what}: {state()}")

    writer.start()
    front.start()
    # the front's MQTT session must exist before the first message
    _wait(lambda: "ingest mqtt: connected to" in front.text(), 30, state)
    pub = Publisher(broker.port, root)

    def publish_all() -> None:
        for n in range(total):
            pub.publish(n)
            if n % 40 == 39:
                time.sleep(0.05)  # about 800 a second: the faults land mid-stream

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    try:
        progress(400, "the first front kill")
        front.kill()
        faults.append(f"front SIGKILL after {count()}")
        front.start()
        progress(400, "the NATS restart")
        nats.restart()
        faults.append(f"NATS restart after {count()}")
        progress(400, "the second front kill")
        front.kill()
        faults.append(f"front SIGKILL after {count()}")
        front.start()
        publisher.join()
        _wait(lambda: len(pub.acked) == total, 60, lambda: f"broker acked {len(pub.acked)}")
        _wait(lambda: count() >= total, 120, state)
        time.sleep(2.5)  # past ack_wait: anything redelivered and doubled would land now
    finally:
        publisher.join()
        pub.close()
        front.stop()
        writer.stop()
        nats.stop()
    values = sorted(v for _, v in stored_readings(pg))
    assert len(values) == len(set(values)), "a reading was stored twice"
    assert set(values) == {float(n) for n in pub.acked}
    assert sum(values) == sum(range(total))  # the checksum
    assert front.kills == 2 and nats.restarts == 1


def test_http_push_of_the_api_in_nats_mode_goes_through_the_stream(
    tag: str, pg: PostgresStore, tmp_path: Path
) -> None:
    """`cityward serve` with ``[bus] kind = "nats"`` is a front and a writer at once: a device's
    push is answered after JetStream took it, and written from the stream, each reading once
    (a repeated push too); a bad message is refused at the front and its neighbours written."""
    from fastapi.testclient import TestClient

    from cityward.api.app import create_app
    from cityward.config import Settings

    bus = BusSettings(
        kind="nats",
        nats_url=NATS_URL,
        connect_timeout_s=5,
        changes_stream=f"TEST_CHANGES_{tag}",
        changes_subject=f"test.{tag}.changes",
        changes_max_age_s=600,
    )
    ingest_settings = _settings(tag)
    ingest = ingest_settings.model_dump()
    settings = Settings(
        data_dir=tmp_path, context_fetch=False, bus=bus, ingest={**ingest, "enabled": True}
    )
    app = create_app(settings, pg)
    ids = app.state.governance.identities
    _, key = ids.create_device_key("aq-box", [r"urn:ngsi-ld:AirQualityObserved:s[0-4]"], [])
    device = {"X-API-Key": key}
    js = JetStream(NATS_URL, name="cityward-test", connect_timeout_s=5)
    js.connect()
    try:
        with TestClient(app) as client:
            first = [message(n, devices=5) for n in range(40)]
            r = client.post("/ingest/air", content=orjson.dumps(first), headers=device)
            assert r.status_code == 200 and r.json() == {"accepted": 40}, r.text
            # answered: JetStream has them, or a writer has written them already (a message
            # leaves the work-queue stream once written): read the stream before the bank
            in_stream = set(_in_stream(js, ingest_settings)[1])
            in_bank = {str(k) for (k,) in pg.select("SELECT key FROM ingest_keys")}
            assert in_stream | in_bank >= {f"m:{n}" for n in range(40)}
            # a device's retry after a lost answer: its readings may be in the stream twice
            # (a message of the same readings as one before is dropped by its id), the bank's
            # delivery keys drop them
            r = client.post("/ingest/air", content=orjson.dumps(first[30:]), headers=device)
            assert r.status_code == 200 and r.json() == {"accepted": 10}, r.text
            mixed: list[Any] = [message(n, devices=5) for n in range(40, 46)]
            mixed[1] = {"dev": "s1", "n": 41, "ts": 1}  # no no2
            mixed[3] = {"dev": "s9", "n": 43, "ts": 1, "no2": 3}  # not the device's entity
            r = client.post("/ingest/air", content=orjson.dumps(mixed), headers=device)
            assert r.status_code == 207, r.text
            errors = {e["index"]: e["field"] for e in r.json()["errors"]}
            assert r.json()["accepted"] == 4 and errors == {1: "$.no2", 3: "id"}
            want = [float(n) for n in range(46) if n not in (41, 43)]
            _wait(
                lambda: len(stored_readings(pg)) >= len(want),
                30,
                lambda: f"{len(stored_readings(pg))} of {len(want)}: {app.state.ingest.status()}",
            )
            time.sleep(1.0)  # anything doubled would arrive now
            # all written and acknowledged: nothing is left in the stream
            _wait(
                lambda: js.stream_messages(ingest_settings.jetstream.stream) == 0,
                30,
                lambda: f"{_in_stream(js, ingest_settings)[1]} left in the stream",
            )
            # (the app closes the store when it stops)
            assert sorted(v for _, v in stored_readings(pg)) == want
    finally:
        js.close()
