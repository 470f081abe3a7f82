"""The PostgreSQL backend (psycopg 3): same tables as SQLite, a GiST box index for geo-queries."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict, timeout_from_conninfo
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from cityward.bank import geo
from cityward.bank.errors import store_refused, store_unavailable
from cityward.bank.store import (
    StoreMisconfigured,
    StoreUnreachable,
    check_conninfo,
    without_secrets,
)
from cityward.bank.store.base import (
    MIGRATION_LOCK,
    Derived,
    QuerySpec,
    Store,
    WriteTxn,
    derived_rows,
    dump_doc,
    load_doc,
)

log = logging.getLogger(__name__)

# the first key of the per-entity advisory locks (others use 74110001, 74110003, 74110009)
ENTITY_LOCKS = 74110017


def entity_lock_keys(tenant: str, eids: Sequence[str]) -> list[int]:
    """The second keys of the advisory locks of these entities, sorted: a write takes them in
    this order (:meth:`_PgTxn.get_many`; the JetStream ingest writers take the same ones)."""
    return sorted(
        {
            int.from_bytes(
                hashlib.blake2b(f"{tenant}\0{eid}".encode(), digest_size=4).digest(),
                "big",
                signed=True,
            )
            for eid in eids
        }
    )


SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY);
INSERT INTO tenants(name) VALUES ('') ON CONFLICT DO NOTHING;
CREATE SEQUENCE IF NOT EXISTS entities_pk_seq;
CREATE TABLE IF NOT EXISTS entities (
  pk BIGINT PRIMARY KEY,
  tenant TEXT NOT NULL,
  eid TEXT NOT NULL,
  created TEXT NOT NULL,
  modified TEXT NOT NULL,
  doc TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS entities_tenant_eid ON entities(tenant, eid);
CREATE TABLE IF NOT EXISTS etypes (e BIGINT NOT NULL, type TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS etypes_type ON etypes(type, e);
CREATE INDEX IF NOT EXISTS etypes_e ON etypes(e);
CREATE TABLE IF NOT EXISTS attr_index (
  e BIGINT NOT NULL, path BIGINT NOT NULL, vt SMALLINT NOT NULL,
  num DOUBLE PRECISION, txt TEXT
);
CREATE INDEX IF NOT EXISTS attr_index_num ON attr_index(path, vt, num) WHERE num IS NOT NULL;
CREATE INDEX IF NOT EXISTS attr_index_txt ON attr_index(path, vt, txt);
CREATE INDEX IF NOT EXISTS attr_index_e ON attr_index(e, path);
CREATE TABLE IF NOT EXISTS jsonld_contexts (
  tenant TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL,
  created TEXT NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS geo (e BIGINT NOT NULL, path TEXT NOT NULL, bbox BOX NOT NULL,
  geom TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS geo_bbox ON geo USING gist (bbox);
CREATE INDEX IF NOT EXISTS geo_e ON geo(e);
"""

_PLACEHOLDER = re.compile(r"\?")
_CREATES = re.compile(r"^CREATE (?:UNIQUE )?(?:TABLE|INDEX|SEQUENCE) IF NOT EXISTS (\w+)")


def missing_statements(conn: psycopg.Connection[Any], script: str) -> list[str]:
    """The statements of ``script`` (``;`` at line ends, no function bodies) to run on this
    database: those creating a table, index or sequence that the current schema lacks, and
    every statement that creates none of these.

    CREATE INDEX IF NOT EXISTS locks its table (SHARE, which waits for every writer) before it
    looks at the name. A node starting on a live database took those locks on entities,
    etypes, attr_index and geo one after the other while writers held some of them and
    wanted others: a deadlock, killing the start or a writer's request. The catalog read
    takes no lock.
    """
    present = {
        str(r[0])
        for r in conn.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = "
            "(SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
        )
    }
    out = []
    for part in script.split(";\n"):
        # comment lines dropped, not the statement they stand before
        stmt = "\n".join(x for x in part.splitlines() if not x.strip().startswith("--")).strip()
        if not stmt:
            continue
        made = _CREATES.match(stmt)
        if made is None or made.group(1) not in present:
            out.append(stmt)
    return out


# how long a connection attempt waits for a server that does not answer, unless the URL sets
# libpq's connect_timeout (the setting database_connect_timeout_s, whose default this is)
CONNECT_TIMEOUT_S = 5

# (what a libpq message says, the reason given for it), the first that matches
_UNREACHABLE = [
    (re.compile(p, re.IGNORECASE), reason)
    for p, reason in (
        (r"timeout expired", "timed out"),
        (r"connection refused", "connection refused"),
        (r"failed to resolve host|could not translate host name", "host not found"),
        (
            r"authentication failed|no pg_hba\.conf entry|^role \".*\" does not exist",
            "authentication failed",
        ),
        (r"^database \".*\" does not exist", "database does not exist"),
    )
]

# what libpq (or the server, for a startup parameter) says of a parameter value it refuses:
# a configuration error, not a database that cannot be reached
_REFUSED_VALUE = re.compile(
    r'invalid "?(?P<a>\w+)"? value|for connection option "(?P<b>\w+)"|'
    r'invalid value for parameter "(?P<c>\w+)"|invalid (?P<d>port) number',
    re.IGNORECASE,
)


def connect_kwargs(
    url: str, kwargs: dict[str, Any] | None = None, connect_timeout_s: int | None = None
) -> dict[str, Any]:
    """``kwargs`` for psycopg.connect and the pool, with ``connect_timeout`` (the setting's,
    else 5 s) where neither they nor the URL set it: libpq's parameter in the URL is the more
    particular statement, of one database, and wins over the setting of the whole node (a
    keyword argument would replace the URL's, so none is given then)."""
    params: dict[str, Any] = dict(kwargs or {})
    if "connect_timeout" not in params and conninfo_to_dict(url).get("connect_timeout") is None:
        params["connect_timeout"] = connect_timeout_s or CONNECT_TIMEOUT_S
    return params


def check_reachable(
    url: str, kwargs: dict[str, Any] | None = None, *, connect_timeout_s: int | None = None
) -> None:
    """One direct connection to ``url`` (with the pool's ``kwargs``), or StoreUnreachable;
    StoreMisconfigured for a URL libpq refuses whatever the server.

    A pool that cannot connect keeps trying in the background until a caller's wait for a
    connection ends (30 s), then says only that it had none: a store opened on a mistyped URL
    or a stopped server took 30 s to say so, without why. This attempt fails at once on a
    refusal and after the connect timeout (:func:`connect_kwargs`) on a server that does not
    answer. Connections lost later are the pool's to retry, as before.
    """
    check_conninfo(url)
    params = connect_kwargs(url, kwargs, connect_timeout_s)
    try:
        psycopg.connect(url, **params).close()
    except psycopg.OperationalError as exc:
        # "connection failed: connection to server at "h", port 5432 failed: FATAL:  why"
        text = " ".join(str(exc).split("\n", 1)[0].split())
        refused = _REFUSED_VALUE.search(text)
        if refused:
            # a value libpq checks that check_database_url does not (require_auth=...)
            name = next(v for v in refused.groupdict().values() if v)
            why = without_secrets(url, text.rpartition(" failed: ")[2])
            raise StoreMisconfigured(url, name, why.removeprefix("connection is bad: ")) from exc
        why = text.rpartition(" failed: ")[2].removeprefix("FATAL: ").strip()
        reason = next((r for p, r in _UNREACHABLE if p.search(why)), "connection failed")
        if reason == "timed out":
            # as psycopg waited: at least 2 s, 0 or less its own default
            given = params.get("connect_timeout", conninfo_to_dict(url).get("connect_timeout"))
            timeout = timeout_from_conninfo({"connect_timeout": given})
            reason, why = f"timed out after {timeout} s", ""
        elif why.lower() == reason:
            why = ""
        raise StoreUnreachable(url, reason, without_secrets(url, why)) from exc


def open_pool(
    url: str, max_size: int, kwargs: dict[str, Any]
) -> ConnectionPool[psycopg.Connection[TupleRow]]:
    """A pool of connections to ``url`` (the store's, the notification outbox's). Checked:
    a pooled connection whose server session ended (pg_terminate_backend, a server restart)
    is replaced before use instead of failing the request given it."""
    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs=kwargs,
        open=True,
        check=ConnectionPool.check_connection,
    )


def to_pg(sql: str) -> str:
    """Our SQL uses ``?`` placeholders everywhere; psycopg wants ``%s``."""
    return _PLACEHOLDER.sub("%s", sql)


class PostgresStore(Store):
    """PostgreSQL through a connection pool; each write is one transaction."""

    dialect = "postgres"

    def __init__(
        self,
        url: str,
        schema: str | None = None,
        max_size: int = 8,
        *,
        connect_timeout_s: int | None = None,
    ) -> None:
        check_conninfo(url)  # before conninfo_to_dict below raises a bare ProgrammingError
        self.url = url
        self.schema = schema
        # JIT off: the planner's row guesses for history aggregation trigger JIT compiling that
        # costs far more than the query itself (1.5 s on small tables, +65 ms at 1M rows).
        # TimeZone UTC: psycopg loads a timestamptz in the session's zone, and in any other
        # zone an instance at 9999-12-31T23:30Z lies in year 10000 (near year 1, in year 0),
        # which no datetime holds: every temporal read of it answered 500. date_trunc and
        # interval arithmetic (aggregation buckets) also follow the session's zone.
        options = "-c jit=off -c TimeZone=UTC"
        # the URL's own options (?options=-csearch_path%3Dcity: a schema of its own) would be
        # replaced by these otherwise; a ``schema`` given here comes after them and wins
        own = conninfo_to_dict(url).get("options")
        if own:
            options = f"{own} {options}"
        if schema:
            options += f" -c search_path={schema}"
        # the connect timeout for the pool's connections too: without one a pool reconnecting
        # to a server that stopped answering waited as long as the operating system did
        kwargs = connect_kwargs(url, {"autocommit": False, "options": options}, connect_timeout_s)
        check_reachable(url, kwargs)
        self.pool = open_pool(url, max_size, kwargs)
        self._stats_lock = threading.Lock()
        self._written = 0
        self._analyzed_at = 0
        self._analyzing = False
        with self.pool.connection() as conn:
            # one migration at a time when several nodes start together (the schema too:
            # CREATE ... IF NOT EXISTS races in the catalog)
            conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            if schema:
                conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            # only what is missing (on a running city: nothing but the tenant row, which
            # locks no table against writers), each in a transaction of its own: one that
            # held a table's lock while it waited for the next one's could deadlock writers
            # (see missing_statements). The migration lock is taken again for each.
            for stmt in missing_statements(conn, SCHEMA):
                conn.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
                conn.execute(stmt)
                conn.commit()
            conn.commit()

    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        try:
            with self.pool.connection() as conn:
                return conn.execute(to_pg(sql), list(params)).fetchall()
        except psycopg.OperationalError as exc:
            lost = store_unavailable(exc)
            if lost is None:
                raise
            raise lost from exc

    # Counting a driver reads heap pages here (index-only scans need a vacuumed table), so
    # the planner counts less far than on SQLite.
    COUNT_CAP = 3000

    @contextmanager
    def write(self, tenant: str, create_tenant: bool) -> Iterator[WriteTxn]:
        try:
            with self.pool.connection() as conn, conn.transaction():
                if create_tenant and tenant:
                    conn.execute(
                        "INSERT INTO tenants(name) VALUES (%s) ON CONFLICT DO NOTHING", [tenant]
                    )
                txn = _PgTxn(conn, tenant)
                yield txn
        except Exception as exc:  # rolled back: a data error becomes the caller's 400
            refused = store_refused(exc) or store_unavailable(exc)  # a lost connection: 503
            if refused is None:
                raise
            raise refused from exc
        self._maybe_analyze(txn.written)

    def _maybe_analyze(self, written: int) -> None:
        """Refresh planner statistics after bulk loads instead of waiting for autovacuum.

        Right after a city's first import PostgreSQL still believes the tables are empty and
        picks plans that read the whole index for every query. The ANALYZE runs on a thread of
        its own: with a million history rows it takes most of a second, which a write request
        must not wait for (it showed as an 800 ms stall of every notification behind it).
        """
        with self._stats_lock:
            self._written += written
            if self._written < max(10_000, self._analyzed_at // 5) or self._analyzing:
                return
            self._analyzed_at += self._written
            self._written = 0
            self._analyzing = True
        threading.Thread(target=self._analyze, name="pg-analyze", daemon=True).start()

    def _analyze(self) -> None:
        try:
            with self.pool.connection() as conn:
                conn.execute("ANALYZE entities, etypes, attr_index, geo")
                if conn.execute("SELECT to_regclass('attr_history')").fetchone() != (None,):
                    conn.execute("ANALYZE attr_history")
                conn.commit()
        except Exception:  # the pool may be closing; statistics are only an optimisation
            log.debug("ANALYZE after a bulk load failed", exc_info=True)
        finally:
            with self._stats_lock:
                self._analyzing = False

    def _geo_candidates_sql(self, spec: QuerySpec) -> tuple[str, list[Any]]:
        assert spec.geo is not None
        box = geo.candidate_bbox(spec.geo)
        base = "SELECT e, geom FROM geo WHERE path = ?"
        if box is None:
            return base, [spec.geo_path]
        minx, miny, maxx, maxy = box
        return (
            base + " AND bbox && box(point(?, ?), point(?, ?))",
            [spec.geo_path, minx, miny, maxx, maxy],
        )

    def close(self) -> None:
        self.pool.close()


class _PgTxn(WriteTxn):
    dialect = "postgres"

    def __init__(self, conn: psycopg.Connection[Any], tenant: str) -> None:
        self.conn = conn
        self.tenant = tenant
        self.written = 0  # entities put, for the statistics refresh
        self._locked: set[int] = set()  # the entity lock keys this transaction holds

    def lock_entities(self, eids: Sequence[str]) -> None:
        """Take the advisory lock of each entity this transaction does not hold yet, in the
        order of their keys; held to the commit or rollback (see get_many)."""
        keys = [k for k in entity_lock_keys(self.tenant, eids) if k not in self._locked]
        if not keys:
            return
        # the keys in one JSON text: psycopg adapts a list parameter element by element in
        # Python; the function scan yields them in order, and the locks are taken row by row
        self.conn.execute(
            "SELECT pg_advisory_xact_lock(%s::int, k::int) "
            "FROM json_array_elements_text(%s::json) AS k",
            [ENTITY_LOCKS, orjson.dumps(keys).decode()],
        )
        self._locked.update(keys)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(to_pg(sql), list(params))
        return cur.fetchall() if cur.description is not None else []

    def get_many(self, eids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        unique = list(dict.fromkeys(eids))
        if not unique:
            return out
        # Writers of one entity take turns on its advisory lock, taken in one order (two
        # writers never wait for each other in a circle) and held to the commit. FOR UPDATE
        # alone is not enough: an update deletes the entity's row and copies the new one in
        # (COPY: several times an UPDATE's speed on a batch), and a writer that waited on the
        # deleted row skips it, finds no entity, and answers "not found" (an update) or fails
        # on the unique key (an upsert). After the advisory lock this SELECT, a new
        # statement, sees the committed new row. New entities are covered too.
        self.lock_entities(unique)
        rows = self.conn.execute(
            "SELECT pk, eid, doc FROM entities WHERE tenant = %s AND eid = ANY(%s) "
            "ORDER BY pk FOR UPDATE",
            [self.tenant, unique],
        ).fetchall()
        for pk, eid, doc in rows:
            out[eid] = (int(pk), load_doc(doc))
        return out

    def new_pks(self, n: int) -> list[int]:
        if n == 0:
            return []
        rows = self.conn.execute(
            "SELECT nextval('entities_pk_seq') FROM generate_series(1, %s)", [n]
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _clear_derived(self, pks: Sequence[int], same_types: Collection[int] = ()) -> None:
        pk_list = list(pks)
        typed = [pk for pk in pk_list if pk not in same_types] if same_types else pk_list
        if typed:
            self.conn.execute("DELETE FROM etypes WHERE e = ANY(%s)", [typed])
        self.conn.execute("DELETE FROM attr_index WHERE e = ANY(%s)", [pk_list])
        self.conn.execute("DELETE FROM geo WHERE e = ANY(%s)", [pk_list])

    def put(
        self,
        items: Sequence[tuple[int, dict[str, Any]]],
        replacing: Sequence[int],
        derived: Sequence[Derived | None] = (),
        same_types: Collection[int] = (),
    ) -> None:
        if replacing:
            # the type rows of an entity whose types did not change stay as they are (an
            # ingest update: deleting and copying them again was 7 us of a reading's 120)
            self._clear_derived(replacing, same_types)
            self.conn.execute("DELETE FROM entities WHERE pk = ANY(%s)", [list(replacing)])
        self.written += len(items)
        with self.conn.cursor() as cur:
            # COPY is several times faster than INSERT for the thousands of rows of a batch
            pre = derived or [None] * len(items)
            rows = [derived_rows(pk, doc, d) for (pk, doc), d in zip(items, pre, strict=True)]
            with cur.copy(
                "COPY entities (pk, tenant, eid, created, modified, doc) FROM STDIN"
            ) as copy:
                for pk, doc in items:
                    copy.write_row(
                        (
                            pk,
                            self.tenant,
                            doc["id"],
                            doc["createdAt"],
                            doc["modifiedAt"],
                            dump_doc(doc),
                        )
                    )
            if same_types:
                keep = set(same_types)
                rows_typed = [r for (pk, _), r in zip(items, rows, strict=True) if pk not in keep]
            else:
                rows_typed = rows
            if any(types for types, _, _ in rows_typed):
                with cur.copy("COPY etypes (e, type) FROM STDIN") as copy:
                    for types, _, _ in rows_typed:
                        for row in types:
                            copy.write_row(row)
            with cur.copy("COPY attr_index (e, path, vt, num, txt) FROM STDIN") as copy:
                for _, idx, _ in rows:
                    for irow in idx:
                        copy.write_row(irow)
            with cur.copy("COPY geo (e, path, bbox, geom) FROM STDIN") as copy:
                for _, _, geos in rows:
                    for e, path, minx, miny, maxx, maxy, geom in geos:
                        copy.write_row((e, path, f"({minx!r},{miny!r}),({maxx!r},{maxy!r})", geom))

    def delete(self, pks: Sequence[int]) -> None:
        self._clear_derived(pks)
        self.conn.execute("DELETE FROM entities WHERE pk = ANY(%s)", [list(pks)])
