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
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cityward.bank.changes import Change
from cityward.bank.model import now_iso
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.bank.temporal import (
    HistoryRow,
    copy_postgres,
    create_postgres,
    create_sqlite,
    ensure_partitions,
    existing_partitions,
    history_rows,
    insert_sqlite,
    merge_sqlite,
)
from cityward.bank.temporal.schema import partition_name
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
        # months whose rows went to the default partition in a write transaction (__call__):
        # the next prepare makes their partitions, which moves the rows out
        self._pending: dict[str, datetime] = {}
        self._lock = threading.Lock()  # the sets and counters above; never held across I/O
        # one partition maker at a time in this process. Taken only outside write
        # transactions: its holder takes a pooled connection, so a thread that waited for it
        # while holding one could leave the pool empty (every request thread holding its
        # transaction's connection, waiting here, until the pool timeout)
        self._making = threading.Lock()
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
        bank.before_write.append(self.prepare_docs)

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
        """Before a write transaction: make the PostgreSQL partitions these times need, and
        those of rows that a write transaction sent to the default partition meanwhile."""
        if self.store.dialect == "postgres":
            self._partitions(times)

    def prepare_docs(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """:meth:`prepare` for the documents (or fragments) a Bank write is about to store:
        the observedAt of their instances, and now for those without one (Bank.before_write).

        A changed instance may keep a stored observedAt this does not see (a merge); its month
        was made when it was first stored, or __call__ sends its row to the default partition.
        """
        if self.store.dialect != "postgres":
            return
        times = [now_iso()]
        for doc in docs:
            for instances in doc.get("attrs", {}).values():
                for inst in instances:
                    obs = inst.get("observedAt") if isinstance(inst, dict) else None
                    if isinstance(obs, str) and obs.endswith("Z") and obs[:7] not in self._months:
                        times.append(obs)
        self._partitions(times)

    def __call__(self, txn: WriteTxn, changes: list[Change]) -> None:
        rows = [
            row
            for c in changes
            if c.after is not None
            for row in history_rows(c.pk, c.before, c.after, c.at)
        ]
        if rows:
            if txn.dialect == "postgres":
                self._missing_months(txn, [r.obs for r in rows])
            self.insert(txn, rows)
        # (the entity write path refreshes statistics itself: PostgresStore._maybe_analyze)

    def _missing_months(self, txn: WriteTxn, times: list[str]) -> None:
        """Inside a write transaction: note the months of these times that have no partition
        yet. Their rows go to the default partition; the next :meth:`prepare` makes the
        partitions and moves them out. Making a partition here would need a second pooled
        connection (attaching one in the write transaction itself locks the default partition
        to the commit, inviting deadlocks): with every pooled connection held by a write that
        waited for a second one, nothing moved until the pool timed out and answered 500."""
        with self._lock:
            unknown = {
                t[:7]: t for t in times if t[:7] not in self._months and t[:7] not in self._pending
            }
        if not unknown:
            return
        existing = existing_partitions(txn.conn)  # a catalog read: no lock taken
        with self._lock:
            for month, t in unknown.items():
                when = us_to_datetime(iso_to_us(t))
                if existing is None or partition_name(when) in existing:
                    self._months.add(month)
                else:
                    self._pending.setdefault(month, when)

    def _partitions(self, times: list[str]) -> None:
        """Month partitions for these times (and the pending ones), made in a short
        transaction of their own, outside any write transaction.

        This runs for every write: a time's month is its first 7 characters (the times are
        UTC ``YYYY-MM-...Z`` texts), so only a month not seen before is parsed.
        """
        with self._lock:
            needed: dict[str, datetime] = dict(self._pending)
        for t in times:
            month = t[:7]
            if month not in self._months and month not in needed:
                needed[month] = us_to_datetime(iso_to_us(t))
        if not needed:
            return
        with self._making, self.store.pool.connection() as pg:  # type: ignore[attr-defined]
            # worker processes race to make the same month: one at a time, each re-checks
            pg.execute("SELECT pg_advisory_xact_lock(74110003)")
            ensure_partitions(pg, list(needed.values()))
            # ensure_partitions makes MAX_NEW_PARTITIONS at most: only the months that have
            # their partition now are known; the others are tried again by the next write
            existing = existing_partitions(pg)
            pg.commit()
        with self._lock:
            for month, when in needed.items():
                if existing is None or partition_name(when) in existing:
                    self._months.add(month)
                    self._pending.pop(month, None)
                else:
                    self._pending.setdefault(month, when)
