"""Settings of the message bus (``[bus]`` in the TOML file; docs/bus.md)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class BusSettings(BaseModel):
    """How committed changes travel between cityward processes."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["memory", "nats"] = Field(
        default="memory",
        description="memory: changes stay in the process that wrote them (one process, the "
        "default); nats: every process sees every committed change, over NATS JetStream.",
    )
    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        description="NATS server(s), comma-separated (nats://user:password@host:4222).",
    )
    connect_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="Give up starting when NATS is unreachable this long.",
    )
    changes_stream: str = Field(
        default="CITYWARD_CHANGES", description="The JetStream stream of committed changes."
    )
    changes_subject: str = Field(
        default="cityward.changes",
        description="Subject prefix; each change goes to <prefix>.<tenant or 'default'>.",
    )
    changes_max_age_s: float = Field(
        default=7 * 86400,
        gt=0,
        description="How long the stream keeps changes (how long a durable follower may be away).",
    )
    changes_max_bytes: int | None = Field(
        default=None,
        ge=1 << 20,
        description="Most bytes the change stream keeps on the NATS server's disk; past it the "
        "oldest changes go first, as with changes_max_age_s (a durable follower away longer "
        "misses them). None: the server's own limits. Every process reads this stream, so "
        "changes stay in it until one of the limits, read or not.",
    )
    duplicate_window_s: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="JetStream drops a change published again within this window (a relay that "
        "died between publishing and deleting its outbox rows).",
    )
    relay_batch: int = Field(
        default=500, ge=1, le=10_000, description="Outbox rows published per round."
    )
    relay_poll_s: float = Field(
        default=0.2,
        gt=0,
        le=60,
        description="How often the relay looks for outbox rows that other processes wrote.",
    )
    ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A durable follower's unacknowledged changes go to another follower after "
        "this long (a killed follower's last batch).",
    )
    anomaly_durable: str = Field(
        default="anomaly",
        description="The durable consumer the anomaly service follows (its position survives "
        "restarts and moves to the next node that runs the service).",
    )

    @field_validator("changes_stream", "anomaly_durable")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be letters, digits, '_' or '-'")
        return value

    @field_validator("nats_url")
    @classmethod
    def _servers(cls, value: str) -> str:
        """Each server read as nats-py reads it (its own parser, so that what passes here
        connects there): a URL it cannot read failed only when a process first connected,
        after the rest of the configuration had been taken."""
        from nats.aio.client import Client
        from nats.errors import Error as NatsError

        servers = [s.strip() for s in value.split(",") if s.strip()]
        if not servers:
            raise ValueError("names no server (nats://host:4222)")
        schemes = set()
        for server in servers:
            scheme = server.partition("://")[0] if "://" in server else "nats"
            if scheme not in ("nats", "tls", "ws", "wss"):
                raise ValueError(f"{server!r}: the scheme must be nats, tls, ws or wss")
            try:
                schemes.add(Client._parse_server_uri(server).scheme)
            except (NatsError, ValueError) as exc:
                raise ValueError(f"{server!r} is not a NATS server URL: {exc}") from None
        if schemes - {"nats", "tls"} and schemes - {"ws", "wss"}:
            raise ValueError("mixes websocket (ws, wss) and plain (nats, tls) servers")
        return value

    @field_validator("changes_subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        if not _SUBJECT.fullmatch(value):
            raise ValueError("must be dot-separated tokens of letters, digits, '_' or '-'")
        return value
