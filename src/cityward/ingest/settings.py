"""The ``[ingest]`` settings: the sources (adapter, options, payload mapping) and the writer."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cityward.ingest.mapping import MappingConfig

_SOURCE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


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
        default=24 * 3600,
        gt=0,
        description="How long the key of an applied delivery is kept to recognise a repeat "
        "of it (QoS 1 redelivery, a device's retry). Keys take about 60 bytes each: rate x "
        "window of them.",
    )
    retry_max_s: float = Field(
        default=30, gt=0, le=3600, description="Longest pause between retries of a failed write."
    )


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
