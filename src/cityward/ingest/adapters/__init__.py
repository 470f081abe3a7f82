"""Device adapters: self-registering plugins that receive device messages for one source.

An adapter only moves bytes: it hands each message to its source's :class:`Intake`, which
decodes it, applies the source's mapping and queues the update on the batching writer, or puts
a malformed message in the dead-letter store. The adapter acknowledges a message to whoever
sent it when the intake says it is settled (in the bank, or a dead letter), never earlier.

``cityward ingest adapters`` lists what is registered here.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict

from cityward.bank.errors import NgsiError
from cityward.bank.model import EntityParser
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.mapping import Mapping, MappingError
from cityward.ingest.writer import Batcher, Done, Reading
from cityward.plugins import register

log = logging.getLogger("cityward.ingest")
REGISTRY: dict[str, type[Adapter]] = {}


class AdapterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class IntakeStats:
    messages: int = 0
    dead_letters: int = 0
    last_message_at: float = 0.0


class Intake:
    """Where one source's adapter hands its messages (thread-safe)."""

    def __init__(
        self,
        name: str,
        mapping: Mapping,
        writer: Batcher,
        dead_letters: DeadLetters,
        parser: EntityParser,
    ) -> None:
        self.name = name
        self.mapping = mapping
        self.writer = writer
        self.dead_letters = dead_letters
        self.parser = parser
        self.stats = IntakeStats()
        self._lock = threading.Lock()
        # The stored form of an update, built here for mappings of plain values: the general
        # request parser took a tenth of an ingest worker's CPU per message (expanding the same
        # type and names again, validating what the mapping has already checked). A mapping
        # with a ``json`` attribute (any JSON value) still goes through the parser.
        attrs = mapping.config.attributes
        self._fast = all(a.kind != "json" for a in attrs.values())
        self._type = parser.types(mapping.config.entity_type)
        self._iris = {name: parser.ctx.expand(name) for name in [*attrs, "location"]}

    def receive(
        self,
        payload: bytes,
        *,
        topic: str = "",
        done: Done | None = None,
        decoded: Any = None,
        timeout: float | None = None,
        check: Callable[[str, list[str]], NgsiError | None] | None = None,
    ) -> str | None:
        """Take one message. A malformed one goes to the dead letters at once (its reason is
        returned, ``done`` is called with it); a good one is queued and ``done`` is called
        once it is written. Waits while the writer is full (``timeout``: then raises
        TimeoutError and the message is not taken). ``check`` may refuse the entity (id,
        expanded types) the message would write: an HTTP push's device key, say."""
        with self._lock:
            self.stats.messages += 1
            self.stats.last_message_at = time.time()
        try:
            doc = orjson.loads(payload) if decoded is None else decoded
            update = self.mapping.apply(doc, topic=topic)  # no time in it: now
            if self._fast:
                iris = self._iris
                fragment: dict[str, Any] = {
                    "id": update.entity_id,
                    "type": list(self._type),
                    "attrs": {iris[name]: [inst] for name, inst in update.attrs.items()},
                }
            else:
                fragment = self.parser.entity(update.fragment(), "create")
            if check is not None and (denied := check(fragment["id"], fragment["type"])):
                raise denied
        except orjson.JSONDecodeError as exc:
            return self._dead(payload, topic, "$", f"not JSON: {exc}", done)
        except MappingError as exc:
            return self._dead(payload, topic, exc.field, exc.reason, done)
        except NgsiError as exc:
            return self._dead(payload, topic, exc.field or "$", str(exc), done)
        except Exception as exc:
            # a bug of ours for this payload: the message is kept as a dead letter, and the
            # adapter goes on (an uncaught error here ended the MQTT reader thread, and the
            # message, never acknowledged, came back to end it again after every restart)
            log.exception("ingest source %s: mapping a message failed", self.name)
            return self._dead(payload, topic, "$", f"internal error: {exc!r}", done)
        reading = Reading(
            self.name, update.message_key, fragment, done, raw=payload, topic=topic, check=check
        )
        if not self.writer.put(reading, timeout=timeout):
            raise TimeoutError("the ingest writer is full")
        return None

    def _dead(self, payload: bytes, topic: str, where: str, why: str, done: Done | None) -> str:
        self.dead(payload, topic, where, why)
        if done is not None:
            done(f"{where}: {why}")
        return f"{where}: {why}"

    def dead(self, payload: bytes, topic: str, where: str, why: str) -> None:
        with self._lock:
            self.stats.dead_letters += 1
        try:
            self.dead_letters.add(self.name, payload, field=where, reason=why, topic=topic)
        except Exception:  # a full disk must not stop the adapter; the count still tells
            log.exception("ingest: storing a dead letter of %s failed", self.name)


class Adapter(abc.ABC):
    """Receives the messages of one source and hands them to its :class:`Intake`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: runs on threads of its own and reports only through its intake: may run in the front
    #: process (cityward.ingest.front) when ``[ingest] front_process`` is on
    separate: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(REGISTRY, cls, "adapter")

    def __init__(self, config: AdapterConfig, intake: Intake) -> None:
        self.config = config
        self.intake = intake

    @abc.abstractmethod
    def start(self) -> None:
        """Start receiving (threads of its own; returns at once)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop receiving; messages not yet settled stay unacknowledged."""

    def status(self) -> dict[str, Any]:
        """What the adapter says about itself (connected, files read...)."""
        return {}

    def report(self) -> dict[str, Any]:
        """Its line in the ingest worker's status: the intake's counts and :meth:`status`."""
        return {
            "adapter": self.name,
            "messages": self.intake.stats.messages,
            "dead_letters": self.intake.stats.dead_letters,
            **self.status(),
        }


def load_builtin() -> dict[str, type[Adapter]]:
    """The registry with the built-in adapters imported."""
    from cityward.ingest.adapters import http, mqtt, replay  # noqa: F401

    return REGISTRY
