"""Camera credentials never reach the log or the status table.

A camera URL often carries its user and password (``rtsp://admin:pw@host/...``) or a token in
its query. The sources here are real: an RTSP URL on a port where nothing listens (the
reconnect loop logs), and URLs OpenCV cannot open (the errors a status row shows).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cityward.redact import redact, redact_url
from cityward.vision.settings import VisionSettings
from cityward.vision.source import SourceError, VideoSource
from cityward.vision.worker import VisionWorker
from tests.conftest import shared_path

SECRET = "S3cretPass"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("rtsp://admin:S3cretPass@10.0.4.17:554/stream1", "rtsp://***@10.0.4.17:554/stream1"),
        ("rtsp://admin@10.0.4.17/stream1", "rtsp://***@10.0.4.17/stream1"),
        # FFmpeg takes the last '@' before the path: a password with an unencoded '@'
        ("rtsp://admin:S3cret@Pass@10.0.4.17/s", "rtsp://***@10.0.4.17/s"),
        # an unencoded '/' in the password: hiding too much beats showing half of it
        ("rtsp://admin:S3cret/Pass@10.0.4.17/s", "rtsp://***@10.0.4.17/s"),
        (
            "http://10.0.4.17/cgi-bin/mjpg?user=admin&password=S3cretPass&channel=1",
            "http://10.0.4.17/cgi-bin/mjpg?user=***&password=***&channel=1",
        ),
        (
            "https://cam.example.org/live.m3u8?token=S3cretPass;res=hd&access_token=x",
            "https://cam.example.org/live.m3u8?token=***;res=hd&access_token=***",
        ),
        ("rtsp://10.0.4.17/stream1?channel=1", "rtsp://10.0.4.17/stream1?channel=1"),
        ("/srv/videos/street.mp4", "/srv/videos/street.mp4"),
    ],
)
def test_redact_url_masks_user_password_and_secret_parameters(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_masks_every_url_in_a_message() -> None:
    text = "error: 'rtsp://admin:S3cretPass@a/1' and http://b/x?pwd=S3cretPass failed"
    assert redact(text) == "error: 'rtsp://***@a/1' and http://b/x?pwd=*** failed"


class _StopOnFirstRecord(logging.Handler):
    """Ends the source's reconnect loop at its first log line (no back-off is waited for)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__(logging.DEBUG)
        self.stop = stop

    def emit(self, record: logging.LogRecord) -> None:
        self.stop.set()


def test_a_dropped_stream_is_logged_without_its_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stop = threading.Event()
    stopper = _StopOnFirstRecord(stop)
    logger = logging.getLogger("cityward.vision.source")
    logger.addHandler(stopper)
    try:
        with caplog.at_level(logging.INFO, logger="cityward.vision.source"):
            # port 9 (discard): nothing listens, the connection is refused at once
            src = VideoSource(f"rtsp://admin:{SECRET}@127.0.0.1:9/stream1", stop=stop)
            assert list(src) == []
    finally:
        logger.removeHandler(stopper)
    assert src.reconnects >= 1
    assert "camera rtsp://***@127.0.0.1:9/stream1 dropped" in caplog.text
    assert SECRET not in caplog.text and "admin" not in caplog.text


def test_source_errors_do_not_name_the_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a scheme OpenCV does not stream: taken for a file, and not found
    with pytest.raises(SourceError) as missing:
        VideoSource(f"cam://admin:{SECRET}@10.0.4.17/live")
    assert "cam://***@10.0.4.17/live" in str(missing.value)
    # such a "file" that exists (a relative path: cam:/admin:...), which FFmpeg cannot open
    monkeypatch.chdir(tmp_path)
    url = f"cam://admin:{SECRET}@10.0.4.17/live"
    Path(url).parent.mkdir(parents=True)
    Path(url).write_bytes(b"not a video")
    with pytest.raises(SourceError) as unreadable:
        VideoSource(url)
    assert "not a video" in str(unreadable.value)
    for exc in (missing.value, unreadable.value):
        assert SECRET not in str(exc) and "admin" not in str(exc)


def test_the_status_table_and_start_up_checks_hide_the_credentials(tmp_path: Path) -> None:
    models = shared_path("data", "vision", "models")
    url = f"cam://admin:{SECRET}@10.0.4.17/live?token={SECRET}"
    settings = VisionSettings(models_dir=models, cameras=[{"id": "cam1", "url": url}])
    worker = VisionWorker(settings, _NoSink())
    with pytest.raises(SourceError) as checked:
        worker.check_camera("cam1")
    assert SECRET not in str(checked.value) and "admin" not in str(checked.value)
    worker.start_camera("cam1")
    try:
        assert worker.runners["cam1"].finished.wait(60)
        (row,) = worker.status_rows()
    finally:
        worker.stop()
    assert row["state"] == "error"
    assert "cam://***@10.0.4.17/live?token=***" in row["error"]
    assert SECRET not in str(row) and "admin" not in str(row)


class _NoSink:
    def put(self, entities: Sequence[Any], *, urgent: bool = False) -> None:
        pass
