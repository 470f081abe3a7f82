"""File replay (CSV and JSON lines) into the bank, in process and with `cityward ingest run`."""

from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import orjson

from cityward.bank.store import open_store
from cityward.bank.store.sqlite import SqliteStore
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.worker import IngestWorker
from tests.ingest.helpers import (
    IngestRun,
    bank_with_history,
    message,
    settings,
    stored_readings,
)


def _run(worker: IngestWorker) -> None:
    worker.start()
    adapter = worker.adapters["air"]
    assert adapter.finished.wait(30)  # type: ignore[attr-defined]
    assert worker.writer.wait_idle(30)
    worker.stop()


def test_json_lines_with_a_bad_line_and_a_second_replay(tmp_path: Path) -> None:
    path = tmp_path / "readings.jsonl"
    lines = [orjson.dumps(message(n)) for n in range(200)]
    lines[50] = b'{"dev": "s1", "n": 50'  # cut short
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    store = SqliteStore(tmp_path / "bank.db")
    bank = bank_with_history(store)
    for _ in range(2):  # the second replay of the same file writes nothing again
        worker = IngestWorker(
            bank, settings("replay", {"path": str(path)}), DeadLetters(tmp_path / "dl.db")
        )
        _run(worker)
    values = sorted(v for _, v in stored_readings(store))
    assert values == [float(n) for n in range(200) if n != 50]
    assert worker.writer.stats.duplicates == 199 and worker.writer.stats.written == 0
    dead = worker.dead_letters.entries("air")
    assert len(dead) == 2 and all("not JSON" in d.reason for d in dead)
    store.close()


def test_a_csv_file_paced_by_its_time_column(tmp_path: Path) -> None:
    path = tmp_path / "readings.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["dev", "n", "ts", "no2"])
        for n in range(30):
            m = message(n)
            w.writerow([m["dev"], m["n"], m["ts"], m["no2"]])
    store = SqliteStore(tmp_path / "bank.db")
    opts = {"path": str(path), "time_field": "$.ts", "time_format": "epoch_ms", "speed": 1000}
    worker = IngestWorker(
        bank_with_history(store), settings("replay", opts), DeadLetters(tmp_path / "dl.db")
    )
    _run(worker)
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(30)]
    store.close()


def _replay_config(tmp_path: Path, ingest: str = "", options: str = "") -> Path:
    """A configuration replaying 100 readings of readings.jsonl (written here) into the bank;
    ``ingest``: more [ingest] settings, ``options``: more replay options (from ", ")."""
    path = tmp_path / "readings.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(message(n)) for n in range(100)))
    config = tmp_path / "cityward.toml"
    config.write_text(
        f"""
[ingest]
{ingest}
[[ingest.sources]]
name = "air"
adapter = "replay"
options = {{ path = "{path}"{options} }}
[ingest.sources.mapping]
entity_type = "AirQualityObserved"
id = "urn:ngsi-ld:AirQualityObserved:{{$.dev}}"
message_id = "$.n"
attributes = {{ no2 = {{ path = "$.no2" }} }}
"""
    )
    return config


def test_ingest_run_until_the_replay_is_done(tmp_path: Path) -> None:
    config = _replay_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "cityward.cli", "ingest", "run", "--config", str(config)]
    out = subprocess.run(
        [*cmd, "--data-dir", str(data), "--exit-when-done"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "written 100" in out.stdout
    store = open_store(None, data)
    assert len(stored_readings(store)) == 100
    store.close()
    # a configuration error names the setting
    config.write_text(
        config.read_text().replace('adapter = "replay"', 'adapter = "carrier-pigeon"')
    )
    out = subprocess.run(
        [*cmd, "--data-dir", str(data)], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "carrier-pigeon" in out.stdout and "ingest.sources.0" in out.stdout


def test_ingest_run_exits_1_when_readings_are_left_unwritten(tmp_path: Path) -> None:
    """The bank stays locked past the 10 s drain: `ingest run --exit-when-done` exited 0 with
    readings never written (a batch load reported success). Once the bank is free, the same
    run writes them all."""
    config = _replay_config(
        tmp_path,
        ingest="front_process = false",
        options=', time_field = "$.ts", time_format = "epoch_ms", speed = 50',
    )
    data = tmp_path / "data"
    run = IngestRun("all", config, data, tmp_path / "run.log", "--exit-when-done")
    run.start()
    assert run.proc is not None
    deadline = time.monotonic() + 60
    while "running" not in run.text():  # the bank exists; the replay (2 s) has started
        assert time.monotonic() < deadline and run.proc.poll() is None, run.text()
        time.sleep(0.1)
    lock = sqlite3.connect(data / "cityward.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the bank's write lock, until the run has exited
    try:
        code = run.proc.wait(90)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert code == 1, run.text()
    assert "reading(s) not written" in run.text()
    rerun = IngestRun("all", config, data, tmp_path / "rerun.log", "--exit-when-done")
    rerun.start()
    assert rerun.proc is not None and rerun.proc.wait(90) == 0, rerun.text()
    store = open_store(None, data)
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(100)]
    store.close()


def _replay(path: Path, tmp_path: Path) -> tuple[SqliteStore, IngestWorker]:
    """``path`` replayed flat out into a new bank on SQLite, to the end."""
    store = SqliteStore(tmp_path / "bank.db")
    worker = IngestWorker(
        bank_with_history(store),
        settings("replay", {"path": str(path)}),
        DeadLetters(tmp_path / "dl.db"),
    )
    _run(worker)
    return store, worker


def test_bad_csv_rows_are_dead_letters_and_the_rest_of_the_file_is_read(tmp_path: Path) -> None:
    """A row with a field too many, bytes that are not UTF-8 and a field over the csv module's
    128 KiB limit each ended the replay at that row (exit status 0), the rows after it never
    read."""
    path = tmp_path / "readings.csv"
    rows = [b"dev,n,ts,no2\r\n"]  # CRLF, as spreadsheets write
    for n in range(20):
        m = message(n)
        rows.append(b"%s,%d,%d,%d\r\n" % (m["dev"].encode(), n, m["ts"], m["no2"]))
    rows[4] = rows[4].rstrip(b"\r\n") + b",surplus\r\n"  # n = 3
    rows[8] = rows[8].replace(b"s7", b"s\xe97")  # n = 7: Latin-1, not UTF-8
    rows[12] = b's11,11,1790000011000,"' + b"9" * 200_000 + b'"\r\n'  # n = 11: a huge field
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(rows))  # with a BOM
    store, worker = _replay(path, tmp_path)
    assert worker.adapters["air"].failed is None  # type: ignore[attr-defined]
    assert sorted(v for _, v in stored_readings(store)) == [
        float(n) for n in range(20) if n not in (3, 7, 11)
    ]
    reasons = sorted(d.reason[:40] for d in worker.dead_letters.entries("air"))
    assert reasons == [
        # the huge field is read (no 128 KiB limit) and refused by the mapping as a number
        "expected a number, got '9999999999999999",
        "line 5: 5 fields, the header has 4",
        "line 9: not UTF-8 text",
    ]
    store.close()


def test_json_lines_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "readings.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(orjson.dumps(message(n)) for n in range(5)))
    store, worker = _replay(path, tmp_path)
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(5)]
    assert worker.dead_letters.entries("air") == []
    store.close()


def test_a_csv_header_that_is_not_utf8_fails_the_replay(tmp_path: Path) -> None:
    """A Latin-1 header: the replay read nothing, stored no dead letter and reported no failure
    (`ingest run` exited 0). It fails now, naming the line and the encoding."""
    path = tmp_path / "latin1.csv"
    rows = [b"dev,n,ts,no2,temp\xe9rature\n"]
    rows += [b"s%d,%d,%d,%d,1\n" % (n % 5, n, 1_790_000_000_000 + n * 1000, n) for n in range(10)]
    path.write_bytes(b"".join(rows))
    store, worker = _replay(path, tmp_path)
    failed = worker.adapters["air"].failed  # type: ignore[attr-defined]
    assert failed is not None and "line 1: the CSV header is not UTF-8" in failed, failed
    assert stored_readings(store) == []
    store.close()


def test_blank_lines_before_the_csv_header_are_skipped(tmp_path: Path) -> None:
    """A blank first line was taken as the header (no columns): every row a dead letter."""
    path = tmp_path / "blank.csv"
    rows = [b"\n", b"\r\n", b"dev,n,ts,no2\n"]
    rows += [b"s%d,%d,%d,%d\n" % (n % 5, n, 1_790_000_000_000 + n * 1000, n) for n in range(10)]
    path.write_bytes(b"".join(rows))
    store, worker = _replay(path, tmp_path)
    assert worker.adapters["air"].failed is None  # type: ignore[attr-defined]
    assert sorted(v for _, v in stored_readings(store)) == [float(n) for n in range(10)]
    assert worker.dead_letters.entries("air") == []
    store.close()


def test_a_looping_replay_stores_a_bad_rows_dead_letter_once_and_never_spins(
    tmp_path: Path,
) -> None:
    """loop = true stored a bad row again on every pass, thousands of dead letters a second
    without bound, and an empty file spun a core at 100 %."""
    path = tmp_path / "feed.jsonl"
    path.write_bytes(
        orjson.dumps(message(1))
        + b"\n"
        + b'{"dev": "s1", cut short\n'
        + orjson.dumps({"dev": "s2", "n": 2, "ts": 1})  # no no2: refused by the mapping
        + b"\n"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    for feed, dead_letters in ((path, 2), (empty, 0)):
        store = SqliteStore(tmp_path / f"{feed.stem}.db")
        worker = IngestWorker(
            bank_with_history(store),
            settings("replay", {"path": str(feed), "loop": True}),
            DeadLetters(tmp_path / f"{feed.stem}-dl.db"),
        )
        cpu = time.process_time()
        worker.start()
        time.sleep(2.5)  # three passes at most: one a second
        worker.stop()
        cpu = time.process_time() - cpu
        assert worker.dead_letters.counts().get("air", 0) == dead_letters, feed
        assert len(stored_readings(store)) == (1 if feed == path else 0)
        assert cpu < 1.5, (feed, cpu)  # a busy loop takes the whole 2.5 s
        store.close()


def test_a_bad_csv_rows_dead_letter_keeps_the_row_as_the_file_has_it(tmp_path: Path) -> None:
    """Dead letters of CSV rows held the parsed fields joined with commas (the quoting lost),
    and a row the csv module refused held nothing at all."""
    path = tmp_path / "readings.csv"
    surplus = b's1,1,1790000001000,"1,5",extra'
    huge = b's2,2,1790000002000,"' + b"9" * (17 * 1024 * 1024) + b'"'
    path.write_bytes(b"dev,n,ts,no2\n" + surplus + b"\n" + huge + b"\ns3,3,1790000003000,3\n")
    store, worker = _replay(path, tmp_path)
    assert [v for _, v in stored_readings(store)] == [3.0]
    dead = {d.reason.split(":")[0]: d for d in worker.dead_letters.entries("air")}
    assert dead["line 2"].payload == surplus and not dead["line 2"].truncated
    assert dead["line 3"].payload == huge[: len(dead["line 3"].payload)]
    assert dead["line 3"].truncated and len(dead["line 3"].payload) > 1000
    store.close()
