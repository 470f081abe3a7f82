"""The per-request cost of governance (token check, purpose restriction, audit), in process.

Two apps over the same backend, one with governance (an operator token bound to
traffic-management, the audit trail on) and one without (no_auth, no audit), answer the same
requests in interleaved rounds, so that machine noise hits both alike. This isolates what
governance adds to a request from the run-to-run spread of bench/bank.py.

    .venv/bin/python bench/governance.py [--backend sqlite|postgres|both] [--rounds 15]
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table

from cityward.api.app import create_app
from cityward.bank.store import Store
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import GovernanceSettings, Settings
from cityward.governance.policy import Role

RESULTS = Path(__file__).resolve().parent / "results"
PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ENTITIES = 2000
console = Console()
E = "/ngsi-ld/v1/entities"


@contextmanager
def open_store(backend: str, tmp: Path, pg_url: str) -> Iterator[Store]:
    if backend == "sqlite":
        store: Store = SqliteStore(tmp / f"{uuid.uuid4().hex}.db")
        yield store
        store.close()
        return
    import psycopg

    schema = f"bench_gov_{uuid.uuid4().hex[:10]}"
    pg = PostgresStore(pg_url, schema=schema, max_size=4)
    try:
        yield pg
    finally:
        pg.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def entity(n: int) -> dict[str, Any]:
    point = {"type": "Point", "coordinates": [3.7 + (n % 50) * 0.001, 51.0 + (n // 50) * 0.001]}
    return {
        "id": f"urn:ngsi-ld:TrafficFlowObserved:{n}",
        "type": "TrafficFlowObserved",
        "intensity": n % 900,
        "laneId": n % 3,
        "location": {"type": "GeoProperty", "value": point},
    }


def timed(client: TestClient, calls: list[tuple[str, str, Any]], headers: dict[str, str]) -> float:
    """Mean milliseconds per call of ``calls`` (method, path, params or body)."""
    start = time.perf_counter()
    for method, path, arg in calls:
        if method == "GET":
            r = client.get(path, params=arg, headers=headers)
        else:
            r = client.post(path, content=orjson.dumps(arg), headers=headers)
        assert r.status_code < 300, r.text
    return (time.perf_counter() - start) * 1000 / len(calls)


def run(backend: str, rounds: int, pg_url: str, flip: bool) -> dict[str, Any]:
    kinds: dict[str, list[tuple[str, str, Any]]] = {
        "GET by id": [("GET", f"{E}/urn:ngsi-ld:TrafficFlowObserved:{n}", {}) for n in range(200)],
        "type+q, limit 100": [
            ("GET", E, {"type": "TrafficFlowObserved", "q": f"intensity>{n * 10};laneId==1"})
            for n in range(40)
        ],
        "geo near 300 m": [
            (
                "GET",
                E,
                {
                    "type": "TrafficFlowObserved",
                    "georel": "near;maxDistance==300",
                    "geometry": "Point",
                    "coordinates": f"[{3.7 + n * 0.001},{51.01}]",
                },
            )
            for n in range(40)
        ],
        "batch upsert of 100 (audited)": [
            ("POST", "/ngsi-ld/v1/entityOperations/upsert", [entity(n) for n in range(k, k + 100)])
            for k in range(0, 1000, 100)
        ],
    }
    samples: dict[bool, dict[str, list[float]]] = {g: {k: [] for k in kinds} for g in (False, True)}
    with (
        tempfile.TemporaryDirectory() as tmp_s,
        open_store(backend, Path(tmp_s), pg_url) as s1,
        open_store(backend, Path(tmp_s), pg_url) as s2,
    ):
        apps = []
        # which store gets governance is swapped between the two runs of a backend: two
        # stores with the same data can still differ (PostgreSQL plans, statistics)
        pairs = ((True, s1), (False, s2)) if flip else ((False, s1), (True, s2))
        for governed, store in pairs:
            d = Path(tmp_s) / ("on" if governed else "off")
            settings = Settings(
                data_dir=d,
                no_auth=not governed,
                governance=GovernanceSettings(audit=governed, retention_enabled=False),
            )
            app = create_app(settings, store)
            headers = {"Content-Type": "application/json"}
            if governed:
                token = app.state.governance.identities.issue(Role.OPERATOR, ["traffic-management"])
                headers["Authorization"] = f"Bearer {token}"
            client = TestClient(app)
            client.__enter__()
            body = [entity(n) for n in range(ENTITIES)]
            r = client.post(
                "/ngsi-ld/v1/entityOperations/upsert",
                content=orjson.dumps(body),
                headers=headers,
            )
            assert r.status_code in (201, 204), r.text
            apps.append((governed, client, headers))
        for _ in range(rounds):
            for governed, client, headers in apps:
                for kind, calls in kinds.items():
                    samples[governed][kind].append(timed(client, calls, headers))
        for _, client, _ in apps:
            client.__exit__(None, None, None)
    out: dict[str, Any] = {}
    for kind in kinds:
        off = statistics.median(samples[False][kind])
        on = statistics.median(samples[True][kind])
        out[kind] = {"without_ms": off, "with_ms": on, "added_ms": on - off}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--pg-url", default=PG_URL)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    doc: dict[str, Any] = {"benchmark": "governance", "rounds": args.rounds, "results": {}}
    table = Table(
        title=f"governance cost per request, in process (median of {args.rounds} rounds, "
        "mean of both store orders)"
    )
    table.add_column("backend")
    table.add_column("request")
    table.add_column("without (ms)", justify="right")
    table.add_column("with (ms)", justify="right")
    table.add_column("added (ms)", justify="right")
    for backend in backends:
        runs = [run(backend, args.rounds, args.pg_url, flip) for flip in (False, True)]
        res = {
            kind: {
                key: statistics.mean(r[kind][key] for r in runs)
                for key in ("without_ms", "with_ms", "added_ms")
            }
            for kind in runs[0]
        }
        doc["results"][backend] = {"mean_of_both_orders": res, "runs": runs}
        for kind, r in res.items():
            added = r["added_ms"]
            style = "green" if added <= 1.0 else "red"
            spread = " / ".join(f"{x[kind]['added_ms']:+.2f}" for x in runs)
            table.add_row(
                backend,
                kind,
                f"{r['without_ms']:.3f}",
                f"{r['with_ms']:.3f}",
                f"[{style}]{added:+.3f}[/] ({spread})",
            )
    console.print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"governance-{stamp}.json"
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
