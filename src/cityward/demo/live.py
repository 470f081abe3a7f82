"""The demo city's live traffic: SUMO with our adaptive controller, feeding the data bank.

:class:`LiveTraffic` runs in one background thread of ``cityward demo``:

1. the simulation starts at the current local time of day (the demand of
   :mod:`cityward.demo.city` follows a daily profile, so the demo at 08:00 shows the morning
   peak) and first runs ``warmup_s`` simulated seconds as fast as it can, so the network is
   already full of vehicles when the first figures reach the bank;
2. then it runs paced at ``speed`` simulated seconds per wall second, with a
   :class:`~cityward.traffic.bankfeed.BankFeed` writing TrafficSignal, TrafficFlowObserved and
   EmergencyVehicleRun entities over the bank's HTTP API (the same path a field deployment
   takes) and taking operator overrides back;
3. an ambulance (vClass ``emergency``) is dispatched every ``ev_every_s`` simulated seconds on a
   route across the city; the controllers' preemption gives it its green wave;
4. the air-quality and noise stations (:mod:`cityward.demo.environment`) report once a
   simulated minute, with the day's rhythm and now and then an injected incident. They are
   devices: each pushes its own short JSON to ``/ingest/air-stations`` or
   ``/ingest/noise-stations`` with the stations' device key, and the ingest mapping makes the
   NGSI-LD updates (docs/ingest.md). At the start their past six simulated hours are pushed
   first (oldest first), so that the anomaly service's detectors have learnt them and the
   incidents raise alerts from the first minutes;
5. a :class:`~cityward.demo.kpi.KpiMeter` measures delay and CO2, and one
   ``KeyPerformanceIndicator`` entity carries them next to the same figures of SUMO's
   fixed-time programs on the same demand (:func:`~cityward.demo.kpi.run_baseline`, computed
   in a separate process while the demo runs).

Teleporting keeps SUMO's default (300 s) here, unlike the benchmarks: a demo that runs for
days must not stay locked after a rare gridlock.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import random
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from cityward.demo import demo_entities
from cityward.demo.city import DemoCity
from cityward.demo.environment import SOURCE_OF, Station, Stations, demo_stations, payload
from cityward.demo.kpi import KpiMeter, KpiSample, baseline_at, load_baseline, run_baseline
from cityward.traffic.bankfeed import BankFeed
from cityward.traffic.emergency import PlannedRun, add_runs, run_routes
from cityward.traffic.safety import SafetyGuard
from cityward.traffic.sumo import SumoBackend, control_loop

log = logging.getLogger("cityward.demo")

SCENARIO = "demo"
KPI_ID = "urn:ngsi-ld:KeyPerformanceIndicator:demo:traffic"
BASELINE_HOURS = 3.0  # how far ahead of the start the fixed-time baseline is computed
ENV_PERIOD_S = 60.0  # simulated seconds between two readings of an environment station
# the stations' past hours, written when the demo starts: the anomaly service's detectors learn
# them (a stream needs 288 points before it may raise an alert), so the injected incidents
# raise alerts from the first minutes instead of after five simulated hours
BACKFILL_S = 6 * 3600.0


def time_of_day_s(instant: datetime | None = None, step: float = 10.0) -> float:
    """Seconds since local midnight, on a multiple of ``step`` (the KPI sampling grid)."""
    local = (instant or datetime.now(UTC)).astimezone()
    s = local.hour * 3600 + local.minute * 60 + local.second
    return float(math.floor(s / step) * step)


def wait_for_bank(
    base_url: str, timeout_s: float = 30.0, stop: threading.Event | None = None
) -> bool:
    """Whether the bank answers /healthz within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            return False
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url.rstrip("/") + "/healthz", timeout=2.0).status_code == 200:
                return True
        time.sleep(0.1)
    return False


class LiveTraffic:
    """The demo's simulation thread; :meth:`start`, then :meth:`stop` (joins)."""

    def __init__(
        self,
        city: DemoCity,
        base_url: str,
        token: str,
        *,
        speed: float = 1.0,
        controller: str = "adaptive",
        ev_every_s: float = 240.0,
        period_s: float = 15.0,
        warmup_s: float = 300.0,
        begin: float | None = None,
        seed: int = 1,
        station_key: str | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError("--speed must be above 0 (simulated seconds per wall second)")
        self.city = city
        self.base_url = base_url
        self.token = token
        # the stations' device key (X-API-Key) for their pushes; None: the operator token
        self.station_key = station_key
        self.speed = speed
        self.controller = controller
        self.ev_every_s = ev_every_s
        self.period_s = period_s
        self.warmup_s = warmup_s
        self.seed = seed
        start = time_of_day_s() if begin is None else begin
        # leave room for the warm-up and at least an hour within the city's demand
        self.begin = max(city.begin, min(start - warmup_s, city.end - warmup_s - 3600.0))
        self.stop_event = threading.Event()
        self.backfilled = threading.Event()
        self.error: str | None = None
        self.now = self.begin
        self.feed: BankFeed | None = None
        self.dispatched = 0
        self.kpi: KpiSample | None = None
        self._baseline: list[KpiSample] = []
        self._thread: threading.Thread | None = None
        self._rng = random.Random(seed)
        # the stations' live readings, pushed by a thread of their own (a push waits for its
        # readings to be committed; the simulation must not)
        self._pushes: queue.Queue[list[tuple[Station, dict[str, float], str]]] = queue.Queue(1000)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        self._thread.start()
        threading.Thread(target=self._compute_baseline, name="demo-baseline", daemon=True).start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _compute_baseline(self) -> None:
        until = self.begin + self.warmup_s + BASELINE_HOURS * 3600.0
        until = min(until, self.city.end)
        try:
            path = run_baseline(self.city, self.city.directory / "baseline.json", until=until)
            self._baseline = load_baseline(path)
        except Exception as exc:  # the demo runs on without its comparison
            log.error("fixed-time baseline failed: %s", exc)

    # -- the simulation -------------------------------------------------------------------
    def _args(self) -> list[str]:
        return [
            "-c",
            str(self.city.sumocfg.resolve()),
            "--begin",
            f"{self.begin:g}",
            "--end",
            f"{self.city.end:g}",
            "--seed",
            str(self.seed),
            "--no-step-log",
            "--no-warnings",
            "--duration-log.disable",
        ]

    def _run(self) -> None:
        try:
            self._simulate()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("the demo's traffic simulation stopped")

    def _simulate(self) -> None:
        if not wait_for_bank(self.base_url, stop=self.stop_event):
            if not self.stop_event.is_set():
                self.error = f"the data bank at {self.base_url} did not answer"
            return
        backend = SumoBackend(self._args())
        try:
            routes = run_routes(backend, self._rng)
            meter = KpiMeter()
            warm_end = self.begin + self.warmup_s
            control_loop(backend, self.controller, warm_end)  # as fast as it goes
            self.now = warm_end
            feed = BankFeed(
                backend,
                self.base_url,
                self.token,
                scenario=SCENARIO,
                controller=self.controller,
                period_s=self.period_s,
                first_period_s=2.0,  # the roads on the map within seconds of the start
                start_instant=datetime.now(UTC),
            )
            self.feed = feed
            feed.start()
            self._close_stale_runs(feed, warm_end)
            wall0 = time.perf_counter()
            next_ev = warm_end + 30.0  # the first ambulance soon after the start
            stations = Stations(demo_stations(demo_entities(detectors=False)), seed=self.seed)
            next_env = warm_end
            threading.Thread(
                target=self._backfill_stations,
                args=(feed, stations, warm_end),
                name="demo-backfill",
                daemon=True,
            ).start()

            def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
                nonlocal next_ev, next_env
                if self.stop_event.is_set():
                    raise _Stopped
                self.now = now
                feed.on_step(now, guards)
                if now >= next_ev:
                    next_ev = now + self.ev_every_s
                    self._dispatch(backend, routes, now)
                # the environment stations, once a simulated minute, after their past hours
                if now >= next_env and self.backfilled.is_set():
                    next_env = now + ENV_PERIOD_S
                    at = feed.at(now)
                    readings = [(s, v, at) for s, v in stations.read(now, ENV_PERIOD_S)]
                    with contextlib.suppress(queue.Full):  # a bank that lags loses a minute
                        self._pushes.put_nowait(readings)
                sample = meter.step(backend.t, now)
                if sample is not None:
                    self._write_kpi(feed, sample, now)
                delay = wall0 + (now - warm_end) / self.speed - time.perf_counter()
                if delay > 0:
                    time.sleep(min(delay, 1.0))

            with contextlib.suppress(_Stopped):
                control_loop(
                    backend,
                    self.controller,
                    self.city.end,
                    on_step=on_step,
                    overrides=feed.overrides,
                )
            feed.close()
        finally:
            backend.close()

    def _station_client(self) -> httpx.Client:
        headers = (
            {"X-API-Key": self.station_key}
            if self.station_key
            else {"Authorization": f"Bearer {self.token}"}
        )
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    @staticmethod
    def _push(client: httpx.Client, readings: list[tuple[Station, dict[str, float], str]]) -> bool:
        """Push readings as the stations do: their own JSON, per source, oldest first."""
        by_source: dict[str, list[dict[str, Any]]] = {}
        for station, values, at in readings:
            by_source.setdefault(SOURCE_OF[station.type], []).append(payload(station, values, at))
        for source, messages in by_source.items():
            r = client.post(f"/ingest/{source}", json=messages)
            if r.status_code >= 300:
                log.warning("station readings refused (%s): %s", r.status_code, r.text[:500])
                return False
        return True

    def _backfill_stations(self, feed: BankFeed, stations: Stations, until: float) -> None:
        """The stations' readings of the ``BACKFILL_S`` before ``until``, oldest first (the
        anomaly service learns them in order), half an hour of them per push; then the live
        readings as the simulation makes them."""
        try:
            with self._station_client() as client:
                t = until - BACKFILL_S
                chunk: list[tuple[Station, dict[str, float], str]] = []
                while t < until and not self.stop_event.is_set():
                    at = feed.at(t)
                    chunk.extend((s, v, at) for s, v in stations.read(t % 86400.0, ENV_PERIOD_S))
                    t += ENV_PERIOD_S
                    if len(chunk) >= 30 * len(stations.stations) or t >= until:
                        if not self._push(client, chunk):
                            break
                        chunk = []
                self.backfilled.set()
                while not self.stop_event.is_set():
                    try:
                        readings = self._pushes.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    self._push(client, readings)
        except httpx.HTTPError as exc:
            log.warning("station readings not pushed: %s", exc)
        finally:
            self.backfilled.set()  # the simulation goes on in any case

    def _close_stale_runs(self, feed: BankFeed, now: float) -> None:
        """Runs a previous demo process left en route end as ``interrupted``: their vehicles
        went with that process's simulation, so a map must not show them driving."""
        try:
            r = httpx.get(
                f"{self.base_url}/ngsi-ld/v1/entities",
                params={
                    "type": feed.ev_type,
                    "q": 'runStatus=="en-route"',
                    "options": "keyValues",
                    "attrs": "runStatus",
                    "limit": "1000",
                },
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=10,
            )
            r.raise_for_status()
            stale = [e["id"] for e in r.json()]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.warning("could not look up earlier emergency runs: %s", exc)
            return
        mine = f":{SCENARIO}:"
        for eid in stale:
            if mine in eid:
                feed.put(
                    {
                        "id": eid,
                        "type": feed.ev_type,
                        "runStatus": feed.prop("interrupted", now),
                        "remainingRoute": feed.prop([], now),
                    }
                )

    def _dispatch(self, backend: SumoBackend, routes: list[tuple[str, ...]], now: float) -> None:
        """An ambulance, now, on one of the city's long routes across its signals."""
        self.dispatched += 1
        run = PlannedRun(f"ambulance-{int(now)}-{self.dispatched}", now, self._rng.choice(routes))
        add_runs(backend, [run])

    def _write_kpi(self, feed: BankFeed, sample: KpiSample, now: float) -> None:
        self.kpi = sample
        base = baseline_at(self._baseline, now) if self._baseline else None

        def num(x: float | None) -> float | None:
            return None if x is None or math.isnan(x) else round(x, 2)

        figures: dict[str, tuple[object, str | None]] = {
            "name": ("Traffic in the demo city: adaptive control vs fixed time", None),
            "averageDelay": (num(sample.mean_delay_s), "SEC"),
            "co2": (num(sample.co2_g_per_s), "GSP"),
            "vehicles": (sample.vehicles, None),
            "controller": (self.controller, None),
            "emergencyRunsDispatched": (self.dispatched, None),
        }
        if base is not None:
            figures["baselineAverageDelay"] = (num(base.mean_delay_s), "SEC")
            figures["baselineCo2"] = (num(base.co2_g_per_s), "GSP")
        doc: dict[str, Any] = {"id": KPI_ID, "type": "KeyPerformanceIndicator"}
        for name, (value, unit) in figures.items():
            # NGSI-LD has no null values: a figure without data (no arrivals yet) is left out
            if value is not None:
                doc[name] = feed.prop(value, now, unit)
        feed.put(doc)


class _Stopped(Exception):
    """Raised inside the control loop's step callback to end the run."""


def data_files(directory: Path) -> Path:
    """Where the demo keeps its SUMO city (inside the data directory)."""
    return directory / "city"
