"""The ingest worker: the configured sources, their adapters, one batching writer, dead letters.

Runs inside ``cityward serve`` (``[ingest] enabled = true``; the API's bank, so the change feed,
history and subscriptions see every reading at once) or alone with ``cityward ingest run``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.ingest.adapters import Adapter, Intake, load_builtin
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.mapping import Mapping
from cityward.ingest.settings import IngestSettings
from cityward.ingest.writer import BatchWriter, Reading

log = logging.getLogger("cityward.ingest")


class IngestWorker:
    """Every enabled source of ``settings`` writing into ``bank``."""

    def __init__(
        self,
        bank: Bank,
        settings: IngestSettings,
        dead_letters: DeadLetters,
        *,
        context: Context | None = None,
        write_context: Any = None,
    ) -> None:
        self.bank = bank
        self.settings = settings
        self.dead_letters = dead_letters
        ctx = context or ContextResolver(allow_fetch=False).core
        self.parser = EntityParser(ctx)
        self.writer = BatchWriter(
            bank,
            settings.writer,
            tenant=settings.tenant,
            refused=self._refused,
            context=write_context,
        )
        registry = load_builtin()
        self.intakes: dict[str, Intake] = {}
        self.adapters: dict[str, Adapter] = {}
        for source in settings.sources:
            if not source.enabled:
                continue
            intake = Intake(
                source.name, Mapping(source.mapping), self.writer, dead_letters, self.parser
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

    def _refused(self, reading: Reading, where: str, why: str) -> None:
        intake = self.intakes.get(reading.source)
        if intake is not None:
            intake.dead(reading.raw, reading.topic, where, f"the bank refused it: {why}")

    def start(self) -> None:
        self.started_at = time.monotonic()
        self.writer.start()
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
        self.writer.stop(drain_s)

    def status(self) -> dict[str, Any]:
        up = time.monotonic() - self.started_at if self.started_at else 0.0
        w = self.writer.stats
        return {
            "uptime_s": round(up, 1),
            "pending": self.writer.pending,
            "writer": w.as_dict(),
            "rate_per_s": round(w.written / up, 1) if up > 0 else 0.0,
            "sources": {
                name: {
                    "adapter": a.name,
                    "messages": a.intake.stats.messages,
                    "dead_letters": a.intake.stats.dead_letters,
                    **a.status(),
                }
                for name, a in self.adapters.items()
            },
        }
