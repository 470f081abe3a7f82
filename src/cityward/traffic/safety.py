"""Safety below every controller: the only code that sets signal states.

A controller asks for a green phase; the guard decides when and how the signals get there:

- only the network's own green phases are ever shown, and in between only their clearance
  (links that stay green in both phases keep green, the others show yellow, then red), so no
  two conflicting links are green together whatever a controller asks;
- a green lasts at least ``min_green`` before a switch;
- every switch goes through ``yellow`` seconds of yellow and ``all_red`` seconds of red;
- the red lasts longer, up to ``clearance_extension`` seconds, while a vehicle stands inside the
  junction on the path of an ending movement that crosses the path of a starting one (a left
  turner still waiting for its gap when its green ends): the next green does not drive into it;
- an approach with vehicles waiting is never kept red longer than ``max_red``: the guard then
  serves it whatever the controller wants.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from cityward.traffic.backend import GREEN, Intersection, Phase, SignalBackend


class SafetyRules(BaseModel):
    """Limits no controller can override. Yellow and all-red default to the network's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_green: float = Field(default=5.0, ge=1.0, le=120.0)
    yellow: float | None = Field(default=None, ge=2.0, le=10.0)
    all_red: float | None = Field(default=None, ge=0.0, le=10.0)
    max_red: float = Field(default=120.0, ge=30.0, le=600.0)
    clearance_extension: float = Field(
        default=5.0,
        ge=0.0,
        le=30.0,
        description="Longest extra all-red while a vehicle stands in the junction on a path "
        "that the next green crosses (backends that can see the junction box).",
    )


@dataclass
class _Transition:
    target: Phase
    started: float
    forced: bool = False
    # the state cleared from, when it is not ``current``'s: what the signals showed when the
    # guard took over (a program started mid-cycle, or another guard's yellow)
    from_state: str | None = None


class SafetyGuard:
    """The signal state of one intersection, moved only by safe steps."""

    def __init__(
        self, backend: SignalBackend, intersection: Intersection, rules: SafetyRules, now: float
    ) -> None:
        if not intersection.greens:
            raise ValueError(f"intersection {intersection.id} has no green phase in its program")
        self.backend = backend
        self.x = intersection
        self.rules = rules
        self.yellow = rules.yellow if rules.yellow is not None else intersection.yellow_time
        self.all_red = rules.all_red if rules.all_red is not None else intersection.all_red_time
        # the network's own green phases: the only states a request can lead to (a request
        # names one by index; the phase object it carries is never shown)
        self._greens = {g.index: g for g in intersection.greens}
        self.current: Phase = intersection.greens[0]
        self.green_since = now
        self.transition: _Transition | None = None
        # the first green that serves each incoming lane; a lane no green serves (a closed
        # movement) is left out of the max-red bookkeeping, where it hid every other lane
        self._serving: dict[str, Phase] = {}
        for g in intersection.greens:
            for lane, _ in intersection.lanes_of(g):
                self._serving.setdefault(lane, g)
        # when each servable incoming lane last had green (or had nobody waiting)
        self._served: dict[str, float] = {
            lane: now for lane in intersection.in_lanes if lane in self._serving
        }
        self._oldest = now  # the earliest of _served (as of the last tick)
        self._shown = ""
        self.forced_switches = 0
        self.extensions = 0  # steps of all-red added while a vehicle stood in the junction
        shown = backend.state(intersection.id)
        if not shown or shown == self.current.state:
            self._show(self.current.state)
        else:
            # taken over showing something else (a program with an offset, another green of
            # it, another loop's guard mid-yellow): that goes through yellow and all-red to the
            # first green, never straight to it; a link showing yellow gets a full yellow
            # again. (Adopting the green shown, instead of clearing to the first one, gave
            # ingolstadt21 another start than before, and gridlock in 2 of 3 seeds, measured.)
            ending = "".join("G" if c in "yY" else c for c in shown)
            self.transition = _Transition(self.current, now, from_state=ending)
            self._show(self._clearance(ending, self.current, "y"))

    # -- what controllers see ---------------------------------------------------------------
    @property
    def in_green(self) -> bool:
        return self.transition is None

    def green_for(self, now: float) -> float:
        return now - self.green_since if self.transition is None else 0.0

    def can_switch(self, now: float) -> bool:
        return self.transition is None and now - self.green_since >= self.rules.min_green

    def request(self, phase: Phase, now: float, *, force: bool = False) -> bool:
        """Ask for the green phase with ``phase``'s index (the network's own phase is shown,
        whatever state the object asked with carries); granted only from a green that has
        lasted ``min_green``."""
        own = self._greens.get(phase.index)
        if own is None:
            raise ValueError(f"{phase.index} is not a green phase of {self.x.id}")
        if own.green_links() == self.current.green_links() or not self.can_switch(now):
            return False
        self.transition = _Transition(own, now, force)
        self._show(self._clearance(self.current.state, own, "y"))
        return True

    def serve_starving(self, now: float) -> bool:
        """Switch, forced, to a green for the approach kept red longest, once it has waited
        more than ``max_red`` (as of the last tick): before any controller, override or
        preemption is asked, or a controller that switched the moment ``min_green`` ended
        kept the guard from ever getting its turn. Whether it switched."""
        limit = now - self.rules.max_red
        # asked twice a step (before the controller, and by tick): the oldest wait, kept by
        # tick, answers at once the usual "nobody has waited that long"
        if self._oldest >= limit or not self.can_switch(now):
            return False
        for _, lane in sorted(
            (since, lane) for lane, since in self._served.items() if since < limit
        ):
            if self.request(self._serving[lane], now, force=True):
                self.forced_switches += 1
                return True
        return False

    # -- every step -------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Advance transitions and enforce max red; call once per simulation step."""
        t = self.transition
        if t is not None:
            elapsed = now - t.started
            clear = self.yellow + self.all_red
            hold = clear <= elapsed < clear + self.rules.clearance_extension and (
                self.backend.conflict_in_box(
                    self.x.id,
                    self.current.green_links() - t.target.green_links(),
                    t.target.green_links() - self.current.green_links(),
                )
            )
            old = t.from_state or self.current.state
            if hold:
                self.extensions += 1  # steps of all-red added
                self._show(self._clearance(old, t.target, "r"))
            elif elapsed >= clear:
                self.current = t.target
                self.green_since = now
                self.transition = None
                self._show(self.current.state)
            elif elapsed >= self.yellow:
                self._show(self._clearance(old, t.target, "r"))
        green_lanes = {i for i, _ in self.x.lanes_of(self.current)} if t is None else set()
        for lane in self._served:
            if lane in green_lanes or not self._waiting(lane):
                self._served[lane] = now
        self._oldest = min(self._served.values(), default=now)
        self.serve_starving(now)

    # -- internals --------------------------------------------------------------------------
    def _waiting(self, lane: str) -> bool:
        """Anyone halted on the lane's approach (the lane or the lanes feeding it)."""
        return any(self.backend.queue(part) for part, _ in self.backend.approach(lane))

    def _clearance(self, old: str, new: Phase, ending: str) -> str:
        """Links green in both (``old``: the state cleared from) stay green; the rest show
        ``ending`` (y, then r) or red."""
        keep = {i for i, c in enumerate(old) if c in GREEN} & new.green_links()
        out = []
        for i, c in enumerate(old):
            if i in keep:
                out.append(c)
            elif c in GREEN:
                out.append(ending)
            else:
                out.append("r")
        return "".join(out)

    def _show(self, state: str) -> None:
        if state != self._shown:
            self.backend.set_state(self.x.id, state)
            self._shown = state
