"""Actuated control as SUMO's ``actuated`` programs do it: the network's phases in order, each
green extended while vehicles keep arriving (gap-out), between its minDur and maxDur.

A green ends once no vehicle on its approaches will reach the stop line within ``gap`` seconds
(SUMO's max-gap, 3 s by default) or when it reaches the phase's maxDur; phases without
minDur/maxDur in the network use the safety minimum green and ``max_green``. Like SUMO's
actuated logic it never skips a phase out of turn.
"""

from __future__ import annotations

from pydantic import Field

from cityward.traffic.backend import Phase
from cityward.traffic.controllers import Controller, ControllerConfig
from cityward.traffic.controllers.adaptive import time_to


class ActuatedConfig(ControllerConfig):
    gap: float = Field(
        default=3.0, ge=0.5, le=10.0, description="Seconds between vehicles that end a green."
    )
    max_green: float = Field(
        default=60.0, ge=10.0, le=300.0, description="Longest green when the network sets none."
    )


class Actuated(Controller):
    name = "actuated"
    summary = "SUMO-style actuated: program order, each green extended while vehicles arrive"
    Config = ActuatedConfig

    def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
        assert isinstance(self.config, ActuatedConfig)
        cfg = self.config
        if current.max_dur > current.min_dur:  # the network's own actuated bounds
            shortest, longest = current.min_dur, current.max_dur
        else:  # a static program: the safety layer's minimum green, then ``max_green``
            shortest, longest = 0.0, cfg.max_green
        if green_for < shortest:
            return None
        if green_for < longest:
            lanes = {i for i, _ in self.x.lanes_of(current)}
            if any(time_to(d, v) <= cfg.gap for i in lanes for d, v in self.backend.approaching(i)):
                return None
        greens = self.x.greens
        n = next(i for i, g in enumerate(greens) if g.index == current.index)
        return greens[(n + 1) % len(greens)]
