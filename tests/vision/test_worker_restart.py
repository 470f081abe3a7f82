"""A failed camera's restart back-off starts over once the camera has run well for a while.

A looping camera that fails is started again after a back-off that doubles up to
``RESTART_MAX_S``. The back-off never came down: a camera that had failed a few times at
start (its video unreadable for a while), then ran well for hours, waited the longest back-off
at its next failure instead of the first. Now a camera that ran for ``RESTART_MAX_S`` before
failing starts over at ``RESTART_S``; one that fails soon after starting keeps doubling.

Real camera runners on a real video file: unreadable at first (not a video), then the clip;
the later failures are the sink's (a full disk). The worker's clock is injected, so "ran for a
long while" costs no waiting; the back-off delays are read from the worker's log records and
the attempts counted there, never timed. The timers' real delays are scaled down (as in
tests/vision/test_leases.py).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from cityward.vision import worker as vision_worker
from cityward.vision.settings import VisionSettings
from cityward.vision.worker import VisionWorker
from tests.conftest import shared_path

RESTART_S, RESTART_MAX_S = 0.1, 0.8


class _Clock:
    """The worker's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _DiskFullSink:
    """Takes everything, except one ``put`` after :meth:`fail_next`: a full disk."""

    def __init__(self) -> None:
        self.fail = threading.Event()
        self.failures = 0

    def fail_next(self) -> None:
        self.fail.set()

    def put(self, entities: Sequence[Any], *, urgent: bool = False) -> None:
        if self.fail.is_set():
            self.fail.clear()
            self.failures += 1
            raise OSError(errno.ENOSPC, "No space left on device")


def _wait(pred: Callable[[], bool], what: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"gave up waiting: {what}"
        time.sleep(0.02)


def _delays(caplog: pytest.LogCaptureFixture, what: str) -> list[float]:
    """The back-off of each restart the worker scheduled (``what``: failed, could not start)."""
    out: list[float] = []
    for r in caplog.records:
        if r.name == "cityward.vision.worker" and "starting it again" in str(r.msg):
            assert isinstance(r.args, tuple)
            _, why, _, delay = r.args
            if why == what:
                assert isinstance(delay, float)
                out.append(delay)
    return out


def _starts(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage() == "camera cam1: started")


def test_the_back_off_starts_over_after_a_long_good_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(vision_worker, "RESTART_S", RESTART_S)
    monkeypatch.setattr(vision_worker, "RESTART_MAX_S", RESTART_MAX_S)
    models = shared_path("data", "vision", "models")
    clip = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    video = tmp_path / "cam1.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42 but not a video at all" * 100)
    cams = [
        {"id": "cam1", "url": str(video), "loop": True, "realtime": True, "analysis_fps": 2,
         "interval_s": 1},
    ]  # fmt: skip
    sink = _DiskFullSink()
    clock = _Clock()
    worker = VisionWorker(VisionSettings(models_dir=models, cameras=cams), sink, clock=clock)

    def row() -> dict[str, Any]:
        (r,) = worker.status_rows()
        return r

    def failed() -> list[float]:
        return _delays(caplog, "failed")

    caplog.set_level(logging.INFO, logger="cityward.vision.worker")
    worker.start_camera("cam1")
    try:
        # 1. the video unreadable: each start fails at once, the back-off doubles to its max
        _wait(lambda: len(failed()) >= 5, "five failed starts")
        assert failed()[:5] == [0.1, 0.2, 0.4, 0.8, 0.8]
        assert "not a video" in caplog.text
        # 2. the video readable again: the camera runs, and runs well for a long while
        link = tmp_path / "cam1.tmp"
        link.symlink_to(clip)
        os.replace(link, video)
        _wait(lambda: row()["state"] == "running" and row()["frames"] > 0, "the camera runs")
        before = len(failed())
        starts = _starts(caplog)
        clock.now += 10 * RESTART_MAX_S
        # 3. then it fails (the disk full): the first back-off again, not the longest
        sink.fail_next()
        _wait(lambda: len(failed()) > before, "the camera fails")
        assert failed()[before] == RESTART_S, failed()
        assert row()["state"] == "error" and "No space left on device" in row()["error"]
        # started again after that short back-off
        _wait(lambda: _starts(caplog) > starts, "the camera starts again")
        _wait(lambda: row()["state"] == "running" and row()["frames"] > 0, "it runs again")
        # 4. failing at once after that (no time passed on the clock): the back-off doubles
        sink.fail_next()
        _wait(lambda: len(failed()) > before + 1, "the camera fails again")
        assert failed()[before + 1] == 2 * RESTART_S, failed()
        _wait(lambda: row()["state"] == "running", "it runs once more")
    finally:
        worker.stop()
    assert sink.failures == 2


def _started_on_the_street_clip(sink: Any, caplog: pytest.LogCaptureFixture) -> VisionWorker:
    """A worker with one camera, cam1, looping the street clip into ``sink``, started, its log
    captured at INFO."""
    models = shared_path("data", "vision", "models")
    clip = shared_path("data", "vision", "videos", "street_cars_ahmetozlu.mp4")
    cams = [{"id": "cam1", "url": str(clip), "loop": True, "interval_s": 1, "analysis_fps": 2}]
    worker = VisionWorker(VisionSettings(models_dir=models, cameras=cams), sink)
    caplog.set_level(logging.INFO, logger="cityward.vision.worker")
    worker.start_camera("cam1")
    return worker


def test_a_sink_failing_as_the_camera_ends_still_restarts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The sink failing on the camera's last counts (the disk still full) ended the camera's
    thread before the worker heard of the failure: the camera stood still for good, its lease
    renewed. It is started again like any failed camera."""
    monkeypatch.setattr(vision_worker, "RESTART_S", RESTART_S)
    monkeypatch.setattr(vision_worker, "RESTART_MAX_S", RESTART_MAX_S)

    class _FullDisk(_DiskFullSink):
        """Fails every put while ``full`` is set."""

        def __init__(self) -> None:
            super().__init__()
            self.full = threading.Event()

        def put(self, entities: Sequence[Any], *, urgent: bool = False) -> None:
            if self.full.is_set():
                self.failures += 1
                raise OSError(errno.ENOSPC, "No space left on device")

    sink = _FullDisk()
    worker = _started_on_the_street_clip(sink, caplog)
    try:
        _wait(lambda: worker.status_rows()[0]["frames"] > 0, "the camera runs")
        sink.full.set()
        _wait(lambda: len(_delays(caplog, "failed")) >= 1, "the failure is handled", 20)
        starts = _starts(caplog)
        _wait(lambda: _starts(caplog) > starts, "the camera is started again")
        sink.full.clear()
        _wait(
            lambda: (
                worker.status_rows()[0]["state"] == "running"
                and worker.status_rows()[0]["frames"] > 0
            ),
            "it runs",
        )
    finally:
        worker.stop()


def test_a_camera_failure_that_quotes_a_url_is_logged_masked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The status row masked the credentials of a failure's message, but the log's traceback
    repeated the exception as it was: a failure that quotes a URL (OpenCV's, or a sink's
    database) wrote its password into the log. The traceback is logged masked too."""
    monkeypatch.setattr(vision_worker, "RESTART_S", 60.0)  # no restart during the test
    url = "rtsp://admin:S3cretPass@10.0.4.17/stream1?token=S3cretTok"

    class _Unreachable(_DiskFullSink):
        def put(self, entities: Sequence[Any], *, urgent: bool = False) -> None:
            if self.fail.is_set():
                self.fail.clear()
                raise ConnectionError(f"cannot write to {url}: connection refused")

    sink = _Unreachable()
    worker = _started_on_the_street_clip(sink, caplog)
    try:
        _wait(lambda: worker.status_rows()[0]["frames"] > 0, "the camera runs")
        sink.fail_next()
        _wait(lambda: len(_delays(caplog, "failed")) >= 1, "the failure is handled")
        row = worker.status_rows()[0]
    finally:
        worker.stop()
    assert "rtsp://***@10.0.4.17/stream1?token=***" in row["error"]
    logged = "\n".join(
        r.getMessage() + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    )
    assert "Traceback" in logged and "ConnectionError" in logged  # still there, to debug
    assert "rtsp://***@10.0.4.17/stream1?token=***" in logged
    assert "S3cret" not in logged and "admin" not in logged
