"""One camera's pipeline: frame -> motion gate -> detector -> tracker -> anonymizer ->
analytics, each stage a single method on one :class:`Detections`.

The raw frame goes into :meth:`CameraPipeline.process` and never comes out: what leaves is the
tracks (in worker memory only), the crossings and events of the analytics, and, when a frame
has to be encoded (a snapshot for an alert, or every frame when an annotated video or stream
is wanted), the *anonymized* frame. The anonymizer runs on exactly those frames, so a camera
that only counts pays nothing for it.

What the camera's settings may narrow or slow down is the analytics only, never the hiding:

* the anonymizer gets the detector's privacy detections (persons and vehicles at the privacy
  floor, :meth:`~cityward.vision.detectors.ObjectDetector.detect_split`), not the ones
  ``detector_config`` (``classes``, ``score_threshold``) leaves to the analytics;
* the motion gate's settings decide how often the detector runs on frames that are only
  counted. A frame that is encoded is anonymized with boxes found on that very frame, or, on a
  pipeline that anonymizes every frame, with those of a frame at most
  :data:`PRIVACY_MAX_AGE_S` earlier that a gate at least as sensitive as the default one
  (:meth:`~cityward.vision.settings.MotionSettings.for_privacy`) saw nothing move since.
  Otherwise the detectors run for it (an alert's snapshot of a still scene: one extra
  detection per alert).

People and vehicles are looked for in every orientation on a frame that is encoded: the
object detector runs on it turned by 90, 180 and 270 degrees as well (:func:`turned_objects`),
because it finds few people upside down or on their side (a camera mounted upside down or
sideways, a person lying on the ground), and the anonymizer's head backstop is only as good as
the person boxes it gets. The vehicles of those runs tell the anonymizer which end of a box is
the bumper: it draws their plate bands at the bottom of the box in the turn the vehicle was
found in (the bottom of the frame's own box is the roof upside down, a side sideways). This is
privacy cost, timed as part of the "anonymize" stage; a frame that is only counted never pays
it.

Every stage is timed (:class:`StageClock`): ``bench/vision.py`` and the live status line report
ms per stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cityward.vision.analytics import CameraGeometry, Crossing, Rule, VisionEvent, build_rules
from cityward.vision.anonymize import Anonymizer, AnonymizerConfig, Turned
from cityward.vision.detections import Detections
from cityward.vision.detectors import REGISTRY as DETECTORS
from cityward.vision.detectors import ObjectDetector
from cityward.vision.faces import turn
from cityward.vision.motion import MotionGate
from cityward.vision.settings import CameraSettings, MotionSettings
from cityward.vision.source import Frame, Image
from cityward.vision.tracker import ByteTracker, TrackerConfig

STAGES = ("decode", "motion", "detect", "track", "anonymize", "analytics", "emit")
#: an encoded frame is never anonymized with object boxes older than this (s): the default
#: gate's ``max_skip_s``, the staleness its measurement (no plate read, no face found) allowed
PRIVACY_MAX_AGE_S = MotionSettings().max_skip_s


#: the quarter turns (degrees clockwise) of a frame to be encoded on which the object detector
#: also looks for people and vehicles. YOLOX-nano found a person upright in all 35 frames of
#: face-demographics-walking.gif and in none of them turned by 90, 180 or 270 degrees; on
#: one-by-one-person-detection.mp4 (every 29th frame) in 37 of 49 upright, 19, 5 and 22 turned
PRIVACY_TURNS = (90, 180, 270)


def turned_objects(
    detector: ObjectDetector, image: Image, turns: Sequence[int] = PRIVACY_TURNS
) -> list[Turned]:
    """The people and vehicles the detector finds (at its privacy floor) on ``image`` turned
    clockwise by each of ``turns``, per turn, in the turned image's pixels (untracked): the
    anonymizer turns them back, a vehicle's plate band drawn at its bottom in that turn."""
    found: list[Turned] = []
    for d in turns:
        # detect_split's privacy half, without going through detect(): a turned frame is
        # never the frame's "detection" (the analytics and anyone watching detect() see none)
        tensor, meta = detector.preprocess(turn(image, d))
        _, dets = detector.postprocess_split(detector.infer(tensor), meta)
        if len(dets):
            found.append(Turned(d, dets))
    return found


class PipelineConfigError(ValueError):
    """A camera's detector, tracker, anonymizer or rule settings are invalid."""


@dataclass
class StageClock:
    """Seconds spent per stage and how many times each ran."""

    total: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 0))

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        self.total[stage] = self.total.get(stage, 0.0) + seconds
        self.count[stage] = self.count.get(stage, 0) + 1

    def ms_per_frame(self, frames: int) -> dict[str, float]:
        """Milliseconds per analysed frame, per stage (a stage that ran on fewer frames, like
        the detector behind the motion gate, is averaged over all of them)."""
        return {s: 1000.0 * v / max(frames, 1) for s, v in self.total.items()}

    def merge(self, other: StageClock) -> None:
        for s, v in other.total.items():
            self.total[s] = self.total.get(s, 0.0) + v
            self.count[s] = self.count.get(s, 0) + other.count.get(s, 0)


@dataclass
class FrameResult:
    """What one analysed frame gave. ``anonymized`` is None unless the frame is to be
    encoded; the raw image is not here."""

    index: int
    t: float
    detected: bool
    tracks: Detections
    crossings: list[Crossing]
    events: list[VisionEvent]
    anonymized: Image | None = None
    wall: float = 0.0  # time.time() when the frame was read


def _build(what: str, camera: str, factory: Any, values: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    try:
        return factory(**values)
    except ValidationError as exc:
        errs = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise PipelineConfigError(f"camera {camera}: {what}: {errs}") from exc


def make_detector(
    name: str, values: dict[str, Any], models_dir: Path | str | None, camera: str = "?"
) -> ObjectDetector:
    cls = DETECTORS.get(name)
    if cls is None:
        raise PipelineConfigError(
            f"camera {camera}: detector {name!r} is unknown (known: {', '.join(sorted(DETECTORS))})"
        )
    config = _build(f"detector {name}", camera, cls.Config, values)
    return cls(config, models_dir)


class CameraPipeline:
    """The stages of one camera. ``detector``: share one across cameras (an ONNX Runtime
    session is safe to run from several threads); built from the camera's settings when None.
    ``anonymize_all``: anonymize every analysed frame (an annotated output or a stream), not
    only those an alert needs; its motion gate is then at least as sensitive as the default
    one (every frame it calls still is anonymized with the boxes of an earlier frame)."""

    def __init__(
        self,
        camera: CameraSettings,
        models_dir: Path | str | None = None,
        *,
        detector: ObjectDetector | None = None,
        anonymize_all: bool = False,
    ) -> None:
        self.camera = camera
        self.detector = detector or make_detector(
            camera.detector, camera.detector_config, models_dir, camera.id
        )
        self.tracker = ByteTracker(_build("tracker", camera.id, TrackerConfig, camera.tracker))
        try:
            self.anonymizer = Anonymizer(
                _build("anonymizer", camera.id, AnonymizerConfig, camera.anonymizer), models_dir
            )
        except ValueError as exc:  # an unknown face detector: a setting, named as one
            raise PipelineConfigError(f"camera {camera.id}: anonymizer: {exc}") from exc
        try:
            self.rules: list[Rule] = build_rules(
                camera.rules, geometry=CameraGeometry(homography=camera.homography)
            )
        except ValueError as exc:
            raise PipelineConfigError(f"camera {camera.id}: {exc}") from exc
        self.gate = MotionGate(camera.motion.for_privacy() if anonymize_all else camera.motion)
        self.anonymize_all = anonymize_all
        self.clock = StageClock()
        self.frames = 0
        self.detections_run = 0  # frames the gate let through (detected and tracked)
        self.privacy_detections = 0  # extra detections for a frame to be encoded
        self._tracks = Detections.empty()
        # the privacy detections (persons, vehicles) of the last detection, and its time
        self._dets = Detections.empty()
        self._dets_t: float | None = None
        # the people and vehicles found on the turned copies of the frame ``_dets`` come from
        self._turned: list[Turned] = []
        self._anonymized = False  # whether the previous frame was anonymized

    def process(self, frame: Frame, *, want_image: bool = False) -> FrameResult:
        """Run one frame through every stage. ``want_image``: return the anonymized frame
        whatever the analytics found."""
        clock = self.clock
        self.frames += 1
        with clock.timed("motion"):
            moving = self.gate.moving(frame.image, frame.t)
        detected = False
        if moving:
            with clock.timed("detect"):
                dets, self._dets = self.detector.detect_split(frame.image)
            with clock.timed("track"):
                self._tracks = self.tracker.update(dets, frame.t)
            self._dets_t = frame.t
            self.detections_run += 1
            detected = True
        tracks = self._tracks
        out: list[Crossing | VisionEvent] = []
        with clock.timed("analytics"):
            for rule in self.rules:
                out.extend(rule.update(frame.index, frame.t, tracks))
        crossings = [o for o in out if isinstance(o, Crossing)]
        events = [o for o in out if isinstance(o, VisionEvent)]
        anonymized: Image | None = None
        if self.anonymize_all or want_image or events:
            fresh = detected
            age = None if self._dets_t is None else frame.t - self._dets_t
            if not fresh and (
                not self.anonymize_all or age is None or not 0.0 <= age <= PRIVACY_MAX_AGE_S
            ):
                # the gate held the detector back, but the boxes it would reuse come from a
                # frame the gate compared at the camera's (possibly insensitive) settings, or
                # are too old: the objects could have moved, their plates with them. Detect for
                # the anonymizer alone (the analytics of this frame are done)
                with clock.timed("detect"):
                    _, self._dets = self.detector.detect_split(frame.image)
                self._dets_t = frame.t
                self.privacy_detections += 1
                fresh = True
            with clock.timed("anonymize"):
                if fresh:  # else: the frame the reused detections were found on
                    self._turned = turned_objects(self.detector, frame.image)
                # the anonymizer may work in place: the raw frame is not used after this
                # a still frame right after an anonymized one shows the faces found there:
                # they are held rather than searched for again (any other frame, and any frame
                # detected again above, is searched)
                # around the tracks and every detection as well: the tracker reports only
                # confirmed tracks matched now, so a new object's first frames (every object
                # of the first frame), a box scored below the tracker's new-track threshold
                # and a track missed this frame would keep their heads and plates (on a
                # still frame the gate skipped, the last detections are where they were)
                anonymized = self.anonymizer.apply(
                    frame.image,
                    Detections.merge([tracks, self._dets]),
                    frame.t,
                    detect_faces=fresh or not self._anonymized,
                    turned=self._turned,
                )
            self._anonymized = True
        else:
            self._anonymized = False
            # hold the face boxes' timers and person/vehicle positions even when no image is
            # wanted now, so that the next snapshot is anonymized with the recent past too
            self.anonymizer.observe(tracks, frame.t)
        return FrameResult(frame.index, frame.t, detected, tracks, crossings, events, anonymized)

    def intervals(self) -> dict[str, dict[str, Any]]:
        """Per rule name: the aggregate since the last call (and reset it)."""
        return {rule.rule_name: rule.interval() for rule in self.rules}


def draw(
    image: Image,
    tracks: Detections,
    lines: Sequence[tuple[str, tuple[float, float, float, float]]] = (),
    counts: str = "",
) -> Image:
    """Boxes, track numbers, counting lines and a count caption on an (anonymized) frame."""
    import cv2

    from cityward.vision.detections import class_name

    out = image
    for (x1, y1, x2, y2), cls, tid in zip(
        tracks.xyxy.astype(int), tracks.class_id, tracks.tracker_id, strict=True
    ):
        colour = (0, 200, 255) if cls == 0 else (255, 160, 0)
        cv2.rectangle(out, (int(x1), int(y1)), (int(x2), int(y2)), colour, 2)
        label = f"{class_name(int(cls))} {int(tid)}"
        cv2.putText(out, label, (int(x1), max(12, int(y1) - 4)), 0, 0.45, colour, 1, cv2.LINE_AA)
    for name, (ax, ay, bx, by) in lines:
        cv2.line(out, (int(ax), int(ay)), (int(bx), int(by)), (0, 0, 255), 2)
        cv2.putText(out, name, (int(ax), int(ay) - 6), 0, 0.5, (0, 0, 255), 1, cv2.LINE_AA)
    if counts:
        cv2.rectangle(out, (0, 0), (min(out.shape[1], 9 * len(counts) + 10), 22), (0, 0, 0), -1)
        cv2.putText(out, counts, (5, 16), 0, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.ascontiguousarray(out)
