"""One detections type for every stage: column arrays, in the spirit of supervision's
``Detections``.

Written here rather than taken from ``supervision``: that library pulls in the GUI build of
OpenCV (``opencv-python``, which needs libGL) next to our headless one, plus matplotlib and
scipy, for a container class of forty lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
Mask = npt.NDArray[np.bool_]

#: COCO class ids and names the analytics talk about (the detectors report all 80)
COCO_NAMES: dict[int, str] = {
    0: "person",
    1: "bicycle",
    2: "car",
    3: "motorcycle",
    5: "bus",
    7: "truck",
}
VEHICLES: frozenset[int] = frozenset({2, 3, 5, 7})
PERSON = 0
BICYCLE = 1


def class_name(class_id: int) -> str:
    return COCO_NAMES.get(int(class_id), f"class{int(class_id)}")


def _f32(a: object, shape: tuple[int, ...]) -> F32:
    out = np.asarray(a, dtype=np.float32)
    return out.reshape(shape) if out.size == 0 else out


@dataclass
class Detections:
    """N boxes in image pixels: ``xyxy`` (N, 4), ``confidence`` (N,), ``class_id`` (N,) and
    ``tracker_id`` (N,; -1 until the tracker has given one)."""

    xyxy: F32 = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    confidence: F32 = field(default_factory=lambda: np.zeros((0,), np.float32))
    class_id: I32 = field(default_factory=lambda: np.zeros((0,), np.int32))
    tracker_id: I32 = field(default_factory=lambda: np.zeros((0,), np.int32))

    def __post_init__(self) -> None:
        self.xyxy = _f32(self.xyxy, (0, 4))
        n = len(self.xyxy)
        self.confidence = _f32(self.confidence, (0,))
        self.class_id = np.asarray(self.class_id, dtype=np.int32).reshape(-1)
        if self.tracker_id is None or len(self.tracker_id) == 0:
            self.tracker_id = np.full((n,), -1, np.int32)
        else:
            self.tracker_id = np.asarray(self.tracker_id, dtype=np.int32).reshape(-1)
        if not (len(self.confidence) == len(self.class_id) == len(self.tracker_id) == n):
            raise ValueError(
                f"detections columns differ in length: xyxy {n}, confidence "
                f"{len(self.confidence)}, class_id {len(self.class_id)}, tracker_id "
                f"{len(self.tracker_id)}"
            )

    @classmethod
    def empty(cls) -> Detections:
        return cls()

    @classmethod
    def merge(cls, parts: Sequence[Detections]) -> Detections:
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls()
        return cls(
            np.concatenate([p.xyxy for p in parts]),
            np.concatenate([p.confidence for p in parts]),
            np.concatenate([p.class_id for p in parts]),
            np.concatenate([p.tracker_id for p in parts]),
        )

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Mask | I32 | slice) -> Detections:
        """The detections a boolean mask or an index array selects."""
        return Detections(
            self.xyxy[index],
            self.confidence[index],
            self.class_id[index],
            self.tracker_id[index],
        )

    def with_classes(self, classes: frozenset[int] | set[int]) -> Detections:
        return self[np.isin(self.class_id, list(classes))]

    @property
    def area(self) -> F32:
        w = np.clip(self.xyxy[:, 2] - self.xyxy[:, 0], 0, None)
        h = np.clip(self.xyxy[:, 3] - self.xyxy[:, 1], 0, None)
        out: F32 = (w * h).astype(np.float32)
        return out

    @property
    def center(self) -> F32:
        """(N, 2) box centres."""
        return np.stack(
            [(self.xyxy[:, 0] + self.xyxy[:, 2]) / 2, (self.xyxy[:, 1] + self.xyxy[:, 3]) / 2],
            axis=1,
        ).astype(np.float32)

    @property
    def bottom_center(self) -> F32:
        """(N, 2) middle of each box's bottom edge: where an object touches the ground."""
        return np.stack([(self.xyxy[:, 0] + self.xyxy[:, 2]) / 2, self.xyxy[:, 3]], axis=1).astype(
            np.float32
        )

    def scaled(self, sx: float, sy: float | None = None) -> Detections:
        """The same detections with coordinates multiplied (a detector run on a resized frame
        reports in the resized frame's pixels)."""
        sy = sx if sy is None else sy
        k = np.array([sx, sy, sx, sy], np.float32)
        return Detections(self.xyxy * k, self.confidence, self.class_id, self.tracker_id)


Boxes = TypeVar("Boxes", F32, npt.NDArray[np.float64])


def box_iou(a: Boxes, b: Boxes) -> Boxes:
    """(len(a), len(b)) intersection over union of two sets of xyxy boxes, in their precision
    (float32 for detections, float64 for the tracker's filtered boxes)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), a.dtype)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    out: Boxes = (inter / np.maximum(union, 1e-9)).astype(a.dtype)
    return out


def nms(xyxy: F32, scores: F32, iou: float, class_id: I32 | None = None) -> I32:
    """Indices kept by greedy non-maximum suppression, best first; per class when
    ``class_id`` is given (boxes of different classes never suppress each other)."""
    if len(xyxy) == 0:
        return np.zeros((0,), np.int32)
    boxes = xyxy.astype(np.float32)
    if class_id is not None:
        # shift each class far apart so one pass handles all classes
        offset = (class_id.astype(np.float32) * (float(boxes.max()) + 1.0))[:, None]
        boxes = boxes + offset
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        if len(order) == 1:
            break
        ious = box_iou(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou]
    return np.asarray(keep, np.int32)
