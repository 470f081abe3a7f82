"""Sustained MQTT ingest into the data bank, end to end, with 10,000 simulated devices.

    .venv/bin/python bench/ingest.py [--rates 1000,2000,3000,5000] [--seconds 20]
        [--devices 10000] [--mode embedded|nats] [--writers 1] [--keys message|time]
        [--database-url postgresql://postgres@127.0.0.1:5432/postgres] [--tls]

For each offered rate: a Mosquitto of the benchmark's own (persistence on, no queue cap, as
docs/ingest.md asks) and ``cityward ingest run`` as a separate process (its MQTT source, QoS 1
on a persistent session, MQTT 5; SQLite in a fresh data folder) are started, or with ``--mode
nats`` one ``--role front`` process and ``--writers`` ``--role writer`` processes with the bus
on NATS JetStream (127.0.0.1:4222, streams of the run's own) and the bank on PostgreSQL (a
schema of the run's own); a fast raw-socket publisher
(bench/mqtt_load.py) sends ``rate`` readings a second for ``--seconds``, round-robin over
``--devices`` device ids, each carrying the time it was published as its observation time.

- **rate**: readings committed to the bank per second, over the publishing window and then
  until the last one is in (every reading counted once in the attribute history);
- **latency**: publish to committed (so queryable), per reading: the history row's ``created``
  minus its ``observedAt``; same machine, same clock. p50 and p99 over all readings;
- **memory**: the peak RSS of the ingest processes together, their front processes included
  (psutil, sampled every 0.2 s).

With ``--tls`` cityward's MQTT source connects to a TLS listener of the broker (a certificate
authority made for the run; the connection verified against it), while the load generator
stays on plain MQTT: what TLS costs cityward, not what the devices' TLS costs the broker.

Writes bench/results/ingest-<mode>[-tls].json.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.console import Console
from rich.table import Table

from mqtt_load import Publisher

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
console = Console()

BROKER_CONF = """\
user {user}
listener {port} 127.0.0.1
allow_anonymous true
persistence true
persistence_location {dir}/
max_queued_messages 0
"""

INGEST_CONF = """
{bus}
[ingest]
front_process = {front}
{stream}
[ingest.writer]
batch_size = {batch}
max_delay_ms = {delay}
[[ingest.sources]]
name = "bench"
adapter = "mqtt"
[ingest.sources.options]
port = {port}
{tls}topics = ["bench/+"]
client_id = "cityward-bench-{stamp}"
[ingest.sources.mapping]
entity_type = "AirQualityObserved"
id = "urn:ngsi-ld:AirQualityObserved:{{topic[1]}}"
{message_id}timestamp = {{ path = "$.ts", format = "epoch_ms" }}
attributes = {{ no2 = {{ path = "$.no2" }} }}
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def history_count(db: Path | None, pg_url: str | None) -> int:
    if pg_url:
        import psycopg

        with psycopg.connect(pg_url) as c:
            row = c.execute("SELECT count(*) FROM attr_history").fetchone()
            return int(row[0]) if row else 0
    import sqlite3

    assert db is not None
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as c:
        try:
            # merged and still staged rows (cityward.bank.history)
            sql = (
                "SELECT (SELECT count(*) FROM attr_history) "
                "+ (SELECT count(*) FROM attr_history_new)"
            )
            return int(c.execute(sql).fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def latencies_ms(db: Path | None, pg_url: str | None) -> list[float]:
    # modified: the write's own time (created is the attribute's first write)
    sql = "SELECT (modified - obs) / 1000.0 FROM attr_history"
    if pg_url:
        import psycopg

        sql = "SELECT extract(epoch FROM (modified - obs)) * 1000 FROM attr_history"
        with psycopg.connect(pg_url) as c:
            return [float(r[0]) for r in c.execute(sql).fetchall()]
    import sqlite3

    assert db is not None
    staged = "SELECT (modified - obs) / 1000.0 FROM attr_history_new"
    with sqlite3.connect(db, timeout=30) as c:
        return [float(r[0]) for r in c.execute(f"{sql} UNION ALL {staged}").fetchall()]


def run_one(
    rate: int, seconds: float, devices: int, mode: str, pg_url: str | None, args: Any
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cw-bench-ingest-"))
    broker_port = free_port()
    (work / "broker").mkdir()
    conf = work / "broker" / "mosquitto.conf"
    conf.write_text(
        BROKER_CONF.format(user=getpass.getuser(), port=broker_port, dir=work / "broker")
    )
    ingest_port, tls = broker_port, ""
    if args.tls:
        # cityward's connection to the broker over TLS, verified against a CA of the run's own;
        # the load generator stays on the plain listener (a device's TLS is the broker's work)
        sys.path.insert(0, str(ROOT))
        from tests.ingest.certs import authority

        ca = authority(work / "tls", "cityward bench CA")
        ingest_port = free_port()
        with conf.open("a") as fh:
            fh.write(
                f"listener {ingest_port} 127.0.0.1\ncafile {ca.ca}\n"
                f"certfile {ca.broker.cert}\nkeyfile {ca.broker.key}\n"
            )
        tls = f'tls = true\nca_file = "{ca.ca}"\n'
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(broker_port)
    wait_port(ingest_port)
    stamp = time.time_ns()
    bus = stream = ""
    if mode == "nats":  # streams of the run's own, dropped at the end
        bus = (
            f'[bus]\nkind = "nats"\nchanges_stream = "BENCH_CHANGES_{stamp}"\n'
            f'changes_subject = "bench{stamp}.changes"\n'
        )
        stream = (
            f'[ingest.jetstream]\nstream = "BENCH_INGEST_{stamp}"\n'
            f'subject = "bench{stamp}.ingest"\n'
        )
    config = work / "cityward.toml"
    config.write_text(
        INGEST_CONF.format(
            bus=bus,
            stream=stream,
            port=ingest_port,
            tls=tls,
            stamp=stamp,
            batch=args.batch,
            delay=args.delay_ms,
            front="false" if args.one_process else "true",
            message_id='message_id = "$.n"\n' if args.keys == "message" else "",
        )
    )
    data = work / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    cmd = [sys.executable, "-m", "cityward.cli", "ingest", "run", "--config", str(config)]
    cmd += ["--data-dir", str(data), "--status-every", "0"]
    if pg_url:
        cmd += ["--database-url", pg_url]
    log = (work / "ingest.log").open("wb")
    procs = []
    if mode == "nats":
        for n in range(args.writers):
            wlog = (work / f"writer{n}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [*cmd, "--role", "writer"], env=env, stdout=wlog, stderr=subprocess.STDOUT
                )
            )
        cmd += ["--role", "front"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    procs.append(proc)
    db = None if pg_url else data / "cityward.db"
    peak_rss = [0]
    stop = threading.Event()

    def sample() -> None:
        ps = [psutil.Process(p.pid) for p in procs]
        while not stop.wait(0.2):
            try:
                # the front processes ([ingest] front_process) are children of the ingest ones
                every = ps + [c for p in ps for c in p.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in every)
                peak_rss[0] = max(peak_rss[0], rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        # the ingest worker's session must exist before publishing starts
        deadline = time.monotonic() + 60
        while b"connected to" not in (work / "ingest.log").read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "ingest.log").read_text()[-3000:])
            time.sleep(0.1)
        if args.profile:  # py-spy on the ingest process while the load runs
            spy = [shutil.which("py-spy") or "py-spy", "record", "--pid", str(proc.pid)]
            spy += ["-r", "100", "-d", str(int(seconds)), "-f", "raw", "-o", args.profile]
            subprocess.Popen(spy, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pub = Publisher(port=broker_port, client_id=f"bench-pub-{stamp}")
        total = int(rate * seconds)
        topics = [f"bench/d{i:05d}".encode() for i in range(devices)]

        def messages() -> Any:
            start = time.monotonic()
            for n in range(total):
                # pace: the n-th reading leaves at start + n / rate
                ahead = start + n / rate - time.monotonic()
                if ahead > 0.002:
                    time.sleep(ahead)
                ts = int(time.time() * 1000)
                yield topics[n % devices], orjson.dumps({"n": n, "ts": ts, "no2": n % 400})

        t0 = time.monotonic()
        pub.publish_many(messages(), chunk=max(1, rate // 500))
        published_s = time.monotonic() - t0
        pub.wait_acked(60)
        broker_acked = pub.acked  # what the broker took (PUBACK): the readings owed to the bank
        # beyond the writers' ack_wait (60 s): a reading a writer lost in a timed-out fetch
        # comes again after it (late, not lost)
        deadline = time.monotonic() + max(100.0, seconds * 4)
        while (done := history_count(db, pg_url)) < total:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        all_in_s = time.monotonic() - t0
        pub.close()
    finally:
        stop.set()
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        broker.wait(10)
    lat = sorted(latencies_ms(db, pg_url))
    row = {
        "mode": mode,
        "offered_per_s": rate,
        "readings": total,
        "stored": done,
        "broker_acked": broker_acked,
        "published_s": round(published_s, 2),
        "all_in_s": round(all_in_s, 2),
        "rate_per_s": round(done / all_in_s, 1),
        "latency_p50_ms": round(statistics.median(lat), 1) if lat else None,
        "latency_p99_ms": round(lat[int(len(lat) * 0.99) - 1], 1) if lat else None,
        "peak_rss_mb": round(peak_rss[0] / 2**20, 1),
    }
    if mode == "nats":
        row["writers"] = args.writers
    if args.tls:
        row["tls"] = True
    if done < total:  # say where the missing readings went
        row["missing"] = total - done
        for f in sorted(work.rglob("*.log")) + sorted(work.rglob("deadletter.db")):
            console.print(f"[red]incomplete run[/]: {f}")
        args.keep = True
    if args.keep:
        console.print(f"kept {work} (streams of stamp {stamp})")
        return row
    if mode == "nats":
        _drop_streams(f"BENCH_CHANGES_{stamp}", f"BENCH_INGEST_{stamp}")
    shutil.rmtree(work, ignore_errors=True)
    return row


def _drop_streams(*names: str) -> None:
    from cityward.bus.nats import JetStream

    js = JetStream("nats://127.0.0.1:4222", name="cityward-bench")
    js.connect()
    try:
        for name in names:
            js.delete_stream(name)
    finally:
        js.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="1000,2000,3000,5000")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--mode", choices=["embedded", "nats"], default="embedded")
    ap.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL for --mode nats (a schema of the run's own is made and dropped)",
    )
    ap.add_argument("--writers", type=int, default=1, help="writer processes (--mode nats)")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument(
        "--one-process",
        action="store_true",
        help="[ingest] front_process = false: MQTT received in the writing process",
    )
    ap.add_argument(
        "--tls",
        action="store_true",
        help="cityward connects to the broker over TLS (the load generator does not)",
    )
    ap.add_argument("--profile", default=None, help="py-spy the ingest process into this file")
    ap.add_argument("--keep", action="store_true", help="keep the run's files and streams")
    ap.add_argument("--runs", type=int, default=1, help="runs per rate (the median is kept)")
    ap.add_argument(
        "--keys",
        choices=["message", "time"],
        default="message",
        help="delivery keys: the message's id, or (no message_id in the mapping) its device's "
        "entity and observation time",
    )
    args = ap.parse_args()
    if args.mode == "nats" and not args.database_url:
        ap.error("--mode nats needs --database-url (the bank on PostgreSQL)")
    rows = []
    for rate in [int(r) for r in args.rates.split(",")]:
        runs = []
        for _ in range(args.runs):
            console.print(f"[bold]{args.mode}[/]: {rate:,} readings/s for {args.seconds:.0f} s ...")
            if args.mode == "nats":
                with _pg_schema(args.database_url, args.keep) as url:
                    runs.append(run_one(rate, args.seconds, args.devices, args.mode, url, args))
            else:
                runs.append(run_one(rate, args.seconds, args.devices, args.mode, None, args))
        runs.sort(key=lambda r: r["rate_per_s"])
        rows.append(runs[len(runs) // 2])
    what = f"nats + PostgreSQL, {args.writers} writer(s)" if args.mode == "nats" else "SQLite"
    if args.tls:
        what += ", cityward's MQTT over TLS"
    table = Table(title=f"MQTT -> bank, {args.devices:,} devices ({what})")
    for col in ("offered/s", "stored", "rate/s", "p50 ms", "p99 ms", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['offered_per_s']:,}",
            f"{r['stored']:,}/{r['readings']:,}",
            f"{r['rate_per_s']:,.0f}",
            f"{r['latency_p50_ms']:,.0f}",
            f"{r['latency_p99_ms']:,.0f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"nats-{args.writers}w" if args.mode == "nats" else args.mode
    suffix += "-tls" if args.tls else ""
    out = RESULTS / f"ingest-{suffix}.json"
    out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    console.print(f"wrote {out}")


@contextlib.contextmanager
def _pg_schema(url: str, keep: bool = False) -> Iterator[str]:
    """A schema of the run's own; the URL that selects it (search_path)."""
    import psycopg

    schema = f"bench_ingest_{time.time_ns()}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        if keep:
            console.print(f"kept schema {schema}")
        else:
            with psycopg.connect(url, autocommit=True) as c:
                c.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
