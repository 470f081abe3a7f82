"""The audit record and the interface every audited component writes through."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Action(StrEnum):
    READ = "read"  # a read of data marked personal or indirect
    WRITE = "write"  # any change of city data
    EXPORT = "export"  # history retrieval, bulk query
    CONFIG = "config"  # configuration, tokens, device keys, subscriptions, contexts
    DENIED = "denied"  # any refused request (401 / 403)
    RETENTION = "retention"  # a retention run and what it deleted
    SYSTEM = "system"  # start, stop, seal


@dataclass(slots=True)
class AuditRecord:
    """Who did what, when, for which purpose, with which result.

    ``ts`` is set by the log when empty (UTC, ISO 8601 with microseconds).
    """

    action: Action
    actor: str  # token subject, device id, "anonymous" or "cityward"
    role: str = ""
    purposes: tuple[str, ...] = ()
    method: str = ""
    path: str = ""
    entity_ids: tuple[str, ...] = ()
    count: int = 0  # entities read / written / deleted
    result: int = 0  # HTTP status, or 0 for non-HTTP events
    detail: str = ""
    ts: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class AuditSink(Protocol):
    """Where audit records go. ``record_nowait`` never blocks on I/O."""

    def record_nowait(self, rec: AuditRecord) -> None: ...
