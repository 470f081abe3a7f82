"""cityward's detector: several cheap forecasts of the next value, the surprise of each turned
into a likelihood against its own history; a value is anomalous when the forecasts that should
have expected it did not.

Per value, in constant time and memory (plain floats: faster than NumPy one value at a time):

1. *Forecasts.* Three views of what the value should be:
   - the level: a slow exponentially weighted mean (sudden shifts, spikes);
   - the step: the previous value (jumps that the level view averages away);
   - the time of day: an exponentially weighted mean per slot of the day, once a day has been
     seen (daily patterns: rush hours are normal, a rush hour at 3 am is not).
   Each view's error is divided by the running mean absolute error of that view, so a noisy
   stream needs a bigger error than a quiet one.
2. *Likelihood.* As in Numenta's anomaly likelihood, a single large error is less telling than
   a run of them: the mean of the last ``short`` normalised errors is compared with the long-run
   distribution of that mean (running mean and variance), and its Gaussian tail probability is
   the likelihood that something changed.
3. *Score.* The most accurate forecaster decides (``combine="best"``): once the time-of-day
   view forecasts better than the level (smaller mean error), its surprise alone is the score,
   so a value the daily pattern explains, such as the morning rush, is not an anomaly however
   sudden, and a value it does not, such as a rush at 3 am, is one however ordinary elsewhere
   in the day. Otherwise (and until the time-of-day view has learnt ``warmup`` errors) the
   larger surprise of the level and step views. Surprise is the -log
   of the tail probability, scaled so that 0.5 is a tail of 1e-5 and 1 a tail of 1e-10.
4. *Beyond the range.* Once a day has been seen, a value outside the range of every value so
   far, by more than ``spatial`` of that range and by more than ``spatial_noise`` mean
   absolute deviations of the level view, scores 1 (the "spatial anomaly" of Numenta's NAB
   detector, whose 5 % margin ``spatial`` is; the noise margin keeps the record highs of plain
   noise from alarming: without it three in four noisy test streams alarmed within four days).
5. *Dead time.* After a score above ``alarm`` the detector stays quiet for ``dead_time`` values:
   one incident, one alarm; the repeats add nothing for an operator.

During the first ``warmup`` values the detector learns and scores 0.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from pydantic import Field

from cityward.anomaly.detectors import AlarmConfig, DetectorConfig, OneAlarmPerIncident

DAY_S = 86_400.0
LOG_FLOOR = math.log(1e-10)  # -log of the smallest tail probability told apart


class EnsembleConfig(AlarmConfig):
    warmup: int = Field(default=150, ge=10, le=100_000, description="Values learnt before scoring.")
    slow: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="Weight of a new value in the level."
    )
    err_rate: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="Weight of a new error in the error scales."
    )
    short: int = Field(default=12, ge=1, le=1000, description="Errors averaged for the likelihood.")
    long_rate: float = Field(
        default=0.0005, gt=0.0, lt=1.0, description="Weight of a new value in the long-run stats."
    )
    slots: int = Field(default=96, ge=4, le=10_000, description="Slots of the day (96: 15 min).")
    spatial: float = Field(
        default=0.05,
        ge=0.0,
        le=10.0,
        description="Once a day has been seen, a value beyond the range of every value so far "
        "by more than this share of the range (and by spatial_noise) scores 1; 0: off.",
    )
    spatial_noise: float = Field(
        default=2.0,
        ge=0.0,
        le=100.0,
        description="The same value must also be this many mean absolute deviations of the "
        "level view beyond the range.",
    )
    combine: Literal["best", "max"] = Field(
        default="best",
        description="'best': the time-of-day view alone once it forecasts better than the "
        "level, else the larger of level and step; 'max': the largest of the three.",
    )


class _View:
    """Running scale of one forecast's errors and the likelihood of its recent mean."""

    __slots__ = ("long_mean", "long_var", "mae", "n", "recent", "recent_sum", "short")

    def __init__(self, short: int) -> None:
        self.mae = 0.0
        self.n = 0
        self.short = short
        self.recent: deque[float] = deque(maxlen=short)
        self.recent_sum = 0.0
        self.long_mean = 0.0
        self.long_var = 0.0

    def surprise(self, err: float) -> float:
        """-log tail probability of the recent mean error including ``err`` (not learnt)."""
        if self.n < 2 or self.mae <= 0.0:
            return 0.0
        e = _capped(err) / self.mae
        rec = self.recent
        s = self.recent_sum + e - (rec[0] if len(rec) == self.short else 0.0)
        mean = s / min(len(rec) + 1, self.short)
        sd = math.sqrt(self.long_var) if self.long_var > 0 else 1.0
        z = (mean - self.long_mean) / sd
        if z <= 0.0:
            return 0.0
        tail = 0.5 * math.erfc(z / math.sqrt(2.0))
        return -math.log(tail) if tail > 1e-10 else -LOG_FLOOR

    def learn(self, err: float, err_rate: float, long_rate: float) -> None:
        err = _capped(err)
        self.n += 1
        # a plain running mean until 1/rate values are in, then exponentially weighted
        err_rate = max(err_rate, 1.0 / self.n)
        long_rate = max(long_rate, 1.0 / self.n)
        self.mae += err_rate * (err - self.mae)
        if self.mae <= 0.0:
            return
        e = err / self.mae
        rec = self.recent
        if len(rec) == self.short:
            self.recent_sum -= rec[0]
        rec.append(e)
        self.recent_sum += e
        mean = self.recent_sum / len(rec)
        if self.n == 1:
            self.long_mean = mean
        d = mean - self.long_mean
        self.long_mean += long_rate * d
        self.long_var = (1.0 - long_rate) * (self.long_var + long_rate * d * d)


# Errors are capped here: between two readings near the double's limits (1e308, then
# -1e308: sentinels some devices send) the error is infinite, the mean absolute error became
# inf, then inf - inf = nan, and every later value scored 1.0: an alarm for ever.
_ERR_CAP = 1e300


def _capped(err: float) -> float:
    return err if err <= _ERR_CAP else _ERR_CAP  # also inf; nan compares false: capped too


class Ensemble(OneAlarmPerIncident):
    name = "ensemble"
    summary = (
        "cityward's own: level, step and time-of-day forecasts, each error's likelihood "
        "against its history; what the daily pattern explains is not news; a value far "
        "beyond every value so far is; one alarm per incident"
    )
    Config = EnsembleConfig

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        assert isinstance(config, EnsembleConfig)
        self.cfg = config
        self.n = 0
        self.mean = 0.0
        self.prev = 0.0
        self.profile: list[float | None] = [None] * config.slots
        self.first_t: float | None = None
        self.views = [_View(config.short) for _ in range(3)]
        self.lo = math.inf  # the range of every value so far (the spatial rule)
        self.hi = -math.inf

    def _errors(self, x: float, t: float) -> tuple[float, float, float | None]:
        slot = int((t % DAY_S) / DAY_S * self.cfg.slots)
        p = self.profile[slot]
        day = p is not None and self.first_t is not None and t - self.first_t >= DAY_S
        return (
            abs(x - self.mean),
            abs(x - self.prev),
            abs(x - p) if day and p is not None else None,
        )

    def surprise(self, x: float, t: float) -> float:
        if self.n < self.cfg.warmup:
            return 0.0
        if self._beyond_range(x, t):
            return 1.0
        errs = self._errors(x, t)
        got = [v.surprise(e) for v, e in zip(self.views, errs, strict=True) if e is not None]
        level, _, day = self.views
        if self.cfg.combine == "max":
            best = max(got)
        elif len(got) == 3 and day.n >= self.cfg.warmup and day.mae < level.mae:
            # the daily pattern forecasts better than the level: it alone says what is normal.
            # Not before the view has learnt ``warmup`` errors of its own: on the first values
            # of the second day its error statistics rest on a handful of values, and a quarter
            # of plain noisy 5-minute streams raised a false alarm there.
            best = got[2]
        else:
            best = max(got[0], got[1])
        # -log tail probability 0..23 -> 0..1; 0.5 at a tail of 1e-5
        return min(best / -LOG_FLOOR, 1.0)

    def _beyond_range(self, x: float, t: float) -> bool:
        cfg = self.cfg
        if cfg.spatial <= 0.0 or self.first_t is None or t - self.first_t < DAY_S:
            return False
        margin = max((self.hi - self.lo) * cfg.spatial, cfg.spatial_noise * self.views[0].mae)
        return x > self.hi + margin or x < self.lo - margin

    def update(self, x: float, t: float) -> None:
        cfg = self.cfg
        if self.n == 0:
            self.mean = self.prev = x
            self.first_t = t
        errs = self._errors(x, t)
        for v, e in zip(self.views, errs, strict=True):
            if e is not None:
                v.learn(e, cfg.err_rate, cfg.long_rate)
        self.mean += cfg.slow * (x - self.mean)
        if x < self.lo:
            self.lo = x
        if x > self.hi:
            self.hi = x
        self.prev = x
        slot = int((t % DAY_S) / DAY_S * cfg.slots)
        p = self.profile[slot]
        self.profile[slot] = x if p is None else p + 0.1 * (x - p)
        self.n += 1
