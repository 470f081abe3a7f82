"""The history tables: idempotent creation and PostgreSQL's month partitions."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cityward.bank.temporal import (
    TemporalQuery,
    copy_postgres,
    create_postgres,
    create_sqlite,
    ensure_partitions,
    instance_row,
    parse_temporal_query,
)
from cityward.bank.temporal.schema import MAX_NEW_PARTITIONS, partition_name
from tests.bank.temporal.conftest import HistoryDb

SPEED = "https://ex.org/speed"
NOW = "2030-01-01T00:00:00.000000Z"


def row(observed: str, value: float = 1.0) -> Any:
    return instance_row(1, SPEED, {"type": "Property", "value": value, "observedAt": observed}, NOW)


def where(pg: psycopg.Connection[Any]) -> dict[str, str]:
    """observedAt -> the partition holding that row."""
    rows = pg.execute(
        "SELECT tableoid::regclass::text, to_char(obs AT TIME ZONE 'UTC', "
        '\'YYYY-MM-DD"T"HH24:MI:SS.US"Z"\') FROM attr_history'
    ).fetchall()
    return {obs: table.split(".")[-1] for table, obs in rows}


def test_sqlite_create_is_idempotent(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "h.db")
    create_sqlite(conn)
    create_sqlite(conn)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"attr_history", "attr_history_attrs"} <= tables
    conn.close()


@pytest.mark.postgres
@pytest.mark.parametrize("partitioned", [True, False])
def test_postgres_create_is_idempotent(pg: psycopg.Connection[Any], partitioned: bool) -> None:
    create_postgres(pg, partitioned=partitioned)
    create_postgres(pg, partitioned=partitioned)
    kind = pg.execute("SELECT relkind FROM pg_class WHERE oid = 'attr_history'::regclass")
    assert kind.fetchone() == ("p" if partitioned else "r",)


@pytest.mark.postgres
def test_month_partitions(pg: psycopg.Connection[Any]) -> None:
    create_postgres(pg)
    edge = ["2024-01-31T23:59:59.999999Z", "2024-02-01T00:00:00.000000Z"]
    assert ensure_partitions(pg, edge) == ["attr_history_p202401", "attr_history_p202402"]
    assert ensure_partitions(pg, edge) == []  # already there
    copy_postgres(pg, [row(t) for t in edge])
    assert where(pg) == {edge[0]: "attr_history_p202401", edge[1]: "attr_history_p202402"}


@pytest.mark.postgres
def test_rows_wait_in_the_default_partition(pg: psycopg.Connection[Any]) -> None:
    create_postgres(pg)
    times = ["2023-06-15T10:00:00.000000Z", "2023-06-30T23:00:00.000000Z"]
    other = "2023-07-01T00:00:00.000000Z"
    copy_postgres(pg, [row(t) for t in [*times, other]])  # no partition yet: never fails
    assert set(where(pg).values()) == {"attr_history_default"}
    # creating June's partition moves June's rows out of the default partition
    assert ensure_partitions(pg, times[:1]) == ["attr_history_p202306"]
    assert where(pg) == {
        times[0]: "attr_history_p202306",
        times[1]: "attr_history_p202306",
        other: "attr_history_default",
    }
    # and the rows are still found
    q = parse_temporal_query({"timerel": "before", "timeAt": "2023-07-01T00:00:00Z"})
    db = HistoryDb("postgres", pg)
    assert [i.time for i in db.instances(q, [1])] == times


@pytest.mark.postgres
def test_partitions_per_call_are_capped(pg: psycopg.Connection[Any]) -> None:
    create_postgres(pg)
    times = [
        f"{2000 + i // 12}-{i % 12 + 1:02d}-10T00:00:00Z" for i in range(MAX_NEW_PARTITIONS + 3)
    ]
    made = ensure_partitions(pg, times)
    assert len(made) == MAX_NEW_PARTITIONS
    assert ensure_partitions(pg, times) == [
        partition_name(datetime(2001, m, 1, tzinfo=UTC)) for m in (1, 2, 3)
    ]


@pytest.mark.postgres
def test_unpartitioned_layout(pg: psycopg.Connection[Any]) -> None:
    create_postgres(pg, partitioned=False)
    assert ensure_partitions(pg, ["2024-01-01T00:00:00Z"]) == []
    copy_postgres(pg, [row("2024-01-01T00:00:00Z", 4.0), row("2024-01-01T00:30:00Z", 6.0)])
    db = HistoryDb("postgres", pg)
    (bucket,) = db.aggregate(parse_temporal_query({"aggrMethods": "avg"}), [1])
    assert bucket.values == {"avg": 5.0}
    assert len(db.instances(TemporalQuery(), [1])) == 2


@pytest.mark.postgres
def test_history_ids_are_not_cached_per_connection(pg: psycopg.Connection[Any]) -> None:
    # ties of time are broken by id, so ids must follow the writes: with CACHE 100 each
    # pooled connection handed out its own block. A database made then is altered at start.
    pg.execute("CREATE SEQUENCE attr_history_id_seq CACHE 100")
    for _ in range(2):  # idempotent
        create_postgres(pg)
        cache = pg.execute(
            "SELECT seqcache FROM pg_sequence WHERE seqrelid = 'attr_history_id_seq'::regclass"
        )
        assert cache.fetchone() == (1,)
