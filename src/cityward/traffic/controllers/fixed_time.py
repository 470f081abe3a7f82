"""Fixed time: the network's own program, each green for its programmed duration."""

from __future__ import annotations

from cityward.traffic.backend import Phase
from cityward.traffic.controllers import Controller


class FixedTime(Controller):
    name = "fixed-time"
    summary = "the network's signal programs: each green for its programmed duration, in order"

    def decide(self, now: float, current: Phase, green_for: float) -> Phase | None:
        if green_for < current.duration:
            return None
        greens = self.x.greens
        n = next(i for i, g in enumerate(greens) if g.index == current.index)
        return greens[(n + 1) % len(greens)]
