"""The tamper-evident audit log: a hash chain of audit records, sealed with an HMAC key.

Every record has a contiguous ``seq``, the hash of the record before it (``prev_hash``) and
its own ``hash = sha256(prev_hash + canonical JSON of its fields)``. Editing, deleting,
inserting or reordering records breaks the chain. Someone with database access could still
recompute the chain from some record on; seals, ``HMAC-SHA256(key, "seq:hash")`` rows written
every ``seal_every`` records, every ``seal_interval_s`` seconds and on close, make that
detectable as long as the key is kept away from the database. Deleting the seals would undo
that, so verification requires a seal on every record whose seq is a multiple of the
``seal_every`` its writer used; writers record that number (HMAC'd, in ``audit_seal_policy``)
whenever it changes, so a changed setting, or processes with different settings sharing a
log, do not look like tampering.

Records go to their own SQLite file or to tables in a PostgreSQL schema. A background thread
writes them in group commits; each commit locks the chain head (``BEGIN IMMEDIATE`` /
a transaction-scoped advisory lock), so several processes may share one log. Create the log
in each process after forking: the writer is a thread.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import hmac
import itertools
import logging
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import orjson
import psycopg
from psycopg.rows import TupleRow

from cityward.bank.model import INSTANT_FORMAT, epoch_of, now_iso
from cityward.governance.events import AuditRecord

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
HASHED_FIELDS = (
    "seq",
    "ts",
    "action",
    "actor",
    "role",
    "purposes",
    "method",
    "path",
    "entity_ids",
    "count",
    "result",
    "detail",
    "extra",
)
COLUMNS = (*HASHED_FIELDS, "prev_hash", "hash")
MAX_QUERY_LIMIT = 1000
_COLS = ", ".join(COLUMNS)
_JSON_COLS = ("purposes", "entity_ids", "extra")
_PG_LOCK = 74110002  # the bank's migrations use 74110001
_VERIFY_CHUNK = 5000
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\?")


class AuditLogClosed(RuntimeError):
    """A record arrived after ``close()``, or was still unwritten when close gave up."""


class AuditBacklogFull(RuntimeError):
    """The write queue stayed full (the database is down or far too slow)."""


# -- the chain ------------------------------------------------------------------------------
def canonical_json(value: object) -> bytes:
    """The one serialisation record hashes are computed over (sorted keys, compact)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def record_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the HASHED_FIELDS of ``fields``), hex."""
    body = {k: fields[k] for k in HASHED_FIELDS}
    return hashlib.sha256(prev_hash.encode() + canonical_json(body)).hexdigest()


def seal_mac(key: bytes, seq: int, hash_: str) -> str:
    """HMAC-SHA256(key, "seq:hash"), hex."""
    return hmac.new(key, f"{seq}:{hash_}".encode(), hashlib.sha256).hexdigest()


def policy_mac(key: bytes, from_seq: int, every: int) -> str:
    """HMAC-SHA256(key, "every:from_seq:every"), hex: from record from_seq on, seal_every."""
    # the "every:" prefix keeps these apart from seal MACs, whose text starts with a digit
    return hmac.new(key, f"every:{from_seq}:{every}".encode(), hashlib.sha256).hexdigest()


def norm_bound(ts: str | None) -> str | None:
    """A since/until bound in the stored format, so string comparison is time comparison.

    Raises ValueError for a malformed time, or one that is out of range in UTC.
    """
    if not ts:
        return None
    try:
        dt = datetime.fromisoformat(ts)
    except ValueError as exc:
        raise ValueError(f"{ts!r} is not an ISO 8601 date or time") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        dt = dt.astimezone(UTC)
    except OverflowError as exc:  # 0001-01-01T00:00+05:00 lies before year 1 in UTC
        raise ValueError(f"{ts!r} is out of range in UTC") from exc
    # %Y does not pad years before 1000 to four digits, and "999-" sorts after "2024-"
    return dt.strftime(INSTANT_FORMAT.replace("%Y", f"{dt.year:04d}"))


# -- records as they are queued ---------------------------------------------------------------
def _text(value: object) -> str:
    s = str(value)
    if "\x00" in s:  # PostgreSQL text cannot hold NUL; both backends must store the same
        s = s.replace("\x00", "\ufffd")
    try:
        s.encode()
    except UnicodeEncodeError:  # lone surrogates: neither database nor orjson take them
        s = s.encode(errors="replace").decode()
    return s


def _texts(values: str | Iterable[object]) -> list[str]:
    if isinstance(values, str):  # a lone purpose passed without its tuple
        return [_text(values)]
    return [_text(v) for v in values]


def _int64(value: int) -> int:
    return max(_INT64_MIN, min(_INT64_MAX, int(value)))


def _plain(extra: object) -> dict[str, Any]:
    """``extra`` as it reads back from JSON, so the writer hashes what verify will see."""
    if not extra:
        return {}
    value = dict(extra) if isinstance(extra, Mapping) else {"value": extra}
    try:
        out = orjson.loads(orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS))
    except Exception:  # a bad detail must not cost the record
        out = {"unserializable": _text(repr(value))}
    return out  # type: ignore[no-any-return]


@dataclass(slots=True)
class _Item:
    fields: dict[str, Any]  # the hashed fields but seq
    purposes: str  # the JSON texts stored
    entity_ids: str
    extra: str
    entities: list[str]
    waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None


def _prepare(
    rec: AuditRecord, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None
) -> _Item:
    purposes = _texts(rec.purposes)
    entity_ids = _texts(rec.entity_ids)
    extra = _plain(rec.extra)
    fields: dict[str, Any] = {
        "ts": _text(rec.ts) if rec.ts else now_iso(),
        "action": _text(rec.action),
        "actor": _text(rec.actor),
        "role": _text(rec.role),
        "purposes": purposes,
        "method": _text(rec.method),
        "path": _text(rec.path),
        "entity_ids": entity_ids,
        "count": _int64(rec.count),
        "result": _int64(rec.result),
        "detail": _text(rec.detail),
        "extra": extra,
    }
    return _Item(
        fields,
        orjson.dumps(purposes).decode(),
        orjson.dumps(entity_ids).decode(),
        orjson.dumps(extra).decode(),
        list(dict.fromkeys(entity_ids)),
        waiter,
    )


def _row_dict(row: Sequence[Any]) -> dict[str, Any]:
    out = dict(zip(COLUMNS, row, strict=True))
    for col in _JSON_COLS:
        with suppress(orjson.JSONDecodeError, TypeError):  # tampered rows still show
            out[col] = orjson.loads(out[col])
    return out


def _resolve(futures: list[asyncio.Future[None]], exc: BaseException | None) -> None:
    for fut in futures:
        if not fut.done():
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)


# -- backends -------------------------------------------------------------------------------
class _Db(Protocol):
    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None: ...

    def entity_rows(self, table: str, rows: Sequence[tuple[str, int]]) -> None: ...


class _Backend(Protocol):
    records: str
    entities: str
    seals: str
    policy: str

    def write_txn(self) -> AbstractContextManager[_Db]: ...

    def read(self) -> AbstractContextManager[_Db]: ...

    def reset(self) -> None: ...


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
  seq INTEGER PRIMARY KEY, ts TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
  role TEXT NOT NULL, purposes TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
  entity_ids TEXT NOT NULL, count INTEGER NOT NULL, result INTEGER NOT NULL,
  detail TEXT NOT NULL, extra TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_ts ON audit_records(ts);
CREATE INDEX IF NOT EXISTS audit_records_actor ON audit_records(actor, seq);
CREATE INDEX IF NOT EXISTS audit_records_action ON audit_records(action, seq);
CREATE TABLE IF NOT EXISTS audit_entities (
  entity_id TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (entity_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_seals (
  seq INTEGER PRIMARY KEY, hash TEXT NOT NULL, ts TEXT NOT NULL, mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_seal_policy (
  from_seq INTEGER PRIMARY KEY, every INTEGER NOT NULL, ts TEXT NOT NULL, mac TEXT NOT NULL
);
"""

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}audit_records (
  seq BIGINT PRIMARY KEY, ts TEXT NOT NULL, action TEXT NOT NULL, actor TEXT NOT NULL,
  role TEXT NOT NULL, purposes TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL,
  entity_ids TEXT NOT NULL, count BIGINT NOT NULL, result BIGINT NOT NULL,
  detail TEXT NOT NULL, extra TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_ts ON {s}audit_records(ts);
CREATE INDEX IF NOT EXISTS audit_records_actor ON {s}audit_records(actor, seq);
CREATE INDEX IF NOT EXISTS audit_records_action ON {s}audit_records(action, seq);
CREATE TABLE IF NOT EXISTS {s}audit_entities (
  entity_id TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (entity_id, seq)
);
CREATE TABLE IF NOT EXISTS {s}audit_seals (
  seq BIGINT PRIMARY KEY, hash TEXT NOT NULL, ts TEXT NOT NULL, mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}audit_seal_policy (
  from_seq BIGINT PRIMARY KEY, every BIGINT NOT NULL, ts TEXT NOT NULL, mac TEXT NOT NULL
);
"""


class _SqliteDb:
    def entity_rows(self, table: str, rows: Sequence[tuple[str, int]]) -> None:
        self.many(f"INSERT OR IGNORE INTO {table} (entity_id, seq) VALUES (?, ?)", rows)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(sql, params)


class _SqliteBackend:
    records, entities, seals = "audit_records", "audit_entities", "audit_seals"
    policy = "audit_seal_policy"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer: sqlite3.Connection | None = None
        conn = self._connect()
        try:
            conn.executescript(_SQLITE_SCHEMA)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode: transactions are begun explicitly, IMMEDIATE for the writer
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # a committed audit record survives power loss
        return conn

    @contextmanager
    def write_txn(self) -> Iterator[_Db]:
        if self._writer is None:
            self._writer = self._connect()
        conn = self._writer
        # IMMEDIATE takes the write lock before the head is read: one chain across processes
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield _SqliteDb(conn)
        except BaseException:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[_Db]:
        conn = self._connect()
        try:
            yield _SqliteDb(conn)
        finally:
            conn.close()

    def reset(self) -> None:
        if self._writer is not None:
            with suppress(sqlite3.Error):
                self._writer.close()
            self._writer = None


class _PgDb:
    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self.conn = conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(_PLACEHOLDER.sub("%s", sql), params).fetchall()

    def many(self, sql: str, params: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(_PLACEHOLDER.sub("%s", sql), params)

    def entity_rows(self, table: str, rows: Sequence[tuple[str, int]]) -> None:
        # one statement for the whole batch: a record of a 100-entity write has 100 rows, and
        # a round trip per row costs ~2 ms of the audited request's wait
        self.conn.execute(
            f"INSERT INTO {table} (entity_id, seq) "
            "SELECT * FROM unnest(%s::text[], %s::bigint[]) ON CONFLICT DO NOTHING",
            [[e for e, _ in rows], [q for _, q in rows]],
        )


class _PostgresBackend:
    def __init__(self, url: str, schema: str) -> None:
        if not _IDENT.fullmatch(schema):
            raise ValueError(f"{schema!r} is not a plain SQL identifier")
        self.url = url
        self.schema = schema
        prefix = f'"{schema}".'
        self.records = prefix + "audit_records"
        self.entities = prefix + "audit_entities"
        self.seals = prefix + "audit_seals"
        self.policy = prefix + "audit_seal_policy"
        self._writer: psycopg.Connection[TupleRow] | None = None
        with self._connect() as conn, conn.transaction():
            # concurrent CREATE ... IF NOT EXISTS can still collide; starters take turns
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_LOCK])
            # CREATE SCHEMA needs the CREATE privilege even when the schema exists
            if not conn.execute(
                "SELECT 1 FROM pg_namespace WHERE nspname = %s", [schema]
            ).fetchone():
                conn.execute(f'CREATE SCHEMA "{schema}"')
            conn.execute(_PG_SCHEMA.format(s=prefix))

    def _connect(self) -> psycopg.Connection[TupleRow]:
        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=10, application_name="cityward-audit"
        )

    @contextmanager
    def write_txn(self) -> Iterator[_Db]:
        if self._writer is None or self._writer.closed:
            self._writer = self._connect()
        conn = self._writer
        with conn.transaction():
            # held until commit, so the head read next is the head we append to
            conn.execute("SELECT pg_advisory_xact_lock(%s)", [_PG_LOCK])
            yield _PgDb(conn)

    @contextmanager
    def read(self) -> Iterator[_Db]:
        with self._connect() as conn:
            yield _PgDb(conn)

    def reset(self) -> None:
        if self._writer is not None:
            with suppress(psycopg.Error):
                self._writer.close()
            self._writer = None


# -- the log --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of ``AuditLog.verify``.

    ``records`` counts the records found intact (up to the first bad one), ``seals`` all seals.
    """

    ok: bool
    records: int
    seals: int
    first_bad_seq: int | None
    reason: str


def verify_report(result: VerifyResult) -> str:
    """A verification result as text for people (the CLI)."""
    if result.ok:
        return f"Audit log OK: {result.reason}"
    return (
        f"Audit log TAMPERED at record {result.first_bad_seq}: {result.reason}\n"
        f"{result.records:,} records verified before that point; "
        f"{result.seals:,} seals in the log."
    )


class AuditLog:
    """The audit trail: queue records, let the writer thread chain and commit them.

    Construct with :meth:`sqlite` or :meth:`postgres`. Thread-safe; ``record`` is for asyncio.
    """

    def __init__(
        self,
        backend: _Backend,
        key: bytes,
        *,
        seal_every: int = 1000,
        seal_interval_s: float = 60.0,
        max_queue: int = 100_000,
        batch_max: int = 2000,
        full_timeout_s: float = 1.0,
    ) -> None:
        if len(key) < 16:
            raise ValueError("the audit key must have at least 16 bytes")
        if seal_every < 1 or seal_interval_s <= 0 or max_queue < 1 or batch_max < 1:
            raise ValueError("seal_every, seal_interval_s, max_queue and batch_max must be > 0")
        self._b = backend
        self._key = key
        self._seal_every = seal_every
        self._seal_interval = seal_interval_s
        self._max_queue = max_queue
        self._batch_max = batch_max
        self._full_timeout = full_timeout_s
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)  # the writer waits here
        self._progress = threading.Condition(self._lock)  # flushers and full producers wait here
        self._queue: deque[_Item] = deque()
        self._enqueued = 0
        self._committed = 0
        self._closed = False
        self._stopping = False
        self._final_seal = True
        self._abandon = threading.Event()
        self._seal_due: float | None = None  # monotonic time of the next time-based seal
        self._started = time.time()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()
        # the writer is a daemon thread; a forgotten close() must still write the queue
        atexit.register(self.close)

    @classmethod
    def sqlite(cls, path: Path, key: bytes, **options: Any) -> AuditLog:
        """A log in its own SQLite file (WAL), apart from the data bank's writer.

        ``options`` are those of the constructor (seal_every, seal_interval_s, ...).
        """
        return cls(_SqliteBackend(path), key, **options)

    @classmethod
    def postgres(cls, url: str, key: bytes, schema: str = "public", **options: Any) -> AuditLog:
        """A log in tables ``audit_records``, ``audit_entities``, ``audit_seals`` of ``schema``."""
        return cls(_PostgresBackend(url, schema), key, **options)

    # -- writing --------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Records queued and not yet committed."""
        with self._lock:
            return len(self._queue)

    def record_nowait(self, rec: AuditRecord) -> None:
        """Queue ``rec`` and return; it is committed shortly after.

        Never waits for I/O, but when ``max_queue`` records are already waiting (the database
        is down) it blocks up to ``full_timeout_s`` for room and then raises
        :class:`AuditBacklogFull` rather than drop the record. Raises :class:`AuditLogClosed`
        after ``close()``.
        """
        if not self._put(_prepare(rec, None), self._full_timeout):
            raise AuditBacklogFull(f"{self._max_queue} audit records are waiting to be written")

    async def record(self, rec: AuditRecord) -> None:
        """Queue ``rec`` and wait until it is committed (concurrent callers share commits).

        While the database is down this waits until it is back; cancelling the wait does not
        withdraw the record.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        item = _prepare(rec, (loop, fut))
        if not self._put(item, 0.0) and not await asyncio.to_thread(
            self._put, item, self._full_timeout
        ):
            raise AuditBacklogFull(f"{self._max_queue} audit records are waiting to be written")
        await fut

    def _put(self, item: _Item, timeout: float) -> bool:
        with self._lock:
            deadline = time.monotonic() + timeout
            while True:
                if self._closed:
                    raise AuditLogClosed("the audit log is closed")
                if len(self._queue) < self._max_queue:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)
            self._queue.append(item)
            self._enqueued += 1
            self._not_empty.notify()
            return True

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until every record queued before the call is committed.

        Raises TimeoutError after ``timeout`` seconds (None: wait as long as it takes).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self._enqueued
            while self._committed < target:
                if not self._thread.is_alive():
                    raise AuditLogClosed(
                        f"the audit writer stopped with {len(self._queue)} unwritten"
                    )
                wait = 1.0  # re-check that the writer lives; commits notify sooner
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"{target - self._committed} audit records unwritten after {timeout} s"
                        )
                    wait = min(wait, remaining)
                self._progress.wait(wait)

    def close(self, seal: bool = True, timeout: float = 30.0) -> None:
        """Write what is queued, seal the chain's end (unless ``seal=False``), stop the writer.

        Idempotent. If the queue cannot be written within ``timeout`` the rest is logged as
        lost and its ``record`` awaiters get :class:`AuditLogClosed`.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._final_seal = seal
        atexit.unregister(self.close)
        try:
            self.flush(timeout)
        except (TimeoutError, AuditLogClosed) as exc:
            log.error("closing the audit log with %d records unwritten: %s", self.pending, exc)
            self._abandon.set()
        with self._lock:
            self._stopping = True
            self._not_empty.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the audit writer did not stop within %s s", timeout)
            self._abandon.set()
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        self._wake(left, AuditLogClosed("the audit log closed before this record was written"))

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        failures = 0
        while not self._abandon.is_set():
            with self._lock:
                while not self._queue and not self._stopping:
                    wait = None
                    if self._seal_due is not None:
                        wait = self._seal_due - time.monotonic()
                        if wait <= 0:
                            break
                    self._not_empty.wait(wait)  # woken by _put as soon as a record arrives
                batch = list(itertools.islice(self._queue, self._batch_max))
                final = self._stopping and not batch
            try:
                if batch:
                    self._write_batch(batch)
                elif not final or self._final_seal:
                    self._seal_now(force=final)
            except Exception as exc:
                failures += 1
                self._b.reset()
                if final:
                    log.error("the closing seal of the audit log was not written", exc_info=True)
                    break
                # records stay queued: they are written in order once the database is back
                delay = min(5.0, 0.05 * 2 ** min(failures - 1, 7))
                if failures == 1:
                    log.error(
                        "writing the audit log failed; %d records kept, retrying",
                        self.pending,
                        exc_info=True,
                    )
                else:
                    log.error(
                        "writing the audit log failed %d times (retry in %.1f s): %s",
                        failures,
                        delay,
                        exc,
                    )
                self._abandon.wait(delay)
                continue
            if failures:
                log.warning("audit log writes resumed after %d failures", failures)
                failures = 0
            if batch:
                with self._lock:
                    for _ in batch:
                        self._queue.popleft()
                    self._committed += len(batch)
                    self._progress.notify_all()
                self._wake(batch, None)
            if final:
                break
        self._b.reset()

    @staticmethod
    def _wake(items: list[_Item], exc: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for it in items:
            if it.waiter is not None:
                by_loop.setdefault(it.waiter[0], []).append(it.waiter[1])
        for loop, futures in by_loop.items():
            with suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, futures, exc)

    def _head(self, db: _Db) -> tuple[int, str, int, str | None, int | None]:
        """(last seq, its hash, last sealed seq, that seal's ts, the seal_every in force).

        Read under the write lock, in one statement (one round trip on PostgreSQL).
        """
        r, s, p = self._b.records, self._b.seals, self._b.policy
        (seq, hash_, seal_seq, seal_ts, every) = db.rows(
            f"SELECT (SELECT seq FROM {r} ORDER BY seq DESC LIMIT 1), "
            f"(SELECT hash FROM {r} ORDER BY seq DESC LIMIT 1), "
            f"(SELECT seq FROM {s} ORDER BY seq DESC LIMIT 1), "
            f"(SELECT ts FROM {s} ORDER BY seq DESC LIMIT 1), "
            f"(SELECT every FROM {p} ORDER BY from_seq DESC LIMIT 1)"
        )[0]
        return (
            int(seq or 0),
            GENESIS_HASH if hash_ is None else str(hash_),
            int(seal_seq or 0),
            seal_ts,
            None if every is None else int(every),
        )

    def _write_batch(self, batch: list[_Item]) -> None:
        """Append ``batch`` to the chain, and its seals, in one transaction."""
        with self._b.write_txn() as db:
            head_seq, head_hash, seal_seq, seal_ts, every = self._head(db)
            if every != self._seal_every:
                # verify demands a seal on every multiple of the seal_every each record was
                # written under: say which one applies from here on (checked on each batch, as
                # other processes may share the log with another setting)
                first = head_seq + 1
                db.many(
                    f"INSERT INTO {self._b.policy} (from_seq, every, ts, mac) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [
                        (
                            first,
                            self._seal_every,
                            now_iso(),
                            policy_mac(self._key, first, self._seal_every),
                        )
                    ],
                )
            rows: list[tuple[Any, ...]] = []
            entity_rows: list[tuple[str, int]] = []
            hashes: list[str] = []
            prev = head_hash
            for seq, it in enumerate(batch, head_seq + 1):
                f = it.fields
                h = record_hash(prev, {**f, "seq": seq})
                rows.append(
                    (
                        seq,
                        f["ts"],
                        f["action"],
                        f["actor"],
                        f["role"],
                        it.purposes,
                        f["method"],
                        f["path"],
                        it.entity_ids,
                        f["count"],
                        f["result"],
                        f["detail"],
                        it.extra,
                        prev,
                        h,
                    )
                )
                entity_rows.extend((e, seq) for e in it.entities)
                hashes.append(h)
                prev = h
            marks = ", ".join("?" * len(COLUMNS))
            db.many(f"INSERT INTO {self._b.records} ({_COLS}) VALUES ({marks})", rows)
            if entity_rows:
                db.entity_rows(self._b.entities, entity_rows)
            last = head_seq + len(batch)
            self._add_seals(
                db, head_seq + 1, last, lambda s: hashes[s - head_seq - 1], seal_seq, seal_ts, False
            )

    def _seal_now(self, force: bool) -> None:
        """Seal the chain's end if it is due (or ``force``) and not sealed yet."""
        with self._b.write_txn() as db:
            head_seq, head_hash, seal_seq, seal_ts, _ = self._head(db)
            self._add_seals(
                db, head_seq + 1, head_seq, lambda _: head_hash, seal_seq, seal_ts, force
            )

    def _add_seals(
        self,
        db: _Db,
        first: int,
        last: int,
        hash_of: Callable[[int], str],
        seal_seq: int,
        seal_ts: str | None,
        force: bool,
    ) -> None:
        """Seal every multiple of seal_every in first..last, and the end when due or forced."""
        every = self._seal_every
        start = -(-first // every) * every
        points = [s for s in range(start, last + 1, every) if s > seal_seq]
        top = points[-1] if points else seal_seq
        sealed_at = self._started if seal_ts is None else (epoch_of(seal_ts) or 0.0)
        overdue = time.time() - sealed_at >= self._seal_interval
        if last > top and (force or (not points and overdue)):
            points.append(last)
        if points:
            now = now_iso()
            db.many(
                f"INSERT INTO {self._b.seals} (seq, hash, ts, mac) VALUES (?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",  # a seal left beyond a truncated tail stays as evidence
                [(s, hash_of(s), now, seal_mac(self._key, s, hash_of(s))) for s in points],
            )
            top, sealed_at = points[-1], time.time()
        if last > top:
            wait = self._seal_interval - (time.time() - sealed_at)
            self._seal_due = time.monotonic() + max(0.0, wait)
        else:
            self._seal_due = None

    # -- reading --------------------------------------------------------------------------
    def query(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        entity: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Committed records matching every filter given, by seq, at most 1,000.

        ``since`` is inclusive, ``until`` exclusive (ISO 8601; without a zone means UTC);
        ``entity`` matches records whose entity_ids contain that id; page with ``after_seq``.
        Raises ValueError for a malformed time.
        """
        where: list[str] = ["seq > ?"]
        params: list[object] = [after_seq]
        bounds = (("ts >= ?", norm_bound(since)), ("ts < ?", norm_bound(until)))
        filters = (*bounds, ("actor = ?", actor), ("action = ?", action))
        for cond, value in filters:
            if value is not None:
                where.append(cond)
                params.append(_text(value))
        if entity is not None:
            where.append(f"seq IN (SELECT seq FROM {self._b.entities} WHERE entity_id = ?)")
            params.append(_text(entity))
        limit = max(0, min(limit, MAX_QUERY_LIMIT))
        if limit == 0:
            return []
        sql = (
            f"SELECT {_COLS} FROM {self._b.records} WHERE {' AND '.join(where)} "
            "ORDER BY seq LIMIT ?"
        )
        with self._b.read() as db:
            return [_row_dict(r) for r in db.rows(sql, [*params, limit])]

    def verify(self) -> VerifyResult:
        """Check the chain and the seals, streaming records in seq order.

        ``first_bad_seq`` names the first missing, edited, out-of-chain or wrongly sealed
        record, or the first that lacks the seal its writer puts on every multiple of its
        seal_every; for a truncated tail, the first record missing before a surviving seal.

        Which seal_every a record was written under is in ``audit_seal_policy``. Records
        older than that table (logs written before it existed) have no entry: the ones after
        the last seal are held to this log's seal_every, since nothing else vouches for them;
        the ones below it are vouched for by that seal through the chain.
        """
        with self._b.read() as db:
            # seals and seal intervals first: they commit with their records, so records read
            # later include them
            seals = {
                int(s): (str(h), str(m))
                for s, h, m in db.rows(f"SELECT seq, hash, mac FROM {self._b.seals} ORDER BY seq")
            }
            policy = db.rows(f"SELECT from_seq, every, mac FROM {self._b.policy} ORDER BY from_seq")
            n_seals = len(seals)
            last_seal = max(seals, default=0)
            sql = f"SELECT {_COLS} FROM {self._b.records} WHERE seq > ? ORDER BY seq LIMIT ?"
            prev_seq, prev_hash = 0, GENESIS_HASH
            every: int | None = None  # the seal_every the record being read was written under
            n_policy = 0  # policy rows consumed

            def bad(seq: int, reason: str) -> VerifyResult:
                return VerifyResult(False, prev_seq, n_seals, seq, reason)

            # the entity index (what ``entity=`` searches) is outside the chain: each chunk's
            # index rows must be exactly its records' ids, or a deleted row hid a record from
            # ``GET /audit?entity=`` while verify said the log was whole
            index_sql = f"SELECT entity_id, seq FROM {self._b.entities} WHERE seq > ? AND seq <= ?"
            while chunk := db.rows(sql, [prev_seq, _VERIFY_CHUNK]):
                first_seq = prev_seq
                indexed = {
                    (str(e), int(q)) for e, q in db.rows(index_sql, [first_seq, int(chunk[-1][0])])
                }
                expected: set[tuple[str, int]] = set()
                for row in chunk:
                    rec = dict(zip(COLUMNS, row, strict=True))
                    seq = int(rec["seq"])
                    if seq != prev_seq + 1:
                        return bad(
                            prev_seq + 1,
                            f"Record {prev_seq + 1} is missing (the next one is {seq}): "
                            "records were deleted.",
                        )
                    try:
                        for col in _JSON_COLS:
                            rec[col] = orjson.loads(rec[col])
                        intact = record_hash(str(rec["prev_hash"]), rec) == rec["hash"]
                    except (orjson.JSONDecodeError, TypeError):
                        intact = False
                    if not intact:
                        return bad(seq, f"Record {seq} does not match its hash: it was edited.")
                    if rec["prev_hash"] != prev_hash:
                        return bad(
                            seq,
                            f"Record {seq} does not link to record {seq - 1}: records were "
                            "inserted, reordered or rewritten.",
                        )
                    while n_policy < len(policy) and int(policy[n_policy][0]) <= seq:
                        from_seq, raw, mac = policy[n_policy]
                        n_policy += 1
                        # a forged interval could excuse missing seals: it must carry the MAC
                        valid = (
                            isinstance(raw, int)
                            and raw >= 1
                            and hmac.compare_digest(
                                str(mac).encode(),
                                policy_mac(self._key, int(from_seq), raw).encode(),
                            )
                        )
                        if not valid:
                            return bad(
                                seq,
                                f"The seal interval recorded from record {from_seq} on has a "
                                "wrong MAC: it was forged or made with another key.",
                            )
                        every = raw
                    seal = seals.get(seq)
                    if seal is not None:
                        mac = seal_mac(self._key, seq, seal[0])
                        if not hmac.compare_digest(seal[1].encode(), mac.encode()):
                            return bad(
                                seq,
                                f"The seal of record {seq} has a wrong MAC: it was forged or "
                                "made with another key.",
                            )
                        if seal[0] != rec["hash"]:
                            return bad(
                                seq,
                                f"Record {seq} differs from what its seal vouches for: the chain "
                                "was rewritten up to here without the key.",
                            )
                    else:
                        need = every
                        if need is None and seq > last_seal:
                            need = self._seal_every
                        if need is not None and seq % need == 0:
                            return bad(
                                seq,
                                f"Record {seq} has no seal, although one is written every "
                                f"{need:,} records: seals were deleted"
                                + (
                                    f", and the records from {last_seal + 1} on may have been "
                                    "rewritten."
                                    if seq > last_seal
                                    else "."
                                ),
                            )
                    prev_seq, prev_hash = seq, str(rec["hash"])
                    expected.update((str(e), seq) for e in rec["entity_ids"])
                if indexed != expected:
                    seq = min(q for _, q in indexed ^ expected)
                    return VerifyResult(
                        False,
                        seq - 1,
                        n_seals,
                        seq,
                        f"The entity index of record {seq} differs from the entity ids the "
                        "record holds: the index was edited, and searches by entity miss or "
                        "invent records.",
                    )
            stray = db.rows(f"SELECT min(seq) FROM {self._b.entities} WHERE seq > ?", [prev_seq])
            if stray and stray[0][0] is not None:
                return bad(
                    int(stray[0][0]),
                    f"The entity index names record {int(stray[0][0])}, which does not exist.",
                )
        if any(s < 1 for s in seals):
            return bad(min(seals), f"A seal names record {min(seals)}, which cannot exist.")
        beyond = [s for s in seals if s > prev_seq]
        if beyond:
            far = max(beyond)
            return bad(
                prev_seq + 1,
                f"The log ends at record {prev_seq} but a seal vouches for record {far}: "
                f"records {prev_seq + 1} to {far} at least were deleted.",
            )
        if n_policy < len(policy):  # written in the same transaction as its first record
            far = int(policy[-1][0])
            return bad(
                prev_seq + 1,
                f"The log ends at record {prev_seq} but a seal interval was recorded with record "
                f"{far}: records {prev_seq + 1} to {far} at least were deleted.",
            )
        reason = f"{prev_seq:,} records form an unbroken chain and all {n_seals:,} seals are valid"
        if prev_seq > last_seal:
            reason += f"; the newest {prev_seq - last_seal:,} records are not sealed yet"
        return VerifyResult(True, prev_seq, n_seals, None, reason + ".")
