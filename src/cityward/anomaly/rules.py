"""Incident rules: detectors that read several attributes of one entity at once.

A :class:`Rule` watches one entity (a road sensor) and, for every new set of readings, says how
much they look like an incident (a score in [0, 1], higher is worse), why, and which Smart Data
Model ``subCategory`` the incident has. Like a detector it learns per entity, from the past
only, in constant memory; the decision to alert (hysteresis) is the anomaly service's.

Rules register themselves by ``name``; the only one so far is :class:`TrafficIncidentRule`.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cityward.plugins import register

RULES: dict[str, type[Rule]] = {}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a rule says about one set of readings."""

    score: float  # in [0, 1]; the service compares it with the watch's thresholds
    reason: str = ""  # for people: "occupancy 4.2 sigma above expected, speed 60% below"
    sub_category: str | None = None  # Alert subCategory (Smart Data Model enum)
    severity: str | None = None  # Alert severity the rule insists on (else from the score)


class RuleConfig(BaseModel):
    """Settings of a rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Rule(abc.ABC):
    """Scores the readings of one entity, several attributes at a time."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[RuleConfig]] = RuleConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(RULES, cls, "rule")

    def __init__(self, config: RuleConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def inputs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The attribute names it reads: (required, optional)."""

    @abc.abstractmethod
    def process(self, values: Mapping[str, float], t: float) -> Verdict:
        """Score the readings ``values`` (attribute name -> number) observed at ``t`` (Unix
        seconds), then learn them. Every required input is present."""


# -- running statistics --------------------------------------------------------------------
class ExpStat:
    """Mean and deviation of a stream, exponentially weighted over about ``horizon`` values.

    The first ``horizon`` values weigh equally (a plain mean), later ones with weight
    1/horizon, so the estimate follows slow drift in constant memory.

    >>> s = ExpStat(100)
    >>> for x in (1.0, 2.0, 3.0):
    ...     s.add(x)
    >>> round(s.mean, 3), round(s.sd, 3)
    (2.0, 0.816)
    """

    __slots__ = ("horizon", "mean", "n", "var")

    def __init__(self, horizon: int) -> None:
        self.horizon = horizon
        self.n = 0
        self.mean = 0.0
        self.var = 0.0

    def add(self, x: float, weight: float = 1.0) -> None:
        """Learn ``x``; ``weight`` < 1 learns it less (values flagged as anomalous)."""
        self.n += 1
        a = weight / min(self.n, self.horizon)
        d = x - self.mean
        self.mean += a * d
        self.var = (1.0 - a) * (self.var + a * d * d)

    @property
    def sd(self) -> float:
        return math.sqrt(max(self.var, 0.0))


# -- the traffic-incident rule -------------------------------------------------------------
class TrafficIncidentConfig(RuleConfig):
    """Settings of the traffic-incident rule (``[[anomaly.watches]] kind = "traffic-incident"``)."""

    occupancy: str = Field(
        default="occupancy", min_length=1, description="Attribute with the lane occupancy."
    )
    speed: str = Field(
        default="averageVehicleSpeed", min_length=1, description="Attribute with the mean speed."
    )
    intensity: str | None = Field(
        default="intensity",
        description="Attribute with the vehicle count (optional: tells a blockage from a jam).",
    )
    occupancy_sigma: float = Field(
        default=3.0,
        gt=0,
        le=50,
        description="Occupancy this many deviations above its normal for the time counts as "
        "fully 'up'.",
    )
    speed_drop: float = Field(
        default=0.4,
        gt=0,
        lt=1,
        description="Speed this fraction below its normal for the time counts as 'collapsed'.",
    )
    flow_drop: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="With the incident signature, intensity this fraction below normal means "
        "vehicles queue but few pass: subCategory carAccident instead of trafficJam.",
    )
    slots_per_day: int = Field(
        default=24, ge=1, le=288, description="Times of day with a normal of their own."
    )
    weekly: bool = Field(
        default=True, description="Separate normals for weekdays and weekends (Sat, Sun)."
    )
    timezone: str = Field(default="UTC", description="Time zone of the times of day (IANA name).")
    horizon: int = Field(
        default=500,
        ge=10,
        le=1_000_000,
        description="Readings per time slot that the normal is averaged over (older ones fade).",
    )
    min_slot_points: int = Field(
        default=5,
        ge=1,
        le=10_000,
        description="Readings a time slot needs before its own normal is used (until then the "
        "sensor's all-day normal).",
    )
    deviation_floor: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="The occupancy deviation used is at least this fraction of the sensor's "
        "mean occupancy, so that on an empty road one slow car is no incident.",
    )
    max_skew_s: float = Field(
        default=900,
        gt=0,
        le=86400,
        description="Readings observed further apart than this are not combined (a speed left "
        "over from an earlier period is no evidence).",
    )
    flagged_weight: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Weight with which readings that look like an incident are learnt (0: not "
        "at all; the normal then never adopts a lasting change).",
    )

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name: Europe/Brussels)"
            ) from exc
        return value

    @model_validator(mode="after")
    def _distinct(self) -> TrafficIncidentConfig:
        names = [self.occupancy, self.speed, *([self.intensity] if self.intensity else [])]
        if len(set(names)) != len(names):
            raise ValueError(
                f"occupancy, speed and intensity must be different attributes: {names}"
            )
        return self


class _Normal:
    """Per time slot and all-day statistics of one input."""

    __slots__ = ("all", "slots")

    def __init__(self, n_slots: int, horizon: int) -> None:
        self.all = ExpStat(horizon)
        self.slots = [ExpStat(horizon) for _ in range(n_slots)]

    def at(self, slot: int, min_points: int, same_hour: int | None) -> ExpStat:
        """The slot's statistics once it has ``min_points``; else those of ``same_hour`` (the
        weekday slot of a weekend one) when that has them; else the all-day ones."""
        for n in (slot, same_hour):
            if n is not None and self.slots[n].n >= min_points:
                return self.slots[n]
        return self.all

    def add(self, slot: int, x: float, weight: float) -> None:
        self.all.add(x, weight)
        self.slots[slot].add(x, weight)


def _logistic(m: float) -> float:
    """0.5 at m = 1 (both criteria just met), 0.98 at m = 2, near 0 below m = 0."""
    return 1.0 / (1.0 + math.exp(-4.0 * max(-50.0, min(50.0, m - 1.0))))


def _num(x: float) -> str:
    return f"{x:.3g}"


class TrafficIncidentRule(Rule):
    """Occupancy well above its normal for the time of day while speed collapses.

    Per sensor and time slot (``slots_per_day`` per day, weekdays apart from weekends) it keeps
    exponentially weighted means and deviations of occupancy, speed and intensity, plus all-day
    ones: ``3 inputs x (2 x slots_per_day + 1)`` running statistics, whatever the length of the
    stream. A slot with fewer than ``min_slot_points`` readings borrows the statistics of the
    same hour on weekdays (a weekend slot), else the all-day ones. For a reading (o, v, q):

    - ``z = (o - mean_o) / max(sd_o, deviation_floor x all-day mean_o)``: how unusual the
      occupancy is for this time;
    - ``drop = 1 - v / mean_v``: how far speed fell below its normal for this time;
    - ``m = min(z / occupancy_sigma, drop / speed_drop)``: both must hold (busy but flowing
      traffic has a high ``z`` and no ``drop``; a slow night car has a ``drop`` and no ``z``);
    - ``score = 1 / (1 + exp(-4 (m - 1)))``: 0.5 exactly when both criteria are just met.

    The subCategory is ``carAccident`` when intensity also fell ``flow_drop`` below its normal
    (vehicles queue over the detector but few pass: a blockage), else ``trafficJam``.
    Readings scoring 0.5 or more are learnt with ``flagged_weight`` only.
    """

    name = "traffic-incident"
    summary = "occupancy up while speed collapses, against per-sensor normals for the time"
    Config = TrafficIncidentConfig

    def __init__(self, config: RuleConfig) -> None:
        super().__init__(config)
        assert isinstance(config, TrafficIncidentConfig)
        self.cfg = config
        self.tz = ZoneInfo(config.timezone)
        self.n_slots = config.slots_per_day * (2 if config.weekly else 1)
        self.slot_s = 86400.0 / config.slots_per_day
        self.occ = _Normal(self.n_slots, config.horizon)
        self.speed = _Normal(self.n_slots, config.horizon)
        self.flow = _Normal(self.n_slots, config.horizon) if config.intensity else None

    def inputs(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        optional = (self.cfg.intensity,) if self.cfg.intensity else ()
        return (self.cfg.occupancy, self.cfg.speed), optional

    def slot(self, t: float) -> int:
        """The time slot of ``t``: time of day in the configured zone, weekend apart."""
        local = datetime.fromtimestamp(t, self.tz)
        of_day = local.hour * 3600 + local.minute * 60 + local.second
        n = min(int(of_day // self.slot_s), self.cfg.slots_per_day - 1)
        if self.cfg.weekly and local.weekday() >= 5:
            n += self.cfg.slots_per_day
        return n

    def process(self, values: Mapping[str, float], t: float) -> Verdict:
        cfg = self.cfg
        o = values[cfg.occupancy]
        v = values[cfg.speed]
        q = values.get(cfg.intensity) if cfg.intensity else None
        slot = self.slot(t)
        verdict = self._score(slot, o, v, q)
        weight = cfg.flagged_weight if verdict.score >= 0.5 else 1.0
        self.occ.add(slot, o, weight)
        self.speed.add(slot, v, weight)
        if self.flow is not None and q is not None:
            self.flow.add(slot, q, weight)
        return verdict

    def _score(self, slot: int, o: float, v: float, q: float | None) -> Verdict:
        cfg = self.cfg
        need = cfg.min_slot_points
        if self.occ.all.n < need or self.speed.all.n < need:
            return Verdict(0.0)
        weekday = slot - cfg.slots_per_day if slot >= cfg.slots_per_day else None
        occ = self.occ.at(slot, need, weekday)
        spd = self.speed.at(slot, need, weekday)
        if spd.mean <= 0:
            return Verdict(0.0)
        sd = max(occ.sd, cfg.deviation_floor * abs(self.occ.all.mean), 1e-9)
        z = (o - occ.mean) / sd
        drop = 1.0 - v / spd.mean
        m = min(z / cfg.occupancy_sigma, drop / cfg.speed_drop)
        score = _logistic(m)
        if score < 0.5:
            return Verdict(score)
        parts = [
            f"{cfg.occupancy} {z:.1f} sigma above expected for this time "
            f"({_num(o)} vs {_num(occ.mean)})",
            f"{cfg.speed} {drop:.0%} below ({_num(v)} vs {_num(spd.mean)})",
        ]
        sub = "trafficJam"
        severity = None
        if self.flow is not None and q is not None:
            flow = self.flow.at(slot, need, weekday)
            if flow.n >= need and flow.mean > 0:
                flow_drop = 1.0 - q / flow.mean
                if flow_drop >= cfg.flow_drop:
                    sub, severity = "carAccident", "high"
                    parts.append(
                        f"{cfg.intensity} {flow_drop:.0%} below ({_num(q)} vs {_num(flow.mean)}): "
                        "vehicles queue but few pass, possible accident or obstruction"
                    )
        return Verdict(score, ", ".join(parts), sub, severity)


def create_rule(name: str, config: RuleConfig | dict[str, Any] | None = None) -> Rule:
    """A registered rule by name, its config validated."""
    cls = RULES.get(name)
    if cls is None:
        raise KeyError(f"no rule named {name!r}; registered: {', '.join(sorted(RULES))}")
    if isinstance(config, RuleConfig):
        return cls(config)
    return cls(cls.Config.model_validate(config or {}))
