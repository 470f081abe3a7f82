"""Delay and CO2 of a running simulation, and the same figures under SUMO's fixed-time signals.

:class:`KpiMeter` is fed once per simulation step (after ``simulationStep``) with the TraCI or
libsumo module. What it reads, and how often, is chosen for cost:

* ``simulation.getDepartedIDList`` / ``getArrivedIDList`` every step (cheap, and no arrival may
  be missed). A vehicle's depart delay (how long it waited to be inserted) is read once, when
  it departs.
* every ``sample_every_s``: each running vehicle's time loss (``vehicle.getTimeLoss``, the time
  lost against driving at its desired speed) and CO2 (``vehicle.getCO2Emission``, mg/s over
  the last step). An arrived vehicle can no longer be asked, so its delay is its last sampled
  time loss plus its depart delay: it misses at most ``sample_every_s`` of its last moments
  (usually free driving out of the network, so very little).

A sample (every ``sample_every_s``) gives the mean delay of the vehicles that arrived in the
last ``window_s`` (NaN when none did) and the CO2 of all running vehicles, g/s, averaged over
the window's samples. Memory is bounded: vehicles are forgotten when they arrive (or vanish),
and the window holds its arrivals and samples only.

:func:`run_baseline` runs a city with SUMO's own fixed-time programs (no cityward controller)
in a separate Python process (libsumo holds one simulation per process, and the caller may be
running one) and writes its samples as JSON. Both this run and the live one should keep SUMO's
default teleporting (a vehicle stuck for 300 s jumps ahead): with ``--time-to-teleport -1`` one
gridlock would stop a 24 h demo for good, and the two runs are only comparable when they treat
gridlock the same way.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cityward.demo.city import DemoCity, city_params

BASELINE_FORMAT = 1


@dataclass
class KpiSample:
    t: float  # simulation time (s)
    mean_delay_s: float  # mean time loss (s) of the vehicles that ARRIVED in the window (NaN: none)
    co2_g_per_s: float  # CO2 emitted by all running vehicles, g/s, averaged over the window
    vehicles: int  # vehicles running at t
    arrived: int  # arrived in the window

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN becomes null: JSON has no NaN)."""
        d = asdict(self)
        if math.isnan(self.mean_delay_s):
            d["mean_delay_s"] = None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KpiSample:
        delay = d.get("mean_delay_s")
        return cls(
            float(d["t"]),
            math.nan if delay is None else float(delay),
            float(d["co2_g_per_s"]),
            int(d["vehicles"]),
            int(d["arrived"]),
        )


class KpiMeter:
    """Fed once per simulation step with the TraCI/libsumo module ``t`` (libsumo or traci)."""

    def __init__(self, window_s: float = 300.0, sample_every_s: float = 10.0) -> None:
        if window_s <= 0 or sample_every_s <= 0:
            raise ValueError("window_s and sample_every_s must be positive")
        self.window_s = window_s
        self.sample_every_s = sample_every_s
        self._loss: dict[str, float] = {}  # running vehicle -> last sampled time loss
        self._depart_delay: dict[str, float] = {}  # running vehicle -> its depart delay
        self._arrivals: deque[tuple[float, float]] = deque()  # (time, delay) in the window
        self._co2: deque[tuple[float, float]] = deque()  # (time, g/s) samples in the window
        self._due = -math.inf

    def step(self, t: Any, now: float) -> KpiSample | None:
        """Account for the step that just ended at ``now``; a sample every ``sample_every_s``."""
        sim, veh = t.simulation, t.vehicle
        for vid in sim.getDepartedIDList():
            self._loss[vid] = 0.0
            self._depart_delay[vid] = float(veh.getDepartDelay(vid))
        for vid in sim.getArrivedIDList():
            loss = self._loss.pop(vid, None)
            dd = self._depart_delay.pop(vid, 0.0)
            if loss is not None:  # one that departed before the meter started is not counted
                self._arrivals.append((now, loss + dd))
        if now < self._due:
            return None
        # the next sample at the next multiple of sample_every_s: live and baseline runs line up
        self._due = (math.floor(now / self.sample_every_s) + 1) * self.sample_every_s
        ids = veh.getIDList()
        co2_mg = 0.0
        for vid in ids:
            self._loss[vid] = float(veh.getTimeLoss(vid))
            co2_mg += float(veh.getCO2Emission(vid))
            self._depart_delay.setdefault(vid, 0.0)
        if len(self._loss) > len(ids):  # removed without arriving (teleport removal, remove())
            running = set(ids)
            for vid in [v for v in self._loss if v not in running]:
                del self._loss[vid]
                self._depart_delay.pop(vid, None)
        self._co2.append((now, co2_mg / 1000.0))
        start = now - self.window_s
        while self._arrivals and self._arrivals[0][0] <= start:
            self._arrivals.popleft()
        while self._co2 and self._co2[0][0] <= start:
            self._co2.popleft()
        n = len(self._arrivals)
        delay = sum(d for _, d in self._arrivals) / n if n else math.nan
        co2 = sum(c for _, c in self._co2) / len(self._co2)
        return KpiSample(float(now), delay, co2, len(ids), n)


# -- the fixed-time baseline ------------------------------------------------------------------


def baseline_args(city: DemoCity, *, seed: int, until: float) -> list[str]:
    """SUMO options of the baseline run (no teleport override: SUMO's default, 300 s)."""
    return [
        "-c",
        str(city.sumocfg.resolve()),
        "--seed",
        str(seed),
        "--end",
        f"{until:g}",
        "--no-step-log",
        "--no-warnings",
        "--duration-log.disable",
    ]


def _city_key(city: DemoCity) -> dict[str, Any]:
    params = city_params(city)
    if params:
        return params
    # a city put together by hand: its files stand for it
    return {
        "net": str(city.net.resolve()),
        "routes": str(city.routes.resolve()),
        "sumocfg": str(city.sumocfg.resolve()),
    }


def _reusable(out: Path, key: dict[str, Any], seed: int, until: float) -> bool:
    try:
        doc = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(doc, dict)
        and doc.get("format") == BASELINE_FORMAT
        and doc.get("complete") is True
        and doc.get("city") == key
        and doc.get("seed") == seed
        and float(doc.get("until", -1)) >= until
    )


def run_baseline(city: DemoCity, out: Path, *, until: float | None = None, seed: int = 1) -> Path:
    """Run ``city`` from its beginning to ``until`` (default: its end) under SUMO's fixed-time
    signals, in a separate process, and write its samples (:class:`KpiSample`) to ``out`` (JSON:
    ``{"city": ..., "samples": [...]}``). An existing complete file for the same city and seed
    that covers ``until`` is reused. Blocks until done: call it from a thread or a process of
    its own (the work happens in a child process, so it holds neither the GIL nor libsumo).
    """
    out = Path(out)
    end = city.end if until is None else min(float(until), city.end)
    key = _city_key(city)
    if _reusable(out, key, seed, end):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    job = {
        "args": baseline_args(city, seed=seed, until=end),
        "out": str(out.resolve()),
        "doc": {"format": BASELINE_FORMAT, "city": key, "seed": seed, "until": end},
    }
    done = subprocess.run(
        [sys.executable, "-m", "cityward.demo.kpi", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not _reusable(out, key, seed, end):
        tail = (done.stderr or done.stdout).strip()[-2000:]
        raise RuntimeError(f"the baseline run of {city.sumocfg} failed: {tail}")
    return out


def _baseline_child(job: dict[str, Any]) -> None:
    """In the child process: run the simulation, write the samples."""
    import libsumo

    from cityward.traffic.sumo import sumo_binary

    meter = KpiMeter()
    samples: list[dict[str, Any]] = []
    until = float(job["doc"]["until"])
    started = time.perf_counter()
    libsumo.start([sumo_binary(), *job["args"]])
    try:
        now = float(libsumo.simulation.getTime())
        while now < until:
            libsumo.simulationStep()
            now = float(libsumo.simulation.getTime())
            s = meter.step(libsumo, now)
            if s is not None:
                samples.append(s.to_json())
    finally:
        libsumo.close()
    doc = {
        **job["doc"],
        "complete": True,
        "wall_s": round(time.perf_counter() - started, 2),
        "pid": os.getpid(),  # the process that simulated: never the caller's (run_baseline)
        "samples": samples,
    }
    _atomic_write_text(Path(job["out"]), json.dumps(doc, separators=(",", ":")))


def load_baseline(path: Path) -> list[KpiSample]:
    """The samples of a baseline file written by :func:`run_baseline`, in time order."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return sorted((KpiSample.from_json(s) for s in doc["samples"]), key=lambda s: s.t)


def baseline_at(samples: Sequence[KpiSample], t: float) -> KpiSample | None:
    """The sample at or just before ``t`` (``samples`` in time order); None before the first."""
    k = bisect.bisect_right(samples, t, key=lambda s: s.t)
    return samples[k - 1] if k else None


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="cityward's fixed-time baseline run (internal)")
    parser.add_argument("job", help="the run, as JSON (written by run_baseline)")
    args = parser.parse_args(argv)
    _baseline_child(json.loads(args.job))


if __name__ == "__main__":
    main()
