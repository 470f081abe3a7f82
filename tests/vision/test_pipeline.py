"""The pipeline's stages together: motion gating skips the detector on still frames without
letting a face through, and frame skipping keeps the stream time right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cityward.vision.pipeline import CameraPipeline
from cityward.vision.settings import CameraSettings, MotionSettings
from cityward.vision.source import Frame, VideoSource
from tests.conftest import shared_path
from tests.vision.attack import attack_frames, find_faces

FACES = "head-pose-face-detection-female-and-male.gif"


@pytest.fixture(scope="module")
def models() -> Path:
    return shared_path("data", "vision", "models")


def still_clip(n: int, seed: int = 1) -> list[np.ndarray[tuple[int, ...], np.dtype[np.uint8]]]:
    """The first frame of the faces clip, ``n`` times, with sensor noise."""
    path = shared_path("data", "vision", "videos", FACES)
    first = next(iter(VideoSource(str(path)))).image
    rng = np.random.default_rng(seed)
    noisy = first.astype(np.float32) + rng.normal(0, 2.0, (n, *first.shape))
    return [np.clip(f, 0, 255).astype(np.uint8) for f in noisy]


def camera(**kw: object) -> CameraSettings:
    return CameraSettings.model_validate({"id": "t", "url": "x.mp4", **kw})


def test_still_frames_skip_the_detectors_but_stay_anonymized(models: Path) -> None:
    clip = still_clip(30)
    assert len(find_faces(clip[0])) >= 2  # two faces to hide
    pipe = CameraPipeline(camera(motion=MotionSettings(max_skip_s=1.0)), models, anonymize_all=True)
    out = []
    for i, img in enumerate(clip):
        res = pipe.process(Frame(i, i / 12.5, img.copy()))
        assert res.anonymized is not None
        out.append(res.anonymized)
    # 2.4 s of a still scene: the first frame and one forced refresh a second
    assert pipe.detections_run <= 4
    assert pipe.anonymizer.stats.frames == 30
    report = attack_frames(out, plates=False)
    assert report.faces == [], report.summary()


def test_a_snapshot_of_a_still_scene_searches_for_faces(models: Path) -> None:
    """Counting mode anonymizes only the frames that leave (snapshots): a still frame that
    follows frames nobody anonymized must not trust held faces it never looked for."""
    clip = still_clip(6)
    pipe = CameraPipeline(camera(motion=MotionSettings(max_skip_s=60)), models)
    for i, img in enumerate(clip[:5]):
        assert pipe.process(Frame(i, i / 12.5, img.copy())).anonymized is None
    res = pipe.process(Frame(5, 5 / 12.5, clip[5].copy()), want_image=True)
    assert not res.detected  # the gate held the detector back
    assert res.anonymized is not None
    assert attack_frames([res.anonymized], plates=False).faces == []


def test_frame_skipping_keeps_stream_time() -> None:
    path = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    src = VideoSource(str(path), analysis_fps=5)
    times = [f.t for f in src]
    assert src.grabbed == 905 and 185 <= src.decoded <= 192
    gaps = np.diff(times)
    assert abs(float(np.median(gaps)) - 0.2) < 0.03
    assert times[-1] == pytest.approx(903 / src.fps, abs=0.25)
