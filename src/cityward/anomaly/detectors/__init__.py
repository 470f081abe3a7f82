"""Anomaly detectors: self-registering plugins with a typed configuration.

A detector watches one stream of numbers (one attribute of one entity). For every new value it
first gives a score (:meth:`Detector.score_one`: in [0, 1], higher is more anomalous, computed
from the past only) and then learns the value (:meth:`Detector.learn_one`). Nothing a detector
does may depend on values it has not been given yet (no look-ahead), the same seed gives the
same scores, and its memory does not grow with the length of the stream.

``cityward anomaly detectors`` lists what is registered here.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from cityward.plugins import register

REGISTRY: dict[str, type[Detector]] = {}
#: the platform's default detector (``--detector default``)
DEFAULT = "ensemble"


class DetectorConfig(BaseModel):
    """Settings of a detector."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(default=0, description="Seed of any randomness (same seed, same scores).")


class Detector(abc.ABC):
    """Scores one stream of values, one value at a time."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig
    #: how the alert service reads the scores by default: the score of an alarm, and how many
    #: values in a row must reach it (a smooth tail probability needs a run to be believed; a
    #: detector that reports one spike per incident, then stays quiet, needs 1)
    alert_threshold: ClassVar[float] = 0.999
    alert_open_after: ClassVar[int] = 3

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register(REGISTRY, cls, "detector")

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config

    @abc.abstractmethod
    def score_one(self, x: float, t: float) -> float:
        """How anomalous value ``x`` at time ``t`` (Unix seconds) is, in [0, 1], given the
        values learnt so far. Does not change the detector."""

    @abc.abstractmethod
    def learn_one(self, x: float, t: float) -> None:
        """Take value ``x`` at time ``t`` into the detector's model of normal."""

    def level(self, x: float, t: float) -> float:
        """How anomalous ``x`` is with any alarm suppression set aside (a detector that goes
        quiet after an alarm still tells here whether the incident goes on). The alert service
        closes an incident once this has been normal for a while. Does not change the
        detector; by default the score itself."""
        return self.score_one(x, t)

    def process(self, x: float, t: float) -> float:
        """Score ``x``, then learn it: one step of a stream."""
        s = self.score_one(x, t)
        self.learn_one(x, t)
        return s


class AlarmConfig(DetectorConfig):
    """Settings of a detector that reports one alarm per incident."""

    alarm: float = Field(default=0.5, gt=0.0, le=1.0, description="Score that starts dead time.")
    dead_time: int = Field(
        default=100, ge=0, le=100_000, description="Quiet values after an alarm."
    )


class OneAlarmPerIncident(Detector):
    """A detector that reports one alarm per incident: after a score of at least ``alarm`` it
    scores 0 for ``dead_time`` values (the repeats add nothing for an operator), while
    :meth:`level` still tells whether the stream is anomalous.

    Subclasses compute the level (:meth:`surprise`) and learn a value (:meth:`update`). The
    level of a value is computed once, however many of ``level``, ``score_one``, ``learn_one``
    ask for it (the alert service asks all three).
    """

    Config: ClassVar[type[DetectorConfig]] = AlarmConfig
    alert_threshold: ClassVar[float] = 0.5  # the alarm level that starts the dead time
    alert_open_after: ClassVar[int] = 1  # one value per incident scores high

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__(config)
        assert isinstance(config, AlarmConfig)
        self.alarm_cfg = config
        self.quiet = 0
        self._last: tuple[float, float, float] | None = None  # x, t, its level

    @abc.abstractmethod
    def surprise(self, x: float, t: float) -> float:
        """The level of ``x`` at ``t``, in [0, 1]. Does not change the detector."""

    @abc.abstractmethod
    def update(self, x: float, t: float) -> None:
        """Learn ``x`` at ``t``."""

    def level(self, x: float, t: float) -> float:
        last = self._last
        if last is None or last[0] != x or last[1] != t:
            last = self._last = (x, t, self.surprise(x, t))
        return last[2]

    def score_one(self, x: float, t: float) -> float:
        return 0.0 if self.quiet > 0 else self.level(x, t)

    def learn_one(self, x: float, t: float) -> None:
        score = self.score_one(x, t)
        if self.quiet > 0:
            self.quiet -= 1
        elif score >= self.alarm_cfg.alarm:
            self.quiet = self.alarm_cfg.dead_time
        self.update(x, t)
        self._last = None


def create(name: str, config: dict[str, Any] | None = None) -> Detector:
    """A registered detector by name (``default``: the platform's default), config validated."""
    load_builtin()
    if name == "default":
        name = DEFAULT
    cls = REGISTRY.get(name)
    if cls is None:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"no detector named {name!r}; registered: {known}, default")
    return cls(cls.Config.model_validate(config or {}))


def load_builtin() -> dict[str, type[Detector]]:
    """Import the built-in detectors (they register themselves)."""
    from cityward.anomaly.detectors import ensemble, gaussian, robust  # noqa: F401

    return REGISTRY
