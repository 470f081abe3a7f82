"""``cityward demo`` end to end: a real process, the real SUMO city, the real data bank.

The demo runs accelerated; the test reads the bank over the NGSI-LD API with the operator token
the demo wrote, stops the demo with Ctrl-C (SIGINT) and starts it again on the same data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port

NGSI = "/ngsi-ld/v1"


def start_demo(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    cmd = [sys.executable, "-m", "cityward.cli", "demo", "--no-browser", "--speed", "20"]
    cmd += ["--port", str(port), "--data-dir", str(data)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def wait_for(
    what: str,
    check: Callable[[], Any],
    proc: subprocess.Popen[bytes],
    log: Path,
    timeout_s: float = 90.0,
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the demo exited while waiting for {what}:\n{log.read_text()}"
        try:
            got = check()
        except (httpx.TransportError, OSError):
            got = None
        if got:
            return got
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s:\n{log.read_text()}"
        time.sleep(0.25)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_demo_runs_a_living_city_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    log = tmp_path / "demo.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_demo(data, port, log)
    try:
        token = wait_for(
            "operator token",
            lambda: (
                (data / "operator.token").is_file()
                and (data / "operator.token").read_text().strip()
            ),
            proc,
            log,
        )
        headers = {"Authorization": f"Bearer {token}"}

        def entities(type_: str) -> list[dict[str, Any]]:
            r = httpx.get(
                url + NGSI + "/entities",
                params={"type": type_, "limit": 1000, "options": "keyValues"},
                headers=headers,
                timeout=10,
            )
            assert r.status_code == 200, r.text
            out: list[dict[str, Any]] = r.json()
            return out

        signals = wait_for("16 signals", lambda: len(entities("TrafficSignal")) == 16, proc, log)
        assert signals
        flows = wait_for(
            "lane flows of the simulation",
            lambda: [f for f in entities("TrafficFlowObserved") if ":demo:" in f["id"]],
            proc,
            log,
        )
        # georeferenced around the demo's centre (Ghent)
        lon, lat = flows[0]["location"]["coordinates"][0]
        assert abs(lon - 3.7215) < 0.02 and abs(lat - 51.0543) < 0.02
        run = wait_for("an ambulance run", lambda: entities("EmergencyVehicleRun"), proc, log)
        assert run[0]["id"].startswith("urn:ngsi-ld:EmergencyVehicleRun:")
        kpi = wait_for(
            "delay against the fixed-time baseline",
            lambda: [
                k
                for k in entities("KeyPerformanceIndicator")
                if "averageDelay" in k and "baselineAverageDelay" in k
            ],
            proc,
            log,
        )[0]
        assert kpi["averageDelay"] >= 0 and kpi["baselineAverageDelay"] >= 0
        assert kpi["co2"] > 0 and kpi["controller"] == "adaptive"
        # the environment stations report on the simulated clock, once a simulated minute
        aq = url + NGSI + "/entities/urn:ngsi-ld:AirQualityObserved:demo-000"

        def observed() -> datetime:
            r = httpx.get(aq, headers=headers, timeout=10)
            assert r.status_code == 200, r.text
            return datetime.fromisoformat(r.json()["no2"]["observedAt"].replace("Z", "+00:00"))

        first = observed()
        wait_for(
            "a second reading of an air-quality station",
            lambda: (observed() - first).total_seconds() >= 59,
            proc,
            log,
        )
        # the stations' past hours were written first, so the anomaly service's detectors are
        # past their warm-up and the injected incidents raise alerts (the first comes from the
        # history, a few seconds after the start)
        alerts = wait_for(
            "an anomaly alert on an environment station",
            lambda: [
                a
                for a in entities("Alert")
                if str(a.get("alertSource", "")).startswith(
                    ("urn:ngsi-ld:AirQualityObserved:demo-", "urn:ngsi-ld:NoiseLevelObserved:demo-")
                )
            ],
            proc,
            log,
            timeout_s=120,
        )
        assert alerts[0]["dataProvider"] == "cityward-anomaly"
        # without a token: the register, nothing else
        assert httpx.get(url + "/register", timeout=10).status_code == 200
        anon = httpx.get(url + NGSI + "/entities", params={"type": "TrafficSignal"}, timeout=10)
        assert anon.status_code == 401
        assert anon.headers["content-type"].startswith("application/")
        assert anon.json()["field"] == "Authorization"
    finally:
        running = len(log.read_text())
        rc = stop(proc)
    assert rc == 0, log.read_text()
    # Ctrl-C stops the simulation while the bank still listens: its last updates are written,
    # not retried against a server that has gone (before: 37,000 such lines in 15 s)
    stopping = log.read_text()[running:]
    assert "data bank unreachable" not in stopping, stopping[-5000:]

    # again, on the same data: the city is reused, nothing is created twice
    before = log.read_text()
    proc = start_demo(data, port, log)
    try:
        wait_for(
            "the restarted demo",
            lambda: httpx.get(url + "/healthz", timeout=2).status_code == 200,
            proc,
            log,
        )
    finally:
        rc = stop(proc)
    assert rc == 0, log.read_text()
    again = log.read_text()[len(before) :]
    assert "cityward demo: 0 new entities" in again, again
