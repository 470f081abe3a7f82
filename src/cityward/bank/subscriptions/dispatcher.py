"""Deliver the outbox: per-endpoint lanes, retries with back-off, HTTP and MQTT transports.

One :class:`Dispatcher` runs per database, on the application's event loop. A pump task claims
due rows from the :class:`~cityward.bank.subscriptions.outbox.Outbox` (woken at once by
:meth:`Dispatcher.wake` after a write commits, and by a poll as a fallback), and hands each
row to its endpoint. Every endpoint has its own lanes (workers); the rows of one endpoint with
the same ordering key (the subscription id, so every entity's notifications too) always take
the same lane, so they are delivered in order, and a slow or dead endpoint only ever holds its
own lanes.

After a failed attempt the endpoint backs off: its next attempt waits
``base * factor ** (n - 1)`` seconds (at most ``max_s``) times ``1 + jitter * U[0, 1)`` after
``n`` consecutive failures, with a random generator seeded per endpoint (deterministic when the
dispatcher gets a ``seed``). While an endpoint is failing only one of its lanes probes it; the
first success lets all lanes go again. A subscription's ``cooldown`` (the least wait after a
failure it asks for) holds back that subscription's notifications only: the rows of other keys
in its lane go past them, and other subscriptions of the endpoint wait only for the back-off.
By default a notification is never given up: it is retried, the back-off capped at ``max_s``,
until the receiver takes it or the outbox's bound drops it (the oldest of an endpoint first),
so an outage of any length loses nothing the bound keeps. A policy with ``max_attempts`` > 0
drops a notification that failed that many times and reports it as final.

Delivery is at least once: rows are deleted only after the receiver accepted them, so a crash
(even SIGKILL) between the delivery and the delete sends that notification again after the
restart, and nothing that was enqueued is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import ssl
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from cityward.bank.errors import BadRequestData
from cityward.bank.subscriptions.http1 import Http1Client, Http1Error
from cityward.bank.subscriptions.model import _mqtt_topic, format_ts
from cityward.bank.subscriptions.outbox import Outbox, OutboxItem

__all__ = [
    "DeliveryError",
    "DeliveryResult",
    "Dispatcher",
    "EndpointStats",
    "Http1Transport",
    "HttpTransport",
    "MqttTransport",
    "RetryPolicy",
    "Transport",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_HISTORY: Final = 100


class DeliveryError(Exception):
    """A delivery attempt failed (connection, timeout, non-2xx answer, broker refusal...)."""


class Transport(Protocol):
    """Sends one notification; raises :class:`DeliveryError` when it was not accepted."""

    async def send(self, item: OutboxItem) -> None: ...

    async def aclose(self) -> None: ...


# --------------------------------------------------------------------------------------------
# HTTP


class HttpTransport:
    """POSTs notifications with one shared httpx.AsyncClient (connection reuse per host).

    The item's headers (Content-Type, Link, NGSILD-Tenant, receiverInfo) go out as they are; a
    2xx answer is a success and anything else a failure. Proxy variables of the environment are
    ignored unless ``trust_env`` is set.
    """

    def __init__(
        self,
        client: httpx.AsyncClient | None = None,
        *,
        timeout: float = 10.0,
        trust_env: bool = False,
    ) -> None:
        self._owned = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
            trust_env=trust_env,
        )

    async def send(self, item: OutboxItem) -> None:
        timeout = item.payload.get("timeout")
        try:
            resp = await self.client.post(
                item.endpoint,
                content=orjson.dumps(item.body),
                headers=item.headers,
                timeout=float(timeout) if timeout else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        if not 200 <= resp.status_code < 300:
            raise DeliveryError(f"HTTP {resp.status_code}")

    async def aclose(self) -> None:
        if self._owned:
            await self.client.aclose()


class Http1Transport:
    """POSTs notifications with :class:`~cityward.bank.subscriptions.http1.Http1Client`.

    The default HTTP transport: the same wire behaviour as :class:`HttpTransport` at about a
    fifteenth of the CPU per notification (see the http1 module). No proxy support.
    """

    def __init__(self, client: Http1Client | None = None, *, timeout: float = 10.0) -> None:
        self._owned = client is None
        self.client = client or Http1Client(timeout=timeout, connect_timeout=min(timeout, 5.0))

    async def send(self, item: OutboxItem) -> None:
        timeout = item.payload.get("timeout")
        try:
            status = await self.client.post(
                item.endpoint,
                orjson.dumps(item.body),
                item.headers,
                timeout=float(timeout) if timeout else None,
            )
        except Http1Error as exc:
            raise DeliveryError(str(exc)) from exc
        if not 200 <= status < 300:
            raise DeliveryError(f"HTTP {status}")

    async def aclose(self) -> None:
        if self._owned:
            await self.client.aclose()


# --------------------------------------------------------------------------------------------
# MQTT


@dataclass(frozen=True)
class _Broker:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    version: str


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], error: str | None) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, fut, error)


def _settle(fut: asyncio.Future[None], error: str | None) -> None:
    """Complete ``fut`` (on the loop thread) unless it is done already (timed out)."""
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(DeliveryError(error))


class _MqttConnection:
    """One paho client (with its network thread) to one broker, bridged to asyncio futures.

    The callbacks of paho's network thread take no lock: they hand each event to the event
    loop, which alone keeps the futures waiting for acknowledgements. paho calls
    ``on_publish`` while holding its ``_out_message_mutex``, and ``publish()`` (on the loop
    thread) takes that mutex; a lock of ours taken in both places deadlocked the loop, and
    with it the whole server, on the first QoS 1 or 2 acknowledgement that crossed a publish.
    """

    def __init__(
        self, broker: _Broker, loop: asyncio.AbstractEventLoop, connect_timeout: float, prefix: str
    ) -> None:
        self.broker = broker
        self.loop = loop
        self.connect_timeout = connect_timeout
        protocol = (
            MQTTProtocolVersion.MQTTv5
            if broker.version == "mqtt5.0"
            else MQTTProtocolVersion.MQTTv311
        )
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"{prefix}-{uuid.uuid4().hex[:16]}",
            protocol=protocol,
            reconnect_on_failure=False,
        )
        client.connect_timeout = connect_timeout
        if broker.username is not None:
            client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client
        self.alive = False
        self._pending: dict[int, asyncio.Future[None]] = {}  # loop thread only
        self._connack: asyncio.Future[None] = loop.create_future()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(fn, *args)

    # paho's network thread calls these
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        if rc.is_failure:
            _resolve(self.loop, self._connack, f"broker refused the connection: {rc}")
        else:
            self.alive = True
            _resolve(self.loop, self._connack, None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any
    ) -> None:
        self.alive = False
        _resolve(self.loop, self._connack, f"disconnected: {rc}")
        self._call(self._fail_pending, f"disconnected before the broker acknowledged: {rc}")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode, props: Any
    ) -> None:
        error = f"broker refused the message: {rc}" if rc.is_failure else None
        self._call(self._acked, mid, error)

    # the event loop runs these
    def _acked(self, mid: int, error: str | None) -> None:
        fut = self._pending.pop(mid, None)
        if fut is not None:  # None: it timed out meanwhile
            _settle(fut, error)

    def _fail_pending(self, error: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            _settle(fut, error)

    async def open(self) -> None:
        b = self.broker
        try:
            await asyncio.to_thread(self.client.connect, b.host, b.port, 30)
        except Exception as exc:  # socket, DNS and TLS errors
            raise DeliveryError(f"cannot connect to {b.host}:{b.port}: {exc}") from exc
        self.client.loop_start()
        try:
            await asyncio.wait_for(self._connack, self.connect_timeout)
        except TimeoutError as exc:
            raise DeliveryError(f"no CONNACK from {b.host}:{b.port}") from exc

    async def publish(self, topic: str, payload: bytes, qos: int, timeout: float) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        info = self.client.publish(topic, payload, qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise DeliveryError(f"publish failed: {mqtt.error_string(info.rc)}")
        # nothing awaits between paho's publish() and this line, and acknowledgements reach
        # _acked through the loop: an ack, however early, finds its future registered
        mid = info.mid
        self._pending[mid] = fut
        if not self.alive:  # the disconnect's _fail_pending ran before: do not wait for it
            self._pending.pop(mid, None)
            raise DeliveryError("disconnected before the broker acknowledged")
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            self._pending.pop(mid, None)
            raise DeliveryError(f"no acknowledgement within {timeout} s") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        with contextlib.suppress(Exception):
            self.client.loop_stop()


class MqttTransport:
    """Publishes notifications to MQTT brokers (``mqtt[s]://[user:pass@]host[:port]/topic``).

    The message is ``{"metadata": {<headers>}, "body": <notification>}``; ``MQTT-QoS`` (0, 1,
    2; default 0) and ``MQTT-Version`` (``mqtt3.1.1`` default, ``mqtt5.0``) come from the
    endpoint's notifierInfo. A publish succeeds when paho has written it (QoS 0) or the broker
    has acknowledged it (QoS 1 and 2). One connection per broker is kept and reopened after a
    disconnect.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        publish_timeout: float = 10.0,
        client_id_prefix: str = "cityward",
    ) -> None:
        self.connect_timeout = connect_timeout
        self.publish_timeout = publish_timeout
        self.prefix = client_id_prefix
        self._conns: dict[_Broker, _MqttConnection] = {}
        self._locks: dict[_Broker, asyncio.Lock] = {}

    async def send(self, item: OutboxItem) -> None:
        parts = urlsplit(item.endpoint)
        notifier: dict[str, str] = dict(item.payload.get("notifierInfo") or {})
        tls = parts.scheme.lower() == "mqtts"
        broker = _Broker(
            host=parts.hostname or "",
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
            version=notifier.get("MQTT-Version", "mqtt3.1.1"),
        )
        try:  # a topic stored before they were checked: the broker would drop the connection
            topic = _mqtt_topic(parts.path)  # that every subscription to it shares
        except BadRequestData as exc:
            raise DeliveryError(exc.detail) from exc
        qos = int(notifier.get("MQTT-QoS", "0"))
        timeout = item.payload.get("timeout")
        message = orjson.dumps({"metadata": item.headers, "body": item.body})
        conn = await self._connection(broker)
        await conn.publish(topic, message, qos, float(timeout or self.publish_timeout))

    async def _connection(self, broker: _Broker) -> _MqttConnection:
        lock = self._locks.setdefault(broker, asyncio.Lock())
        async with lock:
            conn = self._conns.get(broker)
            if conn is not None and conn.alive:
                return conn
            if conn is not None:
                del self._conns[broker]
                await asyncio.to_thread(conn.close)
            conn = _MqttConnection(
                broker, asyncio.get_running_loop(), self.connect_timeout, self.prefix
            )
            try:
                await conn.open()
            except BaseException:
                await asyncio.to_thread(conn.close)
                raise
            self._conns[broker] = conn
            return conn

    async def aclose(self) -> None:
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            await asyncio.to_thread(conn.close)


# --------------------------------------------------------------------------------------------
# The dispatcher


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off after failures, per endpoint; a notification is dropped after max_attempts
    (when > 0)."""

    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.2
    # 0: never give up. The default, as delivery is at least once: a count of attempts that
    # drops a notification turns a receiver's outage of some minutes into silent loss, and
    # the outbox's bound already keeps a dead endpoint from filling the database
    max_attempts: int = 0

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` (>= 1) consecutive failures.

        >>> RetryPolicy(jitter=0).delay(3, random.Random(1))
        2.0
        """
        exponent = min(max(failures - 1, 0), 64)
        wait = min(self.max_s, self.base_s * self.factor**exponent)
        return wait * (1.0 + self.jitter * rng.random())


@dataclass(frozen=True)
class DeliveryResult:
    """The outcome of one attempt, given to the ``on_result`` callback."""

    item: OutboxItem  # with attempts counting this one
    ok: bool
    at: str  # when the attempt ended (stored timestamp form)
    error: str | None = None
    final: bool = True  # False: it will be retried


@dataclass
class EndpointStats:
    """Counters of one endpoint (for monitoring and tests)."""

    uri: str
    attempts: int = 0
    delivered: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    given_up: int = 0
    delays: list[float] = field(default_factory=list)  # back-off chosen after each failure


OnResult = Callable[[DeliveryResult], Awaitable[None] | None]


class _Endpoint:
    def __init__(self, uri: str, lanes: int, rng: random.Random) -> None:
        self.uri = uri
        self.queues: list[deque[OutboxItem]] = [deque() for _ in range(lanes)]
        self.ready = [asyncio.Event() for _ in range(lanes)]
        self.tasks: list[asyncio.Task[None]] = []
        self.probe = asyncio.Lock()
        self.retry_at = 0.0  # loop time before which no attempt starts
        # (tenant, subscription id) -> loop time before which its notifications wait (its
        # cooldown)
        self.cooling: dict[tuple[str, str], float] = {}
        self.rng = rng
        self.stats = EndpointStats(uri)

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.queues)


class Dispatcher:
    """Drains an :class:`Outbox`; start it in the app's lifespan and stop it on shutdown.

    ``on_result`` (sync or async) is called after every attempt, e.g. to update the
    subscription's DeliveryStats. ``takeover`` (default) assumes this is the only dispatcher of
    the database: on start it takes back every lease, so rows claimed by a process that died are
    delivered at once instead of after ``lease_s``.
    """

    def __init__(
        self,
        outbox: Outbox,
        *,
        http: Transport | None = None,
        mqtt: Transport | None = None,
        policy: RetryPolicy | None = None,
        on_result: OnResult | None = None,
        seed: int | str | None = None,
        lanes: int = 4,
        batch_size: int = 256,
        queue_limit: int = 1000,
        poll_interval: float = 1.0,
        flush_interval: float = 0.05,
        lease_s: float = 600.0,
        takeover: bool = True,
        recount_interval: float = 60.0,
        stop_grace: float = 5.0,
    ) -> None:
        if lanes < 1 or batch_size < 1 or queue_limit < 1:
            raise ValueError("lanes, batch_size and queue_limit must be positive")
        self.outbox = outbox
        self.policy = policy or RetryPolicy()
        self.on_result = on_result
        self.seed = seed
        self.lanes = lanes
        self.batch_size = batch_size
        self.queue_limit = queue_limit
        self.poll_interval = poll_interval
        self.flush_interval = flush_interval
        self.lease_s = lease_s
        self.takeover = takeover
        self.recount_interval = recount_interval
        self.stop_grace = stop_grace
        self._http = http
        self._mqtt = mqtt
        self._owned: list[Transport] = []
        self._endpoints: dict[str, _Endpoint] = {}
        self._stats: dict[str, EndpointStats] = {}  # kept after stop()
        self._known: dict[int, OutboxItem] = {}  # seq -> the row held in memory (leased by us)
        self._inflight: set[int] = set()  # seqs being sent now
        self._forgotten: set[int] = set()  # of those, the ones forget() let go of meanwhile
        self._released: list[int] = []  # seqs let go of, whose leases to give back
        self._done: list[int] = []  # delivered or abandoned, to delete
        self._failed: list[tuple[int, int, str]] = []  # (seq, attempts, error) to record
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._flush_pending = False
        self._prune_wanted = False
        self.delivered = 0
        self.failed_attempts = 0
        self.given_up = 0

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._pump_task is not None and not self._stop.is_set()

    async def start(self) -> None:
        """Recover leases (takeover), then start delivering what the outbox holds."""
        if self._pump_task is not None:
            raise RuntimeError("the dispatcher is already started")
        self._loop = asyncio.get_running_loop()
        self._stats.clear()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cityward-outbox")
        if self._http is None:
            self._http = Http1Transport()
            self._owned.append(self._http)
        if self._mqtt is None:
            self._mqtt = MqttTransport()
            self._owned.append(self._mqtt)
        if self.takeover:
            await self._db(self.outbox.release_all)
        await self._db(self.outbox.recount)
        self._pump_task = asyncio.create_task(self._pump(), name="cityward-outbox-pump")

    async def stop(self) -> None:
        """Stop claiming, let attempts in flight finish (up to ``stop_grace`` s), record what
        happened and give the leases of undelivered rows back."""
        if self._pump_task is None:
            return
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump_task
        tasks = [t for ep in self._endpoints.values() for t in ep.tasks]
        for ep in self._endpoints.values():
            for ev in ep.ready:
                ev.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.stop_grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        done, self._done = self._done, []
        failed, self._failed = self._failed, []
        released, self._released = self._released, []
        try:
            for seq in done:
                self._known.pop(seq, None)
            released += self._known
            await self._db(
                partial(
                    self.outbox.exchange,
                    delivered=done,
                    failures=failed,
                    released=sorted(set(released)),
                    limit=0,
                )
            )
        finally:
            self._known.clear()
            self._inflight.clear()
            self._forgotten.clear()
            self._endpoints.clear()
            for transport in self._owned:
                with contextlib.suppress(Exception):
                    await transport.aclose()
            if self._http in self._owned:
                self._http = None
            if self._mqtt in self._owned:
                self._mqtt = None
            self._owned.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            self._pump_task = None

    async def __aenter__(self) -> Dispatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def wake(self) -> None:
        """Look at the outbox now (call after committing an enqueue; safe from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    def forget(self, tenant: str, sid: str) -> None:
        """Let go of what a subscription has queued here (safe from any thread): call after
        deleting the subscription with its rows, so that its notifications held in memory are
        not sent. An attempt under way ends first; a failed one is not retried."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(
                self._drop, lambda i: (i.tenant, i.subscription_id) == (tenant, sid), set()
            )

    def prune(self) -> None:
        """Let go of the rows held here that the outbox no longer has (safe from any thread):
        another process deleted their subscription, maybe before this one ever knew it."""
        self._prune_wanted = True
        self.wake()

    def endpoint_stats(self, uri: str) -> EndpointStats | None:
        """The counters of one endpoint in the latest run (None: nothing was sent there)."""
        return self._stats.get(uri)

    # -- the pump ---------------------------------------------------------------------------
    async def _db(self, fn: Callable[[], _T]) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        next_recount = loop.time() + self.recount_interval
        while not self._stop.is_set():
            self._wake.clear()
            self._flush_pending = False
            done, self._done = self._done, []
            failed, self._failed = self._failed, []
            released, self._released = self._released, []
            exclude = [uri for uri, ep in self._endpoints.items() if ep.queued >= self.queue_limit]
            try:
                items = await self._db(
                    partial(
                        self.outbox.exchange,
                        delivered=done,
                        failures=failed,
                        released=released,
                        limit=self.batch_size,
                        lease_s=self.lease_s,
                        exclude=exclude,
                    )
                )
            except Exception:
                log.exception("notification outbox: claim failed; retrying")
                self._done[:0] = done
                self._failed[:0] = failed
                self._released[:0] = released
                await self._sleep(self.poll_interval)
                continue
            for seq in done:
                self._known.pop(seq, None)
            self._dispatch(items)
            if self._prune_wanted:
                self._prune_wanted = False
                await self._prune()
            if loop.time() >= next_recount:
                next_recount = loop.time() + self.recount_interval
                with contextlib.suppress(Exception):
                    await self._db(self.outbox.recount)
            if len(items) >= self.batch_size:
                await asyncio.sleep(0)
                continue
            unsettled = self._done or self._failed or self._released
            timeout = self.flush_interval if unsettled else self.poll_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _prune(self) -> None:
        """Drop the rows held here that the outbox no longer has (see prune())."""
        held = set(self._known)
        try:
            present = await self._db(partial(self.outbox.present, sorted(held)))
        except Exception:
            log.exception("notification outbox: checking the rows held failed")
            return
        gone = held - present  # rows claimed during the check are not in held: kept
        if gone:
            self._drop(lambda i: i.seq in gone, set())

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False when the dispatcher stops meanwhile."""
        if seconds <= 0:
            return not self._stop.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return not self._stop.is_set()

    def _dispatch(self, items: Sequence[OutboxItem]) -> None:
        # A row we hold that comes back changed was re-pointed by an update of its
        # subscription (which gave its lease back): what we hold of that subscription goes
        # to the old endpoint, so it is dropped, and the claimed rows take its place. Those
        # of its rows not claimed again are given back, to be claimed in order after these.
        changed = set()
        for item in items:
            held = self._known.get(item.seq)
            if held is not None and (held.endpoint, held.payload) != (item.endpoint, item.payload):
                changed.add((item.tenant, item.subscription_id))
        if changed:
            self._drop(lambda i: (i.tenant, i.subscription_id) in changed, {i.seq for i in items})
        for item in items:
            if item.seq in self._known:
                continue  # a lease of ours that ran out and was claimed again
            self._known[item.seq] = item
            ep = self._endpoints.get(item.endpoint)
            if ep is None:
                ep = self._new_endpoint(item.endpoint)
            lane = zlib.crc32(item.key.encode()) % self.lanes
            ep.queues[lane].append(item)
            ep.ready[lane].set()

    def _drop(self, which: Callable[[OutboxItem], bool], reclaimed: set[int]) -> None:
        """Drop the rows ``which`` picks from the lanes (one being sent: once its attempt
        ends) and give their leases back, but those of the ``reclaimed`` rows (just claimed
        anew)."""
        for ep in self._endpoints.values():
            for queue in ep.queues:
                kept: list[OutboxItem] = []
                for item in queue:
                    if not which(item):
                        kept.append(item)
                    elif item.seq in self._inflight:
                        kept.append(item)
                        self._forgotten.add(item.seq)
                    else:
                        del self._known[item.seq]
                        if item.seq not in reclaimed:
                            self._released.append(item.seq)
                if len(kept) != len(queue):
                    queue.clear()  # in place: the lane holds this deque
                    queue.extend(kept)
        self._settled()

    def _new_endpoint(self, uri: str) -> _Endpoint:
        rng = random.Random(f"{self.seed}|{uri}") if self.seed is not None else random.Random()
        ep = _Endpoint(uri, self.lanes, rng)
        self._stats[uri] = ep.stats
        ep.tasks = [
            asyncio.create_task(self._lane(ep, n), name=f"cityward-notify-{n}")
            for n in range(self.lanes)
        ]
        self._endpoints[uri] = ep
        return ep

    def _settled(self) -> None:
        """Something is to be written back: make sure the pump flushes it soon."""
        if self._flush_pending or self._loop is None:
            return
        self._flush_pending = True
        self._loop.call_later(self.flush_interval, self._wake.set)

    # -- the lanes --------------------------------------------------------------------------
    async def _lane(self, ep: _Endpoint, n: int) -> None:
        queue, ready = ep.queues[n], ep.ready[n]
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            if not queue:
                ready.clear()
                await ready.wait()
                continue
            wait: float | None = None
            probed = False
            if ep.stats.consecutive_failures:
                async with ep.probe:  # one lane probes a failing endpoint, after its back-off
                    if not await self._sleep(ep.retry_at - loop.time()):
                        return
                    if ep.stats.consecutive_failures:
                        probed = True
                        wait = await self._attempt(ep, queue)
            if not probed:
                wait = await self._attempt(ep, queue)
            if wait is not None:  # all it holds waits for a cooldown (or for a new row)
                ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), wait)

    def _transport(self, uri: str) -> Transport | None:
        scheme = uri.split(":", 1)[0].lower()
        if scheme in ("http", "https"):
            return self._http
        if scheme in ("mqtt", "mqtts"):
            return self._mqtt
        return None

    @staticmethod
    def _next(ep: _Endpoint, queue: deque[OutboxItem], now: float) -> int | float:
        """The position of the row to send next: the first one that neither waits for its
        subscription's cooldown nor has an earlier row of its key before it; else (a float)
        the seconds until the first cooldown ends."""
        if not ep.cooling:
            return 0
        held: set[str] = set()  # keys with a row that waits: their later rows wait too
        wait = float("inf")
        for i, item in enumerate(queue):
            if item.key in held:
                continue
            until = ep.cooling.get((item.tenant, item.subscription_id))
            if until is None:
                return i
            if until <= now:
                del ep.cooling[(item.tenant, item.subscription_id)]
                return i
            held.add(item.key)
            wait = min(wait, until - now)
        return wait

    async def _attempt(self, ep: _Endpoint, queue: deque[OutboxItem]) -> float | None:
        """Send one row of ``queue``; None when it did, else the seconds that every row of it
        still waits for a cooldown."""
        loop = asyncio.get_running_loop()
        if not queue:  # _drop() emptied it while the lane waited for the back-off
            return None
        pos = self._next(ep, queue, loop.time())
        if isinstance(pos, float):
            return pos
        item = queue[pos]
        transport = self._transport(item.endpoint)
        ep.stats.attempts += 1
        error: str | None = None
        self._inflight.add(item.seq)
        try:
            if transport is None:
                raise DeliveryError(f"no transport for {item.endpoint}")
            await transport.send(item)
        except DeliveryError as exc:
            error = str(exc) or type(exc).__name__
        except Exception as exc:  # a transport bug must not kill the lane
            log.exception("notification to %s failed unexpectedly", item.endpoint)
            error = repr(exc)
        finally:
            self._inflight.discard(item.seq)
        # the queue may have changed meanwhile (new rows, _drop()): the row is where it is now
        pos = next(i for i, queued in enumerate(queue) if queued.seq == item.seq)
        forgotten = item.seq in self._forgotten
        if forgotten:  # dropped meanwhile (its row changed or went away): not sent again
            self._forgotten.discard(item.seq)
            del queue[pos]
            del self._known[item.seq]
        attempts = item.attempts + 1
        item = replace(item, attempts=attempts)
        at = format_ts(datetime.now(UTC))
        if error is None:
            if not forgotten:
                del queue[pos]
            self._done.append(item.seq)
            self.delivered += 1
            ep.stats.delivered += 1
            ep.stats.consecutive_failures = 0
            ep.retry_at = 0.0
            ep.cooling.pop((item.tenant, item.subscription_id), None)
            result = DeliveryResult(item, True, at)
        else:
            self.failed_attempts += 1
            ep.stats.failures += 1
            ep.stats.consecutive_failures += 1
            delay = self.policy.delay(ep.stats.consecutive_failures, ep.rng)
            ep.stats.delays.append(delay)
            del ep.stats.delays[:-_HISTORY]
            ep.retry_at = max(ep.retry_at, loop.time() + delay)
            # the subscriber's cooldown holds back its own subscription, not the endpoint:
            # applied to retry_at, it held every subscription notifying the same URI
            cooldown = item.payload.get("cooldown")
            if cooldown:
                ep.cooling[(item.tenant, item.subscription_id)] = loop.time() + float(cooldown)
            final = not forgotten and 0 < self.policy.max_attempts <= attempts
            if final:
                del queue[pos]
                self._done.append(item.seq)
                self.given_up += 1
                ep.stats.given_up += 1
            else:
                if forgotten:  # claimed again by whoever has it now (the re-pointed row)
                    self._released.append(item.seq)
                else:
                    queue[pos] = item
                self._failed.append((item.seq, attempts, error))
            result = DeliveryResult(item, False, at, error, final)
        self._settled()
        await self._report(result)
        return None

    async def _report(self, result: DeliveryResult) -> None:
        if self.on_result is None:
            return
        try:
            out = self.on_result(result)
            if inspect.isawaitable(out):
                await out
        except Exception:
            log.exception("notification result callback failed")
