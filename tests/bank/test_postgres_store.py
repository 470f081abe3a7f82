"""PostgresStore against a real PostgreSQL: its sessions, its start on a live database, its
pool under writes that need new history partitions, and lost connections."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cityward.bank.errors import ServiceUnavailable
from cityward.bank.history import History
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.temporal import TemporalQuery, decode_instances, instances_sql
from cityward.bank.temporal.schema import MAX_NEW_PARTITIONS
from tests.conftest import PG_URL, drop_pg_store

pytestmark = pytest.mark.postgres

CORE = ContextResolver(allow_fetch=False).core
PARSER = EntityParser(CORE)
EID = "urn:ngsi-ld:Sensor:s1"


def _schema() -> str:
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def zoned() -> Iterator[PostgresStore]:
    """A store whose URL sets a session TimeZone far from UTC (+13:45), as a database or
    role default (ALTER DATABASE ... SET timezone) or PGTZ would."""
    url = make_conninfo(PG_URL, options="-c TimeZone=Pacific/Chatham")
    store = PostgresStore(url, schema=_schema(), max_size=4)
    yield store
    drop_pg_store(store)


def test_history_at_the_ends_of_time_reads_back_whatever_the_session_time_zone(
    zoned: PostgresStore,
) -> None:
    """psycopg loads a timestamptz in the session's zone: at +13:45, 9999-12-31T23:30Z is in
    year 10000, which no datetime holds, and every temporal read of the entity failed."""
    bank = Bank(zoned)
    History(zoned, bank)
    stamps = ["0001-01-01T00:00:00Z", "2024-06-01T00:00:00Z", "9999-12-31T23:30:00Z"]
    for n, stamp in enumerate(stamps):
        body = {
            "id": EID,
            "type": "Sensor",
            "t": {"type": "Property", "value": n, "observedAt": stamp},
        }
        bank.batch_upsert("", [PARSER.entity(body)], "update")
    (pk,) = zoned.select("SELECT pk FROM entities")[0]
    q = TemporalQuery()
    sql, params = instances_sql("postgres", q, [int(pk)])
    found = decode_instances("postgres", q, zoned.select(sql, params))
    assert [h.time for h in found] == [
        "0001-01-01T00:00:00.000000Z",
        "2024-06-01T00:00:00.000000Z",
        "9999-12-31T23:30:00.000000Z",
    ]
    last = zoned.select("SELECT max(obs) FROM attr_history")[0][0]
    assert last == datetime(9999, 12, 31, 23, 30, tzinfo=UTC)


@pytest.fixture
def pg() -> Iterator[PostgresStore]:
    store = PostgresStore(PG_URL, schema=_schema(), max_size=3)
    yield store
    drop_pg_store(store)


def _reading(eid: str, stamp: str, value: int = 1) -> dict[str, Any]:
    return PARSER.entity(
        {
            "id": eid,
            "type": "Sensor",
            "v": {"type": "Property", "value": value, "observedAt": stamp},
        }
    )


def _partitions(store: PostgresStore) -> list[str]:
    rows = store.select(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'attr_history'::regclass AND c.relname <> 'attr_history_default' "
        "ORDER BY 1"
    )
    return [r[0] for r in rows]


def test_writes_into_new_months_never_take_a_second_pooled_connection(pg: PostgresStore) -> None:
    """The history hook made a missing month partition on a second pooled connection while its
    write held one: with as many such writes as the pool has connections, each waited for a
    second one until the pool timed out (30 s, then 500). Now a write holds one connection."""
    bank = Bank(pg)
    History(pg, bank)
    writing = threading.local()
    taken: list[str] = []
    connection = pg.pool.connection
    write = pg.write

    @contextmanager
    def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
        if getattr(writing, "depth", 0):
            taken.append(threading.current_thread().name)
        with connection(*args, **kwargs) as conn:
            yield conn

    @contextmanager
    def marked(tenant: str, create_tenant: bool) -> Iterator[Any]:
        with write(tenant, create_tenant) as txn:  # its own connection
            writing.depth = getattr(writing, "depth", 0) + 1
            try:
                yield txn
            finally:
                writing.depth -= 1

    pg.pool.connection = counted  # type: ignore[method-assign]
    pg.write = marked  # type: ignore[method-assign]
    pg.pool.timeout = 10  # an exhausted pool fails the writes below instead of stalling 30 s
    months = [f"{2101 + n // 12}-{n % 12 + 1:02d}-15T00:00:00Z" for n in range(8)]
    errors: list[str] = []
    start = threading.Barrier(len(months))

    def post(n: int) -> None:
        start.wait()
        try:
            bank.create("", _reading(f"urn:ngsi-ld:Sensor:p{n}", months[n]))
        except Exception as exc:  # PoolTimeout on the old code
            errors.append(f"{n}: {exc!r}")

    threads = [threading.Thread(target=post, args=(n,)) for n in range(len(months))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert taken == []
    # every month got its partition before its write: nothing waits in the default one
    assert pg.select("SELECT count(*) FROM attr_history_default")[0][0] == 0
    assert pg.select("SELECT count(*) FROM attr_history")[0][0] == len(months)
    assert len(_partitions(pg)) >= len(months)


def test_months_past_the_partition_cap_get_theirs_from_later_writes(pg: PostgresStore) -> None:
    """A write spanning more months than one call makes (MAX_NEW_PARTITIONS) marked them all
    as made: the rest never got a partition in this process, their rows stayed in the default
    partition, and so did every later row of those months."""
    bank = Bank(pg)
    History(pg, bank)
    months = [f"{2025 + n // 12}-{n % 12 + 1:02d}" for n in range(MAX_NEW_PARTITIONS + 2)]
    docs = [_reading(f"urn:ngsi-ld:Sensor:m{n}", f"{m}-15T00:00:00Z") for n, m in enumerate(months)]
    bank.batch_upsert("", docs, "update")
    for n in range(3):  # later writes in the last month
        bank.batch_upsert("", [_reading(EID, f"{months[-1]}-20T00:00:0{n}Z", n)], "update")
    made = _partitions(pg)  # (this month's too: writes stamp instances without observedAt)
    assert {f"attr_history_p{m.replace('-', '')}" for m in months} <= set(made)
    assert pg.select("SELECT count(*) FROM attr_history_default")[0][0] == 0
    assert pg.select("SELECT count(*) FROM attr_history")[0][0] == len(months) + 3


def test_a_node_starts_beside_open_write_transactions(pg: PostgresStore) -> None:
    """Starting on an existing database ran the whole schema script in one transaction, and
    CREATE INDEX IF NOT EXISTS locks its table (SHARE) before it finds the index there: a start
    waited for every writer of entities, then etypes, ... holding the locks it had, and
    deadlocked with writers wanting them. A start now takes no lock that a writer holds."""
    bank = Bank(pg)
    History(pg, bank)
    bank.batch_upsert("", [_reading(EID, "2024-06-01T00:00:00Z")], "update")
    # a write in flight: its locks on entities, etypes, attr_index and attr_history
    with pg.write("", create_tenant=False) as txn:
        txn.execute("LOCK TABLE entities, etypes, attr_index, geo IN ROW EXCLUSIVE MODE")
        txn.execute("LOCK TABLE attr_history IN ROW EXCLUSIVE MODE")
        # a lock wait fails the start instead of waiting for this transaction forever
        url = make_conninfo(PG_URL, options="-c lock_timeout=5s")
        node = PostgresStore(url, schema=pg.schema, max_size=2)
        try:
            History(node, Bank(node))
        finally:
            node.close()
        txn.execute("SELECT 1")
    assert pg.select("SELECT count(*) FROM attr_history")[0][0] == 1


def _terminate(pids: list[int]) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(p) FROM unnest(%s::int[]) AS p", [pids])


def test_lost_pooled_connections_are_replaced_before_use(pg: PostgresStore) -> None:
    """The pool handed out connections whose server session had ended (pg_terminate_backend,
    a server restart): each request given one answered 500."""
    bank = Bank(pg)
    held = [pg.pool.getconn() for _ in range(3)]
    pids = [c.info.backend_pid for c in held]
    for c in held:
        pg.pool.putconn(c)
    _terminate(pids)
    for _ in range(4):
        assert pg.select("SELECT count(*) FROM entities") == [(0,)]
    bank.create("", _reading(EID, "2024-06-01T00:00:00Z"))
    assert bank.retrieve("", EID)["id"] == EID


def test_a_connection_lost_in_a_write_is_a_503(pg: PostgresStore) -> None:
    """A session ended under a running write: ServiceUnavailable (try again), not a 500."""
    with pytest.raises(ServiceUnavailable), pg.write("", create_tenant=False) as txn:
        (pid,) = txn.execute("SELECT pg_backend_pid()")[0]
        _terminate([pid])
        txn.execute("SELECT 1")
    # a lock timeout is no lost connection: it stays what it is (retention catches it)
    with pytest.raises(psycopg.errors.LockNotAvailable), pg.write("", False) as txn:
        txn.execute("SET LOCAL lock_timeout = '10ms'")
        with pg.write("", False) as other:
            other.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
            txn.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
