"""Retention: attribute history older than its data source's retention period is deleted.

Each run takes ``now`` and computes per source (the undeclared one included) the cutoff
``now - retention`` (calendar months for ``P1Y``/``P6M``, an exact length for ``P30D``), then
deletes the ``attr_history`` rows of that source's entities observed (``obs``) before it, or
received (``modified``, the time the bank stamped when it stored that value) before it. The
observedAt is the client's word: a reading stamped in the future (a device clock ahead, or on
purpose) would otherwise be kept for as long as its stamp says. ``created`` is no use here:
it is the instance's createdAt, which a long-lived attribute keeps from its first value on.
The rows observed after they were received are in a partial index (``attr_history_ahead``), so
that second pass reads those only: one scan of that index per run finds their entities, then
each source's are deleted.

Which entity belongs to which source is decided in SQL exactly as :meth:`Catalog.source_of`
decides it: the first source (in catalog order) with an id pattern that fully matches
``entities.eid`` wins; otherwise the source of the entity's first type (in the order of its
``type`` array) that any source declares; otherwise the undeclared source. Catalog types are
expanded with the core context, as the API expands ``type=``, and matched against ``etypes``.
Patterns run as ``regexp()`` (Python ``re``) on SQLite and ``~`` on PostgreSQL, anchored
``\\A(?:...)\\Z``. Entities of every tenant are covered: pks are global, tenants a column.

History of entities that no longer exist (deleted entities keep their history under their
pk, never reused) cannot be attributed to a source any more: no type or id is left for it. It
gets the shortest retention of the catalog (the undeclared source's included), so that no
value outlives the retention the register publishes for its source; it is counted under the
undeclared source. (It followed the undeclared source's alone: a deleted entity's values of a
P7D source stayed 30 days.)

Deleting never loads history rows into Python: the entity pks of each source are listed once
per run (small integers), then ``DELETE ... LIMIT batch`` statements run over chunks of them,
each batch a short transaction of its own, so writers wait at most one batch. Runs of several
processes at once stay correct: deletes are idempotent, a partition is dropped by one of them.

PostgreSQL: a monthly partition whose upper bound is not after the oldest cutoff of all sources
holds nothing any source may keep; it is detached (short lock, ``lock_timeout``; when it times
out the rows are deleted row by row instead), then its rows are counted per entity for the
report and it is dropped. A later write for that month lands in the default partition.

SQLite: the store runs with ``PRAGMA secure_delete=ON`` so deleted rows are overwritten; after a
run that deleted rows a ``wal_checkpoint(TRUNCATE)`` empties the WAL file, which still holds
the old page images. Every run appends one audit record (Action.RETENTION), also when it
deleted nothing, failed or was stopped.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg

from cityward.bank.history import settle, settle_txn
from cityward.bank.jsonld import ContextResolver
from cityward.bank.query.qlang import full_match
from cityward.bank.query.sqlgen import regex_condition
from cityward.bank.store import Store
from cityward.bank.store.sqlite import SqliteStore
from cityward.bank.temporal.times import add_months, datetime_to_us, us_to_datetime, us_to_iso
from cityward.governance.events import Action, AuditRecord, AuditSink
from cityward.governance.sources import (
    DERIVED_PREFIX,
    UNDECLARED,
    Catalog,
    DataSource,
    derived_source,
)

log = logging.getLogger("cityward.retention")

ACTOR = "cityward"
# the lock attr_history_partition() takes to create a month partition: dropping one takes it too
PARTITION_LOCK = 74110002
# how long a DETACH waits for queries on attr_history before the run deletes rows instead
DETACH_LOCK_TIMEOUT = "5s"
# entities per DELETE statement on PostgreSQL; on SQLite (entities x attributes) index seeks
PG_CHUNK = 1000
SQLITE_SEEKS = 50_000
_MONTH_PARTITION = re.compile(r"^attr_history_p(\d{4})(\d{2})$")

_SQLITE_DELETE = (
    # path IN (...): the index (e, path, obs, id) is then one seek per entity and attribute
    # straight to its expired rows, instead of a scan over every row of the entity
    "DELETE FROM attr_history WHERE id IN (SELECT id FROM attr_history "
    "WHERE e IN (SELECT value FROM json_each(?)) AND path IN (SELECT path FROM attr_history_attrs) "
    "AND obs < ? LIMIT ?) RETURNING 1"
)
_PG_DELETE = (
    # no index on id alone: the rows are found again by the whole key of attr_history_obs
    "DELETE FROM attr_history h USING (SELECT e, path, obs, id FROM attr_history "
    "WHERE e = ANY(?::bigint[]) AND obs < ? LIMIT ?) d "
    "WHERE h.obs < ? AND h.e = d.e AND h.path = d.path AND h.obs = d.obs AND h.id = d.id "
    "RETURNING 1"
)
# Rows received before the cutoff that the pass above kept, so observed after it: observed
# after they were received. ``obs > modified`` as the partial index attr_history_ahead says it
# (SQLite uses a partial index only for a query that repeats its condition).
_SQLITE_DELETE_AHEAD = (
    "DELETE FROM attr_history WHERE id IN (SELECT id FROM attr_history "
    "WHERE e IN (SELECT value FROM json_each(?)) AND obs > modified AND modified < ? LIMIT ?) "
    "RETURNING 1"
)
_PG_DELETE_AHEAD = (
    "DELETE FROM attr_history h USING (SELECT e, path, obs, id FROM attr_history "
    "WHERE e = ANY(?::bigint[]) AND obs > modified AND modified < ? LIMIT ?) d "
    "WHERE h.e = d.e AND h.path = d.path AND h.obs = d.obs AND h.id = d.id RETURNING 1"
)
# the entities that have such rows (a scan of the partial index only)
_AHEAD = "SELECT DISTINCT e FROM attr_history WHERE obs > modified AND modified < ?"
# Without this the planner hash-joins a batch against every expired row of the table (a seq
# scan: 320 ms a batch at 2M rows); the nested loop probes the index per row, pruned (23 ms).
_PG_NESTED_LOOP = (
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
)
# the distinct entities with history (a loose index scan: one index seek each) without an entity
_ORPHANS = (
    "WITH RECURSIVE d(e) AS (SELECT min(e) FROM attr_history UNION ALL "
    "SELECT (SELECT min(h.e) FROM attr_history h WHERE h.e > d.e) FROM d WHERE d.e IS NOT NULL) "
    "SELECT d.e FROM d WHERE d.e IS NOT NULL "
    "AND NOT EXISTS (SELECT 1 FROM entities x WHERE x.pk = d.e)"
)
_PG_MONTH_TABLES = (
    "SELECT n.nspname, c.relname, EXISTS (SELECT 1 FROM pg_inherits i "
    "WHERE i.inhrelid = c.oid AND i.inhparent = 'attr_history'::regclass), c.relispartition "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relnamespace = "
    "(SELECT relnamespace FROM pg_class WHERE oid = 'attr_history'::regclass) "
    "AND c.relkind = 'r' AND c.relname ~ '^attr_history_p[0-9]{6}$' ORDER BY c.relname"
)


@dataclass
class RetentionReport:
    """What one run did. ``deleted`` counts rows per source id, dropped partitions included."""

    now: datetime
    cutoffs: dict[str, datetime] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    partitions_dropped: list[str] = field(default_factory=list)
    partition_rows: int = 0  # rows that went with the dropped partitions (part of ``deleted``)
    duration_s: float = 0.0
    interrupted: bool = False  # stop() was called during the run
    error: str | None = None  # the run failed (after deleting what ``deleted`` says)

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class _Stopped(Exception):
    """stop() was called: the run ends between two batches."""


#: the first instant a timestamp can hold: the cutoff of a retention that reaches further back
EARLIEST_US = datetime_to_us(datetime(1, 1, 1, tzinfo=UTC))


def cutoff_us(source: DataSource, now_us: int) -> int:
    """The instant (microseconds) before which ``source``'s history is past its retention.

    A retention that reaches before year 1 (the configuration takes up to 10,000 years: P5000Y
    for an archive kept for good) keeps everything: its cutoff is EARLIEST_US. Before, its
    cutoff raised, and every retention run failed before deleting anything of any source."""
    period = source.retention_period
    try:
        us = add_months(now_us, -period.months) if period.months else now_us - period.micros
    except (ValueError, OverflowError):
        return EARLIEST_US
    return max(us, EARLIEST_US)


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Retention:
    """Deletes expired history per data source; :meth:`run_once` or a scheduler thread."""

    def __init__(
        self, store: Store, catalog: Catalog, audit: AuditSink | None, batch: int = 5000
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.store = store
        self.catalog = catalog
        self.audit = audit
        self.batch = batch
        self._core = ContextResolver(allow_fetch=False).core
        self._run_lock = threading.Lock()  # one run at a time in this process
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- scheduler ------------------------------------------------------------------------------
    def start(self, interval_s: float, first_delay_s: float = 0.0) -> None:
        """Run every ``interval_s`` seconds on a daemon thread, the first run after
        ``first_delay_s`` (at once by default: a server restarted more often than the interval
        must still run it). A failed run is logged and audited; the next one runs as planned.
        """
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        with self._state_lock:
            if self._thread is not None and self._thread.is_alive():
                raise RuntimeError("retention scheduler is already running")
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop,
                args=(interval_s, first_delay_s),
                name="cityward-retention",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the scheduler; a run in progress (in any thread) ends after its current batch."""
        with self._state_lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning("retention thread did not stop within %.1f s", timeout_s)
                return  # the event stays set: the thread ends at its next check
        with self._state_lock:
            if self._thread is None:
                self._stop.clear()  # a later run_once() runs normally

    @property
    def running(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _loop(self, interval_s: float, first_delay_s: float) -> None:
        if self._stop.wait(first_delay_s):
            return
        while True:
            try:
                self.run_once()
            except Exception:
                log.exception("retention run failed")
            if self._stop.wait(interval_s):
                return

    # -- one run --------------------------------------------------------------------------------
    def cutoffs(self, now: datetime) -> dict[str, datetime]:
        """Per source id, the instant before which its history is deleted."""
        now_us = datetime_to_us(_aware(now))
        return {s.id: us_to_datetime(cutoff_us(s, now_us)) for s in self.catalog.all_sources()}

    def run_once(self, now: datetime | None = None) -> RetentionReport:
        """Delete what is past retention at ``now`` (default: the current time); one audit record.

        Raises what the database raised (after auditing the failure); a stop() during the run
        ends it early with ``interrupted`` set.
        """
        with self._run_lock:
            return self._run(_aware(now) if now is not None else datetime.now(UTC))

    def _run(self, now: datetime) -> RetentionReport:
        started = time.monotonic()
        now_us = datetime_to_us(now)
        sources = self.catalog.all_sources()
        cut = {s.id: cutoff_us(s, now_us) for s in sources}
        report = RetentionReport(
            now=now,
            cutoffs={sid: us_to_datetime(us) for sid, us in cut.items()},
            deleted=dict.fromkeys(cut, 0),
        )
        log.info(
            "retention run at %s: cutoffs %s",
            us_to_iso(now_us),
            ", ".join(f"{sid} {us_to_iso(us)}" for sid, us in cut.items()),
        )
        try:
            if self._history_exists():
                settle(self.store)  # rows still staged on SQLite (cityward.bank.history)
                members = self._members()
                if self.store.dialect == "postgres":
                    self._drop_partitions(min(cut.values()), members, report)
                orphans = self._orphans()
                newest = max(cut.values())  # the shortest retention of all
                for s in sources:
                    self._delete_rows(s.id, members[s.id], cut[s.id], report)
                # counted under the undeclared source (see the module text)
                self._delete_rows(UNDECLARED, orphans, newest, report)
                ahead = self._ahead(newest)
                if ahead:
                    for s in sources:
                        pks = [pk for pk in members[s.id] if pk in ahead]
                        self._delete_rows(s.id, pks, cut[s.id], report, received=True)
                    pks = [pk for pk in orphans if pk in ahead]
                    self._delete_rows(UNDECLARED, pks, newest, report, received=True)
            else:
                log.info("no attribute history table: nothing to delete")
        except _Stopped:
            report.interrupted = True
            log.warning("retention run stopped before it finished")
        except Exception as exc:
            report.error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if report.total > report.partition_rows and isinstance(self.store, SqliteStore):
                self._checkpoint(self.store)
            report.duration_s = time.monotonic() - started
            self._audit(report)
            log.info(
                "retention run %s: %d history rows deleted (%s), %d partitions dropped, %.2f s",
                "failed" if report.error else "stopped" if report.interrupted else "done",
                report.total,
                ", ".join(f"{sid} {n}" for sid, n in report.deleted.items()),
                len(report.partitions_dropped),
                report.duration_s,
            )
        return report

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped

    def _history_exists(self) -> bool:
        if self.store.dialect == "sqlite":
            sql = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?"
        else:
            sql = "SELECT count(*) FROM pg_class WHERE oid = to_regclass(?)"
        return bool(self.store.select(sql, ["attr_history"])[0][0])

    # -- which entities belong to which source --------------------------------------------------
    def _patterns(
        self, sources: Sequence[DataSource], derived: bool = True
    ) -> tuple[str, list[Any]]:
        """SQL true when ``x.eid`` fully matches an id pattern of one of ``sources``, or (with
        ``derived``) is a derived id: those are decided first, by their prefix."""
        parts: list[str] = []
        params: list[Any] = []
        if derived:
            parts.append(f"substr(x.eid, 1, {len(DERIVED_PREFIX)}) = ?")
            params.append(DERIVED_PREFIX)
        for p in (p for s in sources for p in s.id_patterns):
            sql, args = regex_condition("x.eid", full_match(p), self.store.dialect)
            parts.append(sql)
            params.extend(args)
        if not parts:
            return "1 = 0", []
        return " OR ".join(parts), params

    def _members(self) -> dict[str, list[int]]:
        """The entity pks of each source id (deleted entities are not listed here)."""
        select = self.store.select
        out: dict[str, list[int]] = {s.id: [] for s in self.catalog.all_sources()}
        # derived ids first (as in Catalog.source_of): the source named in the id, undeclared
        # for a name the catalog does not hold
        declared = {s.id for s in self.catalog.sources}
        rows = select(
            f"SELECT x.pk, x.eid FROM entities x WHERE substr(x.eid, 1, {len(DERIVED_PREFIX)}) = ?",
            [DERIVED_PREFIX],
        )
        for pk, eid in rows:
            sid = derived_source(str(eid))
            out[sid if sid in declared else UNDECLARED].append(int(pk))
        patterned = [s for s in self.catalog.sources if s.id_patterns]
        for i, s in enumerate(patterned):
            own, own_params = self._patterns([s], derived=False)
            earlier, earlier_params = self._patterns(patterned[:i])
            rows = select(
                f"SELECT x.pk FROM entities x WHERE ({own}) AND NOT ({earlier})",
                [*own_params, *earlier_params],
            )
            out[s.id].extend(int(r[0]) for r in rows)
        any_pattern, pattern_params = self._patterns(patterned)
        # type IRI -> source id, for the short names and IRIs the catalog declares
        by_iri: dict[str, str] = {}
        for s in self.catalog.sources:
            for t in s.types:
                for iri in (t, self._core.expand(t)):
                    by_iri.setdefault(iri, s.id)
        iris = list(by_iri)
        undeclared_sql = f"SELECT x.pk FROM entities x WHERE NOT ({any_pattern})"
        if iris:
            marks = ", ".join("?" * len(iris))
            for s in self.catalog.sources:
                own_iris = [i for i in iris if by_iri[i] == s.id]
                if not own_iris:
                    continue
                other = [i for i in iris if by_iri[i] != s.id]
                sql = (
                    "SELECT DISTINCT t.e FROM etypes t JOIN entities x ON x.pk = t.e "
                    f"WHERE t.type IN ({', '.join('?' * len(own_iris))}) AND NOT ({any_pattern})"
                )
                if other:
                    # only entities without a type of another source: those are decided below
                    sql += (
                        " AND NOT EXISTS (SELECT 1 FROM etypes o WHERE o.e = t.e "
                        f"AND o.type IN ({', '.join('?' * len(other))}))"
                    )
                rows = select(sql, [*own_iris, *pattern_params, *other])
                out[s.id].extend(int(r[0]) for r in rows)
            # Entities with types of several sources (rare): the first of its types that a
            # source declares decides, as in Catalog.source_of; the type order is in the document.
            index = {sid: n for n, sid in enumerate(out)}
            case = "CASE t.type " + " ".join(f"WHEN ? THEN {index[by_iri[i]]}" for i in iris)
            case += " END"
            rows = select(
                f"SELECT x.pk, x.doc FROM entities x WHERE x.pk IN (SELECT t.e FROM etypes t "
                f"WHERE t.type IN ({marks}) GROUP BY t.e HAVING min({case}) <> max({case})) "
                f"AND NOT ({any_pattern})",
                [*iris, *iris, *iris, *pattern_params],
            )
            for pk, doc in rows:
                types = orjson.loads(doc)["type"]
                sid = next((by_iri[t] for t in types if t in by_iri), UNDECLARED)
                out[sid].append(int(pk))
            undeclared_sql += (
                f" AND NOT EXISTS (SELECT 1 FROM etypes t WHERE t.e = x.pk AND t.type IN ({marks}))"
            )
        rows = select(undeclared_sql, [*pattern_params, *iris])
        out[UNDECLARED].extend(int(r[0]) for r in rows)
        for pks in out.values():
            pks.sort()
        return out

    def _orphans(self) -> list[int]:
        """Pks with history whose entity was deleted (they follow the undeclared source)."""
        return [int(r[0]) for r in self.store.select(_ORPHANS)]

    def _ahead(self, newest_cutoff: int) -> set[int]:
        """Pks with rows observed after they were received and received before the newest
        cutoff: the only entities the second pass (``received``) has to look at."""
        bound: int | datetime = newest_cutoff
        if self.store.dialect == "postgres":
            bound = us_to_datetime(newest_cutoff)
        return {int(r[0]) for r in self.store.select(_AHEAD, [bound])}

    # -- row deletes ----------------------------------------------------------------------------
    def _delete_rows(
        self,
        source_id: str,
        pks: Sequence[int],
        cutoff: int,
        report: RetentionReport,
        received: bool = False,
    ) -> None:
        """Delete the rows of ``pks`` observed before ``cutoff`` or, with ``received``, the
        rows received before it that were observed later (attr_history_ahead)."""
        if not pks:
            return
        sqlite = self.store.dialect == "sqlite"
        bound: int | datetime = cutoff
        if sqlite and received:
            size, sql = 1000, _SQLITE_DELETE_AHEAD
        elif sqlite:
            paths = int(self.store.select("SELECT count(*) FROM attr_history_attrs")[0][0])
            size = max(1, min(1000, SQLITE_SEEKS // max(1, paths)))
            sql = _SQLITE_DELETE
        else:
            size, bound = PG_CHUNK, us_to_datetime(cutoff)
            sql = _PG_DELETE_AHEAD if received else _PG_DELETE
        before = report.deleted[source_id]
        batches = 0
        for chunk in _chunks(pks, size):
            keys: Any = orjson.dumps(list(chunk)).decode() if sqlite else list(chunk)
            while True:
                self._check_stop()
                with self.store.write("", create_tenant=False) as txn:
                    settle_txn(txn)  # what was staged since the run began
                    if not sqlite:
                        txn.execute(_PG_NESTED_LOOP)
                    params = [keys, bound, self.batch]
                    if sql is _PG_DELETE:
                        params.append(bound)  # its partition pruning bound
                    n = len(txn.execute(sql, params))
                report.deleted[source_id] += n
                batches += 1
                if n < self.batch:
                    break
        deleted = report.deleted[source_id] - before
        log.log(
            logging.INFO if deleted else logging.DEBUG,
            "retention: %s: %d rows %s before %s deleted (%d entities, %d batches)",
            source_id,
            deleted,
            "received (observed later)" if received else "observed",
            us_to_iso(cutoff),
            len(pks),
            batches,
        )

    # -- PostgreSQL partitions ------------------------------------------------------------------
    def _drop_partitions(
        self, oldest_cutoff: int, members: dict[str, list[int]], report: RetentionReport
    ) -> None:
        """Drop the month partitions that hold nothing any source may keep."""
        tables = self.store.select(_PG_MONTH_TABLES)
        owner: dict[int, str] | None = None
        for schema, name, attached, is_partition in tables:
            m = _MONTH_PARTITION.match(name)
            if m is None or (is_partition and not attached):
                continue  # not ours
            year, month = int(m.group(1)), int(m.group(2))
            try:
                upper = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
            except ValueError:
                # 9999-12 (a forged observedAt) ends in year 10000, past every cutoff: never
                # dropped by time; its rows go one by one once received past retention.
                # Raising here stopped every run before it deleted anything.
                continue
            if datetime_to_us(upper) > oldest_cutoff:
                continue
            self._check_stop()
            counts = self._drop_partition(f"{_ident(schema)}.{_ident(name)}", bool(attached))
            if counts is None:
                continue
            if owner is None:
                owner = {pk: sid for sid, pks in members.items() for pk in pks}
            rows = 0
            for e, n in counts:
                # deleted entities, and any made since the members were listed: undeclared
                sid = owner.get(int(e), UNDECLARED)
                report.deleted[sid] += int(n)
                rows += int(n)
            report.partitions_dropped.append(name)
            report.partition_rows += rows
            log.info("retention: partition %s dropped (%d rows, before %s)", name, rows, upper)

    def _drop_partition(self, table: str, attached: bool) -> list[tuple[Any, ...]] | None:
        """Detach (when attached) and drop one month table: its (e, rows) counts, or None when
        another process got there first or the detach timed out (rows are deleted instead)."""
        parent = table.rsplit(".", 1)[0] + ".attr_history"
        if attached:
            try:
                with self.store.write("", create_tenant=False) as txn:
                    txn.execute("SELECT pg_advisory_xact_lock(?)", [PARTITION_LOCK])
                    still = txn.execute(
                        "SELECT 1 FROM pg_inherits WHERE inhrelid = to_regclass(?) "
                        "AND inhparent = 'attr_history'::regclass",
                        [table],
                    )
                    if still:
                        txn.execute(f"SET LOCAL lock_timeout = '{DETACH_LOCK_TIMEOUT}'")
                        txn.execute(f"ALTER TABLE {parent} DETACH PARTITION {table}")
            except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled) as exc:
                log.warning("retention: could not detach %s now (%s); deleting rows", table, exc)
                return None
        # A detached month table is invisible to every query: counting and dropping it locks
        # nothing that anyone else uses. A run that died in between leaves it detached; the
        # next run finds it here again by its name.
        with self.store.write("", create_tenant=False) as txn:
            txn.execute("SELECT pg_advisory_xact_lock(?)", [PARTITION_LOCK])
            found = txn.execute(
                "SELECT c.relispartition FROM pg_class c WHERE c.oid = to_regclass(?)", [table]
            )
            if not found or found[0][0]:
                return None  # dropped by another process meanwhile (or attached again)
            counts = txn.execute(f"SELECT e, count(*) FROM {table} GROUP BY e")
            txn.execute(f"DROP TABLE {table}")
        return counts

    # -- SQLite WAL -----------------------------------------------------------------------------
    def _checkpoint(self, store: SqliteStore) -> None:
        """Empty the WAL file: it still holds page images with the deleted rows.

        The store's own checkpointer only runs PASSIVE checkpoints (they never wait), which
        leave the WAL file's old frames in place; TRUNCATE waits for readers briefly and cuts
        the file to zero bytes. A few tries; a busy database is retried at the next run.
        """
        try:
            conn = sqlite3.connect(store.path, isolation_level=None)
        except sqlite3.Error:
            log.exception("retention: cannot open %s for a WAL checkpoint", store.path)
            return
        try:
            conn.execute("PRAGMA busy_timeout=2000")
            for _ in range(5):
                busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    log.info("retention: WAL checkpointed and truncated")
                    return
                log.debug("retention: WAL checkpoint busy (%d of %d frames)", done, frames)
                if self._stop.wait(0.2):
                    break
            log.warning("retention: WAL still busy; its old frames stay until the next checkpoint")
        except sqlite3.Error:
            log.exception("retention: WAL checkpoint failed")
        finally:
            conn.close()

    # -- audit ----------------------------------------------------------------------------------
    def _audit(self, report: RetentionReport) -> None:
        if self.audit is None:
            return
        parts = ", ".join(
            f"{sid} {report.deleted.get(sid, 0)} (before {us_to_iso(datetime_to_us(c))})"
            for sid, c in report.cutoffs.items()
        )
        state = (
            f"failed ({report.error})"
            if report.error
            else "stopped early"
            if report.interrupted
            else "done"
        )
        detail = (
            f"retention run {state}: {report.total} history rows deleted: {parts}; "
            f"partitions dropped: {', '.join(report.partitions_dropped) or 'none'}"
        )
        extra: dict[str, object] = dict(report.deleted)
        extra["partitions_dropped"] = list(report.partitions_dropped)
        rec = AuditRecord(
            action=Action.RETENTION, actor=ACTOR, count=report.total, detail=detail, extra=extra
        )
        try:
            self.audit.record_nowait(rec)
        except Exception:
            log.exception("retention: the audit record could not be written")


def _aware(when: datetime) -> datetime:
    """A datetime as UTC; a naive one is taken to be UTC already."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
