"""Per-camera analytics rules: counts, occupancy, speeds and incident events from tracks.

A camera worker runs the tracker (:mod:`cityward.vision.tracker`) on each analysed frame and
hands its output to every rule of the camera: :meth:`Rule.update` returns what happened in
this frame (line :class:`Crossing` records and incident :class:`VisionEvent` s), and
:meth:`Rule.interval`, called every N seconds, returns and resets the rule's aggregate (the
payload of a flow entity). Rules are self-registering plugins with a typed pydantic config
(``extra="forbid"``), built from plain mappings by :func:`build_rules`::

    build_rules([{"type": "line", "name": "north", "line": [[0, 400], [1280, 420]]}],
                geometry=CameraGeometry(homography=...))

Geometry is in image pixels (``x`` right, ``y`` *down*, origin top-left). A track's position
is its box's ``bottom_center`` (where it touches the ground). :class:`CameraGeometry` may carry
a homography, a 3x3 matrix from image pixels to ground metres, needed by ``speed``, by
``crowd``'s density threshold and by ``wrong-way`` in ground coordinates.

Settings every rule has: ``name`` (used in every output; defaults to the type, must be unique
per camera), ``classes`` (COCO class ids the rule looks at; each rule has its own default) and
``forget_s`` (a track not seen for this long is forgotten by the rule).

The rules (plugin names):

``line``
    Counts line crossings by class and direction. ``line``: two points ``[[x1, y1], [x2, y2]]``.
    Walking on the image from the first point to the second, the *right* side is the one with
    positive ``cross(p2 - p1, anchor - p1)`` (below a line drawn left to right). ``in_side``
    (``right`` by default) names the side whose entry counts as ``in``; the other way is
    ``out``. A track's side changes only once its anchor is at least ``min_distance`` pixels
    from the line, within the segment's extent, so jitter on the line does not count; each
    track counts at most once per direction.
``zone``
    Occupancy of ``polygon`` (now, peak, time-weighted mean over the interval, by class) and
    mean dwell time by class of the tracks that left (a track has left once outside for
    ``exit_grace_s``, or forgotten).
``speed``
    Needs a homography. Speed of each track from its ground positions over ``window_s``; the
    interval gives per class the mean and 85th percentile of the tracks' mean speeds (km/h).
    With ``speed_limit_kmh``, a track over the limit for ``min_over_s`` gives one
    ``speeding`` event. ``polygon`` (optional) limits where speeds are measured.
``stopped``
    A vehicle whose anchor stays within ``max_move`` box heights for ``min_stopped_s`` inside
    the no-stopping ``polygon``: one ``carStopped`` event per track.
``wrong-way``
    A track inside ``polygon`` whose displacement since it entered points against
    ``direction`` (within ``max_angle_deg``) by at least ``min_distance`` (pixels, or metres
    with ``space: ground``): one ``carWrongDirection`` event per track.
``pedestrian``
    A person whose anchor stays in the roadway ``polygon`` for ``min_s``: one
    ``pedestrianOnRoad`` event per track. With ``ignore_riders`` a person box mostly over a
    bicycle or motorcycle box is a rider, not a pedestrian.
``crowd``
    Persons in ``polygon`` above ``max_count`` or (with a homography) above ``max_density``
    persons per m², sustained for ``min_s``: one ``crowdRisk`` event; re-armed once the level
    falls below ``rearm_ratio`` of the threshold (hysteresis).
``collision``
    Collision candidate: two tracks (vehicle-vehicle, or vehicle with person or bicycle) that
    approach each other at ``min_closing_speed`` or more, come into contact (boxes overlap or
    touch) and then both stand still within ``stop_within_s``: one ``carAccident`` event per
    pair. Speeds are in box heights per second so the rule needs no homography.

Events follow the Smart Data Model ``Alert``: ``severity`` is one of informational, low,
medium, high, critical; ``category`` is ``traffic`` for road events and ``security`` for
crowds; ``sub_category`` takes the Alert enum value (carStopped, carWrongDirection,
pedestrianOnRoad, crowdRisk, carAccident). Speeding has no enum value; it is reported as
``hazardOnRoad`` with ``kind`` ``speeding`` and the speed in ``value``.

Privacy: rules keep only a short bounded history per track (deques with a ``maxlen``) and
forget tracks not seen for ``forget_s``; outputs carry class names, counts and times, never a
trajectory or anything that identifies someone.
"""

from __future__ import annotations

import abc
import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import shapely
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from cityward.plugins import register
from cityward.vision.detections import BICYCLE, PERSON, VEHICLES, Detections, class_name

F64 = npt.NDArray[np.float64]
Point = tuple[float, float]

REGISTRY: dict[str, type[Rule]] = {}

SEVERITIES = ("informational", "low", "medium", "high", "critical")
MOTORCYCLE = 3


class RuleConfigError(ValueError):
    """A rule's configuration is wrong; the message names the rule and the field."""


# --- outputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Crossing:
    """A track crossed a counting line. ``direction``: ``in`` when it entered the line's
    ``in_side`` (see the ``line`` rule), else ``out``."""

    frame: int
    time_s: float
    class_name: str
    line: str
    direction: str


@dataclass(frozen=True)
class VisionEvent:
    """One incident (fires once per incident), shaped for an SDM ``Alert``."""

    kind: str
    rule: str
    frame: int
    time_s: float
    class_name: str
    severity: str
    category: str
    sub_category: str
    description: str
    box: tuple[float, float, float, float]
    value: float | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity {self.severity!r} is not one of {SEVERITIES}")


# --- geometry ------------------------------------------------------------------------------


def _check_homography(m: list[list[float]]) -> list[list[float]]:
    a = np.asarray(m, np.float64)
    if a.shape != (3, 3):
        raise ValueError(f"a homography is a 3x3 matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("the homography has a non-finite entry")
    if abs(float(np.linalg.det(a))) < 1e-12:
        raise ValueError("the homography is singular")
    return m


def _check_polygon(pts: list[Point]) -> list[Point]:
    if len(pts) < 3:
        raise ValueError("a polygon needs at least 3 points")
    poly = shapely.Polygon(pts)
    if not poly.is_valid or poly.area <= 0:
        raise ValueError("the polygon is not simple (edges cross, or it has no area)")
    return pts


def _check_line(pts: list[Point]) -> list[Point]:
    if len(pts) != 2:
        raise ValueError("a line is exactly 2 points")
    if pts[0] == pts[1]:
        raise ValueError("the line's two points are the same")
    return pts


Homography = Annotated[list[list[float]], AfterValidator(_check_homography)]
PolygonPts = Annotated[list[Point], AfterValidator(_check_polygon)]
LinePts = Annotated[list[Point], AfterValidator(_check_line)]


def map_points(homography: npt.ArrayLike, points: npt.ArrayLike) -> F64:
    """(N, 2) points mapped by a 3x3 homography (image pixels -> ground metres); points the
    homography sends to infinity (beyond the horizon) come out as NaN."""
    h = np.asarray(homography, np.float64)
    p = np.asarray(points, np.float64).reshape(-1, 2)
    ph = np.concatenate([p, np.ones((len(p), 1))], axis=1) @ h.T
    w = ph[:, 2:3]
    ok = np.abs(w) > 1e-12
    out: F64 = np.where(ok, ph[:, :2] / np.where(ok, w, 1.0), np.nan)
    return out


class CameraGeometry(BaseModel):
    """What a camera knows about its view: optionally a homography, image pixels -> ground
    metres (a 3x3 matrix, validated finite and invertible)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    homography: Homography | None = Field(
        default=None, description="3x3 image -> ground (metres) matrix."
    )

    @property
    def has_ground(self) -> bool:
        return self.homography is not None

    def to_ground(self, points: npt.ArrayLike) -> F64:
        """(N, 2) image points in ground metres; raises without a homography."""
        if self.homography is None:
            raise ValueError("this camera has no homography (image -> ground)")
        return map_points(self.homography, points)

    def ground_area(self, polygon: Sequence[Point]) -> float:
        """Area in m² of an image polygon."""
        return float(shapely.Polygon(self.to_ground(polygon)).area)


#: the same thing under its short name
Geometry = CameraGeometry


# --- the plugin family ---------------------------------------------------------------------


class RuleConfig(BaseModel):
    """Settings every rule has."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", max_length=100, description="Name used in outputs.")
    classes: list[int] | None = Field(
        default=None, description="COCO class ids looked at (none: the rule's default)."
    )
    forget_s: float = Field(
        default=5.0, gt=0.0, le=600.0, description="Forget a track unseen for this long."
    )


class Rule(abc.ABC):
    """One analytics rule of one camera. Subclasses set ``name``, ``summary``, ``Config``,
    ``default_classes`` and implement :meth:`_step` (and :meth:`_aggregate` if they have
    one)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[RuleConfig]] = RuleConfig
    default_classes: ClassVar[frozenset[int]] = VEHICLES | {PERSON, BICYCLE}
    needs_homography: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(REGISTRY, cls, "analytics rule")

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        self.config = config
        self.geometry = geometry or CameraGeometry()
        if self.needs_homography and not self.geometry.has_ground:
            raise RuleConfigError(f"rule {self.type!r}: needs a camera homography")
        self.rule_name = config.name or self.type
        self.classes = (
            frozenset(config.classes) if config.classes is not None else self.default_classes
        )
        self._last_seen: dict[int, float] = {}
        self._events = 0

    @property
    def type(self) -> str:
        return type(self).name

    def update(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        """Take the tracker's output for frame number ``frame`` at ``t`` seconds since the
        stream started; return the crossings and events of this frame."""
        tracks = tracks[(tracks.tracker_id >= 0) & np.isin(tracks.class_id, list(self.classes))]
        for tid in tracks.tracker_id.tolist():
            self._last_seen[tid] = t
        gone = [k for k, s in self._last_seen.items() if t - s > self.config.forget_s]
        for tid in gone:
            del self._last_seen[tid]
            self._forget(tid, t)
        out = self._step(frame, t, tracks)
        self._events += sum(isinstance(o, VisionEvent) for o in out)
        return out

    def interval(self) -> dict[str, Any]:
        """The aggregate since the last call (then reset): ``rule``, ``type``, ``events`` and
        the rule's own figures."""
        out: dict[str, Any] = {"rule": self.rule_name, "type": self.type, "events": self._events}
        self._events = 0
        out.update(self._aggregate())
        return out

    @abc.abstractmethod
    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        """This frame's outputs from the rule's tracks (already filtered by class)."""

    def _aggregate(self) -> dict[str, Any]:
        """The rule's interval figures, reset; none by default."""
        return {}

    def _forget(self, tid: int, t: float) -> None:
        """Drop what the rule holds about a track not seen for ``forget_s``."""
        return None

    def _event(
        self,
        kind: str,
        frame: int,
        t: float,
        cls: str,
        severity: str,
        category: str,
        sub: str,
        description: str,
        box: Any,
        value: float | None = None,
    ) -> VisionEvent:
        b = tuple(float(v) for v in box)
        return VisionEvent(
            kind,
            self.rule_name,
            frame,
            t,
            cls,
            severity,
            category,
            sub,
            description,
            (b[0], b[1], b[2], b[3]),
            value,
        )


def _counts(d: Mapping[int, int] | Mapping[str, int]) -> dict[str, int]:
    return {str(k): int(v) for k, v in sorted(d.items()) if v}


class _Polygon:
    """A polygon in image pixels with a vectorised point test."""

    def __init__(self, pts: Sequence[Point]) -> None:
        self.pts = list(pts)
        self.shape = shapely.Polygon(self.pts)
        shapely.prepare(self.shape)

    def contains(self, xy: npt.NDArray[np.floating]) -> npt.NDArray[np.bool_]:
        if len(xy) == 0:
            return np.zeros((0,), np.bool_)
        res: npt.NDArray[np.bool_] = np.asarray(
            shapely.intersects_xy(self.shape, xy[:, 0], xy[:, 1]), np.bool_
        )
        return res


# --- line ----------------------------------------------------------------------------------


class LineConfig(RuleConfig):
    line: LinePts = Field(description="Two points [[x1, y1], [x2, y2]] in image pixels.")
    in_side: Literal["left", "right"] = Field(
        default="right", description="Side (walking p1 -> p2 on the image) entered by 'in'."
    )
    min_distance: float = Field(
        default=8.0, ge=0.0, description="Pixels past the line before the side changes."
    )


class LineRule(Rule):
    name = "line"
    summary = "Counts line crossings by class and direction."
    Config = LineConfig

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        super().__init__(config, geometry)
        assert isinstance(config, LineConfig)
        self.cfg = config
        p1, p2 = (np.asarray(p, np.float64) for p in config.line)
        self._p1 = p1
        self._d = p2 - p1
        self._len = float(np.hypot(*self._d))
        self._side: dict[int, int] = {}
        self._counted: dict[int, set[str]] = {}
        self._counts: dict[str, dict[str, int]] = {"in": {}, "out": {}}

    def _forget(self, tid: int, t: float) -> None:
        self._side.pop(tid, None)
        self._counted.pop(tid, None)

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        out: list[Crossing | VisionEvent] = []
        if not len(tracks):
            return out
        rel = tracks.bottom_center.astype(np.float64) - self._p1
        dist = (self._d[0] * rel[:, 1] - self._d[1] * rel[:, 0]) / self._len  # >0: right
        along = (rel @ self._d) / self._len**2
        in_sign = 1 if self.cfg.in_side == "right" else -1
        for k, tid in enumerate(tracks.tracker_id.tolist()):
            if abs(dist[k]) < max(self.cfg.min_distance, 1e-9) or not 0 <= along[k] <= 1:
                continue  # on the line, or beyond its ends: the side stays as it was
            side = 1 if dist[k] > 0 else -1
            before = self._side.get(tid)
            self._side[tid] = side
            if before is None or before == side:
                continue
            direction = "in" if side == in_sign else "out"
            done = self._counted.setdefault(tid, set())
            if direction in done:
                continue
            done.add(direction)
            cls = class_name(int(tracks.class_id[k]))
            self._counts[direction][cls] = self._counts[direction].get(cls, 0) + 1
            out.append(Crossing(frame, t, cls, self.rule_name, direction))
        return out

    def _aggregate(self) -> dict[str, Any]:
        c_in, c_out = _counts(self._counts["in"]), _counts(self._counts["out"])
        self._counts = {"in": {}, "out": {}}
        return {"in": c_in, "out": c_out, "total": sum(c_in.values()) + sum(c_out.values())}


# --- zone ----------------------------------------------------------------------------------


class ZoneConfig(RuleConfig):
    polygon: PolygonPts = Field(description="The zone, image pixels.")
    exit_grace_s: float = Field(
        default=1.0, ge=0.0, description="Seconds outside before a track has left."
    )


@dataclass
class _Stay:
    cls: str
    entered: float
    last_inside: float


class ZoneRule(Rule):
    name = "zone"
    summary = "Polygon occupancy (now, peak, mean) and dwell time by class."
    Config = ZoneConfig

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        super().__init__(config, geometry)
        assert isinstance(config, ZoneConfig)
        self.cfg = config
        self.poly = _Polygon(config.polygon)
        self._stays: dict[int, _Stay] = {}
        self._now: dict[str, int] = {}
        self._last_t: float | None = None
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._peak = sum(self._now.values())
        self._area = 0.0  # occupancy integrated over time
        self._span = 0.0
        self._dwell: dict[str, list[float]] = {}
        self._entries: dict[str, int] = {}

    def _leave(self, tid: int) -> None:
        stay = self._stays.pop(tid)
        self._dwell.setdefault(stay.cls, []).append(stay.last_inside - stay.entered)

    def _forget(self, tid: int, t: float) -> None:
        if tid in self._stays:
            self._leave(tid)

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        if self._last_t is not None and t > self._last_t:
            dt = t - self._last_t
            self._area += sum(self._now.values()) * dt
            self._span += dt
        self._last_t = t
        inside = self.poly.contains(tracks.bottom_center)
        now: dict[str, int] = {}
        for k, tid in enumerate(tracks.tracker_id.tolist()):
            if not inside[k]:
                continue
            cls = class_name(int(tracks.class_id[k]))
            now[cls] = now.get(cls, 0) + 1
            stay = self._stays.get(tid)
            if stay is None:
                self._stays[tid] = _Stay(cls, t, t)
                self._entries[cls] = self._entries.get(cls, 0) + 1
            else:
                stay.last_inside = t
        for tid in [k for k, s in self._stays.items() if t - s.last_inside > self.cfg.exit_grace_s]:
            self._leave(tid)
        self._now = now
        self._peak = max(self._peak, sum(now.values()))
        return []

    def _aggregate(self) -> dict[str, Any]:
        total = sum(self._now.values())
        mean = self._area / self._span if self._span > 0 else float(total)
        out = {
            "occupancy": _counts(self._now),
            "occupancy_total": total,
            "peak": self._peak,
            "mean_occupancy": mean,
            "entries": _counts(self._entries),
            "departures": {c: len(v) for c, v in sorted(self._dwell.items())},
            "mean_dwell_s": {c: float(np.mean(v)) for c, v in sorted(self._dwell.items())},
        }
        self._reset_interval()
        return out


# --- speed ---------------------------------------------------------------------------------


class SpeedConfig(RuleConfig):
    window_s: float = Field(default=1.0, gt=0.0, le=10.0, description="Speed measured over.")
    polygon: PolygonPts | None = Field(default=None, description="Where speeds are measured.")
    speed_limit_kmh: float | None = Field(default=None, gt=0.0, description="Event above.")
    min_over_s: float = Field(
        default=1.0, ge=0.0, description="Seconds over the limit before the event."
    )


class SpeedRule(Rule):
    name = "speed"
    summary = "Per-track ground speed; interval mean and p85 by class; speeding events."
    Config = SpeedConfig
    default_classes = VEHICLES | {BICYCLE}
    needs_homography = True

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        super().__init__(config, geometry)
        assert isinstance(config, SpeedConfig)
        self.cfg = config
        self.poly = _Polygon(config.polygon) if config.polygon else None
        self._hist: dict[int, deque[tuple[float, float, float]]] = {}
        self._over_since: dict[int, float] = {}
        self._fired: set[int] = set()
        self._sum: dict[int, tuple[str, float, int]] = {}  # this interval: class, sum, n

    def _forget(self, tid: int, t: float) -> None:
        self._hist.pop(tid, None)
        self._over_since.pop(tid, None)
        self._fired.discard(tid)

    def speed_kmh(self, tid: int) -> float | None:
        """The track's speed over the window, km/h (None until the window is half full)."""
        h = self._hist.get(tid)
        if not h or len(h) < 2:
            return None
        t0, x0, y0 = h[0]
        t1, x1, y1 = h[-1]
        if t1 - t0 < self.cfg.window_s / 2:
            return None
        return math.hypot(x1 - x0, y1 - y0) / (t1 - t0) * 3.6

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        out: list[Crossing | VisionEvent] = []
        anchors = tracks.bottom_center
        ground = self.geometry.to_ground(anchors) if len(tracks) else np.zeros((0, 2))
        inside = self.poly.contains(anchors) if self.poly else np.ones(len(tracks), np.bool_)
        for k, tid in enumerate(tracks.tracker_id.tolist()):
            gx, gy = float(ground[k, 0]), float(ground[k, 1])
            if not inside[k] or not (math.isfinite(gx) and math.isfinite(gy)):
                self._hist.pop(tid, None)
                self._over_since.pop(tid, None)
                continue
            h = self._hist.setdefault(tid, deque(maxlen=64))
            h.append((t, gx, gy))
            while len(h) > 2 and t - h[1][0] >= self.cfg.window_s:
                h.popleft()
            v = self.speed_kmh(tid)
            if v is None:
                continue
            cls = class_name(int(tracks.class_id[k]))
            _, s, n = self._sum.get(tid, (cls, 0.0, 0))
            self._sum[tid] = (cls, s + v, n + 1)
            limit = self.cfg.speed_limit_kmh
            if limit is None or tid in self._fired:
                continue
            if v <= limit:
                self._over_since.pop(tid, None)
                continue
            since = self._over_since.setdefault(tid, t)
            if t - since >= self.cfg.min_over_s:
                self._fired.add(tid)
                severity = "high" if v > 1.5 * limit else "medium"
                out.append(
                    self._event(
                        "speeding", frame, t, cls, severity, "traffic", "hazardOnRoad",
                        f"{cls} at {v:.0f} km/h where the limit is {limit:.0f} km/h",
                        tracks.xyxy[k], v,
                    )
                )  # fmt: skip
        return out

    def _aggregate(self) -> dict[str, Any]:
        per: dict[str, list[float]] = {}
        for cls, s, n in self._sum.values():
            per.setdefault(cls, []).append(s / n)
        self._sum = {}
        return {
            "tracks": {c: len(v) for c, v in sorted(per.items())},
            "mean_speed_kmh": {c: float(np.mean(v)) for c, v in sorted(per.items())},
            "p85_speed_kmh": {c: float(np.percentile(v, 85)) for c, v in sorted(per.items())},
        }


# --- stopped -------------------------------------------------------------------------------


class StoppedConfig(RuleConfig):
    polygon: PolygonPts = Field(description="The no-stopping zone, image pixels.")
    min_stopped_s: float = Field(default=30.0, gt=0.0, description="Seconds still before.")
    max_move: float = Field(
        default=0.2, gt=0.0, description="Movement still counted as stopped, box heights."
    )


class StoppedRule(Rule):
    name = "stopped"
    summary = "A vehicle stopped too long in a no-stopping zone (once per track)."
    Config = StoppedConfig
    default_classes = VEHICLES

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        super().__init__(config, geometry)
        assert isinstance(config, StoppedConfig)
        self.cfg = config
        self.poly = _Polygon(config.polygon)
        self._still: dict[int, tuple[float, float, float]] = {}  # since, x, y
        self._fired: set[int] = set()

    def _forget(self, tid: int, t: float) -> None:
        self._still.pop(tid, None)
        self._fired.discard(tid)

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        out: list[Crossing | VisionEvent] = []
        anchors = tracks.bottom_center
        inside = self.poly.contains(anchors)
        for k, tid in enumerate(tracks.tracker_id.tolist()):
            if tid in self._fired:
                continue
            if not inside[k]:
                self._still.pop(tid, None)
                continue
            x, y = float(anchors[k, 0]), float(anchors[k, 1])
            height = float(tracks.xyxy[k, 3] - tracks.xyxy[k, 1])
            since, sx, sy = self._still.get(tid, (t, x, y))
            if math.hypot(x - sx, y - sy) > self.cfg.max_move * max(height, 1.0):
                since, sx, sy = t, x, y
            self._still[tid] = (since, sx, sy)
            if t - since >= self.cfg.min_stopped_s:
                self._fired.add(tid)
                cls = class_name(int(tracks.class_id[k]))
                out.append(
                    self._event(
                        "stopped", frame, t, cls, "medium", "traffic", "carStopped",
                        f"{cls} stopped {t - since:.0f} s in a no-stopping zone",
                        tracks.xyxy[k], t - since,
                    )
                )  # fmt: skip
        return out


# --- wrong way -----------------------------------------------------------------------------


class WrongWayConfig(RuleConfig):
    polygon: PolygonPts = Field(description="The one-way area, image pixels.")
    direction: Point = Field(description="Allowed direction of travel (a vector).")
    space: Literal["image", "ground"] = Field(
        default="image", description="Coordinates of direction and min_distance."
    )
    min_distance: float = Field(
        default=60.0, gt=0.0, description="Distance against the direction (px or m)."
    )
    max_angle_deg: float = Field(
        default=60.0, gt=0.0, lt=90.0, description="Largest angle to the opposite direction."
    )

    @model_validator(mode="after")
    def _nonzero(self) -> WrongWayConfig:
        if math.hypot(*self.direction) == 0:
            raise ValueError("direction must not be the zero vector")
        return self


class WrongWayRule(Rule):
    name = "wrong-way"
    summary = "A vehicle moving against the allowed direction (once per track)."
    Config = WrongWayConfig
    default_classes = VEHICLES

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        assert isinstance(config, WrongWayConfig)
        if config.space == "ground" and not (geometry and geometry.has_ground):
            raise RuleConfigError(
                f"rule {config.name or self.name!r}: space 'ground' needs a camera homography"
            )
        super().__init__(config, geometry)
        self.cfg = config
        self.poly = _Polygon(config.polygon)
        d = np.asarray(config.direction, np.float64)
        self._u = d / np.hypot(*d)
        self._cos = math.cos(math.radians(config.max_angle_deg))
        self._entry: dict[int, tuple[float, float]] = {}
        self._fired: set[int] = set()

    def _forget(self, tid: int, t: float) -> None:
        self._entry.pop(tid, None)
        self._fired.discard(tid)

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        out: list[Crossing | VisionEvent] = []
        if not len(tracks):
            return out
        anchors = tracks.bottom_center
        inside = self.poly.contains(anchors)
        pts = (
            self.geometry.to_ground(anchors)
            if self.cfg.space == "ground"
            else anchors.astype(np.float64)
        )
        for k, tid in enumerate(tracks.tracker_id.tolist()):
            if tid in self._fired:
                continue
            if not inside[k] or not np.isfinite(pts[k]).all():
                self._entry.pop(tid, None)
                continue
            ex, ey = self._entry.setdefault(tid, (float(pts[k, 0]), float(pts[k, 1])))
            disp = pts[k] - np.array([ex, ey])
            against = -float(disp @ self._u)
            norm = float(np.hypot(*disp))
            if against >= self.cfg.min_distance and against >= self._cos * norm:
                self._fired.add(tid)
                cls = class_name(int(tracks.class_id[k]))
                unit = "m" if self.cfg.space == "ground" else "px"
                out.append(
                    self._event(
                        "wrong_way", frame, t, cls, "high", "traffic", "carWrongDirection",
                        f"{cls} moving against the traffic direction ({against:.0f} {unit})",
                        tracks.xyxy[k], against,
                    )
                )  # fmt: skip
        return out


# --- pedestrian ----------------------------------------------------------------------------


class PedestrianConfig(RuleConfig):
    polygon: PolygonPts = Field(description="The roadway, image pixels.")
    min_s: float = Field(default=2.0, ge=0.0, description="Seconds on the roadway before.")
    ignore_riders: bool = Field(
        default=True, description="A person over a bicycle/motorcycle box is a rider."
    )


class PedestrianRule(Rule):
    name = "pedestrian"
    summary = "A person on the roadway for a while (once per track)."
    Config = PedestrianConfig
    default_classes = frozenset({PERSON})

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        super().__init__(config, geometry)
        assert isinstance(config, PedestrianConfig)
        self.cfg = config
        self.poly = _Polygon(config.polygon)
        self._since: dict[int, float] = {}
        self._fired: set[int] = set()
        self._riders: npt.NDArray[np.float32] = np.zeros((0, 4), np.float32)

    def update(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        # the rider test needs the two-wheelers the class filter would take away
        self._riders = tracks.with_classes({BICYCLE, MOTORCYCLE}).xyxy
        return super().update(frame, t, tracks)

    def _forget(self, tid: int, t: float) -> None:
        self._since.pop(tid, None)
        self._fired.discard(tid)

    def _is_rider(self, box: npt.NDArray[np.float32]) -> bool:
        if not self.cfg.ignore_riders or not len(self._riders):
            return False
        r = self._riders
        iw = np.clip(np.minimum(box[2], r[:, 2]) - np.maximum(box[0], r[:, 0]), 0, None)
        ih = np.clip(np.minimum(box[3], r[:, 3]) - np.maximum(box[1], r[:, 1]), 0, None)
        area_r = np.maximum((r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1]), 1e-9)
        return bool(((iw * ih) / area_r >= 0.3).any())  # covers much of a two-wheeler

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        out: list[Crossing | VisionEvent] = []
        inside = self.poly.contains(tracks.bottom_center)
        for k, tid in enumerate(tracks.tracker_id.tolist()):
            if tid in self._fired:
                continue
            if not inside[k] or self._is_rider(tracks.xyxy[k]):
                self._since.pop(tid, None)
                continue
            since = self._since.setdefault(tid, t)
            if t - since >= self.cfg.min_s:
                self._fired.add(tid)
                cls = class_name(int(tracks.class_id[k]))
                out.append(
                    self._event(
                        "pedestrian_on_road", frame, t, cls, "medium", "traffic",
                        "pedestrianOnRoad", f"{cls} on the roadway for {t - since:.0f} s",
                        tracks.xyxy[k], t - since,
                    )
                )  # fmt: skip
        return out


# --- crowd ---------------------------------------------------------------------------------


class CrowdConfig(RuleConfig):
    polygon: PolygonPts = Field(description="The watched area, image pixels.")
    max_count: int | None = Field(default=None, ge=1, description="Persons above which.")
    max_density: float | None = Field(
        default=None, gt=0.0, description="Persons per m² above which (needs a homography)."
    )
    min_s: float = Field(default=10.0, ge=0.0, description="Seconds sustained before.")
    rearm_ratio: float = Field(
        default=0.8, gt=0.0, le=1.0, description="Re-armed below this share of the threshold."
    )

    @model_validator(mode="after")
    def _a_threshold(self) -> CrowdConfig:
        if self.max_count is None and self.max_density is None:
            raise ValueError("set max_count or max_density (or both)")
        return self


class CrowdRule(Rule):
    name = "crowd"
    summary = "Persons in an area above a count or density, sustained (re-arms below)."
    Config = CrowdConfig
    default_classes = frozenset({PERSON})

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        assert isinstance(config, CrowdConfig)
        if config.max_density is not None and not (geometry and geometry.has_ground):
            raise RuleConfigError(
                f"rule {config.name or self.name!r}: max_density needs a camera homography"
            )
        super().__init__(config, geometry)
        self.cfg = config
        self.poly = _Polygon(config.polygon)
        self.area_m2 = self.geometry.ground_area(config.polygon) if self.geometry.has_ground else 0
        self._above_since: float | None = None
        self._armed = True
        self._count = 0
        self._peak = 0
        self._sum = 0.0
        self._n = 0

    def _level(self, count: int) -> float:
        """The count as a share of the nearest threshold (1.0 = at the threshold)."""
        shares = []
        if self.cfg.max_count is not None:
            shares.append(count / self.cfg.max_count)
        if self.cfg.max_density is not None and self.area_m2 > 0:
            shares.append(count / self.area_m2 / self.cfg.max_density)
        return max(shares) if shares else 0.0

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        inside = self.poly.contains(tracks.bottom_center)
        people = tracks[inside]
        count = len(people)
        self._count = count
        self._peak = max(self._peak, count)
        self._sum += count
        self._n += 1
        level = self._level(count)
        if level < self.cfg.rearm_ratio:
            self._armed = True
        if level <= 1.0:
            self._above_since = None
            return []
        if self._above_since is None:
            self._above_since = t
        if not self._armed or t - self._above_since < self.cfg.min_s:
            return []
        self._armed = False
        box = (
            float(people.xyxy[:, 0].min()),
            float(people.xyxy[:, 1].min()),
            float(people.xyxy[:, 2].max()),
            float(people.xyxy[:, 3].max()),
        )
        density = count / self.area_m2 if self.area_m2 > 0 else None
        what = f"{count} persons" + (f" ({density:.2f}/m²)" if density is not None else "")
        return [
            self._event(
                "crowd", frame, t, "person", "high", "security", "crowdRisk",
                f"{what} for {t - self._above_since:.0f} s", box,
                density if self.cfg.max_density is not None else float(count),
            )
        ]  # fmt: skip

    def _aggregate(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": self._count,
            "peak": self._peak,
            "mean_count": self._sum / self._n if self._n else float(self._count),
        }
        if self.area_m2 > 0:
            out["density_per_m2"] = self._count / self.area_m2
            out["peak_density_per_m2"] = self._peak / self.area_m2
        self._peak, self._sum, self._n = self._count, 0.0, 0
        return out


# --- collision -----------------------------------------------------------------------------


class CollisionConfig(RuleConfig):
    min_closing_speed: float = Field(
        default=1.0, gt=0.0, description="Approach speed before contact, box heights/s."
    )
    stop_within_s: float = Field(
        default=3.0, gt=0.0, le=30.0, description="Both still within this after contact."
    )
    stopped_speed: float = Field(
        default=0.15, gt=0.0, description="Speed under which a track is still, box heights/s."
    )
    still_for_s: float = Field(default=1.0, gt=0.0, description="Seconds still to count.")
    contact_gap: float = Field(
        default=0.1, ge=0.0, description="Boxes closer than this (box heights) touch."
    )


class CollisionRule(Rule):
    name = "collision"
    summary = "Collision candidate: two tracks converge at speed, touch, then both stop."
    Config = CollisionConfig

    HISTORY = 64  # samples per track, at most

    def __init__(self, config: RuleConfig, geometry: CameraGeometry | None = None) -> None:
        super().__init__(config, geometry)
        assert isinstance(config, CollisionConfig)
        self.cfg = config
        # per track: (t, cx, cy, box height), a few seconds at most
        self._hist: dict[int, deque[tuple[float, float, float, float]]] = {}
        self._contact: dict[tuple[int, int], float] = {}  # pair -> time of contact
        self._fired: set[tuple[int, int]] = set()
        self._keep_s = max(config.stop_within_s, config.still_for_s) + 2.0

    def _forget(self, tid: int, t: float) -> None:
        self._hist.pop(tid, None)
        for pair in [p for p in self._contact if tid in p]:
            del self._contact[pair]
        self._fired = {p for p in self._fired if tid not in p}

    def _position(self, tid: int, at: float) -> tuple[float, float, float] | None:
        """Centre and height of a track at the last sample not after ``at``."""
        best = None
        for s in self._hist.get(tid, ()):
            if s[0] <= at:
                best = s
        return None if best is None else (best[1], best[2], best[3])

    def _speed(self, tid: int, over: float, end: float) -> float | None:
        """Mean speed over [end - over, end], box heights per second."""
        h = [s for s in self._hist.get(tid, ()) if end - over - 1e-9 <= s[0] <= end]
        if len(h) < 2 or h[-1][0] - h[0][0] < over / 2:
            return None
        (t0, x0, y0, h0), (t1, x1, y1, _) = h[0], h[-1]
        return math.hypot(x1 - x0, y1 - y0) / (t1 - t0) / max(h0, 1.0)

    def _closing_speed(self, a: int, b: int, t: float) -> float:
        """How fast the two centres got closer over the second before ``t``, box heights/s."""
        ha, hb = self._hist.get(a), self._hist.get(b)
        if not ha or not hb:
            return 0.0
        t0 = max(ha[0][0], hb[0][0], t - 1.0)
        p0a, p0b = self._position(a, t0), self._position(b, t0)
        p1a, p1b = self._position(a, t), self._position(b, t)
        if not (p0a and p0b and p1a and p1b) or t <= t0:
            return 0.0
        d0 = math.hypot(p0a[0] - p0b[0], p0a[1] - p0b[1])
        d1 = math.hypot(p1a[0] - p1b[0], p1a[1] - p1b[1])
        scale = max((p1a[2] + p1b[2]) / 2, 1.0)
        return (d0 - d1) / (t - t0) / scale

    @staticmethod
    def _pair_ok(ca: int, cb: int) -> bool:
        if ca in VEHICLES and cb in VEHICLES:
            return True
        return (ca in VEHICLES and cb in (PERSON, BICYCLE)) or (
            cb in VEHICLES and ca in (PERSON, BICYCLE)
        )

    def _step(self, frame: int, t: float, tracks: Detections) -> list[Crossing | VisionEvent]:
        out: list[Crossing | VisionEvent] = []
        cfg = self.cfg
        ids = tracks.tracker_id.tolist()
        centers = tracks.center
        for k, tid in enumerate(ids):
            h = self._hist.setdefault(tid, deque(maxlen=self.HISTORY))
            height = float(tracks.xyxy[k, 3] - tracks.xyxy[k, 1])
            h.append((t, float(centers[k, 0]), float(centers[k, 1]), height))
            while h and t - h[0][0] > self._keep_s:
                h.popleft()
        # contacts: boxes that overlap or nearly touch (gap scaled by box height)
        xy = tracks.xyxy.astype(np.float64)
        n = len(ids)
        for i in range(n):
            for j in range(i + 1, n):
                ci, cj = int(tracks.class_id[i]), int(tracks.class_id[j])
                if not self._pair_ok(ci, cj):
                    continue
                pair = (min(ids[i], ids[j]), max(ids[i], ids[j]))
                if pair in self._fired or pair in self._contact:
                    continue
                gap = cfg.contact_gap * min(xy[i, 3] - xy[i, 1], xy[j, 3] - xy[j, 1])
                dx = max(xy[i, 0], xy[j, 0]) - min(xy[i, 2], xy[j, 2])
                dy = max(xy[i, 1], xy[j, 1]) - min(xy[i, 3], xy[j, 3])
                if dx > gap or dy > gap:
                    continue
                if self._closing_speed(ids[i], ids[j], t) >= cfg.min_closing_speed:
                    self._contact[pair] = t
        # after contact: both still for still_for_s, within stop_within_s
        index = {tid: k for k, tid in enumerate(ids)}
        for pair, since in list(self._contact.items()):
            if t - since > cfg.stop_within_s + cfg.still_for_s:
                del self._contact[pair]
                continue
            a, b = pair
            if a not in index or b not in index or t - since < cfg.still_for_s:
                continue
            va = self._speed(a, cfg.still_for_s, t)
            vb = self._speed(b, cfg.still_for_s, t)
            if va is None or vb is None or va > cfg.stopped_speed or vb > cfg.stopped_speed:
                continue
            del self._contact[pair]
            self._fired.add(pair)
            ka, kb = index[a], index[b]
            names = sorted((class_name(int(tracks.class_id[ka])),
                            class_name(int(tracks.class_id[kb]))))  # fmt: skip
            box = (
                float(min(xy[ka, 0], xy[kb, 0])),
                float(min(xy[ka, 1], xy[kb, 1])),
                float(max(xy[ka, 2], xy[kb, 2])),
                float(max(xy[ka, 3], xy[kb, 3])),
            )
            out.append(
                self._event(
                    "collision", frame, t, "+".join(names), "high", "traffic", "carAccident",
                    f"possible collision: {names[0]} and {names[1]} met at speed and stopped",
                    box, t - since,
                )
            )  # fmt: skip
        return out


# --- building rules ------------------------------------------------------------------------


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(rule)"
        parts.append(f"field {loc!r}: {e['msg']}")
    return "; ".join(parts)


def build_rules(
    configs: Sequence[Mapping[str, Any]], geometry: CameraGeometry | None = None
) -> list[Rule]:
    """Rules from plain mappings, each ``{"type": <plugin name>, <settings>...}``, validated.
    Raises :class:`RuleConfigError` naming the rule (index, type, name) and the field."""
    rules: list[Rule] = []
    names: set[str] = set()
    for i, raw in enumerate(configs):
        settings = dict(raw)
        kind = settings.pop("type", None)
        label = f"rule {i}" + (f" ({settings['name']!r})" if settings.get("name") else "")
        if kind is None:
            raise RuleConfigError(f"{label}: field 'type' is missing; one of {sorted(REGISTRY)}")
        cls = REGISTRY.get(str(kind))
        if cls is None:
            raise RuleConfigError(
                f"{label}: field 'type': no rule named {kind!r}; one of {sorted(REGISTRY)}"
            )
        label = f"rule {i} ({kind}" + (f" {settings['name']!r})" if settings.get("name") else ")")
        try:
            config = cls.Config.model_validate(settings)
        except ValidationError as e:
            raise RuleConfigError(f"{label}: {_describe(e)}") from None
        try:
            rule = cls(config, geometry)
        except RuleConfigError as e:
            raise RuleConfigError(f"{label}: {e}") from None
        if rule.rule_name in names:
            raise RuleConfigError(f"{label}: field 'name': {rule.rule_name!r} is used twice")
        names.add(rule.rule_name)
        rules.append(rule)
    return rules
