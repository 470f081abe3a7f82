"""Motion gating: skip the detector where nothing moves.

Most city cameras look at a scene that is still most of the time (a quiet street at night, a
tunnel between cars). The gate compares a small grey copy of each frame with a slowly updated
background; when too few pixels changed, the frame is not worth a detector run and the
pipeline keeps the tracks it has (a stopped car stays where it was, its timers go on). A
detection is forced at least every ``max_skip_s`` so that slow changes are not missed.
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt

from cityward.vision.settings import MotionSettings


class MotionGate:
    """Says, frame by frame, whether something moved since the gate last looked."""

    def __init__(self, settings: MotionSettings) -> None:
        self.settings = settings
        self._background: npt.NDArray[np.float32] | None = None
        self._last_pass = -1e18
        self.fraction = 0.0  # changed fraction of the last frame looked at

    def reset(self) -> None:
        self._background = None
        self._last_pass = -1e18

    def moving(self, frame: npt.NDArray[np.uint8], t: float) -> bool:
        """True when ``frame`` (at ``t`` s) should go to the detector."""
        s = self.settings
        if not s.enabled:
            return True
        h, w = frame.shape[:2]
        small_h = max(8, round(h * s.width / w))
        grey = cv2.cvtColor(
            cv2.resize(frame, (s.width, small_h), interpolation=cv2.INTER_AREA),
            cv2.COLOR_BGR2GRAY,
        )
        grey = cv2.GaussianBlur(grey, (5, 5), 0)
        if self._background is None or self._background.shape != grey.shape:
            self._background = grey.astype(np.float32)
            self._last_pass = t
            self.fraction = 1.0
            return True
        diff = cv2.absdiff(grey, cv2.convertScaleAbs(self._background))
        self.fraction = float(np.count_nonzero(diff > s.pixel_threshold)) / diff.size
        # a slow background: moving objects do not become background while they pass
        cv2.accumulateWeighted(grey.astype(np.float32), self._background, 0.05)
        if self.fraction >= s.min_fraction or t - self._last_pass >= s.max_skip_s:
            self._last_pass = t
            return True
        return False
