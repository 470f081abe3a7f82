"""The ByteTrack-class tracker on synthetic boxes: ids survive noise, misses and crossings,
disappear after ``lost_s``, are never reused, and low-score boxes only extend tracks."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cityward.vision.detections import PERSON, Detections
from cityward.vision.tracker import ByteTracker, TrackerConfig, greedy_match

CAR = 2


def dets(
    boxes: list[tuple[float, float, float, float]],
    conf: list[float] | float = 0.9,
    cls: list[int] | int = CAR,
) -> Detections:
    n = len(boxes)
    c = conf if isinstance(conf, list) else [conf] * n
    k = cls if isinstance(cls, list) else [cls] * n
    return Detections(
        np.array(boxes, np.float32).reshape(-1, 4),
        np.array(c, np.float32),
        np.array(k, np.int32),
    )


def box(cx: float, cy: float, w: float = 60, h: float = 40) -> tuple[float, float, float, float]:
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def box_of(a: np.ndarray) -> tuple[float, float, float, float]:
    return (float(a[0]), float(a[1]), float(a[2]), float(a[3]))


def ids_by_x(out: Detections) -> dict[int, float]:
    return {int(i): float(x) for i, x in zip(out.tracker_id, out.center[:, 0], strict=True)}


def test_moving_boxes_keep_ids_through_noise_and_misses() -> None:
    rng = np.random.default_rng(7)
    tr = ByteTracker(TrackerConfig())
    seen: dict[int, set[int]] = {0: set(), 1: set()}
    for f in range(60):
        t = f / 10
        truth = [box(50 + 150 * t, 100), box(600 - 100 * t, 300, 40, 90)]
        noisy = [box_of(np.array(b) + rng.normal(0, 2, 4)) for b in truth]
        present = [0, 1]
        if 20 <= f < 24:  # object 0 missed for four frames (0.4 s)
            present = [1]
        d = dets([noisy[i] for i in present], cls=[CAR if i == 0 else PERSON for i in present])
        out = tr.update(d, t)
        for tid, cx in ids_by_x(out).items():
            obj = min(present, key=lambda i: abs((truth[i][0] + truth[i][2]) / 2 - cx))
            seen[obj].add(tid)
        if f >= 2:
            assert len(out) == len(present)
    assert len(seen[0]) == 1 and len(seen[1]) == 1
    assert seen[0] != seen[1]


def test_filtered_boxes_are_smoother_than_the_detections() -> None:
    rng = np.random.default_rng(1)
    tr = ByteTracker()
    err_det, err_out = [], []
    for f in range(80):
        t = f / 10
        truth = np.array(box(100 + 80 * t, 200))
        noisy = truth + rng.normal(0, 4, 4)
        out = tr.update(dets([box_of(noisy)]), t)
        if f > 10:
            err_det.append(float(np.abs(noisy - truth).mean()))
            err_out.append(float(np.abs(out.xyxy[0] - truth).mean()))
    assert np.mean(err_out) < np.mean(err_det)


def test_crossing_objects_keep_distinct_ids() -> None:
    tr = ByteTracker()
    history: dict[int, list[float]] = {}
    for f in range(40):
        t = f / 10
        a = box(100 + 200 * t, 200, 60, 80)  # moving right
        b = box(900 - 200 * t, 225, 60, 80)  # moving left, overlapping a when they cross
        out = tr.update(dets([a, b]), t)
        for tid, cx in ids_by_x(out).items():
            history.setdefault(tid, []).append(cx)
    assert len(history) == 2
    moves = sorted(xs[-1] - xs[0] for xs in history.values())
    assert moves[0] < -600 and moves[1] > 600  # each id stayed on its own object


def test_track_disappears_after_lost_s_and_ids_are_not_reused() -> None:
    tr = ByteTracker(TrackerConfig(lost_s=1.0))
    for f in range(5):
        out = tr.update(dets([box(100, 100)]), f * 0.1)
    first = int(out.tracker_id[0])
    # gone for 0.6 s: the same object comes back with the same id
    tr.update(Detections.empty(), 0.8)
    out = tr.update(dets([box(100, 100)]), 1.0)
    assert list(out.tracker_id) == [first]
    # gone for longer than lost_s: forgotten
    tr.update(Detections.empty(), 1.5)
    tr.update(Detections.empty(), 2.2)
    assert tr.active_tracks == 0
    ids = []
    for f in range(3):
        out = tr.update(dets([box(100, 100)]), 2.3 + f * 0.1)
        ids += [int(i) for i in out.tracker_id]
    assert ids and set(ids) == {ids[0]} and ids[0] != first and ids[0] > first
    tr.reset()
    assert tr.active_tracks == 0
    for f in range(3):
        out = tr.update(dets([box(100, 100)]), f * 0.1)
    assert int(out.tracker_id[0]) > ids[0]


def test_new_tracks_need_min_hits() -> None:
    tr = ByteTracker(TrackerConfig(min_hits=3))
    counts = [len(tr.update(dets([box(100, 100)]), f * 0.1)) for f in range(4)]
    assert counts == [0, 0, 1, 1]
    # a one-frame false positive never gets an id
    tr2 = ByteTracker(TrackerConfig(min_hits=2))
    assert len(tr2.update(dets([box(300, 300)]), 0.0)) == 0
    assert len(tr2.update(Detections.empty(), 0.1)) == 0
    assert len(tr2.update(dets([box(300, 300)]), 0.2)) == 0
    assert tr2.active_tracks == 1


def test_low_score_boxes_extend_tracks_but_never_start_them() -> None:
    tr = ByteTracker()
    for f in range(5):
        out = tr.update(dets([box(100 + 10 * f, 100)], 0.9), f * 0.1)
    tid = int(out.tracker_id[0])
    # the object gets partly hidden: the detector scores it low
    for f in range(5, 15):
        out = tr.update(dets([box(100 + 10 * f, 100)], 0.3), f * 0.1)
        assert list(out.tracker_id) == [tid]
    # low-score boxes alone never start a track
    tr2 = ByteTracker()
    for f in range(20):
        assert len(tr2.update(dets([box(500, 500)], 0.4), f * 0.1)) == 0
    assert tr2.active_tracks == 0
    # below low_thresh, a box is not even used to extend
    out = tr.update(dets([box(250, 100)], 0.05), 1.5)
    assert len(out) == 0


def test_class_consistent_matching() -> None:
    tr = ByteTracker()
    for f in range(4):
        out = tr.update(dets([box(100, 100)], cls=CAR), f * 0.1)
    car_id = int(out.tracker_id[0])
    # a person box right where the car was does not continue the car's track
    out = tr.update(dets([box(100, 100)], cls=PERSON), 0.4)
    assert car_id not in set(out.tracker_id.tolist())
    # a truck (same group as car by default) does; the track keeps reporting "car"
    out = tr.update(dets([box(100, 100)], cls=7), 0.5)
    assert list(out.tracker_id) == [car_id]
    assert int(out.class_id[0]) == CAR


@pytest.mark.parametrize("gaps", [[0.1] * 30, [0.1, 0.5, 0.05, 0.3, 0.2, 0.4] * 5])
def test_variable_dt_prediction_scales_with_time(gaps: list[float]) -> None:
    tr = ByteTracker(TrackerConfig(lost_s=2.0))
    t = 0.0
    ids: set[int] = set()
    speed = 300.0  # px/s: a 60 px box moves 150 px in a 0.5 s gap (no overlap without dt)
    out = Detections.empty()
    for g in gaps:
        t += g
        out = tr.update(dets([box(100 + speed * t, 200)]), t)
        ids |= set(out.tracker_id.tolist())
    assert len(ids) == 1
    # after a 0.6 s miss the prediction has moved on with the object
    t += 0.6
    out = tr.update(dets([box(100 + speed * t, 200)]), t)
    assert set(out.tracker_id.tolist()) == ids
    assert abs(float(out.center[0, 0]) - (100 + speed * t)) < 15


def test_time_going_backwards_is_an_error() -> None:
    tr = ByteTracker()
    tr.update(Detections.empty(), 1.0)
    with pytest.raises(ValueError, match="backwards"):
        tr.update(Detections.empty(), 0.5)


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError, match="min_hits"):
        TrackerConfig(min_hits=0)
    with pytest.raises(ValidationError, match="low_thresh"):
        TrackerConfig(low_thresh=0.6, high_thresh=0.5)
    with pytest.raises(ValidationError, match="extra"):
        TrackerConfig.model_validate({"lost_frames": 30})


def test_greedy_match_takes_best_pairs_first() -> None:
    s = np.array([[0.9, 0.8], [0.85, 0.1]])
    assert sorted(greedy_match(s, 0.2)) == [(0, 0)]  # (1, 1) is below the floor
    assert sorted(greedy_match(s, 0.05)) == [(0, 0), (1, 1)]
    assert greedy_match(np.zeros((0, 3)), 0.1) == []
