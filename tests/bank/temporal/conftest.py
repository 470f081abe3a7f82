"""A real SQLite file and a real PostgreSQL scratch schema holding the history tables."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cityward.bank.temporal import (
    AggregateBucket,
    Dialect,
    HistoryInstance,
    HistoryRow,
    TemporalQuery,
    aggregates,
    copy_postgres,
    create_postgres,
    create_sqlite,
    decode_instances,
    ensure_partitions,
    insert_sqlite,
    instances_sql,
)
from cityward.bank.temporal.sql import POSTGRES_OPTIONS

PG_URL = os.environ.get("CITYWARD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


class HistoryDb:
    """One backend's connection with the history tables, and the builders run against it."""

    def __init__(self, dialect: Dialect, conn: Any) -> None:
        self.dialect = dialect
        self.conn = conn

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.conn.execute(sql, list(params)).fetchall()
        return rows

    def insert(self, rows: Sequence[HistoryRow]) -> None:
        if self.dialect == "sqlite":
            self.conn.execute("BEGIN")
            insert_sqlite(self.conn, rows, merge_at=0)  # the queries read attr_history
            self.conn.execute("COMMIT")
        else:
            ensure_partitions(self.conn, [r.obs for r in rows])
            with self.conn.transaction():
                copy_postgres(self.conn, rows)

    def clear(self) -> None:
        if self.dialect == "sqlite":
            self.conn.execute("DELETE FROM attr_history")
            self.conn.execute("DELETE FROM attr_history_new")
            self.conn.execute("DELETE FROM attr_history_attrs")
        else:
            self.conn.execute("TRUNCATE attr_history, attr_history_attrs")

    def instances(
        self,
        q: TemporalQuery,
        pks: Sequence[int],
        attrs: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> list[HistoryInstance]:
        sql, params = instances_sql(self.dialect, q, pks, attrs, limit=limit)
        return decode_instances(self.dialect, q, self.fetch(sql, params))

    def aggregate(
        self, q: TemporalQuery, pks: Sequence[int], attrs: Sequence[str] | None = None
    ) -> list[AggregateBucket]:
        return aggregates(self.fetch, self.dialect, q, pks, attrs)


def sqlite_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    create_sqlite(conn)
    return conn


def pg_connect() -> tuple[psycopg.Connection[Any], str]:
    """An autocommit connection whose search_path is a fresh, empty schema."""
    schema = f"test_{uuid.uuid4().hex[:12]}"
    conn = psycopg.connect(PG_URL, autocommit=True, options=POSTGRES_OPTIONS)
    conn.execute(f'CREATE SCHEMA "{schema}"')
    conn.execute(f'SET search_path = "{schema}"')
    return conn, schema


def pg_drop(conn: psycopg.Connection[Any], schema: str) -> None:
    conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryDb]:
    """Empty history tables in a SQLite file or a fresh PostgreSQL schema (partitioned)."""
    if request.param == "sqlite":
        conn = sqlite_db(tmp_path / "history.db")
        yield HistoryDb("sqlite", conn)
        conn.close()
    else:
        pg, schema = pg_connect()
        try:
            create_postgres(pg)
            yield HistoryDb("postgres", pg)
        finally:
            pg_drop(pg, schema)


@pytest.fixture
def pg() -> Iterator[psycopg.Connection[Any]]:
    """An autocommit PostgreSQL connection on a fresh schema without tables."""
    conn, schema = pg_connect()
    try:
        yield conn
    finally:
        pg_drop(conn, schema)
