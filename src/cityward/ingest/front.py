"""The receiving adapters in a process of their own: receiving and writing on two cores.

One Python process can use one core at a time (the GIL): an ingest worker that both speaks
MQTT and writes the bank topped out at about 9,700 readings/s on a 2-core machine with its
CPU at 100% and the other core a third idle. With ``[ingest] front_process = true`` (the
default) the adapters that run on threads of their own (MQTT: ``Adapter.separate``) run in a
child process, the *front*: it receives, decodes and maps each message as before and hands the
readings, a batch at a time, over a local socket to this process, whose :class:`BatchWriter`
writes them into the bank. The HTTP push adapter and file replay stay here (they live in the
API's request threads, or report to the CLI).

Nothing is acknowledged earlier than in one process: this process tells the front what became
of each reading of a batch once the writer has settled it (in the bank, already there, or
refused: the front stores the dead letter with the raw message it kept), and only then does
the front acknowledge the message to the broker. A front killed at any point leaves the
unacknowledged messages with the broker (this process respawns it, which delivers them
again; the delivery keys make the repeats no-ops); this process killed closes the socket, and
the front exits at once without acknowledging anything more.

The socket carries orjson messages framed by :class:`multiprocessing.connection.Connection`:

- front -> here: ``["batch", id, [[source, key, fragment], ...]]``, ``["status", {...}]``,
  ``["bye"]``;
- here -> front: the configuration first, then ``["done", id, [null | [field, reason], ...]]``
  and ``["stop", drain_s]``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson

from cityward.ingest.settings import SourceSettings
from cityward.ingest.writer import Batcher, BatchWriter, Reading, Refusal, refusal_reason

log = logging.getLogger("cityward.ingest")

#: batches sent to the writer and not yet settled, per front (a window, not a queue: the
#: writer's own ``max_pending`` is the real bound)
IN_FLIGHT = 8
STATUS_EVERY_S = 0.5
RESPAWN_S = 1.0


# -- this process's side --------------------------------------------------------------------
class _Batch:
    __slots__ = ("bid", "conn", "left", "out")

    def __init__(self, conn: Connection, bid: int, n: int) -> None:
        self.conn = conn  # the front it came from (a respawned one numbers its batches anew)
        self.bid = bid
        self.left = n
        self.out: list[list[str] | None] = [None] * n


class _Settle:
    """The ``done`` of a reading that came from the front: records its outcome, and sends the
    outcomes of its batch once the last one is in. The writer thread alone calls it."""

    __slots__ = ("batch", "front", "n")

    def __init__(self, front: FrontProcess, batch: _Batch, n: int) -> None:
        self.front = front
        self.batch = batch
        self.n = n

    def __call__(self, outcome: str | None) -> None:
        b = self.batch
        if outcome is not None:  # refused: the front stores the dead letter (it has the raw)
            field, why = (
                (outcome.field, outcome.why) if isinstance(outcome, Refusal) else ("$", outcome)
            )
            b.out[self.n] = [field, why]
        b.left -= 1
        if b.left == 0:
            self.front.send(["done", b.bid, b.out], to=b.conn)


@dataclass
class FrontStats:
    spawns: int = 0
    batches: int = 0
    readings: int = 0
    last_exit: str = ""


class FrontProcess:
    """Runs ``sources`` in a child process whose readings ``writer`` writes here.

    ``start`` spawns it; should it die, it is spawned again after a second (the broker
    delivers what it had not acknowledged to the new one). ``stop`` asks it to stop receiving
    and settle what it sent, then waits for it.
    """

    def __init__(
        self,
        sources: list[SourceSettings],
        writer: BatchWriter,
        *,
        dead_letters: Path,
        max_payload: int,
        batch_size: int,
        max_pending: int,
    ) -> None:
        self.names = {s.name for s in sources}  # the sources it runs
        self.writer = writer
        self.config = {
            "sources": [s.model_dump(mode="json") for s in sources],
            "dead_letters": str(dead_letters),
            "max_payload": max_payload,
            "batch_size": batch_size,
            "max_pending": max_pending,
        }
        self.stats = FrontStats()
        self.last_status: dict[str, Any] = {}
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._send_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopping.clear()
        self._spawn()
        self._thread = threading.Thread(target=self._run, name="ingest-front", daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        here, there = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cityward.ingest.front", str(there.fileno())],
                pass_fds=[there.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            there.close()
        self._conn = Connection(here.detach())
        self.stats.spawns += 1
        self.send(self.config)

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop the front: it stops receiving and waits (up to ``drain_s``) for what it sent
        to be settled, then exits. Readings it still had are not acknowledged."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.send(["stop", drain_s])
        if self._thread is not None:
            self._thread.join(timeout=drain_s + 15)
            self._thread = None
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def send(self, message: Any, to: Connection | None = None) -> None:
        """Send to the front (``to``: only if it is still that one)."""
        data = orjson.dumps(message)
        with self._send_lock:
            conn = self._conn
            if conn is None or (to is not None and to is not conn):
                return
            # the front gone: its readings are the broker's again
            with contextlib.suppress(OSError):
                conn.send_bytes(data)

    # -- the thread that reads the front -----------------------------------------------------
    def _run(self) -> None:
        while True:
            conn = self._conn
            if conn is not None:
                with contextlib.suppress(EOFError, OSError):
                    self._read(conn)
                with self._send_lock:
                    self._conn = None
                conn.close()
                code = self._proc.wait() if self._proc is not None else None
                if self._stopping.is_set():
                    return
                self.stats.last_exit = f"exit code {code}"
                log.error("ingest: the front process ended (%s); starting another", code)
            if self._stopping.wait(RESPAWN_S):
                return
            try:
                self._spawn()
            except OSError as exc:
                log.error("ingest: starting the front process failed: %s", exc)

    def _read(self, conn: Connection) -> None:
        put_many = self.writer.put_many
        while True:
            msg = orjson.loads(conn.recv_bytes())
            kind = msg[0]
            if kind == "batch":
                items = msg[2]
                batch = _Batch(conn, msg[1], len(items))
                self.stats.batches += 1
                self.stats.readings += len(items)
                # waits while the writer is full: the front's sends then wait, its queue
                # fills, its MQTT socket is not read and the broker keeps the messages
                put_many(
                    [
                        Reading(source, key, fragment, _Settle(self, batch, n))
                        for n, (source, key, fragment) in enumerate(items)
                    ]
                )
            elif kind == "status":
                self.last_status = msg[1]
            elif kind == "bye":
                return

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


# -- the front's side -----------------------------------------------------------------------
class PipeSink(Batcher):
    """The front's writer: sends batches of readings to the writing process and settles each
    reading when that process says what became of it."""

    thread_name = "ingest-front-sink"

    def __init__(self, conn: Connection, batch_size: int, max_pending: int) -> None:
        super().__init__(max_pending, _SinkStats())
        self.conn = conn
        self.batch_size = batch_size
        self._send_lock = threading.Lock()
        self._window = threading.Semaphore(IN_FLIGHT)
        self._sent: dict[int, list[Reading]] = {}
        self._sent_n = 0
        self._next = 0
        self.refused: Any = None  # (reading, Refusal): stores the dead letter

    def _limits(self) -> tuple[int, float]:
        # a few milliseconds to fill: each batch is a message the writing process reads
        # and hands over while its writer thread waits for the GIL
        return self.batch_size, 0.005

    @property
    def pending(self) -> int:
        return super().pending + self._sent_n

    @property
    def sent(self) -> int:
        """Readings sent to the writing process and not yet settled."""
        return self._sent_n

    def _handle(self, batch: list[Reading]) -> None:
        while not self._window.acquire(timeout=0.5):
            if self._stop.is_set():
                return
        self._next += 1
        bid = self._next
        self._sent[bid] = batch
        self._sent_n += len(batch)
        self.send(["batch", bid, [[r.source, r.key, r.fragment] for r in batch]])

    def send(self, message: Any) -> None:
        data = orjson.dumps(message)
        with self._send_lock:
            self.conn.send_bytes(data)

    def settle(self, bid: int, outcomes: list[list[str] | None]) -> None:
        batch = self._sent.pop(bid, None)
        if batch is None:
            return
        for r, out in zip(batch, outcomes, strict=True):
            msg = None
            if out is not None:
                msg = Refusal(*out)
                if self.refused is not None:
                    self.refused(r, msg)
            if r.done is not None:
                try:
                    r.done(msg)
                except Exception:
                    log.exception("ingest: acknowledging a reading of %s failed", r.source)
        self._sent_n -= len(batch)
        self._window.release()
        with self._idle:
            self._idle.notify_all()


@dataclass
class _SinkStats:
    received: int = 0
    waits: int = 0


def _front_main(fd: int) -> None:  # pragma: no cover - runs in the child (tests drive it)
    # Ctrl-C in a terminal reaches the whole process group: the writing process stops the
    # front itself (a "stop" message, or its socket closing), after what the front sent
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conn = Connection(fd)
    try:
        config = orjson.loads(conn.recv_bytes())
    except EOFError:
        os._exit(0)
    from cityward.bank.jsonld import ContextResolver
    from cityward.bank.model import EntityParser
    from cityward.ingest.adapters import Adapter, Intake, load_builtin
    from cityward.ingest.deadletter import DeadLetters
    from cityward.ingest.mapping import Mapping

    dead = DeadLetters(Path(config["dead_letters"]), max_payload=config["max_payload"])
    sink = PipeSink(conn, config["batch_size"], config["max_pending"])
    parser = EntityParser(ContextResolver(allow_fetch=False).core)
    registry = load_builtin()
    intakes: dict[str, Intake] = {}
    adapters: dict[str, Adapter] = {}
    for raw in config["sources"]:
        source = SourceSettings.model_validate(raw)
        intake = Intake(source.name, Mapping(source.mapping), sink, dead, parser)
        intakes[source.name] = intake
        adapters[source.name] = registry[source.adapter](source.adapter_config(), intake)

    def refused(r: Reading, refusal: Refusal) -> None:
        intakes[r.source].dead(r.raw, r.topic, refusal.field, refusal_reason(refusal.why))

    sink.refused = refused

    def status() -> dict[str, Any]:
        return {
            "pending": sink.pending - sink.sent,  # those sent are the writer's to count
            "sources": {name: a.report() for name, a in adapters.items()},
        }

    send = sink.send

    done = threading.Event()

    def report() -> None:
        while not done.wait(STATUS_EVERY_S):
            try:
                send(["status", status()])
            except OSError:
                os._exit(0)

    from cityward.ingest.worker import calm_gc

    calm_gc()
    sink.start()
    for name, adapter in adapters.items():
        adapter.start()
        log.info("ingest source %s (%s) started in the front process", name, adapter.name)
    threading.Thread(target=report, name="ingest-front-status", daemon=True).start()

    drain_s = 10.0
    stopping = threading.Event()

    def settle_loop() -> None:
        nonlocal drain_s
        while True:
            try:
                msg = orjson.loads(conn.recv_bytes())
            except (EOFError, OSError):
                # the writing process is gone: acknowledge nothing more, leave it to the broker
                os._exit(0)
            if msg[0] == "done":
                sink.settle(msg[1], msg[2])
            elif msg[0] == "stop":
                drain_s = float(msg[1])
                stopping.set()

    threading.Thread(target=settle_loop, name="ingest-front-settle", daemon=True).start()
    stopping.wait()
    for adapter in adapters.values():
        try:
            adapter.stop()
        except Exception:
            log.exception("ingest: stopping adapter %s failed", adapter.intake.name)
    sink.stop(drain_s)
    done.set()
    try:
        send(["status", status()])
        send(["bye"])
    except OSError:
        pass
    dead.close()
    time.sleep(0.05)
    os._exit(0)


if __name__ == "__main__":  # pragma: no cover
    _front_main(int(sys.argv[1]))
