"""A running simulation's connection to the data bank: live state out, operator overrides in.

:class:`BankFeed` hooks into :func:`cityward.traffic.sumo.control_loop` (``on_step``) and writes,
over the bank's NGSI-LD HTTP API, with batch upserts (``options=update``, so attributes that
others wrote are kept):

- one ``TrafficSignal`` per intersection (``urn:ngsi-ld:TrafficSignal:<scenario>:<tls>``): the
  signal state, the current green phase, whether a transition runs, the controller and the
  active override; written when it changes, at most once per simulated second;
- one ``TrafficFlowObserved`` per incoming lane, aggregated over ``period_s`` simulated seconds
  (Smart Data Model attributes: intensity, occupancy, averageVehicleSpeed, laneId, ...);
- one ``EmergencyVehicleRun`` per emergency-vehicle run (the catalog's "emergency-runs" source):
  where the vehicle is, its speed and remaining route, when it started and, on arrival, its
  travel time.

Every attribute carries ``observedAt`` = the simulated time mapped to an instant:
``start_instant + (t - t0)``, with ``t0`` the simulation time when the feed starts.

Writes leave from one background thread through a bounded :class:`CoalescingQueue`, so a slow
or absent bank never stalls the simulation: when the queue is full, pending updates of the same
entity are merged (newest attributes win) and, failing that, the oldest update is dropped.

The same thread polls the ``override`` attribute of the feed's TrafficSignal entities, every
page of them (pages of the size the bank allows: its ``max_limit`` may be below ``PAGE``). An
operator sets it with an ordinary, audited ``PATCH /ngsi-ld/v1/entities/{id}/attrs``; a valid
override becomes an :class:`~cityward.traffic.backend.Override` in the ``overrides`` dict that
``control_loop`` honours, and the outcome is written back as ``overrideStatus``; one still
running when the feed closes is written as ended with the run. The safety layer still applies
under an override (minimum green, yellow and all-red, maximum red).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import math
import queue
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import orjson

from cityward.traffic.backend import Intersection, Override, SignalBackend
from cityward.traffic.safety import SafetyGuard

log = logging.getLogger("cityward.traffic.bankfeed")

SIGNAL_TYPE = "TrafficSignal"
FLOW_TYPE = "TrafficFlowObserved"
# the catalog's "emergency-runs" source (traffic-management, public-safety)
EV_TYPE = "EmergencyVehicleRun"
MAX_OVERRIDE_S = 3600.0
MAX_S = f"{MAX_OVERRIDE_S:g}"
# the page size asked for first (the bank's default max_limit); a bank that allows less refuses
# it, and the feed then asks for the maximum the refusal names (``_smaller_page``)
PAGE = 1000
AUDIT_PAGES = 10  # at most this many pages of audit records read to name an override's author
OVERRIDE_KEYS = ("phase", "controller", "durationS", "clear")
NO_OVERRIDE: dict[str, Any] = {"active": False}
Doc = dict[str, Any]


class BankError(RuntimeError):
    """The data bank cannot be used: unreachable, token refused, or writes refused."""


class OverrideError(ValueError):
    """An operator override that is not applied (the message goes to ``overrideStatus``)."""


# -- time ------------------------------------------------------------------------------------
def iso(instant: datetime) -> str:
    """UTC, millisecond precision, with Z (the form the bank accepts for observedAt)."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _dt(value: str) -> dict[str, str]:
    return {"@type": "DateTime", "@value": value}


# -- the queue -------------------------------------------------------------------------------
class CoalescingQueue:
    """Entity updates waiting to be sent; bounded, and :meth:`put` never blocks.

    While there is room every update is kept (so the bank's history gets every one). When full,
    pending updates of the same entity are merged into one (attribute by attribute, the newest
    wins; counted in ``coalesced``); if that frees no room, the new update is merged into a
    pending one of its entity or, when there is none, the oldest pending update is dropped
    (counted in ``dropped``).
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("the queue needs room for at least one update")
        self.maxsize = maxsize
        self.coalesced = 0
        self.dropped = 0
        self._items: deque[tuple[str, Doc]] = deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, eid: str, frag: Doc) -> None:
        with self._cond:
            self._make_room(eid, frag)
            self._cond.notify()

    def _make_room(self, eid: str, frag: Doc) -> None:
        if len(self._items) >= self.maxsize:
            self._compact()
        items = self._items
        if len(items) >= self.maxsize:
            for n, (other, old) in enumerate(items):
                if other == eid:
                    items[n] = (eid, {**old, **frag})
                    self.coalesced += 1
                    return
            items.popleft()
            self.dropped += 1
        items.append((eid, frag))

    def _compact(self) -> None:
        merged: dict[str, Doc] = {}
        for eid, frag in self._items:
            old = merged.get(eid)
            merged[eid] = frag if old is None else {**old, **frag}
        self.coalesced += len(self._items) - len(merged)
        self._items = deque(merged.items())

    def requeue(self, items: Iterable[tuple[str, Doc]]) -> None:
        """Put updates that could not be sent back in front (they are older than the rest)."""
        with self._cond:
            old = list(self._items)
            self._items = deque()
            for eid, frag in [*items, *old]:
                self._make_room(eid, frag)
            self._cond.notify()

    def take(self, n: int, timeout: float) -> list[tuple[str, Doc]]:
        """Up to ``n`` updates, oldest first, no entity twice; waits up to ``timeout`` s for the
        first. (A batch upsert leaves one state per entity: two updates of one entity in a
        batch would reach the bank's history as one.)"""
        with self._cond:
            if not self._items and timeout > 0:
                self._cond.wait(timeout)
            out: list[tuple[str, Doc]] = []
            ids: set[str] = set()
            while self._items and len(out) < n and self._items[0][0] not in ids:
                eid, frag = self._items.popleft()
                ids.add(eid)
                out.append((eid, frag))
            return out

    def counters(self) -> tuple[int, int]:
        """(coalesced, dropped) so far."""
        with self._cond:
            return self.coalesced, self.dropped

    def drain(self) -> int:
        """Drop everything pending; returns how many updates that was."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            return n

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


# -- operator overrides ----------------------------------------------------------------------
@dataclass(frozen=True)
class OverrideSpec:
    """A valid override request, before it is anchored in simulation time."""

    duration_s: float
    phase: int | None = None
    controller: str | None = None

    def describe(self) -> str:
        what = f"phase {self.phase}" if self.phase is not None else f"controller {self.controller}"
        return f"{what} for {self.duration_s:g} s"


def parse_override(
    value: object, x: Intersection, controllers: Collection[str]
) -> OverrideSpec | None:
    """An operator's ``override`` value checked against the intersection; None means clear.

    Accepted: ``{"phase": N, "durationS": S}``, ``{"controller": NAME, "durationS": S}`` and,
    to clear, ``{}``, ``{"clear": true}``, ``"none"`` or no attribute at all. Raises
    :class:`OverrideError` with the reason otherwise.
    """
    if value is None or value == "none" or value == {} or value == NO_OVERRIDE:
        return None
    if not isinstance(value, dict):
        raise OverrideError(
            f"the override must be a JSON object such as "
            f'{{"phase": 2, "durationS": 120}}, not {orjson.dumps(value).decode()}'
        )
    unknown = sorted(set(value) - set(OVERRIDE_KEYS))
    if unknown:
        raise OverrideError(
            f"unknown key(s) {', '.join(unknown)}; expected phase or controller, and durationS "
            "(or clear)"
        )
    if "clear" in value:
        if value["clear"] is not True or len(value) != 1:
            raise OverrideError('to clear an override, write {"clear": true} alone')
        return None
    phase, controller = value.get("phase"), value.get("controller")
    if (phase is None) == (controller is None):
        raise OverrideError("give either phase or controller (one of them)")
    duration = value.get("durationS")
    if isinstance(duration, bool) or not isinstance(duration, int | float):
        raise OverrideError(f"durationS is required: seconds, more than 0 and at most {MAX_S}")
    if not (math.isfinite(duration) and 0 < duration <= MAX_OVERRIDE_S):
        raise OverrideError(f"durationS {duration:g} must be more than 0 and at most {MAX_S}")
    greens = ", ".join(str(g.index) for g in x.greens)
    if phase is not None:
        if isinstance(phase, bool) or not isinstance(phase, int):
            raise OverrideError(f"phase must be an integer; green phases of {x.id}: {greens}")
        if phase not in {g.index for g in x.greens}:
            raise OverrideError(
                f"phase {phase} is not a green phase of {x.id}; green phases: {greens}"
            )
        return OverrideSpec(float(duration), phase=phase)
    if not isinstance(controller, str) or controller not in controllers:
        raise OverrideError(
            f"controller {controller!r} is not registered; registered: "
            f"{', '.join(sorted(controllers))}"
        )
    return OverrideSpec(float(duration), controller=controller)


@dataclass(frozen=True)
class _OverrideRequest:
    tls: str
    value: object  # None: the attribute is gone
    by: str


# -- geography -------------------------------------------------------------------------------
def _net_has_projection(t: Any) -> bool:
    """Whether the loaded network is georeferenced (its <location> has a projection)."""
    try:
        net = str(t.simulation.getOption("net-file")).split(",")[0].strip()
    except Exception:  # an old SUMO without getOption
        return False
    path = Path(net)
    if not path.is_file():
        return False
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as fh:
            for _, elem in ET.iterparse(fh, events=("start",)):
                if elem.tag == "location":
                    proj = elem.get("projParameter", "!").strip()
                    return proj not in ("", "!")
                if elem.tag != "net":
                    return False
    except (OSError, ET.ParseError):
        return False
    return False


class _Geo:
    """SUMO network coordinates to WGS84 (lon, lat), when the network has a projection."""

    def __init__(self, t: Any) -> None:
        self.t = t
        self.enabled = t is not None and _net_has_projection(t)

    def lonlat(self, x: float, y: float) -> list[float]:
        lon, lat = self.t.simulation.convertGeo(x, y)
        return [round(float(lon), 7), round(float(lat), 7)]

    def point(self, x: float, y: float) -> Doc:
        return {"type": "Point", "coordinates": self.lonlat(x, y)}

    def signal(self, x: Intersection) -> Doc | None:
        """Where an intersection is: its junction, or the stop lines of its incoming lanes."""
        if not self.enabled:
            return None
        try:
            px, py = self.t.junction.getPosition(x.id)
        except Exception:  # a signal over a joined cluster has no junction of its own id
            ends = [self.t.lane.getShape(lane)[-1] for lane in x.in_lanes]
            if not ends:
                return None
            px = sum(p[0] for p in ends) / len(ends)
            py = sum(p[1] for p in ends) / len(ends)
        return self.point(px, py)

    def lane(self, lane: str) -> Doc | None:
        if not self.enabled:
            return None
        shape = self.t.lane.getShape(lane)
        return {"type": "LineString", "coordinates": [self.lonlat(px, py) for px, py in shape]}


# -- lane figures ----------------------------------------------------------------------------
@dataclass
class _LaneAgg:
    """One observation period of one lane."""

    since: float
    passed: int = 0  # vehicles that left the lane (crossed its stop line or ended there)
    steps: int = 0
    occupancy_sum: float = 0.0
    speed_sum: float = 0.0  # m/s, weighted by vehicles present
    vehicle_steps: int = 0
    ids: frozenset[str] = frozenset()


@dataclass
class FeedStats:
    """What the feed did (the CLI prints it)."""

    queued: int = 0  # entity updates handed to the queue
    written: int = 0  # entity updates the bank accepted
    rejected: int = 0  # entity updates the bank refused (logged; the run goes on)
    coalesced: int = 0  # updates merged into a newer one of the same entity (queue full)
    dropped: int = 0  # updates lost: queue full, bank unreachable at close, token refused
    requests: int = 0
    failed_requests: int = 0  # transport errors and 5xx answers (retried)
    polls: int = 0  # override polls completed
    overrides_applied: int = 0
    overrides_rejected: int = 0
    overrides_cleared: int = 0
    overrides_ended: int = 0
    rejections: list[str] = field(default_factory=list)  # the first reasons, for the summary


class BankFeed:
    """Writes a running simulation to a data bank and takes operator overrides from it.

    Use as ``with BankFeed(backend, ...) as feed: control_loop(..., on_step=feed.on_step,
    overrides=feed.overrides)``; :meth:`start` checks the bank and the token (raising
    :class:`BankError` with the reason) and :meth:`close` flushes what is pending.
    """

    def __init__(
        self,
        backend: SignalBackend,
        base_url: str,
        token: str | None,
        *,
        scenario: str,
        controller: str,
        period_s: float = 60.0,
        first_period_s: float | None = None,
        start_instant: datetime | None = None,
        overrides: dict[str, Override] | None = None,
        queue_size: int = 5000,
        batch_size: int = 200,
        poll_interval_s: float = 1.0,
        signal_interval_s: float = 1.0,
        timeout_s: float = 10.0,
        flush_timeout_s: float = 15.0,
        ev_type: str = EV_TYPE,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", scenario):
            raise ValueError(f"scenario name {scenario!r}: letters, digits, '.', '_', '-'")
        if period_s <= 0:
            raise ValueError("the observation period must be longer than 0 s")
        self.backend = backend
        self.base = _base_url(base_url)
        self.scenario = scenario
        self.controller = controller
        self.ev_type = ev_type
        self.period_s = period_s
        # the first observation may cover a shorter window, so that a map shows the roads at
        # once (the demo: 2 s); it says so in its dateObservedFrom / dateObservedTo
        self.first_period_s = min(first_period_s or period_s, period_s)
        self._lanes_flushed = False
        self.start_instant = start_instant or datetime.now(UTC)
        if self.start_instant.tzinfo is None:
            self.start_instant = self.start_instant.replace(tzinfo=UTC)
        self.overrides: dict[str, Override] = overrides if overrides is not None else {}
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        self.signal_interval_s = signal_interval_s
        self.flush_timeout_s = flush_timeout_s
        self.stats = FeedStats()
        self.queue = CoalescingQueue(queue_size)
        self.fatal: str | None = None  # why the feed stopped writing, if it did
        self.subject = ""
        self.can_read_audit = False
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.base, headers=headers, timeout=timeout_s)
        self._t: Any = getattr(backend, "t", None)  # libsumo / traci, when it is SUMO
        self._geo = _Geo(self._t)
        self._xs = {x.id: x for x in backend.intersections() if x.greens}
        self._t0 = 0.0
        self._started = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._requests: queue.SimpleQueue[_OverrideRequest] = queue.SimpleQueue()
        # per intersection: what was last written, and when
        self._sig_last: dict[str, tuple[object, ...]] = {}
        self._sig_at: dict[str, float] = {}
        self._applied: dict[str, Override] = {}  # overrides this feed put in ``overrides``
        self._seen: dict[str, tuple[str, bytes]] = {}  # tls -> (modifiedAt, value) last polled
        # page sizes for the bank's entity queries and audit trail (None: the bank's default)
        self._page: int | None = PAGE
        self._audit_page: int | None = PAGE
        self._lanes: dict[str, _LaneAgg] = {}
        self._lane_static_sent: set[str] = set()
        self._evs: dict[str, tuple[float, str]] = {}  # vehicle -> (start time, entity id)
        self._ev_at = -math.inf
        self._now = 0.0
        self._lock = threading.Lock()  # stats counters written by both threads
        self._dropped = 0  # lost outside the queue (token refused, bank gone at close)

    # -- ids and time ---------------------------------------------------------------------
    def signal_id(self, tls: str) -> str:
        return f"urn:ngsi-ld:{SIGNAL_TYPE}:{self.scenario}:{_part(tls)}"

    def flow_id(self, lane: str) -> str:
        return f"urn:ngsi-ld:{FLOW_TYPE}:{self.scenario}:{_part(lane)}"

    def ev_id(self, vehicle: str, start: float) -> str:
        """One entity per run: the vehicle and the instant it started (Unix seconds). The
        simulated second alone was the same on every run of a scenario, so a new run took
        over an earlier one's entity, and kept its validTo and travelTime."""
        when = int(self.instant(start).timestamp())
        run = f"emergency-run:{_part(vehicle)}:{when}"
        return f"urn:ngsi-ld:{self.ev_type}:{self.scenario}:{run}"

    def instant(self, sim_s: float) -> datetime:
        return self.start_instant + timedelta(seconds=sim_s - self._t0)

    def at(self, sim_s: float) -> str:
        return iso(self.instant(sim_s))

    def prop(self, value: object, sim_s: float, unit: str | None = None) -> Doc:
        """An NGSI-LD Property observed at simulation time ``sim_s``."""
        out: Doc = {"type": "Property", "value": value, "observedAt": self.at(sim_s)}
        if unit is not None:
            out["unitCode"] = unit
        return out

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> BankFeed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Check the bank and the token, create the TrafficSignal entities, start the thread."""
        if self._started:
            return
        self._t0 = self.backend.time()
        self._now = self._t0
        try:
            self._check_identity()
            self._create_signals()
        except BankError:
            self._client.close()
            raise
        self._started = True
        self._thread = threading.Thread(target=self._run, name="bankfeed", daemon=True)
        self._thread.start()

    def close(self) -> FeedStats:
        """Write the last partial observation period and the end of running overrides, flush
        the queue, stop the thread."""
        if not self._started:
            return self.stats
        self._started = False
        with contextlib.suppress(Exception):  # the simulation may already be closed
            self._flush_lanes(self._now, final=True)
        # overrides still running end with the simulation: the bank must not show them active
        # for ever. Queued behind the signal's earlier updates (written in order, retried while
        # the bank fails), so no older update written after it brings the override back.
        for tls in list(self._applied):
            self._end_override(tls, self._now, "the simulation ended")
        # runs still under way end with the simulation: a map must not show them driving
        for _, eid in self._evs.values():
            self.put(
                {
                    "id": eid,
                    "type": self.ev_type,
                    "runStatus": self.prop("interrupted", self._now),
                    "validTo": self.prop(_dt(self.at(self._now)), self._now),
                    "remainingRoute": self.prop([], self._now),
                }
            )
        self._evs.clear()
        self._stop.set()
        self.queue.wake()
        if self._thread is not None:
            self._thread.join(self.flush_timeout_s + 5)
        self._drop(self.queue.drain())
        self._client.close()
        return self.stats

    def _drop(self, n: int) -> None:
        """Count ``n`` updates lost outside the queue, and refresh the queue's counters."""
        coalesced, dropped = self.queue.counters()
        with self._lock:
            self._dropped += n
            self.stats.coalesced = coalesced
            self.stats.dropped = self._dropped + dropped

    # -- the bank, synchronously at start -----------------------------------------------------
    def _check_identity(self) -> None:
        try:
            r = self._client.get("/cityward/v1/whoami")
        except httpx.HTTPError as exc:
            raise BankError(f"cannot reach the data bank at {self.base}: {exc}") from exc
        if r.status_code == 401:
            raise BankError(
                f"the data bank at {self.base} refused the token (401): {_detail(r)}; "
                "pass a valid --token or set CITYWARD_TOKEN"
            )
        try:
            me = r.json() if r.status_code == 200 else None
        except ValueError:
            me = None
        if not isinstance(me, dict):
            raise BankError(
                f"{self.base} does not answer like a cityward data bank "
                f"(GET /cityward/v1/whoami: {r.status_code} {_detail(r)})"
            )
        perms = set(me.get("permissions", []))
        missing = {"data:read", "data:write"} - perms
        if missing:
            raise BankError(
                f"the token (role {me.get('role')!r}) lacks {', '.join(sorted(missing))}: "
                "the feed writes entities and reads operator overrides; use an operator token"
            )
        self.subject = str(me.get("subject", ""))
        self.can_read_audit = "audit:read" in perms

    def _create_signals(self) -> None:
        """Write every TrafficSignal now, so a refused token or purpose shows at once."""
        now = self._t0
        batch = []
        for x in self._xs.values():
            doc: Doc = {
                "id": self.signal_id(x.id),
                "type": SIGNAL_TYPE,
                "name": self.prop(x.id, now),
                "greenPhases": self.prop([g.index for g in x.greens], now),
                "controller": self.prop(self.controller, now),
                "override": self.prop(dict(NO_OVERRIDE), now),
                "overrideStatus": self.prop("none", now),
                "activeOverride": self.prop(dict(NO_OVERRIDE), now),
                "source": self.prop(f"cityward traffic simulation {self.scenario}", now),
            }
            with contextlib.suppress(Exception):
                loc = self._geo.signal(x)
                if loc is not None:
                    doc["location"] = {"type": "GeoProperty", "value": loc}
            batch.append((doc["id"], doc))
        self.stats.queued += len(batch)
        for n in range(0, len(batch), self.batch_size):
            part = batch[n : n + self.batch_size]
            try:
                ok = self._post(part)
            except httpx.HTTPError as exc:
                raise BankError(f"cannot reach the data bank at {self.base}: {exc}") from exc
            if ok is None:
                raise BankError(self.fatal or "the data bank refused the feed")
            if ok < 0:
                raise BankError(f"the data bank at {self.base} fails (5xx); try again later")
            if ok == 0 and part:
                raise BankError(
                    "the data bank refused every TrafficSignal entity: "
                    + "; ".join(self.stats.rejections[:3])
                )

    # -- the simulation side (on_step runs in the simulation's thread) ----------------------
    def on_step(self, now: float, guards: Mapping[str, SafetyGuard]) -> None:
        """Called by control_loop every step: apply overrides, sample, queue the writes."""
        if not self._started:
            return
        self._now = now
        self._apply_requests(now, guards)
        self._check_expired(now)
        for tls, guard in guards.items():
            if tls in self._xs:
                self._signal(now, tls, guard)
        if self._t is not None:
            self._sample_lanes(now)
        if now - self._ev_at >= 1.0:
            self._ev_at = now
            self._emergency(now)

    def put(self, doc: Doc) -> None:
        """Queue an entity update (the simulation's own, or another writer's riding along)."""
        self.queue.put(doc["id"], doc)
        with self._lock:
            self.stats.queued += 1

    def _signal(self, now: float, tls: str, guard: SafetyGuard) -> None:
        state = self.backend.state(tls)
        snap: tuple[object, ...] = (
            state,
            guard.current.index,
            guard.transition is not None,
            self._active_override_value(tls, now) != NO_OVERRIDE,
        )
        if snap == self._sig_last.get(tls):
            return
        if now - self._sig_at.get(tls, -math.inf) < self.signal_interval_s:
            return  # changed again within the interval: written once the interval has passed
        self._sig_last[tls] = snap
        self._sig_at[tls] = now
        self.put(
            {
                "id": self.signal_id(tls),
                "type": SIGNAL_TYPE,
                "signalState": self.prop(state, now),
                "currentPhase": self.prop(guard.current.index, now),
                "inTransition": self.prop(guard.transition is not None, now),
                "activeOverride": self.prop(self._active_override_value(tls, now), now),
            }
        )

    def _active_override_value(self, tls: str, now: float) -> Doc:
        ov = self.overrides.get(tls)
        if ov is None or not ov.active(now):
            return dict(NO_OVERRIDE)
        out: Doc = {"active": True}
        if ov.phase is not None:
            out["phase"] = ov.phase
        if ov.controller is not None:
            out["controller"] = ov.controller
        if ov.until is not None:
            out["until"] = self.at(ov.until)
        if ov.by:
            out["by"] = ov.by
        return out

    def _status(self, tls: str, now: float, status: str) -> None:
        self.put(
            {
                "id": self.signal_id(tls),
                "type": SIGNAL_TYPE,
                "overrideStatus": self.prop(status, now),
                "activeOverride": self.prop(self._active_override_value(tls, now), now),
            }
        )
        self._sig_last.pop(tls, None)  # the next step writes the signal with its new override

    def _apply_requests(self, now: float, guards: Mapping[str, SafetyGuard]) -> None:
        from cityward.traffic.controllers import load_builtin

        while True:
            try:
                req = self._requests.get_nowait()
            except queue.Empty:
                return
            x = self._xs.get(req.tls)
            if x is None or req.tls not in guards:
                continue
            try:
                spec = parse_override(req.value, x, load_builtin())
            except OverrideError as exc:
                with self._lock:
                    self.stats.overrides_rejected += 1
                log.warning("override of %s rejected: %s", req.tls, exc)
                self._status(req.tls, now, f"rejected: {exc}")
                continue
            if spec is None:
                if self._applied.pop(req.tls, None) is not None:
                    self.overrides.pop(req.tls, None)
                    with self._lock:
                        self.stats.overrides_cleared += 1
                    who = f" by {req.by}" if req.by else ""
                    self._status(req.tls, now, f"cleared at {self.at(now)}{who}")
                continue
            ov = Override(
                phase=spec.phase,
                controller=spec.controller,
                until=now + spec.duration_s,
                by=req.by,
            )
            self.overrides[req.tls] = ov
            self._applied[req.tls] = ov
            with self._lock:
                self.stats.overrides_applied += 1
            assert ov.until is not None
            log.info("override of %s applied: %s%s", req.tls, spec.describe(), f" ({req.by})")
            self._status(req.tls, now, f"applied until {self.at(ov.until)}: {spec.describe()}")

    def _check_expired(self, now: float) -> None:
        for tls, ov in list(self._applied.items()):
            if self.overrides.get(tls) is ov and ov.active(now):
                continue
            self._end_override(tls, now, "the override expired")

    def _end_override(self, tls: str, now: float, reason: str) -> None:
        """Take an override this feed applied out of ``overrides`` and write that it ended."""
        ov = self._applied.pop(tls)
        if self.overrides.get(tls) is ov:
            self.overrides.pop(tls, None)
        with self._lock:
            self.stats.overrides_ended += 1
        self._status(tls, now, f"ended at {self.at(now)}: {reason}")

    def _sample_lanes(self, now: float) -> None:
        lane_api = self._t.lane
        for x in self._xs.values():
            for lane in x.in_lanes:
                agg = self._lanes.get(lane)
                if agg is None:
                    agg = self._lanes[lane] = _LaneAgg(since=now)
                ids = frozenset(lane_api.getLastStepVehicleIDs(lane))
                agg.passed += len(agg.ids - ids)
                agg.ids = ids
                agg.steps += 1
                agg.occupancy_sum += float(lane_api.getLastStepOccupancy(lane))
                if ids:
                    agg.speed_sum += float(lane_api.getLastStepMeanSpeed(lane)) * len(ids)
                    agg.vehicle_steps += len(ids)
        first = next(iter(self._lanes.values()), None)
        period = self.period_s if self._lanes_flushed else self.first_period_s
        if first is not None and now - first.since >= period:
            self._flush_lanes(now)
            self._lanes_flushed = True

    def _flush_lanes(self, now: float, *, final: bool = False) -> None:
        for lane, agg in self._lanes.items():
            if agg.steps == 0 or (final and now <= agg.since):
                continue
            self.put(self._flow_doc(lane, agg, now))
            agg.since = now
            agg.passed = agg.steps = agg.vehicle_steps = 0
            agg.occupancy_sum = agg.speed_sum = 0.0

    def _flow_doc(self, lane: str, agg: _LaneAgg, now: float) -> Doc:
        edge, _, index = lane.rpartition("_")
        doc: Doc = {
            "id": self.flow_id(lane),
            "type": FLOW_TYPE,
            "intensity": self.prop(agg.passed, now),
            # mean over the period of the lane's share covered by vehicles (SUMO's occupancy)
            "occupancy": self.prop(
                round(min(1.0, max(0.0, agg.occupancy_sum / agg.steps)), 4), now
            ),
            "dateObserved": self.prop(_dt(self.at(now)), now),
            "dateObservedFrom": self.prop(_dt(self.at(agg.since)), now),
            "dateObservedTo": self.prop(_dt(self.at(now)), now),
        }
        if agg.vehicle_steps:
            kmh = agg.speed_sum / agg.vehicle_steps * 3.6
            doc["averageVehicleSpeed"] = self.prop(round(kmh, 2), now, "KMH")
        if lane not in self._lane_static_sent:
            self._lane_static_sent.add(lane)
            doc["name"] = self.prop(lane, now)
            if index.isdigit():
                doc["laneId"] = self.prop(int(index) + 1, now)  # SUMO counts from 0
            if edge:
                doc["refRoadSegment"] = {
                    "type": "Relationship",
                    "object": f"urn:ngsi-ld:RoadSegment:{self.scenario}:{_part(edge)}",
                    "observedAt": self.at(now),
                }
            with contextlib.suppress(Exception):
                loc = self._geo.lane(lane)
                if loc is not None:
                    doc["location"] = {"type": "GeoProperty", "value": loc}
        return doc

    def _emergency(self, now: float) -> None:
        try:
            evs = self.backend.emergency_vehicles()
        except Exception as exc:  # a field feed that failed must not stop the signals
            log.warning("emergency vehicles unavailable: %s", exc)
            return
        present = set()
        for ev in evs:
            present.add(ev.id)
            known = self._evs.get(ev.id)
            doc: Doc
            if known is None:
                eid = self.ev_id(ev.id, now)
                self._evs[ev.id] = (now, eid)
                doc = {
                    "id": eid,
                    "type": self.ev_type,
                    "description": self.prop(
                        "emergency vehicle run (simulated): signals may give it priority", now
                    ),
                    "dataProvider": self.prop(f"cityward traffic simulation {self.scenario}", now),
                    "vehicleRef": self.prop(ev.id, now),
                    "dateIssued": self.prop(_dt(self.at(now)), now),
                    "validFrom": self.prop(_dt(self.at(now)), now),
                }
            else:
                doc = {"id": known[1], "type": self.ev_type}
            doc["runStatus"] = self.prop("en-route", now)
            doc["currentLane"] = self.prop(ev.lane, now)
            doc["speed"] = self.prop(round(ev.speed_ms * 3.6, 2), now, "KMH")
            doc["remainingRoute"] = self.prop(list(ev.route_edges), now)
            if self._geo.enabled:
                with contextlib.suppress(Exception):
                    px, py = self._t.vehicle.getPosition(ev.id)
                    doc["location"] = {"type": "GeoProperty", "value": self._geo.point(px, py)}
            self.put(doc)
        for vid in [v for v in self._evs if v not in present]:
            start, eid = self._evs.pop(vid)
            self.put(
                {
                    "id": eid,
                    "type": self.ev_type,
                    "runStatus": self.prop("arrived", now),
                    "validTo": self.prop(_dt(self.at(now)), now),
                    "travelTime": self.prop(round(now - start, 1), now, "SEC"),
                    "remainingRoute": self.prop([], now),
                }
            )

    # -- the background thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # never silently: the summary says the feed stopped
            log.exception("the data bank feed stopped")
            self.fatal = self.fatal or "the data bank feed stopped on an error (see the log)"

    def _loop(self) -> None:
        next_poll = time.monotonic()
        deadline: float | None = None
        backoff = 0.25
        while True:
            stopping = self._stop.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self.flush_timeout_s
            if deadline is not None and time.monotonic() > deadline:
                return
            if self.fatal is not None:
                self._drop(self.queue.drain())
                if stopping:
                    return
                self._stop.wait(0.2)
                continue
            if not stopping and time.monotonic() >= next_poll:
                try:
                    self._poll()
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("override poll failed: %s", exc)
                next_poll = time.monotonic() + self.poll_interval_s
            wait = 0.0 if stopping else max(0.0, next_poll - time.monotonic())
            batch = self.queue.take(self.batch_size, wait)
            if not batch:
                if stopping:
                    return
                continue
            try:
                ok = self._post(batch)
            except (httpx.HTTPError, ValueError) as exc:
                ok = -1
                log.warning("data bank unreachable or confused (%s); retrying", exc)
            if ok is not None and ok < 0:
                with self._lock:
                    self.stats.failed_requests += 1
                self.queue.requeue(batch)
                if deadline is None:
                    self._stop.wait(backoff)
                else:  # stopping: _stop is set, and waiting on it would not wait at all
                    time.sleep(max(0.0, min(backoff, deadline - time.monotonic())))
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.25
            self._drop(0)

    def _post(self, batch: list[tuple[str, Doc]]) -> int | None:
        """Upsert a batch: the number accepted, -1 to retry later, None when fatal."""
        docs = [doc for _, doc in batch]
        r = self._client.post(
            "/ngsi-ld/v1/entityOperations/upsert",
            params={"options": "update"},
            content=orjson.dumps(docs),
            headers={"Content-Type": "application/json"},
        )
        with self._lock:
            self.stats.requests += 1
        if r.status_code in (201, 204):
            with self._lock:
                self.stats.written += len(docs)
            return len(docs)
        if r.status_code == 207:
            body = r.json()
            errors = body.get("errors", []) if isinstance(body, dict) else []
            for err in errors:
                problem = err.get("error", {}) if isinstance(err, dict) else {}
                self._reject(f"{err.get('entityId')}: {problem.get('detail') or problem}")
            accepted = len(docs) - len(errors)
            with self._lock:
                self.stats.written += accepted
            return accepted
        if r.status_code == 401:
            self.fatal = f"the data bank refused the token (401): {_detail(r)}"
            log.error("%s; no more writes", self.fatal)
            self._drop(len(docs))
            return None
        if r.status_code in (408, 429) or r.status_code >= 500:
            log.warning("data bank answered %s: %s; retrying", r.status_code, _detail(r))
            return -1
        # 400, 403, 413...: this batch as a whole is refused; the next one may pass
        for _ in docs:
            self._reject(f"HTTP {r.status_code}: {_detail(r)}", log_it=False)
        log.warning("data bank refused a batch of %d: %s %s", len(docs), r.status_code, _detail(r))
        return 0

    def _reject(self, reason: str, *, log_it: bool = True) -> None:
        with self._lock:
            self.stats.rejected += 1
            if len(self.stats.rejections) < 20 and reason not in self.stats.rejections:
                self.stats.rejections.append(reason)
        if log_it:
            log.warning("data bank rejected %s", reason)

    def _poll(self) -> None:
        """Read the override attribute of every TrafficSignal of this feed; queue the new ones."""
        prefix = f"urn:ngsi-ld:{SIGNAL_TYPE}:{self.scenario}:"
        params = {
            "type": SIGNAL_TYPE,
            "idPattern": "^" + re.escape(prefix) + ".*$",
            "attrs": "override",
            "options": "sysAttrs",
        }
        entities = self._entities(params)
        if entities is None:
            # an incomplete answer: a signal missing from it would read as a deleted override
            return
        found = {str(ent.get("id")): ent for ent in entities}
        for tls in self._xs:
            eid = self.signal_id(tls)
            attr = _instance(found.get(eid, {}).get("override"))
            if attr is None:
                # deleted (NGSI-LD Null): no override; put the neutral value back so that the
                # next operator PATCH finds the attribute
                key = ("", b"absent")
                if self._seen.get(tls) != key:
                    self._seen[tls] = key
                    self._requests.put(_OverrideRequest(tls, None, ""))
                    self.put(
                        {
                            "id": eid,
                            "type": SIGNAL_TYPE,
                            "override": self.prop(dict(NO_OVERRIDE), self._now),
                        }
                    )
                continue
            value = attr.get("value")
            modified = str(attr.get("modifiedAt", ""))
            key = (modified, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
            if self._seen.get(tls) == key:
                continue
            first = tls not in self._seen
            self._seen[tls] = key
            if first and value == NO_OVERRIDE:
                continue  # the neutral value this feed wrote at start
            by = self._who(eid, modified) if value not in (NO_OVERRIDE, {}) else ""
            self._requests.put(_OverrideRequest(tls, value, by))
        with self._lock:
            self.stats.polls += 1

    def _entities(self, params: Mapping[str, str]) -> list[Doc] | None:
        """Every entity a query matches, page after page (the answer's rel="next" link); None,
        logged, when the bank refuses a page or answers something else than a list."""
        out: list[Doc] = []
        offset = 0
        while True:
            query = {**params, "offset": str(offset)}
            if self._page is not None:
                query["limit"] = str(self._page)
            r = self._client.get("/ngsi-ld/v1/entities", params=query)
            if self._page is not None and _limit_refused(r):
                self._page = _smaller_page(r, self._page)
                log.info("the data bank's pages hold %s entities", self._page or "its default")
                continue
            if r.status_code != 200:
                log.warning("override poll: %s %s", r.status_code, _detail(r))
                return None
            page = r.json()
            if not isinstance(page, list):
                log.warning("override poll: the data bank answered no list: %s", _detail(r))
                return None
            out.extend(ent for ent in page if isinstance(ent, dict))
            nxt = _next_offset(r)
            if nxt is None or nxt <= offset or not page:
                return out
            offset = nxt

    def _who(self, eid: str, modified: str) -> str:
        """The subject whose write set the override, from the audit trail when readable."""
        if not self.can_read_audit or not modified:
            return ""
        actor = ""
        try:
            since = datetime.fromisoformat(modified.replace("Z", "+00:00")) - timedelta(seconds=2)
            params = {"entity": eid, "action": "write", "since": iso(since)}
            after, pages = 0, 0
            while pages < AUDIT_PAGES:
                query = {**params, "after": str(after)}
                if self._audit_page is not None:
                    query["limit"] = str(self._audit_page)
                r = self._client.get("/cityward/v1/audit", params=query)
                if self._audit_page is not None and _limit_refused(r):
                    self._audit_page = _smaller_page(r, self._audit_page)
                    continue
                pages += 1
                records = r.json() if r.status_code == 200 else None
                if not isinstance(records, list) or not records:
                    break
                for rec in records:
                    path = str(rec.get("path", ""))
                    if (
                        rec.get("method") in ("PATCH", "PUT", "POST")
                        and "/entityOperations/" not in path
                        and int(rec.get("result", 0)) < 300
                    ):
                        actor = str(rec.get("actor", ""))
                last = int(records[-1].get("seq", 0))
                if self._audit_page is not None and len(records) < self._audit_page:
                    break
                if last <= after:
                    break
                after = last
        except (ValueError, TypeError, AttributeError, httpx.HTTPError) as exc:
            log.debug("who set the override of %s: %s", eid, exc)
        return actor


# -- helpers ---------------------------------------------------------------------------------
def _base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise ValueError(f"the data bank URL must start with http:// or https://, not {url!r}")
    for suffix in ("/ngsi-ld/v1", "/ngsi-ld"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def scenario_part(name: str) -> str:
    """A scenario's name as the entity ids carry it: characters outside [A-Za-z0-9._-] become
    '-', leading '-', '.' and '_' go, at most 64 characters (``köln`` -> ``k-ln``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", name)
    return stem.lstrip("-._")[:64] or "sim"


def _part(name: str) -> str:
    """A SUMO id as part of an entity id (characters outside [A-Za-z0-9._~-] %-escaped)."""
    return quote(name, safe="-._~")


def _instance(attr: object) -> Doc | None:
    """The default instance of an attribute (a multi-attribute renders as a list)."""
    if isinstance(attr, list):
        plain = [a for a in attr if isinstance(a, dict) and "datasetId" not in a]
        attr = plain[0] if plain else (attr[0] if attr else None)
    return attr if isinstance(attr, dict) else None


def _limit_refused(r: httpx.Response) -> bool:
    """Whether the bank refused a request for its ``limit`` (a page larger than it allows:
    403 TooManyResults on the NGSI-LD API, 400 on the audit trail)."""
    if r.status_code not in (400, 403):
        return False
    try:
        body = r.json()
    except ValueError:
        return False
    return isinstance(body, dict) and (
        body.get("field") == "limit" or str(body.get("type", "")).endswith("/TooManyResults")
    )


def _smaller_page(r: httpx.Response, page: int) -> int | None:
    """The page size to ask for after ``page`` was refused: the maximum the refusal names
    ("above the maximum of 5", "between 1 and 1000"), or None (no limit: the bank's default
    page, never above its maximum) when it names none smaller."""
    found = re.findall(r"(?:maximum of|at most|between 1 and) (\d+)", _detail(r))
    named = int(found[-1]) if found else 0
    return named if 0 < named < page else None


def _next_offset(r: httpx.Response) -> int | None:
    """The offset of the next page from the answer's rel="next" Link, None on the last page."""
    nxt = r.links.get("next", {}).get("url")
    if not nxt:
        return None
    values = parse_qs(urlsplit(nxt).query).get("offset", [])
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def _detail(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:300]
    return str(body)[:300]
