"""Declarative mapping of a device's own payload to an NGSI-LD entity update.

A city's devices speak their own JSON: ``{"dev": "aq-17", "ts": 1795400000, "r": {"no2": 41}}``.
A :class:`Mapping` (from the ingest config, validated on load) says where the entity id, the
time, the message id and each attribute are in it, and :meth:`Mapping.apply` turns one payload
into one :class:`Update`, or raises :class:`MappingError` naming the field and the reason (the
message then goes to the dead-letter store; the adapter goes on).

Paths are a small subset of JSONPath: ``$``, ``.name``, ``["name with dots"]`` and ``[index]``
(negative counts from the end). They are compiled once into a tuple of keys: a general
JSONPath library parses and walks far slower, and devices never need filters or wildcards.

Id templates take ``{path}`` placeholders, e.g. ``urn:ngsi-ld:AirQualityObserved:{$.dev}``,
and ``{topic[N]}`` for the N-th level of an MQTT topic (or the HTTP push's source path).
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cityward.bank.model import MAX_ID_BYTES, RESERVED_NAMES, SYSTEM_MEMBERS

Key = str | int
#: the longest delivery key (``m:`` and the message id) in bytes; see Mapping.apply
MAX_KEY_BYTES = 512
_MISSING = object()
_STEP = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_\-]*)|\[(-?\d+)\]|\["((?:[^"\\]|\\.)*)"\]""")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")
_TOPIC = re.compile(r"topic\[(-?\d+)\]")
_ATTR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# the bank's own reserved terms (observedAt, value, scope, createdAt ...): the bank refuses
# them as attribute names, but the mapping took them and the writer's fast path stored
# readings under them (or every message was refused at run time)
_RESERVED = RESERVED_NAMES | SYSTEM_MEMBERS


class MappingError(ValueError):
    """A payload that the mapping cannot turn into an update; ``field`` names where."""

    def __init__(self, reason: str, field: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.reason = reason
        self.field = field


def compile_path(path: str) -> tuple[Key, ...]:
    """``$.a.b[0]["c.d"]`` -> ``("a", "b", 0, "c.d")``; ValueError with the position otherwise."""
    if not path.startswith("$"):
        raise ValueError(f"a path starts with '$', as in $.device.id (got {path!r})")
    keys: list[Key] = []
    pos = 1
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            raise ValueError(
                f"path {path!r}: cannot read from position {pos} ({path[pos:]!r}); use .name, "
                '["name"] or [index]'
            )
        name, index, quoted = m.groups()
        if name is not None:
            keys.append(name)
        elif index is not None:
            keys.append(int(index))
        else:
            keys.append(re.sub(r"\\(.)", r"\1", quoted))
        pos = m.end()
    return tuple(keys)


def resolve(doc: Any, keys: tuple[Key, ...]) -> Any:
    """The value at ``keys`` in ``doc``, or ``_MISSING``."""
    for k in keys:
        if isinstance(k, int):
            if not isinstance(doc, list) or not -len(doc) <= k < len(doc):
                return _MISSING
            doc = doc[k]
        else:
            if not isinstance(doc, dict) or k not in doc:
                return _MISSING
            doc = doc[k]
    return doc


def _valid_path(value: str) -> str:
    compile_path(value)
    return value


# a setting holding a path: checked when the config loads
JsonPath = Annotated[str, AfterValidator(_valid_path)]


class AttributeMap(BaseModel):
    """One attribute of the entity, read from the payload."""

    model_config = ConfigDict(extra="forbid")

    path: JsonPath = Field(description="Where the value is, e.g. $.readings.no2.")
    kind: Literal["number", "integer", "string", "boolean", "json"] = Field(
        default="number", description="What the value must be; numbers in strings are accepted."
    )
    unit: str | None = Field(default=None, description="UN/CEFACT unit code, e.g. GQ for µg/m³.")
    scale: float = Field(default=1.0, description="Multiply a number by this (unit conversion).")
    offset: float = Field(default=0.0, description="Then add this.")
    required: bool = Field(default=False, description="A payload without it is rejected.")

    @model_validator(mode="after")
    def _numeric_only(self) -> AttributeMap:
        if self.kind not in ("number", "integer") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"scale and offset apply to numbers, not to kind {self.kind!r}")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise ValueError("scale and offset must be finite numbers")
        return self


class TimestampMap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: JsonPath = Field(description="Where the observation time is.")
    format: Literal["iso8601", "epoch_s", "epoch_ms"] = "iso8601"


class LocationMap(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lon: JsonPath = Field(description="Path of the longitude (WGS84 degrees).")
    lat: JsonPath = Field(description="Path of the latitude.")


class MappingConfig(BaseModel):
    """How one source's payloads become entity updates (see docs/ingest.md)."""

    model_config = ConfigDict(extra="forbid")

    entity_type: str = Field(description="The NGSI-LD type, e.g. AirQualityObserved.")
    id: str = Field(
        description="Entity id template: urn:ngsi-ld:AirQualityObserved:{$.dev} or {topic[1]}."
    )
    timestamp: TimestampMap | None = Field(
        default=None, description="The observation time (unset: the time of receipt)."
    )
    message_id: JsonPath | None = Field(
        default=None,
        description="Path of the device's message id; with the source it makes a delivery "
        "idempotent (unset: the source, entity and observation time do).",
    )
    attributes: dict[str, AttributeMap] = Field(description="Attribute name -> where its value is.")
    location: LocationMap | None = None

    @field_validator("entity_type")
    @classmethod
    def _type(cls, value: str) -> str:
        if not _ATTR_NAME.fullmatch(value):
            raise ValueError(f"entity_type {value!r}: letters, digits and _ (a short type name)")
        return value

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not value.startswith("urn:"):
            raise ValueError(f"the id template must make a URN (urn:ngsi-ld:...), not {value!r}")
        holes = _PLACEHOLDER.findall(value)
        if not holes:
            raise ValueError(
                "the id template needs at least one {placeholder} ({$.path} or {topic[N]}), or "
                "every device would write the same entity"
            )
        for hole in holes:
            if not _TOPIC.fullmatch(hole):
                compile_path(hole)
        return value

    @field_validator("attributes")
    @classmethod
    def _attrs(cls, value: dict[str, AttributeMap]) -> dict[str, AttributeMap]:
        if not value:
            raise ValueError("map at least one attribute")
        for name in value:
            if name == "location":
                raise ValueError(
                    "attribute name 'location' is reserved: map a position with the mapping's "
                    "location = { lon = ..., lat = ... }"
                )
            if name in _RESERVED:
                raise ValueError(
                    f"attribute name {name!r} is reserved in NGSI-LD; not one of "
                    f"{', '.join(sorted(_RESERVED, key=str.lower))}"
                )
            if not _ATTR_NAME.fullmatch(name):
                raise ValueError(f"attribute name {name!r}: letters, digits and _")
        return value


@dataclass(frozen=True, slots=True)
class Update:
    """One entity update made from one message."""

    entity_id: str
    entity_type: str
    observed_at: str  # ISO 8601, UTC, milliseconds
    attrs: dict[str, Any]  # NGSI-LD attribute fragments
    message_key: str  # idempotency key within the source

    def fragment(self) -> dict[str, Any]:
        return {"id": self.entity_id, "type": self.entity_type, **self.attrs}


class Mapping:
    """A compiled :class:`MappingConfig`."""

    def __init__(self, config: MappingConfig) -> None:
        self.config = config
        self._id_parts: list[str | tuple[Key, ...] | int] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(config.id):
            self._id_parts.append(config.id[pos : m.start()])
            hole = m.group(1)
            t = _TOPIC.fullmatch(hole)
            self._id_parts.append(int(t.group(1)) if t else compile_path(hole))
            pos = m.end()
        self._id_parts.append(config.id[pos:])
        self._attrs = [(n, compile_path(a.path), a) for n, a in config.attributes.items()]
        self._ts = compile_path(config.timestamp.path) if config.timestamp else None
        self._msg = compile_path(config.message_id) if config.message_id else None
        self._loc = (
            (compile_path(config.location.lon), compile_path(config.location.lat))
            if config.location
            else None
        )

    def apply(
        self, payload: Any, *, topic: str = "", received_at: datetime | None = None
    ) -> Update:
        """The update of one decoded payload (a dict); :class:`MappingError` otherwise."""
        if not isinstance(payload, dict):
            raise MappingError(f"expected a JSON object, got {type(payload).__name__}", "$")
        eid = self._entity_id(payload, topic)
        observed, key_time = self._observed(payload, received_at)
        attrs: dict[str, Any] = {}
        for name, keys, spec in self._attrs:
            raw = resolve(payload, keys)
            if raw is _MISSING or raw is None:
                if spec.required:
                    raise MappingError(f"required attribute {name} is missing", spec.path)
                continue
            attr: dict[str, Any] = {
                "type": "Property",
                "value": _convert(raw, spec),
                "observedAt": observed,
            }
            if spec.unit:
                attr["unitCode"] = spec.unit
            attrs[name] = attr
        if self._loc is not None:
            loc = self._location(payload)
            if loc is not None:
                attrs["location"] = {"type": "GeoProperty", "value": loc}
        if not attrs:
            raise MappingError("none of the mapped attributes is in the message", "$")
        if self._msg is not None:
            mid = resolve(payload, self._msg)
            where = self.config.message_id or "$"
            if mid is _MISSING or mid is None or isinstance(mid, dict | list):
                raise MappingError("the message id is missing", where)
            key = f"m:{mid}"
            # a key is stored and indexed with the reading: PostgreSQL stores no NUL and
            # indexes no row over about 2,700 bytes (such a key failed its batch for ever)
            if "\x00" in key or len(key.encode()) > MAX_KEY_BYTES:
                raise MappingError(
                    f"the message id must be at most {MAX_KEY_BYTES - 2} bytes, without a NUL "
                    "character",
                    where,
                )
        elif self._ts is not None:
            # the observation time first: keys then mostly arrive in order and the key
            # table's index grows at its end (``t:<entity>@<time>``, the earlier form, put each
            # device's keys in a region of their own; cityward.ingest.writer reads both)
            key = f"o:{key_time}@{eid}"
        else:
            # Stamped with the time of receipt, which a redelivery does not share: such a
            # reading cannot be told from a repeat, so each gets a key of its own. Keyed by
            # that time, two readings of a device received in the same millisecond were one
            # (a backlog of 200 lost 186).
            key = f"r:{observed}@{eid}#{_RUN}.{next(_SEQ)}"
        return Update(eid, self.config.entity_type, observed, attrs, key)

    def _entity_id(self, payload: dict[str, Any], topic: str) -> str:
        out = []
        levels = topic.split("/") if topic else []
        for part in self._id_parts:
            if isinstance(part, str):
                out.append(part)
                continue
            if isinstance(part, int):
                if not -len(levels) <= part < len(levels) or not levels:
                    raise MappingError(f"the topic {topic!r} has no level {part}", "id")
                value: Any = levels[part]
            else:
                value = resolve(payload, part)
                if value is _MISSING or value is None:
                    raise MappingError("a field of the entity id is missing", _path_of(part))
                if isinstance(value, bool) or not isinstance(value, str | int):
                    raise MappingError("an id field must be a string or an integer", _path_of(part))
            text = str(value)
            if not text or not re.fullmatch(r"[A-Za-z0-9._\-~:]+", text):
                raise MappingError(
                    f"{text!r} cannot go into an entity id (letters, digits, . _ - ~ :)", "id"
                )
            out.append(text)
        eid = "".join(out)
        if len(eid) > MAX_ID_BYTES:  # ASCII (checked above): as many bytes as characters
            raise MappingError(f"the entity id is longer than {MAX_ID_BYTES} bytes", "id")
        return eid

    def _observed(self, payload: dict[str, Any], received_at: datetime | None) -> tuple[str, str]:
        """(observedAt, to the millisecond; the time for the delivery key, to the microsecond
        where the payload's time has digits below the millisecond)."""
        spec = self.config.timestamp
        if spec is None or self._ts is None:
            observed = _iso(received_at or datetime.now(UTC))
            return observed, observed
        raw = resolve(payload, self._ts)
        if raw is _MISSING or raw is None:
            raise MappingError("the observation time is missing", spec.path)
        try:
            if spec.format == "iso8601":
                if not isinstance(raw, str):
                    raise ValueError
                at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
                if at.tzinfo is None:
                    raise MappingError(f"{raw!r} has no time zone (add Z or +01:00)", spec.path)
            else:
                n = _number(raw)
                if not math.isfinite(n):
                    raise ValueError
                at = datetime.fromtimestamp(n / 1000 if spec.format == "epoch_ms" else n, UTC)
            # in UTC inside the try: 9999-12-31T23:00:00-05:00 overflows there (an uncaught
            # OverflowError killed the MQTT reader and failed an HTTP push with a 500)
            if at.tzinfo is not UTC:
                at = at.astimezone(UTC)
            observed = _iso(at)
            # observedAt is cut to the millisecond, but a key made of that cut time made two
            # readings 0.1 ms apart one delivery (the second accepted, then dropped as a
            # repeat). A whole-millisecond time keeps the key it always had: a replay resumed
            # after an upgrade finds the keys an earlier version wrote.
            sub_ms = at.microsecond % 1000
            return observed, f"{observed[:-1]}{sub_ms:03d}Z" if sub_ms else observed
        except (ValueError, OverflowError, OSError) as exc:
            if isinstance(exc, MappingError):
                raise
            raise MappingError(f"{raw!r} is not a time in {spec.format}", spec.path) from None

    def _location(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        assert self._loc is not None and self.config.location is not None
        lon, lat = resolve(payload, self._loc[0]), resolve(payload, self._loc[1])
        if lon is _MISSING and lat is _MISSING:
            return None
        try:
            x, y = _number(lon), _number(lat)
        except ValueError:
            raise MappingError("longitude and latitude must be numbers", "location") from None
        if not (-180 <= x <= 180 and -90 <= y <= 90):
            raise MappingError(f"({x}, {y}) is not a WGS84 longitude/latitude", "location")
        return {"type": "Point", "coordinates": [x, y]}


# what makes receipt-time keys unique: this process's run, then a counter
_RUN = secrets.token_hex(6)
_SEQ = itertools.count()


def _path_of(keys: tuple[Key, ...]) -> str:
    return "$" + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


# "YYYY-MM-DDTHH:MM:SS" of recent whole seconds: a device fleet reports in the same few
# seconds, and isoformat() of every reading took a tenth of an ingest front process's time
_SECONDS: dict[tuple[int, int, int, int, int, int], str] = {}


def _iso(at: datetime) -> str:
    """``at`` in UTC to the millisecond, e.g. ``2026-11-24T03:00:00.123Z`` (truncated, like
    ``isoformat(timespec="milliseconds")``)."""
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    key = (at.year, at.month, at.day, at.hour, at.minute, at.second)
    head = _SECONDS.get(key)
    if head is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        head = _SECONDS[key] = (
            f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:{at.second:02d}"
        )
    return f"{head}.{at.microsecond // 1000:03d}Z"


# a number in a string, as JSON writes numbers (ASCII digits): Python's float() also reads
# "1_0" as 10, "٣" (an Arabic-Indic digit) as 3, "nan" and "infinity"
_NUMBER_TEXT = re.compile(r"\s*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*")
_INTEGER_TEXT = re.compile(r"\s*[-+]?[0-9]+\s*")


def _number(raw: Any) -> float:
    """A JSON number, or a string holding one, as a float; ValueError otherwise (booleans too:
    JSON's true is not 1)."""
    if type(raw) is int or type(raw) is float:
        return float(raw)
    if type(raw) is str and _NUMBER_TEXT.fullmatch(raw):
        return float(raw)
    raise ValueError(f"not a number: {raw!r}")


def _scaled(n: float, scale: float, offset: float) -> float:
    """``n * scale + offset`` in decimal, as the payload and the mapping write them: in binary
    floating point 2931.5 deci-kelvin became 20.000000000000057 degrees, not the 20.0 anyone
    reads in them (each float is taken at its shortest decimal form; 1-2 us a value, for
    scaled attributes only)."""
    try:
        exact = Decimal(repr(n)) * Decimal(repr(scale)) + Decimal(repr(offset))
    except (InvalidOperation, ValueError):
        return n * scale + offset
    return float(exact)


def _exact_integer(raw: Any, spec: AttributeMap) -> int | None:
    """An integer (a JSON integer or one in a string) read without a float in between, or None
    when it is not one: through float, 2**53 + 1 was stored as 2**53 and 2**63 - 1 refused."""
    if type(raw) is int:
        n = raw
    elif type(raw) is str and _INTEGER_TEXT.fullmatch(raw):
        try:
            n = int(raw)
        except ValueError:  # longer than Python reads (4,300 digits): far past 64 bits
            raise MappingError(f"{raw!r} is not a 64-bit integer", spec.path) from None
    else:
        return None
    if not -(2**63) <= n < 2**63:  # no store takes more than a 64-bit integer
        raise MappingError(f"{raw!r} is not a 64-bit integer", spec.path)
    return n


def _convert(raw: Any, spec: AttributeMap) -> Any:
    if spec.kind == "integer" and spec.scale == 1.0 and spec.offset == 0.0:
        exact = _exact_integer(raw, spec)
        if exact is not None:
            return exact
    if spec.kind in ("number", "integer"):
        if isinstance(raw, bool):
            raise MappingError(f"expected a number, got {raw!r}", spec.path)
        try:
            n = _number(raw)
        except ValueError:
            n = math.nan
        if not math.isfinite(n):
            raise MappingError(f"expected a number, got {raw!r}", spec.path)
        if spec.scale != 1.0 or spec.offset != 0.0:
            n = _scaled(n, spec.scale, spec.offset)
        if not math.isfinite(n):  # scaled past the float range: it was stored as null
            raise MappingError(f"{raw!r} is out of range once scaled", spec.path)
        if spec.kind == "integer":
            if n != int(n):
                raise MappingError(f"expected an integer, got {raw!r}", spec.path)
            if not -(2**63) <= n < 2**63:  # no store takes more than a 64-bit integer
                raise MappingError(f"{raw!r} is not a 64-bit integer", spec.path)
            return int(n)
        return n
    if spec.kind == "string":
        if isinstance(raw, dict | list):
            raise MappingError("expected a string, got a JSON structure", spec.path)
        # a JSON scalar as JSON writes it: str() made true "True" and null "None"
        text = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
        if "\x00" in text:  # the bank stores no NUL (cityward.bank.model.check_no_nul)
            raise MappingError("the text contains a NUL character (U+0000)", spec.path)
        return text
    if spec.kind == "boolean":
        if isinstance(raw, bool):
            return raw
        if raw in ("true", "false", 0, 1):
            return raw in ("true", 1)
        raise MappingError(f"expected a boolean, got {raw!r}", spec.path)
    return raw
