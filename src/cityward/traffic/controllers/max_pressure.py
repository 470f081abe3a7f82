"""Max pressure (Varaiya 2013): serve the phase whose movements have the most pressure.

The pressure of a movement is the number of vehicles on its incoming lane (and the lanes
feeding it, up to the detection reach of the backend) minus those on its outgoing lane; a
phase's pressure is the sum over the movements it gives green. Each time the current green may
end (after the minimum green, every ``interval`` seconds), the phase with the highest pressure
is chosen; ties keep the current phase.
"""

from __future__ import annotations

from pydantic import Field

from cityward.traffic.backend import Phase
from cityward.traffic.controllers import Controller, ControllerConfig


class MaxPressureConfig(ControllerConfig):
    interval: float = Field(default=5.0, ge=1.0, le=60.0, description="Seconds between choices.")


class MaxPressure(Controller):
    name = "max-pressure"
    summary = "the phase with the most queued vehicles in, minus vehicles out (Varaiya 2013)"
    Config = MaxPressureConfig

    def pressure(self, phase: Phase) -> int:
        b = self.backend
        return sum(
            sum(b.count(lane) for lane, _ in b.approach(i)) - (b.count(o) if o else 0)
            for i, o in self.x.lanes_of(phase)
        )

    def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
        assert isinstance(self.config, MaxPressureConfig)
        if green_for % self.config.interval >= 1.0:
            return None
        best, best_p = current, self.pressure(current)
        for g in self.x.greens:
            if g.index != current.index:
                p = self.pressure(g)
                if p > best_p:
                    best, best_p = g, p
        return best
