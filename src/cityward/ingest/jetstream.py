"""Ingest scaled out over NATS JetStream: fronts publish readings, writers write them.

With ``[bus] kind = "nats"`` an ingest process takes one role or both (docs/bus.md):

* **front**: the adapters map device messages as in memory mode, but each :class:`Reading`
  goes to a :class:`JetStreamSink`, which publishes it to the stream ``CITYWARD_INGEST``
  (subject ``cityward.ingest.<source>``, file storage) and tells the adapter it is settled only
  once JetStream acknowledged it. So the MQTT PUBACK (or the HTTP answer) follows the stream's
  acknowledgement: a front killed at any point leaves every unacknowledged message with the
  broker or the device.
* **writer**: :class:`JetStreamWriter` pulls from a durable consumer that every writer shares
  (each message goes to one of them), turns each message back into its Readings and puts them
  into a normal :class:`BatchWriter`. A message is acknowledged once the BatchWriter has
  settled every reading in it: after the bank commit (a refused reading: after its dead
  letter is stored). A writer killed mid-stream leaves its messages unacknowledged; JetStream
  delivers them to another writer after ``ack_wait_s``, and the delivery keys the BatchWriter
  commits with the readings make that redelivery a no-op for what was committed: each
  reading once.

A stream message holds up to ``message_readings`` readings of one source (and at most
MESSAGE_BYTES), not one: JetStream's cost, and the NATS client's in Python, is per message.
With a message per reading, the front spent about 150 us of CPU a reading publishing, the
writer about as much pulling and acknowledging, and the NATS server 90: four times what an
embedded ingest process spends on a reading altogether. A message's ``Nats-Msg-Id`` is its
source and a digest of its readings' keys, so a front that publishes a message again after a
failed round trip (NATS restarting) has it stored once; a reading that comes again in another
message (an MQTT redelivery after a front was killed, a device's retry) is dropped by the
writers' delivery keys instead. :func:`decode_message` still reads the single-reading messages
of earlier fronts (a stream that holds some when the writers are upgraded).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from cityward.bus.nats import BusError, JetStream, Message
from cityward.ingest.settings import IngestStreamSettings
from cityward.ingest.writer import Batcher, BatchWriter, Reading

log = logging.getLogger("cityward.ingest")


#: a stream message holds at most about this many bytes of readings (NATS refuses a message over
#: its max_payload, 1 MiB by default); a single larger reading still goes, alone
MESSAGE_BYTES = 512 * 1024


def _reading_doc(reading: Reading, max_raw: int | None) -> dict[str, Any]:
    # ``raw`` only serves a dead letter, which keeps ``max_raw`` bytes of it: one byte more
    # travels, so that it is still marked truncated
    raw = reading.raw if max_raw is None else reading.raw[: max_raw + 1]
    return {
        "source": reading.source,
        "key": reading.key,
        "fragment": reading.fragment,
        "raw": base64.b64encode(raw).decode("ascii"),
        "topic": reading.topic,
    }


def encode_reading(reading: Reading, max_raw: int | None = None) -> bytes:
    """One reading alone: the stream's form of a reading before batched messages, which
    :func:`decode_message` still reads."""
    return orjson.dumps(_reading_doc(reading, max_raw))


def _reading(d: Any) -> Reading:
    fragment = d["fragment"]
    if not isinstance(fragment, dict) or not isinstance(fragment.get("id"), str):
        raise ValueError("the fragment is not an entity")
    return Reading(
        str(d["source"]),
        str(d["key"]),
        fragment,
        raw=base64.b64decode(d.get("raw", "")),
        topic=str(d.get("topic", "")),
    )


def decode_message(data: bytes) -> list[Reading]:
    """The readings of a stream message: several (:func:`pack`) or one (:func:`encode_reading`);
    ValueError, KeyError or TypeError if it holds no readings."""
    d = orjson.loads(data)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if "readings" in d:
        items = d["readings"]
        if not isinstance(items, list):
            raise ValueError("readings is not a list")
        return [_reading(x) for x in items]
    return [_reading(d)]


def message_id(source: str, readings: Sequence[Reading]) -> str:
    """``<source>:<count>:<digest of the keys>``: the same readings make the same id."""
    digest = hashlib.blake2b(digest_size=16)
    for r in readings:
        digest.update(r.key.encode())
        digest.update(b"\n")
    return f"{source}:{len(readings)}:{digest.hexdigest()}"


def pack(
    readings: Sequence[Reading], per_message: int, max_raw: int | None = None
) -> list[tuple[str, list[Reading], bytes]]:
    """The stream messages of ``readings``: (source, its readings, data), each of one source,
    at most ``per_message`` readings and about MESSAGE_BYTES, data ``{"readings": [...]}``
    (each reading encoded once, as :func:`encode_reading` does, and joined); every source's
    readings in their order, the sources in the order they first come."""
    by_source: dict[str, list[Reading]] = {}
    for r in readings:
        by_source.setdefault(r.source, []).append(r)
    chunks: list[tuple[str, list[Reading], list[bytes]]] = []
    for source, group in by_source.items():
        chunk: list[Reading] = []
        parts: list[bytes] = []
        size = 0
        for r in group:
            part = encode_reading(r, max_raw)
            if chunk and (len(chunk) >= per_message or size + len(part) > MESSAGE_BYTES):
                chunk, parts, size = [], [], 0
            if not chunk:
                chunks.append((source, chunk, parts))
            chunk.append(r)
            parts.append(part)
            size += len(part) + 1
    return [(src, rs, b'{"readings":[' + b",".join(ps) + b"]}") for src, rs, ps in chunks]


def ensure_stream(js: JetStream, settings: IngestStreamSettings) -> str:
    """Create the readings' stream, or bring it to this configuration (fronts and writers
    both do, so either may start first); returns its retention.

    A work queue: a message leaves the stream once a writer has acknowledged it, that is once
    its readings are committed to the bank. With limits retention (streams made before
    2026-11-25, which NATS cannot convert) every reading stayed on the server's disk for
    max_age_s, written or not: 392 bytes a reading of 45 bytes (measured), 340 GB a day at
    10,000 readings/s. Full (max_bytes), it refuses new messages: the fronts' publishes fail
    and are retried (backpressure).
    """
    return js.ensure_stream(
        settings.stream,
        [settings.subject + ".>"],
        max_age_s=settings.max_age_s,
        duplicate_window_s=settings.duplicate_window_s,
        max_bytes=settings.max_bytes,
        retention="workqueue",
        discard="new",
    )


@dataclass
class SinkStats:
    received: int = 0
    published: int = 0  # readings acknowledged by the stream (a repeat within the window included)
    messages: int = 0  # stream messages they went in
    batches: int = 0
    publish_failures: int = 0
    waits: int = 0  # puts that had to wait for room (backpressure)
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JetStreamSink(Batcher):
    """A front's writer: publishes readings to the ingest stream, in batches, in order.

    The same ``put``/``pending``/``start``/``stop`` as :class:`BatchWriter`. At most
    ``max_pending`` readings wait (a full queue makes ``put`` wait: the adapters' backpressure);
    a sender thread publishes what is queued, up to ``settings.publish_batch`` per round trip,
    and retries while NATS is away. A reading's ``done(None)`` is called after JetStream
    acknowledged it, never earlier.
    """

    def __init__(
        self,
        js: JetStream,
        settings: IngestStreamSettings,
        *,
        max_pending: int = 20_000,
        max_raw: int | None = None,
        retry_max_s: float = 5.0,
    ) -> None:
        self.js = js
        self.settings = settings
        self.max_raw = max_raw
        self.retry_max_s = retry_max_s
        super().__init__(max_pending, SinkStats())
        self.stats: SinkStats

    thread_name = "ingest-publisher"

    def _limits(self) -> tuple[int, float]:
        # no lingering for a batch to fill: while a round trip is on its way, the queue fills
        # by itself, so batches grow with the load and a lone reading goes at once
        return self.settings.publish_batch, 0.0

    def _handle(self, batch: list[Reading]) -> None:
        self._publish(batch)

    def _join_s(self, drain_s: float) -> float:
        return self.js.timeout + 10

    def _publish(self, batch: list[Reading]) -> None:
        prefix = self.settings.subject
        messages = [
            (f"{prefix}.{source}", data, message_id(source, readings))
            for source, readings, data in pack(batch, self.settings.message_readings, self.max_raw)
        ]
        attempt = 0
        while True:
            try:
                self.js.publish_many(messages)
                break
            except BusError as exc:
                # some may be stored already: publishing them again (the same readings in
                # the same messages, so with the same ids) is safe, the stream drops the repeats
                attempt += 1
                self.stats.publish_failures += 1
                self.stats.last_error = str(exc)
                delay = min(0.05 * 2**attempt, self.retry_max_s)
                if attempt in (1, 3) or attempt % 20 == 0:
                    log.warning(
                        "ingest: publishing %d readings failed (attempt %d): %s; retrying in "
                        "%.1f s",
                        len(batch),
                        attempt,
                        exc,
                        delay,
                    )
                if self._stop.wait(delay):
                    return  # stopping while NATS is away: left unacknowledged to the adapters
        self.stats.published += len(batch)
        self.stats.messages += len(messages)
        self.stats.batches += 1
        for r in batch:
            if r.done is not None:
                try:
                    r.done(None)
                except Exception:
                    log.exception("ingest: acknowledging a reading of %s failed", r.source)


@dataclass
class PullStats:
    pulled: int = 0  # readings
    messages: int = 0  # stream messages they came in
    redelivered: int = 0  # readings delivered more than once (a writer died, an ack was lost)
    acked: int = 0  # readings whose message was acknowledged
    undecodable: int = 0  # messages
    pull_failures: int = 0
    ack_failures: int = 0
    last_error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JetStreamWriter:
    """A writer: pulls readings from the shared durable consumer into ``writer``.

    :meth:`start` creates the consumer (if missing) and starts ``writer`` and two threads:
    the puller, which takes at most what the BatchWriter has room for, and the acker, which
    acknowledges settled readings in batches (the last one confirmed by the server). Readings
    held longer than a third of ``ack_wait_s`` (a slow bank, a full queue) are marked in
    progress, so JetStream does not hand a live writer's readings to another one.
    """

    def __init__(
        self,
        js: JetStream,
        settings: IngestStreamSettings,
        writer: BatchWriter,
        *,
        fetch_timeout_s: float = 0.5,
    ) -> None:
        self.js = js
        self.settings = settings
        self.writer = writer
        self.fetch_timeout_s = fetch_timeout_s
        self.stats = PullStats()
        self._filter = settings.subject + ".>"
        self._stop = threading.Event()  # stop pulling once a pull comes back empty
        self._deadline = 0.0  # ... or at this time
        self._closing = threading.Event()  # the acker's last round
        self._lock = threading.Condition()
        self._settled: list[Message] = []
        # stream seq -> (message, since, its readings)
        self._held: dict[int, tuple[Message, float, int]] = {}
        self._per_message = 1.0  # readings a message brings, on average (sizes the pulls)
        self._puller: threading.Thread | None = None
        self._acker: threading.Thread | None = None

    @property
    def held(self) -> int:
        """Messages pulled and not yet acknowledged."""
        with self._lock:
            return len(self._held)

    def start(self) -> None:
        s = self.settings
        self.js.ensure_consumer(
            s.stream,
            s.durable,
            self._filter,
            ack_wait_s=s.ack_wait_s,
            max_ack_pending=s.max_ack_pending,
        )
        self._stop.clear()
        self._closing.clear()
        self.writer.start()
        self._acker = threading.Thread(target=self._ack_loop, name="ingest-acker", daemon=True)
        self._acker.start()
        self._puller = threading.Thread(target=self._pull_loop, name="ingest-puller", daemon=True)
        self._puller.start()

    def stop(self, drain_s: float = 10.0) -> None:
        """Take what the consumer still has for this writer (until a pull comes back empty,
        for at most ``drain_s``), write it, acknowledge it, stop. Anything left unwritten is
        not acknowledged and goes to another writer (or this one's restart)."""
        deadline = time.monotonic() + drain_s
        self._deadline = deadline
        self._stop.set()
        if self._puller is not None:
            self._puller.join(timeout=drain_s + self.fetch_timeout_s + self.js.timeout + 1)
            self._puller = None
        self.writer.stop(max(0.5, deadline - time.monotonic()))
        self._closing.set()
        with self._lock:
            self._lock.notify_all()
        if self._acker is not None:
            self._acker.join(timeout=self.js.timeout + 5)
            self._acker = None

    # -- pulling ----------------------------------------------------------------------------
    def _pull_loop(self) -> None:
        s = self.settings
        room_max = self.writer.settings.max_pending
        failures = 0
        touched = time.monotonic()
        while True:
            if self._stop.is_set() and time.monotonic() >= self._deadline:
                return
            now = time.monotonic()
            if now - touched >= s.ack_wait_s / 3:
                touched = now
                self._keep_alive(now)
            room = room_max - self.writer.pending
            if room <= 0:
                # the bank is slower than the stream: pull nothing until the writer has room
                self.writer.wait_idle(0.05)
                continue
            # as many messages as the writer has room for readings, by their average size
            want = max(1, int(min(s.pull_batch, room) / self._per_message))
            try:
                msgs = self.js.pull(s.stream, s.durable, self._filter, want, self.fetch_timeout_s)
                failures = 0
            except BusError as exc:
                failures += 1
                self.stats.pull_failures += 1
                self.stats.last_error = str(exc)
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("ingest: pulling readings failed: %s", exc)
                if self._stop.is_set():
                    return
                time.sleep(min(5.0, 0.1 * 2**failures))
                continue
            if not msgs:
                if self._stop.is_set():
                    return  # drained: the consumer has nothing more for this writer now
                continue
            self._hand_over(msgs)

    def _hand_over(self, msgs: list[Message]) -> None:
        now = time.monotonic()
        for msg in msgs:
            try:
                readings = decode_message(msg.data)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                # not readings (something else published on the subjects): never again
                self.stats.undecodable += 1
                log.error("ingest: not readings on %s (seq %d): %s", msg.subject, msg.seq, exc)
                try:
                    msg.term()
                except BusError as err:
                    log.warning("ingest: dropping seq %d failed: %s", msg.seq, err)
                continue
            n = len(readings)
            self.stats.messages += 1
            self.stats.pulled += n
            if msg.delivered > 1:
                self.stats.redelivered += n
            self._per_message += 0.1 * (max(n, 1) - self._per_message)
            done = self._done_for(msg, n)
            for reading in readings:
                reading.done = done
            with self._lock:
                self._held[msg.seq] = (msg, now, n)
                if n == 0:
                    self._settled.append(msg)
                    self._lock.notify_all()
            # there was room for these when they were pulled (give or take a message); only
            # the adapters of an "all" process, putting into the same writer, can make this
            # wait
            self.writer.put_many(readings)

    def _done_for(self, msg: Message, n: int) -> Callable[[str | None], None]:
        left = n

        def done(_why: str | None) -> None:
            # the BatchWriter calls this after its commit (or after storing the dead letter)
            # for each reading: once it has for every reading of the message, the stream may
            # forget the message
            nonlocal left
            with self._lock:
                left -= 1
                if left == 0:
                    self._settled.append(msg)
                    self._lock.notify_all()

        return done

    def _keep_alive(self, now: float) -> None:
        """Restart the ack wait of readings held a third of it (a slow commit, a long queue)."""
        limit = self.settings.ack_wait_s / 3
        with self._lock:
            old = [m for m, since, _ in self._held.values() if now - since >= limit]
        for msg in old:
            try:
                msg.in_progress()
            except BusError as exc:  # then it goes to another writer: a repeat, not a loss
                log.warning("ingest: extending the ack wait failed: %s", exc)
                return
        if old:
            with self._lock:
                for msg in old:
                    held = self._held.get(msg.seq)
                    if held is not None:
                        self._held[msg.seq] = (msg, now, held[2])

    # -- acknowledging ----------------------------------------------------------------------
    def _ack_loop(self) -> None:
        while True:
            with self._lock:
                while not self._settled and not self._closing.is_set():
                    self._lock.wait(0.2)
                batch, self._settled = self._settled, []
                closing = self._closing.is_set()
            if batch:
                try:
                    self.js.ack_all(batch)
                    with self._lock:
                        self.stats.acked += sum(
                            self._held[m.seq][2] for m in batch if m.seq in self._held
                        )
                except BusError as exc:
                    # they come again after ack_wait; the delivery keys make that a no-op
                    self.stats.ack_failures += 1
                    self.stats.last_error = str(exc)
                    log.warning("ingest: acknowledging %d readings failed: %s", len(batch), exc)
                with self._lock:
                    for msg in batch:
                        self._held.pop(msg.seq, None)
            if closing and not batch:
                return
