"""Where frames come from: a video file or a network stream, with reconnects.

OpenCV's FFmpeg backend reads files, RTSP and HTTP(S) streams alike. A stream that drops is
reopened with exponential back-off (1 s, 2 s, 4 s ... up to ``reconnect_max_s``); a file ends
(or, with ``loop``, starts again). Frame skipping happens here: frames that will not be
analysed are only *grabbed* (demuxed and decoded by FFmpeg but never converted to a BGR
image), which is the cheap part of decoding.

A camera URL often carries its credentials (``rtsp://user:password@host/...``, or
``?password=`` in the query): logs and error messages name a source by
:func:`cityward.redact.redact_url`, never by its URL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from cityward.redact import redact_url

log = logging.getLogger("cityward.vision.source")

Image = npt.NDArray[np.uint8]


class SourceError(RuntimeError):
    """A source cannot be opened (a missing file, an unreachable stream at the first try)."""


@dataclass
class Frame:
    """One decoded frame: its index in the stream, its time (s since the stream started) and
    the raw BGR image (which never leaves the worker)."""

    index: int
    t: float
    image: Image


def is_stream(url: str) -> bool:
    return url.split("://", 1)[0].lower() in {"rtsp", "rtsps", "rtmp", "http", "https", "udp"}


class VideoSource:
    """Frames of one camera at (at most) ``analysis_fps``.

    ``realtime``: a file is delivered at its own frame rate, as a live camera would (streams
    always are). ``stop``: an event that ends the iteration (checked between frames and
    during back-off waits). ``name``: the URL with its credentials masked, for logs and
    errors (``url`` itself is only given to OpenCV).
    """

    def __init__(
        self,
        url: str,
        *,
        analysis_fps: float | None = None,
        realtime: bool = False,
        loop: bool = False,
        reconnect_max_s: float = 30.0,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.name = redact_url(url)
        self.stream = is_stream(url)
        if not self.stream and not Path(url).is_file():
            raise SourceError(f"video file {self.name!r} not found")
        self.analysis_fps = analysis_fps
        self.realtime = realtime
        self.loop = loop
        self.reconnect_max_s = reconnect_max_s
        self.stop = stop or threading.Event()
        self._clock = clock
        self.fps = 0.0
        self.size = (0, 0)
        self.frame_count = 0
        self.reconnects = 0
        self.decoded = 0  # frames converted to images
        self.grabbed = 0  # frames read from the stream, images or not
        self._cap: cv2.VideoCapture | None = None
        self._open(first=True)

    def _open(self, first: bool = False) -> bool:
        cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG)
        if not cap.isOpened():
            cap.release()
            if first and not self.stream:
                raise SourceError(f"{self.name!r} is not a video OpenCV can read")
            return False
        self._cap = cap
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if not (0 < self.fps < 1000):
            self.fps = 25.0
        self.size = (
            int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        self.frame_count = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        return True

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _reconnect(self) -> bool:
        """Reopen a dropped stream with back-off; False when stopped meanwhile."""
        self.close()
        delay = 1.0
        while not self.stop.is_set():
            self.reconnects += 1
            log.warning("camera %s dropped: reconnecting in %.0f s", self.name, delay)
            if self.stop.wait(delay):
                return False
            if self._open():
                log.info("camera %s: reconnected", self.name)
                return True
            delay = min(delay * 2, self.reconnect_max_s)
        return False

    def __iter__(self) -> Iterator[Frame]:
        step = 1.0 / self.analysis_fps if self.analysis_fps else 0.0
        index = -1  # frames of the stream so far (over reconnects and loops)
        offset = 0.0  # time added after a loop or a reconnect
        next_t = 0.0
        started = self._clock()
        last_t = 0.0
        grabbed_at_open = 0
        while not self.stop.is_set():
            cap = self._cap
            if cap is None or not cap.grab():
                if self.stream:
                    if not self._reconnect():
                        return
                    offset = self._clock() - started
                    continue
                if self.loop and self.grabbed:
                    self.close()
                    # the file gone (replaced, an unmounted share) or without a frame since it
                    # was last opened: tried again with back-off and a log line, not
                    # re-opened in a busy loop
                    fresh = self.grabbed > grabbed_at_open
                    if not (fresh and self._open()) and not self._reconnect():
                        return
                    grabbed_at_open = self.grabbed
                    offset = last_t + 1.0 / self.fps
                    continue
                return
            index += 1
            self.grabbed += 1
            if self.stream:
                t = self._clock() - started
            else:
                t = offset + (cap.get(cv2.CAP_PROP_POS_FRAMES) - 1) / self.fps
            last_t = t
            if step and t + 1e-6 < next_t:
                continue  # skipped: grabbed, never converted
            ok, image = cap.retrieve()
            if not ok or image is None:
                continue
            next_t = (next_t + step) if step and t - next_t < step else t + step
            self.decoded += 1
            if self.realtime and not self.stream:
                wait = started + t - self._clock()
                if wait > 0 and self.stop.wait(wait):
                    return
            yield Frame(index, t, np.asarray(image, np.uint8))
