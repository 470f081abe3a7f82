"""From a camera's analytics to the data bank: flows per interval, Alerts for events.

Entities (Smart Data Models, core @context), all with ``refDevice`` to the camera:

- ``Camera`` ``urn:ngsi-ld:Camera:<camera>``: name, location, status, analysed frames/s;
- per counting line and direction, every ``interval_s``: ``TrafficFlowObserved`` (vehicles:
  ``intensity``, ``vehicleCounts`` by class, ``averageVehicleSpeed`` when the camera has a
  homography and a speed rule), ``ItemFlowObserved`` (``itemType`` bicycle) and
  ``CrowdFlowObserved`` (``peopleCount``, ``peopleCountTowards``/``Away``);
- ``Alert`` per event: category, subCategory, severity, description, the rule, and a reference
  to an anonymized snapshot. Its id names the camera's governance ``source``
  (``urn:ngsi-ld:Alert:from:<source>:camera:<camera>:<digest>``, see :func:`alert_prefix`), so
  that it is read, kept and notified with that source's purposes and rules, not with those of
  every alert; a camera of the built-in ``traffic-cameras`` source keeps the id it always had,
  ``urn:ngsi-ld:Alert:camera:<camera>:<digest>``, which that source's id patterns cover.

The Camera and flow entities carry no source in their id (a derived id is an Alert's): the
catalog attributes them by id pattern and type, and ``vision run`` refuses a camera whose
entities it would not attribute to the camera's source (:func:`emitted_ids`).

Counts and events only: no track id, box sequence or image of a person or vehicle is written.
The camera's time base is the stream time mapped to the wall clock at which the camera
started, so a replayed file gives the same entities every time it is replayed.

Writes leave through :class:`BankSink` (the bank of this process: ``vision run --data-dir`` or
``--database-url``), on a background thread with retries, so a slow database never stalls a
camera. Alerts go first.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import cv2

from cityward.governance.sources import derived_prefix
from cityward.vision.analytics import Crossing, VisionEvent
from cityward.vision.settings import CameraSettings
from cityward.vision.source import Image

log = logging.getLogger("cityward.vision.emitter")

Doc = dict[str, Any]
PROVIDER = "cityward-vision"
VEHICLE_NAMES = frozenset({"car", "motorcycle", "bus", "truck"})
CAMERA_TYPE = "Camera"
ALERT_PREFIX = "urn:ngsi-ld:Alert:camera:"
#: the built-in camera source: its id patterns cover ALERT_PREFIX, so its cameras' alerts keep
#: the ids they had before alerts named their source
BUILTIN_SOURCE = "traffic-cameras"
TRAFFIC_FLOW = "TrafficFlowObserved"
ITEM_FLOW = "ItemFlowObserved"
CROWD_FLOW = "CrowdFlowObserved"
#: the flow entities a rule of each type writes, as (type, direction); other rules write none
RULE_FLOWS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "line": (
        (TRAFFIC_FLOW, "in"),
        (TRAFFIC_FLOW, "out"),
        (ITEM_FLOW, "in"),
        (ITEM_FLOW, "out"),
        (CROWD_FLOW, None),
    ),
    "speed": ((TRAFFIC_FLOW, None),),
    "zone": ((CROWD_FLOW, None), (TRAFFIC_FLOW, None)),
    "crowd": ((CROWD_FLOW, None),),
}


def camera_urn(camera_id: str) -> str:
    return f"urn:ngsi-ld:{CAMERA_TYPE}:{camera_id}"


def flow_urn(kind: str, camera_id: str, rule: str, direction: str | None = None) -> str:
    """The id of a camera's flow entity of type ``kind`` for one rule (and direction)."""
    tail = f":{direction}" if direction else ""
    return f"urn:ngsi-ld:{kind}:camera:{camera_id}:{rule}{tail}"


def alert_prefix(camera: CameraSettings) -> str:
    """The id prefix of a camera's Alerts: one that names the camera's source
    (governance.sources.DERIVED_PREFIX), so the Alert belongs to that source whatever the
    catalog's patterns say. An event Alert carries the camera's place, a description of what
    it saw and a snapshot: read with the purposes of every alert, a public-safety camera's
    event reached environment monitoring."""
    if camera.source == BUILTIN_SOURCE:
        return f"{ALERT_PREFIX}{camera.id}:"
    return f"{derived_prefix(camera.source)}camera:{camera.id}:"


def emitted_ids(camera: CameraSettings) -> list[tuple[str, str]]:
    """The (id, type) of every entity the camera writes: its Camera, the flows of its rules
    (rule name as :class:`cityward.vision.analytics.Rule` names it) and an Alert (its digest
    zeroed), for a check that the catalog attributes them all to the camera's source."""
    out = [(camera_urn(camera.id), CAMERA_TYPE)]
    for raw in camera.rules:
        kind = str(raw.get("type", ""))
        rule = str(raw.get("name") or kind)
        for typ, direction in RULE_FLOWS.get(kind, ()):
            out.append((flow_urn(typ, camera.id, rule, direction), typ))
    out.append((f"{alert_prefix(camera)}{'0' * 20}", "Alert"))
    return list(dict.fromkeys(out))


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _prop(value: Any, **extra: Any) -> Doc:
    return {"type": "Property", "value": value, **extra}


def _dt(dt: datetime) -> Doc:
    return {"type": "Property", "value": {"@type": "DateTime", "@value": _iso(dt)}}


class Sink(Protocol):
    """Where the emitter's entities go."""

    def put(self, entities: Sequence[Doc], *, urgent: bool = False) -> None: ...


class SnapshotStore:
    """Anonymized JPEG snapshots under ``root/<camera>/``, deleted after ``retention_s``.
    Alerts refer to them by their path relative to ``base`` (the data folder; default: the
    parent of ``root``)."""

    def __init__(
        self,
        root: Path,
        retention_s: float,
        width: int = 320,
        quality: int = 70,
        base: Path | None = None,
    ) -> None:
        self.root = root
        self.base = base or root.parent
        self.retention_s = retention_s
        self.width = width
        self.quality = quality

    def save(self, camera_id: str, name: str, anonymized: Image) -> str:
        """Write a small JPEG of an anonymized frame; its path relative to ``base`` (what
        the Alert refers to)."""
        h, w = anonymized.shape[:2]
        small: Any = anonymized
        if w > self.width:
            size = (self.width, max(1, round(h * self.width / w)))
            small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, self.quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        folder = self.root / camera_id
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.jpg"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(buf.tobytes())
        tmp.replace(path)  # never a half-written snapshot
        return str(path.relative_to(self.base))

    def purge(self, now: float | None = None, camera_id: str = "*") -> int:
        """Delete snapshots (of one camera, or all) older than the retention; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        gone = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.glob(f"{camera_id}/*.jpg"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except FileNotFoundError:
                continue
        return gone


@dataclass
class EmitterStats:
    flows: int = 0
    alerts: int = 0
    snapshots: int = 0
    crossings: int = 0
    events: list[str] = field(default_factory=list)


class CameraEmitter:
    """Turns one camera's results into entities for a :class:`Sink`."""

    def __init__(
        self,
        camera: CameraSettings,
        sink: Sink,
        *,
        snapshots: SnapshotStore | None = None,
        started: datetime | None = None,
    ) -> None:
        self.camera = camera
        self.sink = sink
        self.snapshots = snapshots
        self.started = started or datetime.now(UTC)
        self.stats = EmitterStats()
        self._interval_start = 0.0
        self.urn = camera_urn(camera.id)

    def at(self, t: float) -> datetime:
        return self.started + timedelta(seconds=t)

    def camera_entity(self, status: str, fps: float | None = None) -> Doc:
        cam = self.camera
        doc: Doc = {
            "id": self.urn,
            "type": CAMERA_TYPE,
            "name": _prop(cam.name or cam.id),
            "status": _prop(status),
            "cameraUsage": _prop("traffic"),
            "dataProvider": _prop(PROVIDER),
            "description": _prop(
                "Analysed at the edge: counts and events only; faces and plates are blurred "
                "before any image is stored."
            ),
        }
        if cam.location is not None:
            doc["location"] = {
                "type": "GeoProperty",
                "value": {"type": "Point", "coordinates": list(cam.location)},
            }
        if fps is not None:
            doc["analysedFps"] = _prop(round(fps, 2))
        return doc

    def status(self, status: str, fps: float | None = None) -> None:
        self.sink.put([self.camera_entity(status, fps)], urgent=True)

    def _common(self, t0: float, t1: float) -> Doc:
        out: Doc = {
            "dateObserved": _dt(self.at(t1)),
            "dateObservedFrom": _dt(self.at(t0)),
            "dateObservedTo": _dt(self.at(t1)),
            "refDevice": {"type": "Relationship", "object": self.urn},
            "dataProvider": _prop(PROVIDER),
        }
        if self.camera.location is not None:
            out["location"] = {
                "type": "GeoProperty",
                "value": {"type": "Point", "coordinates": list(self.camera.location)},
            }
        return out

    def flows(self, t: float, intervals: dict[str, dict[str, Any]]) -> list[Doc]:
        """The flow entities of the interval that ends at ``t`` (stream seconds), from the
        rules' aggregates (:meth:`cityward.vision.analytics.Rule.interval`)."""
        t0, self._interval_start = self._interval_start, t
        docs: list[Doc] = []
        for rule, agg in intervals.items():
            kind = agg.get("type")
            if kind == "line":
                docs.extend(self._line_flows(rule, agg, t0, t))
            elif kind == "speed":
                docs.extend(self._speed_flows(rule, agg, t0, t))
            elif kind == "zone":
                docs.extend(self._zone_flows(rule, agg, t0, t))
            elif kind == "crowd":
                docs.append(
                    {
                        "id": flow_urn(CROWD_FLOW, self.camera.id, rule),
                        "type": CROWD_FLOW,
                        "peopleCount": _prop(int(agg.get("peak", 0))),
                        "congested": _prop(bool(agg.get("events", 0))),
                        **self._common(t0, t),
                    }
                )
        self.stats.flows += len(docs)
        return docs

    def rest(self, t: float, intervals: dict[str, dict[str, Any]]) -> list[Doc]:
        """The last, partial interval, ending at ``t``: none when none of it passed (a clip
        that ended on an interval's boundary, or gave no frame). That zero-length interval was
        written with zero counts, and became each flow's newest value."""
        if t <= self._interval_start:
            return []
        return self.flows(t, intervals)

    def _line_flows(self, rule: str, agg: dict[str, Any], t0: float, t: float) -> list[Doc]:
        cam = self.camera.id
        docs: list[Doc] = []
        people: dict[str, int] = {}
        for direction in ("in", "out"):
            by_class = {str(k): int(v) for k, v in dict(agg.get(direction, {})).items()}
            vehicles = {k: v for k, v in by_class.items() if k in VEHICLE_NAMES}
            lane = _prop("forward" if direction == "in" else "backward")
            docs.append(
                {
                    "id": flow_urn(TRAFFIC_FLOW, cam, rule, direction),
                    "type": TRAFFIC_FLOW,
                    "intensity": _prop(sum(vehicles.values())),
                    "vehicleCounts": _prop(vehicles),
                    "laneDirection": lane,
                    "laneId": _prop(f"{rule}:{direction}"),
                    **self._common(t0, t),
                }
            )
            docs.append(
                {
                    "id": flow_urn(ITEM_FLOW, cam, rule, direction),
                    "type": ITEM_FLOW,
                    "itemType": _prop("bicycle"),
                    "intensity": _prop(by_class.get("bicycle", 0)),
                    "laneDirection": lane,
                    **self._common(t0, t),
                }
            )
            people[direction] = by_class.get("person", 0)
        docs.append(
            {
                "id": flow_urn(CROWD_FLOW, cam, rule),
                "type": CROWD_FLOW,
                "peopleCount": _prop(people["in"] + people["out"]),
                "peopleCountTowards": _prop(people["in"]),
                "peopleCountAway": _prop(people["out"]),
                **self._common(t0, t),
            }
        )
        return docs

    def _speed_flows(self, rule: str, agg: dict[str, Any], t0: float, t: float) -> list[Doc]:
        means = {k: v for k, v in dict(agg.get("mean_speed_kmh", {})).items()}
        tracks = {k: int(v) for k, v in dict(agg.get("tracks", {})).items()}
        n = sum(tracks.get(k, 0) for k in means if k in VEHICLE_NAMES)
        if not n:
            return []
        mean = sum(means[k] * tracks.get(k, 0) for k in means if k in VEHICLE_NAMES) / n
        return [
            {
                "id": flow_urn(TRAFFIC_FLOW, self.camera.id, rule),
                "type": TRAFFIC_FLOW,
                "averageVehicleSpeed": _prop(round(mean, 1)),
                "intensity": _prop(n),
                **self._common(t0, t),
            }
        ]

    def _zone_flows(self, rule: str, agg: dict[str, Any], t0: float, t: float) -> list[Doc]:
        entries = {str(k): int(v) for k, v in dict(agg.get("entries", {})).items()}
        persons = entries.get("person", 0)
        vehicles = sum(v for k, v in entries.items() if k in VEHICLE_NAMES)
        cam = self.camera.id
        docs: list[Doc] = []
        if persons or "person" in dict(agg.get("occupancy", {})):
            docs.append(
                {
                    "id": flow_urn(CROWD_FLOW, cam, rule),
                    "type": CROWD_FLOW,
                    "peopleCount": _prop(persons),
                    **self._common(t0, t),
                }
            )
        if vehicles:
            docs.append(
                {
                    "id": flow_urn(TRAFFIC_FLOW, cam, rule),
                    "type": TRAFFIC_FLOW,
                    "intensity": _prop(vehicles),
                    **self._common(t0, t),
                }
            )
        return docs

    def alert(self, event: VisionEvent, anonymized: Image | None) -> Doc:
        cam = self.camera.id
        when = self.at(event.time_s)
        digest = hashlib.sha256(
            f"{cam}\n{event.rule}\n{event.kind}\n{event.frame}\n{event.box}".encode()
        ).hexdigest()[:20]
        eid = f"{alert_prefix(self.camera)}{digest}"
        data: Doc = {
            "rule": event.rule,
            "kind": event.kind,
            "class": event.class_name,
            "streamTime_s": round(event.time_s, 3),
        }
        if event.value is not None:
            data["value"] = event.value
        doc: Doc = {
            "id": eid,
            "type": "Alert",
            "category": _prop(event.category),
            "subCategory": _prop(event.sub_category),
            "severity": _prop(event.severity),
            "description": _prop(f"{self.camera.name or cam}: {event.description}"),
            "alertSource": {"type": "Relationship", "object": self.urn},
            "dateIssued": _dt(when),
            "validFrom": _dt(when),
            "alertStatus": _prop("open"),
            "dataProvider": _prop(PROVIDER),
            "data": _prop(data),
        }
        if self.camera.location is not None:
            doc["location"] = {
                "type": "GeoProperty",
                "value": {"type": "Point", "coordinates": list(self.camera.location)},
            }
        if anonymized is not None and self.snapshots is not None and self.camera.snapshots.enabled:
            doc["snapshot"] = _prop(self.snapshots.save(cam, digest, anonymized))
            self.stats.snapshots += 1
        self.stats.alerts += 1
        self.stats.events.append(event.kind)
        return doc

    def emit(
        self,
        t: float,
        crossings: Sequence[Crossing],
        events: Sequence[VisionEvent],
        anonymized: Image | None,
    ) -> None:
        self.stats.crossings += len(crossings)
        if events:
            self.sink.put([self.alert(e, anonymized) for e in events], urgent=True)

    def due(self, t: float) -> bool:
        return t - self._interval_start >= self.camera.interval_s


class BankSink:
    """Writes entities into a :class:`~cityward.bank.service.Bank` from a background thread.

    Entities of the same id waiting together are merged (newest attributes win); urgent ones
    (alerts, camera status) are written first. A failed write is retried with back-off; an
    entity the bank refuses (4xx) is logged and dropped. ``max_pending`` bounds memory: beyond
    it the oldest non-urgent update is dropped, with an error in the log.
    """

    def __init__(
        self,
        bank: Any,
        *,
        tenant: str = "",
        context: Any = None,
        max_pending: int = 10_000,
        on_written: Callable[[Sequence[Doc], float], None] | None = None,
    ) -> None:
        from cityward.bank.jsonld import ContextResolver
        from cityward.bank.model import EntityParser

        self.bank = bank
        self.tenant = tenant
        self._parser = EntityParser(context or ContextResolver(allow_fetch=False).core)
        self.max_pending = max_pending
        self.on_written = on_written
        self._urgent: deque[Doc] = deque()
        self._normal: deque[Doc] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stop = False
        self.written = 0
        self.refused = 0
        self.dropped = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="vision-bank-sink", daemon=True)
        self._thread.start()

    def put(self, entities: Sequence[Doc], *, urgent: bool = False) -> None:
        with self._cond:
            q = self._urgent if urgent else self._normal
            q.extend(entities)
            while len(self._normal) + len(self._urgent) > self.max_pending and self._normal:
                self._normal.popleft()
                self.dropped += 1
                if self.dropped in (1, 10) or self.dropped % 1000 == 0:
                    log.error(
                        "vision: %d entity updates dropped (the bank is behind)", self.dropped
                    )
            self._cond.notify()

    def _take(self) -> list[Doc]:
        """Up to 500 queued updates, oldest first, each entity at most once: a repeated id
        ends the batch and leads the next. Not merged: a counting line's entity takes one
        update per interval, each its own instance in the attribute history (merged, the
        backlog of a bank outage came out as its newest interval alone)."""
        batch: list[Doc] = []
        ids: set[str] = set()
        for q in (self._urgent, self._normal):
            while q and len(batch) < 500:
                if q[0]["id"] in ids:
                    return batch
                doc = q.popleft()
                ids.add(doc["id"])
                batch.append(doc)
        return batch

    def _run(self) -> None:
        delay = 0.5
        while True:
            with self._cond:
                while not self._urgent and not self._normal and not self._stop:
                    self._cond.wait()
                if self._stop and not self._urgent and not self._normal:
                    return
                batch = self._take()
                self._busy = True
            try:
                self._write(batch)
                delay = 0.5
            except Exception as exc:  # the database is away: keep the batch, try again
                self.failures += 1
                log.warning("vision: writing %d entities failed: %s (retrying)", len(batch), exc)
                with self._cond:
                    self._urgent.extendleft(reversed(batch))
                    self._busy = False
                    if self._stop:  # closing: close() counts what is left
                        self._cond.notify_all()
                        return
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _write(self, batch: list[Doc]) -> None:
        from cityward.bank.errors import NgsiError

        parsed: list[Any] = []
        for doc in batch:
            try:
                parsed.append(self._parser.entity(doc))
            except NgsiError as exc:
                self.refused += 1
                log.error("vision: entity %s is invalid: %s", doc.get("id"), exc)
        if not parsed:
            return
        result = self.bank.batch_upsert(self.tenant, parsed, "update")
        for err in result.errors:
            self.refused += 1
            log.error("vision: the bank refused %s", err)
        self.written += len(parsed) - len(result.errors)
        if self.on_written is not None:
            self.on_written(batch, time.time())

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._urgent or self._normal or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to ``timeout_s``), then stop. What the bank did not take
        by then is counted in ``dropped`` and logged: it used to go unsaid."""
        self.wait_idle(timeout_s)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        with self._cond:
            left = len(self._urgent) + len(self._normal)
            self._urgent.clear()
            self._normal.clear()
            self.dropped += left
        if left:
            log.error(
                "vision: %d entity updates not written: the bank did not take them before "
                "the worker stopped",
                left,
            )
