"""Quick timing of the history queries (not a test): 1M rows of one attribute, both backends.

Run: .venv/bin/python bench/temporal_sql.py [--rows N] [--no-pg]
Reports the median of several warm runs: hourly avg over all rows, lastN=100, and the insert.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from cityward.bank.temporal import (
    HistoryRow,
    TemporalQuery,
    aggregate_sql,
    copy_postgres,
    create_postgres,
    create_sqlite,
    decode_aggregates,
    decode_instances,
    ensure_partitions,
    insert_sqlite,
    instance_row,
    instances_sql,
    merge_sqlite,
    parse_temporal_query,
)
from cityward.bank.temporal.sql import POSTGRES_OPTIONS
from cityward.bank.temporal.times import iso_to_us, us_to_iso

PG_URL = os.environ.get("CITYWARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
IRI = "https://uri.etsi.org/ngsi-ld/default-context/speed"
OTHER = "https://uri.etsi.org/ngsi-ld/default-context/temperature"
START = iso_to_us("2024-01-01T00:00:00Z")


def batches(n: int, size: int = 50_000) -> Any:
    """Rows of one attribute of entity 1 every second, plus 100 noise entities' attributes."""
    for lo in range(0, n, size):
        rows: list[HistoryRow] = []
        for i in range(lo, min(n, lo + size)):
            t = us_to_iso(START + i * 1_000_000)
            inst = {"type": "Property", "value": (i * 7919) % 1000 / 10, "observedAt": t}
            inst["createdAt"] = inst["modifiedAt"] = t
            rows.append(instance_row(1, IRI, inst, t))
            if i % 10 == 0:  # other entities write into the same index pages
                rows.append(instance_row(2 + i % 100, OTHER, inst, t))
        yield rows


def timed(fn: Callable[[], Any], runs: int = 7) -> tuple[float, Any]:
    out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, out


def bench(name: str, run: Callable[[str, Sequence[Any]], list[Any]], dialect: Any) -> None:
    hourly = parse_temporal_query({"aggrMethods": "avg", "aggrPeriodDuration": "PT1H"})
    between = parse_temporal_query(
        {
            "aggrMethods": "totalCount,avg,min,max,stddev",
            "aggrPeriodDuration": "PT1H",
            "timerel": "between",
            "timeAt": "2024-01-02T00:00:00Z",
            "endTimeAt": "2024-01-09T00:00:00Z",
        }
    )
    last = parse_temporal_query({"lastN": "100"})
    q: TemporalQuery
    for label, q in (("hourly avg, all rows", hourly), ("hourly 5 methods, 1 week", between)):
        sql, params = aggregate_sql(dialect, q, [1], [IRI])

        def once(sql: str = sql, params: list[Any] = params) -> list[Any]:
            return run(sql, params)

        ms, rows = timed(once)
        buckets = decode_aggregates(dialect, q, rows)
        print(f"{name}: {label}: {ms:.1f} ms ({len(buckets)} buckets)")
    sql, params = instances_sql(dialect, last, [1], [IRI])
    ms, rows = timed(lambda: run(sql, params), runs=51)
    print(f"{name}: lastN=100: {ms:.2f} ms ({len(decode_instances(dialect, last, rows))} rows)")
    sql, params = instances_sql(dialect, last, [1])
    ms, rows = timed(lambda: run(sql, params), runs=51)
    print(f"{name}: lastN=100, all attributes: {ms:.2f} ms ({len(rows)} rows)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--no-pg", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "h.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA mmap_size=268435456")
        create_sqlite(conn)
        t0 = time.perf_counter()
        for rows in batches(args.rows):
            conn.execute("BEGIN")
            insert_sqlite(conn, rows)
            conn.execute("COMMIT")
        merge_sqlite(conn)  # the last staged rows (autocommit: a transaction of its own)
        print(f"sqlite: insert {args.rows:,} rows (+10%): {time.perf_counter() - t0:.1f} s")
        conn.execute("ANALYZE")
        bench("sqlite", lambda sql, p: conn.execute(sql, p).fetchall(), "sqlite")
        conn.close()

    if args.no_pg:
        return
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True, options=POSTGRES_OPTIONS) as pg:
        pg.execute(f'CREATE SCHEMA "{schema}"')
        pg.execute(f'SET search_path = "{schema}"')
        try:
            create_postgres(pg)
            t0 = time.perf_counter()
            for rows in batches(args.rows):
                ensure_partitions(pg, [r.obs for r in rows])
                with pg.transaction():
                    copy_postgres(pg, rows)
            print(f"postgres: insert {args.rows:,} rows (+10%): {time.perf_counter() - t0:.1f} s")
            pg.execute("VACUUM ANALYZE attr_history")
            bench("postgres", lambda sql, p: pg.execute(sql, p).fetchall(), "postgres")
        finally:
            pg.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
