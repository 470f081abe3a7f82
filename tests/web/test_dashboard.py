"""The operations room in a real browser: Debian's chromium driven by Playwright, against a real
``cityward demo`` process (SUMO city, adaptive control, SQLite bank) at 20x.

Each step saves a screenshot under ``artifacts/dashboard/`` (or ``$CITYWARD_ARTIFACTS``). With
``CITYWARD_UPDATE_DOCS_SCREENSHOT=1`` the logged-in view is also written to docs/dashboard.png.
Timings (an alert's way to the panel, the first load) are measured by bench/dashboard.py; the
tests check behaviour and give generous time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.demo.test_live import start_demo, stop, wait_for
from tests.servers import free_port

playwright_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CITYWARD_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("CITYWARD_ARTIFACTS", ROOT / "artifacts")) / "dashboard"
NGSI = "/ngsi-ld/v1"
# as root in a container, without a GPU, on a closed network (see the env notes): software
# WebGL for MapLibre, and none of chromium's background connections
CHROMIUM_ARGS = [
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
# chromium's own notes about software WebGL are not errors of the page
BENIGN = ("GL Driver Message", "WebGL", "GPU stall")


class Demo:
    def __init__(
        self, url: str, token: str, admin: str, proc: subprocess.Popen[bytes], data: Path
    ) -> None:
        self.data = data
        self.url = url
        self.token = token
        self.admin = admin
        self.proc = proc

    def get(self, path: str, token: str | None = None, **params: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=10)

    def entity(self, eid: str) -> dict[str, Any]:
        r = self.get(f"{NGSI}/entities/{eid}", options="keyValues")
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"no chromium at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium or set CITYWARD_CHROMIUM")
    base = tmp_path_factory.mktemp("dashboard")
    data, log, port = base / "demo", base / "demo.log", free_port()
    proc = start_demo(data, port, log)
    try:
        token_file = data / "operator.token"
        token = wait_for(
            "operator token",
            lambda: token_file.is_file() and token_file.read_text().strip(),
            proc,
            log,
        )
        admin = (data / "governance" / "admin.token").read_text().strip()
        d = Demo(f"http://127.0.0.1:{port}", token, admin, proc, data)
        wait_for(
            "the simulated city in the bank",
            lambda: (
                len(d.get(f"{NGSI}/entities", type="TrafficSignal", limit="100").json()) == 16
                and d.get(f"{NGSI}/entities", type="TrafficFlowObserved", limit="1").json()
            ),
            proc,
            log,
        )
        yield d
    finally:
        assert stop(proc) == 0, log.read_text()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, width: int = 1280, height: int = 800) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, msg: Any) -> None:
        if msg.type == "error" and not any(b in msg.text for b in BENIGN):
            self.errors.append(msg.text)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="module")
def room(demo: Demo, browser: Any) -> Iterator[Page]:
    """One logged-in operator's dashboard, shared by the steps below in order."""
    p = Page(browser)
    try:
        p.page.goto(demo.url + "/")
        p.page.wait_for_selector("#login-form", state="visible")
        p.page.fill("#token", demo.token)
        p.page.click("#login-form button[type=submit]")
        p.page.wait_for_selector("#room", state="visible", timeout=15_000)
        yield p
        assert p.errors == [], p.errors
    finally:
        p.close()


def test_a_visitor_without_a_token_sees_only_the_register(demo: Demo, browser: Any) -> None:
    p = Page(browser)
    try:
        p.page.goto(demo.url + "/")
        p.page.wait_for_selector("#login-form", state="visible")
        assert p.page.is_hidden("#room")
        assert p.page.is_hidden("#kpis")
        frame = p.page.frame_locator("#register-frame")
        # the register lists the city's declared sensors (the demo's stations among them)
        frame.locator("body").wait_for(timeout=10_000)
        text = frame.locator("body").inner_text()
        assert "AirQualityObserved" in text or "air" in text.lower(), text[:500]
        assert p.page.locator("footer a[href='/register']").count() == 1
        # and the API gives a visitor nothing else
        r = httpx.get(demo.url + f"{NGSI}/entities?type=TrafficSignal", timeout=10)
        assert r.status_code == 401
        assert r.json()["field"] == "Authorization"  # RFC 7807 body naming what is missing
        assert httpx.get(demo.url + "/dashboard/v1/events", timeout=10).status_code == 401
        # a token that is not one does not open the room
        p.page.fill("#token", "not-a-token")
        p.page.click("#login-form button[type=submit]")
        p.page.wait_for_function("document.getElementById('login-error').textContent.length > 0")
        assert p.page.is_hidden("#room")
        assert "not valid" in p.page.inner_text("#login-error")
        p.shot("1-public-register")
        # the refused whoami is the only console error (chromium logs a 401 response)
        assert all("401" in e for e in p.errors), p.errors
    finally:
        p.close()


def test_the_map_renders_the_demo_city(room: Page) -> None:
    page = room.page
    page.wait_for_function(
        "(() => { const c = window.cityward.state.counts;"
        " return c.roads >= 100 && c.signals === 16 && c.sensors >= 10; })()",
        timeout=30_000,
    )
    # drawn, not only loaded: MapLibre reports the features it rendered in the viewport
    page.wait_for_function(
        "window.cityward.state.map.loaded() && "
        "window.cityward.state.map.queryRenderedFeatures({layers: ['roads']}).length > 50",
        timeout=15_000,
    )
    rendered = page.evaluate(
        "(() => { const m = window.cityward.state.map; const n = (l) =>"
        " new Set(m.queryRenderedFeatures({layers: [l]}).map(f => f.properties.id)).size;"
        " return {roads: n('roads'), signals: n('signals'), sensors: n('sensors')}; })()"
    )
    assert rendered["signals"] == 16, rendered
    assert rendered["sensors"] >= 10, rendered
    # the KPI strip carries the live figures
    page.wait_for_function("document.getElementById('kpi-delay').textContent !== '–'")
    page.wait_for_function("document.getElementById('kpi-rate').textContent !== '–'")
    room.shot("2-operations-room")


ALERT_ID = "urn:ngsi-ld:Alert:browser-test:1"


def test_an_alert_written_into_the_bank_appears_in_the_panel(demo: Demo, room: Page) -> None:
    alert = {
        "id": ALERT_ID,
        "type": "Alert",
        "category": {"type": "Property", "value": "traffic"},
        "subCategory": {"type": "Property", "value": "carAccident"},
        "severity": {"type": "Property", "value": "high"},
        "description": {"type": "Property", "value": "Collision reported at B2 (browser test)"},
        "alertStatus": {"type": "Property", "value": "open"},
        "alertSource": {"type": "Relationship", "object": "urn:ngsi-ld:TrafficSignal:demo:B2"},
        "dateIssued": {"type": "Property", "value": {"@type": "DateTime", "@value": _now()}},
    }
    room.page.click("#tab-alerts")
    r = httpx.post(
        demo.url + f"{NGSI}/entities",
        json=alert,
        headers={"Authorization": f"Bearer {demo.token}"},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    item = room.page.locator(f'#alerts li[data-id="{ALERT_ID}"]')
    item.wait_for(timeout=10_000)  # live, without a reload (the target of 2 s: bench)
    assert "Collision reported at B2" in item.inner_text()
    # the KPI strip counts what the panel shows (the demo's own alerts come and go meanwhile)
    room.page.wait_for_function(
        "document.querySelectorAll('#alerts li').length"
        " === Number(document.getElementById('kpi-alerts').textContent)"
    )
    path = room.shot("3-alert-arrived")
    if os.environ.get("CITYWARD_UPDATE_DOCS_SCREENSHOT"):
        shutil.copy(path, ROOT / "docs" / "dashboard.png")


def test_acknowledging_an_alert_is_audited(demo: Demo, room: Page) -> None:
    room.page.locator(f'#alerts li[data-id="{ALERT_ID}"] button.ack').click()
    room.page.wait_for_selector("#action-msg.ok")
    wait_for(
        "the acknowledged alert",
        lambda: demo.entity(ALERT_ID).get("alertStatus") == "acknowledged",
        demo.proc,
        Path(os.devnull),
        timeout_s=10,
    )
    assert demo.entity(ALERT_ID)["acknowledgedBy"] == "demo-operator"
    records = demo.get("/cityward/v1/audit", token=demo.admin, entity=ALERT_ID).json()
    patches = [r for r in records if r["path"].endswith("/attrs") and r["action"] == "write"]
    assert len(patches) == 1, records  # the acknowledgement: who, when, which alert
    assert patches[0]["actor"] == "demo-operator" and patches[0]["role"] == "operator"
    assert ALERT_ID in patches[0]["entity_ids"]
    # a comment is one more audited write, and closing takes it off the panel
    item = room.page.locator(f'#alerts li[data-id="{ALERT_ID}"]')
    item.locator("input[aria-label=Comment]").fill("police on site")
    # the alert changes while the comment is being typed: the list is rebuilt, the draft stays
    r = httpx.patch(
        f"{demo.url}{NGSI}/entities/{ALERT_ID}/attrs/description",
        json={"type": "Property", "value": "two cars, lane 2 blocked"},
        headers={"Authorization": f"Bearer {demo.admin}"},
        timeout=10,
    )
    assert r.status_code == 204, r.text
    item.locator("p", has_text="lane 2 blocked").wait_for(timeout=10_000)
    assert item.locator("input[aria-label=Comment]").input_value() == "police on site"
    item.locator(".comment-form button").click()
    room.page.wait_for_function(
        "document.getElementById('action-msg').textContent.startsWith('Comment saved')"
    )
    item.locator("button.close").click()
    item.wait_for(state="detached", timeout=10_000)
    final = demo.entity(ALERT_ID)
    assert final["alertStatus"] == "closed" and final["comment"] == "police on site"
    records = demo.get("/cityward/v1/audit", token=demo.admin, entity=ALERT_ID).json()
    assert len([r for r in records if r["path"].endswith("/attrs")]) == 3  # ack, comment, close
    room.shot("4-alert-acknowledged-and-closed")


def test_an_override_changes_the_signal_in_the_running_simulation(demo: Demo, room: Page) -> None:
    page = room.page
    page.click("#tab-signals")
    sid = "urn:ngsi-ld:TrafficSignal:demo:B1"
    signal = demo.entity(sid)
    phases = signal["greenPhases"]
    # ask for the green phase the signal is not showing now, so the change is the override's
    target = next((p for p in phases if p != signal.get("currentPhase")), phases[-1])
    row = page.locator(f'#signals tr[data-id="{sid}"]')
    asked_at = _now()
    row.locator("select").select_option(str(target))
    row.locator("input.dur").fill("600")
    row.locator(".override button[type=submit]").click()
    page.wait_for_selector("#signals-msg.ok")

    def applied() -> bool:
        e = demo.entity(sid)
        ov = e.get("activeOverride") or {}
        return (
            str(e.get("overrideStatus", "")).startswith("applied")
            and ov.get("active") is True
            and ov.get("phase") == target
            and e.get("currentPhase") == target
            and not e.get("inTransition")
        )

    wait_for("the simulation to apply the override", applied, demo.proc, Path(os.devnull), 60)
    # who asked is in the audit trail (an operator's feed token may not read it back)
    records = demo.get(
        "/cityward/v1/audit", token=demo.admin, entity=sid, since=asked_at, limit="1000"
    ).json()
    assert any(r["method"] == "POST" and r["path"].endswith("/attrs") for r in records), records
    # the page shows it too: the override badge in the table, a ringed signal on the map
    row.locator(".badge.on").wait_for(timeout=10_000)
    page.wait_for_function(
        "window.cityward.state.map.queryRenderedFeatures({layers: ['signals']})"
        f".some(f => f.properties.id === '{sid}' && f.properties.override)",
        timeout=10_000,
    )
    room.shot("5-signal-override")
    row.locator("button.clear").click()
    wait_for(
        "the override to clear",
        lambda: not (demo.entity(sid).get("activeOverride") or {}).get("active"),
        demo.proc,
        Path(os.devnull),
        60,
    )


def test_entity_panel_charts_the_history(room: Page) -> None:
    page = room.page
    page.click("#tab-signals")
    page.locator('#signals tr[data-id="urn:ngsi-ld:TrafficSignal:demo:C2"] th button').click()
    page.wait_for_selector("#panel-entity", state="visible")
    page.wait_for_function("window.cityward.state.chart !== null", timeout=15_000)
    points = page.evaluate(
        "window.cityward.state.chart.data.datasets.reduce((n, d) => n + d.data.length, 0)"
    )
    assert points > 0
    assert "TrafficSignal C2" in page.inner_text("#entity-title")
    room.shot("6-entity-chart")


def test_keyboard_and_a_4k_wall(demo: Demo, browser: Any, room: Page) -> None:
    page = room.page
    # the panels' tabs are a keyboard tablist
    page.focus("#tab-alerts")
    page.click("#tab-alerts")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.id") == "tab-signals"
    assert page.is_visible("#panel-signals")
    page.keyboard.press("Tab")  # into the signals panel: a real control, not a div
    tag = page.evaluate("document.activeElement.tagName")
    assert tag in ("BUTTON", "SELECT", "INPUT", "A"), tag
    # a 4K wall: the same page, larger type, nothing cut off
    wall = Page(browser, 3840, 2160)
    try:
        wall.page.goto(demo.url + "/#token=" + demo.token)
        wall.page.wait_for_function("window.cityward.state.counts.signals === 16", timeout=30_000)
        assert wall.page.evaluate("location.hash") == ""  # the token left the address bar
        box = wall.page.locator("#map").bounding_box()
        assert box is not None and box["width"] > 2000 and box["height"] > 1500, box
        size = wall.page.evaluate("getComputedStyle(document.documentElement).fontSize")
        assert float(size.rstrip("px")) > 20
        wall.shot("7-4k-wall")
        assert wall.errors == [], wall.errors
    finally:
        wall.close()


def test_an_analyst_sees_the_city_but_cannot_act(demo: Demo, browser: Any) -> None:
    from cityward.config import Settings
    from cityward.governance.identity import Identities
    from cityward.governance.policy import Role

    ids = Identities(Settings(data_dir=demo.data).governance, demo.data, None)
    token = ids.issue(Role.ANALYST, ["traffic-management"], subject="analyst-dash")
    p = Page(browser)
    try:
        p.page.goto(f"{demo.url}/#token={token}")
        p.page.wait_for_function("window.cityward.state.counts.signals === 16", timeout=30_000)
        assert "analyst" in p.page.inner_text("#who-name")
        p.page.click("#tab-signals")
        p.page.wait_for_selector("#signals tr")
        # no override controls, no alert actions: reading only
        assert p.page.locator("#signals form.override").count() == 0
        assert p.page.locator("#alerts .actions").count() == 0
        # and the traffic-management purpose does not reach the environment stations
        assert p.page.evaluate("window.cityward.state.counts.sensors") == 0
        p.shot("8-analyst")
        assert p.errors == [], p.errors
    finally:
        p.close()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
