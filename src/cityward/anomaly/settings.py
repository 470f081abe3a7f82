"""Settings of the anomaly service (``[anomaly]`` in the TOML file).

A *watch* says what to look at (an entity type, optionally an id pattern, and one attribute or
a multi-attribute rule), how to score it (a registered detector or rule) and when to alert
(the hysteresis thresholds). ``docs/anomaly.md`` ("Alerts") explains every field.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cityward.anomaly.rules import TrafficIncidentConfig
from cityward.bank.query.sqlgen import id_pattern_matcher

if TYPE_CHECKING:
    from cityward.anomaly.detectors import Detector

# the Alert Smart Data Model's enums (dataModel.Alert, alert-schema.json and Alert/schema.json)
ALERT_CATEGORIES = (
    "traffic",
    "naturalDisaster",
    "weather",
    "environment",
    "health",
    "security",
    "agriculture",
)
AlertCategory = Literal[
    "traffic", "naturalDisaster", "weather", "environment", "health", "security", "agriculture"
]
ALERT_SUBCATEGORIES = frozenset(
    [
        "airPollution",
        "assault",
        "asthmaAttack",
        "avalancheRisk",
        "bacteria",
        "badSeaState",
        "bikerOnRoad",
        "buildingFire",
        "bumpedPatient",
        "carAccident",
        "carStopped",
        "carWrongDirection",
        "coastalEvent",
        "civilDisorder",
        "coldWave",
        "crowdRisk",
        "earthquake",
        "fallenPatient",
        "fertilisation",
        "fireRisk",
        "flood",
        "floodRisk",
        "fog",
        "forestFire",
        "fungus",
        "hazardOnRoad",
        "heartAttack",
        "heatWave",
        "highAtmosphericPressure",
        "highHumidity",
        "highTemperature",
        "hurricane",
        "ice",
        "injuredBiker",
        "insect",
        "irrigation",
        "lowAtmosphericPressure",
        "lowHumidity",
        "lowTemperature",
        "microbe",
        "mite",
        "nematodes",
        "noxiousWeed",
        "pedestrianOnRoad",
        "pollenConcentration",
        "pothole",
        "rainfall",
        "roadClosed",
        "roadWorks",
        "robbery",
        "rodent",
        "snail",
        "snow",
        "snow/ice",
        "suspiciousAction",
        "thunderstorms",
        "tornado",
        "trafficJam",
        "tramApproaching",
        "tropicalCyclone",
        "tsunami",
        "virus",
        "waterPollution",
        "wind",
    ]
)
ALERT_SEVERITIES = ("informational", "low", "medium", "high", "critical")

# category (and subCategory) of the alerts about an entity type, when a watch names none
_CATEGORY_OF_TYPE: dict[str, tuple[AlertCategory, str | None]] = {
    "TrafficFlowObserved": ("traffic", None),
    "ItemFlowObserved": ("traffic", None),
    "CrowdFlowObserved": ("security", "crowdRisk"),
    "TrafficSignal": ("traffic", None),
    "AirQualityObserved": ("environment", "airPollution"),
    "NoiseLevelObserved": ("environment", None),
    "WaterQualityObserved": ("environment", "waterPollution"),
    "WeatherObserved": ("weather", None),
}

#: a tail-probability score (windowed Gaussian): 0.999 is a two-sided 3.3-sigma event
DEFAULT_THRESHOLD = 0.999
DEFAULT_OPEN_AFTER = 3
DEFAULT_CLOSE_AFTER = 6
DEFAULT_WARMUP = 288  # a day of 5-minute readings
ALERT_TYPE = "Alert"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


def local_name(name: str) -> str:
    """The last segment of an IRI (after '/' or '#'), or the term itself.

    >>> local_name("https://smartdatamodels.org/dataModel.Transportation/occupancy")
    'occupancy'
    >>> local_name("occupancy")
    'occupancy'
    """
    return re.split(r"[/#]", name)[-1]


def high_default(threshold: float) -> float:
    """A tail a hundred times rarer than ``threshold``'s (0.999 -> 0.99999)."""
    return 1.0 - (1.0 - threshold) / 100.0


class _Watch(BaseModel):
    """What every watch has: what to look at and when to alert."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None,
        pattern=_NAME,
        description="Short unique name (in alert ids and logs); default <type>-<attribute>.",
    )
    _named_by_default: bool = PrivateAttr(default=False)
    entity_type: str = Field(
        min_length=1, description="Entity type watched: a short name (any @context) or an IRI."
    )
    id_pattern: str | None = Field(
        default=None, description="Only entities whose id fully matches this regex."
    )
    threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Score at or above which a point is anomalous (default: the detector's "
        f"own alert_threshold, else {DEFAULT_THRESHOLD}; 0.5 for traffic-incident).",
    )
    high_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="One point at or above it opens an alert at once (default: a tail 100 "
        "times rarer than threshold).",
    )
    clear_threshold: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Below it a point counts as normal (default: threshold).",
    )
    open_after: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Consecutive anomalous points that open an alert (default: the detector's "
        f"own alert_open_after, else {DEFAULT_OPEN_AFTER}).",
    )
    close_after: int = Field(
        default=DEFAULT_CLOSE_AFTER,
        ge=1,
        le=100_000,
        description="Consecutive normal points that close an open alert.",
    )
    warmup: int = Field(
        default=DEFAULT_WARMUP,
        ge=0,
        le=10_000_000,
        description="Points of a stream learnt before it may open or close alerts.",
    )
    category: AlertCategory | None = Field(
        default=None, description="Alert category (default by entity type)."
    )
    sub_category: str | None = Field(
        default=None, description="Alert subCategory (Smart Data Model enum; default by type)."
    )

    @field_validator("id_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            id_pattern_matcher(value, "id_pattern")
        return value

    @field_validator("entity_type")
    @classmethod
    def _type(cls, value: str) -> str:
        if local_name(value) == ALERT_TYPE:
            raise ValueError(
                "the anomaly service writes Alert entities; it cannot watch them (feedback loop)"
            )
        return value

    @field_validator("sub_category")
    @classmethod
    def _sub_category(cls, value: str | None) -> str | None:
        if value is not None and value not in ALERT_SUBCATEGORIES:
            raise ValueError(
                f"{value!r} is not an Alert subCategory of the Smart Data Model; one of: "
                + ", ".join(sorted(ALERT_SUBCATEGORIES))
            )
        return value

    def _resolve(self, default_name: str, default_threshold: float, default_open: int) -> None:
        """Fill the defaults that depend on other fields, and check the thresholds agree."""
        if self.open_after is None:
            self.open_after = default_open
        if self.name is None:
            self.name = re.sub(r"[^A-Za-z0-9._-]", "-", default_name)[:64]
            self._named_by_default = True
        if self.threshold is None:
            self.threshold = default_threshold
        if self.high_threshold is None:
            self.high_threshold = high_default(self.threshold)
        if self.clear_threshold is None:
            self.clear_threshold = self.threshold
        if self.high_threshold < self.threshold:
            raise ValueError(
                f"high_threshold ({self.high_threshold}) must not be below threshold "
                f"({self.threshold})"
            )
        if self.clear_threshold > self.threshold:
            raise ValueError(
                f"clear_threshold ({self.clear_threshold}) must not be above threshold "
                f"({self.threshold})"
            )
        known = _CATEGORY_OF_TYPE.get(local_name(self.entity_type))
        if self.category is None:
            if known is None:
                raise ValueError(
                    f"category is required for entity type {self.entity_type!r} (known defaults: "
                    f"{', '.join(sorted(_CATEGORY_OF_TYPE))}); one of {', '.join(ALERT_CATEGORIES)}"
                )
            self.category = known[0]
            if self.sub_category is None:
                self.sub_category = known[1]

    def matches_id(self, eid: str) -> bool:
        """Whether the watch covers this entity id: ``id_pattern`` read as the API reads
        ``idPattern`` (and governance its sources' id patterns), against the whole id."""
        if self.id_pattern is None:
            return True
        return id_pattern_matcher(self.id_pattern, "id_pattern").search(eid) is not None

    # set by _resolve; typed accessors for the code that runs the watch
    @property
    def key(self) -> str:
        assert self.name is not None
        return self.name

    @property
    def opens_after(self) -> int:
        """``open_after``, its default filled in."""
        assert self.open_after is not None
        return self.open_after

    @property
    def levels(self) -> tuple[float, float, float]:
        """(threshold, high_threshold, clear_threshold), defaults filled in."""
        assert self.threshold is not None
        assert self.high_threshold is not None
        assert self.clear_threshold is not None
        return self.threshold, self.high_threshold, self.clear_threshold


class DetectorWatch(_Watch):
    """One numeric attribute scored by a registered detector."""

    kind: Literal["detector"] = "detector"
    attribute: str = Field(min_length=1, description="Attribute watched (short name or IRI).")
    detector: str = Field(
        default="default", description="Registered detector (`cityward anomaly detectors`)."
    )
    detector_config: dict[str, Any] = Field(
        default_factory=dict, description="The detector's settings (its own fields)."
    )

    @field_validator("detector")
    @classmethod
    def _detector(cls, value: str) -> str:
        from cityward.anomaly.detectors import load_builtin

        registry = load_builtin()
        if value != "default" and value not in registry:
            raise ValueError(
                f"detector {value!r} is not registered; one of: "
                + ", ".join([*sorted(registry), "default"])
            )
        return value

    @field_validator("detector_config")
    @classmethod
    def _detector_config(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        detector = info.data.get("detector")
        if detector is None:  # the detector itself is wrong: that error says enough
            return value
        config_cls = _detector_class(detector).Config
        try:
            config_cls.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(config)'}: {e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(f"settings of detector {detector!r}: {problems}") from None
        return value

    @model_validator(mode="after")
    def _check(self) -> DetectorWatch:
        # a detector may know how its scores are best read: the level of an alarm, and
        # whether alarms come as runs (a smooth tail probability) or single spikes
        cls = _detector_class(self.detector)
        self._resolve(
            f"{local_name(self.entity_type)}-{local_name(self.attribute)}",
            cls.alert_threshold,
            cls.alert_open_after,
        )
        return self


def _detector_class(name: str) -> type[Detector]:
    from cityward.anomaly.detectors import DEFAULT, load_builtin

    return load_builtin()[DEFAULT if name == "default" else name]


class TrafficIncidentWatch(_Watch):
    """The traffic-incident rule on a road sensor (occupancy up while speed collapses)."""

    kind: Literal["traffic-incident"]
    rule: TrafficIncidentConfig = Field(
        default_factory=TrafficIncidentConfig, description="The rule's settings."
    )

    @model_validator(mode="after")
    def _check(self) -> TrafficIncidentWatch:
        self._resolve(f"{local_name(self.entity_type)}-traffic-incident", 0.5, DEFAULT_OPEN_AFTER)
        return self


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "detector"))
    return str(getattr(value, "kind", "detector"))


Watch = Annotated[
    Annotated[DetectorWatch, Tag("detector")]
    | Annotated[TrafficIncidentWatch, Tag("traffic-incident")],
    Discriminator(_kind),
]


def default_watches() -> list[DetectorWatch | TrafficIncidentWatch]:
    """What an enabled service watches when the configuration lists no watches."""
    out: list[DetectorWatch | TrafficIncidentWatch] = [
        TrafficIncidentWatch(
            kind="traffic-incident", name="traffic-incident", entity_type="TrafficFlowObserved"
        )
    ]
    for attr in ("no2", "pm10", "pm25"):
        out.append(
            DetectorWatch(name=f"air-{attr}", entity_type="AirQualityObserved", attribute=attr)
        )
    out.append(DetectorWatch(name="noise-laeq", entity_type="NoiseLevelObserved", attribute="LAeq"))
    return out


class AnomalySettings(BaseModel):
    """The anomaly service of ``cityward serve`` ([anomaly] in the TOML file)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False, description="Run the anomaly service inside `cityward serve`."
    )
    watches: list[Watch] = Field(
        default_factory=default_watches,
        description="What to watch; the default covers traffic incidents, air quality, noise.",
    )
    max_streams: int = Field(
        default=10_000,
        ge=1,
        le=10_000_000,
        description="Streams (entity x watch) kept in memory; the least recently updated one "
        "is forgotten beyond it.",
    )
    queue_size: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Changes waiting for the service; beyond it the oldest are dropped (logged).",
    )
    max_ahead_s: float = Field(
        default=2 * 86_400.0,
        gt=0,
        description="A reading observed more than this after the bank received it (a device "
        "clock gone wrong) is counted and not scored: once scored, every later reading of its "
        "stream looked late. Raise it for simulations that run ahead of the wall clock.",
    )
    retry_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="First retry of a failed alert write (then doubling, up to 5 minutes).",
    )
    max_pending_writes: int = Field(
        default=10_000,
        ge=1,
        le=1_000_000,
        description="Alert writes kept for retry while the bank refuses them.",
    )
    warm_start: int = Field(
        default=1000,
        ge=0,
        le=1_000_000,
        description="A stream seen for the first time (after a start, or once forgotten "
        "beyond max_streams) first learns up to this many recorded values of each of its "
        "attributes before the new one, instead of waiting for its warmup in new ones "
        "(0: start cold).",
    )

    @model_validator(mode="after")
    def _unique(self) -> AnomalySettings:
        names = [w.key for w in self.watches]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            where = []
            for name in dupes:
                at = [i for i, n in enumerate(names) if n == name]
                byd = [i for i in at if self.watches[i]._named_by_default]
                why = (
                    f" (watches {', '.join(map(str, at))}"
                    + (
                        f"; {', '.join(map(str, byd))} named by default <type>-<attribute>, "
                        "characters outside A-Za-z0-9._- made '-' and cut at 64: give them a name"
                        if byd
                        else ""
                    )
                    + ")"
                )
                where.append(name + why)
            raise ValueError(f"watch names must be unique; repeated: {'; '.join(where)}")
        return self
