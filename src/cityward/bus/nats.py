"""A small synchronous facade over ``nats-py`` JetStream, for threads that are not async.

``nats-py`` is asyncio only, while write hooks, worker threads and relays of cityward are plain
threads. :class:`JetStream` runs one asyncio loop in a daemon thread of its own and exposes
blocking methods that hand their coroutine to that loop::

    js = JetStream("nats://127.0.0.1:4222", name="cityward-api")
    js.connect()                                    # retries until connect_timeout_s
    js.ensure_stream("CITYWARD_INGEST", ["cityward.ingest.>"], max_age_s=86400)
    seq = js.publish("cityward.ingest.loop-17", b"...", msg_id="loop-17:42")
    for msg in js.pull("CITYWARD_INGEST", "writers", "cityward.ingest.>", batch=100):
        handle(msg.data)
        msg.ack()                                   # or msg.nak(delay=5), msg.in_progress()
    js.close()

Every method is thread-safe; none may be called from the facade's own loop thread (that
would wait on itself; :class:`BusError` says so). Once connected, ``nats-py`` reconnects by
itself for as long as the process lives; a call made while NATS is away fails after its
timeout with :class:`BusError`, and the caller retries.

Publishing with ``msg_id`` sets the ``Nats-Msg-Id`` header: the stream keeps one message per
id within its duplicate window, so a publisher that retries after a lost acknowledgement (or
a process that died between publishing and recording it) does not store it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Literal, TypeVar

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as jsapi

log = logging.getLogger(__name__)
T = TypeVar("T")
Deliver = Literal["all", "new", "last"]
Retention = Literal["limits", "workqueue"]
_RETENTION: dict[Retention, jsapi.RetentionPolicy] = {
    "limits": jsapi.RetentionPolicy.LIMITS,
    "workqueue": jsapi.RetentionPolicy.WORK_QUEUE,
}

_DELIVER = {
    "all": jsapi.DeliverPolicy.ALL,
    "new": jsapi.DeliverPolicy.NEW,
    "last": jsapi.DeliverPolicy.LAST,
}


class BusError(RuntimeError):
    """A bus operation failed (NATS away, timeout, refused by the server)."""


class BusUnavailable(BusError):
    """NATS could not be reached at all."""


class Message:
    """One JetStream message as a consumer receives it; the acks block until sent."""

    __slots__ = ("_acks", "_js", "_msg", "data", "delivered", "headers", "seq", "subject")

    def __init__(self, js: JetStream, msg: Msg, acks: bool) -> None:
        self._js = js
        self._msg = msg
        self._acks = acks  # False for ordered consumers: they take no acknowledgements
        self.data: bytes = msg.data
        self.subject: str = msg.subject
        self.headers: dict[str, str] = dict(msg.headers or {})
        meta = msg.metadata
        self.seq: int = int(meta.sequence.stream)  # the stream sequence
        self.delivered: int = int(meta.num_delivered)  # 1 on first delivery, more on redelivery

    @property
    def msg_id(self) -> str | None:
        return self.headers.get("Nats-Msg-Id")

    def ack(self, confirm: bool = False) -> None:
        """Done with it; ``confirm`` waits for the server to have recorded the ack."""
        if self._acks:
            if confirm:
                self._js._run(self._msg.ack_sync(timeout=self._js.timeout), self._js.timeout)
            else:
                self._js._run(self._msg.ack(), self._js.timeout)

    def nak(self, delay: float | None = None) -> None:
        """Not done: deliver it again (after ``delay`` seconds), to this or another consumer."""
        if self._acks:
            self._js._run(self._msg.nak(delay=delay), self._js.timeout)

    def in_progress(self) -> None:
        """Still working on it: restarts the consumer's ack wait for this message."""
        if self._acks:
            self._js._run(self._msg.in_progress(), self._js.timeout)

    def term(self) -> None:
        """Never deliver it again (a message that cannot be handled, ever)."""
        if self._acks:
            self._js._run(self._msg.term(), self._js.timeout)


class OrderedSubscription:
    """An ephemeral ordered consumer: every message of the filter, in stream order, no acks.

    The server keeps no state for it beyond the connection; ``nats-py`` recreates it from the
    last sequence seen when it detects a gap or the connection comes back.
    """

    def __init__(self, js: JetStream, sub: JetStreamContext.PushSubscription) -> None:
        self._js = js
        self._sub = sub

    def fetch(self, batch: int = 100, timeout: float = 1.0) -> list[Message]:
        """Up to ``batch`` messages: what has arrived, or waits ``timeout`` for the first."""

        async def take() -> list[Msg]:
            try:
                first = await self._sub.next_msg(timeout=timeout)
            except nats.errors.TimeoutError:
                return []
            out = [first]
            while len(out) < batch and self._sub.pending_msgs > 0:
                out.append(await self._sub.next_msg(timeout=timeout))
            return out

        msgs = self._js._run(take(), timeout + self._js.timeout)
        return [Message(self._js, m, acks=False) for m in msgs]

    def close(self) -> None:
        with contextlib.suppress(BusError, nats.errors.Error):
            self._js._run(self._sub.unsubscribe(), self._js.timeout)


class JetStream:
    """One NATS connection with JetStream, usable from any thread but its own loop's.

    ``url``: one server or several, comma-separated. ``name`` shows in the server's
    connection list (``nats server report connections``). ``timeout``: of each request to
    the server (publish acknowledgements, stream and consumer management).
    """

    def __init__(
        self,
        url: str,
        name: str = "cityward",
        *,
        connect_timeout_s: float = 10.0,
        timeout: float = 5.0,
    ) -> None:
        self.url = url
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.timeout = timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._pulls: dict[tuple[str, str], JetStreamContext.PullSubscription] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"nats-{name}", daemon=True
        )
        self._thread.start()
        self._closing = False  # close() began: a disconnect is expected
        self._closed = False

    # -- the loop ---------------------------------------------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the facade's loop and wait for its result (BusError on failure)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise BusError("a JetStream method was called from the facade's own loop thread")
        if self._closed:
            coro.close()
            raise BusError("the JetStream connection is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise BusError(f"NATS at {self.url} did not answer in {timeout} s") from None
        except BusError:
            raise
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
            raise BusError(f"NATS at {self.url}: {exc.__class__.__name__}: {exc}") from exc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusError("JetStream is not connected: call connect() first")
        return self._js

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (its ``max_payload``; 1 MB by default)."""
        nc = self._nc
        return int(nc.max_payload) if nc is not None and nc.max_payload else 1024 * 1024

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect, retrying with back-off for up to ``connect_timeout_s``.

        Raises :class:`BusUnavailable` naming the URL when no attempt succeeded.
        """
        if self._nc is not None:
            return
        deadline = time.monotonic() + self.connect_timeout_s
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                self._nc = self._run(self._connect_once(max(0.5, min(2.0, left))), left + 5)
                self._js = self._nc.jetstream(timeout=self.timeout)
                log.info("connected to NATS at %s as %s", self.url, self.name)
                return
            except BusError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BusUnavailable(
                        f"NATS at {self.url} is unreachable after {self.connect_timeout_s:g} s "
                        f"({attempt} attempts): {exc.__cause__ or exc}"
                    ) from exc
                log.warning("NATS at %s: connect attempt %d failed: %s", self.url, attempt, exc)
                time.sleep(min(delay, left))  # back-off between attempts
                delay = min(delay * 2, 2.0)

    async def _connect_once(self, timeout: float) -> Client:
        async def error_cb(exc: Exception) -> None:
            log.warning("NATS at %s: %s", self.url, exc)

        async def disconnected_cb() -> None:
            if not self._closing:
                log.warning("disconnected from NATS at %s; reconnecting", self.url)

        async def reconnected_cb() -> None:
            log.info("reconnected to NATS at %s", self.url)

        # A short attempt (connect() retries with its own deadline: with -1 nats-py would
        # retry the first connect for ever); once connected, nats-py reconnects for ever by
        # itself, as a NATS restart must not take the process down.
        nc = await nats.connect(
            servers=[s.strip() for s in self.url.split(",") if s.strip()],
            name=self.name,
            connect_timeout=timeout,
            allow_reconnect=True,
            max_reconnect_attempts=1,  # the first connect: each server at most twice
            reconnect_time_wait=0.5,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
        )
        nc.options["max_reconnect_attempts"] = -1
        return nc

    def close(self) -> None:
        """Flush what is pending (acks), close the connection and stop the loop thread."""
        if self._closed:
            return
        self._closing = True
        nc = self._nc
        if nc is not None:
            with contextlib.suppress(BusError):
                self._run(self._close(nc), self.timeout + 5)
        self._closed = True
        self._nc = None
        self._js = None
        self._pulls.clear()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _close(self, nc: Client) -> None:
        with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
            await nc.flush(timeout=2)
        await nc.close()

    # -- streams ----------------------------------------------------------------------------
    def ensure_stream(
        self,
        name: str,
        subjects: Sequence[str],
        *,
        max_age_s: float | None = None,
        duplicate_window_s: float = 120.0,
        max_bytes: int | None = None,
        retention: Retention = "limits",
        discard: Literal["old", "new"] = "old",
    ) -> Retention:
        """Create the stream (file storage) or bring an existing one to this configuration;
        returns the retention it has.

        ``max_age_s``: how long messages are kept (None: until limits); the duplicate window
        is capped to it, as the server requires. ``retention``: ``limits`` keeps every message
        until ``max_age_s`` or ``max_bytes`` (a stream many followers read); ``workqueue``
        deletes a message once its consumer acknowledged it (one durable shares the work).
        ``discard``: when ``max_bytes`` is reached, drop the oldest messages (``old``) or
        refuse new ones (``new``: the publisher gets an error and waits).

        NATS cannot change the retention of a stream: an existing one keeps its own, the rest
        of the configuration is applied, and a warning says how to have the new retention.
        """
        if max_age_s is not None:
            duplicate_window_s = min(duplicate_window_s, max_age_s)

        def config(kept: Retention) -> jsapi.StreamConfig:
            return jsapi.StreamConfig(
                name=name,
                subjects=list(subjects),
                storage=jsapi.StorageType.FILE,
                retention=_RETENTION[kept],
                max_age=max_age_s,
                duplicate_window=duplicate_window_s,
                max_bytes=max_bytes,
                discard=jsapi.DiscardPolicy.NEW if discard == "new" else jsapi.DiscardPolicy.OLD,
            )

        async def ensure() -> Retention:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config(retention))
                return retention
            except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
                # what a server without JetStream answers: it said only "code=None"
                raise BusError(
                    f"NATS at {self.url} has no JetStream: start nats-server with -js (and -sd "
                    "DIR for its store)"
                ) from None
            have: Retention = retention
            for kind, policy in _RETENTION.items():
                if policy == info.config.retention:
                    have = kind
            if have != retention:
                log.warning(
                    "stream %s has %s retention, the configuration asks for %s, and NATS "
                    "cannot change it: it stays as it is. To have it, let the stream drain "
                    "(stop its publishers, let its consumers finish), remove it (nats stream "
                    "rm %s) and start again: it is made anew",
                    name,
                    have,
                    retention,
                    name,
                )
            await self.js.update_stream(config(have))
            return have

        return self._run(ensure(), self.timeout * 3)

    def delete_stream(self, name: str) -> bool:
        """Delete a stream and its consumers; False when there was none."""

        async def delete() -> bool:
            try:
                return bool(await self.js.delete_stream(name))
            except nats.js.errors.NotFoundError:
                return False

        return self._run(delete(), self.timeout)

    def stream_messages(self, name: str) -> int:
        """How many messages the stream holds."""

        async def info() -> int:
            return int((await self.js.stream_info(name)).state.messages)

        return self._run(info(), self.timeout)

    def stream_bytes(self, name: str) -> int:
        """How many bytes the stream's messages take."""

        async def info() -> int:
            return int((await self.js.stream_info(name)).state.bytes)

        return self._run(info(), self.timeout)

    def stream_data(self, name: str) -> list[bytes]:
        """The data of every message the stream holds, in stream order, read by sequence
        without a consumer (a work-queue stream allows no second one): for tools and tests."""

        async def read() -> list[bytes]:
            state = (await self.js.stream_info(name)).state
            out: list[bytes] = []
            for seq in range(state.first_seq, state.last_seq + 1):
                try:
                    msg = await self.js.get_msg(name, seq)
                except nats.js.errors.NotFoundError:
                    continue  # acknowledged (work queue) or removed
                out.append(msg.data or b"")
            return out

        return self._run(read(), self.timeout * 10)

    # -- publishing -------------------------------------------------------------------------
    def publish(
        self, subject: str, data: bytes, msg_id: str | None = None, timeout: float | None = None
    ) -> int:
        """Publish and wait for the stream's acknowledgement; the stream sequence it got.

        With ``msg_id``, a message published again within the stream's duplicate window is
        not stored twice: the ack of the repeat names the first one's sequence.
        """
        wait = self.timeout if timeout is None else timeout
        headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None

        async def publish() -> int:
            ack = await self.js.publish(subject, data, timeout=wait, headers=headers)
            return int(ack.seq)

        return self._run(publish(), wait + 1)

    def publish_many(
        self,
        messages: Sequence[tuple[str, bytes, str | None]],
        timeout: float | None = None,
    ) -> list[int]:
        """Publish ``(subject, data, msg_id)`` messages in this order, acks awaited together.

        Pipelined: one round trip for the lot instead of one each. The messages leave in
        order on the one connection, so the stream stores them in this order. Raises
        :class:`BusError` if any was not acknowledged (some may have been stored: publish
        them again with the same ``msg_id`` to be sure).
        """
        if not messages:
            return []
        wait = self.timeout if timeout is None else timeout

        async def publish() -> list[int]:
            nc = self._nc
            assert nc is not None
            loop = asyncio.get_running_loop()
            futures: list[asyncio.Future[Msg]] = []
            inbox = nc.new_inbox()

            async def on_ack(msg: Msg) -> None:
                i = int(msg.subject.rsplit(".", 1)[1])
                if not futures[i].done():
                    futures[i].set_result(msg)

            sub = await nc.subscribe(inbox + ".*", cb=on_ack)
            try:
                for i, (subject, data, msg_id) in enumerate(messages):
                    futures.append(loop.create_future())
                    headers = {"Nats-Msg-Id": msg_id} if msg_id is not None else None
                    await nc.publish(subject, data, reply=f"{inbox}.{i}", headers=headers)
                _, pending = await asyncio.wait(futures, timeout=wait)
                if pending:
                    raise BusError(
                        f"NATS at {self.url}: {len(pending)} of {len(messages)} publishes "
                        f"not acknowledged in {wait} s"
                    )
                return [
                    _pub_ack_seq(f.result(), m[0]) for f, m in zip(futures, messages, strict=True)
                ]
            finally:
                await sub.unsubscribe()

        return self._run(publish(), wait + 5)

    # -- consuming --------------------------------------------------------------------------
    def ensure_consumer(
        self,
        stream: str,
        durable: str,
        subject_filter: str,
        *,
        ack_wait_s: float = 30.0,
        max_ack_pending: int = 10_000,
        max_deliver: int = -1,
        deliver: Deliver = "all",
    ) -> None:
        """Create a durable pull consumer unless it exists (an existing one keeps its place
        and its configuration). One with another filter is a BusError naming both (after a
        changed changes_subject, it received nothing at all, and nothing said why)."""
        if (stream, durable) in self._pulls:
            return  # subscribed already (every pull passes here)
        config = jsapi.ConsumerConfig(
            durable_name=durable,
            filter_subject=subject_filter,
            ack_policy=jsapi.AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_ack_pending=max_ack_pending,
            max_deliver=max_deliver,
            deliver_policy=_DELIVER[deliver],
        )

        async def ensure() -> JetStreamContext.PullSubscription:
            sub = await self.js.pull_subscribe(
                subject_filter, durable=durable, stream=stream, config=config
            )
            have = (await self.js.consumer_info(stream, durable)).config
            if have.filter_subject != subject_filter:
                # NATS 2.9 takes a new filter on a durable but goes on delivering nothing
                # (measured): said at start, not a follower that silently receives nothing
                await sub.unsubscribe()
                raise BusError(
                    f"consumer {durable} of stream {stream} filters {have.filter_subject}, and "
                    f"the configuration asks for {subject_filter} (changes_subject changed?): "
                    f"remove it (nats consumer rm {stream} {durable}); the next start makes "
                    "it anew, from the oldest change the stream keeps"
                )
            return sub

        self._pulls[(stream, durable)] = self._run(ensure(), self.timeout * 3)

    def consumer_missing(self, stream: str, durable: str) -> bool:
        """Whether the server no longer has this durable consumer (its stream deleted, or a
        NATS that came back without its store): a subscription cached here then fetches
        nothing, for ever, without an error. :meth:`pull` makes it anew afterwards."""

        async def info() -> bool:
            try:
                await self.js.consumer_info(stream, durable)
                return False
            except nats.js.errors.NotFoundError:
                return True

        missing = self._run(info(), self.timeout)
        if missing:
            self._pulls.pop((stream, durable), None)
        return missing

    def delete_consumer(self, stream: str, durable: str) -> bool:
        self._pulls.pop((stream, durable), None)

        async def delete() -> bool:
            try:
                return bool(await self.js.delete_consumer(stream, durable))
            except nats.js.errors.NotFoundError:
                return False

        return self._run(delete(), self.timeout)

    def pull(
        self,
        stream: str,
        durable: str,
        subject_filter: str,
        batch: int = 100,
        timeout: float = 1.0,
    ) -> list[Message]:
        """Up to ``batch`` messages from a durable pull consumer (created with the defaults of
        :meth:`ensure_consumer` if missing); waits up to ``timeout`` for the first, returns []
        when none came. Several processes pulling on one durable share its messages."""
        self.ensure_consumer(stream, durable, subject_filter)
        sub = self._pulls[(stream, durable)]

        async def fetch() -> list[Msg]:
            try:
                return list(await sub.fetch(batch, timeout=timeout))
            except TimeoutError:
                # nats.errors.TimeoutError, or now and then the plain asyncio one from inside
                # nats-py's fetch: either way no message came in time (not a server failure)
                return []

        msgs = self._run(fetch(), timeout + self.timeout)
        return [Message(self, m, acks=True) for m in msgs]

    def ack_all(self, messages: Sequence[Message]) -> None:
        """Acknowledge messages in one hop to the loop; the last one confirmed by the server,
        so once this returns none of them comes back (unless the server lost its state)."""
        acked = [m for m in messages if m._acks]
        if not acked:
            return

        async def ack() -> None:
            for m in acked[:-1]:
                await m._msg.ack()
            await acked[-1]._msg.ack_sync(timeout=self.timeout)

        self._run(ack(), self.timeout + 1)

    def subscribe_ordered(
        self, stream: str, subject_filter: str, deliver: Deliver = "new"
    ) -> OrderedSubscription:
        """An ordered ephemeral consumer of ``subject_filter``; read it with ``fetch``."""

        async def subscribe() -> JetStreamContext.PushSubscription:
            return await self.js.subscribe(
                subject_filter,
                stream=stream,
                ordered_consumer=True,
                deliver_policy=_DELIVER[deliver],
                idle_heartbeat=5.0,
            )

        return OrderedSubscription(self, self._run(subscribe(), self.timeout * 3))


def _pub_ack_seq(msg: Msg, subject: str) -> int:
    """The stream sequence of a JetStream publish acknowledgement (BusError when refused)."""
    if msg.headers and msg.headers.get("Status") == "503":
        raise BusError(f"no JetStream stream listens on {subject!r} (503 no responders)")
    try:
        body = orjson.loads(msg.data)
    except orjson.JSONDecodeError as exc:
        raise BusError(f"not a JetStream acknowledgement: {msg.data[:200]!r}") from exc
    if "error" in body:
        raise BusError(f"JetStream refused a message: {body['error']}")
    return int(body["seq"])
