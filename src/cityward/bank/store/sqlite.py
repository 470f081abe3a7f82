"""The embedded backend: one SQLite file in WAL mode, an R-tree for geo-queries."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from cityward.bank.query.sqlgen import register_sqlite_functions
from cityward.bank.store.base import QuerySpec, Store, WriteTxn, derived_rows, dump_doc, load_doc

# Geo rows live in an R-tree whose integer id encodes the entity: id = pk * GEO_SLOTS + n, so an
# entity's boxes are one id range (R-tree auxiliary columns cannot be indexed).
GEO_SLOTS = 64

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

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS crash can lose the
        # last transactions, and never corrupts the file.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=10000")
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
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

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
        with self._all_lock:
            for conn in self._all:
                with suppress(sqlite3.Error):
                    conn.close()
            self._all.clear()


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
    def __init__(self, conn: sqlite3.Connection, tenant: str) -> None:
        self.conn = conn
        self.tenant = tenant

    def get_many(self, eids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        unique = list(dict.fromkeys(eids))
        for i in range(0, len(unique), 500):
            chunk = unique[i : i + 500]
            marks = ",".join("?" * len(chunk))
            for pk, eid, doc in self.conn.execute(
                f"SELECT pk, eid, doc FROM entities WHERE tenant = ? AND eid IN ({marks})",
                [self.tenant, *chunk],
            ):
                out[eid] = (pk, load_doc(doc))
        return out

    def new_pks(self, n: int) -> list[int]:
        # Safe: we hold the only write transaction (BEGIN IMMEDIATE under the write lock).
        top = self.conn.execute("SELECT coalesce(max(pk), 0) FROM entities").fetchone()[0]
        start = int(top) + 1 + getattr(self, "_handed", 0)
        self._handed = getattr(self, "_handed", 0) + n
        return list(range(start, start + n))

    def _clear_derived(self, pks: Sequence[int]) -> None:
        for i in range(0, len(pks), 500):
            chunk = list(pks[i : i + 500])
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM etypes WHERE e IN ({marks})", chunk)
            self.conn.execute(f"DELETE FROM attr_index WHERE e IN ({marks})", chunk)
            # R-tree ids are looked up one by one: a range on an R-tree id scans the whole tree
            geo_ids = [
                (pk * GEO_SLOTS + n,)
                for pk, ngeo in self.conn.execute(
                    f"SELECT pk, ngeo FROM entities WHERE pk IN ({marks}) AND ngeo > 0", chunk
                )
                for n in range(ngeo)
            ]
            self.conn.executemany("DELETE FROM geo_rt WHERE id = ?", geo_ids)

    def put(self, items: Sequence[tuple[int, dict[str, Any]]], replacing: Sequence[int]) -> None:
        if replacing:
            self._clear_derived(replacing)
        entity_rows = []
        type_rows: list[tuple[int, str]] = []
        idx_rows: list[tuple[int, int, int, int, float | None, str | None]] = []
        geo_rows: list[tuple[int, float, float, float, float, str, str]] = []
        for pk, doc in items:
            types, idx, geos = derived_rows(pk, doc)
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
            type_rows.extend(types)
            idx_rows.extend((r[0], n, *r[1:]) for n, r in enumerate(idx))
            if len(geos) > GEO_SLOTS:
                from cityward.bank.errors import BadRequestData

                raise BadRequestData(
                    f"entity {doc['id']} has more than {GEO_SLOTS} GeoProperty instances",
                    field="entity",
                )
            for n, (_, path, minx, miny, maxx, maxy, geom) in enumerate(geos):
                geo_rows.append((pk * GEO_SLOTS + n, minx, maxx, miny, maxy, path, geom))
        self.conn.executemany(
            "INSERT OR REPLACE INTO entities(pk, tenant, eid, created, modified, ngeo, doc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            entity_rows,
        )
        self.conn.executemany("INSERT INTO etypes(e, type) VALUES (?, ?)", type_rows)
        self.conn.executemany(
            "INSERT INTO attr_index(e, n, path, vt, num, txt) VALUES (?, ?, ?, ?, ?, ?)",
            idx_rows,
        )
        if geo_rows:
            self.conn.executemany(
                "INSERT INTO geo_rt(id, minx, maxx, miny, maxy, path, geom) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                geo_rows,
            )

    def delete(self, pks: Sequence[int]) -> None:
        self._clear_derived(pks)
        for i in range(0, len(pks), 500):
            chunk = list(pks[i : i + 500])
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM entities WHERE pk IN ({marks})", chunk)
