"""Declared data sources: what each kind of entity is for, its legal basis and retention.

One catalog drives the access checks, the retention scheduler, the public register and the DPIA
draft, so none of them can drift from the others.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cityward.bank.errors import BadRequestData
from cityward.bank.query.sqlgen import BoundedPattern, id_pattern_matcher
from cityward.bank.temporal.duration import Duration, parse_duration

# The purpose every admin token carries: all purposes.
ALL_PURPOSES = "*"
UNDECLARED = "undeclared"
#: Alerts computed from one source's data carry that source in their id, right after this
#: prefix (``urn:ngsi-ld:Alert:from:<source id>:...``), and belong to it: whoever may not read
#: the source may not read what was computed from it (a value, a reason, a place). A source id
#: has no ':', so the segment is unambiguous; an id naming no declared source is undeclared.
DERIVED_PREFIX = "urn:ngsi-ld:Alert:from:"
_PURPOSE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}\Z")


class PersonalData(StrEnum):
    """Personal-data category of a source (GDPR art. 4(1))."""

    NONE = "none"  # no information about people at all (air quality, vehicle counts)
    INDIRECT = "indirect"  # about people only in aggregate or when combined (crowd counts)
    PERSONAL = "personal"  # relates to identifiable people (a complaint with a name)


class SourceKind(StrEnum):
    SENSOR = "sensor"
    CAMERA = "camera"
    SIGNAL = "signal"
    VEHICLE = "vehicle"  # moving vehicles' feeds (emergency runs): positions never published
    DERIVED = "derived"  # computed by cityward itself (alerts, anomaly scores)
    OTHER = "other"


#: kinds whose entities are installed devices: the public register lists each, with its place
INSTALLED = frozenset({SourceKind.SENSOR, SourceKind.CAMERA, SourceKind.SIGNAL})


def check_purpose(name: str) -> str:
    if not _PURPOSE.match(name):
        raise ValueError(
            f"purpose {name!r} must be lower-case letters, digits, '.', '_' or '-' (max 64)"
        )
    return name


def derived_prefix(source_id: str) -> str:
    """The id prefix of the alerts that belong to the source ``source_id``."""
    return f"{DERIVED_PREFIX}{source_id}:"


def derived_source(eid: str) -> str | None:
    """The source id a derived id names (None for an id that is not derived). A derived id
    with no ':' after it names no source ("", undeclared): the query restriction matches the
    prefixes of declared sources with their ':', and must agree."""
    if not eid.startswith(DERIVED_PREFIX):
        return None
    sid, sep, _ = eid[len(DERIVED_PREFIX) :].partition(":")
    return sid if sep else ""


class DataSource(BaseModel):
    """One declared data source: a set of entity types and/or entity id patterns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Short name.")
    name: str = Field(min_length=1, description="What citizens read in the register.")
    kind: SourceKind = SourceKind.SENSOR
    types: tuple[str, ...] = Field(
        default=(), description="Entity types (short names or IRIs) of this source."
    )
    id_patterns: tuple[str, ...] = Field(
        default=(), description="Regular expressions on entity ids (full match)."
    )
    purposes: tuple[str, ...] = Field(min_length=1, description="Purposes the data serves.")
    legal_basis: str = Field(min_length=1, description="e.g. GDPR art. 6(1)(e), public task.")
    personal_data: PersonalData = PersonalData.NONE
    retention: str = Field(description="How long history is kept, ISO 8601 (P90D, P1Y).")
    owner: str = Field(min_length=1, description="Department responsible.")
    contact: str = Field(default="", description="Where citizens ask questions.")
    description: str = ""
    computes: tuple[str, ...] = Field(default=(), description="What is computed from it.")
    never_computes: tuple[str, ...] = Field(
        default=(
            "identification of people",
            "face recognition",
            "licence-plate reading",
            "tracking of people or devices",
        ),
        description="What is never computed from it.",
    )

    @field_validator("purposes")
    @classmethod
    def _purposes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for p in value:
            check_purpose(p)
        return value

    @field_validator("id_patterns")
    @classmethod
    def _patterns(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for p in value:
            id_pattern_matcher(p)  # PostgreSQL runs them too (in the access conjunct)
        return value

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        try:
            d = parse_duration(value)
        except BadRequestData as exc:
            raise ValueError(f"retention {value!r}: {exc.detail}") from exc
        if d.months == 0 and d.micros <= 0:
            raise ValueError("retention must be longer than zero")
        return value

    @model_validator(mode="after")
    def _selects(self) -> DataSource:
        if not self.types and not self.id_patterns:
            raise ValueError(f"source {self.id!r} needs types or id_patterns")
        return self

    @property
    def listed(self) -> bool:
        """Whether the public register lists this source's entities one by one (with their
        places): installed devices only, and none that relates to identifiable people. Others
        are counted: a vehicle's live position, an alert's place or a complaint's address is
        not for everyone to read."""
        return self.kind in INSTALLED and self.personal_data is not PersonalData.PERSONAL

    @cached_property
    def retention_period(self) -> Duration:
        return parse_duration(self.retention)

    @cached_property
    def compiled_patterns(self) -> tuple[BoundedPattern, ...]:
        """The id patterns as SQLite runs them: searches anchored at both ends, without a time
        limit (the operator's own, checked at load: a loaded machine must not turn one away)."""
        return tuple(id_pattern_matcher(p) for p in self.id_patterns)


def default_sources() -> list[DataSource]:
    """The catalog used when the configuration declares none: the demo city's sources."""
    common = {
        "legal_basis": "GDPR art. 6(1)(e): task in the public interest (municipal traffic and "
        "environment management); no personal data is processed",
        "owner": "City operations department",
        "contact": "privacy@city.example",
    }
    return [
        DataSource(
            id="traffic-detectors",
            name="Traffic flow detectors",
            types=("TrafficFlowObserved",),
            purposes=("traffic-management",),
            retention="P1Y",
            computes=("vehicle counts", "lane occupancy", "average speed", "congestion level"),
            description="Induction loops and radar counters at junctions.",
            **common,
        ),
        DataSource(
            id="traffic-signals",
            name="Traffic signal controllers",
            kind=SourceKind.SIGNAL,
            types=("TrafficSignal", "TrafficLight"),
            purposes=("traffic-management",),
            retention="P90D",
            computes=("signal phase", "green-wave priority for emergency vehicles"),
            **common,
        ),
        DataSource(
            id="emergency-runs",
            name="Emergency vehicle runs",
            kind=SourceKind.VEHICLE,
            types=("EmergencyVehicleRun",),
            purposes=("traffic-management", "public-safety"),
            personal_data=PersonalData.INDIRECT,
            retention="P90D",
            computes=("route, position and speed of an emergency vehicle while on a run",),
            never_computes=("identification of the crew", "tracking of vehicles off a run"),
            description="From the vehicle's GPS feed while on a run, for signal priority and "
            "the control room's map; the crew is not recorded.",
            **common,
        ),
        DataSource(
            id="traffic-kpis",
            name="Traffic performance indicators",
            kind=SourceKind.DERIVED,
            types=("KeyPerformanceIndicator",),
            purposes=("traffic-management",),
            retention="P1Y",
            computes=("average delay and CO2 of the traffic, against fixed-time control",),
            description="Aggregates over all vehicles of the network; no single vehicle.",
            **common,
        ),
        DataSource(
            id="air-quality",
            name="Air quality stations",
            types=("AirQualityObserved",),
            purposes=("environment-monitoring",),
            retention="P5Y",
            computes=("NO2, PM10, PM2.5 concentrations", "exceedance alerts"),
            **common,
        ),
        DataSource(
            id="noise",
            name="Noise level meters",
            types=("NoiseLevelObserved",),
            purposes=("environment-monitoring",),
            retention="P1Y",
            computes=("A-weighted sound level (LAeq)",),
            never_computes=(
                "recording or analysis of speech",
                "identification of people",
                "tracking of people or devices",
            ),
            **common,
        ),
        DataSource(
            id="traffic-cameras",
            name="Traffic cameras (counts only, anonymized at the edge)",
            kind=SourceKind.CAMERA,
            types=("Camera", "ItemFlowObserved", "CrowdFlowObserved"),
            # the vehicle counts of a camera are TrafficFlowObserved too, told apart by id; its
            # event Alerts (a stopped vehicle, people on the carriageway, with a blurred
            # snapshot) are read with the camera's purposes, not with every alert's
            id_patterns=(
                r"urn:ngsi-ld:(TrafficFlowObserved|ItemFlowObserved|CrowdFlowObserved):camera:.+",
                r"urn:ngsi-ld:Alert:camera:.+",
            ),
            purposes=("traffic-management", "public-safety"),
            personal_data=PersonalData.INDIRECT,
            retention="P30D",
            computes=(
                "counts of vehicles, cyclists and pedestrians",
                "stopped vehicles, wrong-way driving, people on the carriageway, crowd density",
            ),
            description="Frames are processed inside the camera worker; faces and plates are "
            "blurred before any snapshot leaves it; only counts and events are stored.",
            **common,
        ),
        DataSource(
            id="alerts",
            name="Alerts and incidents",
            kind=SourceKind.DERIVED,
            types=("Alert", "RoadAccident"),
            purposes=("traffic-management", "environment-monitoring", "public-safety"),
            retention="P2Y",
            computes=("incident alerts from sensors, cameras and anomaly detection",),
            **common,
        ),
    ]


def undeclared_source() -> DataSource:
    """Where entities that match no declared source belong: readable only with its purpose.

    Undeclared data is treated as personal until someone declares it, so every read of it is
    audited and only tokens that carry the ``undeclared`` purpose (or admin) can see it.
    """
    return DataSource(
        id=UNDECLARED,
        name="Undeclared data (not yet classified)",
        kind=SourceKind.OTHER,
        id_patterns=(".*",),
        purposes=(UNDECLARED,),
        legal_basis="none declared: classify this data before using it",
        personal_data=PersonalData.PERSONAL,
        retention="P30D",
        owner="Data protection officer",
        description="Entities whose type or id matches no declared source.",
    )


@dataclass
class Selection:
    """Which entities a set of purposes may see, in the terms a query can test.

    ``everything``: no restriction. Otherwise it decides as :meth:`Catalog.source_of` does, in
    the same order, so that a query shows exactly the entities a retrieval by id shows: a
    derived id by the source it names (``visible_derived``, ``known_derived``); else the
    first source, in catalog order, with an id pattern that fully matches the id
    (``pattern_rules``); else the source of the entity's first type, in the order of its
    ``type`` array, that a source declares (``visible_types``, ``hidden_types``); else
    (undeclared data) ``undeclared``. An entity that matches a hidden source's pattern is not
    shown for matching a later, visible source's one too, nor the other way round.
    """

    everything: bool = False
    visible_types: list[str] = field(default_factory=list)  # expanded IRIs
    hidden_types: list[str] = field(default_factory=list)
    #: the id patterns of the patterned sources in catalog order, as runs of consecutive
    #: sources of one visibility: (visible, patterns); the first run that matches decides
    pattern_rules: list[tuple[bool, list[str]]] = field(default_factory=list)
    undeclared: bool = False
    # derived ids (DERIVED_PREFIX) decide before all of the above: visible when they start
    # with one of ``visible_derived``; those of sources not in the catalog (``known_derived``
    # holds every declared one) follow ``undeclared``
    visible_derived: list[str] = field(default_factory=list)
    known_derived: list[str] = field(default_factory=list)


class Catalog:
    """The declared sources, with a fast lookup from an entity's types and id to its source."""

    def __init__(self, sources: list[DataSource], expand: dict[str, str] | None = None) -> None:
        ids = [s.id for s in sources]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"data source ids must be unique; repeated: {sorted(dupes)}")
        if UNDECLARED in ids:
            raise ValueError(f"{UNDECLARED!r} is reserved for data that matches no source")
        self.sources = list(sources)
        self.undeclared = undeclared_source()
        self._expand = expand or {}
        self._by_type: dict[str, DataSource] = {}
        for s in sources:
            for t in s.types:
                for key in {t, self._expand.get(t, t)}:
                    other = self._by_type.get(key)
                    if other is not None and other.id != s.id:
                        raise ValueError(
                            f"entity type {t!r} is declared by two sources: {other.id!r}, {s.id!r}"
                        )
                    self._by_type[key] = s
        self._by_id = {s.id: s for s in sources}
        self._patterned = [s for s in sources if s.id_patterns]
        self.purposes = sorted({p for s in sources for p in s.purposes} | {UNDECLARED})
        self._selections: dict[frozenset[str], Selection] = {}

    def expand(self, name: str) -> str:
        return self._expand.get(name, name)

    def get(self, source_id: str) -> DataSource | None:
        if source_id == UNDECLARED:
            return self.undeclared
        return next((s for s in self.sources if s.id == source_id), None)

    def source_of(self, eid: str, types: Sequence[str]) -> DataSource:
        """The source an entity belongs to: a derived id's source first (DERIVED_PREFIX), then
        its id pattern, then its type."""
        sid = derived_source(eid)
        if sid is not None:
            return self._by_id.get(sid, self.undeclared)
        for s in self._patterned:
            if any(p.search(eid) for p in s.compiled_patterns):
                return s
        for t in types:
            hit = self._by_type.get(t)
            if hit is not None:
                return hit
        return self.undeclared

    def all_sources(self) -> list[DataSource]:
        return [*self.sources, self.undeclared]

    @staticmethod
    def allows(purposes: frozenset[str], source: DataSource) -> bool:
        return ALL_PURPOSES in purposes or not purposes.isdisjoint(source.purposes)

    def selection(self, purposes: frozenset[str]) -> Selection:
        """The query restriction for a token with these purposes (computed once per set)."""
        hit = self._selections.get(purposes)
        if hit is None:
            hit = self._selections[purposes] = self._selection(purposes)
        return hit

    def _selection(self, purposes: frozenset[str]) -> Selection:
        if ALL_PURPOSES in purposes:
            return Selection(everything=True)
        visible = [s for s in self.sources if self.allows(purposes, s)]
        hidden = [s for s in self.sources if not self.allows(purposes, s)]
        undeclared = self.allows(purposes, self.undeclared)
        if undeclared and not hidden:
            return Selection(everything=True)
        return Selection(
            visible_types=[self.expand(t) for s in visible for t in s.types],
            hidden_types=[self.expand(t) for s in hidden for t in s.types],
            pattern_rules=self._pattern_rules(purposes),
            undeclared=undeclared,
            visible_derived=[derived_prefix(s.id) for s in visible],
            known_derived=[derived_prefix(s.id) for s in self.sources],
        )

    def _pattern_rules(self, purposes: frozenset[str]) -> list[tuple[bool, list[str]]]:
        """The patterned sources in catalog order (the order :meth:`source_of` tries them),
        consecutive ones of one visibility merged into a run."""
        runs: list[tuple[bool, list[str]]] = []
        for s in self._patterned:
            visible = self.allows(purposes, s)
            if runs and runs[-1][0] == visible:
                runs[-1][1].extend(s.id_patterns)
            else:
                runs.append((visible, list(s.id_patterns)))
        return runs
