"""SQLite history rows are staged and merged into attr_history in bulk (schema.merge_sqlite);
reads settle first (bank.history.settle), so no reader ever misses a recorded row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cityward.bank.history import History, settle
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.temporal import (
    HistoryRow,
    create_sqlite,
    insert_sqlite,
    instance_row,
    merge_sqlite,
)

SPEED = "https://uri.etsi.org/ngsi-ld/default-context/speed"
NOW = "2024-03-01T12:00:00.000000Z"


def _rows(pk: int, n: int, start: int = 0) -> list[HistoryRow]:
    return [
        instance_row(
            pk,
            SPEED,
            {
                "type": "Property",
                "value": float(i),
                "observedAt": f"2024-03-01T10:{i % 60:02d}:00Z",
            },
            NOW,
        )
        for i in range(start, start + n)
    ]


def _ids(conn: sqlite3.Connection, table: str) -> list[int]:
    return [int(r[0]) for r in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = sqlite3.connect(tmp_path / "h.db", isolation_level=None)
    create_sqlite(c)
    return c


def _insert(conn: sqlite3.Connection, rows: list[HistoryRow], merge_at: int) -> None:
    conn.execute("BEGIN")
    insert_sqlite(conn, rows, merge_at=merge_at)
    conn.execute("COMMIT")


def test_rows_wait_in_the_stage_then_move_with_their_ids(conn: sqlite3.Connection) -> None:
    for pk in (3, 1, 2):
        _insert(conn, _rows(pk, 4), merge_at=1000)
    assert _ids(conn, "attr_history") == []
    assert _ids(conn, "attr_history_new") == list(range(1, 13))
    conn.execute("BEGIN")
    assert merge_sqlite(conn) == 12
    conn.execute("COMMIT")
    assert _ids(conn, "attr_history_new") == []
    assert _ids(conn, "attr_history") == list(range(1, 13))
    # the rows are whole: entity, time and value as staged
    got = conn.execute("SELECT e, num FROM attr_history WHERE id = 1").fetchone()
    assert got == (3, 0.0)
    conn.execute("BEGIN")
    assert merge_sqlite(conn) == 0  # nothing staged: nothing moves
    conn.execute("COMMIT")


def test_the_threshold_merges_everything_staged(conn: sqlite3.Connection) -> None:
    _insert(conn, _rows(1, 3), merge_at=5)
    assert len(_ids(conn, "attr_history_new")) == 3
    _insert(conn, _rows(2, 2), merge_at=5)  # 3 + 2 >= 5
    assert _ids(conn, "attr_history_new") == []
    assert _ids(conn, "attr_history") == [1, 2, 3, 4, 5]


def test_an_instance_id_is_never_given_twice(conn: sqlite3.Connection) -> None:
    _insert(conn, _rows(1, 5), merge_at=0)
    # the newest rows deleted (a temporal DELETE): their ids stay taken
    conn.execute("DELETE FROM attr_history WHERE id >= 4")
    _insert(conn, _rows(1, 2, start=10), merge_at=1000)
    assert _ids(conn, "attr_history_new") == [6, 7]
    # staged ids count too, before any merge
    _insert(conn, _rows(2, 1), merge_at=1000)
    assert _ids(conn, "attr_history_new") == [6, 7, 8]
    conn.execute("BEGIN")
    merge_sqlite(conn)
    conn.execute("COMMIT")
    conn.execute("DELETE FROM attr_history WHERE id = 8")
    _insert(conn, _rows(3, 1), merge_at=0)
    assert _ids(conn, "attr_history") == [1, 2, 3, 6, 7, 9]


def test_a_rolled_back_write_stages_nothing(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN")
    insert_sqlite(conn, _rows(1, 3), merge_at=1000)
    conn.execute("ROLLBACK")
    assert _ids(conn, "attr_history_new") == [] and _ids(conn, "attr_history") == []


def test_settle_makes_a_banks_writes_readable(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "bank.db")
    try:
        bank = Bank(store)
        History(store, bank)
        parser = EntityParser(ContextResolver(allow_fetch=False).core)
        for v in range(3):
            doc = parser.entity(
                {
                    "id": "urn:ngsi-ld:Road:1",
                    "type": "Road",
                    "speed": {"type": "Property", "value": v},
                }
            )
            bank.batch_upsert("", [doc], "update")
        count = "SELECT count(*) FROM attr_history"
        assert store.select(count)[0][0] == 0  # staged: fewer than MERGE_ROWS so far
        settle(store)
        assert store.select(count)[0][0] == 3
        assert store.select("SELECT count(*) FROM attr_history_new")[0][0] == 0
        settle(store)  # nothing staged: no write
        assert store.select(count)[0][0] == 3
    finally:
        store.close()
