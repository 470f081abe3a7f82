"""A ByteTrack-class multi-object tracker: boxes in, the same boxes with a ``tracker_id`` out.

Written here rather than taken from ``supervision`` (``ByteTrack``) or built on ``lap``:
``supervision`` pulls in the GUI build of OpenCV (``opencv-python``, which needs libGL) next to
our headless one, plus matplotlib and scipy, for about three hundred lines of numpy.

How it works, one :meth:`ByteTracker.update` per analysed frame:

* every track carries a constant-velocity Kalman filter on ``(cx, cy, w, h)`` (box centre and
  size in pixels) and their rates of change in pixels per *second*. The pipeline skips frames
  (nothing moves, or CPU is short), so ``update`` takes the frame time ``t`` in seconds and
  the prediction steps by ``dt`` = time since the last update, with process noise growing
  with ``dt``;
* detections are split by score: *high* (``>= high_thresh``) and *low*
  (``low_thresh <= score < high_thresh``);
* stage 1 matches the confirmed tracks (tracked and lost ones) with the high-score boxes;
  stage 2 matches the confirmed tracks still unmatched *and* seen in the previous update with
  the low-score boxes (a partly hidden object keeps its track, ByteTrack's idea); stage 3
  matches tentative tracks with the high-score boxes left. Low-score boxes never start a
  track; a high-score box left over starts a tentative one if its score reaches
  ``new_track_thresh``;
* matching is on IoU between the predicted track boxes and the detections, *greedy by
  descending IoU* (take the best pair, strike its row and column, repeat above the stage's
  IoU floor). For the few dozen objects a street camera sees that gives the Hungarian
  assignment in practice at a fraction of the code;
* matching is class-consistent: a track only takes a box of its own class, or of a class in
  the same ``class_groups`` entry (detectors flip car/truck/bus from frame to frame; they do
  not turn a person into a car). A track reports the class it was seen as most (score
  weighted);
* a tentative track needs ``min_hits`` matches in a row to be confirmed, and is dropped on
  its first miss; only then it gets an id. A confirmed track that misses becomes *lost* and
  is kept (predicted, not reported) for ``lost_s`` seconds, then forgotten.

Privacy: ids are small integers counted up inside this worker process, never reused (not even
after :meth:`ByteTracker.reset`) and never persisted. A track holds only its current Kalman
state; no trajectory is stored, and nothing links a track to a person or a vehicle beyond the
time it stays in view.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cityward.vision.detections import Detections, box_iou

F64 = npt.NDArray[np.float64]

# measurement noise: std of a box edge measurement as a fraction of the box size
_STD_MEAS = 0.05
# process noise, per second: how fast position and velocity uncertainty grow, as a fraction
# of the box size (a pedestrian changes velocity by about one body height per second at most)
_STD_POS_RATE = 0.05
_STD_VEL_RATE = 1.0
# initial velocity uncertainty of a new track, box sizes per second (a car crossing the view
# moves several box widths a second; too small and the first gap after a new track loses it)
_STD_VEL_INIT = 3.0


class TrackerConfig(BaseModel):
    """Settings of :class:`ByteTracker`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    high_thresh: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Score of a high-confidence detection."
    )
    low_thresh: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="Lowest score used at all (low-score boxes only extend tracks).",
    )
    new_track_thresh: float = Field(
        default=0.6, gt=0.0, le=1.0, description="Score a box needs to start a new track."
    )
    match_iou: float = Field(
        default=0.2, gt=0.0, le=1.0, description="Least IoU of a high-score match."
    )
    low_match_iou: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Least IoU of a low-score match."
    )
    tentative_match_iou: float = Field(
        default=0.3, gt=0.0, le=1.0, description="Least IoU to confirm a tentative track."
    )
    min_hits: int = Field(
        default=2, ge=1, le=100, description="Matches in a row before a track gets an id."
    )
    lost_s: float = Field(
        default=1.5, ge=0.0, le=600.0, description="Seconds a missed track is kept."
    )
    class_groups: tuple[frozenset[int], ...] = Field(
        default=(frozenset({2, 5, 7}),),
        description="Class ids that may match each other (default: car, bus, truck).",
    )

    @model_validator(mode="after")
    def _thresholds(self) -> TrackerConfig:
        if self.low_thresh > self.high_thresh:
            raise ValueError("low_thresh must not exceed high_thresh")
        if self.new_track_thresh < self.high_thresh:
            raise ValueError("new_track_thresh must be at least high_thresh")
        return self


@dataclass
class _Track:
    """One object in view: Kalman mean (8,) = cx, cy, w, h and their rates per second, and its
    covariance (8, 8)."""

    mean: F64
    cov: F64
    classes: dict[int, float]
    confidence: float
    last_seen: float
    hits: int = 1
    track_id: int = -1  # -1 while tentative
    matched_now: bool = True
    matched_before: bool = True
    group: int = -1

    @property
    def confirmed(self) -> bool:
        return self.track_id >= 0

    @property
    def class_id(self) -> int:
        return max(self.classes.items(), key=lambda kv: kv[1])[0]

    def box(self) -> F64:
        cx, cy, w, h = self.mean[:4]
        w, h = max(float(w), 1.0), max(float(h), 1.0)
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], np.float64)


@dataclass
class _Kalman:
    """Constant-velocity Kalman filter over (cx, cy, w, h), velocities per second."""

    H: F64 = field(default_factory=lambda: np.eye(4, 8, dtype=np.float64))

    @staticmethod
    def _sizes(m: F64) -> F64:
        w, h = max(float(m[2]), 1.0), max(float(m[3]), 1.0)
        return np.array([w, h, w, h], np.float64)

    def initiate(self, z: F64) -> tuple[F64, F64]:
        mean = np.concatenate([z, np.zeros(4)])
        s = self._sizes(z)
        std = np.concatenate([2 * _STD_MEAS * s, _STD_VEL_INIT * s])
        return mean, np.diag(std**2)

    def predict(self, mean: F64, cov: F64, dt: float) -> tuple[F64, F64]:
        if dt <= 0:
            return mean, cov
        f = np.eye(8, dtype=np.float64)
        f[:4, 4:] = dt * np.eye(4)
        s = self._sizes(mean)
        # random-walk noise: variance grows linearly with the time stepped
        q = np.diag(np.concatenate([(_STD_POS_RATE * s) ** 2, (_STD_VEL_RATE * s) ** 2]) * dt)
        mean = f @ mean
        mean[2:4] = np.maximum(mean[2:4], 1.0)
        return mean, f @ cov @ f.T + q

    def update(self, mean: F64, cov: F64, z: F64) -> tuple[F64, F64]:
        r = np.diag((_STD_MEAS * self._sizes(mean)) ** 2)
        s = self.H @ cov @ self.H.T + r
        gain = np.linalg.solve(s, self.H @ cov).T  # cov H^T S^-1 (S symmetric)
        mean = mean + gain @ (z - self.H @ mean)
        cov = cov - gain @ s @ gain.T
        return mean, cov


def _xyxy_to_z(b: npt.NDArray[np.floating]) -> F64:
    x1, y1, x2, y2 = (float(v) for v in b)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], np.float64)


def greedy_match(score: F64, floor: float) -> list[tuple[int, int]]:
    """Pairs (row, column) of a score matrix, greedily by descending score: the best pair is
    taken, its row and column struck, and so on while the score reaches ``floor``."""
    if score.size == 0:
        return []
    rows, cols = np.nonzero(score >= floor)
    order = np.argsort(-score[rows, cols], kind="stable")
    used_r: set[int] = set()
    used_c: set[int] = set()
    pairs: list[tuple[int, int]] = []
    for k in order:
        r, c = int(rows[k]), int(cols[k])
        if r in used_r or c in used_c:
            continue
        used_r.add(r)
        used_c.add(c)
        pairs.append((r, c))
    return pairs


class ByteTracker:
    """Tracks the boxes of one camera; one instance per stream, in worker memory only."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._kf = _Kalman()
        self._ids = itertools.count(1)  # never reset: ids are not reused in this process
        self._tracks: list[_Track] = []
        self._t: float | None = None

    def reset(self) -> None:
        """Forget every track (a new stream, or the camera moved). Ids go on counting."""
        self._tracks = []
        self._t = None

    @property
    def active_tracks(self) -> int:
        """Tracks held now (tentative, tracked and lost)."""
        return len(self._tracks)

    def _group(self, class_id: int) -> int:
        for i, g in enumerate(self.config.class_groups):
            if class_id in g:
                return i
        return -1 - class_id  # a group of its own

    def update(self, detections: Detections, t: float) -> Detections:
        """Take the detections of the frame at time ``t`` (seconds, any origin, not
        decreasing) and return the confirmed tracks matched in this frame: their filtered
        boxes, the matched detection's score, the track's class and ``tracker_id``."""
        cfg = self.config
        if self._t is not None and t < self._t:
            raise ValueError(f"frame time went backwards ({t} < {self._t}); call reset()")
        dt = 0.0 if self._t is None else t - self._t
        self._t = t

        for tr in self._tracks:
            tr.mean, tr.cov = self._kf.predict(tr.mean, tr.cov, dt)
            tr.matched_before, tr.matched_now = tr.matched_now, False

        conf = detections.confidence.astype(np.float64)
        boxes = detections.xyxy.astype(np.float64)
        det_groups = np.array([self._group(int(c)) for c in detections.class_id], np.int64)
        high = np.nonzero(conf >= cfg.high_thresh)[0]
        low = np.nonzero((conf >= cfg.low_thresh) & (conf < cfg.high_thresh))[0]

        confirmed = [tr for tr in self._tracks if tr.confirmed]
        tentative = [tr for tr in self._tracks if not tr.confirmed]

        # stage 1: confirmed (tracked or lost) tracks with high-score boxes
        left_tracks, left_high = self._associate(
            confirmed, high, boxes, det_groups, cfg.match_iou, detections, t
        )
        # stage 2: tracks seen last time with low-score boxes; they never start tracks
        recent = [tr for tr in left_tracks if tr.matched_before]
        self._associate(recent, low, boxes, det_groups, cfg.low_match_iou, detections, t)
        # stage 3: tentative tracks with the high-score boxes left over
        _, left_high = self._associate(
            tentative, left_high, boxes, det_groups, cfg.tentative_match_iou, detections, t
        )

        kept: list[_Track] = []
        for tr in self._tracks:
            if not tr.confirmed:
                if not tr.matched_now:
                    continue  # a tentative track dies on its first miss
                if tr.hits >= cfg.min_hits:
                    tr.track_id = next(self._ids)
            elif not tr.matched_now and t - tr.last_seen > cfg.lost_s:
                continue
            kept.append(tr)
        for j in left_high:
            if conf[j] < cfg.new_track_thresh:
                continue
            z = _xyxy_to_z(boxes[j])
            mean, cov = self._kf.initiate(z)
            tr = _Track(
                mean=mean,
                cov=cov,
                classes={int(detections.class_id[j]): float(conf[j])},
                confidence=float(conf[j]),
                last_seen=t,
                group=int(det_groups[j]),
            )
            if cfg.min_hits <= 1:
                tr.track_id = next(self._ids)
            kept.append(tr)
        self._tracks = kept

        out = [tr for tr in self._tracks if tr.confirmed and tr.matched_now]
        if not out:
            return Detections.empty()
        return Detections(
            np.stack([tr.box() for tr in out]).astype(np.float32),
            np.array([tr.confidence for tr in out], np.float32),
            np.array([tr.class_id for tr in out], np.int32),
            np.array([tr.track_id for tr in out], np.int32),
        )

    def _associate(
        self,
        tracks: list[_Track],
        det_idx: npt.NDArray[np.intp],
        boxes: F64,
        det_groups: npt.NDArray[np.int64],
        floor: float,
        detections: Detections,
        t: float,
    ) -> tuple[list[_Track], npt.NDArray[np.intp]]:
        """Match ``tracks`` with the detections ``det_idx``, update the matched tracks, and
        return the tracks and detection indices left unmatched."""
        if not tracks or len(det_idx) == 0:
            return tracks, det_idx
        pred = np.stack([tr.box() for tr in tracks])
        iou = box_iou(pred, boxes[det_idx])
        same = np.array([tr.group for tr in tracks])[:, None] == det_groups[det_idx][None, :]
        iou = np.where(same, iou, 0.0)
        pairs = greedy_match(iou, floor)
        for r, c in pairs:
            j = int(det_idx[c])
            tr = tracks[r]
            tr.mean, tr.cov = self._kf.update(tr.mean, tr.cov, _xyxy_to_z(boxes[j]))
            tr.matched_now = True
            tr.last_seen = t
            tr.hits += 1
            tr.confidence = float(detections.confidence[j])
            cid = int(detections.class_id[j])
            tr.classes[cid] = tr.classes.get(cid, 0.0) + tr.confidence
        done_r = {r for r, _ in pairs}
        done_c = {c for _, c in pairs}
        left_tracks = [tr for i, tr in enumerate(tracks) if i not in done_r]
        left_det = np.array([d for k, d in enumerate(det_idx) if k not in done_c], dtype=np.intp)
        return left_tracks, left_det
