"""Benchmark of the data bank's history and notifications over HTTP, on SQLite and PostgreSQL.

For each backend it starts ``cityward serve`` (fresh data folder / fresh PostgreSQL database)
and measures, from samples taken in this run:

- temporal append throughput: POST /temporal/entities with 1,000 instances per request;
- an hourly ``avg`` over 1,000,000 history rows of one attribute (p50 of repeated queries);
- ``lastN=100`` retrieval of one attribute (p50);
- notification fan-out: changes written at a fixed rate (default 1,000/s) to entities watched
  by 10 subscriptions whose endpoint is a local HTTP receiver; end-to-end latency from the
  moment the write was sent to the moment the receiver got the notification (p50/p99), and
  how many notifications arrived.

    .venv/bin/python bench/history.py                  # both backends
    .venv/bin/python bench/history.py --backend sqlite --rows 200000   # quicker

Prints a table and writes bench/results/history-<backend>-<time>.json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bank import (
    AUTH,
    DEFAULT_PG,
    RESULTS_DIR,
    console,
    fresh_pg_database,
    latency_summary,
    running_server,
    write_json,
)

API = "/ngsi-ld/v1"
T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
EID = "urn:ngsi-ld:Pump:bench-1"
SUBSCRIPTIONS = 10


def iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def load_history(client: httpx.Client, rows: int, per_request: int) -> dict[str, Any]:
    """``rows`` instances of one attribute, one a second from T0, by temporal appends."""
    start = time.perf_counter()
    sent = 0
    lat: list[float] = []
    while sent < rows:
        n = min(per_request, rows - sent)
        body: dict[str, Any] = {
            "id": EID,
            "type": "Pump",
            "pressure": [
                {
                    "type": "Property",
                    "value": round(1.0 + ((sent + k) % 97) / 10, 2),
                    "observedAt": iso(T0 + dt.timedelta(seconds=sent + k)),
                }
                for k in range(n)
            ],
        }
        t = time.perf_counter()
        r = client.post(
            f"{API}/temporal/entities",
            content=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        lat.append((time.perf_counter() - t) * 1000)
        if r.status_code not in (201, 204):
            raise RuntimeError(f"temporal append failed: HTTP {r.status_code} {r.text[:300]}")
        sent += n
        if sent % 100_000 < per_request:
            console.print(f"  history rows: {sent:,}")
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "request": latency_summary(lat),
    }


def timed(client: httpx.Client, path: str, params: dict[str, str], n: int) -> dict[str, Any]:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        r = client.get(path, params=params)
        lat.append((time.perf_counter() - t) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET {path} failed: HTTP {r.status_code} {r.text[:300]}")
    return {**latency_summary(lat), "body_bytes": len(r.content), "answer": r.json()}


def _receive(conn: Any) -> None:
    """The receiver process: an HTTP server noting when each notification arrived.

    It runs in a process of its own so that parsing thousands of notifications a second does
    not compete with the load generator for this process's GIL (which would add its own
    delays to the latency measured). time.perf_counter is CLOCK_MONOTONIC on Linux, one clock
    for every process, so arrival and send times compare.
    """
    arrivals: list[tuple[float, list[Any]]] = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            now = time.perf_counter()
            values = [d.get("reading", {}).get("value") for d in json.loads(raw).get("data", [])]
            with lock:
                arrivals.append((now, values))
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    conn.send(server.server_address[1])
    while True:
        msg = conn.recv()
        with lock:
            if msg == "count":
                conn.send(sum(len(v) for _, v in arrivals))
            else:
                conn.send(list(arrivals))
                break
    server.shutdown()


class Receiver:
    """The receiver process and the pipe to it."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receive, args=(child,), daemon=True)
        self.proc.start()
        self.port = int(self.conn.recv())

    def count(self) -> int:
        self.conn.send("count")
        return int(self.conn.recv())

    def arrivals(self) -> list[tuple[float, list[Any]]]:
        self.conn.send("dump")
        out: list[tuple[float, list[Any]]] = self.conn.recv()
        return out

    def close(self) -> None:
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.kill()


def fan_out(base: str, rate: int, seconds: float, batch: int, warmup: float) -> dict[str, Any]:
    """Changes at ``rate``/s in batches, 10 subscriptions watching; notification latency.

    The changes of the first ``warmup`` seconds are delivered and counted but left out of the
    latency figures (first connections to the receiver, first use of every code path); the
    p99 of each second, warm-up included, is kept in the JSON.
    """
    receiver = Receiver()
    try:
        with httpx.Client(base_url=base, timeout=60, headers=AUTH) as client:
            for s in range(SUBSCRIPTIONS):
                sub = {
                    "id": f"urn:ngsi-ld:Subscription:bench-{s}",
                    "type": "Subscription",
                    "entities": [{"type": "Meter"}],
                    "watchedAttributes": ["reading"],
                    "notification": {
                        "attributes": ["reading"],
                        "endpoint": {"uri": f"http://127.0.0.1:{receiver.port}/s{s}"},
                    },
                }
                r = client.post(f"{API}/subscriptions", json=sub)
                if r.status_code != 201:
                    raise RuntimeError(f"subscription failed: {r.status_code} {r.text[:300]}")
            sent_at: dict[str, float] = {}
            total = int(rate * seconds)
            interval = batch / rate
            start = time.perf_counter()
            for i in range(0, total, batch):
                due = start + (i // batch) * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                items = [
                    {
                        "id": f"urn:ngsi-ld:Meter:{(i + k) % 500}",
                        "type": "Meter",
                        "reading": {"type": "Property", "value": i + k},
                    }
                    for k in range(min(batch, total - i))
                ]
                now = time.perf_counter()
                for k in range(len(items)):
                    sent_at[str(i + k)] = now
                r = client.post(
                    f"{API}/entityOperations/upsert",
                    params={"options": "update"},
                    content=orjson.dumps(items),
                    headers={"Content-Type": "application/json"},
                )
                if r.status_code not in (201, 204):
                    raise RuntimeError(f"upsert failed: {r.status_code} {r.text[:300]}")
            write_s = time.perf_counter() - start
        expected = total * SUBSCRIPTIONS
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline and receiver.count() < expected:
            time.sleep(0.1)
        arrivals = receiver.arrivals()
    finally:
        receiver.close()
    lat = []
    by_second: dict[int, list[float]] = {}
    first, last = None, None
    for at, values in arrivals:
        for value in values:
            t0 = sent_at.get(str(value))
            if t0 is not None:
                if t0 - start >= warmup:
                    lat.append((at - t0) * 1000)
                by_second.setdefault(int(t0 - start), []).append((at - t0) * 1000)
        first = at if first is None else min(first, at)
        last = at if last is None else max(last, at)
    delivered = sum(len(v) for v in by_second.values())
    span = (last - first) if first is not None and last is not None and last > first else 0.0
    return {
        "changes": total,
        "warmup_s": warmup,
        "subscriptions": SUBSCRIPTIONS,
        "changes_per_s_written": total / write_s,
        "notifications_expected": expected,
        "notified_entities_received": delivered,
        "notifications_http": len(arrivals),
        "delivered_per_s": delivered / span if span else None,
        "latency": latency_summary(lat) if lat else None,
        # where in the run the slow ones were: p99 of the changes sent in each second
        "p99_ms_by_second": {
            str(s): latency_summary(v)["p99_ms"] for s, v in sorted(by_second.items())
        },
    }


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    console.rule(f"[bold]{backend}[/]: history and notifications")
    result: dict[str, Any] = {"backend": backend}
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cityward-hist-")))
        url = None
        if backend == "postgres":
            url = stack.enter_context(fresh_pg_database(args.pg_url))
        server = stack.enter_context(
            running_server(workdir, url, role="admin", governance=args.governance == "on")
        )
        with httpx.Client(base_url=server.base_url, timeout=600, headers=AUTH) as client:
            result["append"] = load_history(client, args.rows, args.per_request)
            t_end = iso(T0 + dt.timedelta(seconds=args.rows))
            path = f"{API}/temporal/entities/{EID}"
            agg = timed(
                client,
                path,
                {
                    "attrs": "pressure",
                    "options": "aggregatedValues",
                    "aggrMethods": "avg",
                    "aggrPeriodDuration": "PT1H",
                    "timerel": "between",
                    "timeAt": iso(T0),
                    "endTimeAt": t_end,
                },
                args.repeat,
            )
            buckets = agg.pop("answer")["pressure"]["avg"]
            agg["buckets"] = len(buckets)
            result["hourly_avg"] = agg
            last = timed(client, path, {"attrs": "pressure", "lastN": "100"}, args.repeat * 5)
            last["instances"] = len(last.pop("answer")["pressure"])
            result["last_n_100"] = last
        result["fan_out"] = fan_out(
            server.base_url, args.rate, args.seconds + args.warmup, args.batch, args.warmup
        )
        result["rss_mb"] = server.rss_mb()
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="cityward history and notifications")
    table.add_column("metric")
    table.add_column("target", justify="right")
    for r in results:
        table.add_column(r["backend"], justify="right")

    def row(name: str, target: str, get: Any, fmt: str = "{:,.1f}") -> None:
        cells = []
        for r in results:
            try:
                v = get(r)
                cells.append(fmt.format(v) if v is not None else "-")
            except (KeyError, TypeError):
                cells.append("-")
        table.add_row(name, target, *cells)

    row("temporal append (instances/s)", "", lambda r: r["append"]["rows_per_s"], "{:,.0f}")
    row("history rows", "", lambda r: r["append"]["rows"], "{:,}")
    row("hourly avg over all rows p50 (ms)", "<= 300", lambda r: r["hourly_avg"]["p50_ms"])
    row("hourly avg buckets", "", lambda r: r["hourly_avg"]["buckets"], "{:,}")
    row("lastN=100 p50 (ms)", "<= 10", lambda r: r["last_n_100"]["p50_ms"], "{:,.2f}")
    row("changes/s written", "1,000", lambda r: r["fan_out"]["changes_per_s_written"], "{:,.0f}")
    row(
        "notified changes received",
        "",
        lambda r: r["fan_out"]["notified_entities_received"],
        "{:,}",
    )
    row("  of expected", "", lambda r: r["fan_out"]["notifications_expected"], "{:,}")
    row("notifications delivered/s", "", lambda r: r["fan_out"]["delivered_per_s"], "{:,.0f}")
    row("notification latency p50 (ms)", "", lambda r: r["fan_out"]["latency"]["p50_ms"])
    row("notification latency p99 (ms)", "<= 100", lambda r: r["fan_out"]["latency"]["p99_ms"])
    row("server RSS (MB)", "", lambda r: r["rss_mb"], "{:,.0f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--rows", type=int, default=1_000_000, help="history rows of one attribute")
    p.add_argument("--per-request", type=int, default=1000, help="instances per append request")
    p.add_argument("--repeat", type=int, default=11, help="timed aggregation queries")
    p.add_argument("--rate", type=int, default=1000, help="changes per second in the fan-out")
    p.add_argument("--seconds", type=float, default=10.0, help="timed length of the fan-out")
    p.add_argument("--batch", type=int, default=50, help="changes per upsert request")
    p.add_argument(
        "--warmup", type=float, default=2.0, help="first seconds of the fan-out not timed"
    )
    p.add_argument("--pg-url", default=DEFAULT_PG)
    p.add_argument(
        "--governance",
        choices=("on", "off"),
        default="on",
        help="on: an admin token and the audit trail (as shipped); off: no auth, no audit",
    )
    args = p.parse_args(argv)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results = []
    for b in backends:
        try:
            results.append(run_backend(b, args))
        except Exception as exc:
            console.print(f"[red]{b} failed: {exc!r}[/]")
            results.append({"backend": b, "error": repr(exc)})
    print_table(results)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS_DIR.mkdir(exist_ok=True)
    for r in results:
        write_json(RESULTS_DIR / f"history-{r['backend']}-{stamp}.json", r)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
