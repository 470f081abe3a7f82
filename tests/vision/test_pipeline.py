"""The pipeline's stages together: motion gating skips the detector on still frames without
letting a face through, and frame skipping keeps the stream time right."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cityward.vision.detections import VEHICLES, Detections
from cityward.vision.pipeline import CameraPipeline
from cityward.vision.settings import CameraSettings, MotionSettings
from cityward.vision.source import Frame, VideoSource
from tests.conftest import shared_path
from tests.vision.attack import attack_frames, find_faces

FACES = "head-pose-face-detection-female-and-male.gif"


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


def test_every_detected_vehicle_has_its_plate_band_hidden_tracked_or_not(models: Path) -> None:
    """The anonymizer was given the tracker's output only: confirmed tracks matched in the
    frame. Every vehicle of a clip's first frame (no track yet), and every car scored between
    the detector's threshold and the tracker's new-track threshold, kept its plate band raw
    (84 bands in 30 frames of this clip)."""
    video = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    pipe = CameraPipeline(camera(motion=MotionSettings(enabled=False)), models, anonymize_all=True)
    seen: list[Detections] = []
    detect = pipe.detector.detect

    def spy(image: np.ndarray[tuple[int, ...], np.dtype[np.uint8]]) -> Detections:
        seen.append(detect(image))
        return seen[-1]

    pipe.detector.detect = spy  # type: ignore[method-assign,assignment]
    cfg = pipe.anonymizer.config
    checked = untracked = 0
    for frame in VideoSource(str(video)):
        if frame.index >= 12:
            break
        raw = frame.image.copy()
        res = pipe.process(frame)
        assert res.anonymized is not None
        vehicles = seen[-1].with_classes(VEHICLES)
        for box in vehicles.xyxy:
            x1, y1, x2, y2 = (int(v) for v in box)
            top = int(y2 - cfg.plate_fraction * (y2 - y1))
            x1, top = max(x1, 0), max(top, 0)
            if x2 - x1 < 20 or y2 - top < 10:
                continue
            same = np.all(raw[top:y2, x1:x2] == res.anonymized[top:y2, x1:x2], axis=2)
            checked += 1
            untracked += len(res.tracks) == 0
            assert same.mean() < 0.5, (frame.index, box, same.mean())
    assert checked >= 20 and untracked >= 2  # the first frame's vehicles were among them


def test_a_looping_file_that_goes_away_is_retried_with_back_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A looping file camera whose file disappeared re-opened it in a busy loop: 77,000 to
    95,000 tries in 2 s, a core at 100 %, and not a line in the log."""
    import shutil
    import threading
    import time

    clip = tmp_path / "loop.gif"
    shutil.copy(shared_path("data", "vision", "videos", "people-detection.gif"), clip)
    stop = threading.Event()
    source = VideoSource(str(clip), loop=True, stop=stop)
    opens = 0
    open_ = source._open

    def counting(first: bool = False) -> bool:
        nonlocal opens
        opens += 1
        return open_(first)

    source._open = counting  # type: ignore[method-assign]

    def play() -> None:
        for frame in source:
            if frame.index == 0:
                clip.unlink()

    player = threading.Thread(target=play, daemon=True)
    player.start()
    time.sleep(2.0)
    stop.set()
    player.join(5)
    assert not player.is_alive()
    assert opens <= 3, opens
    assert f"camera {clip} dropped: reconnecting" in caplog.text


def test_a_camera_that_never_ends_is_started_again_after_a_failure(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A looping (or stream) camera whose thread failed once was marked done, like a file that
    ended: it stood still for good while its worker kept renewing its lease."""
    import time

    from cityward.vision import worker as worker_mod
    from cityward.vision.settings import VisionSettings

    monkeypatch.setattr(worker_mod, "RESTART_S", 0.2)
    calls = 0
    process = CameraPipeline.process

    def once_failing(self: CameraPipeline, frame: Frame, **kw: bool) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a transient failure")
        return process(self, frame, **kw)

    monkeypatch.setattr(CameraPipeline, "process", once_failing)

    class Sink:
        def put(self, entities: Any, *, urgent: bool = False) -> None:
            pass

    clip = shared_path("data", "vision", "videos", "people-detection.gif")
    cam = CameraSettings(id="cam-a", url=str(clip), loop=True, realtime=True, analysis_fps=5)
    worker = worker_mod.VisionWorker(VisionSettings(models_dir=models, cameras=[cam]), Sink())
    worker.start_camera("cam-a")
    first = worker.runners["cam-a"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = worker.runners.get("cam-a")
        if now is not None and now is not first and now.status.frames >= 3:
            break
        time.sleep(0.1)
    try:
        assert first.status.state == "error" and "transient" in first.status.error
        again = worker.runners["cam-a"]
        assert again is not first and again.status.state == "running", again.status
        assert again.status.frames >= 3 and "cam-a" not in worker.done
    finally:
        worker.stop()
    # a camera stopped while it waits to start again stays stopped
    monkeypatch.setattr(worker_mod, "RESTART_S", 1.0)
    calls = 0
    worker = worker_mod.VisionWorker(VisionSettings(models_dir=models, cameras=[cam]), Sink())
    worker.start_camera("cam-a")
    failed = worker.runners["cam-a"]
    deadline = time.monotonic() + 20
    while failed.status.state != "error" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert failed.status.state == "error"
    worker.stop_camera("cam-a")
    time.sleep(1.5)
    assert "cam-a" not in worker.runners
    worker.stop()
