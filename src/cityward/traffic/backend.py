"""The interface between signal controllers and the signals they drive.

Controllers never talk to SUMO or to a field controller directly: they read an
:class:`Intersection` (its phases and lanes) and lane readings, and ask the safety layer for a
green phase. A :class:`SignalBackend` is the only thing that touches the signals: SUMO through
libsumo or TraCI, or a real intersection's controller.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

GREEN = frozenset("Gg")


HALTED_MS = 0.1  # a vehicle slower than this is halted (SUMO's own threshold)


@dataclass(frozen=True, slots=True)
class Phase:
    """One phase of an intersection's program: a state per controlled link."""

    index: int
    state: str  # one of r y G g s u o O per link (SUMO's signal alphabet)
    duration: float
    min_dur: float
    max_dur: float

    @property
    def is_green(self) -> bool:
        """A service phase: some link green and none yellow."""
        return any(c in GREEN for c in self.state) and not any(c in "yY" for c in self.state)

    def green_links(self) -> frozenset[int]:
        return frozenset(i for i, c in enumerate(self.state) if c in GREEN)


@dataclass(frozen=True)
class Intersection:
    """A signalised intersection: its network program and what each link connects."""

    id: str
    phases: tuple[Phase, ...]
    # per link index: (incoming lane, outgoing lane); both "" for an unused link index
    links: tuple[tuple[str, str], ...]

    @cached_property
    def greens(self) -> tuple[Phase, ...]:
        """The distinct service phases (by green link set), in program order."""
        seen: set[frozenset[int]] = set()
        out = []
        for p in self.phases:
            if p.is_green and p.green_links() not in seen:
                seen.add(p.green_links())
                out.append(p)
        return tuple(out)

    @cached_property
    def yellow_time(self) -> float:
        """The network's yellow time (longest yellow phase), 3 s when it has none."""
        ys = [p.duration for p in self.phases if any(c in "yY" for c in p.state)]
        return max(ys) if ys else 3.0

    @cached_property
    def all_red_time(self) -> float:
        """The network's all-red clearance (longest all-red phase), 0 when it has none."""
        reds = [p.duration for p in self.phases if p.state and set(p.state) <= set("rs")]
        return max(reds) if reds else 0.0

    @cached_property
    def compatible(self) -> frozenset[tuple[int, int]]:
        """Link pairs that the network program ever shows green together.

        Any other pair of links is treated as conflicting: the network's own program is
        conflict-free by construction, so this is the safe reading of it.
        """
        pairs: set[tuple[int, int]] = set()
        for p in self.phases:
            g = sorted(p.green_links())
            for a in g:
                for b in g:
                    pairs.add((a, b))
        return frozenset(pairs)

    @cached_property
    def in_lanes(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(i for i, _ in self.links if i))

    def lanes_of(self, phase: Phase) -> tuple[tuple[str, str], ...]:
        """The (in, out) lane pairs a phase gives green to."""
        return tuple(self.links[i] for i in sorted(phase.green_links()) if self.links[i][0])


@dataclass(frozen=True, slots=True)
class EmergencyVehicle:
    """An emergency vehicle on its way: where it is and the lanes ahead of it."""

    id: str
    lane: str
    position_m: float  # along its current lane
    speed_ms: float
    route_edges: tuple[str, ...]  # the edges still ahead, the current one first
    priority: int = 0
    first_seen: float = 0.0


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's instruction for one intersection, until ``until`` (None: until cleared).

    Either hold one green phase (``phase``, an index into the program) or run another
    controller (``controller``, a registered name). Safety still applies: the switch waits for
    the minimum green and goes through yellow and all-red, and the maximum red still serves a
    waiting approach.
    """

    phase: int | None = None
    controller: str | None = None
    until: float | None = None
    by: str = ""  # who asked (for the record)

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


class SignalBackend(abc.ABC):
    """Signals and detectors of a set of intersections."""

    #: whether :meth:`approaching` reports each vehicle's real distance and speed (radar,
    #: camera, simulator) rather than the coarse default built from queue counters
    positions: bool = False

    @abc.abstractmethod
    def intersections(self) -> Sequence[Intersection]:
        """Every signalised intersection this backend drives."""

    @abc.abstractmethod
    def time(self) -> float:
        """The current time in seconds (simulation time, or wall time in the field)."""

    @abc.abstractmethod
    def state(self, tls: str) -> str:
        """The signal state now shown, one character per link."""

    @abc.abstractmethod
    def set_state(self, tls: str, state: str) -> None:
        """Show this state until told otherwise (only the safety layer calls it)."""

    @abc.abstractmethod
    def queue(self, lane: str) -> int:
        """Vehicles halted on a lane (detector: queue length in vehicles)."""

    @abc.abstractmethod
    def count(self, lane: str) -> int:
        """Vehicles on a lane."""

    def approach(self, lane: str) -> Sequence[tuple[str, float]]:
        """The lanes that feed a signal's incoming lane, with their distance to its stop line.

        The lane itself comes first (distance 0), then the lanes upstream of it that reach it
        without crossing another signal, up to the backend's detection reach. A queue that
        starts on a short lane right before the stop line grows onto them; controllers and the
        safety layer read the whole approach. Field: the detectors configured for the approach.
        """
        return ((lane, 0.0),)

    def exit_lanes(self, lane: str) -> Sequence[str]:
        """The lanes a vehicle leaving on ``lane`` may be stopped on: the lane itself, and the
        lanes right after it when it is too short to hold a queue (a junction stub)."""
        return (lane,)

    def approaching(self, lane: str) -> Sequence[tuple[float, float]]:
        """(distance to the stop line in m, speed in m/s) of each vehicle on a lane.

        Field: from radar or camera detectors (positions only, no identities). The default, for
        backends with queue counters only, reports the halted vehicles at the stop line.
        """
        return [(0.0, 0.0)] * self.queue(lane)

    def lane_length(self, lane: str) -> float:
        """Length of a lane in m (from the network)."""
        return 100.0

    def lane_speed(self, lane: str) -> float | None:
        """Speed limit of a lane in m/s (from the network); None where unknown."""
        return None

    def is_entry(self, lane: str) -> bool:
        """Whether no other lane leads into ``lane`` (vehicles join it from outside the
        network). Field: from the network model; unknown counts as an entry."""
        return True

    def conflict_in_box(self, tls: str, ending: frozenset[int], starting: frozenset[int]) -> bool:
        """Whether a vehicle stands inside the junction on the path of one of the ``ending``
        links that crosses the path of one of the ``starting`` links (link indices).

        Field: a camera or radar watching the junction box. Backends that cannot see it say
        False, and the guard keeps the network's all-red.
        """
        return False

    def emergency_vehicles(self) -> Sequence[EmergencyVehicle]:
        """Emergency vehicles approaching (field: from their GPS feed); none by default."""
        return ()

    def advance(self) -> None:  # noqa: B027 - optional for field backends
        """Move time on by one control step (simulators); field backends wait."""

    def close(self) -> None:  # noqa: B027
        """Release the backend."""
