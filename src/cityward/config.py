"""cityward settings: defaults, then a TOML file, then CITYWARD_* environment variables."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SETTINGS_ENV = "CITYWARD__SETTINGS_JSON"  # settings handed to `serve --workers` processes


class Settings(BaseSettings):
    """Everything an operator can configure; every field has a safe default."""

    model_config = SettingsConfigDict(env_prefix="CITYWARD_", extra="forbid")

    data_dir: Path = Field(
        default=Path("cityward-data"),
        description="Folder for the embedded SQLite database and other local state.",
    )
    database_url: str | None = Field(
        default=None,
        description="postgresql://user@host:port/db to use PostgreSQL; unset for SQLite.",
    )
    contexts: dict[str, Path] = Field(
        default_factory=dict,
        description="@context URL -> local file, so air-gapped sites never fetch contexts.",
    )
    context_fetch: bool = Field(
        default=True, description="Fetch @contexts that are not preloaded from the network."
    )
    context_timeout_s: float = Field(
        default=3.0, gt=0, le=60, description="Timeout for fetching a remote @context."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        le=512 * 1024 * 1024,
        description="Largest accepted request body.",
    )
    default_limit: int = Field(default=20, ge=1, le=1000, description="Page size by default.")
    max_limit: int = Field(default=1000, ge=1, le=100_000, description="Largest page size.")

    @field_validator("contexts", mode="before")
    @classmethod
    def _contexts(cls, value: Any) -> Any:
        if isinstance(value, str):
            import orjson

            return orjson.loads(value)
        return value


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from an optional TOML file, the environment and explicit overrides."""
    values: dict[str, Any] = {}
    if config_file is not None:
        with config_file.open("rb") as fh:
            values.update(tomllib.load(fh))
        base = config_file.parent
        ctx = values.get("contexts")
        if isinstance(ctx, dict):
            values["contexts"] = {k: base / v for k, v in ctx.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)
