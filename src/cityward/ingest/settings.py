"""The ``[ingest]`` settings: the sources (adapter, options, payload mapping) and the writer."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cityward.ingest.mapping import MappingConfig

_SOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class WriterSettings(BaseModel):
    """How readings are written into the bank: in batches, with bounded memory."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(
        default=2000, ge=1, le=100_000, description="Most readings in one bank transaction."
    )
    max_delay_ms: float = Field(
        default=50,
        ge=0,
        le=60_000,
        description="Longest a reading waits for its batch to fill before it is written.",
    )
    max_pending: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="Readings received but not yet written; beyond it the adapters wait "
        "(backpressure: MQTT leaves messages at the broker, HTTP pushes wait).",
    )
    dedupe_window_s: float = Field(
        default=3600,
        gt=0,
        description="How long the key of an applied delivery is kept to recognise a repeat "
        "of it (QoS 1 redelivery after a restart, a device's retry). Counted back from the "
        "newest key, not from the clock: a worker that was stopped for longer still knows the "
        "keys of its last writes. Keys take 65-190 bytes each on SQLite (a message id, or an "
        "entity and a time): rate x window of them (an hour at 10,000 readings/s: 36 million "
        "keys, 2.3-6.8 GB).",
    )
    retry_max_s: float = Field(
        default=30, gt=0, le=3600, description="Longest pause between retries of a failed write."
    )


class IngestStreamSettings(BaseModel):
    """``[ingest.jetstream]``: the readings' stream when ``[bus] kind = "nats"`` splits ingest
    into fronts (adapters publishing readings) and writers (docs/bus.md)."""

    model_config = ConfigDict(extra="forbid")

    stream: str = Field(default="CITYWARD_INGEST", description="The JetStream stream of readings.")
    subject: str = Field(
        default="cityward.ingest",
        description="Subject prefix; a reading goes to <prefix>.<source>.",
    )
    durable: str = Field(
        default="ingest-writers",
        description="The durable pull consumer every writer shares (each reading to one writer).",
    )
    max_age_s: float = Field(
        default=7 * 86400,
        gt=0,
        description="How long the stream keeps a reading no writer took (how long the writers "
        "may all be away). A reading leaves the stream once a writer has written it (a work "
        "queue).",
    )
    max_bytes: int | None = Field(
        default=None,
        ge=1 << 20,
        description="Most bytes the stream's unwritten readings may take on the NATS server's "
        "disk (at least 1 MiB: a stream message holds up to 512 KiB). When it is full the "
        "stream refuses new readings: the fronts wait and retry, their adapters wait (MQTT "
        "leaves the messages at the broker), and nothing is dropped. None: the server's own "
        "limits (and max_age_s).",
    )
    duplicate_window_s: float = Field(
        default=120.0,
        gt=0,
        le=86400,
        description="The stream drops a reading published again within this window (a front "
        "that retried a publish, an MQTT redelivery); the bank's delivery keys catch the rest.",
    )
    ack_wait_s: float = Field(
        default=60.0,
        ge=1,
        le=3600,
        description="A writer's unacknowledged readings go to another writer after this long "
        "(a killed writer's batch); a live writer keeps extending it for readings it holds.",
    )
    max_ack_pending: int = Field(
        default=50_000,
        ge=1,
        le=10_000_000,
        description="Stream messages handed to writers and not yet acknowledged, all writers "
        "together (a message holds up to message_readings readings).",
    )
    publish_batch: int = Field(
        default=500, ge=1, le=10_000, description="Readings a front publishes per round trip."
    )
    message_readings: int = Field(
        default=250,
        ge=1,
        le=10_000,
        description="Readings of one source a front puts in one stream message (and at most "
        "512 KiB): the stream's and the NATS client's cost is per message.",
    )
    pull_batch: int = Field(
        default=1000,
        ge=1,
        le=10_000,
        description="Readings a writer asks for per pull (in as many messages as that makes).",
    )

    @field_validator("stream", "durable")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("must be letters, digits, '_' or '-'")
        return value

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: str) -> str:
        if not _SUBJECT.fullmatch(value):
            raise ValueError("must be dot-separated tokens of letters, digits, '_' or '-'")
        return value


class SourceSettings(BaseModel):
    """One source of device messages: an adapter with its options and a payload mapping."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short name: lowercase letters, digits, - and _.")
    adapter: str = Field(description="mqtt, http or replay (`cityward ingest adapters`).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="The adapter's own settings (see its table)."
    )
    mapping: MappingConfig
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _SOURCE_NAME.fullmatch(value):
            raise ValueError(
                f"source name {value!r}: lowercase letters, digits, - and _, up to 63 characters"
            )
        return value

    @model_validator(mode="after")
    def _options(self) -> SourceSettings:
        from cityward.ingest.adapters import load_builtin

        registry = load_builtin()
        if self.adapter not in registry:
            raise ValueError(
                f"unknown adapter {self.adapter!r}; known: {', '.join(sorted(registry))}"
            )
        # checked here, so that a bad option stops the start with its name
        registry[self.adapter].Config.model_validate(self.options)
        return self

    def adapter_config(self) -> Any:
        from cityward.ingest.adapters import load_builtin

        return load_builtin()[self.adapter].Config.model_validate(self.options)


class IngestSettings(BaseModel):
    """Device ingestion ([ingest] in the TOML file; docs/ingest.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False,
        description="Run the sources inside `cityward serve` (`cityward ingest run` runs them "
        "in a process of their own either way).",
    )
    tenant: str = Field(default="", description="The NGSI-LD tenant readings are written to.")
    sources: list[SourceSettings] = Field(default_factory=list)
    writer: WriterSettings = Field(default_factory=WriterSettings)
    jetstream: IngestStreamSettings = Field(
        default_factory=IngestStreamSettings,
        description='Only with [bus] kind = "nats": the stream between fronts and writers.',
    )
    front_process: bool = Field(
        default=True,
        description="Receive MQTT in a process of its own that hands the readings to the "
        "writing process (two cores: about twice the rate of one process); off: one process. "
        'Not with [bus] kind = "nats", where fronts and writers are processes anyway.',
    )
    deadletter_max_payload: int = Field(
        default=64 * 1024, ge=256, le=16 * 1024 * 1024, description="Bytes of a message kept."
    )

    @model_validator(mode="after")
    def _unique(self) -> IngestSettings:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self

    def source(self, name: str) -> SourceSettings | None:
        return next((s for s in self.sources if s.name == name), None)
