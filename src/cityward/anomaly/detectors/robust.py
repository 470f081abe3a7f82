"""A robust statistical detector: the distance of a value from the median of the last values,
in units of their median absolute deviation (MAD). A burst of outliers barely moves the median
and the MAD, so it does not hide itself. After an alarm it stays quiet for ``dead_time`` values
(one alarm per incident)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from pydantic import Field

from cityward.anomaly.detectors import AlarmConfig, DetectorConfig, OneAlarmPerIncident

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation
LOG_SPAN = -math.log(1e-10)


class RobustZConfig(AlarmConfig):
    window: int = Field(default=1000, ge=8, le=100_000, description="Values kept.")
    step: int = Field(
        default=32, ge=1, le=10_000, description="Recompute median and MAD every step values."
    )


class RobustZ(OneAlarmPerIncident):
    name = "robust-z"
    summary = "robust: distance from the rolling median in MADs (outliers do not move it)"
    Config = RobustZConfig

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        assert isinstance(config, RobustZConfig)
        self.cfg = config
        self.values: deque[float] = deque(maxlen=config.window)
        self.since = 0
        self.median = 0.0
        self.mad = 0.0

    def surprise(self, x: float, t: float) -> float:
        if len(self.values) < 8:
            return 0.0
        z = abs(x - self.median) / self.mad
        # two-sided normal tail of the robust z, on a log scale: 0.5 at a tail of 1e-5
        # (z = 4.4), 1 at 1e-10 (z = 6.5)
        tail = math.erfc(z / math.sqrt(2.0))
        return min(-math.log(tail) / LOG_SPAN, 1.0) if tail > 0.0 else 1.0

    def update(self, x: float, t: float) -> None:
        self.values.append(x)
        self.since += 1
        if self.since >= self.cfg.step or len(self.values) <= 8:
            self.since = 0
            a = np.fromiter(self.values, dtype=float, count=len(self.values))
            med = float(np.median(a))
            mad = float(np.median(np.abs(a - med))) * MAD_TO_SIGMA
            if mad <= 0 or not math.isfinite(mad):
                # a constant stretch: any change is news, scaled by the level itself
                mad = max(abs(med) * 1e-3, 1e-9)
            self.median, self.mad = med, mad
