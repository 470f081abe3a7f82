"""The dead-letter store: messages an adapter could not turn into updates, kept with the reason.

A malformed message must never stop an adapter, and must not vanish either: it is stored here
with its source, the time of receipt, the field and the reason, and the raw bytes (up to
``max_payload`` bytes; longer ones are cut and marked), so that an operator can see what a
device sends wrong and replay it once the mapping is fixed. Counts per source are kept for the
adapters' metrics.

SQLite in the data folder (``DATA/ingest/deadletter.db``), whatever the bank's backend: dead
letters belong to the ingest worker that received them, and a worker must be able to store
them when the bank is the thing that is down.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    received_at TEXT NOT NULL,
    field TEXT NOT NULL,
    reason TEXT NOT NULL,
    topic TEXT NOT NULL DEFAULT '',
    payload BLOB NOT NULL,
    truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_source ON dead_letters (source, seq);
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    source: str
    received_at: str
    field: str
    reason: str
    topic: str
    payload: bytes
    truncated: bool


class DeadLetters:
    """A thread-safe dead-letter store in one SQLite file."""

    def __init__(self, path: Path, *, max_payload: int = 64 * 1024) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_payload = max_payload
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def add(
        self,
        source: str,
        payload: bytes,
        *,
        field: str,
        reason: str,
        topic: str = "",
        received_at: datetime | None = None,
    ) -> int:
        """Store one rejected message; returns its sequence number."""
        at = (received_at or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds")
        cut = len(payload) > self.max_payload
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO dead_letters (source, received_at, field, reason, topic, payload,"
                " truncated) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (source, at, field, reason, topic, payload[: self.max_payload], int(cut)),
            )
            return int(cur.lastrowid or 0)

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT source, count(*) FROM dead_letters GROUP BY source ORDER BY source"
            ).fetchall()
        return {str(s): int(n) for s, n in rows}

    def entries(
        self, source: str | None = None, *, after: int = 0, limit: int = 100
    ) -> list[DeadLetter]:
        sql = "SELECT * FROM dead_letters WHERE seq > ?"
        args: list[object] = [after]
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        sql += " ORDER BY seq LIMIT ?"
        args.append(max(1, min(limit, 10_000)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [
            DeadLetter(int(r[0]), r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bool(r[7]))
            for r in rows
        ]

    def purge(self, source: str | None = None, *, upto: int | None = None) -> int:
        """Delete dead letters (of one source, up to a sequence number); returns how many."""
        sql = "DELETE FROM dead_letters WHERE 1=1"
        args: list[object] = []
        if source is not None:
            sql += " AND source = ?"
            args.append(source)
        if upto is not None:
            sql += " AND seq <= ?"
            args.append(upto)
        with self._lock:
            return int(self._db.execute(sql, args).rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()
