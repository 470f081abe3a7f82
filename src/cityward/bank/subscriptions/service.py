"""Subscriptions as part of a running data bank: stored, matched on writes, delivered.

Subscriptions live in the store's ``subscriptions`` table (so every worker process and a
restart see them). ``subscriptions_version`` counts their changes; each write checks it in its
own transaction and reloads the matching index when another process changed them. One process
per database runs the dispatcher: the one that holds the dispatcher lock (a file lock next to
the SQLite database, a PostgreSQL advisory lock of the schema); the others only enqueue, and the
dispatcher picks their notifications up on its next poll. The delivering process also checks
the version on every periodic tick (and when a result names a subscription it does not know):
it may write nothing itself, yet its periodic notifications, delivery counters and what it
holds of deleted subscriptions follow the changes other processes make.

A subscription's pending notifications follow it, in the transaction that changes it: an
update re-points them to its current endpoint, a delete deletes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from cityward.bank.changes import Change
from cityward.bank.errors import AlreadyExists, ResourceNotFound
from cityward.bank.jsonld import ContextResolver
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.bank.subscriptions.dispatcher import DeliveryResult, Dispatcher
from cityward.bank.subscriptions.hook import NotificationHook
from cityward.bank.subscriptions.matcher import (
    build_notification,
    readdressed,
    render_current,
    selects,
)
from cityward.bank.subscriptions.model import DeliveryStats, Subscription
from cityward.bank.subscriptions.outbox import (
    Outbox,
    OutboxItem,
    PostgresOutboxDB,
    SqliteOutboxDB,
)

log = logging.getLogger(__name__)

SQLITE_DDL = """
CREATE TABLE IF NOT EXISTS subscriptions (
  tenant TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS subscription_stats (
  tenant TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS subscriptions_version (k INTEGER PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO subscriptions_version(k, v) VALUES (1, 0);
"""
POSTGRES_DDL = """
CREATE TABLE IF NOT EXISTS subscriptions (
  tenant TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS subscription_stats (
  tenant TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (tenant, id)
);
CREATE TABLE IF NOT EXISTS subscriptions_version (k INTEGER PRIMARY KEY, v BIGINT NOT NULL);
INSERT INTO subscriptions_version(k, v) VALUES (1, 0) ON CONFLICT DO NOTHING;
"""
# PostgreSQL advisory lock (DISPATCHER_LOCK, hashtext(current_schema())): one dispatcher per
# schema, so deployments in different schemas of one database each deliver their own
DISPATCHER_LOCK = 0x63697479  # "city"
_PG_LOCK_ARGS = "%s, hashtext(current_schema())"
PERIODIC_TICK_S = 0.5  # how often timeInterval subscriptions are checked
PERIODIC_MAX_ENTITIES = 1000  # entities in one periodic notification at most
STATS_FLUSH_S = 2.0  # delivery counters reach the database this often (and on stop)
# the owner inside the stored body: no column of its own, so tables made before owners were
# recorded need no migration (their rows have none: NULL, which no owner equals)
_OWNER_SQL = {"sqlite": "json_extract(body, '$.owner')", "postgres": "(body::json ->> 'owner')"}


def _adopt(sub: Subscription, stats: DeliveryStats) -> None:
    """Give ``sub`` (frozen, with a mutable stats member) the counters of ``stats``."""
    sub.stats.__dict__.update(stats.__dict__)


def _now() -> datetime:
    return datetime.now(UTC)


class Subscriptions:
    """CRUD of subscriptions plus the write hook and the dispatcher of one store."""

    def __init__(self, store: Store, bank: Bank, resolver: ContextResolver) -> None:
        self.store = store
        self.bank = bank
        with store.write("", create_tenant=False) as txn:
            txn.lock_migrations()
            if txn.dialect == "sqlite":
                # statement by statement: executescript would commit the open transaction
                for stmt in SQLITE_DDL.split(";"):
                    if stmt.strip():
                        txn.execute(stmt)
            else:
                txn.conn.execute(POSTGRES_DDL)
        if store.dialect == "sqlite":
            path = Path(store.path)  # type: ignore[attr-defined]
            self.outbox = Outbox(SqliteOutboxDB(path))
            self._lock_path: Path | None = path.with_name(path.name + ".dispatcher")
        else:
            self.outbox = Outbox(PostgresOutboxDB(store.pool))  # type: ignore[attr-defined]
            self._lock_path = None
        # a 0.1 s poll bounds the delay of a missed wake-up and of other workers' writes
        self.dispatcher = Dispatcher(self.outbox, on_result=self._on_result, poll_interval=0.1)
        self.hook = NotificationHook(self.outbox, resolver.resolve, self.dispatcher)
        self._version = -1
        # a reload and our own change's update of the index (both after their commit) take
        # turns: a reload that read the rows before the change must not undo it afterwards
        self._index_lock = threading.RLock()
        self._periodic_task: asyncio.Task[None] | None = None
        self._periodic_last: dict[tuple[str, str], datetime] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._lock_fd: int | None = None
        self._lock_conn: Any = None
        self.dispatching = False
        self._reload(self._read_version())
        bank.hooks.append(self._write_hook)
        bank.feed.subscribe(self.hook.committed)

    # -- keeping the index current ----------------------------------------------------------
    def _read_version(self) -> int:
        return int(self.store.select("SELECT v FROM subscriptions_version WHERE k = 1")[0][0])

    def _stored_stats(self) -> dict[tuple[str, str], DeliveryStats]:
        return {
            (str(t), str(i)): DeliveryStats.from_dict(orjson.loads(b))
            for t, i, b in self.store.select("SELECT tenant, id, body FROM subscription_stats")
        }

    def refresh(self) -> None:
        """Reload the index if another process changed the subscriptions."""
        version = self._read_version()
        if version != self._version:
            self._reload(version)

    def _reload(self, version: int) -> None:
        """Load the index from the database; the dispatcher lets go of what it holds of the
        subscriptions another process deleted (their rows went with them): at once for those
        the index had, after a check of the outbox for any (one created and deleted between
        two reloads was never in the index)."""
        with self._index_lock:
            before = self.hook.ids()
            self._load(version)
        for tenant, sid in before:
            if self.hook.get(tenant, sid) is None:
                self.dispatcher.forget(tenant, sid)
        self.dispatcher.prune()

    def _load(self, version: int) -> None:
        by_tenant: dict[str, list[Subscription]] = {}
        stored = self._stored_stats()
        for tenant, body in self.store.select("SELECT tenant, body FROM subscriptions"):
            try:
                sub = Subscription.from_stored(orjson.loads(body))
            except Exception:  # a row this version cannot read must not stop the others
                log.exception("subscription row of tenant %r could not be read", tenant)
                continue
            old = self.hook.get(str(tenant), sub.id)
            if old is not None:
                _adopt(sub, old.stats)
            elif (str(tenant), sub.id) in stored:
                _adopt(sub, stored[(str(tenant), sub.id)])
            by_tenant.setdefault(str(tenant), []).append(sub)
        for tenant in set(by_tenant) | set(self.hook._indexes):
            self.hook.load(tenant, by_tenant.get(tenant, []))
        self._version = version

    def _write_hook(self, txn: WriteTxn, changes: list[Change]) -> None:
        version = int(txn.execute("SELECT v FROM subscriptions_version WHERE k = 1")[0][0])
        if version != self._version:
            self._reload(version)
        self.hook(txn, changes)

    def _bump(self, txn: WriteTxn) -> int:
        """Count a change of the subscriptions; returns the new version."""
        rows = txn.execute("UPDATE subscriptions_version SET v = v + 1 WHERE k = 1 RETURNING v")
        return int(rows[0][0])

    def _bumped(self, version: int) -> None:
        """Our own change (already applied to the index) made ``version``: when the index was
        current before it, it still is, and the next write need not reload it. The caller
        holds _index_lock."""
        if self._version == version - 1:
            self._version = version

    # -- CRUD -------------------------------------------------------------------------------
    # ``owner``, where given, limits the operation to that owner's subscriptions: the others
    # are not found (a caller must not learn that someone else's exists). None: all of them.
    def _of_owner(self, owner: str | None) -> tuple[str, list[str]]:
        """The SQL condition (and its parameters) that keeps ``owner``'s subscriptions."""
        if owner is None:
            return "", []
        return f" AND {_OWNER_SQL[self.store.dialect]} = ?", [owner]

    def create(self, tenant: str, sub: Subscription) -> None:
        with self.store.write(tenant, create_tenant=True) as txn:
            found = txn.execute(
                "SELECT 1 FROM subscriptions WHERE tenant = ? AND id = ?", [tenant, sub.id]
            )
            if found:
                raise AlreadyExists(f"subscription {sub.id} already exists", field="id")
            txn.execute(
                "INSERT INTO subscriptions(tenant, id, body) VALUES (?, ?, ?)",
                [tenant, sub.id, orjson.dumps(sub.to_stored()).decode()],
            )
            version = self._bump(txn)
        with self._index_lock:
            self.hook.put(tenant, sub)
            self._bumped(version)

    def get(self, tenant: str, sid: str, *, owner: str | None = None) -> Subscription:
        live = self.hook.get(tenant, sid)
        rows = self.store.select(
            "SELECT body FROM subscriptions WHERE tenant = ? AND id = ?", [tenant, sid]
        )
        sub = Subscription.from_stored(orjson.loads(rows[0][0])) if rows else None
        if sub is None or (owner is not None and sub.owner != owner):
            raise ResourceNotFound(f"subscription {sid} not found", field="subscriptionId")
        self._with_counters(sub, tenant, live, self.store.select)
        return sub

    def _with_counters(
        self,
        sub: Subscription,
        tenant: str,
        live: Subscription | None,
        select: Callable[[str, Sequence[Any]], list[tuple[Any, ...]]],
    ) -> None:
        """Give ``sub`` its delivery counters: the live ones when this process delivers, else
        those another process last flushed (read with ``select``: the store, or the caller's
        transaction)."""
        if live is not None and self.dispatching:
            _adopt(sub, live.stats)
            return
        stats = select(
            "SELECT body FROM subscription_stats WHERE tenant = ? AND id = ?", [tenant, sub.id]
        )
        if stats:
            _adopt(sub, DeliveryStats.from_dict(orjson.loads(stats[0][0])))

    def page(
        self, tenant: str, limit: int, offset: int, *, owner: str | None = None
    ) -> tuple[list[Subscription], int]:
        # filtered in SQL, so that the count and the pages hold only what the caller may see
        cond, args = self._of_owner(owner)
        total = int(
            self.store.select(
                "SELECT count(*) FROM subscriptions WHERE tenant = ?" + cond, [tenant, *args]
            )[0][0]
        )
        rows = self.store.select(
            f"SELECT id FROM subscriptions WHERE tenant = ?{cond} ORDER BY id LIMIT ? OFFSET ?",
            [tenant, *args, limit, offset],
        )
        return [self.get(tenant, str(r[0])) for r in rows], total

    def replace(self, tenant: str, sub: Subscription, *, owner: str | None = None) -> None:
        self.update(tenant, sub.id, lambda _: sub, owner=owner)

    def update(
        self,
        tenant: str,
        sid: str,
        change: Callable[[Subscription], Subscription],
        *,
        owner: str | None = None,
    ) -> Subscription:
        """Store ``change(current)`` in place of the subscription, read, changed and written
        in one transaction (the row locked: FOR UPDATE on PostgreSQL, SQLite's write lock), so
        that two PATCHes at once both count: each read the subscription, patched it and wrote
        it back whole, and the second undid the first (24 of 40 pairs in the hunt). The owner
        is checked in the same read. Returns what was stored."""
        cond, args = self._of_owner(owner)
        with self.store.write(tenant, create_tenant=False) as txn:
            lock = " FOR UPDATE" if txn.dialect == "postgres" else ""
            rows = txn.execute(
                f"SELECT body FROM subscriptions WHERE tenant = ? AND id = ?{cond}{lock}",
                [tenant, sid, *args],
            )
            if not rows:
                raise ResourceNotFound(f"subscription {sid} not found", field="subscriptionId")
            old = Subscription.from_stored(orjson.loads(rows[0][0]))
            # the counters change() keeps, as get() gives them
            self._with_counters(old, tenant, self.hook.get(tenant, sid), txn.execute)
            sub = change(old)
            if sub.id != sid:
                raise ValueError(f"change() of {sid} returned {sub.id}")
            txn.execute(
                "UPDATE subscriptions SET body = ? WHERE tenant = ? AND id = ?",
                [orjson.dumps(sub.to_stored()).decode(), tenant, sid],
            )
            # its queued notifications go where it notifies now (a PATCH of a dead endpoint
            # must rescue them), and the dispatcher swaps those it holds for these
            if old.notification.endpoint != sub.notification.endpoint:
                self.outbox.repoint(
                    txn.conn, tenant, sid, lambda _, payload: readdressed(old, sub, payload)
                )
            version = self._bump(txn)
        with self._index_lock:
            self.hook.put(tenant, sub)
            self._bumped(version)
        self.dispatcher.wake()
        return sub

    def delete(self, tenant: str, sid: str, *, owner: str | None = None) -> None:
        cond, args = self._of_owner(owner)
        with self.store.write(tenant, create_tenant=False) as txn:
            n = txn.execute(
                f"DELETE FROM subscriptions WHERE tenant = ? AND id = ?{cond} RETURNING id",
                [tenant, sid, *args],
            )
            if not n:
                raise ResourceNotFound(f"subscription {sid} not found", field="subscriptionId")
            txn.execute("DELETE FROM subscription_stats WHERE tenant = ? AND id = ?", [tenant, sid])
            # nothing more reaches its endpoint: its queued notifications go with it, and
            # what the dispatcher holds of them is dropped (another process's dispatcher
            # drops it when it reloads the subscriptions)
            self.outbox.drop_subscription(txn.conn, tenant, sid)
            version = self._bump(txn)
        with self._index_lock:
            self.hook.remove(tenant, sid)
            self._bumped(version)
        self.dispatcher.forget(tenant, sid)

    # -- periodic notifications (timeInterval) ---------------------------------------------
    async def _periodic_loop(self) -> None:
        flushed = time.monotonic()
        while True:
            await asyncio.sleep(PERIODIC_TICK_S)
            if time.monotonic() - flushed >= STATS_FLUSH_S:
                flushed = time.monotonic()
                try:
                    await asyncio.to_thread(self.flush_stats)
                except Exception:
                    log.exception("saving delivery counters failed")
            try:
                await asyncio.to_thread(self.refresh)
                items = await asyncio.to_thread(self.periodic_due)
                if items:
                    await asyncio.to_thread(self.outbox.add, items)
                    self.dispatcher.wake()
            except Exception:  # a bad subscription must not stop the others' notifications
                log.exception("periodic notifications failed")

    def periodic_due(self, now: datetime | None = None) -> list[OutboxItem]:
        """The notifications of timeInterval subscriptions that are due: the current state of
        the entities each selects (at most PERIODIC_MAX_ENTITIES), one notification each."""
        t = now or _now()
        due: list[tuple[str, Subscription]] = []
        with self.hook._lock:
            for tenant, index in self.hook._indexes.items():
                for sub in index:
                    if sub.time_interval is None or not sub.is_live(t):
                        continue
                    last = self._periodic_last.get((tenant, sub.id))
                    if last is not None and (t - last).total_seconds() < sub.time_interval:
                        continue
                    due.append((tenant, sub))
        items: list[OutboxItem] = []
        for tenant, sub in due:
            self._periodic_last[(tenant, sub.id)] = t
            ctx = self.hook._context(sub, tenant)
            docs = []
            # every entity of the tenant is looked at: fine for the minutes-scale intervals
            # this is for; a city with millions of entities should filter by type first
            visible = self.hook.visible if sub.owner_purposes is not None else None
            for doc in self.store.iter_docs(tenant):
                if selects(sub, doc["id"], doc) and (
                    visible is None or visible(sub, doc["id"], doc["type"])
                ):
                    docs.append(doc)
                    if len(docs) >= PERIODIC_MAX_ENTITIES:
                        break
            if not docs:
                continue
            items.append(
                build_notification(
                    sub,
                    None,
                    [render_current(sub, d, ctx) for d in docs],
                    ctx,
                    now=t,
                    tenant=tenant,
                    key=sub.id,
                    docs=docs,
                )
            )
        return items

    # -- delivery ---------------------------------------------------------------------------
    async def _on_result(self, result: DeliveryResult) -> None:
        tenant, sid = result.item.tenant, result.item.subscription_id
        sub = self.hook.get(tenant, sid)
        if sub is None:  # created by another process, and not reloaded here yet
            await asyncio.to_thread(self.refresh)
            sub = self.hook.get(tenant, sid)
        if sub is not None:
            sub.stats.record(result.ok, result.at)
            self._dirty.add((result.item.tenant, sub.id))

    def flush_stats(self) -> None:
        """Save the delivery counters that changed since the last flush."""
        dirty, self._dirty = self._dirty, set()
        rows = []
        for tenant, sid in dirty:
            sub = self.hook.get(tenant, sid)
            if sub is not None:
                rows.append((tenant, sid, orjson.dumps(sub.stats.to_dict()).decode()))
        if not rows:
            return
        with self.store.write("", create_tenant=False) as txn:
            for tenant, sid, body in rows:
                txn.execute(
                    "INSERT INTO subscription_stats(tenant, id, body) SELECT ?, ?, ? "
                    "WHERE EXISTS (SELECT 1 FROM subscriptions WHERE tenant = ? AND id = ?) "
                    "ON CONFLICT (tenant, id) DO UPDATE SET body = excluded.body",
                    [tenant, sid, body, tenant, sid],
                )

    def _take_dispatcher_lock(self) -> bool:
        if self._lock_path is not None:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return False
            self._lock_fd = fd
            return True
        pool = self.store.pool  # type: ignore[attr-defined]
        conn = pool.getconn()
        conn.autocommit = True
        row = conn.execute(f"SELECT pg_try_advisory_lock({_PG_LOCK_ARGS})", [DISPATCHER_LOCK])
        got = bool(row.fetchone()[0])
        if got:
            self._lock_conn = conn
        else:
            pool.putconn(conn)
        return got

    async def start(self) -> None:
        """Run the dispatcher (and the periodic notifications) here if no other process of
        this database (this schema, on PostgreSQL) does."""
        if self._take_dispatcher_lock():
            self.dispatching = True
            await self.dispatcher.start()
            self._periodic_task = asyncio.create_task(self._periodic_loop())
        else:
            log.info("another process delivers this database's notifications")

    async def stop(self) -> None:
        if self._periodic_task is not None:
            self._periodic_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic_task
            self._periodic_task = None
        if self.dispatching:
            await self.dispatcher.stop()
            try:
                await asyncio.to_thread(self.flush_stats)
            except Exception:
                log.exception("saving delivery counters failed")
            self.dispatching = False
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._lock_conn is not None:
            self._lock_conn.execute(
                f"SELECT pg_advisory_unlock({_PG_LOCK_ARGS})", [DISPATCHER_LOCK]
            )
            self.store.pool.putconn(self._lock_conn)  # type: ignore[attr-defined]
            self._lock_conn = None
