"""Make faces and licence plates unrecognisable before a frame is encoded, stored or streamed.

What is hidden, and why each layer is there (a missed face or plate is a privacy breach, an
extra hidden patch costs nothing):

1. **Faces** found by a face detector plugin (:mod:`cityward.vision.faces`, default YuNet-n at
   0.55, tuned for recall), each box grown by ``margin`` of its size on every side (hair, ears,
   the detector's jitter).
2. **Temporal hold**: a face stays hidden for ``hold_s`` after it was last detected, so a
   face the detector loses for a few frames (a head turned, motion blur) is still covered. When
   the face lies inside a tracked person box (``tracker_id >= 0``) the held box moves with that
   person; otherwise it stays where it was last seen.
3. **Head backstop**: the top ``head_fraction`` of every person box (full width, plus a little
   above) is hidden too, whatever the face detector says.
4. **Plates**: we detect no plates. The bottom ``plate_fraction`` of every vehicle box (COCO
   car, motorcycle, bus, truck), full width, is hidden: front and rear plates sit at bumper
   height, in the lower half of the box for every camera angle a street camera has. This costs
   the lower body of each car, which the analytics never look at.

Hiding is **pixelation** to about ``blocks`` (4) cells across the region's longer side (cells at
least ``min_cell`` px), followed by a box blur ``soften`` (2) cells wide that removes the cell
edges. Measured with the attacker of ``tests/vision/attack.py`` on the shared face GIFs:
a plain gaussian blur of similar cost kept enough low-frequency face layout for YuNet (0.54)
and CenterFace (0.49) to fire; 6 hard-edged cells still gave CenterFace 0.49; 4 cells
softened over 2 cells with a 0.4 margin left no detector above 0.28 anywhere in the frame
(the sharp cell grid itself can look like eyes and a mouth, hence the softening, and the
larger margin keeps the patch's own edge away from the head outline). Text on a plate is far
below one cell.

The frame is **modified in place** and returned (a copy would cost a full-frame write per
frame for nothing); pass ``frame.copy()`` to keep the original.

Speed: face detection dominates (YuNet-n, one ORT thread, 640x352: ~11-16 ms on the 2-vCPU
development VM); pixelating the regions adds well under 1 ms. ``face_max_side`` can shrink
the frame before face detection (e.g. 480 for 960-px streams), at the cost of the smallest
faces; the default (0) runs at full resolution because small faces are exactly what walking
people towards a street camera show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from cityward.vision.detections import PERSON, VEHICLES, Detections, box_iou
from cityward.vision.faces import REGISTRY, FaceDetector

Frame = npt.NDArray[np.uint8]
F32 = npt.NDArray[np.float32]


class AnonymizerConfig(BaseModel):
    """How faces and plates are hidden."""

    model_config = ConfigDict(extra="forbid")

    face_detector: str = Field(default="yunet", description="Face detector plugin name.")
    face_threshold: float | None = Field(
        default=None,
        ge=0.05,
        le=0.95,
        description="Face detector score threshold; None: the detector's own default, tuned "
        "for recall (yunet 0.55, centerface 0.4).",
    )
    face_max_side: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="Shrink the frame to this longer side before face detection (0: full).",
    )
    threads: int = Field(
        default=0, ge=0, le=64, description="ONNX Runtime threads (0: one per core)."
    )
    margin: float = Field(
        default=0.4,
        ge=0.0,
        le=1.0,
        description="Face boxes grow by this much of their size on every side.",
    )
    hold_s: float = Field(
        default=1.0,
        ge=0.0,
        le=30.0,
        description="Keep hiding a face this long after it was last detected.",
    )
    plate_fraction: float = Field(
        default=0.55,
        ge=0.0,
        le=1.0,
        description="Hide the bottom part of every vehicle box, full width (0: plates not hidden).",
    )
    head_fraction: float = Field(
        default=0.22,
        ge=0.0,
        le=1.0,
        description="Hide the top part of every person box (0: no head backstop).",
    )
    method: Literal["pixelate", "blur"] = Field(
        default="pixelate", description="pixelate (cells, then softened) or a heavy gaussian."
    )
    blocks: int = Field(
        default=4, ge=2, le=64, description="Cells across a hidden region's longer side."
    )
    min_cell: int = Field(default=6, ge=2, le=64, description="Smallest cell (px).")
    soften: float = Field(
        default=2.0,
        ge=0.0,
        le=4.0,
        description="Box blur over the cells, in cells (removes the cell edges).",
    )


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
        self, frame: Frame, objects: Detections, t: float, *, detect_faces: bool = True
    ) -> F32:
        """The (N, 4) xyxy regions :meth:`apply` hides on ``frame`` at time ``t`` (seconds),
        updating the held faces. Exposed so tests and callers can see what gets hidden.

        ``detect_faces=False``: the caller knows the frame is the scene it last looked at (the
        motion gate found nothing moving since), so the held faces are still where they were:
        they are kept (and their hold renewed) instead of running the face detector again."""
        cfg = self.config
        if detect_faces:
            faces = self.faces.detect(frame)
        else:
            faces = Detections()
            for h in self.held:
                h.last_seen = t
        persons = objects[objects.class_id == PERSON]
        vehicles = objects.with_classes(VEHICLES)
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
            p = persons.xyxy
            ph = p[:, 3] - p[:, 1]
            pw = p[:, 2] - p[:, 0]
            heads = np.stack(
                [
                    p[:, 0] - 0.05 * pw,
                    p[:, 1] - 0.04 * ph,
                    p[:, 2] + 0.05 * pw,
                    p[:, 1] + cfg.head_fraction * ph,
                ],
                axis=1,
            )
            parts.append(heads.astype(np.float32))
        if cfg.plate_fraction > 0 and len(vehicles):
            v = vehicles.xyxy
            vh = v[:, 3] - v[:, 1]
            vw = v[:, 2] - v[:, 0]
            plates = np.stack(
                [
                    v[:, 0] - 0.03 * vw,
                    v[:, 3] - cfg.plate_fraction * vh,
                    v[:, 2] + 0.03 * vw,
                    v[:, 3] + 0.05 * vh,
                ],
                axis=1,
            )
            parts.append(plates.astype(np.float32))

        s = self.stats
        s.faces_detected, s.faces_held = len(faces), n_held
        s.heads, s.vehicles = len(persons), len(vehicles)
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
        self, frame: Frame, objects: Detections | None, t: float, *, detect_faces: bool = True
    ) -> Frame:
        """Hide faces, heads and plate regions of ``frame`` (H, W, 3 uint8, BGR) **in place**
        and return it. ``objects`` are the object detector's (tracked) boxes in the same
        frame's pixels; ``t`` is the frame time in seconds (for the temporal hold);
        ``detect_faces``: see :meth:`regions`."""
        objs = objects if objects is not None else Detections()
        regions = self.regions(frame, objs, t, detect_faces=detect_faces)
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
