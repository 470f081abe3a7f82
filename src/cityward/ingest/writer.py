"""The batching writer: every adapter's readings go into the bank through one of these.

Readings queue up (at most ``max_pending``: a full queue makes :meth:`BatchWriter.put` wait,
which is the backpressure the adapters pass on: an MQTT adapter stops reading its socket, so
the broker keeps the messages; an HTTP push waits). A writer thread takes up to
``batch_size`` of them, or what came within ``max_delay_ms`` of the first, and writes them in
one bank transaction; only after the commit does it tell each reading's adapter, which then
acknowledges the delivery (MQTT PUBACK, the HTTP response). A process killed before the commit
leaves the messages unacknowledged at the broker, which delivers them again.

Exactly once: every reading carries a key (source, the device's message id or its entity and
observation time). Inside the write transaction the keys are inserted into ``ingest_keys``
with ``ON CONFLICT DO NOTHING RETURNING``; a reading whose key was there already is a repeat
and is left out. The keys commit with the readings or not at all, so a crash between the
commit and the acknowledgement makes the redelivery a no-op rather than a second reading.

Keys are forgotten ``dedupe_window_s`` after the newest key, not after the clock: a worker that
was down for a day still knows, when it starts, the keys of what it wrote just before it
stopped (the ones a broker redelivers). They are forgotten a bounded step at a time, every
second: a once-a-minute purge of a minute's keys held the write lock for 1.5 s at 20,000
readings/s (4.8 s with keys of entity and time), and every reading waited behind it.

A reading the database refuses for its data (a PostgreSQL ``DataError`` or
``ProgramLimitExceeded``: a text it cannot store or index), which no retry changes, fails
alone: the bank writes the batch's halves apart until that reading is alone (StoreRefused,
Bank._write_batch), and it becomes a dead letter while the rest are written. Any other failure
(locked, unreachable, disk full) is retried with back-off.

A batch with several readings of one entity is written in rounds, one reading per entity per
round: the bank records every item of a batch (each gets its own change), but it answers
refusals per entity id, so a reading it refuses would take its entity's other readings of the
same round with it.

Several writers on one PostgreSQL database (``entity_locks``, the JetStream writers of
cityward.ingest.jetstream) first take a transaction advisory lock per entity, in one order
(``WriteTxn.lock_entities``): two writers of one entity then take turns. The store's
``get_many`` takes the same locks for every PostgreSQL write (those the transaction does not
hold yet); the writers take them earlier, before the delivery keys, so that two writers
holding the same readings (a redelivery beside the original) never insert each other's keys
in crossing orders.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cityward.bank.errors import NgsiError
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.bank.store.base import MIGRATION_LOCK
from cityward.ingest.settings import WriterSettings

log = logging.getLogger("cityward.ingest")
Doc = dict[str, Any]

KEYS_SQL = (
    "CREATE TABLE IF NOT EXISTS ingest_keys ("
    " source TEXT NOT NULL, key TEXT NOT NULL, at BIGINT NOT NULL,"
    " PRIMARY KEY (source, key))",
    "CREATE INDEX IF NOT EXISTS ingest_keys_at ON ingest_keys (at)",
    "CREATE TABLE IF NOT EXISTS ingest_meta (k TEXT PRIMARY KEY, v BIGINT NOT NULL)",
)
# Keys made of an entity and an observation time were "t:<entity id>@<time>" before 2026-11-24
# and are "o:<time>@<entity id>" now (cityward.ingest.mapping). A bank whose key table was
# started before has "legacy_until" in ingest_meta: the newest key then. Until the keys up to
# it are forgotten, a new key is also looked up in the earlier form (a redelivery of a message
# stored before the upgrade is still a repeat). "form" marks a key table as of the new form.
_META_FORM = (
    "SELECT (SELECT v FROM ingest_meta WHERE k = 'form'), (SELECT max(at) FROM ingest_keys)"
)
_MARK_FORM = "INSERT INTO ingest_meta (k, v) VALUES ('form', 2)"
_MARK_LEGACY = "INSERT INTO ingest_meta (k, v) VALUES ('legacy_until', ?)"
_LEGACY_UNTIL = "SELECT v FROM ingest_meta WHERE k = 'legacy_until'"
# rows per INSERT statement (3 parameters each; SQLite allows 32,766 parameters)
_KEY_CHUNK = 2000
# forgetting old keys: a step at most every PURGE_EVERY_S, of at most PURGE_ROWS keys (while
# older keys are left, a step follows every batch: up to 100,000 keys a second at 10 batches)
PURGE_EVERY_S = 1.0
PURGE_ROWS = 10_000

#: what an adapter is told once its reading is settled: None when it is in the bank (or was
#: already), otherwise "field: reason" why it was refused (it is then a dead letter)
Done = Callable[[str | None], None]


class Refusal(str):
    """The outcome of a reading the bank refused: reads "field: the bank refused it: why"
    (what ``done`` is told) and keeps both parts (a front process is sent them)."""

    field: str
    why: str

    def __new__(cls, field: str, why: str) -> Refusal:
        self = super().__new__(cls, f"{field}: {refusal_reason(why)}")
        self.field = field
        self.why = why
        return self


def refusal_reason(why: str) -> str:
    """The dead letter's reason for a reading the bank refused."""
    return f"the bank refused it: {why}"


@dataclass(slots=True)
class Reading:
    source: str
    key: str
    fragment: Doc  # stored form (expanded), as EntityParser makes it
    done: Done | None = None
    raw: bytes = b""  # for the dead-letter store, should the bank refuse it
    topic: str = ""
    # the pushing request's write check (an HTTP push): run again, inside the write, against
    # the types the entity already has; None for the adapters that write as the platform
    check: Callable[[str, list[str]], NgsiError | None] | None = None


@dataclass
class WriterStats:
    received: int = 0
    written: int = 0
    duplicates: int = 0
    refused: int = 0
    batches: int = 0
    write_failures: int = 0
    waits: int = 0  # puts that had to wait for room (backpressure)
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def create_tables(store: Store) -> int | None:
    """The key table, in the bank's own database (its rows commit with the readings); returns
    the time up to which keys may be of the earlier form (``legacy_until``), if any."""
    if store.dialect == "sqlite":
        import sqlite3

        conn = sqlite3.connect(Path(store.path), isolation_level=None)  # type: ignore[attr-defined]
        try:
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("BEGIN IMMEDIATE")
            until = _key_form(lambda sql, p=(): conn.execute(sql, p).fetchone())
            conn.execute("COMMIT")
        finally:
            conn.close()
        return until
    from cityward.bank.store.postgres import to_pg

    with store.pool.connection() as pg:  # type: ignore[attr-defined]
        # one node at a time: concurrent CREATE TABLE IF NOT EXISTS race in the catalog
        pg.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")

        def one(sql: str, params: Sequence[Any] = ()) -> Any:
            cur = pg.execute(to_pg(sql), params)
            return cur.fetchone() if cur.description is not None else None

        return _key_form(one)


def _key_form(one: Callable[..., Any]) -> int | None:
    """Create the key tables and mark their key form (KEYS_SQL, _META_FORM) through ``one``
    (runs a statement, returns its first row or None); returns ``legacy_until``."""
    for sql in KEYS_SQL:
        one(sql)
    form, newest = one(_META_FORM)
    if form is None:
        if newest is not None:
            one(_MARK_LEGACY, [newest])
        one(_MARK_FORM)
    until = one(_LEGACY_UNTIL)
    return None if until is None else int(until[0])


class ReadingQueue:
    """A bounded FIFO of readings whose :meth:`put_many` adds a whole list under one lock.

    queue.Queue takes its lock and wakes the consumer once per item: a front process hands
    over thousands of readings a second, and each of those wake-ups was a GIL hand-over
    between the thread that receives them and the writer thread.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Reading] = deque()
        self.taken = 0  # readings of the last batch taken, until done() (see Batcher.pending)
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)

    def qsize(self) -> int:
        return len(self._items)

    def put_many(self, readings: Sequence[Reading], timeout: float | None = None) -> int:
        """Queue ``readings`` in order, waiting while the queue is full; returns how many were
        queued (fewer only when ``timeout`` ran out)."""
        done, n = 0, len(readings)
        deadline = None if timeout is None else time.monotonic() + timeout
        items = self._items
        with self._not_full:
            while done < n:
                room = self.maxsize - len(items)
                if room <= 0:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._not_full.wait(left)
                    continue
                items.extend(readings[done : done + room])
                done += min(room, n - done)
                self._not_empty.notify()
        return done

    def get_batch(self, size: int, wait_s: float, linger_s: float) -> list[Reading]:
        """Up to ``size`` readings: waits up to ``wait_s`` for the first, then up to
        ``linger_s`` more for the batch to fill (empty: nothing came)."""
        items = self._items
        with self._not_empty:
            if not items:
                self._not_empty.wait(wait_s)
                if not items:
                    return []
            if len(items) < size and linger_s > 0:
                deadline = time.monotonic() + linger_s
                while len(items) < size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._not_empty.wait(left)
            n = min(size, len(items))
            batch = [items.popleft() for _ in range(n)]
            self.taken = n  # under the lock: a reading is always queued or taken
            self._not_full.notify_all()
        return batch

    def done(self) -> None:
        """The batch last taken is settled."""
        self.taken = 0


class Batcher(abc.ABC):
    """A bounded queue of readings and the thread that handles them a batch at a time: what
    the bank's :class:`BatchWriter` and a front's JetStream sink have in common.

    ``put`` waits while ``max_pending`` readings are queued (the adapters' backpressure); the
    thread takes up to ``batch_size`` of them, waiting up to ``linger_s`` after the first one
    for more, and hands them to :meth:`_handle`, which settles each one.
    """

    thread_name = "ingest-batches"

    def __init__(self, max_pending: int, stats: Any) -> None:
        self.stats = stats  # counts ``received`` and ``waits`` at least
        self._queue = ReadingQueue(max_pending)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stuck: threading.Thread | None = None  # see still_writing
        self._idle = threading.Condition()

    @abc.abstractmethod
    def _limits(self) -> tuple[int, float]:
        """(batch size, seconds to wait for a batch to fill after its first reading)."""

    @abc.abstractmethod
    def _handle(self, batch: list[Reading]) -> None:
        """Write or send one batch and settle each of its readings."""

    def _tick(self) -> None:
        """Between batches, and every 0.2 s while idle (housekeeping); nothing by default."""
        return None

    def _join_s(self, drain_s: float) -> float:
        return drain_s + 5

    # -- adapters' side ---------------------------------------------------------------------
    def put(self, reading: Reading, timeout: float | None = None) -> bool:
        """Queue a reading; waits while ``max_pending`` are queued (False: timed out)."""
        return self.put_many([reading], timeout) == 1

    def put_many(self, readings: Sequence[Reading], timeout: float | None = None) -> int:
        """Queue readings in order, waiting while the queue is full; returns how many were
        queued (fewer only if ``timeout`` ran out)."""
        if self._queue.qsize() + len(readings) > self._queue.maxsize:
            self.stats.waits += 1
        n = self._queue.put_many(readings, timeout)
        self.stats.received += n
        return n

    @property
    def pending(self) -> int:
        """Readings queued, or taken and not yet settled."""
        return self._queue.qsize() + self._queue.taken

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued reading is settled (tests, a clean stop)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.05))
        return True

    # -- the thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self.stuck = None
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    @property
    def still_writing(self) -> bool:
        """Whether stop() gave up on a thread that is still inside a write: its database
        connection must not be closed under it (closing it crashed the process, exit -11)."""
        return self.stuck is not None and self.stuck.is_alive()

    def stop(self, drain_s: float = 10.0) -> None:
        """Handle what is queued (for at most ``drain_s``), then stop. What is left is not
        acknowledged: the broker delivers it again after a restart."""
        self.wait_idle(drain_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._join_s(drain_s))
            if self._thread.is_alive():
                self.stuck = self._thread  # still inside a write (a locked or unreachable bank)
            self._thread = None

    def _run(self) -> None:
        size, linger_s = self._limits()
        while not self._stop.is_set():
            batch = self._queue.get_batch(size, 0.2, linger_s)
            if not batch:
                self._tick()
                continue
            try:
                self._handle(batch)
            finally:
                self._queue.done()
                with self._idle:
                    self._idle.notify_all()
            self._tick()


class BatchWriter(Batcher):
    """Writes readings into ``bank`` in batches, each reading once; see the module's text.

    ``refused`` is called with a reading the bank refused for good (a 4xx: the entity's type
    clashes, a device may not write it); the caller stores it as a dead letter.
    """

    def __init__(
        self,
        bank: Bank,
        settings: WriterSettings,
        *,
        tenant: str = "",
        refused: Callable[[Reading, str, str], None] | None = None,
        context: Callable[[], Any] | None = None,
        entity_locks: bool = False,
    ) -> None:
        self.bank = bank
        self.settings = settings
        self.tenant = tenant
        # only PostgreSQL has several writers at once (SQLite writes one transaction at a time)
        self._entity_locks = entity_locks and bank.store.dialect == "postgres"
        super().__init__(settings.max_pending, WriterStats())
        self.stats: WriterStats
        self._refused = refused
        self._context = context  # a context manager factory the writes run in (governance)
        self._purged_at = 0.0
        self._purge_behind = False  # the last step left keys past the window
        # keys up to this time may be of the earlier form (KEYS_SQL); None: there are none
        self._legacy_until = create_tables(bank.store)

    thread_name = "ingest-writer"

    def _limits(self) -> tuple[int, float]:
        return self.settings.batch_size, self.settings.max_delay_ms / 1000

    def _handle(self, batch: list[Reading]) -> None:
        self._write(batch)

    def _tick(self) -> None:
        self._maybe_purge()

    def _write(self, batch: list[Reading]) -> None:
        """Write one batch, retrying while the store fails; settle each reading."""
        unique: dict[tuple[str, str], Reading] = {}
        repeats: list[Reading] = []
        for r in batch:
            k = (r.source, r.key)
            if k in unique:
                repeats.append(r)
            else:
                unique[k] = r
        outcome: dict[int, str | None] = {}
        for chunk in _rounds(list(unique.values())):
            self._write_round(chunk, outcome)
            if self._stop.is_set() and any(id(r) not in outcome for r in chunk):
                return  # stopping while the store fails: leave the rest unacknowledged
        self.stats.duplicates += len(repeats)
        self.stats.batches += 1
        for r in batch:
            if r.done is not None:
                try:
                    r.done(outcome.get(id(r)))
                except Exception:
                    log.exception("ingest: acknowledging a reading of %s failed", r.source)

    def _write_round(self, readings: list[Reading], outcome: dict[int, str | None]) -> None:
        by_frag = {id(r.fragment): r for r in readings}
        fresh: set[int] = set()
        denied: dict[int, NgsiError] = {}  # id(fragment) -> the push's check of stored types
        checked = any(r.check is not None for r in readings)  # pushes only: not MQTT's path

        def gate(txn: WriteTxn, frags: list[Doc]) -> list[Doc]:
            # called again for the same readings when the write is retried, and for each half
            # of them when the bank writes halves apart (Bank._write_batch): what a call
            # decides replaces what an earlier one decided for those readings
            fresh.difference_update(id(f) for f in frags)
            if denied:
                for f in frags:
                    denied.pop(id(f), None)
            if self._entity_locks:
                # before the delivery keys (the module text says why)
                txn.lock_entities([f["id"] for f in frags])
            if checked:
                # a push may change an entity only if its token may write the types the
                # entity already has, as the NGSI-LD API checks them: the push checked the
                # mapping's type alone, so a template whose id the pusher shapes reached
                # another source's entity. No key is kept for a refused reading.
                stored = txn.get_many([f["id"] for f in frags])
                for f in frags:
                    check = by_frag[id(f)].check
                    prior = stored.get(f["id"])
                    err = (
                        None if check is None or prior is None else check(f["id"], prior[1]["type"])
                    )
                    if err is not None:
                        denied[id(f)] = err
                frags = [f for f in frags if id(f) not in denied]
            batch = [by_frag[id(f)] for f in frags]
            new = _insert_keys(txn, batch)
            if self._legacy_until is not None:
                new -= _legacy_repeats(txn, batch, new)
            keep = [f for f, r in zip(frags, batch, strict=True) if (r.source, r.key) in new]
            fresh.update(id(f) for f in keep)
            return keep

        attempt = 0
        while True:
            try:
                if self._context is not None:
                    with self._context():
                        result = self.bank.batch_upsert(
                            self.tenant, [r.fragment for r in readings], "update", gate=gate
                        )
                else:
                    result = self.bank.batch_upsert(
                        self.tenant, [r.fragment for r in readings], "update", gate=gate
                    )
                break
            except NgsiError as exc:
                if exc.status < 500:  # the tenant or the whole batch is refused: no retry helps
                    for r in readings:
                        self._refuse(r, exc.field or "$", str(exc), outcome)
                    return
                attempt = self._failed(exc, attempt)
            except Exception as exc:  # locked, unreachable, disk full: wait and try again
                attempt = self._failed(exc, attempt)
            if self._stop.is_set() and attempt > 3:
                return
        errors = {e["entityId"]: e["error"] for e in result.errors}
        for r in readings:
            eid = r.fragment["id"]
            if (err := denied.get(id(r.fragment))) is not None:
                self._refuse(r, err.field or "id", str(err), outcome)
            elif eid in errors:
                err = errors[eid]
                self._refuse(r, str(err.get("field") or "id"), str(err.get("detail", err)), outcome)
            elif id(r.fragment) in fresh:
                outcome[id(r)] = None
                self.stats.written += 1
            else:
                outcome[id(r)] = None
                self.stats.duplicates += 1

    def _refuse(self, r: Reading, where: str, why: str, outcome: dict[int, str | None]) -> None:
        self.stats.refused += 1
        outcome[id(r)] = Refusal(where, why)
        if self._refused is not None:
            self._refused(r, where, why)

    def _failed(self, exc: BaseException, attempt: int) -> int:
        attempt += 1
        self.stats.write_failures += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        delay = min(0.05 * 2**attempt, self.settings.retry_max_s)
        if attempt in (1, 3) or attempt % 20 == 0:
            log.warning(
                "ingest: writing a batch failed (attempt %d): %s; retrying in %.1f s",
                attempt,
                self.stats.last_error,
                delay,
            )
        self._stop.wait(delay)
        return attempt

    def _maybe_purge(self) -> None:
        """Forget keys more than the dedupe window older than the newest key, a step at most
        every PURGE_EVERY_S (at once while the last step left more); see the module text."""
        now = time.monotonic()
        if now - self._purged_at < PURGE_EVERY_S and not self._purge_behind:
            return
        self._purged_at = now
        try:
            self._purge_behind = self._purge_step(self.settings.dedupe_window_s)
        except Exception as exc:
            self._purge_behind = False
            log.warning("ingest: forgetting old delivery keys failed: %s", exc)

    def _purge_step(self, window_s: float, rows: int | None = None) -> bool:
        """Forget up to ``rows`` (PURGE_ROWS) of the keys past the window; whether some are
        left."""
        rows = rows or PURGE_ROWS
        with self.bank.store.write(self.tenant, create_tenant=True) as txn:
            newest = txn.execute("SELECT max(at) FROM ingest_keys")[0][0]
            if newest is None:
                return False
            cutoff = int(newest - window_s)
            txn.execute(
                "DELETE FROM ingest_keys WHERE (source, key) IN (SELECT source, key "
                "FROM ingest_keys WHERE at < ? ORDER BY at LIMIT ?)",
                [cutoff, rows],
            )
            left = bool(txn.execute("SELECT 1 FROM ingest_keys WHERE at < ? LIMIT 1", [cutoff]))
            if self._legacy_until is not None and not left and cutoff > self._legacy_until:
                # every key up to the upgrade is forgotten: no key of the earlier form is left
                txn.execute("DELETE FROM ingest_meta WHERE k = 'legacy_until'")
                legacy_done = True
            else:
                legacy_done = False
        if legacy_done:  # after the commit
            self._legacy_until = None
        return left


def _rounds(readings: list[Reading]) -> list[list[Reading]]:
    """Split so that no round has two readings of one entity (their order kept)."""
    rounds: list[list[Reading]] = []
    seen: dict[str, int] = {}
    for r in readings:
        n = seen.get(r.fragment["id"], 0)
        seen[r.fragment["id"]] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(r)
    return rounds


def _insert_keys(txn: WriteTxn, readings: Sequence[Reading]) -> set[tuple[str, str]]:
    """Insert the readings' keys; returns the ones that were not there (the new deliveries)."""
    now = int(time.time())
    if txn.dialect == "postgres":
        # The keys in one JSON text, unpacked by the server: a VALUES list of 6,000
        # parameters cost about 21 us a reading (psycopg adapting each parameter, PostgreSQL
        # parsing and planning the statement), a quarter of a writer's time.
        rows = txn.execute(
            "INSERT INTO ingest_keys (source, key, at) SELECT k ->> 0, k ->> 1, ? "
            "FROM json_array_elements(?::json) AS k ON CONFLICT DO NOTHING RETURNING source, key",
            [now, orjson.dumps([(r.source, r.key) for r in readings]).decode()],
        )
        return {(str(src), str(key)) for src, key in rows}
    new: set[tuple[str, str]] = set()
    for start in range(0, len(readings), _KEY_CHUNK):
        chunk = readings[start : start + _KEY_CHUNK]
        params: list[Any] = []
        for r in chunk:
            params.extend((r.source, r.key, now))
        values = ",".join(["(?, ?, ?)"] * len(chunk))
        rows = txn.execute(
            f"INSERT INTO ingest_keys (source, key, at) VALUES {values} "
            "ON CONFLICT DO NOTHING RETURNING source, key",
            params,
        )
        new.update((str(s), str(k)) for s, k in rows)
    return new


def _legacy_repeats(
    txn: WriteTxn, readings: Sequence[Reading], new: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    """Of the ``new`` keys, those whose reading is in the bank under its key's earlier form
    (a message stored before the key form changed, delivered again: a repeat)."""
    twins: dict[tuple[str, str], tuple[str, str]] = {}
    for r in readings:
        if r.key.startswith("o:") and (r.source, r.key) in new:
            when, _, eid = r.key[2:].partition("@")
            twins[(r.source, f"t:{eid}@{when}")] = (r.source, r.key)
    found: set[tuple[str, str]] = set()
    pairs = list(twins)
    for start in range(0, len(pairs), _KEY_CHUNK):
        chunk = pairs[start : start + _KEY_CHUNK]
        values = ",".join(["(?, ?)"] * len(chunk))
        rows = txn.execute(
            f"SELECT source, key FROM ingest_keys WHERE (source, key) IN (VALUES {values})",
            [v for pair in chunk for v in pair],
        )
        found.update(twins[(str(src), str(key))] for src, key in rows)
    return found
