"""Make faces and licence plates unrecognisable before a frame is encoded, stored or streamed.

What is hidden, and why each layer is there (a missed face or plate is a privacy breach, an
extra hidden patch costs nothing):

1. **Faces** found by a face detector plugin (:mod:`cityward.vision.faces`, default YuNet-n at
   0.55, tuned for recall) **in every orientation**: on the frame and on its copies turned by
   90, 180 and 270 degrees (:meth:`~cityward.vision.faces.FaceDetector.detect_turned`; the
   models only know upright faces, and a camera mounted upside down or sideways, or a person
   lying on the ground, shows them otherwise). Each box is grown by ``margin`` of its size on
   every side (hair, ears, the detector's jitter).
2. **Temporal hold**: a face stays hidden for ``hold_s`` after it was last detected, so a
   face the detector loses for a few frames (a head turned, motion blur) is still covered. When
   the face lies inside a tracked person box (``tracker_id >= 0``) the held box moves with that
   person; otherwise it stays where it was last seen.
3. **Head backstop**: a band ``head_fraction`` deep at *both* ends of every person box's long
   axis (top and bottom of a standing person, whichever way up the camera is; left and right
   of a person lying or seen by a camera on its side; all four sides of a nearly square box:
   :func:`head_bands`) is hidden too, whatever the face detector says. It used to be the top
   only: upside down, that is the feet. The pipeline also looks for people on turned copies
   of the frame (:func:`cityward.vision.pipeline.turned_objects`, passed in as
   :class:`Turned`), since the object detector finds few people upside down or on their side.
4. **Plates**: we detect no plates. The bottom ``plate_fraction`` of every vehicle box (COCO
   car, motorcycle, bus, truck), full width, is hidden (:func:`plate_bands`): front and rear
   plates sit at bumper height, in the lower half of the box for every camera angle a street
   camera has. This costs the lower body of each car, which the analytics never look at.
   "Bottom" is the bottom of the vehicle as it stands, which is the top of its box on a
   camera mounted upside down and the left or right end on one on its side: a vehicle the
   pipeline found on a turned copy of the frame (:class:`Turned`) has its band drawn at the
   bottom of its box *there* and turned back into the frame (:func:`turned_plate_bands`).
   With the bottom band only, the attacker (turning the frame upright) read 8 of 8 synthetic
   plates on the street clip turned by 90, 180 or 270 degrees after anonymization.

Hiding is **pixelation** to about ``blocks`` (4) cells across the region's longer side (cells at
least ``min_cell`` px), followed by a box blur ``soften`` (2) cells wide that removes the cell
edges. Measured with the attacker of ``tests/vision/attack.py`` on the shared face GIFs:
a plain gaussian blur of similar cost kept enough low-frequency face layout for YuNet (0.54)
and CenterFace (0.49) to fire; 6 hard-edged cells still gave CenterFace 0.49; 4 cells
softened over 2 cells with a 0.4 margin left no detector above 0.28 anywhere in the frame
(the sharp cell grid itself can look like eyes and a mouth, hence the softening, and the
larger margin keeps the patch's own edge away from the head outline). Text on a plate is far
below one cell.

**No configuration can weaken hiding below what was measured to work.** Each setting that
could make the hiding weaker has a limit (the constants below, each with its measurement); a
weaker value is refused with a validation error naming the setting. The weakest allowed
settings all together are checked by ``tests/vision/test_privacy.py``.

The frame is **modified in place** and returned (a copy would cost a full-frame write per
frame for nothing); pass ``frame.copy()`` to keep the original.

Speed: face detection dominates (YuNet-n, one ORT thread, 640x352: ~11-16 ms on the 2-vCPU
development VM per orientation, so four times that for the four orientations); pixelating the
regions adds well under 1 ms. ``face_max_side`` can shrink
the frame before face detection (e.g. 480 for 960-px streams), at the cost of the smallest
faces; the default (0) runs at full resolution because small faces are exactly what walking
people towards a street camera show.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from cityward.vision.detections import PERSON, VEHICLES, Detections, box_iou
from cityward.vision.faces import REGISTRY, FaceDetector, turn_back

Frame = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


# The weakest settings a configuration may choose. Measured with the attacker of
# tests/vision/attack.py (YuNet >= 0.5 and CenterFace >= 0.4 over the whole frame) on every
# frame of the two shared face GIFs (head-pose-face-detection-female-and-male.gif and
# face-demographics-walking.gif: 91 frames, the attacker finds a face in every raw one), with
# no object boxes (the face layer alone) and every other setting at its default: one setting
# was made weaker step by step until the attacker found a face, and the limit is at least one
# step short of that (the margin). "n frames" below: anonymized frames with a face found.

#: pixelate: cells across a hidden region. No face up to 5 cells; 6: CenterFace in 3 frames,
#: 10: YuNet in 1, 16: YuNet in 47, 24 and more: in all; 5 cells with a 0.3 margin: 1.
MAX_BLOCKS = 4
#: blur: the gaussian is 2 cells wide, so fewer cells is a wider blur. No face up to 3 cells;
#: 4 (the pixelate default): CenterFace in 3 frames; 6: 18; 8: YuNet in 19.
MAX_BLUR_BLOCKS = 2
#: face boxes grown by this much on every side: no face down to 0.3; 0.2: CenterFace in 2
#: frames; 0.1: 15; 0: YuNet in 15, CenterFace in 24.
MIN_MARGIN = 0.4
#: the anonymizer's own face threshold, per detector (their scores are not on one scale).
#: yunet: no face up to 0.8 (0.7 with no hold at all); 0.9: 63 frames; 0.95: all.
#: centerface: no face up to 0.5 (with no hold: 1 frame); 0.6 and 0.7: 5; 0.8: 31.
MAX_FACE_THRESHOLD = {"yunet": 0.6, "centerface": 0.45}
#: shrinking the frame before face detection (0: never). The 480-px frames shrunk to 240:
#: no face; 200: 5 frames; 160: 25; 128: 35; to 320 with yunet at 0.7: 1. Twice the smallest
#: that worked.
MIN_FACE_MAX_SIDE = 480
#: the hold, measured where it matters, at yunet 0.8 (the highest threshold that still hid
#: every face): no hold: 4 frames; 0.1 s: 1; 0.25 s: none. Twice that.
MIN_HOLD_S = 0.5
#: the head backstop alone (the face detector blind) over tracked YOLOX person boxes: frames
#: where a face the attacker finds raw inside a person box is found again (IoU >= 0.3).
#: face-demographics-walking.gif (people walking towards the camera, 34 of 35 frames with
#: such a face): 0.15: 12 frames; 0.2: 1; 0.22 (the old default): none, so the default is
#: now 0.3. one-by-one-person-detection.mp4 (every 7th frame): none from 0.15 (mostly seen
#: from behind). On the close-up head-pose GIF the person box is the upper body and a fraction
#: of 0.4 would be needed: there the face detector, which finds every face, hides them.
MIN_HEAD_FRACTION = 0.25
#: the plate band, measured as tests/vision/test_privacy.py's synthetic plates (every 5th
#: frame of the street clip with a large car: 33 plates, all read raw by RapidOCR): plate
#: strings read after anonymization at 0.25: 32; 0.3: 21; 0.35: 4; 0.4: none. At 0.5 on 8
#: of those plates turned by 90, 180 and 270 degrees (the band at the bumper end of the turn
#: the car was found in, the attacker reading all four ways up): none.
MIN_PLATE_FRACTION = 0.5
# soften (down to 0) and min_cell (down to 2) need no limit beyond their ranges: with blocks
# and margin at their limits, soften 0 and min_cell 2 hid every face, and no plate was read
# even with 64 hard-edged cells (min_cell 2, soften 0): the plate band is the vehicle's full
# width, so even then a cell is about two thirds of a character's height.


class AnonymizerConfig(BaseModel):
    """How faces and plates are hidden. Settings that could weaken the hiding are limited
    (the ``MAX_``/``MIN_`` constants above, each with its measurement)."""

    model_config = ConfigDict(extra="forbid")

    face_detector: str = Field(default="yunet", description="Face detector plugin name.")
    face_threshold: float | None = Field(
        default=None,
        ge=0.05,
        description="Face detector score threshold; None: the detector's own default, tuned "
        "for recall (yunet 0.55, centerface 0.4). At most yunet "
        f"{MAX_FACE_THRESHOLD['yunet']}, centerface {MAX_FACE_THRESHOLD['centerface']}.",
    )
    face_max_side: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Shrink the frame to this longer side before face detection (0: full; "
        f"else at least {MIN_FACE_MAX_SIDE}).",
    )
    threads: int = Field(
        default=0, ge=0, le=64, description="ONNX Runtime threads (0: one per core)."
    )
    margin: float = Field(
        default=0.4,
        ge=MIN_MARGIN,
        le=1.0,
        description="Face boxes grow by this much of their size on every side.",
    )
    hold_s: float = Field(
        default=1.0,
        ge=MIN_HOLD_S,
        le=30.0,
        description="Keep hiding a face this long after it was last detected.",
    )
    plate_fraction: float = Field(
        default=0.55,
        ge=MIN_PLATE_FRACTION,
        le=1.0,
        description="Hide the bottom part of every vehicle box, full width.",
    )
    head_fraction: float = Field(
        default=0.3,
        ge=MIN_HEAD_FRACTION,
        le=1.0,
        description="Hide the top part of every person box, whatever the face detector says.",
    )
    method: Literal["pixelate", "blur"] = Field(
        default="pixelate", description="pixelate (cells, then softened) or a heavy gaussian."
    )
    blocks: int = Field(
        default=4,
        ge=2,
        le=MAX_BLOCKS,
        description="Cells across a hidden region's longer side (blur: at most "
        f"{MAX_BLUR_BLOCKS}).",
    )
    min_cell: int = Field(default=6, ge=2, le=64, description="Smallest cell (px).")
    soften: float = Field(
        default=2.0,
        ge=0.0,
        le=4.0,
        description="Box blur over the cells, in cells (removes the cell edges).",
    )

    @field_validator("face_threshold")
    @classmethod
    def _threshold(cls, value: float | None, info: ValidationInfo) -> float | None:
        detector = info.data.get("face_detector")
        if value is None or not isinstance(detector, str):
            return value
        # a detector with no measured limit gets the strictest one: its scale is unknown
        limit = MAX_FACE_THRESHOLD.get(detector, min(MAX_FACE_THRESHOLD.values()))
        if value > limit:
            raise ValueError(
                f"{value} is above {limit}, the highest {detector} threshold that still "
                "finds every face to hide"
            )
        return value

    @field_validator("face_max_side")
    @classmethod
    def _max_side(cls, value: int) -> int:
        if 0 < value < MIN_FACE_MAX_SIDE:
            raise ValueError(
                f"{value} px is too small for the face detector to find small faces: 0 (full "
                f"size) or at least {MIN_FACE_MAX_SIDE}"
            )
        return value

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("method") == "blur" and value > MAX_BLUR_BLOCKS:
            raise ValueError(
                f"method blur needs at most {MAX_BLUR_BLOCKS} blocks (a wider blur): with "
                f"{value} a face detector still finds the blurred faces"
            )
        return value


@dataclass
class AnonymizerStats:
    """What the last :meth:`Anonymizer.apply` hid, and totals since the start."""

    faces_detected: int = 0
    faces_held: int = 0
    heads: int = 0
    vehicles: int = 0
    frames: int = 0
    total_faces_detected: int = 0
    total_faces_held: int = 0


@dataclass
class _Held:
    box: F32  # xyxy, grown, in frame pixels
    last_seen: float
    tracker_id: int = -1
    rel: F32 | None = None  # box relative to the tracked person box (x/w, y/h)


def _grow(xyxy: F32, margin: float, top: float | None = None) -> F32:
    w = xyxy[:, 2] - xyxy[:, 0]
    h = xyxy[:, 3] - xyxy[:, 1]
    up = margin if top is None else top
    return np.stack(
        [
            xyxy[:, 0] - margin * w,
            xyxy[:, 1] - up * h,
            xyxy[:, 2] + margin * w,
            xyxy[:, 3] + margin * h,
        ],
        axis=1,
    ).astype(np.float32)


#: a person box this close to square (longer side / shorter side below it) may hold the head
#: at any of its four sides: a seated or crouching person, an upper body close up, seen by a
#: camera turned by a quarter. Longer boxes hold it at one end of their long axis
SQUARE_ASPECT = 2.0


def head_bands(persons: F32, fraction: float) -> F32:
    """The head backstop of person boxes (N, 4 xyxy), whatever the orientation: a band
    ``fraction`` of the box's length deep across each end of its long axis (a standing person
    seen upright or upside down: top and bottom; lying, or by a camera turned by a quarter:
    left and right), and across all four sides when the box is nearly square
    (:data:`SQUARE_ASPECT`). Each band spans the whole box across plus 5% on either side and
    reaches 4% beyond the box's end (the old top band, turned)."""
    p = persons.astype(np.float32)
    x1, y1, x2, y2 = p[:, 0], p[:, 1], p[:, 2], p[:, 3]
    w, h = x2 - x1, y2 - y1
    left, right = x1 - 0.05 * w, x2 + 0.05 * w
    top, bottom = y1 - 0.05 * h, y2 + 0.05 * h
    tall = h >= w
    squarish = np.maximum(w, h) < SQUARE_ASPECT * np.maximum(np.minimum(w, h), 1.0)
    vertical = tall | squarish  # bands at the top and bottom
    horizontal = ~tall | squarish  # bands at the left and right
    bands = [
        np.stack([left, y1 - 0.04 * h, right, y1 + fraction * h], axis=1)[vertical],
        np.stack([left, y2 - fraction * h, right, y2 + 0.04 * h], axis=1)[vertical],
        np.stack([x1 - 0.04 * w, top, x1 + fraction * w, bottom], axis=1)[horizontal],
        np.stack([x2 - fraction * w, top, x2 + 0.04 * w, bottom], axis=1)[horizontal],
    ]
    return np.concatenate(bands).astype(np.float32)


def plate_bands(vehicles: F32, fraction: float) -> F32:
    """The plate bands of vehicle boxes (N, 4 xyxy) seen upright: the bottom ``fraction`` of
    each box, its full width plus 3% on either side, reaching 5% below the box (a bumper
    plate hangs at or below the box's lower edge)."""
    v = vehicles.astype(np.float32)
    vw, vh = v[:, 2] - v[:, 0], v[:, 3] - v[:, 1]
    return np.stack(
        [v[:, 0] - 0.03 * vw, v[:, 3] - fraction * vh, v[:, 2] + 0.03 * vw, v[:, 3] + 0.05 * vh],
        axis=1,
    ).astype(np.float32)


def turned_plate_bands(
    vehicles: F32, fraction: float, degrees: int, width: int, height: int
) -> F32:
    """The plate bands of vehicle boxes found on a ``width`` x ``height`` frame turned
    clockwise by ``degrees``, in the frame's own pixels: the bottom band in the turned frame,
    where the vehicle stood upright for the detector, turned back (upside down: the top of
    the box in the frame; a quarter turn: its left or right end)."""
    return turn_back(plate_bands(vehicles, fraction), degrees, width, height)


@dataclass(frozen=True)
class Turned:
    """Objects an object detector found on the frame turned clockwise by ``degrees`` (0, 90,
    180 or 270), in *that turned frame's* pixels: the turn a vehicle was seen upright in says
    where its bumper is (:func:`turned_plate_bands`)."""

    degrees: int
    objects: Detections

    def __post_init__(self) -> None:
        if self.degrees not in (0, 90, 180, 270):
            raise ValueError(f"a turn is 0, 90, 180 or 270 degrees, not {self.degrees}")


def _relative(box: F32, person: F32) -> F32:
    pw = max(float(person[2] - person[0]), 1.0)
    ph = max(float(person[3] - person[1]), 1.0)
    k = np.array([pw, ph, pw, ph], np.float32)
    o = np.array([person[0], person[1], person[0], person[1]], np.float32)
    return ((box - o) / k).astype(np.float32)


def _absolute(rel: F32, person: F32) -> F32:
    pw = float(person[2] - person[0])
    ph = float(person[3] - person[1])
    k = np.array([pw, ph, pw, ph], np.float32)
    o = np.array([person[0], person[1], person[0], person[1]], np.float32)
    return (rel * k + o).astype(np.float32)


class Anonymizer:
    """Hides faces, heads and plate regions: ``Anonymizer(config, models_dir).apply(frame,
    objects, t)``. One instance per camera (it keeps the held faces of that stream)."""

    def __init__(
        self,
        config: AnonymizerConfig | dict[str, Any] | None = None,
        models_dir: Path | str | None = None,
    ) -> None:
        if config is None:
            config = AnonymizerConfig()
        elif isinstance(config, dict):
            config = AnonymizerConfig.model_validate(config)
        self.config = config
        try:
            cls = REGISTRY[config.face_detector]
        except KeyError:
            raise ValueError(
                f"unknown face detector {config.face_detector!r}; known: {sorted(REGISTRY)}"
            ) from None
        settings: dict[str, Any] = {"max_side": config.face_max_side, "threads": config.threads}
        if config.face_threshold is not None:
            settings["threshold"] = config.face_threshold
        self.faces: FaceDetector = cls(settings, models_dir)
        self.held: list[_Held] = []
        self.stats = AnonymizerStats()

    def reset(self) -> None:
        """Forget held faces (a new stream, or a jump in time)."""
        self.held.clear()

    def regions(
        self,
        frame: Frame,
        objects: Detections,
        t: float,
        *,
        detect_faces: bool = True,
        turned: Sequence[Turned] = (),
    ) -> F32:
        """The (N, 4) xyxy regions :meth:`apply` hides on ``frame`` at time ``t`` (seconds),
        updating the held faces. Exposed so tests and callers can see what gets hidden.

        ``turned``: objects found on turned copies of ``frame`` (:class:`Turned`): their
        people get the head backstop, their vehicles a plate band at the bumper end in the
        orientation they were found in.

        ``detect_faces=False``: the caller knows the frame is the scene it last looked at (the
        motion gate found nothing moving since), so the held faces are still where they were:
        they are kept (and their hold renewed) instead of running the face detector again."""
        cfg = self.config
        if detect_faces:
            faces = self.faces.detect_turned(frame)
        else:
            faces = Detections()
            for h in self.held:
                h.last_seen = t
        persons = objects[objects.class_id == PERSON]
        vehicles = objects.with_classes(VEHICLES)
        fh, fw = frame.shape[:2]
        # people are people whichever way up (untracked: the held faces follow tracks only)
        people = [persons]
        for turn in turned:
            p = turn.objects[turn.objects.class_id == PERSON]
            people.append(
                Detections(turn_back(p.xyxy, turn.degrees, fw, fh), p.confidence, p.class_id)
            )
        persons = Detections.merge(people)
        grown = _grow(faces.xyxy, cfg.margin)

        self._follow(persons, t)
        # a fresh detection replaces the held boxes it overlaps
        if self.held and len(grown):
            overlap = box_iou(np.stack([h.box for h in self.held]), grown).max(axis=1)
            self.held = [h for h, o in zip(self.held, overlap, strict=True) if o < 0.2]
        n_held = len(self.held)
        for box in grown:
            self.held.append(self._attach(box, t, persons))

        parts: list[F32] = [np.stack([h.box for h in self.held])] if self.held else []
        if cfg.head_fraction > 0 and len(persons):
            parts.append(head_bands(persons.xyxy, cfg.head_fraction))
        n_vehicles = len(vehicles)
        if cfg.plate_fraction > 0:
            if len(vehicles):
                parts.append(plate_bands(vehicles.xyxy, cfg.plate_fraction))
            for turn in turned:
                v = turn.objects.with_classes(VEHICLES).xyxy
                n_vehicles += len(v)
                if len(v):
                    bands = turned_plate_bands(v, cfg.plate_fraction, turn.degrees, fw, fh)
                    parts.append(bands)

        s = self.stats
        s.faces_detected, s.faces_held = len(faces), n_held
        s.heads, s.vehicles = len(persons), n_vehicles
        s.frames += 1
        s.total_faces_detected += len(faces)
        s.total_faces_held += n_held
        return np.concatenate(parts) if parts else np.zeros((0, 4), np.float32)

    def _follow(self, persons: Detections, t: float) -> None:
        """Forget stale held faces; move the others with their tracked person."""
        hold = self.config.hold_s
        self.held = [h for h in self.held if 0.0 <= t - h.last_seen <= hold]
        by_track = {
            int(tid): persons.xyxy[i] for i, tid in enumerate(persons.tracker_id) if tid >= 0
        }
        for h in self.held:
            if h.rel is not None and h.tracker_id in by_track:
                h.box = _absolute(h.rel, by_track[h.tracker_id])

    def observe(self, objects: Detections, t: float) -> None:
        """Keep the held faces up to date on a frame that is not anonymized (no image is
        wanted): they expire and follow their tracked person as in :meth:`apply`, so the next
        anonymized frame still covers a face seen recently. Costs no face detection."""
        self._follow(objects[objects.class_id == PERSON], t)

    def _attach(self, box: F32, t: float, persons: Detections) -> _Held:
        """A held face, tied to the tracked person box that contains its centre (if any)."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        p = persons.xyxy
        inside = (p[:, 0] <= cx) & (cx <= p[:, 2]) & (p[:, 1] <= cy) & (cy <= p[:, 3])
        inside &= persons.tracker_id >= 0
        if inside.any():
            i = int(np.argmin(np.where(inside, persons.area, np.inf)))
            return _Held(box, t, int(persons.tracker_id[i]), _relative(box, p[i]))
        return _Held(box, t)

    def apply(
        self,
        frame: Frame,
        objects: Detections | None,
        t: float,
        *,
        detect_faces: bool = True,
        turned: Sequence[Turned] = (),
    ) -> Frame:
        """Hide faces, heads and plate regions of ``frame`` (H, W, 3 uint8, BGR) **in place**
        and return it. ``objects`` are the object detector's (tracked) boxes in the same
        frame's pixels; ``t`` is the frame time in seconds (for the temporal hold);
        ``detect_faces`` and ``turned``: see :meth:`regions`."""
        objs = objects if objects is not None else Detections()
        regions = self.regions(frame, objs, t, detect_faces=detect_faces, turned=turned)
        for box in regions:
            self.hide(frame, box)
        return frame

    def hide(self, frame: Frame, box: F32 | npt.NDArray[Any]) -> None:
        """Make the ``box`` (xyxy) region of ``frame`` unrecognisable, in place."""
        fh, fw = frame.shape[:2]
        x1, y1 = max(int(np.floor(box[0])), 0), max(int(np.floor(box[1])), 0)
        x2, y2 = min(int(np.ceil(box[2])), fw), min(int(np.ceil(box[3])), fh)
        if x2 - x1 < 2 or y2 - y1 < 2:
            return
        roi = frame[y1:y2, x1:x2]
        h, w = roi.shape[:2]
        cell = max(self.config.min_cell, int(np.ceil(max(h, w) / self.config.blocks)))
        if self.config.method == "blur":
            k = 2 * cell + 1
            roi[:] = cv2.GaussianBlur(roi, (k, k), 0)
            roi[:] = cv2.GaussianBlur(roi, (k, k), 0)
            return
        small = cv2.resize(
            roi, (max(1, round(w / cell)), max(1, round(h / cell))), interpolation=cv2.INTER_AREA
        )
        big = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)
        k = max(1, round(cell * self.config.soften))
        roi[:] = cv2.blur(big, (k, k)) if k > 1 else big
