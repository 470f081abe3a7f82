"""The embedded backend: one SQLite file in WAL mode, an R-tree for geo-queries."""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson

from cityward.bank.errors import store_refused
from cityward.bank.query.sqlgen import register_sqlite_functions
from cityward.bank.store.base import (
    Derived,
    QuerySpec,
    Store,
    WriteTxn,
    derived_rows,
    dump_doc,
)

# Geo rows live in an R-tree whose integer id encodes the entity: id = pk * GEO_SLOTS + n, so an
# entity's boxes are one id range (R-tree auxiliary columns cannot be indexed).
GEO_SLOTS = 64
# the background checkpointer runs at most every CHECKPOINT_PAUSE_S after a write, and every
# CHECKPOINT_IDLE_S anyway; the WAL file is cut back to WAL_SIZE_LIMIT bytes once reset.
# A second, not less: under a steady write load every checkpoint copies the pages written
# since the last one (each once, however often it was written) and syncs the file; at 0.2 s
# the ingest bench's write time per reading grew twice as fast with the history's size
# (1M readings in: 62 us a reading at 0.2 s, 42 us at 1 s).
CHECKPOINT_PAUSE_S = 1.0
CHECKPOINT_IDLE_S = 5.0
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# WAL frames (pages) past which a checkpoint finishes its copy holding the write lock; see
# _checkpoint_loop
WAL_RESET_FRAMES = WAL_SIZE_LIMIT // 4096

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY);
INSERT OR IGNORE INTO tenants(name) VALUES ('');
CREATE TABLE IF NOT EXISTS entities (
  pk INTEGER PRIMARY KEY,
  tenant TEXT NOT NULL,
  eid TEXT NOT NULL,
  created TEXT NOT NULL,
  modified TEXT NOT NULL,
  ngeo INTEGER NOT NULL DEFAULT 0,
  doc TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entities_tenant_eid ON entities(tenant, eid);
-- lets a query check the tenant of candidate entities without reading their documents
CREATE INDEX IF NOT EXISTS entities_pk_tenant ON entities(pk, tenant);
CREATE TABLE IF NOT EXISTS pk_seq (k INTEGER PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO pk_seq(k, v) SELECT 1, coalesce(max(pk), 0) FROM entities;
CREATE TABLE IF NOT EXISTS etypes (e INTEGER NOT NULL, type TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS etypes_type ON etypes(type, e);
CREATE INDEX IF NOT EXISTS etypes_e ON etypes(e);
-- clustered by entity and path (rows of one entity are written and deleted together, and a
-- per-entity probe is one seek); n only makes the key unique. Numbers get a partial index,
-- so a row lands in one or two secondary indexes, not three: index upkeep is most of the
-- cost of a batch write.
CREATE TABLE IF NOT EXISTS attr_index (
  e INTEGER NOT NULL, n INTEGER NOT NULL, path INTEGER NOT NULL, vt INTEGER NOT NULL,
  num REAL, txt TEXT,
  PRIMARY KEY (e, path, n)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attr_index_num ON attr_index(path, vt, num) WHERE num IS NOT NULL;
CREATE INDEX IF NOT EXISTS attr_index_txt ON attr_index(path, vt, txt);
CREATE TABLE IF NOT EXISTS jsonld_contexts (
  tenant TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
  created TEXT NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE VIRTUAL TABLE IF NOT EXISTS geo_rt USING rtree(
  id, minx, maxx, miny, maxy, +path TEXT, +geom TEXT
);
"""


class SqliteStore(Store):
    """SQLite in WAL mode: one writer at a time, readers in parallel on their own connections."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        self._lock_path = path.with_name(path.name + ".writelock")
        self._writer = self._connect()
        # the writer touches index pages all over the file: give it the big cache
        self._writer.execute("PRAGMA cache_size=-65536")
        self._writer.executescript(SCHEMA)
        # Checkpoints (copying the WAL back into the database, with an fsync) run on a thread
        # of their own instead of inside whichever commit crosses the threshold: a batch
        # commit then only appends to the WAL, and the copy overlaps the next batch's work.
        self._writer.execute("PRAGMA wal_autocheckpoint=0")
        self._writer.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        self._wal_dirty = threading.Event()
        self._closed = threading.Event()  # also ends the checkpointer's pause at once
        self._checkpointer = threading.Thread(
            target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA busy_timeout=1000")
            while not self._closed.is_set():
                # after a write, or every few seconds for writes of other worker processes
                self._wal_dirty.wait(CHECKPOINT_IDLE_S)
                self._wal_dirty.clear()
                if self._closed.is_set():
                    break
                with suppress(sqlite3.Error):
                    # PASSIVE never blocks writers or readers; it copies what it can
                    _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if frames > WAL_RESET_FRAMES:
                        self._finish_checkpoint(conn)
                if self._closed.wait(CHECKPOINT_PAUSE_S):
                    break
        finally:
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            conn.close()

    def _finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the rest of the WAL with the writers held off, so that the next write starts
        the WAL over from its beginning.

        A WAL is only started over once a checkpoint has copied all of it, and under a steady
        write load a passive checkpoint never does: writers append while it copies. The WAL
        then grew without end (1.4 GB after 400,000 ingested readings), and every page read
        searched an ever longer WAL index. The copy above has done the bulk; what remains is
        what was written meanwhile, so writers wait a short while.
        """
        with self._write_lock, _FileLock(self._lock_path):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash can lose the
        # last transactions, and never corrupts the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten (retention)
        # Every request thread has its own reader connection: keep each one's page cache and
        # memory map modest so the server stays small (the OS page cache is shared anyway).
        conn.execute("PRAGMA cache_size=-8192")
        conn.execute("PRAGMA temp_store=MEMORY")
        conn.execute("PRAGMA mmap_size=67108864")
        register_sqlite_functions(conn)
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._reader().execute(sql, list(params)).fetchall()

    @contextmanager
    def write(self, tenant: str, create_tenant: bool) -> Iterator[WriteTxn]:
        # The thread lock orders this process's writers; the file lock orders the worker
        # processes of `cityward serve --workers N`. Waiting on flock wakes the moment the other
        # writer commits, where SQLite's busy handler would sleep and poll.
        with self._write_lock, _FileLock(self._lock_path):
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                if create_tenant and tenant:
                    conn.execute("INSERT OR IGNORE INTO tenants(name) VALUES (?)", [tenant])
                yield _SqliteTxn(conn, tenant)
            except BaseException as exc:
                conn.execute("ROLLBACK")
                refused = store_refused(exc)
                if refused is None:
                    raise
                raise refused from exc
            else:
                conn.execute("COMMIT")
                self._wal_dirty.set()

    def _geo_candidates_sql(self, spec: QuerySpec) -> tuple[str, list[Any]]:
        from cityward.bank import geo

        assert spec.geo is not None
        box = geo.candidate_bbox(spec.geo)
        base = f"SELECT id / {GEO_SLOTS} AS e, geom FROM geo_rt WHERE path = ?"
        if box is None:
            return base, [spec.geo_path]
        minx, miny, maxx, maxy = box
        return (
            base + " AND minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?",
            [spec.geo_path, maxx, minx, maxy, miny],
        )

    def close(self) -> None:
        self._closed.set()
        self._wal_dirty.set()
        self._checkpointer.join(timeout=30)
        with self._all_lock:
            for conn in self._all:
                with suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()


_EACH = "(SELECT value FROM json_each(?))"


def _json(rows: Sequence[Any]) -> str:
    return orjson.dumps(rows).decode()


def _cols(n: int) -> str:
    """``value ->> 0, ..., value ->> n-1``: the columns of json_each rows that are arrays."""
    return ", ".join(f"value ->> {i}" for i in range(n))


class _FileLock:
    """An exclusive advisory lock on a file (fcntl.flock), held for one write transaction."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _SqliteTxn(WriteTxn):
    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, tenant: str) -> None:
        self.conn = conn
        self.tenant = tenant

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = self.conn.execute(sql, list(params)).fetchall()
        return rows

    def get_many(self, eids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        # one row holding every match, pk, id and document in turn: one sqlite3_step, see
        # put(). The documents are pasted in as they are stored (JSON texts written by
        # dump_doc): json_group_array(json(doc)) parsed and rebuilt each one first.
        row = self.conn.execute(
            "SELECT group_concat(pk || ',' || json_quote(eid) || ',' || doc, ',') FROM entities "
            f"WHERE tenant = ? AND eid IN {_EACH}",
            [self.tenant, _json(list(dict.fromkeys(eids)))],
        ).fetchone()
        if row[0] is None:
            return {}
        flat = orjson.loads("[" + row[0] + "]")
        return {flat[i + 1]: (flat[i], flat[i + 2]) for i in range(0, len(flat), 3)}

    def new_pks(self, n: int) -> list[int]:
        # A counter, not max(pk) + 1: a pk is never handed out twice, even after the entity
        # that had it was deleted (its history stays keyed by that pk).
        if n == 0:
            return []
        top = int(
            self.conn.execute(
                "UPDATE pk_seq SET v = v + ? WHERE k = 1 RETURNING v", [n]
            ).fetchone()[0]
        )
        return list(range(top - n + 1, top + 1))

    def _clear_derived(self, pks: Sequence[int], same_types: Collection[int] = ()) -> None:
        """Type and geo rows of ``pks`` (their attr_index rows: see put and delete)."""
        keys = _json(pks)
        typed = [pk for pk in pks if pk not in same_types] if same_types else pks
        if typed:
            self.conn.execute(f"DELETE FROM etypes WHERE e IN {_EACH}", [_json(typed)])
        # R-tree ids are looked up one by one: a range on an R-tree id scans the whole tree
        geo_ids = [
            pk * GEO_SLOTS + n
            for pk, ngeo in self.conn.execute(
                f"SELECT pk, ngeo FROM entities WHERE pk IN {_EACH} AND ngeo > 0", [keys]
            )
            for n in range(ngeo)
        ]
        if geo_ids:
            self.conn.execute(f"DELETE FROM geo_rt WHERE id IN {_EACH}", [_json(geo_ids)])

    def put(
        self,
        items: Sequence[tuple[int, dict[str, Any]]],
        replacing: Sequence[int],
        derived: Sequence[Derived | None] = (),
        same_types: Collection[int] = (),
    ) -> None:
        if replacing:
            self._clear_derived(replacing, same_types)
        replaced = set(replacing)
        entity_rows = []
        changed_rows = []  # of entities that exist: an UPDATE leaves their index entries be
        type_rows: list[tuple[int, str]] = []
        idx_rows: list[tuple[int, int, int, int, float | None, str | None]] = []
        odd_rows: list[tuple[int, int, int, int, float | None, str | None]] = []
        geo_rows: list[tuple[int, float, float, float, float, str, str]] = []
        pre = derived or [None] * len(items)
        for (pk, doc), d in zip(items, pre, strict=True):
            types, idx, geos = derived_rows(pk, doc, d)
            if pk in replaced:
                changed_rows.append(
                    (pk, doc["createdAt"], doc["modifiedAt"], len(geos), dump_doc(doc))
                )
            else:
                entity_rows.append(
                    (
                        pk,
                        self.tenant,
                        doc["id"],
                        doc["createdAt"],
                        doc["modifiedAt"],
                        len(geos),
                        dump_doc(doc),
                    )
                )
            if pk not in same_types:
                type_rows.extend(types)
            for n, (e, pid, vt, num, txt) in enumerate(idx):
                row = (e, n, pid, vt, num, txt)
                if num is not None and not math.isfinite(num):
                    odd_rows.append(row)  # JSON has no infinity: these go in one by one
                else:
                    idx_rows.append(row)
            if len(geos) > GEO_SLOTS:
                from cityward.bank.errors import BadRequestData

                raise BadRequestData(
                    f"entity {doc['id']} has more than {GEO_SLOTS} GeoProperty instances",
                    field="entity",
                )
            for n, (_, path, minx, miny, maxx, maxy, geom) in enumerate(geos):
                geo_rows.append((pk * GEO_SLOTS + n, minx, maxx, miny, maxy, path, geom))
        # Each table gets one INSERT ... SELECT over a JSON array instead of executemany: the
        # rows are then inserted by one sqlite3_step with the GIL released throughout. With
        # executemany every row releases and re-takes the GIL, and while another thread runs
        # Python (parsing the next request) each re-take waits out the switch interval: a batch
        # write measured 1,000x slower that way. It also lets parsing overlap the write.
        ex = self.conn.execute
        if entity_rows:
            ex(
                "INSERT OR REPLACE INTO entities(pk, tenant, eid, created, modified, ngeo, doc) "
                f"SELECT {_cols(7)} FROM json_each(?)",
                [_json(entity_rows)],
            )
        if changed_rows:
            # an UPDATE of columns no index holds rewrites the row alone; INSERT OR REPLACE
            # would delete and re-add both index entries of the entity too
            ex(
                "UPDATE entities SET created = v.c, modified = v.m, ngeo = v.g, doc = v.d "
                "FROM (SELECT value ->> 0 AS pk, value ->> 1 AS c, value ->> 2 AS m, "
                "value ->> 3 AS g, value ->> 4 AS d FROM json_each(?)) AS v "
                "WHERE entities.pk = v.pk",
                [_json(changed_rows)],
            )
        if type_rows:
            ex(
                f"INSERT INTO etypes(e, type) SELECT {_cols(2)} FROM json_each(?)",
                [_json(type_rows)],
            )
        idx_json = _json(idx_rows)
        if replacing:
            # An entity's rows are numbered (n) in document order, so an update mostly keeps
            # each row's key (e, path, n) and changes its value. Deleting the rows that are
            # no longer there and upserting the rest writes only the index entries whose
            # value changed; deleting all rows and inserting them again rewrote every entry of
            # the key and both value indexes, a third of the cost of an ingest batch.
            ex(
                f"DELETE FROM attr_index WHERE e IN {_EACH} AND (e, path, n) NOT IN "
                "(SELECT value ->> 0, value ->> 2, value ->> 1 FROM json_each(?))",
                [_json(replacing), idx_json],
            )
        ex(
            f"INSERT INTO attr_index(e, n, path, vt, num, txt) SELECT {_cols(6)} "
            "FROM json_each(?) WHERE true ON CONFLICT (e, path, n) DO UPDATE SET "
            "vt = excluded.vt, num = excluded.num, txt = excluded.txt "
            "WHERE (vt, num, txt) IS NOT (excluded.vt, excluded.num, excluded.txt)",
            [idx_json],
        )
        if odd_rows:
            self.conn.executemany(
                "INSERT INTO attr_index(e, n, path, vt, num, txt) VALUES (?, ?, ?, ?, ?, ?)",
                odd_rows,
            )
        if geo_rows:
            ex(
                "INSERT INTO geo_rt(id, minx, maxx, miny, maxy, path, geom) "
                f"SELECT {_cols(7)} FROM json_each(?)",
                [_json(geo_rows)],
            )

    def delete(self, pks: Sequence[int]) -> None:
        self._clear_derived(pks)
        keys = _json(pks)
        self.conn.execute(f"DELETE FROM attr_index WHERE e IN {_EACH}", [keys])
        self.conn.execute(f"DELETE FROM entities WHERE pk IN {_EACH}", [keys])
