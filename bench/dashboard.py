"""The operations room's targets, measured in Debian's chromium against a real ``cityward demo``.

    .venv/bin/python bench/dashboard.py [--runs 3] [--alerts 15] [--window-s 20] [--rounds 3]

1. **Start to populated**: ``cityward demo --no-browser`` (speed 1, a fresh data folder, the
   city built from nothing) is started; the clock runs from the process start until a browser
   page, opened as soon as the operator token exists, shows the whole city: 16 signals, every
   road, the 10 environment stations, and the KPI strip filled. Median of ``--runs`` runs.
2. **First load**: a cold browser context (empty cache) opens the dashboard of the running demo
   and waits until the city is drawn: wall time from navigation to populated, and the bytes
   transferred (the Resource Timing ``transferSize`` of the page and every file and API
   response; the open live stream is counted as what arrived by then, not at all here).
3. **Alert latency**: an Alert is written through the API; the page records (MutationObserver,
   ``Date.now()``) when its item enters the panel. Same machine, same clock.
4. **Ten dashboards**: the demo at ``--speed 20``; the ingest rate (entity changes committed
   per second, the server's own figure) over ``--window-s`` windows with 0 and with 10 open
   dashboards, alternated ``--rounds`` times so that the day's traffic curve hits both alike.
   Done twice: with 10 real chromium pages on this machine (they compete with the demo for
   its 2 cores) and with 10 bare SSE readers (the server's own cost of 10 dashboards).

Writes bench/results/dashboard.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, sync_playwright
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CHROMIUM = os.environ.get("CITYWARD_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
POPULATED = (
    "(() => { const s = window.cityward && window.cityward.state; if (!s || !s.mapReady)"
    " return false; const c = s.counts; return c.roads >= 100 && c.signals === 16 &&"
    " c.sensors >= 10 && document.getElementById('kpi-delay').textContent !== '–'; })()"
)
console = Console()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def demo(data: Path, speed: float) -> Iterator[tuple[subprocess.Popen[bytes], str, float]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    cmd = [sys.executable, "-m", "cityward.cli", "demo", "--no-browser", "--speed", f"{speed:g}"]
    cmd += ["--port", str(port), "--data-dir", str(data)]
    log = (data.parent / f"{data.name}.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc, f"http://127.0.0.1:{port}", t0
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def token_of(data: Path, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> str:
    path = data / "operator.token"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited: see {data.parent / (data.name + '.log')}")
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.02)
    raise SystemExit("the demo wrote no operator token")


def open_room(browser: Browser, url: str, token: str, timeout_ms: float = 60_000) -> Page:
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    deadline = time.monotonic() + 30
    while True:  # the server may not answer yet
        try:
            page.goto(f"{url}/#token={token}")
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    page.wait_for_function(POPULATED, timeout=timeout_ms, polling=50)
    return page


def start_to_populated(browser: Browser, tmp: Path, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        data = tmp / f"start{i}"
        with demo(data, 1.0) as (proc, url, t0):
            token = token_of(data, proc)
            page = open_room(browser, url, token)
            out.append(time.perf_counter() - t0)
            page.context.close()
        console.print(f"  start to populated, run {i + 1}: {out[-1]:.2f} s")
    return out


def first_load(browser: Browser, url: str, token: str, runs: int) -> list[dict[str, float]]:
    out = []
    for _ in range(runs):
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        t0 = time.perf_counter()
        page.goto(f"{url}/#token={token}")
        page.wait_for_function(POPULATED, timeout=60_000, polling=50)
        wall = time.perf_counter() - t0
        transferred = page.evaluate(
            "performance.getEntriesByType('navigation').concat("
            "performance.getEntriesByType('resource')).reduce((n, e) => n + e.transferSize, 0)"
        )
        decoded = page.evaluate(
            "performance.getEntriesByType('navigation').concat("
            "performance.getEntriesByType('resource')).reduce((n, e) => n + e.decodedBodySize, 0)"
        )
        out.append({"seconds": wall, "bytes": float(transferred), "decoded_bytes": float(decoded)})
        ctx.close()
    return out


def alert_latency(page: Page, url: str, token: str, n: int) -> list[float]:
    page.evaluate(
        """() => { window.__seen = {}; new MutationObserver(() => {
             for (const li of document.querySelectorAll('#alerts li[data-id]'))
               if (!(li.dataset.id in window.__seen)) window.__seen[li.dataset.id] = Date.now();
           }).observe(document.getElementById('alerts'), {childList: true, subtree: true}); }"""
    )
    out = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        for i in range(n):
            eid = f"urn:ngsi-ld:Alert:bench:{os.getpid()}-{i}"
            doc = {
                "id": eid,
                "type": "Alert",
                "category": {"type": "Property", "value": "traffic"},
                "severity": {"type": "Property", "value": "medium"},
                "description": {"type": "Property", "value": f"bench alert {i}"},
                "alertStatus": {"type": "Property", "value": "open"},
            }
            t_write = time.time() * 1000
            r = client.post("/ngsi-ld/v1/entities", json=doc)
            assert r.status_code == 201, r.text
            page.wait_for_function(f"'{eid}' in window.__seen", timeout=20_000, polling=10)
            out.append((page.evaluate(f"window.__seen['{eid}']") - t_write) / 1000)
            client.post(
                f"/ngsi-ld/v1/entities/{eid}/attrs",
                json={"alertStatus": {"type": "Property", "value": "closed"}},
            )
            time.sleep(0.5)
    return out


class RateReader:
    """One bare SSE reader that keeps the server's ingest-rate figure."""

    def __init__(self, url: str, token: str) -> None:
        self.rates: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, token), daemon=True)
        self.thread.start()

    def _run(self, url: str, token: str) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with (
            httpx.Client(timeout=httpx.Timeout(10, read=60)) as c,
            c.stream("GET", url + "/dashboard/v1/events", headers=headers) as r,
        ):
            event = ""
            for line in r.iter_lines():
                if self.stop.is_set():
                    return
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "stats":
                    self.rates.append((time.monotonic(), json.loads(line[6:])["ingestRate"]))

    def mean_between(self, t0: float, t1: float) -> float:
        # the figure is a 10 s moving window: take those whose window lies inside [t0, t1]
        xs = [v for t, v in self.rates if t0 + 10 <= t <= t1]
        return statistics.fmean(xs) if xs else float("nan")


def ten_dashboards(
    browser: Browser, tmp: Path, window_s: float, rounds: int, kind: str
) -> dict[str, Any]:
    data = tmp / f"ten-{kind}"
    with demo(data, 20.0) as (proc, url, _):
        token = token_of(data, proc)
        open_room(browser, url, token).context.close()  # the city is up
        reader = RateReader(url, token)
        time.sleep(15)  # warm
        base, loaded = [], []
        for _ in range(rounds):
            t0 = time.monotonic()
            time.sleep(window_s)
            base.append(reader.mean_between(t0, time.monotonic()))
            if kind == "browser":
                pages = [open_room(browser, url, token) for _ in range(10)]
                stop = None
            else:
                pages = []
                stop = [RateReader(url, token) for _ in range(10)]
            t0 = time.monotonic()
            time.sleep(window_s)
            loaded.append(reader.mean_between(t0, time.monotonic()))
            for p in pages:
                p.context.close()
            for s in stop or []:
                s.stop.set()
        reader.stop.set()
    b, lo = statistics.median(base), statistics.median(loaded)
    return {
        "base_rates": base,
        "loaded_rates": loaded,
        "base": b,
        "loaded": lo,
        "slowdown_pct": (1 - lo / b) * 100,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--alerts", type=int, default=15)
    ap.add_argument("--window-s", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"no chromium at {CHROMIUM}: apt-get install chromium")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as t, sync_playwright() as p:
        tmp = Path(t)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        console.print("[bold]1. cityward demo to a populated dashboard[/]")
        starts = start_to_populated(browser, tmp, args.runs)
        results["start_to_populated_s"] = starts
        console.print("[bold]2-3. first load and alert latency[/]")
        data = tmp / "load"
        with demo(data, 20.0) as (proc, url, _):
            token = token_of(data, proc)
            open_room(browser, url, token).context.close()
            loads = first_load(browser, url, token, max(args.runs, 5))
            page = open_room(browser, url, token)
            alerts = alert_latency(page, url, token, args.alerts)
            page.context.close()
        results["first_load"] = loads
        results["alert_latency_s"] = alerts
        console.print("[bold]4. ten dashboards[/]")
        results["ten_sse"] = ten_dashboards(browser, tmp, args.window_s, args.rounds, "sse")
        results["ten_browsers"] = ten_dashboards(
            browser, tmp, args.window_s, args.rounds, "browser"
        )
        browser.close()

    med = statistics.median
    table = Table(title="The operations room (chromium headless, software WebGL)")
    table.add_column("figure")
    table.add_column("median", justify="right")
    table.add_column("range", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "cityward demo to populated dashboard",
        f"{med(starts):.2f} s",
        f"{min(starts):.2f}-{max(starts):.2f}",
        "<= 20 s",
    )
    secs = [x["seconds"] for x in loads]
    mb = [x["bytes"] / 1e6 for x in loads]
    table.add_row(
        "first load (cold cache)",
        f"{med(secs):.2f} s",
        f"{min(secs):.2f}-{max(secs):.2f}",
        "<= 2 s",
    )
    table.add_row(
        "first load, transferred", f"{med(mb):.2f} MB", f"{min(mb):.2f}-{max(mb):.2f}", "<= 3 MB"
    )
    table.add_row(
        "alert written to shown",
        f"{med(alerts):.3f} s",
        f"{min(alerts):.3f}-{max(alerts):.3f}",
        "<= 2 s",
    )
    for key, what in (("ten_sse", "10 SSE readers"), ("ten_browsers", "10 chromium pages")):
        r = results[key]
        table.add_row(
            f"ingest slowdown, {what}",
            f"{r['slowdown_pct']:.1f} %",
            f"{r['base']:.0f} -> {r['loaded']:.0f} changes/s",
            "<= 10 %",
        )
    console.print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "dashboard.json"
    out.write_text(json.dumps(results, indent=2))
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
