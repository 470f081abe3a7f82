"""A persistent, bounded outbox of notifications waiting for delivery (SQLite or PostgreSQL).

A notification is written to the outbox in the same transaction as the entity write that
caused it (:meth:`Outbox.enqueue` takes the caller's connection and never commits), so a crash
can neither lose it nor send one for a write that was rolled back. The dispatcher then claims
due rows, delivers them and deletes them, or records a failed attempt.

Table ``notification_outbox`` (both backends):

========================  =========================================================================
``seq``                   integer primary key, increasing (the claim order of due rows)
``id``                    the notification id (``urn:ngsi-ld:Notification:<uuid>``)
``tenant``                NGSILD-Tenant of the subscription ('' = default tenant)
``subscription_id``       the subscription's id
``endpoint``              the endpoint URI (http, https, mqtt or mqtts)
``okey``                  ordering key: one endpoint's rows with the same key go out in order
``payload``               JSON: ``{"headers": {...}, "body": {...}, "notifierInfo"?, "timeout"?}``
``attempts``              delivery attempts so far
``next_attempt``          epoch seconds when the row may be claimed (lease expiry while leased)
``leased``                1 while a dispatcher holds the row in memory
``created``               epoch seconds of the enqueue
``last_error``            what the last failed attempt said
========================  =========================================================================

Indexes: ``(next_attempt)`` for claims and ``(endpoint, seq)`` for the bound.

**Bound policy** (writers are never blocked and never fail because of the outbox): each
endpoint may hold ``max_per_endpoint`` pending rows and the whole outbox ``max_pending``. The
outbox keeps an in-process estimate of the counts (raised by ``enqueue``, lowered by
deliveries, corrected by :meth:`Outbox.recount`). When an enqueue takes an endpoint past its
bound, the oldest rows *of that endpoint* are deleted in the same transaction, unleased ones
first, down to ``trim_to`` (90 %) of the bound, so a dead endpoint loses its oldest
notifications and no other endpoint loses anything. When the whole outbox is past
``max_pending``, the endpoints with the most rows are trimmed the same way. Every dropped row is
counted in :attr:`Outbox.dropped` (also per endpoint and per subscription). Dropping the oldest
keeps what a subscriber gets when it comes back as fresh as possible.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeAlias

import orjson
import psycopg
from psycopg_pool import ConnectionPool

from cityward.bank.store.postgres import open_pool

__all__ = [
    "POSTGRES_DDL",
    "SQLITE_DDL",
    "TABLE",
    "Conn",
    "Dialect",
    "Outbox",
    "OutboxDB",
    "OutboxItem",
    "PostgresOutboxDB",
    "SqliteOutboxDB",
]

Dialect: TypeAlias = Literal["sqlite", "postgres"]
Conn: TypeAlias = "sqlite3.Connection | psycopg.Connection[Any]"
TABLE: Final = "notification_outbox"

SQLITE_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL,
  tenant TEXT NOT NULL DEFAULT '',
  subscription_id TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  okey TEXT NOT NULL DEFAULT '',
  payload TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt REAL NOT NULL,
  leased INTEGER NOT NULL DEFAULT 0,
  created REAL NOT NULL,
  last_error TEXT
);
CREATE INDEX IF NOT EXISTS {TABLE}_due ON {TABLE}(next_attempt);
CREATE INDEX IF NOT EXISTS {TABLE}_endpoint ON {TABLE}(endpoint, seq);
"""

POSTGRES_DDL: Final = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
  seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id TEXT NOT NULL,
  tenant TEXT NOT NULL DEFAULT '',
  subscription_id TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  okey TEXT NOT NULL DEFAULT '',
  payload TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  next_attempt DOUBLE PRECISION NOT NULL,
  leased SMALLINT NOT NULL DEFAULT 0,
  created DOUBLE PRECISION NOT NULL,
  last_error TEXT
);
CREATE INDEX IF NOT EXISTS {TABLE}_due ON {TABLE}(next_attempt);
CREATE INDEX IF NOT EXISTS {TABLE}_endpoint ON {TABLE}(endpoint, seq);
"""

_COLUMNS: Final = "seq, id, tenant, subscription_id, endpoint, okey, payload, attempts, created"
_INSERT: Final = (
    f"INSERT INTO {TABLE} (id, tenant, subscription_id, endpoint, okey, payload, attempts, "
    "next_attempt, leased, created) VALUES (?, ?, ?, ?, ?, ?, 0, ?, 0, ?)"
)
# PostgreSQL takes the schema lock of the store so that nodes starting together do not race
_PG_MIGRATION_LOCK: Final = 74110002


@dataclass(frozen=True)
class OutboxItem:
    """One notification to deliver; ``seq``/``attempts``/``created`` come from the table."""

    id: str
    subscription_id: str
    endpoint: str
    payload: Mapping[str, Any]
    tenant: str = ""
    key: str = ""
    seq: int = 0
    attempts: int = 0
    created: float = 0.0

    @property
    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = dict(self.payload.get("headers") or {})
        return headers

    @property
    def body(self) -> Any:
        return self.payload.get("body")


class OutboxDB(Protocol):
    """Where the outbox runs its own transactions (not the writers' enqueues)."""

    @property
    def dialect(self) -> Dialect: ...

    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction, committed on normal exit and rolled back on an exception."""
        ...

    def reading(self) -> AbstractContextManager[Any]:
        """A connection for reads outside a write transaction."""
        ...

    def close(self) -> None: ...


class SqliteOutboxDB:
    """A dedicated connection to the store's SQLite file for the dispatcher.

    Write transactions take the same advisory file lock as ``SqliteStore`` writers
    (``<db>.writelock``), so store writers queue behind a short outbox transaction on the lock
    (and wake the moment it ends) instead of sleeping in SQLite's busy handler. Never open one of
    these transactions while the same thread holds a store write transaction: use
    :meth:`Outbox.enqueue` with the store's connection there.
    """

    @property
    def dialect(self) -> Dialect:
        return "sqlite"

    def __init__(self, path: Path | str, *, lock_path: Path | bool | None = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if lock_path is True:
            self.lock_path: Path | None = self.path.with_name(self.path.name + ".writelock")
        elif lock_path is False or lock_path is None:
            self.lock_path = None
        else:
            self.lock_path = lock_path
        self._lock = threading.Lock()
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        self._conn = conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            fd = -1
            if self.lock_path is not None:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                else:
                    self._conn.execute("COMMIT")
            finally:
                if fd >= 0:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for a read outside any transaction (no write lock taken)."""
        with self._lock:
            yield self._conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresOutboxDB:
    """Outbox transactions on a psycopg pool (the store's ``pool``, or one of its own)."""

    @property
    def dialect(self) -> Dialect:
        return "postgres"

    def __init__(self, pool: ConnectionPool[Any], *, owned: bool = False) -> None:
        self.pool = pool
        self._owned = owned

    @classmethod
    def connect(cls, url: str, *, schema: str | None = None, max_size: int = 2) -> PostgresOutboxDB:
        kwargs: dict[str, Any] = {"autocommit": False}
        if schema:
            kwargs["options"] = f"-c search_path={schema}"
        return cls(open_pool(url, max_size, kwargs), owned=True)

    @contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def reading(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            yield conn

    def close(self) -> None:
        if self._owned:
            self.pool.close()


def _sql(sql: str, dialect: Dialect) -> str:
    return sql.replace("?", "%s") if dialect == "postgres" else sql


def _execute(conn: Conn, dialect: Dialect, sql: str, params: Sequence[Any] = ()) -> Any:
    if isinstance(conn, sqlite3.Connection):
        return conn.execute(sql, list(params))
    return conn.execute(_sql(sql, dialect), list(params))


def _executemany(conn: Conn, dialect: Dialect, sql: str, rows: Sequence[Sequence[Any]]) -> None:
    if not rows:
        return
    if isinstance(conn, sqlite3.Connection):
        conn.executemany(sql, rows)
    else:
        with conn.cursor() as cur:
            cur.executemany(_sql(sql, dialect), rows)


def _in_list(
    dialect: Dialect, column: str, values: Sequence[Any], negate: bool = False
) -> tuple[str, list[Any]]:
    """``column IN values`` as one parameter (a JSON array on SQLite, an array on PostgreSQL)."""
    if dialect == "sqlite":
        op = "NOT IN" if negate else "IN"
        return f"{column} {op} (SELECT value FROM json_each(?))", [
            orjson.dumps(list(values)).decode()
        ]
    return (f"{column} <> ALL(?)" if negate else f"{column} = ANY(?)"), [list(values)]


def create_schema(conn: Conn, dialect: Dialect) -> None:
    """Create the outbox table and indexes if missing (idempotent; inside a transaction)."""
    if isinstance(conn, sqlite3.Connection):
        for stmt in SQLITE_DDL.split(";"):
            if stmt.strip():
                conn.execute(stmt)
    else:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_MIGRATION_LOCK])
        conn.execute(POSTGRES_DDL)


def _item(row: Sequence[Any]) -> OutboxItem:
    seq, nid, tenant, sid, endpoint, okey, payload, attempts, created = row
    return OutboxItem(
        id=nid,
        subscription_id=sid,
        endpoint=endpoint,
        payload=orjson.loads(payload),
        tenant=tenant,
        key=okey,
        seq=int(seq),
        attempts=int(attempts),
        created=float(created),
    )


@dataclass
class _Counts:
    by_endpoint: Counter[str] = field(default_factory=Counter)
    total: int = 0


class Outbox:
    """The outbox of one database: enqueue inside writes; claim, settle and bound for delivery."""

    TRIM_TO: Final = 0.9

    def __init__(
        self,
        db: OutboxDB,
        *,
        max_pending: int = 100_000,
        max_per_endpoint: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_per_endpoint < 1 or max_pending < 1:
            raise ValueError("outbox bounds must be positive")
        self.db = db
        self.dialect: Dialect = db.dialect
        self.max_pending = max_pending
        self.max_per_endpoint = max_per_endpoint
        self.clock = clock
        self._lock = threading.Lock()
        self._counts = _Counts()
        self.dropped = 0
        self.dropped_by_endpoint: Counter[str] = Counter()
        self.dropped_by_subscription: Counter[tuple[str, str]] = Counter()  # (tenant, id)
        with db.transaction() as conn:
            create_schema(conn, self.dialect)
        self.recount()

    # -- in the writer's transaction --------------------------------------------------------
    def enqueue(self, conn: Conn, items: Sequence[OutboxItem]) -> int:
        """Insert ``items`` using the caller's connection, inside its open transaction.

        Never commits and never waits on the dispatcher. Returns how many older rows were
        dropped to keep the bounds (see the module docstring). Call ``Dispatcher.wake()`` after
        the caller's commit so that delivery starts at once.
        """
        if not items:
            return 0
        if isinstance(conn, sqlite3.Connection) != (self.dialect == "sqlite"):
            raise ValueError(f"a {type(conn).__name__} cannot write a {self.dialect} outbox")
        now = self.clock()
        rows = [
            (
                i.id,
                i.tenant,
                i.subscription_id,
                i.endpoint,
                i.key,
                orjson.dumps(i.payload).decode(),
                now,
                now,
            )
            for i in items
        ]
        _executemany(conn, self.dialect, _INSERT, rows)
        with self._lock:
            c = self._counts
            for i in items:
                c.by_endpoint[i.endpoint] += 1
            c.total += len(items)
            over = sorted(
                {i.endpoint for i in items if c.by_endpoint[i.endpoint] > self.max_per_endpoint}
            )
            total_over = c.total > self.max_pending
        dropped = 0
        for endpoint in over:
            dropped += self._trim_endpoint(
                conn, endpoint, int(self.max_per_endpoint * self.TRIM_TO)
            )
        if total_over:
            dropped += self._trim_total(conn)
        return dropped

    def _trim_endpoint(self, conn: Conn, endpoint: str, keep: int) -> int:
        row = _execute(
            conn, self.dialect, f"SELECT count(*) FROM {TABLE} WHERE endpoint = ?", [endpoint]
        ).fetchone()
        count = int(row[0])
        excess = count - keep if count > self.max_per_endpoint else 0
        deleted = self._delete_oldest(conn, endpoint, excess) if excess > 0 else 0
        with self._lock:
            old = self._counts.by_endpoint[endpoint]
            self._counts.by_endpoint[endpoint] = count - deleted
            self._counts.total += count - deleted - old
        return deleted

    def _trim_total(self, conn: Conn) -> int:
        rows = _execute(
            conn, self.dialect, f"SELECT endpoint, count(*) FROM {TABLE} GROUP BY endpoint"
        ).fetchall()
        counts: Counter[str] = Counter({str(ep): int(n) for ep, n in rows})
        total = sum(counts.values())
        deleted = 0
        if total > self.max_pending:
            target = int(self.max_pending * self.TRIM_TO)
            while total > target and counts:
                endpoint, n = counts.most_common(1)[0]
                take = min(n, total - target)
                got = self._delete_oldest(conn, endpoint, take)
                deleted += got
                total -= take
                counts[endpoint] -= take
                if counts[endpoint] <= 0:
                    del counts[endpoint]
        with self._lock:
            self._counts = _Counts(Counter(counts), sum(counts.values()))
        return deleted

    def _delete_oldest(self, conn: Conn, endpoint: str, n: int) -> int:
        skip = " FOR UPDATE SKIP LOCKED" if self.dialect == "postgres" else ""
        cur = _execute(
            conn,
            self.dialect,
            f"DELETE FROM {TABLE} WHERE seq IN (SELECT seq FROM {TABLE} WHERE endpoint = ? "
            f"ORDER BY leased, seq LIMIT ?{skip}) RETURNING tenant, subscription_id",
            [endpoint, n],
        )
        gone = cur.fetchall()
        with self._lock:
            self.dropped += len(gone)
            self.dropped_by_endpoint[endpoint] += len(gone)
            for tenant, sid in gone:
                self.dropped_by_subscription[(str(tenant), str(sid))] += 1
        return len(gone)

    # -- own transactions -------------------------------------------------------------------
    def add(self, items: Sequence[OutboxItem]) -> int:
        """Enqueue in a transaction of its own (not for use inside a store write)."""
        with self.db.transaction() as conn:
            return self.enqueue(conn, items)

    def claim(
        self, limit: int, *, lease_s: float = 600.0, exclude: Sequence[str] = ()
    ) -> list[OutboxItem]:
        """Lease up to ``limit`` due rows (oldest first), skipping ``exclude`` endpoints."""
        return self.exchange(limit=limit, lease_s=lease_s, exclude=exclude)

    def exchange(
        self,
        *,
        delivered: Sequence[int] = (),
        failures: Sequence[tuple[int, int, str]] = (),
        released: Sequence[int] = (),
        limit: int = 0,
        lease_s: float = 600.0,
        exclude: Sequence[str] = (),
    ) -> list[OutboxItem]:
        """One round trip of the dispatcher, in one transaction: delete ``delivered`` rows,
        record ``failures`` (seq, attempts, error), give the leases of ``released`` rows back
        (due now) and claim up to ``limit`` due rows.

        Due rows are claimed in seq (enqueue) order, whenever each became due: the dispatcher
        appends each claimed batch to its lanes, so a row claimed before an older one of its
        key would be sent first. Ordered by next_attempt, rows whose lease was given back (a
        stop, a restart's takeover: due "now") came after newer rows never claimed (due since
        their enqueue), and a subscription's notifications arrived out of order after a
        restart.

        Without anything to settle, a cheap read first checks that something is due, so an
        idle dispatcher never takes the write lock.
        """
        now = self.clock()
        due_where = "next_attempt <= ?"
        due_params: list[Any] = [now]
        if exclude:
            cond, params = _in_list(self.dialect, "endpoint", exclude, negate=True)
            due_where += " AND " + cond
            due_params += params
        if not delivered and not failures and not released:
            if limit <= 0:
                return []
            with self.db.reading() as conn:
                hit = _execute(
                    conn,
                    self.dialect,
                    f"SELECT 1 FROM {TABLE} WHERE {due_where} LIMIT 1",
                    due_params,
                ).fetchone()
                if isinstance(conn, psycopg.Connection):
                    conn.rollback()
            if hit is None:
                return []
        with self.db.transaction() as conn:
            if delivered:
                self._delete(conn, delivered)
            if failures:
                _executemany(
                    conn,
                    self.dialect,
                    f"UPDATE {TABLE} SET attempts = ?, last_error = ? WHERE seq = ?",
                    [(attempts, error[:1000], seq) for seq, attempts, error in failures],
                )
            if released:
                self._release(conn, released, now)
            if limit <= 0:
                return []
            skip = " FOR UPDATE SKIP LOCKED" if self.dialect == "postgres" else ""
            rows = _execute(
                conn,
                self.dialect,
                f"UPDATE {TABLE} SET leased = 1, next_attempt = ? WHERE seq IN "
                f"(SELECT seq FROM {TABLE} WHERE {due_where} ORDER BY seq "
                f"LIMIT ?{skip}) RETURNING {_COLUMNS}",
                [now + lease_s, *due_params, limit],
            ).fetchall()
        items = [_item(r) for r in rows]
        items.sort(key=lambda i: i.seq)
        return items

    def _delete(self, conn: Conn, seqs: Sequence[int]) -> int:
        cond, params = _in_list(self.dialect, "seq", seqs)
        return self._deleted(conn, f"DELETE FROM {TABLE} WHERE {cond} RETURNING endpoint", params)

    def _deleted(self, conn: Conn, sql: str, params: Sequence[Any]) -> int:
        """Run a DELETE ... RETURNING endpoint and take its rows off the counts."""
        gone = _execute(conn, self.dialect, sql, params).fetchall()
        with self._lock:
            for (endpoint,) in gone:
                if self._counts.by_endpoint[endpoint] > 0:
                    self._counts.by_endpoint[endpoint] -= 1
                    self._counts.total -= 1
        return len(gone)

    def delete(self, seqs: Sequence[int]) -> int:
        """Remove delivered (or abandoned) rows; returns how many existed."""
        if not seqs:
            return 0
        with self.db.transaction() as conn:
            return self._delete(conn, seqs)

    def reschedule(self, seq: int, *, attempts: int, at: float, error: str = "") -> None:
        """Give a leased row back, due again at ``at`` (epoch seconds), with its attempts."""
        with self.db.transaction() as conn:
            _execute(
                conn,
                self.dialect,
                f"UPDATE {TABLE} SET leased = 0, next_attempt = ?, attempts = ?, "
                "last_error = ? WHERE seq = ?",
                [at, attempts, error[:1000] or None, seq],
            )

    def release(self, seqs: Sequence[int], *, at: float | None = None) -> int:
        """Give leased rows back, due at ``at`` (default now): a stopping dispatcher's."""
        if not seqs:
            return 0
        with self.db.transaction() as conn:
            return self._release(conn, seqs, self.clock() if at is None else at)

    def _release(self, conn: Conn, seqs: Sequence[int], at: float) -> int:
        cond, params = _in_list(self.dialect, "seq", seqs)
        cur = _execute(
            conn,
            self.dialect,
            f"UPDATE {TABLE} SET leased = 0, next_attempt = ? WHERE {cond}",
            [at, *params],
        )
        return int(cur.rowcount)

    def release_all(self) -> int:
        """Give back every lease, due now: what a dispatcher that is the only one does when it
        starts, so rows leased by a predecessor that died are delivered at once."""
        with self.db.transaction() as conn:
            cur = _execute(
                conn,
                self.dialect,
                f"UPDATE {TABLE} SET leased = 0, next_attempt = ? WHERE leased = 1",
                [self.clock()],
            )
            return int(cur.rowcount)

    # -- in a transaction that changes a subscription ---------------------------------------
    # A subscription's rows follow its changes in the transaction that makes them: re-pointed
    # when it is updated, deleted with it. Rows a dispatcher holds are re-pointed too, and
    # their lease given back: the dispatcher claims them again, sees that they changed and
    # sends the new ones (see Dispatcher._dispatch); a deleted subscription's rows it holds
    # are dropped by Dispatcher.forget.
    def repoint(
        self,
        conn: Conn,
        tenant: str,
        sid: str,
        to: Callable[[str, dict[str, Any]], tuple[str, dict[str, Any]]],
    ) -> int:
        """Give each pending row of a subscription the endpoint and payload ``to(endpoint,
        payload)`` returns, using the caller's open transaction; changed rows are due now and
        no longer leased. Returns how many rows changed."""
        changed: list[tuple[int, str, str, str]] = []  # seq, old endpoint, new endpoint, payload
        # a dispatcher's claims skip (SKIP LOCKED) what this transaction changes until it ends
        lock = " FOR UPDATE" if self.dialect == "postgres" else ""
        rows = _execute(
            conn,
            self.dialect,
            f"SELECT seq, endpoint, payload FROM {TABLE} WHERE tenant = ? "
            f"AND subscription_id = ?{lock}",
            [tenant, sid],
        ).fetchall()
        for seq, endpoint, raw in rows:
            payload = orjson.loads(raw)
            new_endpoint, new_payload = to(endpoint, payload)
            if (new_endpoint, new_payload) != (endpoint, payload):
                changed.append((seq, endpoint, new_endpoint, orjson.dumps(new_payload).decode()))
        _executemany(
            conn,
            self.dialect,
            f"UPDATE {TABLE} SET endpoint = ?, payload = ?, leased = 0, next_attempt = ? "
            "WHERE seq = ?",
            [(ep, payload, self.clock(), seq) for seq, _, ep, payload in changed],
        )
        with self._lock:
            c = self._counts.by_endpoint
            for _, old, new, _ in changed:
                if c[old] > 0:
                    c[old] -= 1
                c[new] += 1
        return len(changed)

    def drop_subscription(self, conn: Conn, tenant: str, sid: str) -> int:
        """Delete every pending row of a subscription, using the caller's open transaction."""
        return self._deleted(
            conn,
            f"DELETE FROM {TABLE} WHERE tenant = ? AND subscription_id = ? RETURNING endpoint",
            [tenant, sid],
        )

    # -- inspection -------------------------------------------------------------------------
    def recount(self) -> None:
        """Reset the in-process counts from the table (other processes enqueue too)."""
        with self.db.reading() as conn:
            rows = _execute(
                conn, self.dialect, f"SELECT endpoint, count(*) FROM {TABLE} GROUP BY endpoint"
            ).fetchall()
            if isinstance(conn, psycopg.Connection):
                conn.rollback()
        counts: Counter[str] = Counter({str(ep): int(n) for ep, n in rows})
        with self._lock:
            self._counts = _Counts(counts, sum(counts.values()))

    def present(self, seqs: Sequence[int]) -> set[int]:
        """Which of ``seqs`` the table still holds."""
        if not seqs:
            return set()
        cond, params = _in_list(self.dialect, "seq", seqs)
        with self.db.reading() as conn:
            rows = _execute(conn, self.dialect, f"SELECT seq FROM {TABLE} WHERE {cond}", params)
            found = {int(r[0]) for r in rows.fetchall()}
            if isinstance(conn, psycopg.Connection):
                conn.rollback()
        return found

    def pending(self) -> int:
        """How many rows the table holds (an exact count)."""
        with self.db.reading() as conn:
            row = _execute(conn, self.dialect, f"SELECT count(*) FROM {TABLE}").fetchone()
            if isinstance(conn, psycopg.Connection):
                conn.rollback()
        return int(row[0])

    def pending_estimate(self, endpoint: str | None = None) -> int:
        """The in-process count (of one endpoint, or of all)."""
        with self._lock:
            if endpoint is None:
                return self._counts.total
            return self._counts.by_endpoint[endpoint]

    def items(self) -> list[OutboxItem]:
        """Every row, in seq order (for tests and administration; not for large outboxes)."""
        with self.db.reading() as conn:
            rows = _execute(
                conn, self.dialect, f"SELECT {_COLUMNS} FROM {TABLE} ORDER BY seq"
            ).fetchall()
            if isinstance(conn, psycopg.Connection):
                conn.rollback()
        return [_item(r) for r in rows]
