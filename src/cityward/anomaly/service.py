"""The anomaly service: follows the data bank's change feed and raises NGSI-LD ``Alert`` entities.

::

    service = AnomalyService(bank, settings.anomaly, governance=governance)
    service.start()     # read back its open alerts, follow the feed
    ...
    service.stop()

For every committed change of a watched entity type the service takes the watched attribute's
new value (a number, timed by its ``observedAt``) and scores it with the detector of that
(entity, watch) stream; a traffic-incident watch reads occupancy, speed and intensity together.
A hysteresis turns scores into incidents, so that one incident is one ``Alert``: it opens when
``open_after`` consecutive points score at least ``threshold`` (or one point reaches
``high_threshold``), and closes, with ``validTo`` and ``alertStatus: closed``, once
``close_after`` consecutive points have a *level* below ``clear_threshold`` (the score with the
detector's alarm suppression set aside, :meth:`Detector.level`: a detector that goes quiet
after its alarm does not close the incident by going quiet). docs/anomaly.md ("Alerts")
describes the entity written.

The feed listener runs on the writers' threads and only queues changes; one worker thread
scores them and writes alerts, as the service identity ``cityward-anomaly`` (purposes of the
catalog source that holds ``Alert``), each write audited like an API write. A write the bank
refuses for a passing reason is retried with backoff; nothing the service does can fail the
feed or the writers. Open alerts are read back on start, so a restart does not raise the same
incident twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from cityward.anomaly.detectors import Detector, create
from cityward.anomaly.rules import ExpStat, Rule, TrafficIncidentRule
from cityward.anomaly.settings import (
    ALERT_SEVERITIES,
    ALERT_TYPE,
    AnomalySettings,
    DetectorWatch,
    TrafficIncidentWatch,
    local_name,
)
from cityward.bank.access import current_access
from cityward.bank.changes import Change, Unsubscribe
from cityward.bank.errors import NgsiError
from cityward.bank.history import settle
from cityward.bank.jsonld import Context, ContextResolver
from cityward.bank.model import EntityParser, epoch_of, iso_at, now_iso
from cityward.bank.query.qlang import parse_q, parse_type_expr
from cityward.bank.query.sqlgen import q_conjuncts, type_conjuncts
from cityward.bank.service import Bank
from cityward.bank.store.base import QuerySpec
from cityward.bank.temporal import decode_instance_values, instances_sql, parse_temporal_query
from cityward.governance.events import Action, AuditRecord
from cityward.governance.identity import Principal
from cityward.governance.policy import Role
from cityward.governance.sources import (
    ALL_PURPOSES,
    DERIVED_PREFIX,
    UNDECLARED,
    PersonalData,
    derived_prefix,
)

if TYPE_CHECKING:
    from cityward.governance.runtime import Governance

log = logging.getLogger("cityward.anomaly")
# Readings beyond this are a device's sentinel (1e308, -1e308), not a measurement: learnt, they
# overflowed the detectors' squares and differences (inf, then nan) and kept them alarming.
MAX_MAGNITUDE = 1e100

#: who the service is: the audit trail's actor and the ``dataProvider`` of its alerts
SERVICE_ID = "cityward-anomaly"
ALERT_ID_PREFIX = f"urn:ngsi-ld:Alert:{SERVICE_ID}:"
MAX_RETRY_S = 300.0
_PERSONAL_RANK = {PersonalData.NONE: 0, PersonalData.INDIRECT: 1, PersonalData.PERSONAL: 2}
WatchT = DetectorWatch | TrafficIncidentWatch
Doc = dict[str, Any]
StreamKey = tuple[str, str, str]  # tenant, entity id, watch name


class ConfigurationError(ValueError):
    """The service cannot run with this configuration (the message says what to change)."""


# -- bookkeeping -----------------------------------------------------------------------------
@dataclass
class ServiceStats:
    """Counters of one service (a snapshot from :meth:`AnomalyService.snapshot`)."""

    changes: int = 0  # changes of watched types received from the feed
    dropped: int = 0  # changes dropped because the queue was full
    points: int = 0  # values (or rule readings) scored
    skipped: Counter[str] = field(default_factory=Counter)  # values not scored, by reason
    streams: int = 0  # streams in memory now
    evicted: int = 0  # streams forgotten (least recently updated, beyond max_streams)
    opened: int = 0
    closed: int = 0
    escalated: int = 0  # an open alert's severity went up
    restored: int = 0  # open alerts read back at start
    deleted: int = 0  # open alerts deleted by someone else (their incidents are forgotten)
    warmed: int = 0  # values learnt from the recorded history by new streams (warm_start)
    writes: int = 0  # alert writes committed
    write_failures: int = 0  # failed alert write attempts (retried unless permanent)
    lost_writes: int = 0  # alert writes given up (refused for good, or too many pending)
    errors: int = 0  # unexpected errors while handling a change (logged)


@dataclass
class Incident:
    """An open alert: what the service needs to keep it current and close it."""

    alert_id: str
    tenant: str
    source: str
    watch: str
    valid_from: str  # ISO 8601
    peak: float
    severity: str
    data: Doc = field(default_factory=dict)
    peak_at: str = ""  # observedAt of the peak score, when known
    sub_category: str | None = None
    normal_run: int = 0
    normal_since: float | None = None


class _Stream:
    """One (entity, watch): its detector or rule, the running statistics and the run counters."""

    __slots__ = (
        "detector",
        "last_t",
        "n",
        "reason",
        "rule",
        "run",
        "run_peak",
        "run_since",
        "run_top",
        "stat",
    )

    def __init__(self, detector: Detector | None, rule: Rule | None) -> None:
        self.detector = detector
        self.rule = rule
        self.stat = ExpStat(1000)  # for the z-style reason of detector watches
        self.last_t = -math.inf
        self.n = 0
        self.run = 0  # consecutive anomalous points (no alert open)
        self.run_since = 0.0
        self.run_peak = 0.0
        self.run_top: _Point | None = None  # the current run's peak point
        self.reason = ""  # why the peak point of the current run is anomalous


@dataclass
class _Pending:
    tenant: str
    entity: Doc  # compact NGSI-LD (core @context); later writes merge into it
    what: str  # for the audit trail: "opened", "closed", ...
    attempts: int = 0
    due: float = 0.0


@dataclass(slots=True)
class _Input:
    """A reading ready to score: the stream it belongs to, its time, and the scoring step."""

    key: StreamKey
    t: float
    step: Callable[[_Stream], _Point]
    # the attributes read, name -> IRI (their recorded history warms a new stream)
    iris: dict[str, str] = field(default_factory=dict)


@dataclass
class _Point:
    """One scored point, what the hysteresis and the alert need of it."""

    score: float
    t: float
    reason: str
    _: KW_ONLY  # the rest by name: a field added here cannot shift another's value
    value: float | None = None
    level: float | None = None  # the score without the detector's alarm suppression
    sub_category: str | None = None
    severity: str | None = None
    attrs: tuple[str, ...] = ()


def _prop(value: object, **extra: object) -> Doc:
    return {"type": "Property", "value": value, **extra}


def _dt(iso: str) -> Doc:
    return _prop({"@type": "DateTime", "@value": iso})


def _peak(incident: Incident) -> Doc:
    """The ``anomalyScore`` attribute: the incident's peak score, observed when it peaked."""
    score = _prop(round(incident.peak, 6))
    if incident.peak_at:
        score["observedAt"] = incident.peak_at
    return score


def _severity_rank(s: str) -> int:
    return ALERT_SEVERITIES.index(s) if s in ALERT_SEVERITIES else 0


def _instance(instances: Sequence[Doc]) -> Doc | None:
    """The default instance (no datasetId) of an attribute, else its first one."""
    for inst in instances:
        if "datasetId" not in inst:
            return inst
    return instances[0] if instances else None


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def z_reason(attr: str, x: float, stat: ExpStat, unit: str = "") -> str:
    """A reason people read, from the running mean and deviation of the values before ``x``.

    >>> s = ExpStat(100)
    >>> for v in (40.0, 50.0, 60.0, 50.0):
    ...     s.add(v)
    >>> z_reason("averageVehicleSpeed", 20.0, s, " KMH")
    'averageVehicleSpeed 4.2 sigma below expected (20 vs 50 KMH, 60% below)'
    """
    if stat.n < 2 or stat.sd <= 0:
        return f"{attr} {_fmt(x)}{unit}: unusual for this sensor"
    z = (x - stat.mean) / stat.sd
    side = "above" if z > 0 else "below"
    text = f"{attr} {abs(z):.1f} sigma {side} expected ({_fmt(x)} vs {_fmt(stat.mean)}{unit}"
    if stat.mean != 0:
        text += f", {abs(x - stat.mean) / abs(stat.mean):.0%} {side}"
    return text + ")"


# -- the service -----------------------------------------------------------------------------
class AnomalyService:
    """Follows a bank's change feed, scores watched attributes, writes and closes ``Alert``s.

    ``governance`` (the API process's) makes the service write as the identity
    ``cityward-anomaly`` with the purposes of the catalog source that declares ``Alert``, and
    audits each write; without it (tests of the bank alone) writes are unrestricted and not
    audited. ``context``: the @context of the alerts it writes (default: the core context,
    as every other cityward writer).
    """

    def __init__(
        self,
        bank: Bank,
        settings: AnomalySettings,
        *,
        governance: Governance | None = None,
        context: Context | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bank = bank
        self.settings = settings
        self.watches: dict[str, WatchT] = {w.key: w for w in settings.watches}
        self.ctx = context or ContextResolver(allow_fetch=False).core
        self._parser = EntityParser(self.ctx)
        self._clock = clock
        self.stats = ServiceStats()
        self._gov = governance
        self._principal: Principal | None = None
        if governance is not None:
            self._principal = self._identity(governance)
        # changes waiting for the worker
        self._queue: deque[Change] = deque()
        self._cond = threading.Condition()
        # the worker's state (streams, open alerts, pending writes); taken before _cond
        self._state = threading.Lock()
        self._received = 0
        self._handled = 0
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._handle: Unsubscribe | None = None
        # per (tenant, entity, watch): streams (LRU, capped) and open incidents (never evicted)
        self._streams: OrderedDict[StreamKey, _Stream] = OrderedDict()
        self._open: dict[StreamKey, Incident] = {}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._types: dict[str, tuple[WatchT, ...]] = {}
        self._warned: set[str] = set()
        self._no_history = False  # set once reading the history failed (a bank without it)

    # -- identity ---------------------------------------------------------------------------
    def _identity(self, gov: Governance) -> Principal:
        """The service's principal: the purposes of the source its Alert entities belong to."""
        source = gov.catalog.source_of(ALERT_ID_PREFIX + "x", [self.ctx.expand(ALERT_TYPE)])
        self._alerts_source = source
        if source.id == UNDECLARED:
            raise ConfigurationError(
                "the anomaly service writes Alert entities, but no data source in "
                "governance.sources declares the type 'Alert': add one (kind = \"derived\", "
                'types = ["Alert"]) or disable [anomaly]'
            )
        return Principal(SERVICE_ID, Role.OPERATOR, frozenset(source.purposes), kind="service")

    def _alert_prefix(self, eid: str, types: Sequence[str]) -> str:
        """The id prefix of an alert on the entity ``eid`` (of expanded ``types``).

        An alert carries its source's value, reason and place, so it may not be read more
        widely than the source: when some purpose that may read alerts may not read the source
        (a traffic sensor's alert, read with environment-monitoring), or the source is more
        personal (undeclared data is treated as personal), the alert belongs to the source
        (``urn:ngsi-ld:Alert:from:<source>:``, see governance.sources.DERIVED_PREFIX).
        """
        if self._gov is None or self._principal is None:
            return ALERT_ID_PREFIX
        source = self._gov.catalog.source_of(eid, types)
        alerts = self._alerts_source
        covered = set(alerts.purposes) <= set(source.purposes)
        if source.id == alerts.id or (
            covered and _PERSONAL_RANK[source.personal_data] <= _PERSONAL_RANK[alerts.personal_data]
        ):
            return ALERT_ID_PREFIX
        return f"{derived_prefix(source.id)}{SERVICE_ID}:"

    def _principal_for(self, alert_id: str) -> Principal | None:
        """Who writes an alert: the service, with the purposes of the source it belongs to."""
        if self._gov is None or self._principal is None:
            return None
        if not alert_id.startswith(DERIVED_PREFIX):
            return self._principal
        source = self._gov.catalog.source_of(alert_id, [self.ctx.expand(ALERT_TYPE)])
        return Principal(SERVICE_ID, Role.OPERATOR, frozenset(source.purposes), kind="service")

    def _restorer(self) -> Principal | None:
        """Who reads the open alerts back at start: the service, with every purpose, as its
        alerts may belong to any source (see _alert_prefix)."""
        if self._principal is None:
            return None
        return Principal(SERVICE_ID, Role.OPERATOR, frozenset({ALL_PURPOSES}), kind="service")

    @contextlib.contextmanager
    def _as_service(self, principal: Principal | None = None) -> Iterator[Any]:
        """Bank calls inside run under the service's access restrictions (when governed):
        ``principal``'s, by default the service's own."""
        principal = principal or self._principal
        if self._gov is None or principal is None:
            yield None
            return
        from cityward.governance.runtime import RequestTrail

        trail = RequestTrail()
        token = current_access.set(self._gov.access_for(principal, trail))
        try:
            yield trail
        finally:
            current_access.reset(token)

    def _audit(
        self,
        detail: str,
        entity_ids: tuple[str, ...],
        action: Action,
        principal: Principal | None = None,
    ) -> None:
        principal = principal or self._principal
        if self._gov is None or principal is None:
            return
        try:
            self._gov.record(
                AuditRecord(
                    action=action,
                    actor=SERVICE_ID,
                    role=principal.role.value,
                    purposes=tuple(sorted(principal.purposes)),
                    entity_ids=entity_ids,
                    count=len(entity_ids),
                    detail=detail,
                )
            )
        except Exception:  # the audit log is full or closed: the log says so, the work goes on
            log.exception("anomaly: audit record not written: %s", detail)

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the feed, read back open alerts, then start scoring (in that order, so that
        nothing written meanwhile is missed and no open alert is raised twice)."""
        if self._thread is not None:
            raise RuntimeError("the anomaly service is already running")
        self._stopping = False
        self._handle = self.bank.feed.subscribe(self._on_changes)
        try:
            with self._state:
                self._restore()
        except Exception:
            self._handle.close()
            raise
        self._thread = threading.Thread(target=self._run, name="anomaly-service", daemon=True)
        self._thread.start()
        names = ", ".join(self.watches) or "none"
        log.info("anomaly service started: watches %s; %d open alerts", names, len(self._open))
        self._audit(
            f"anomaly service started (watches: {names}; {len(self._open)} open alerts)",
            (),
            Action.SYSTEM,
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop following the feed; handle what is queued, try the pending writes once more."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout_s)
        self._thread = None
        if thread.is_alive():
            log.error("anomaly service: the worker did not stop within %.0f s", timeout_s)
            return
        with self._state:
            self._flush(final=True)
            if self._pending:
                self.stats.lost_writes += len(self._pending)
                log.error(
                    "anomaly service stopped with %d alert writes not committed: %s",
                    len(self._pending),
                    ", ".join(self._pending),
                )
        self._audit("anomaly service stopped", (), Action.SYSTEM)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until every change received so far is handled and its alerts written.

        False on timeout (a write the bank keeps refusing, or a worker that fell behind).
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            target = self._received
            while self._handled < target or self._busy or self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None:
                    return False
                self._cond.wait(min(remaining, 0.1))
        return True

    def snapshot(self) -> ServiceStats:
        """A copy of the counters."""
        with self._state, self._cond:
            s = ServiceStats(**{k: v for k, v in vars(self.stats).items() if k != "skipped"})
            s.skipped = Counter(self.stats.skipped)
            s.streams = len(self._streams)
            return s

    def open_alerts(self) -> dict[StreamKey, Incident]:
        """The alerts open now, by (tenant, source entity id, watch name)."""
        with self._state:
            return dict(self._open)

    # -- the feed listener (writers' threads: quick, never raises) --------------------------
    def _watches_of(self, types: Sequence[str]) -> tuple[WatchT, ...]:
        out: list[WatchT] = []
        for iri in types:
            hit = self._types.get(iri)
            if hit is None:
                hit = tuple(w for w in self.watches.values() if _type_matches(w.entity_type, iri))
                if len(self._types) < 10_000:
                    self._types[iri] = hit
            out.extend(hit)
        return tuple(out)

    def _on_changes(self, changes: Sequence[Change]) -> None:
        wanted = [c for c in changes if self._watches_of(c.types)]
        if not wanted:
            return
        with self._cond:
            for change in wanted:
                if len(self._queue) >= self.settings.queue_size:
                    self._queue.popleft()
                    self._handled += 1  # it will never be handled: do not wait for it
                    self.stats.dropped += 1
                    n = self.stats.dropped
                    if n in (1, 100) or n % 10_000 == 0:
                        log.warning("anomaly service fell behind: %d changes dropped", n)
                self._queue.append(change)
                self._received += 1
                self.stats.changes += 1
            self._cond.notify_all()

    # -- the worker -------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping and not self._due():
                    self._cond.wait(self._wait_s())
                batch = list(self._queue)
                self._queue.clear()
                stopping = self._stopping
                self._busy = True
            with self._state:
                for change in batch:
                    try:
                        self._handle_change(change)
                    except Exception:
                        self.stats.errors += 1
                        log.exception("anomaly: handling a change of %s failed", change.entity_id)
                try:
                    self._flush()
                except Exception:  # pragma: no cover - _flush handles write errors itself
                    log.exception("anomaly: writing alerts failed")
            with self._cond:
                self._handled += len(batch)
                self._busy = False
                self._cond.notify_all()
            if stopping and not batch:
                return

    def _due(self) -> bool:
        now = self._clock()
        return any(p.due <= now for p in self._pending.values())

    def _wait_s(self) -> float:
        if not self._pending:
            return 1.0
        return max(0.01, min(p.due for p in self._pending.values()) - self._clock())

    def _handle_change(self, change: Change) -> None:
        watches = self._watches_of(change.types)
        if change.after is None:
            self._source_deleted(change, watches)
            return
        changed = change.attrs
        if not changed:
            return
        for watch in watches:
            if not watch.matches_id(change.entity_id):
                continue
            if isinstance(watch, DetectorWatch):
                reading = self._detector_input(watch, change, changed)
            else:
                reading = self._rule_input(watch, change, changed)
            if reading is not None:
                self._score(watch, change, reading)

    # -- reading values ---------------------------------------------------------------------
    def _skip(self, reason: str, watch: WatchT, eid: str, detail: str = "") -> None:
        self.stats.skipped[reason] += 1
        key = f"{watch.key}|{reason}"
        if key not in self._warned and len(self._warned) < 1000:
            self._warned.add(key)
            log.warning(
                "anomaly watch %s: %s at %s%s (counted; further ones are not logged)",
                watch.key,
                reason,
                eid,
                f": {detail}" if detail else "",
            )

    def _read(
        self, watch: WatchT, change: Change, iri: str, name: str
    ) -> tuple[float, float, str] | None:
        """(value, time, unit) of one attribute of the new entity, or None (counted why)."""
        assert change.after is not None
        inst = _instance(change.after["attrs"].get(iri, []))
        if inst is None:
            return None
        value = inst.get("value")
        if inst.get("type") != "Property" or isinstance(value, bool):
            self._skip("non-numeric value", watch, change.entity_id, f"{name} = {value!r}")
            return None
        if not isinstance(value, int | float) or not math.isfinite(value):
            self._skip("non-numeric value", watch, change.entity_id, f"{name} = {value!r}")
            return None
        if abs(value) > MAX_MAGNITUDE:
            detail = f"{name} = {value!r}"
            self._skip("value beyond any measurement", watch, change.entity_id, detail)
            return None
        observed = inst.get("observedAt")
        t = epoch_of(observed)
        received = epoch_of(change.at)
        if t is None:
            if observed is not None:
                self._skip("unreadable observedAt", watch, change.entity_id, repr(observed))
                return None
            self.stats.skipped["no observedAt (write time used)"] += 1
            t = received
            if t is None:  # pragma: no cover - the bank stamps valid times
                return None
        elif received is not None and t - received > self.settings.max_ahead_s:
            # scored, it would make every later reading of the stream look late (stream.last_t)
            why = "observedAt far ahead of its receipt"
            self._skip(why, watch, change.entity_id, str(observed))
            return None
        unit = inst.get("unitCode")
        return float(value), t, f" {unit}" if isinstance(unit, str) else ""

    def _find(self, doc: Doc, name: str) -> str | None:
        """The IRI of attribute ``name`` (a term in any @context, or an IRI) in ``doc``."""
        if "://" in name:
            return name if name in doc["attrs"] else None
        for iri in doc["attrs"]:
            if local_name(iri) == name:
                return str(iri)
        return None

    def _detector_input(
        self, watch: DetectorWatch, change: Change, changed: frozenset[str]
    ) -> _Input | None:
        iri = next((a for a in changed if _attr_matches(watch.attribute, a)), None)
        if iri is None:
            return None
        read = self._read(watch, change, iri, watch.attribute)
        if read is None:
            return None
        x, t, unit = read
        name = local_name(watch.attribute)

        def step(stream: _Stream) -> _Point:
            det = stream.detector
            assert det is not None
            score = det.score_one(x, t)
            level = det.level(x, t)
            if not (math.isfinite(score) and math.isfinite(level)):
                self._skip("detector gave no finite score", watch, change.entity_id)
                score = level = 0.0
            score = min(1.0, max(0.0, score))
            level = min(1.0, max(0.0, level))
            reason = ""
            if score >= watch.levels[2]:
                explain = getattr(det, "explain", None)
                text = explain(x, t) if callable(explain) else None
                reason = str(text) if text else z_reason(name, x, stream.stat, unit)
            det.learn_one(x, t)
            stream.stat.add(x)
            return _Point(score, t, reason, value=x, level=level, attrs=(name,))

        return _Input((change.tenant, change.entity_id, watch.key), t, step, {name: iri})

    def _rule_input(
        self, watch: TrafficIncidentWatch, change: Change, changed: frozenset[str]
    ) -> _Input | None:
        assert change.after is not None
        cfg = watch.rule
        required = (cfg.occupancy, cfg.speed)
        optional = (cfg.intensity,) if cfg.intensity else ()
        names = (*required, *optional)
        if not any(_attr_matches(n, a) for a in changed for n in names):
            return None
        values: dict[str, float] = {}
        times: dict[str, float] = {}
        iris: dict[str, str] = {}
        for name in names:
            iri = self._find(change.after, name)
            if iri is not None:
                iris[name] = iri
            read = self._read(watch, change, iri, name) if iri is not None else None
            if read is None:
                if name in required:
                    if iri is None:
                        self._skip("missing input", watch, change.entity_id, name)
                    return None
                continue
            values[name] = read[0]
            times[name] = read[1]
        if not _close_enough(times, required, cfg.max_skew_s):
            self._skip("inputs observed too far apart", watch, change.entity_id)
            return None
        for name in optional:
            if name in times and not _close_enough(times, (*required, name), cfg.max_skew_s):
                # an optional input that stopped reporting (a broken counter) is left out; it
                # must not switch the rule off for the sensor
                why = "optional input observed too far apart, left out"
                self._skip(why, watch, change.entity_id, name)
                del values[name], times[name]
        t = max(times.values())
        attrs = tuple(local_name(n) for n in values)

        def step(stream: _Stream) -> _Point:
            rule = stream.rule
            assert rule is not None
            v = rule.process(values, t)
            # by keyword: a rule has no alarm suppression (level: None, the score itself)
            return _Point(
                v.score,
                t,
                v.reason,
                sub_category=v.sub_category,
                severity=v.severity,
                attrs=attrs,
            )

        return _Input((change.tenant, change.entity_id, watch.key), t, step, iris)

    # -- streams ----------------------------------------------------------------------------
    def _stream(self, key: StreamKey, watch: WatchT) -> _Stream:
        stream = self._streams.get(key)
        if stream is not None:
            self._streams.move_to_end(key)
            return stream
        if isinstance(watch, DetectorWatch):
            stream = _Stream(create(watch.detector, watch.detector_config), None)
        else:
            stream = _Stream(None, TrafficIncidentRule(watch.rule))
        self._streams[key] = stream
        while len(self._streams) > self.settings.max_streams:
            old, _ = self._streams.popitem(last=False)
            self.stats.evicted += 1
            n = self.stats.evicted
            if n <= 10 or n % 1000 == 0:
                log.info(
                    "anomaly: %d streams is the limit (anomaly.max_streams): forgot the least "
                    "recently updated, %s of %s (%d forgotten so far)",
                    self.settings.max_streams,
                    old[2],
                    old[1],
                    n,
                )
        return stream

    def _score(self, watch: WatchT, change: Change, reading: _Input) -> None:
        key = reading.key
        new = key not in self._streams
        stream = self._stream(key, watch)
        if new and reading.iris and self.settings.warm_start > 0:
            self._warm(stream, watch, key, reading.iris, reading.t)
        if reading.t <= stream.last_t:
            # a replayed or late reading: scoring it would learn the past twice
            self._skip("observedAt not after the previous one", watch, key[1])
            return
        point = reading.step(stream)
        stream.last_t = point.t
        stream.n += 1
        self.stats.points += 1
        if stream.n <= watch.warmup:
            return
        self._hysteresis(watch, change, key, stream, point)

    def _warm(
        self, stream: _Stream, watch: WatchT, key: StreamKey, iris: dict[str, str], t: float
    ) -> None:
        """Run the stream's detector or rule over the recorded history of its attributes
        before ``t`` (their default instances, the newest ``warm_start`` values of each), as
        if the service had followed them all along: a restart, or a stream forgotten beyond
        max_streams, does not leave it blind for a warm-up (288 values: a day of 5-minute
        readings) again. Nothing is alerted on the past; an incident in it is learnt as the
        running detector or rule would have learnt it.

        More values than the watch's warmup: a detector that has seen only that many is as
        young as a cold one at the end of its warm-up (the default detector's long-run error
        statistics remember about 2,000 values)."""
        found = self._recorded(key, iris, t)
        if not found:
            return
        name_of = {iri: name for name, iri in iris.items()}
        # (time, name, value) of the default instances, oldest first
        points: list[tuple[float, str, float]] = []
        for ti, iri, inst in found:
            value = inst.get("value")
            if ti <= stream.last_t or ti >= t:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value) or inst.get("type", "Property") != "Property":
                continue
            points.append((ti, name_of[iri], float(value)))
        points.sort(key=lambda p: p[0])
        det, rule = stream.detector, stream.rule
        if det is not None:
            for ti, _, x in points:
                det.process(x, ti)
                stream.stat.add(x)
                self._warmed(stream, ti)
        elif rule is not None and isinstance(watch, TrafficIncidentWatch):
            # as the live path reads them: at each recorded time, the latest value of every
            # input, when the required ones are there and were observed close enough together
            required = (watch.rule.occupancy, watch.rule.speed)
            latest: dict[str, tuple[float, float]] = {}
            for n, (ti, name, x) in enumerate(points):
                latest[name] = (x, ti)
                if n + 1 < len(points) and points[n + 1][0] == ti:
                    continue  # the other inputs of the same time first
                if any(r not in latest for r in required):
                    continue
                when = {k: w for k, (_, w) in latest.items()}
                skew = watch.rule.max_skew_s
                if not _close_enough(when, required, skew):
                    continue
                used = {
                    k: v
                    for k, (v, _) in latest.items()
                    if k in required or _close_enough(when, (*required, k), skew)
                }
                rule.process(used, ti)
                self._warmed(stream, ti)

    def _warmed(self, stream: _Stream, t: float) -> None:
        stream.last_t = t
        stream.n += 1
        self.stats.warmed += 1

    def _recorded(
        self, key: StreamKey, iris: dict[str, str], t: float
    ) -> list[tuple[float, str, dict[str, Any]]]:
        """(observedAt as Unix time, IRI, instance) of the newest ``warm_start`` recorded
        default instances of each of ``iris`` before ``t``.

        The API's own SQL (``instances_sql``), decoded to values (no ISO texts)."""
        if self._no_history:
            return []
        tenant, eid, _ = key
        store = self.bank.store
        try:
            rows = store.select(
                "SELECT pk FROM entities WHERE tenant = ? AND eid = ?", [tenant, eid]
            )
            if not rows:
                return []
            q = parse_temporal_query(
                {"lastN": str(self.settings.warm_start), "timerel": "before", "timeAt": iso_at(t)}
            )
            settle(store)  # the rows still staged on SQLite (cityward.bank.history)
            sql, params = instances_sql(store.dialect, q, [int(rows[0][0])], list(iris.values()))
            found = store.select(sql, params)
        except Exception as exc:  # the stream starts cold; the service goes on
            self._history_failed(eid, exc)
            return []
        # a datasetId's instances are left out: the live path reads the default instance
        return [
            (us / 1e6, iri, inst)
            for us, iri, ds, inst in decode_instance_values(q, found)
            if ds is None
        ]

    def _history_failed(self, eid: str, exc: Exception) -> None:
        self.stats.skipped["history not read (stream started cold)"] += 1
        if "attr_history" in str(exc):  # no history table: a bank without History (tools)
            self._no_history = True
            log.warning("anomaly: no recorded history to warm new streams from (%s)", exc)
        elif "warm" not in self._warned:
            self._warned.add("warm")
            log.warning("anomaly: reading %s's history failed, started cold: %s", eid, exc)

    # -- hysteresis -------------------------------------------------------------------------
    def _hysteresis(
        self, watch: WatchT, change: Change, key: StreamKey, stream: _Stream, point: _Point
    ) -> None:
        threshold, high, clear = watch.levels
        s = point.score
        incident = self._open.get(key)
        if incident is None:
            if point.level is not None and point.level >= high:
                # a detector still quiet after an earlier alarm whose alert has closed: a new
                # incident strong enough to reach the high threshold opens all the same
                s = max(s, point.level)
            if s < threshold:
                stream.run = 0
                return
            if stream.run == 0 or s > stream.run_peak:
                stream.reason = point.reason
                stream.run_peak = s
                stream.run_top = point
            if stream.run == 0:
                stream.run_since = point.t
            stream.run += 1
            if stream.run >= watch.opens_after or s >= high:
                self._open_alert(watch, change, key, stream, point)
                stream.run = 0
                stream.run_peak = 0.0
                stream.run_top = None
            return
        # an open incident goes on while the stream is anomalous, even where the detector is
        # quiet after its alarm (one alarm per incident): its level tells
        s = point.level if point.level is not None else s
        if s < clear:
            incident.normal_run += 1
            if incident.normal_run == 1:
                incident.normal_since = point.t
            if incident.normal_run >= watch.close_after:
                self._close_alert(
                    incident, iso_at(incident.normal_since or point.t), "normal again"
                )
            return
        incident.normal_run = 0
        incident.normal_since = None
        severity = self._severity(watch, s, point.severity)
        if s > incident.peak:
            incident.peak = s
            incident.peak_at = iso_at(point.t)
            incident.data["peakScore"] = round(s, 6)
            if "value" in incident.data and point.value is not None:
                incident.data["value"] = point.value  # the value at the peak
        # a sub-category the rule insists on (with its severity) replaces the one opened with:
        # a jam that turns out an accident says so, even when its score was already high
        sub = point.sub_category if point.severity is not None else None
        resorted = sub is not None and sub != incident.sub_category
        escalated = _severity_rank(severity) > _severity_rank(incident.severity)
        if escalated or resorted:
            frag: Doc = {
                "id": incident.alert_id,
                "type": ALERT_TYPE,
                "anomalyScore": _peak(incident),
                "data": _prop(dict(incident.data)),
            }
            if escalated:
                incident.severity = severity
                self.stats.escalated += 1
                frag["severity"] = _prop(severity)
            if resorted:
                incident.sub_category = sub
                frag["subCategory"] = _prop(sub)
            if point.reason:
                frag["description"] = _prop(point.reason)
            self._write(incident.tenant, frag, "escalated")

    @staticmethod
    def _severity(watch: WatchT, score: float, insisted: str | None) -> str:
        by_score = "high" if score >= watch.levels[1] else "medium"
        if insisted is not None and _severity_rank(insisted) > _severity_rank(by_score):
            return insisted
        return by_score

    def _open_alert(
        self, watch: WatchT, change: Change, key: StreamKey, stream: _Stream, point: _Point
    ) -> None:
        tenant, source, name = key
        valid_from = iso_at(stream.run_since)
        digest = hashlib.sha256(f"{tenant}\n{source}\n{name}\n{valid_from}".encode()).hexdigest()
        assert change.after is not None
        alert_id = f"{self._alert_prefix(source, change.after['type'])}{name}:{digest[:20]}"
        peak = max(stream.run_peak, point.score)
        # the run's peak point gives the alert its value and time (with open_after > 1 the
        # point that opens it is the run's last, not its peak); the point whose rule insisted
        # on the higher severity gives the sub-category
        top = stream.run_top or point
        strong = max(top, point, key=lambda q: _severity_rank(q.severity or ""))
        severity = self._severity(watch, peak, strong.severity)
        threshold = watch.levels[0]
        data: Doc = {
            "watch": name,
            "threshold": threshold,
            "peakScore": round(peak, 6),
            "attributes": list(point.attrs),
        }
        if isinstance(watch, DetectorWatch):
            data["detector"] = watch.detector
            if top.value is not None:
                data["value"] = top.value
        else:
            data["rule"] = watch.kind
        sub = strong.sub_category or watch.sub_category
        reason = stream.reason or point.reason or f"{name}: score {peak:.4f} >= {threshold}"
        frag: Doc = {
            "id": alert_id,
            "type": ALERT_TYPE,
            "category": _prop(watch.category),
            "severity": _prop(severity),
            "description": _prop(reason),
            "alertSource": {"type": "Relationship", "object": source},
            "dateIssued": _dt(now_iso()),
            "validFrom": _dt(valid_from),
            "alertStatus": _prop("open"),
            "anomalyScore": _prop(round(peak, 6), observedAt=iso_at(top.t)),
            "anomalousProperty": _prop(", ".join(point.attrs)),
            "dataProvider": _prop(SERVICE_ID),
            "data": _prop(data),
        }
        if sub is not None:
            frag["subCategory"] = _prop(sub)
        assert change.after is not None
        loc = _instance(change.after["attrs"].get(self.ctx.expand("location"), []))
        if loc is not None and loc.get("type") == "GeoProperty":
            frag["location"] = {"type": "GeoProperty", "value": loc["value"]}
        self._open[key] = Incident(
            alert_id, tenant, source, name, valid_from, peak, severity, data, iso_at(top.t), sub
        )
        self.stats.opened += 1
        log.info("anomaly alert opened: %s on %s (%s): %s", alert_id, source, name, reason)
        self._write(tenant, frag, "opened")

    def _close_alert(self, incident: Incident, valid_to: str, why: str) -> None:
        key = (incident.tenant, incident.source, incident.watch)
        self._open.pop(key, None)
        data = {**incident.data, "closed": why}
        frag: Doc = {
            "id": incident.alert_id,
            "type": ALERT_TYPE,
            "validTo": _dt(valid_to),
            "alertStatus": _prop("closed"),
            "anomalyScore": _peak(incident),
            "data": _prop(data),
        }
        self.stats.closed += 1
        log.info("anomaly alert closed (%s): %s on %s", why, incident.alert_id, incident.source)
        self._write(incident.tenant, frag, "closed")

    def _source_deleted(self, change: Change, watches: Sequence[WatchT]) -> None:
        for watch in watches:
            key = (change.tenant, change.entity_id, watch.key)
            self._streams.pop(key, None)
            incident = self._open.get(key)
            if incident is not None:
                self._close_alert(incident, change.at, "source entity deleted")

    # -- writing alerts ---------------------------------------------------------------------
    def _write(self, tenant: str, frag: Doc, what: str) -> None:
        """Queue an alert write (merged into one still pending for the same alert)."""
        eid = frag["id"]
        pending = self._pending.get(eid)
        if pending is not None:
            pending.entity.update(frag)
            pending.what = f"{pending.what}+{what}"
            pending.due = 0.0
            return
        if len(self._pending) >= self.settings.max_pending_writes:
            lost_id, lost = self._pending.popitem(last=False)
            self.stats.lost_writes += 1
            log.error(
                "anomaly: %d alert writes are waiting (anomaly.max_pending_writes): gave up "
                "the oldest, %s (%s)",
                len(self._pending) + 1,
                lost_id,
                lost.what,
            )
        self._pending[eid] = _Pending(tenant, dict(frag), what)

    def _flush(self, final: bool = False) -> None:
        """Write the pending alerts that are due (all of them when ``final``)."""
        now = self._clock()
        for eid, p in list(self._pending.items()):
            if not final and p.due > now:
                continue
            try:
                self._commit(p)
            except NgsiError as exc:
                if exc.status == 404 and not p.what.startswith("opened"):
                    del self._pending[eid]
                    self._forget(eid)
                    continue
                self.stats.write_failures += 1
                if exc.status < 500:  # refused for good (bad entity, purposes): retry is useless
                    del self._pending[eid]
                    self.stats.lost_writes += 1
                    log.error("anomaly: the bank refused alert %s (%s): %s", eid, p.what, exc)
                    continue
                self._retry(eid, p, exc)
            except Exception as exc:  # the database is locked or unreachable: try again later
                self.stats.write_failures += 1
                self._retry(eid, p, exc)
            else:
                del self._pending[eid]
                self.stats.writes += 1

    def _forget(self, alert_id: str) -> None:
        """An open alert was deleted (by an operator, through the API): the service stops
        following its incident; a stream that stays anomalous opens a new alert."""
        for key, incident in list(self._open.items()):
            if incident.alert_id == alert_id:
                del self._open[key]
        self.stats.deleted += 1
        log.info("anomaly: alert %s was deleted while open; its incident is forgotten", alert_id)

    def _retry(self, eid: str, p: _Pending, exc: BaseException) -> None:
        p.attempts += 1
        delay = min(self.settings.retry_interval_s * 2 ** (p.attempts - 1), MAX_RETRY_S)
        p.due = self._clock() + delay
        if p.attempts in (1, 2) or p.attempts % 10 == 0:
            log.warning(
                "anomaly: writing alert %s (%s) failed (attempt %d): %s; retrying in %.0f s",
                eid,
                p.what,
                p.attempts,
                exc,
                delay,
            )

    def _commit(self, p: _Pending) -> None:
        frag = self._parser.entity(p.entity)
        eid = str(p.entity["id"])
        principal = self._principal_for(eid)
        with self._as_service(principal):
            if p.what.startswith("opened"):
                result = self.bank.batch_upsert(p.tenant, [frag], "update")
            else:
                # an alert someone deleted is not brought back, half, by its next change
                result = self.bank.batch_update(p.tenant, [frag], no_overwrite=False)
        if result.errors:
            raise result.raised[0]
        source = p.entity.get("alertSource", {}).get("object")
        ids = (eid, str(source)) if source else (eid,)
        self._audit(f"anomaly alert {p.what}: {eid}", ids, Action.WRITE, principal)

    # -- restart ----------------------------------------------------------------------------
    def _restore(self) -> None:
        """Read back the open alerts this service wrote (every tenant)."""
        store = self.bank.store
        tenants = [str(r[0]) for r in store.select("SELECT name FROM tenants")]
        q = parse_q(f'dataProvider=="{SERVICE_ID}";alertStatus=="open"')
        texpr = parse_type_expr(ALERT_TYPE)
        for tenant in tenants:
            offset = 0
            while True:
                spec = QuerySpec(limit=500, offset=offset)
                spec.conjuncts.extend(type_conjuncts(texpr, self.ctx.expand, store.dialect))
                spec.conjuncts.extend(q_conjuncts(q, self.ctx.expand, store.dialect))
                with self._as_service(self._restorer()):
                    docs, _ = store.query(tenant, spec)
                for doc in docs:
                    self._adopt(tenant, doc)
                if len(docs) < spec.limit:
                    break
                offset += spec.limit
        if self._pending:  # alerts of watches that no longer exist: closed at once
            self._flush(final=True)

    def _classified(self, alert_id: str, entity: Doc) -> bool:
        """Whether an alert's id puts it where an alert on ``entity`` belongs now (or
        somewhere stricter: a derived alert of a source that need not be is left so)."""
        wanted = self._alert_prefix(str(entity["id"]), entity.get("type", []))
        return wanted == ALERT_ID_PREFIX or alert_id.startswith(wanted)

    def _covers(self, watch: WatchT, entity: Doc) -> bool:
        """Whether ``watch`` follows ``entity`` (its id and one of its types)."""
        if not watch.matches_id(str(entity["id"])):
            return False
        return any(_type_matches(watch.entity_type, str(t)) for t in entity.get("type", []))

    def _adopt(self, tenant: str, doc: Doc) -> None:
        def value(name: str) -> Any:
            inst = _instance(doc["attrs"].get(self.ctx.expand(name), []))
            if inst is None:
                return None
            return inst.get("object") if inst.get("type") == "Relationship" else inst.get("value")

        data = value("data")
        source = value("alertSource")
        scored = _instance(doc["attrs"].get(self.ctx.expand("anomalyScore"), []))
        peak_at = scored.get("observedAt") if scored is not None else None
        valid_from = value("validFrom")
        if isinstance(valid_from, dict):
            valid_from = valid_from.get("@value")
        if not isinstance(data, dict) or not isinstance(source, str):
            log.warning("anomaly: open alert %s has no data or alertSource; left alone", doc["id"])
            return
        watch = str(data.get("watch", ""))
        peak = value("anomalyScore")
        severity = value("severity")
        sub = value("subCategory")
        incident = Incident(
            doc["id"],
            tenant,
            source,
            watch,
            str(valid_from or ""),
            float(peak) if isinstance(peak, int | float) else 0.0,
            str(severity or "medium"),
            dict(data),
            peak_at if isinstance(peak_at, str) else "",
            sub if isinstance(sub, str) else None,
        )
        key = (tenant, source, watch)
        if watch not in self.watches:
            log.warning(
                "anomaly: open alert %s belongs to no configured watch; closing it", doc["id"]
            )
            self._close_alert(incident, now_iso(), "watch no longer configured")
            return
        # while the service was down its source may have been deleted, or the watch changed
        # so that it no longer covers it: no reading of it would ever close the alert
        with self._as_service(self._restorer()):
            entity = self.bank.store.get(tenant, source)
        gone = None
        if entity is None:
            gone = "source entity deleted"
        elif not self._covers(self.watches[watch], entity):
            gone = "the watch no longer covers the source"
        elif not self._classified(doc["id"], entity):
            # its source became more restricted (a catalog change, or an alert written before
            # alerts followed their source): none of the source's new values may go into it;
            # the next anomalous point opens an alert that belongs to the source
            gone = "its source's data source is more restricted now"
        if gone is not None:
            log.warning("anomaly: open alert %s: %s; closing it", doc["id"], gone)
            self._close_alert(incident, now_iso(), gone)
            return
        previous = self._open.get(key)
        if previous is not None and previous.alert_id == incident.alert_id:
            return  # started again after a stop: already known
        if previous is not None:  # two open alerts for one stream: keep the later one
            older, incident = sorted([previous, incident], key=lambda i: i.valid_from)
            self._close_alert(older, now_iso(), "duplicate of " + incident.alert_id)
        self._open[key] = incident
        self.stats.restored += 1


def _close_enough(times: dict[str, float], names: Sequence[str], max_skew_s: float) -> bool:
    """Whether the inputs ``names`` (all in ``times``) were observed within max_skew_s."""
    when = [times[n] for n in names]
    return max(when) - min(when) <= max_skew_s


def _type_matches(watched: str, iri: str) -> bool:
    """A watch's type (a term, matched in any @context, or an IRI) against an entity type IRI."""
    return watched == iri if "://" in watched else local_name(iri) == watched


def _attr_matches(watched: str, iri: str) -> bool:
    return watched == iri if "://" in watched else local_name(iri) == watched


__all__ = [
    "ALERT_ID_PREFIX",
    "SERVICE_ID",
    "AnomalyService",
    "ConfigurationError",
    "Incident",
    "ServiceStats",
    "z_reason",
]
