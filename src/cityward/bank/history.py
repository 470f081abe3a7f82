"""Attribute history kept by the data bank itself: a write hook that records every change.

Every write that creates or changes an attribute instance records it in ``attr_history``
(cityward.bank.temporal) in the same transaction, stamped with the instance's observedAt or,
without one, the time of the write. So a committed write always has its history, and a write
that fails leaves none.

On SQLite the rows are staged first and merged into ``attr_history`` in bulk (see
cityward.bank.temporal.schema): whatever reads the history calls :func:`settle` first, and a
write transaction that deletes history rows calls :func:`settle_txn`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

from cityward.bank.changes import Change
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.bank.temporal import (
    HistoryRow,
    copy_postgres,
    create_postgres,
    create_sqlite,
    ensure_partitions,
    history_rows,
    insert_sqlite,
    merge_sqlite,
)
from cityward.bank.temporal.times import iso_to_us, us_to_datetime

log = logging.getLogger(__name__)


def settle(store: Store) -> None:
    """Make every recorded history row visible to a read of ``attr_history``: on SQLite,
    merge the staged rows (one short write transaction; nothing when none are staged). A
    no-op on PostgreSQL, whose rows go straight in."""
    if store.dialect != "sqlite":
        return
    if not store.select("SELECT EXISTS (SELECT 1 FROM attr_history_new)")[0][0]:
        return
    with store.write("", create_tenant=False) as txn:
        settle_txn(txn)


def settle_txn(txn: WriteTxn) -> None:
    """:func:`settle` inside a write transaction, before it deletes or reads history rows."""
    if txn.dialect == "sqlite":
        merge_sqlite(txn.conn)


class History:
    """Creates the history tables of a store and records each write's changes in them."""

    def __init__(self, store: Store, bank: Bank) -> None:
        self.store = store
        self.rows_written = 0
        self._analyzed_at = 0  # rows_written when PostgreSQL statistics were last refreshed
        self._vacuuming = False
        self._months: set[str] = set()  # months (YYYY-MM) whose partition exists
        self._lock = threading.Lock()
        if store.dialect == "sqlite":
            # its own connection: executescript would commit a store transaction it ran in
            conn = sqlite3.connect(Path(store.path), isolation_level=None)  # type: ignore[attr-defined]
            try:
                conn.execute("PRAGMA busy_timeout=10000")
                create_sqlite(conn)
            finally:
                conn.close()
        else:
            with store.pool.connection() as pg:  # type: ignore[attr-defined]
                create_postgres(pg)
        bank.hooks.append(self)

    def insert(self, txn: WriteTxn, rows: list[HistoryRow]) -> None:
        """Insert history rows in ``txn`` (PostgreSQL partitions: see :meth:`prepare`)."""
        if not rows:
            return
        if txn.dialect == "sqlite":
            insert_sqlite(txn.conn, rows)
        else:
            copy_postgres(txn.conn, rows)
        self.rows_written += len(rows)

    def refresh_statistics(self) -> None:
        """After bulk history writes (temporal appends), VACUUM ANALYZE on PostgreSQL.

        Right after a million rows arrive the planner still believes the table is empty (lastN
        took 0.5 s instead of 1 ms), and until a VACUUM sets the visibility map every
        "index-only" scan reads the table too (an hourly avg over 1M rows: 313 ms, 181 ms
        after). It runs on a thread of its own: a VACUUM must not hold up the request.
        """
        if self.store.dialect != "postgres":
            return
        with self._lock:
            grown = self.rows_written - self._analyzed_at
            if grown < max(10_000, self._analyzed_at // 5) or self._vacuuming:
                return
            self._analyzed_at = self.rows_written
            self._vacuuming = True
        threading.Thread(target=self._vacuum, name="history-vacuum", daemon=True).start()

    def _vacuum(self) -> None:
        try:
            with self.store.pool.connection() as pg:  # type: ignore[attr-defined]
                pg.autocommit = True  # VACUUM cannot run inside a transaction
                try:
                    pg.execute("VACUUM (ANALYZE) attr_history")
                finally:
                    pg.autocommit = False
        except Exception:
            log.exception("VACUUM ANALYZE of attr_history failed")
        finally:
            with self._lock:
                self._vacuuming = False

    def prepare(self, times: list[str]) -> None:
        """Before a write transaction: make the PostgreSQL partitions these times need."""
        if self.store.dialect == "postgres":
            self._partitions(times)

    def __call__(self, txn: WriteTxn, changes: list[Change]) -> None:
        rows = [
            row
            for c in changes
            if c.after is not None
            for row in history_rows(c.pk, c.before, c.after, c.at)
        ]
        if rows:
            self.prepare([r.obs for r in rows])
            self.insert(txn, rows)
        # (the entity write path refreshes statistics itself: PostgresStore._maybe_analyze)

    def _partitions(self, times: list[str]) -> None:
        """Month partitions for these times, made in a short transaction of their own.

        This runs for every write: a time's month is its first 7 characters (the times are
        UTC ``YYYY-MM-...Z`` texts), so only a month not seen before is parsed.
        """
        needed: dict[str, Any] = {}
        for t in times:
            month = t[:7]
            if month not in self._months and month not in needed:
                needed[month] = us_to_datetime(iso_to_us(t))
        if not needed:
            return
        with self._lock, self.store.pool.connection() as pg:  # type: ignore[attr-defined]
            # worker processes race to make the same month: one at a time, each re-checks
            pg.execute("SELECT pg_advisory_xact_lock(74110003)")
            ensure_partitions(pg, list(needed.values()))
            pg.commit()
            self._months.update(needed)
