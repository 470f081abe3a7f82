"""cityward settings: defaults, then a TOML file, then CITYWARD_* environment variables, then
the command line (each overriding the ones before)."""

from __future__ import annotations

import tomllib
import types
from contextvars import ContextVar
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cityward.anomaly.settings import AnomalySettings
from cityward.bank.store import check_database_url
from cityward.bus.settings import BusSettings
from cityward.governance.sources import DataSource
from cityward.ingest.settings import IngestSettings, SourceSettings
from cityward.vision.settings import VisionSettings

if TYPE_CHECKING:
    from cityward.bank.jsonld import ContextResolver

SETTINGS_ENV = "CITYWARD__SETTINGS_JSON"  # settings handed to `serve --workers` processes

# The TOML file's values while load_settings builds a Settings: the file is a settings source
# of its own (below the environment, see Settings.settings_customise_sources) rather than init
# keyword arguments, which pydantic-settings ranks above every other source.
_FILE_VALUES: ContextVar[dict[str, Any] | None] = ContextVar("cityward_file_values", default=None)


class GovernanceSettings(BaseModel):
    """Identities, audit and retention ([governance] in the TOML file)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[DataSource] | None = Field(
        default=None,
        description="Declared data sources; unset uses the built-in demo catalog.",
    )
    jwt_issuer: str = Field(default="cityward", description="Expected `iss` of bearer tokens.")
    jwt_audience: str | None = Field(default=None, description="Expected `aud`, when set.")
    jwt_public_keys: list[Path] = Field(
        default_factory=list,
        description="PEM public keys (RS256/ES256/EdDSA) that sign accepted tokens.",
    )
    jwks_file: Path | None = Field(default=None, description="An OIDC provider's JWKS file.")
    jwks_url: str | None = Field(
        default=None, description="An OIDC provider's JWKS URL (fetched and cached)."
    )
    role_claim: str = Field(default="role", description="Claim holding the cityward role.")
    purposes_claim: str = Field(default="purposes", description="Claim holding the purposes.")
    local_tokens: bool = Field(
        default=True,
        description="Accept HS256 tokens signed with the local key (cityward token create).",
    )
    token_ttl_days: float = Field(default=30, gt=0, le=3650, description="Default token life.")
    audit_seal_every: int = Field(
        default=1000, ge=1, description="Seal the audit chain after this many records."
    )
    audit_seal_interval_s: float = Field(
        default=60, gt=0, description="... and at least this often while records arrive."
    )
    audit_key_file: Path | None = Field(
        default=None,
        description="HMAC key that seals the audit chain; default DATA_DIR/governance/audit.key."
        " Keep a copy away from the database.",
    )
    audit: bool = Field(
        default=True,
        description="Keep the audit trail. Turning it off is allowed only with no_auth "
        "(development and the benchmark baseline).",
    )
    retention_enabled: bool = Field(default=True, description="Run the retention scheduler.")
    retention_interval_s: float = Field(
        default=3600, gt=0, description="How often the retention scheduler runs."
    )
    retention_batch: int = Field(
        default=5000, ge=1, le=1_000_000, description="History rows deleted per transaction."
    )
    site_name: str = Field(default="cityward", description="The city's name in the register.")
    site_contact: str = Field(
        default="privacy@city.example", description="Data-protection contact in the register."
    )


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
    database_connect_timeout_s: int = Field(
        default=5,
        ge=2,
        le=300,
        description="Seconds a PostgreSQL connection attempt (at start, and the pool's "
        "reconnections) waits for a server that does not answer; libpq's connect_timeout in "
        "database_url, where given, wins. At least 2 (libpq's floor), at most 300.",
    )
    contexts: dict[str, Path] = Field(
        default_factory=dict,
        description="@context URL -> local file, so air-gapped sites never fetch contexts.",
    )
    context_fetch: bool = Field(
        default=True, description="Fetch @contexts that are not preloaded from the network."
    )
    context_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="Time limit for fetching the remote @contexts of one request, all together.",
    )
    context_allow_private: bool = Field(
        default=False,
        description="Also fetch @contexts from loopback, private and link-local addresses "
        "(off: any client could make the server reach internal services).",
    )
    context_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Host names, addresses or networks (CIDR) @contexts may be fetched from "
        "even when they are not public addresses, e.g. an internal context server.",
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        le=512 * 1024 * 1024,
        description="Largest accepted request body.",
    )
    no_auth: bool = Field(
        default=False,
        description="Development only: serve without tokens (loopback addresses only).",
    )
    governance: GovernanceSettings = Field(default_factory=GovernanceSettings)
    anomaly: AnomalySettings = Field(
        default_factory=AnomalySettings,
        description="The anomaly service: watches, detectors, alert hysteresis (docs/anomaly.md).",
    )
    bus: BusSettings = Field(
        default_factory=BusSettings,
        description="How committed changes reach every process: memory (one process) or NATS "
        "JetStream (docs/bus.md).",
    )
    ingest: IngestSettings = Field(
        default_factory=IngestSettings,
        description="Device ingestion: MQTT, HTTP push and file sources (docs/ingest.md).",
    )
    vision: VisionSettings = Field(
        default_factory=VisionSettings,
        description="Camera analytics: the cameras, their rules, how workers share them "
        "(docs/vision.md).",
    )
    dashboard_tiles: str | None = Field(
        default=None,
        description="The dashboard map's raster tile server, an XYZ URL template with {z}, {x} "
        "and {y} (unset: an offline blank map with the city's network drawn from the bank).",
    )
    dashboard_tiles_attribution: str = Field(
        default="", description="The attribution the tile server's licence asks for."
    )
    default_limit: int = Field(default=20, ge=1, le=1000, description="Page size by default.")
    max_limit: int = Field(default=1000, ge=1, le=100_000, description="Largest page size.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # first wins: the command line (init kwargs), the environment, then the TOML file
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            file_secret_settings,
            _TomlFileSource(settings_cls),
        )

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        # otherwise every query without a limit would answer 403 TooManyResults
        if self.default_limit > self.max_limit:
            raise ValueError(
                f"default_limit ({self.default_limit}) must not exceed max_limit ({self.max_limit})"
            )
        return self

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        # refused at load, named as the setting, rather than where each command opens it: an
        # unknown scheme, and a PostgreSQL URL libpq would refuse (?sslmode=bogus, ?foo=1),
        # said with the URL, password hidden (no connection made)
        check_database_url(value)
        return value

    @field_validator("dashboard_tiles")
    @classmethod
    def _tiles(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")) or not all(
            k in value for k in ("{z}", "{x}", "{y}")
        ):
            raise ValueError(
                "dashboard_tiles must be an http(s) URL template with {z}, {x} and {y}, "
                "such as https://tiles.example.org/{z}/{x}/{y}.png"
            )
        return value

    @field_validator("contexts", mode="before")
    @classmethod
    def _contexts(cls, value: Any) -> Any:
        if isinstance(value, str):
            import orjson

            return orjson.loads(value)
        return value

    def context_resolver(self) -> ContextResolver:
        """The @context resolver these settings ask for (the API's and ingest workers')."""
        from cityward.bank.jsonld import ContextResolver

        return ContextResolver(
            preload=self.contexts,
            fetch_timeout=self.context_timeout_s,
            allow_fetch=self.context_fetch,
            allow_private=self.context_allow_private,
            allow_hosts=self.context_allow_hosts,
        )


class _TomlFileSource(PydanticBaseSettingsSource):
    """The values load_settings read from the TOML file (none outside load_settings)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ hands over the whole file

    def __call__(self) -> dict[str, Any]:
        return dict(_FILE_VALUES.get() or {})


def _is_path(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, PurePath)


def _relative_to(base: Path, annotation: Any, value: Any) -> Any:
    """`value` (raw TOML) with each relative path that `annotation` types as a Path joined to
    `base`, in nested models, lists and dicts too. Strings that are not typed Path (a camera's
    url, which may be a stream) are left alone."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _relative_to(base, args[0], value)
    if _is_path(annotation):
        if isinstance(value, str) and not Path(value).is_absolute():
            return str(base / value)
        return value
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _model_relative_to(base, annotation, value) if isinstance(value, dict) else value
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if isinstance(value, str) and any(_is_path(a) for a in members):
            return _relative_to(base, Path, value)
        if isinstance(value, dict):
            # a union of models: the one model whose fields hold every key given (several or
            # none: left to validation)
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            fits = [m for m in models if set(value) <= set(m.model_fields)]
            if len(fits) == 1:
                return _model_relative_to(base, fits[0], value)
        return value
    if origin in (list, tuple, set, frozenset) and args and isinstance(value, list):
        return [_relative_to(base, args[0], v) for v in value]
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        return {k: _relative_to(base, args[1], v) for k, v in value.items()}
    return value


def _model_relative_to(base: Path, model: type[BaseModel], value: dict[str, Any]) -> dict[str, Any]:
    out = dict(value)
    for name, field in model.model_fields.items():
        if name in out:
            out[name] = _relative_to(base, field.annotation, out[name])
    if issubclass(model, SourceSettings):
        # an ingest source's options are typed by its adapter's Config (a replay's path, an
        # MQTT ca_file, ...)
        from cityward.ingest.adapters import load_builtin

        adapter = load_builtin().get(str(out.get("adapter")))
        if adapter is not None and isinstance(out.get("options"), dict):
            out["options"] = _model_relative_to(base, adapter.Config, out["options"])
    return out


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the command line's `overrides` (None: not given), else CITYWARD_*
    environment variables, else an optional TOML file. Relative paths in the file are
    relative to the file; those on the command line or in the environment, to the working
    directory."""
    values: dict[str, Any] = {}
    if config_file is not None:
        with config_file.open("rb") as fh:
            values = _model_relative_to(config_file.parent, Settings, tomllib.load(fh))
    token = _FILE_VALUES.set(values)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _FILE_VALUES.reset(token)
