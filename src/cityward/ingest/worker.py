"""The ingest worker: the configured sources, their adapters, one batching writer, dead letters.

Runs inside ``cityward serve`` (``[ingest] enabled = true``; the API's bank, so the change feed,
history and subscriptions see every reading at once) or alone with ``cityward ingest run``.

With ``[bus] kind = "nats"`` a worker has a role (cityward.ingest.jetstream, docs/bus.md):
``front`` runs the adapters and publishes their readings to the ingest stream (no bank
needed), ``writer`` writes the stream's readings into the bank, ``all`` does both.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Literal

from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bus.nats import JetStream
from cityward.bus.settings import BusSettings
from cityward.ingest.adapters import Adapter, Intake, load_builtin
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.front import FrontProcess
from cityward.ingest.jetstream import JetStreamSink, JetStreamWriter, ensure_stream
from cityward.ingest.mapping import Mapping
from cityward.ingest.settings import IngestSettings
from cityward.ingest.writer import Batcher, BatchWriter, Reading, refusal_reason

log = logging.getLogger("cityward.ingest")


def calm_gc() -> None:
    """Make Python's cycle collector run far less often in a process that ingests.

    Every reading allocates some fifty containers (its fragment, the merged document, rows),
    and a few thousand readings sit in the writer's queue at any time: with the default
    thresholds (700, 10, 10) the collector went through every one of them more than ten
    times a second, and the ingest worker spent about a fifth of its CPU there (measured:
    16,200 readings/s with the defaults, 17,800 at p99 0.2 s without that). Readings are
    not cyclic, so reference counting frees them; the collector still runs, a hundred times
    less often, and what was loaded at start (modules, settings) is frozen out of it.
    """
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)


Role = Literal["front", "writer", "all"]
ROLES: tuple[Role, ...] = ("front", "writer", "all")


class IngestWorker:
    """Every enabled source of ``settings`` writing into ``bank``.

    ``bus`` with ``kind = "nats"``: the readings travel over JetStream, and ``role`` says which
    half runs here: ``front`` (adapters publishing; ``bank`` may be None), ``writer`` (the
    stream into ``bank``; no adapters) or ``all``. Without it (or in memory mode, where only
    ``all`` exists) the adapters hand their readings straight to the batching writer.
    """

    def __init__(
        self,
        bank: Bank | None,
        settings: IngestSettings,
        dead_letters: DeadLetters,
        *,
        context: Context | None = None,
        write_context: Any = None,
        bus: BusSettings | None = None,
        role: Role = "all",
        name: str = "cityward-ingest",
        front_process: bool = False,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown ingest role {role!r}: front, writer or all")
        nats = bus is not None and bus.kind == "nats"
        if role != "all" and not nats:
            raise ValueError(
                f'the ingest role {role!r} needs [bus] kind = "nats" (in memory mode one '
                "process receives and writes: role all)"
            )
        self._bank = bank
        self.settings = settings
        self.dead_letters = dead_letters
        self.role: Role = role
        ctx = context or ContextResolver(allow_fetch=False).core
        self.parser = EntityParser(ctx)
        self._writer: BatchWriter | None = None
        if role != "front":
            if bank is None:
                raise ValueError(f"the ingest role {role!r} writes into a bank: none was given")
            self._writer = BatchWriter(
                bank,
                settings.writer,
                tenant=settings.tenant,
                refused=self._refused,
                context=write_context,
                entity_locks=nats,  # several writers on one database take turns per entity
            )
        self.js: JetStream | None = None
        self.front: JetStreamSink | None = None
        self.puller: JetStreamWriter | None = None
        if nats:
            assert bus is not None
            self.js = JetStream(bus.nats_url, name=name, connect_timeout_s=bus.connect_timeout_s)
            if role != "writer":
                self.front = JetStreamSink(
                    self.js,
                    settings.jetstream,
                    max_pending=settings.writer.max_pending,
                    max_raw=settings.deadletter_max_payload,
                )
            if self._writer is not None:
                self.puller = JetStreamWriter(self.js, settings.jetstream, self._writer)
        # where the intakes put their readings (a writer runs no adapters)
        self.sink: Batcher | None = None if role == "writer" else (self.front or self._writer)
        registry = load_builtin()
        self.intakes: dict[str, Intake] = {}
        self.adapters: dict[str, Adapter] = {}
        # front_process: the adapters that can run in a process of their own do (the
        # cityward.ingest.front module text says why); in memory mode only
        self.front_process: FrontProcess | None = None
        apart = [
            s
            for s in settings.sources
            if s.enabled and registry[s.adapter].separate and front_process and not nats
        ]
        if apart and self._writer is not None:
            self.front_process = FrontProcess(
                apart,
                self._writer,
                dead_letters=dead_letters.path,
                max_payload=dead_letters.max_payload,
                batch_size=settings.writer.batch_size,
                max_pending=settings.writer.max_pending,
            )
        for source in settings.sources:
            if not source.enabled or self.sink is None or source in apart:
                continue
            intake = Intake(
                source.name, Mapping(source.mapping), self.sink, dead_letters, self.parser
            )
            self.intakes[source.name] = intake
            self.adapters[source.name] = registry[source.adapter](source.adapter_config(), intake)
            if source.mapping.message_id is None and source.mapping.timestamp is None:
                log.warning(
                    "ingest source %s: its mapping has neither message_id nor timestamp, so a "
                    "redelivered message cannot be told from a new one (add either for "
                    "exactly-once)",
                    source.name,
                )
        self.started_at = 0.0

    @property
    def bank(self) -> Bank:
        """The bank the readings are written into (a front has none)."""
        if self._bank is None:
            raise AttributeError("an ingest front has no bank")
        return self._bank

    @property
    def writer(self) -> BatchWriter:
        """The batching writer into the bank (a front has none)."""
        if self._writer is None:
            raise AttributeError("an ingest front has no bank writer")
        return self._writer

    @property
    def writer_still_writing(self) -> bool:
        """After stop(): whether the writer's thread is still inside a write (its drain ran out
        on a locked or unreachable bank), so the bank and dead letters must stay open."""
        return self._writer is not None and self._writer.still_writing

    def _refused(self, reading: Reading, where: str, why: str) -> None:
        if self.front_process is not None and reading.source in self.front_process.names:
            return  # its front process stores it: the outcome goes there, with the raw message
        intake = self.intakes.get(reading.source)
        if intake is not None:
            intake.dead(reading.raw, reading.topic, where, refusal_reason(why))
            return
        try:  # a writer: the reading came over the stream, its source's adapter runs elsewhere
            self.dead_letters.add(
                reading.source,
                reading.raw,
                field=where,
                reason=refusal_reason(why),
                topic=reading.topic,
            )
        except Exception:
            log.exception("ingest: storing a dead letter of %s failed", reading.source)

    def start(self) -> None:
        self.started_at = time.monotonic()
        if self.js is not None:
            self.js.connect()
            ensure_stream(self.js, self.settings.jetstream)
        # the writer half first, then the sink, then the adapters that feed it
        if self.puller is not None:
            self.puller.start()
        elif self._writer is not None:
            self._writer.start()
        if self.front is not None:
            self.front.start()
        if self.front_process is not None:
            self.front_process.start()
        for name, adapter in self.adapters.items():
            adapter.start()
            log.info("ingest source %s (%s) started", name, adapter.name)

    def stop(self, drain_s: float = 10.0) -> None:
        """Stop receiving, write what was received (up to ``drain_s``), stop the writer."""
        for adapter in self.adapters.values():
            try:
                adapter.stop()
            except Exception:
                log.exception("ingest: stopping adapter %s failed", adapter.intake.name)
        if self.front_process is not None:
            self.front_process.stop(drain_s)
        if self.front is not None:
            self.front.stop(drain_s)
        if self.puller is not None:
            self.puller.stop(drain_s)
        elif self._writer is not None:
            self._writer.stop(drain_s)
        if self.js is not None:
            self.js.close()

    def _front_pending(self) -> int:
        """Readings the front process holds and has not handed over yet (as it last said)."""
        if self.front_process is None:
            return 0
        return int(self.front_process.last_status.get("pending", 0))

    def status(self) -> dict[str, Any]:
        up = time.monotonic() - self.started_at if self.started_at else 0.0
        w = self._writer.stats.as_dict() if self._writer is not None else {}
        written = int(w.get("written", 0))
        out: dict[str, Any] = {
            "uptime_s": round(up, 1),
            # readings taken and not yet settled: queued to publish, or pulled and unacknowledged
            "pending": (self.front.pending if self.front is not None else 0)
            + (self.puller.held if self.puller is not None else 0)
            if self.js is not None
            else self.writer.pending + self._front_pending(),
            "writer": w,
            "rate_per_s": round(written / up, 1) if up > 0 else 0.0,
            "sources": {name: a.report() for name, a in self.adapters.items()},
        }
        if self.front_process is not None:
            fp = self.front_process
            out["sources"].update(fp.last_status.get("sources", {}))
            out["front_process"] = {"alive": fp.alive, **fp.stats.__dict__}
        if self.js is not None:
            out["role"] = self.role
        if self.front is not None:
            out["published"] = self.front.stats.as_dict()
        if self.puller is not None:
            out["pulled"] = self.puller.stats.as_dict()
        return out
