"""The windowed-Gaussian baseline (NAB's ``windowedGaussian``): how far a value lies in the tail
of a normal distribution fitted to the last ``window`` values."""

from __future__ import annotations

import math
from collections import deque

from pydantic import Field

from cityward.anomaly.detectors import Detector, DetectorConfig


class WindowedGaussianConfig(DetectorConfig):
    window: int = Field(default=6400, ge=2, le=1_000_000, description="Values in the window.")
    step: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Refit the mean and deviation every step values.",
    )


class WindowedGaussian(Detector):
    name = "windowed-gaussian"
    summary = "baseline: tail probability under a normal fit to the last values"
    Config = WindowedGaussianConfig

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        assert isinstance(config, WindowedGaussianConfig)
        self.window: deque[float] = deque(maxlen=config.window)
        self.step = config.step
        self.since_fit = 0
        self.mean = 0.0
        self.std = 1.0

    def score_one(self, x: float, t: float) -> float:
        if len(self.window) < 2:
            return 0.0
        # x - mean and the deviation may both be inf near the limits of a double: then the
        # value is as far out as the window's own spread allows us to tell, no news
        z = abs(x - self.mean) / self.std
        if math.isnan(z):
            return 0.0
        # two-sided tail probability, as a score: 1 - P(|Z| > z)
        return 1.0 - math.erfc(z / math.sqrt(2.0))

    def learn_one(self, x: float, t: float) -> None:
        self.window.append(x)
        self.since_fit += 1
        if self.since_fit >= self.step or len(self.window) <= self.step:
            self.since_fit = 0
            n = len(self.window)
            scale = 1.0
            try:
                m = sum(self.window) / n
                var = sum((v - m) ** 2 for v in self.window) / n
                if not math.isfinite(var):
                    raise OverflowError
            except OverflowError:
                # values near 1e200 overflow the squares (``**`` raises), sums near 1e308
                # the mean: fitted again on the values scaled to at most 1
                scale = max(max(self.window), -min(self.window))
                m = sum(v / scale for v in self.window) / n
                var = sum((v / scale - m) * (v / scale - m) for v in self.window) / n
            self.mean = m * scale
            self.std = math.sqrt(var) * scale if var > 0 else 1e-6
