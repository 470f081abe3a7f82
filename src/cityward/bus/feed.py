"""The data bank's change feed over NATS JetStream: outbox, relay and followers.

With several processes on one database (API nodes, workers), each must see every committed
change, and none may be lost when a process dies. So a change takes three steps:

1. :class:`ChangeOutbox`, a write hook, stores each change in ``change_outbox`` inside the
   write transaction: it commits or rolls back with the write;
2. :class:`ChangeRelay` (a thread in every process) publishes outbox rows in order to the
   stream ``CITYWARD_CHANGES`` and deletes them only after JetStream acknowledged them; each
   message's ``Nats-Msg-Id`` is ``<store id>:<seq>``, so a row published again (its relay died
   before the delete) is dropped by the stream's de-duplication;
3. :class:`ChangeFollower` consumes the stream and publishes decoded :class:`Change` objects on
   a local :class:`ChangeFeed`, so the followers of that feed work as before. An ordered
   ephemeral consumer gives every process every change from now on (the dashboard's live
   hub); a durable one keeps its position on the server (the anomaly service).

:class:`ChangeBus` puts the three together for one process. ``docs/bus.md`` has the details.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from cityward.bank.changes import Change, ChangeFeed
from cityward.bank.service import Bank
from cityward.bank.store import Store, WriteTxn
from cityward.bank.store.postgres import PostgresStore
from cityward.bank.store.sqlite import SqliteStore
from cityward.bus.nats import BusError, Deliver, JetStream, Message, OrderedSubscription
from cityward.bus.settings import BusSettings

log = logging.getLogger(__name__)

_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]+")

SQLITE_SCHEMA = (
    # AUTOINCREMENT: a seq is never handed out again, even after every row was deleted;
    # a reused seq would make a new change look like a duplicate to JetStream
    "CREATE TABLE IF NOT EXISTS change_outbox "
    "(seq INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS change_outbox_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
)
POSTGRES_SCHEMA = (
    "SELECT pg_advisory_xact_lock(74110009)",  # nodes starting together: one creates
    "CREATE TABLE IF NOT EXISTS change_outbox (seq BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS change_outbox_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
)


def tenant_token(tenant: str) -> str:
    """The subject token of a tenant: its name when that is a valid token, else hex."""
    if tenant == "":
        return "default"
    if _SUBJECT_TOKEN.fullmatch(tenant):
        return tenant
    return "x-" + tenant.encode().hex()  # '.', '*', '>' and spaces cannot be in a token


def encode_change(change: Change) -> bytes:
    return orjson.dumps(
        {
            "tenant": change.tenant,
            "pk": change.pk,
            "entity_id": change.entity_id,
            "before": change.before,
            "after": change.after,
            "at": change.at,
        }
    )


def decode_change(data: bytes | str) -> Change:
    """A change as encode_change wrote it; ValueError (or KeyError, TypeError) for anything
    else: a document must be null or an entity (its type list and attrs), or every listener
    of the feed would meet the damage later, each in its own way."""
    d = orjson.loads(data)
    for side in ("before", "after"):
        doc = d[side]
        if doc is not None and not (
            isinstance(doc, dict)
            and isinstance(doc.get("id"), str)
            and isinstance(doc.get("type"), list)
            and isinstance(doc.get("attrs"), dict)
        ):
            raise ValueError(f"{side} is not an entity document")
    if d["before"] is None and d["after"] is None:
        raise ValueError("a change needs before or after")
    for key in ("tenant", "entity_id", "at"):
        if not isinstance(d[key], str):
            raise ValueError(f"{key} is not a string")
    return Change(d["tenant"], int(d["pk"]), d["entity_id"], d["before"], d["after"], d["at"])


@dataclass(frozen=True)
class OutboxRow:
    """One change waiting in ``change_outbox``, with the subject and id it is published under."""

    seq: int
    body: str
    subject: str
    msg_id: str


class ChangeOutbox:
    """The write hook: each committed change becomes a ``change_outbox`` row, atomically.

    Creates its tables at construction. ``subject_prefix``: each row is published to
    ``<prefix>.<tenant token>``.
    """

    def __init__(self, store: Store, subject_prefix: str = "cityward.changes") -> None:
        self.store = store
        self.subject_prefix = subject_prefix
        # woken by every write (before its commit): relays of this process look sooner
        self._listeners: list[Callable[[], None]] = []
        schema = SQLITE_SCHEMA if store.dialect == "sqlite" else POSTGRES_SCHEMA
        with store.write("", create_tenant=False) as txn:
            txn.lock_migrations()
            for sql in schema:
                txn.execute(sql)
            # the same id on every node of this database, so that any node's relay publishes
            # a row under the id the first one would have used
            txn.execute(
                "INSERT INTO change_outbox_meta(k, v) VALUES ('store_id', ?) "
                "ON CONFLICT DO NOTHING",
                [uuid.uuid4().hex],
            )
            self.store_id = str(
                txn.execute("SELECT v FROM change_outbox_meta WHERE k = 'store_id'")[0][0]
            )

    def on_write(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def __call__(self, txn: WriteTxn, changes: list[Change]) -> None:
        if not changes:
            return
        # One statement for the whole batch (a statement per row costs a GIL round each), its
        # rows in one JSON text: psycopg dumps a list parameter (a text[]) element by element in
        # Python, which was a sixth of a JetStream writer's CPU.
        bodies = orjson.dumps([encode_change(c).decode() for c in changes]).decode()
        if txn.dialect == "sqlite":
            txn.execute(
                "INSERT INTO change_outbox(body) SELECT value FROM json_each(?) ORDER BY key",
                [bodies],
            )
        else:
            txn.execute(
                "INSERT INTO change_outbox(body) SELECT b FROM json_array_elements_text(?::json) "
                "WITH ORDINALITY AS t(b, i) ORDER BY i",
                [bodies],
            )
        for listener in self._listeners:
            listener()

    def row(self, seq: int, body: str) -> OutboxRow:
        tenant = orjson.loads(body)["tenant"]
        subject = f"{self.subject_prefix}.{tenant_token(tenant)}"
        return OutboxRow(seq, body, subject, f"{self.store_id}:{seq}")

    def pending(self, limit: int = 1000) -> list[OutboxRow]:
        """The oldest rows not yet relayed (for tools and tests; relays lock what they take)."""
        rows = self.store.select(
            "SELECT seq, body FROM change_outbox ORDER BY seq LIMIT ?", [limit]
        )
        return [self.row(int(seq), str(body)) for seq, body in rows]


#: how often an idle durable follower asks whether its consumer still exists (seconds)
CONSUMER_CHECK_S = 10.0
#: room for the subject and headers (Nats-Msg-Id) beside a change in one NATS message
PAYLOAD_MARGIN = 4096


def _fitted(row: OutboxRow, limit: int) -> bytes:
    """A change too large for one NATS message, made to fit: its ``before`` document, then its
    ``after`` too, cut to the entity's id and type (``attrs`` empty, ``"trimmed"`` naming the
    cut sides). Followers learn that the entity changed and can read it from the bank.

    The relay publishes rows oldest first and retried the oldest for ever: one entity of half
    NATS's 1 MB stopped every later change on every node (the bank takes bodies up to 8 MB)."""
    d = orjson.loads(row.body)
    data = row.body.encode()
    trimmed = []
    for side in ("before", "after"):
        doc = d[side]
        if doc is not None:
            d[side] = {"id": doc["id"], "type": doc["type"], "attrs": {}}
            trimmed.append(side)
            d["trimmed"] = trimmed
            data = orjson.dumps(d)
            if len(data) <= limit:
                break
    log.warning(
        "change %s of entity %s is larger than NATS takes (%d bytes, at most %d): published "
        "without its %s document(s)",
        row.msg_id,
        d["entity_id"],
        len(row.body),
        limit,
        " and ".join(trimmed),
    )
    return data


class ChangeRelay:
    """Publishes outbox rows in order and deletes them once JetStream has them.

    Every process may run one; they cooperate. PostgreSQL: a round locks its rows
    (``FOR UPDATE SKIP LOCKED``) until they are published and deleted, and only a relay that
    holds the oldest row publishes (the stream then stays in outbox order); a relay that
    dies mid-round drops its locks with its connection. SQLite: a file lock beside the
    database lets one relay at a time work. Wakes when this process writes, and polls every
    ``poll_s`` for rows written by other processes.
    """

    def __init__(
        self,
        store: Store,
        outbox: ChangeOutbox,
        js: JetStream,
        *,
        batch: int = 500,
        poll_s: float = 0.2,
        ensure_stream: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.outbox = outbox
        self.js = js
        # called after a failed round: a stream deleted, or lost with a NATS that came back
        # without its store, answered "no responders" to every publish, for ever
        self.ensure_stream = ensure_stream
        self.batch = batch
        self.poll_s = poll_s
        self.published = 0  # rows this relay published and deleted
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock_path: Path | None = None
        if isinstance(store, SqliteStore):
            self._lock_path = store.path.with_name(store.path.name + ".relaylock")
        outbox.on_write(self._wake.set)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the relay is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="change-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the round in progress; rows left in the outbox wait for the next relay."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            woken = self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                sent = self.drain()
                # woken by a write of ours before its commit: look again in a moment
                for delay in (0.002, 0.005, 0.01, 0.02, 0.05) if woken and not sent else ():
                    if self._stop.wait(delay) or self.drain():
                        break
                failures = 0
            except Exception as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning(
                        "change relay: %s (%d failed rounds; rows stay queued)", exc, failures
                    )
                if self.ensure_stream is not None and isinstance(exc, BusError):
                    with contextlib.suppress(BusError):  # NATS still away: the next round
                        self.ensure_stream()
                # back off while NATS or the database is away; rows wait in the outbox
                self._stop.wait(min(5.0, self.poll_s * 2**failures))

    def drain(self, max_rounds: int | None = None) -> int:
        """Publish rows until the outbox is empty, another relay has the oldest, ``max_rounds``
        rounds ran, or (on the relay's thread) the relay is stopping; how many it published."""
        total = rounds = 0
        while max_rounds is None or rounds < max_rounds:
            sent = self.relay_once()
            total += sent
            rounds += 1
            if sent < self.batch:
                break
            if self._stop.is_set() and threading.current_thread() is self._thread:
                break
        return total

    def relay_once(self) -> int:
        """One round: publish up to ``batch`` of the oldest rows and delete them; how many."""
        if isinstance(self.store, PostgresStore):
            return self._round_postgres(self.store)
        return self._round_sqlite()

    def _publish(self, rows: Sequence[tuple[Any, Any]]) -> list[int]:
        out = [self.outbox.row(int(seq), str(body)) for seq, body in rows]
        limit = self.js.max_payload - PAYLOAD_MARGIN
        self.js.publish_many(
            [
                (r.subject, _fitted(r, limit) if len(r.body) > limit else r.body.encode(), r.msg_id)
                for r in out
            ]
        )
        return [r.seq for r in out]

    def _round_postgres(self, store: PostgresStore) -> int:
        with store.pool.connection() as conn:
            try:
                rows = conn.execute(
                    "SELECT seq, body FROM change_outbox ORDER BY seq LIMIT %s "
                    "FOR UPDATE SKIP LOCKED",
                    [self.batch],
                ).fetchall()
                head = conn.execute("SELECT min(seq) FROM change_outbox").fetchone()
                if not rows or head is None or int(rows[0][0]) != int(head[0]):
                    # empty, or another relay holds older rows: publishing ours now would put
                    # them in the stream before those; that relay goes on, we look later
                    conn.rollback()
                    return 0
                seqs = self._publish(rows)
                conn.execute("DELETE FROM change_outbox WHERE seq = ANY(%s)", [seqs])
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        self.published += len(seqs)
        return len(seqs)

    def _round_sqlite(self) -> int:
        with self._file_lock() as held:
            if not held:
                return 0  # another process's relay is at work
            rows = self.store.select(
                "SELECT seq, body FROM change_outbox ORDER BY seq LIMIT ?", [self.batch]
            )
            if not rows:
                return 0
            seqs = self._publish(rows)
            # SQLite commits one writer at a time, in seq order: the rows up to the last
            # published one are exactly those published
            with self.store.write("", create_tenant=False) as txn:
                txn.execute("DELETE FROM change_outbox WHERE seq <= ?", [seqs[-1]])
        self.published += len(seqs)
        return len(seqs)

    @contextmanager
    def _file_lock(self) -> Iterator[bool]:
        if self._lock_path is None:
            yield True
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class ChangeFollower:
    """Consumes the change stream and publishes decoded changes on a local :class:`ChangeFeed`.

    ``durable=None``: an ordered ephemeral consumer, every change from ``deliver`` on (default
    "new": from now), to this process only; nothing is acknowledged and nothing survives the
    process. ``durable="anomaly"``: a durable pull consumer whose position the server keeps;
    each batch is acknowledged after the feed's listeners returned, so a follower that starts
    with the same name (here or on another node) continues after the last acknowledged
    change. A follower killed mid-batch has that batch delivered again after ``ack_wait_s``
    (at least once: listeners must tolerate a repeat). Two followers running at once on one
    durable name share its changes between them.

    ``settle(timeout_s)``, for a durable follower: called after the listeners returned and
    before the batch is acknowledged; it waits until they have *handled* what they were
    handed (a listener that only queues, as the anomaly service does) and says whether they
    did. Without it a batch sat acknowledged in a queue: a node killed then lost it for good
    (1,716 changes of a backlog in one test). When it says no, the batch is not acknowledged
    and comes again after ``ack_wait_s``.
    """

    def __init__(
        self,
        js: JetStream,
        feed: ChangeFeed,
        *,
        stream: str = "CITYWARD_CHANGES",
        subject_filter: str = "cityward.changes.>",
        durable: str | None = None,
        deliver: Deliver | None = None,
        batch: int = 256,
        ack_wait_s: float = 30.0,
        fetch_timeout_s: float = 0.5,
        settle: Callable[[float], bool] | None = None,
    ) -> None:
        self.js = js
        self.feed = feed
        self.settle = settle
        self.stream = stream
        self.subject_filter = subject_filter
        self.durable = durable
        self.deliver: Deliver = deliver or "new"
        self.batch = batch
        self.ack_wait_s = ack_wait_s
        self.fetch_timeout_s = fetch_timeout_s
        self.received = 0  # changes handed to the feed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ordered: OrderedSubscription | None = None

    def start(self) -> None:
        """Create the consumer (so nothing published from now on is missed), then follow."""
        if self._thread is not None:
            raise RuntimeError("the follower is already running")
        self._stop.clear()
        if self.durable is None:
            self._ordered = self.js.subscribe_ordered(
                self.stream, self.subject_filter, deliver=self.deliver
            )
        else:
            self.js.ensure_consumer(
                self.stream,
                self.durable,
                self.subject_filter,
                ack_wait_s=self.ack_wait_s,
                deliver=self.deliver,
            )
        name = f"change-follower-{self.durable or 'ordered'}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the batch in progress (handed to the feed and acknowledged).

        May be called from a feed listener (the follower's own thread): it then stops after
        the current batch without waiting for itself.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            self._thread = None
            if self._ordered is not None:
                self._ordered.close()
                self._ordered = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _fetch(self) -> list[Message]:
        if self._ordered is not None:
            return self._ordered.fetch(self.batch, self.fetch_timeout_s)
        assert self.durable is not None
        return self.js.pull(
            self.stream, self.durable, self.subject_filter, self.batch, self.fetch_timeout_s
        )

    def _run(self) -> None:
        failures = 0
        checked = time.monotonic()
        while not self._stop.is_set():
            try:
                msgs = self._fetch()
                failures = 0
            except BusError as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("change follower %s: %s", self.durable or "(ordered)", exc)
                self._stop.wait(min(5.0, 0.1 * 2**failures))
                continue
            if not msgs:
                if self.durable is not None and time.monotonic() - checked > CONSUMER_CHECK_S:
                    # a consumer gone with its stream fetched nothing for ever, silently
                    checked = time.monotonic()
                    try:
                        if self.js.consumer_missing(self.stream, self.durable):
                            log.warning(
                                "change follower %s: its consumer is gone from %s (the stream "
                                "made anew?): making it again, from the oldest change kept",
                                self.durable,
                                self.stream,
                            )
                    except BusError as exc:
                        log.warning("change follower %s: %s", self.durable, exc)
                continue
            changes: list[Change] = []
            for msg in msgs:
                try:
                    changes.append(decode_change(msg.data))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.error("change follower: not a change on %s (seq %d)", msg.subject, msg.seq)
            # the feed's listeners run here, on this thread; they return quickly by contract
            self.feed.publish(changes)
            self.received += len(changes)
            if self.durable is not None:
                if self.settle is not None and not self.settle(self.ack_wait_s / 2):
                    log.warning(
                        "change follower %s: %d changes not handled in %.0f s; not acknowledged "
                        "(they come again)",
                        self.durable,
                        len(changes),
                        self.ack_wait_s / 2,
                    )
                    continue
                try:
                    self.js.ack_all(msgs)
                except BusError as exc:  # they come again after ack_wait: at least once
                    log.warning("change follower %s: ack failed: %s", self.durable, exc)


def ensure_changes_stream(js: JetStream, settings: BusSettings) -> None:
    """The change stream as ``settings`` describe it, made or brought up to date."""
    js.ensure_stream(
        settings.changes_stream,
        [settings.changes_subject + ".>"],
        max_age_s=settings.changes_max_age_s,
        duplicate_window_s=settings.duplicate_window_s,
        max_bytes=settings.changes_max_bytes,
    )


class ChangeBus:
    """The change feed of one process in NATS mode: outbox hook, relay and followers.

    Construction registers the outbox hook on ``bank`` and turns the bank's own local
    publishing off (the followers feed ``bank.feed`` instead); :meth:`start` connects and
    starts the relay and the followers, :meth:`stop` stops them. Writes made before
    :meth:`start` (or while NATS is away) wait in the outbox.
    """

    def __init__(
        self, settings: BusSettings, store: Store, bank: Bank, *, name: str = "cityward"
    ) -> None:
        self.settings = settings
        self.js = JetStream(
            settings.nats_url, name=name, connect_timeout_s=settings.connect_timeout_s
        )
        self.outbox = ChangeOutbox(store, settings.changes_subject)
        bank.hooks.append(self.outbox)
        bank.publish_local = False
        self.relay = ChangeRelay(
            store,
            self.outbox,
            self.js,
            batch=settings.relay_batch,
            poll_s=settings.relay_poll_s,
            ensure_stream=self._ensure_stream,
        )
        self.followers: list[ChangeFollower] = []

    def follow(
        self,
        feed: ChangeFeed,
        durable: str | None = None,
        deliver: Deliver | None = None,
        settle: Callable[[float], bool] | None = None,
    ) -> ChangeFollower:
        """A follower feeding ``feed`` (ordered when ``durable`` is None), started by start();
        ``settle``: see :class:`ChangeFollower`."""
        follower = ChangeFollower(
            self.js,
            feed,
            stream=self.settings.changes_stream,
            subject_filter=self.settings.changes_subject + ".>",
            durable=durable,
            deliver=deliver,
            ack_wait_s=self.settings.ack_wait_s,
            settle=settle,
        )
        self.followers.append(follower)
        return follower

    def _ensure_stream(self) -> None:
        ensure_changes_stream(self.js, self.settings)

    def start(self) -> None:
        self.js.connect()
        self._ensure_stream()
        for follower in self.followers:
            follower.start()
        self.relay.start()

    def stop_followers(self) -> None:
        """Stop handing changes on (before the services that listen stop)."""
        for follower in self.followers:
            follower.stop()

    def stop(self) -> None:
        """Stop everything; what the outbox still holds is published once more, best effort
        (rows left behind wait for the next relay of any process)."""
        self.stop_followers()
        self.relay.stop()
        if self.js.connected:
            try:
                self.relay.drain(max_rounds=20)  # a bounded stop: a backlog waits for a relay
            except Exception as exc:
                log.warning("change relay: final round failed, rows stay queued: %s", exc)
        self.js.close()
