"""DDL of the attribute history (``attr_history``) for SQLite and PostgreSQL.

One row per version of an attribute instance. Layout choices, for hundreds of millions of rows:

* ``e`` (entity pk) and ``path`` (``indexer.path_id`` of the attribute IRI) are 8-byte keys; the
  IRI itself lives once per attribute in ``attr_history_attrs``: repeating a 40-100 byte IRI on
  every row would be a third of the table, and the small table is read by a join per query.
* Times are integer microseconds since the epoch on SQLite (exact, ordered, and bucketed by
  integer arithmetic, which REAL seconds would round) and ``timestamptz`` on PostgreSQL.
* ``obs`` is observedAt, or the receive time when the instance has none; ``created`` and
  ``modified`` are the instance's system times. ``inst`` is the instance as JSON *without* its
  ``createdAt``/``modifiedAt`` (they are the columns; ~90 bytes a row saved), keys sorted so
  that equal values are equal texts (distinctCount compares texts).
* ``num`` is the value as a number for aggregation: numbers, and booleans as 1/0 (so avg of a
  boolean is the fraction of true; distinctCount then counts true and 1 as one value).
* Each time column has an index ``(e, path, <time>, id)``: a time range or lastN of one
  attribute is one index range. On SQLite the observedAt index also covers ``num`` and ``ds``
  so aggregation never reads the table; on PostgreSQL it INCLUDEs them for index-only scans.
  A partial index holds the rows observed after they were received (``obs > modified``), few
  in a healthy city: retention deletes them once received past retention, whatever their
  observedAt, without a scan of every row of every entity (and every month on PostgreSQL).
* SQLite: new rows go to ``attr_history_new`` first, a table without secondary indexes (it
  keeps the columns and ids), and move into ``attr_history`` in bulk, sorted by entity and
  attribute (``merge_sqlite``): once ``MERGE_ROWS`` are waiting, and before anything reads or
  changes the history (``bank.history.settle``). Inserted one write at a time, each row landed
  on index pages of its own entity in three indexes: about three pages written per reading
  once the history outgrew the cache, so a sustained ingest slowed as its history grew (57 µs a
  row at 1M rows, against 2 µs staged plus 7-10 µs merged in runs of 20,000-200,000 rows over
  10,000 entities).
* PostgreSQL: partitioned by range of ``obs``, one partition per month created on demand
  (``ensure_partitions``) and a default partition so that an insert never fails. No unique
  constraint, so the same table can be made a TimescaleDB hypertable (``partitioned=False``,
  then ``create_hypertable('attr_history', 'obs')``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import psycopg

from cityward.bank.store.postgres import missing_statements
from cityward.bank.temporal.times import iso_to_us, us_to_datetime

TABLE = "attr_history"
# SQLite: staged rows that make a write transaction move them all into attr_history. A merge of
# 50,000 rows over 10,000 entities takes about 0.4 s (a write meanwhile waits that long); the
# ingest writer at 1.2M history rows: 78.8 µs a reading unstaged, 71.9 staged with merges of
# 20,000, 68.0 with merges of 60,000.
MERGE_ROWS = 50_000
ATTRS = "attr_history_attrs"
DEFAULT_PARTITION = "attr_history_default"
# Partitions ensure_partitions creates in one call at most: a batch of instances with scattered
# (possibly bogus) observedAt must not create hundreds of tables; the rest go to the default
# partition and move out when their month's partition is created later.
MAX_NEW_PARTITIONS = 12

# the columns after id, of attr_history and of attr_history_new alike
_SQLITE_ROW = """
  e INTEGER NOT NULL,
  path INTEGER NOT NULL,
  ds TEXT,
  obs INTEGER NOT NULL,
  created INTEGER NOT NULL,
  modified INTEGER NOT NULL,
  num REAL,
  inst TEXT NOT NULL"""

SQLITE_DDL = f"""
-- AUTOINCREMENT: an instance id is never reused
CREATE TABLE IF NOT EXISTS attr_history (
  id INTEGER PRIMARY KEY AUTOINCREMENT,{_SQLITE_ROW}
);
-- rows are appended in rowid order (cheap writes); the indexes hold the per-attribute order.
-- id right after the time: ties order by insertion, and lastN reads the index backwards.
CREATE INDEX IF NOT EXISTS attr_history_obs ON attr_history(e, path, obs, id, num, ds);
CREATE INDEX IF NOT EXISTS attr_history_created ON attr_history(e, path, created);
CREATE INDEX IF NOT EXISTS attr_history_modified ON attr_history(e, path, modified);
-- tells cheaply whether an attribute has datasetIds (then aggregation groups by ds)
CREATE INDEX IF NOT EXISTS attr_history_ds ON attr_history(e, path) WHERE ds IS NOT NULL;
-- rows observed after the bank received them (a clock ahead, a forged observedAt): retention
-- finds those received before a cutoff here (cityward.governance.retention)
CREATE INDEX IF NOT EXISTS attr_history_ahead ON attr_history(e, modified) WHERE obs > modified;
CREATE TABLE IF NOT EXISTS attr_history_attrs (path INTEGER PRIMARY KEY, iri TEXT NOT NULL);
-- rows waiting to be merged into attr_history (merge_sqlite), ids given by insert_sqlite
CREATE TABLE IF NOT EXISTS attr_history_new (
  id INTEGER PRIMARY KEY,{_SQLITE_ROW}
);
"""

_COLUMNS = "id, e, path, ds, obs, created, modified, num, inst"
# sorted as the indexes are: consecutive rows land on the same index pages
_MERGE = (
    f"INSERT INTO attr_history ({_COLUMNS}) SELECT {_COLUMNS} FROM attr_history_new "
    "ORDER BY e, path, obs, id"
)

# CACHE 1: instances with equal times are ordered by id (lastN, the newest of a tie), so ids
# must follow the order of the writes. With a larger cache each pooled connection hands out
# its own block of ids, and a later write on another connection can get a smaller id.
_PG_TABLE = """
CREATE SEQUENCE IF NOT EXISTS attr_history_id_seq CACHE 1;
CREATE TABLE IF NOT EXISTS attr_history (
  id BIGINT NOT NULL DEFAULT nextval('attr_history_id_seq'),
  e BIGINT NOT NULL,
  path BIGINT NOT NULL,
  ds TEXT,
  obs TIMESTAMPTZ NOT NULL,
  created TIMESTAMPTZ NOT NULL,
  modified TIMESTAMPTZ NOT NULL,
  num DOUBLE PRECISION,
  inst TEXT NOT NULL
){partition};
"""

_PG_REST = """
CREATE INDEX IF NOT EXISTS attr_history_obs ON attr_history(e, path, obs, id) INCLUDE (num, ds);
CREATE INDEX IF NOT EXISTS attr_history_created ON attr_history(e, path, created, id);
CREATE INDEX IF NOT EXISTS attr_history_modified ON attr_history(e, path, modified, id);
CREATE INDEX IF NOT EXISTS attr_history_ahead ON attr_history(e, modified) WHERE obs > modified;
CREATE TABLE IF NOT EXISTS attr_history_attrs (path BIGINT PRIMARY KEY, iri TEXT NOT NULL);
"""

# Creates the month partition holding ``ts`` (UTC months), moving rows of that month out of
# the default partition first: CREATE ... PARTITION OF would fail while the default holds any.
# ATTACH takes a weaker lock on the parent than CREATE ... PARTITION OF, so readers go on.
_PG_PARTITION_FN = """
CREATE OR REPLACE FUNCTION attr_history_partition(ts timestamptz) RETURNS text
LANGUAGE plpgsql AS $fn$
DECLARE
  month timestamp := date_trunc('month', ts AT TIME ZONE 'UTC');
  lo timestamptz := month AT TIME ZONE 'UTC';
  hi timestamptz := (month + interval '1 month') AT TIME ZONE 'UTC';
  part text := 'attr_history_p' || to_char(month, 'YYYYMM');
  sch text;
BEGIN
  SELECT n.nspname INTO sch FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'attr_history'::regclass;
  IF to_regclass(format('%I.%I', sch, part)) IS NOT NULL THEN
    RETURN part;
  END IF;
  -- one creator at a time; the loser finds the table made
  PERFORM pg_advisory_xact_lock(74110002);
  IF to_regclass(format('%I.%I', sch, part)) IS NOT NULL THEN
    RETURN part;
  END IF;
  EXECUTE format('CREATE TABLE %I.%I (LIKE %I.attr_history INCLUDING DEFAULTS)', sch, part, sch);
  EXECUTE format(
    'WITH moved AS (DELETE FROM %I.attr_history_default WHERE obs >= %L AND obs < %L '
    'RETURNING *) INSERT INTO %I.%I SELECT * FROM moved', sch, lo, hi, sch, part);
  EXECUTE format('ALTER TABLE %I.attr_history ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
    sch, sch, part, lo, hi);
  RETURN part;
END
$fn$;
"""


def create_sqlite(conn: sqlite3.Connection) -> None:
    """Create the history tables and indexes (idempotent)."""
    conn.executescript(SQLITE_DDL)


def merge_sqlite(conn: sqlite3.Connection) -> int:
    """Move the staged rows into ``attr_history``, in the caller's transaction; returns how
    many moved. Costs next to nothing when none are staged."""
    moved = conn.execute(_MERGE).rowcount
    if moved:
        conn.execute("DELETE FROM attr_history_new")
    return moved


def create_postgres(conn: psycopg.Connection[Any], *, partitioned: bool = True) -> None:
    """Create the history tables, indexes and partition function (idempotent).

    Runs in the caller's transaction (commit it). ``partitioned=False`` makes a plain table,
    the starting point for a TimescaleDB hypertable; ensure_partitions is then a no-op.
    """
    conn.execute("SELECT pg_advisory_xact_lock(74110002)")
    # only the statements that create something missing: CREATE INDEX IF NOT EXISTS locks
    # attr_history against every writer before it looks at the name (missing_statements)
    table = _PG_TABLE.format(partition=" PARTITION BY RANGE (obs)" if partitioned else "")
    for stmt in missing_statements(conn, table):
        conn.execute(stmt)
    # databases made before the sequence had CACHE 1 (see _PG_TABLE); altered only when
    # needed, as ALTER SEQUENCE rewrites the sequence and locks it
    cache = conn.execute(
        "SELECT seqcache FROM pg_sequence WHERE seqrelid = 'attr_history_id_seq'::regclass"
    ).fetchone()
    if cache is not None and cache[0] != 1:
        conn.execute("ALTER SEQUENCE attr_history_id_seq CACHE 1")
    if partitioned:
        default = f"CREATE TABLE IF NOT EXISTS {DEFAULT_PARTITION} PARTITION OF {TABLE} DEFAULT"
        for stmt in missing_statements(conn, default):
            conn.execute(stmt)
    for stmt in missing_statements(conn, _PG_REST):
        conn.execute(stmt)
    conn.execute(_PG_PARTITION_FN)


def partition_name(when: datetime) -> str:
    """The name of the month partition holding ``when`` (an aware datetime)."""
    utc = when.astimezone(UTC)
    return f"attr_history_p{utc.year:04d}{utc.month:02d}"


def existing_partitions(conn: psycopg.Connection[Any]) -> set[str] | None:
    """The names of the partitions of ``attr_history`` (the default one too), or None when it
    is not partitioned (a TimescaleDB hypertable). One catalog read: it takes no lock, so a
    write transaction may ask it too."""
    row = conn.execute(
        "SELECT c.relkind = 'p', array(SELECT k.relname::text FROM pg_inherits i "
        "JOIN pg_class k ON k.oid = i.inhrelid WHERE i.inhparent = c.oid) "
        "FROM pg_class c WHERE c.oid = 'attr_history'::regclass"
    ).fetchone()
    assert row is not None
    is_partitioned, names = row
    return set(names) if is_partitioned else None


def ensure_partitions(conn: psycopg.Connection[Any], times: Iterable[str | datetime]) -> list[str]:
    """Create the month partitions that rows with these ``obs`` times need; returns those made.

    ``times`` are ``...Z`` texts or aware datetimes. One catalog query when all exist. Call it
    in a short transaction of its own before the write that inserts the rows: attaching a
    partition locks the default partition until commit, and doing it inside a long write
    transaction that also holds row locks invites deadlocks with other writers.
    """
    months: dict[str, datetime] = {}
    for t in times:
        dt = us_to_datetime(iso_to_us(t)) if isinstance(t, str) else t
        months.setdefault(partition_name(dt), dt)
    if not months:
        return []
    existing = existing_partitions(conn)
    if existing is None:
        return []
    made: list[str] = []
    for name in sorted(set(months) - set(existing))[:MAX_NEW_PARTITIONS]:
        conn.execute("SELECT attr_history_partition(%s)", [months[name]])
        made.append(name)
    return made
