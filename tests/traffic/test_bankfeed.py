"""The simulation's connection to a real data bank: live entities out, operator overrides in.

A real ``cityward serve`` (SQLite, governance on) and a real SUMO grid; the operator's override
goes through the ordinary, audited NGSI-LD API.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from typer.testing import CliRunner

from cityward.cli import app
from cityward.config import Settings
from cityward.governance.identity import Identities
from cityward.governance.policy import Role
from cityward.traffic.backend import GREEN, Intersection, Phase
from cityward.traffic.bankfeed import (
    NO_OVERRIDE,
    PAGE,
    BankError,
    BankFeed,
    CoalescingQueue,
    OverrideError,
    OverrideSpec,
    _limit_refused,
    _smaller_page,
    parse_override,
)
from cityward.traffic.safety import SafetyGuard, SafetyRules
from cityward.traffic.sumo import SumoBackend, control_loop, scenario_args
from tests.conftest import shared_path
from tests.servers import cityward_serve, free_port

NGSI = "/ngsi-ld/v1"
ERRORS = "https://uri.etsi.org/ngsi-ld/errors/"
OPERATOR = "operator-anna"
RULES = SafetyRules(min_green=5)
END = 240.0
OVERRIDE_AT = 60
OVERRIDE_S = 60


@dataclass
class Bank:
    url: str
    tokens: dict[str, str]  # admin, operator, feed (an operator), auditor

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def get(self, who: str, path: str, **params: Any) -> Any:
        r = httpx.get(self.url + path, params=params, headers=self.headers(who), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()


@contextmanager
def serve_bank(data: Path, settings: Mapping[str, str] | None = None) -> Iterator[Bank]:
    """``cityward serve`` on SQLite with authentication on, and a token per role."""
    with cityward_serve(data, free_port(), data.parent / "server.log", settings) as url:
        ids = Identities(Settings(data_dir=data).governance, data, None)
        tokens = {
            "admin": (data / "governance" / "admin.token").read_text().strip(),
            "operator": ids.issue(Role.OPERATOR, ["traffic-management"], subject=OPERATOR),
            "feed": ids.issue(Role.OPERATOR, ["traffic-management"], subject="traffic-sim"),
            "auditor": ids.issue(Role.AUDITOR, [], subject="dpo"),
        }
        yield Bank(url, tokens)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bank]:
    with serve_bank(tmp_path_factory.mktemp("bank") / "data") as b:
        yield b


def add_emergency_vehicle(t: Any) -> None:
    """An ambulance on the route of a vehicle already driving (SUMO's own vClass)."""
    donor = next(iter(t.vehicle.getIDList()))
    t.route.add("ev-route", t.vehicle.getRoute(donor))
    t.vehicletype.copy("DEFAULT_VEHTYPE", "ev-type")
    t.vehicletype.setVehicleClass("ev-type", "emergency")
    t.vehicle.add("ev-1", "ev-route", typeID="ev-type", depart="now")


def green_runs(states: list[str], link: int) -> list[tuple[int, int]]:
    """(first step, length) of each green run of one link."""
    out: list[tuple[int, int]] = []
    for n, s in enumerate(states):
        if s[link] in GREEN:
            if out and out[-1][0] + out[-1][1] == n:
                out[-1] = (out[-1][0], out[-1][1] + 1)
            else:
                out.append((n, 1))
    return out


def patch_override(bank: Bank, eid: str, value: object) -> None:
    r = httpx.patch(
        f"{bank.url}{NGSI}/entities/{quote(eid, safe=':')}/attrs",
        json={"override": {"type": "Property", "value": value}},
        headers=bank.headers("operator"),
        timeout=30,
    )
    assert r.status_code == 204, r.text


def grid_feed(
    grid_cfg: Path, seed: int, end: float, url: str, token: str, scenario: str
) -> tuple[SumoBackend, BankFeed]:
    """The grid under max-pressure with a feed that polls overrides every 0.2 s."""
    backend = SumoBackend([*scenario_args(grid_cfg, seed=seed), "--end", str(end)])
    feed = BankFeed(
        backend,
        url,
        token,
        scenario=scenario,
        controller="max-pressure",
        poll_interval_s=0.2,
    )
    return backend, feed


def test_feed_writes_the_simulation_and_applies_an_operators_override(
    bank: Bank, grid_cfg: Path
) -> None:
    # the feed reads the audit trail to name who set an override: the admin token can; the
    # API root is accepted as the bank's URL too
    backend, feed = grid_feed(grid_cfg, 3, END, bank.url + NGSI, bank.tokens["admin"], "grid")
    xs = {x.id: x for x in backend.intersections()}
    forced_tls, bad_tls = "B1", "A0"
    bad_phase = next(p.index for p in xs[bad_tls].phases if not p.is_green)
    seen: dict[str, Any] = {"applied_at": None, "bad_ever": False, "forced": None}

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        feed.on_step(now, guards)
        if int(now) == 5:
            add_emergency_vehicle(backend.t)
        if int(now) == OVERRIDE_AT:
            current = guards[forced_tls].current.index
            want = next(g.index for g in xs[forced_tls].greens if g.index != current)
            seen["forced"] = want
            patch_override(bank, feed.signal_id(forced_tls), {"phase": want, "durationS": 60})
            patch_override(bank, feed.signal_id(bad_tls), {"phase": bad_phase, "durationS": 30})
            polls, deadline = feed.stats.polls, time.monotonic() + 30
            while feed.stats.polls < polls + 2:  # a whole poll after both PATCHes
                assert time.monotonic() < deadline, "the feed did not poll the bank"
                time.sleep(0.02)
        if forced_tls in feed.overrides and seen["applied_at"] is None:
            seen["applied_at"] = int(now)
        seen["bad_ever"] |= bad_tls in feed.overrides

    try:
        feed.start()
        run = control_loop(
            backend,
            "max-pressure",
            END,
            rules=RULES,
            on_step=on_step,
            record_states=True,
            overrides=feed.overrides,
        )
    finally:
        backend.close()
        stats = feed.close()
    assert stats.rejected == 0 and stats.dropped == 0, stats
    assert stats.written == stats.queued - stats.coalesced
    assert (stats.overrides_applied, stats.overrides_rejected) == (1, 1)

    # the forced phase: green within min green + clearance, then held until the override ends
    x, want, applied = xs[forced_tls], seen["forced"], seen["applied_at"]
    assert applied is not None and applied <= OVERRIDE_AT + 1
    forced = sorted(x.phases[want].green_links())
    states = [s[forced_tls] for s in run.states]
    all_green = [all(s[i] in GREEN for i in forced) for s in states]
    first = next(n for n in range(applied, len(states)) if all_green[n])
    clearance = RULES.min_green + x.yellow_time + x.all_red_time
    assert first - applied <= clearance + 1
    held = next((n for n in range(first, len(states)) if not all_green[n]), len(states))
    assert held - first >= applied + OVERRIDE_S - first - 1
    for link in range(len(x.links)):  # and no green was cut short of the minimum green
        for start, length in green_runs(states, link)[1:-1]:
            assert length >= RULES.min_green, (link, start, length)

    # one TrafficSignal per intersection, with a valid state
    signals = bank.get(
        "operator", NGSI + "/entities", type="TrafficSignal", idPattern="^urn:ngsi-ld:Traff.*:grid:"
    )
    assert sorted(e["name"]["value"] for e in signals) == sorted(xs)
    for e in signals:
        sx: Intersection = xs[e["name"]["value"]]
        assert re.fullmatch(r"[rRyYgGsuoO]+", e["signalState"]["value"])
        assert len(e["signalState"]["value"]) == len(sx.links)
        assert e["currentPhase"]["value"] in e["greenPhases"]["value"]
        assert e["greenPhases"]["value"] == [g.index for g in sx.greens]
        assert e["controller"]["value"] == "max-pressure"
        assert e["signalState"]["observedAt"].endswith("Z")
    by_name = {e["name"]["value"]: e for e in signals}
    status = by_name[forced_tls]["overrideStatus"]["value"]
    assert status.startswith("ended at "), status  # 60 s of 240: over by the end
    greens = ", ".join(str(g.index) for g in xs[bad_tls].greens)
    assert by_name[bad_tls]["overrideStatus"]["value"] == (
        f"rejected: phase {bad_phase} is not a green phase of {bad_tls}; green phases: {greens}"
    )
    assert not seen["bad_ever"]
    assert by_name[bad_tls]["activeOverride"]["value"] == NO_OVERRIDE

    # the override's history: applied, by whom, then ended
    history = bank.get(
        "operator", f"{NGSI}/temporal/entities/{feed.signal_id(forced_tls)}", lastN="50"
    )
    statuses = [i["value"] for i in history["overrideStatus"]]
    assert any(s.startswith("applied until ") for s in statuses), statuses
    active = [i["value"] for i in history["activeOverride"] if i["value"].get("active")]
    assert active and active[0]["phase"] == want and active[0]["by"] == OPERATOR

    # the operator's PATCH is in the audit trail, with the operator's identity
    records = bank.get(
        "auditor", "/cityward/v1/audit", entity=feed.signal_id(forced_tls), action="write"
    )
    patches = [r for r in records if r["method"] == "PATCH"]
    assert len(patches) == 1, records
    assert patches[0]["actor"] == OPERATOR and patches[0]["role"] == "operator"
    assert patches[0]["result"] == 204 and patches[0]["path"].endswith("/attrs")

    # lane flows: plausible values, and their history
    flows = bank.get("operator", NGSI + "/entities", type="TrafficFlowObserved", limit="1000")
    lanes = {lane for x in xs.values() for lane in x.in_lanes}
    assert sorted(f["name"]["value"] for f in flows) == sorted(lanes)
    assert sum(f["intensity"]["value"] for f in flows) > 0
    for f in flows:
        assert 0.0 <= f["occupancy"]["value"] <= 1.0
        assert f["laneId"]["value"] >= 1
        assert 0.0 <= f.get("averageVehicleSpeed", {}).get("value", 0.0) < 200.0
        assert f["dateObservedFrom"]["value"]["@value"] < f["dateObservedTo"]["value"]["@value"]
        assert f["refRoadSegment"]["object"].startswith("urn:ngsi-ld:RoadSegment:grid:")
    busiest = max(flows, key=lambda f: f["intensity"]["value"])
    history = bank.get("operator", f"{NGSI}/temporal/entities/{quote(busiest['id'], safe=':')}")
    assert len(history["intensity"]) == END // 60  # 60 s periods
    assert sum(i["value"] for i in history["intensity"]) > 0

    # the emergency run: a position while under way, its travel time on arrival, nothing more
    runs = bank.get("operator", NGSI + "/entities", type="EmergencyVehicleRun")
    runs = [r for r in runs if ":grid:" in r["id"]]  # this run's scenario only
    assert len(runs) == 1
    ev = runs[0]
    assert ev["runStatus"]["value"] == "arrived" and ev["travelTime"]["value"] > 0
    assert ev["vehicleRef"]["value"] == "ev-1"
    assert ev["validFrom"]["value"]["@value"] < ev["validTo"]["value"]["@value"]
    assert set(ev) - {"id", "type"} == {
        "description",
        "dataProvider",
        "vehicleRef",
        "dateIssued",
        "validFrom",
        "validTo",
        "runStatus",
        "currentLane",
        "speed",
        "remainingRoute",
        "travelTime",
    }
    trail = bank.get("operator", f"{NGSI}/temporal/entities/{ev['id']}", attrs="currentLane")
    assert len(trail["currentLane"]) > 1


def test_an_operator_token_is_enough_and_a_bad_one_is_refused_clearly(
    bank: Bank, grid_cfg: Path
) -> None:
    backend = SumoBackend([*scenario_args(grid_cfg, seed=4), "--end", "30"])
    try:
        with pytest.raises(BankError, match="refused the token"):
            BankFeed(backend, bank.url, "not-a-token", scenario="g2", controller="x").start()
        with pytest.raises(BankError, match="cannot reach the data bank"):
            BankFeed(
                backend, f"http://127.0.0.1:{free_port()}", "t", scenario="g2", controller="x"
            ).start()
        with pytest.raises(BankError, match="lacks data:read, data:write"):
            BankFeed(
                backend, bank.url, bank.tokens["auditor"], scenario="g2", controller="x"
            ).start()
        with BankFeed(
            backend, bank.url, bank.tokens["feed"], scenario="g2", controller="fixed-time"
        ) as feed:
            assert feed.subject == "traffic-sim" and not feed.can_read_audit
            control_loop(backend, "fixed-time", 30, on_step=feed.on_step, overrides=feed.overrides)
    finally:
        backend.close()
    assert feed.stats.written > 0 and feed.stats.rejected == 0


def test_cli_runs_a_scenario_into_the_bank(bank: Bank, grid_cfg: Path) -> None:
    args = ["traffic", "run", "--sumocfg", str(grid_cfg), "--end", "30", "--seed", "2"]
    result = CliRunner().invoke(
        app, [*args, "--bank", bank.url], env={"CITYWARD_TOKEN": bank.tokens["feed"]}
    )
    assert result.exit_code == 0, result.output
    assert "entity updates written" in result.output
    assert re.search(r"rejected by the bank\s*│\s*0\s", result.output), result.output
    result = CliRunner().invoke(app, [*args, "--bank", bank.url, "--token", "nope"])
    assert result.exit_code == 1
    assert "refused the token" in result.output and "Traceback" not in result.output


def test_sigterm_stops_a_run_as_ctrl_c_does(bank: Bank, grid_cfg: Path) -> None:
    """SIGTERM (systemd, docker stop) killed ``traffic run`` at once: SUMO not closed, what
    the feed held never written, no summary. It now stops the run as Ctrl-C does."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "CITYWARD_TOKEN": bank.tokens["feed"], "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "cityward.cli", "traffic", "run", "--sumocfg", str(grid_cfg)]
    args = ["--end", "3600", "--speed", "1", "--bank", bank.url]
    proc = subprocess.Popen(
        [*cmd, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    seen = ""
    for line in proc.stdout:  # runs in real time (speed 1): stopped once it writes
        seen += line
        if "writing to" in line:
            break
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    out = seen + out
    assert proc.returncode == 130, out
    assert "(interrupted)" in out and "entity updates written" in out, out
    assert "Traceback" not in out


def test_a_scenario_name_outside_the_id_alphabet_is_cleaned_alike_by_both_options(
    bank: Bank, grid_cfg: Path, tmp_path: Path
) -> None:
    """``--sumocfg köln.sumocfg`` wrote ids with ``k-ln``; ``--scenario köln`` was refused by
    the feed's name check. Both now clean the name the same way."""
    folder = tmp_path / "scenarios" / "köln"
    folder.mkdir(parents=True)
    for f in grid_cfg.parent.iterdir():
        if f.is_file():
            (folder / ("köln.sumocfg" if f == grid_cfg else f.name)).write_bytes(f.read_bytes())
    env = {"CITYWARD_TOKEN": bank.tokens["feed"]}
    base = ["traffic", "run", "--end", "20", "--bank", bank.url]
    for how in (
        ["--scenario", "köln", "--scenarios", str(tmp_path / "scenarios")],
        ["--sumocfg", str(folder / "köln.sumocfg")],
    ):
        result = CliRunner().invoke(app, [*base, *how], env=env)
        assert result.exit_code == 0, result.output
        assert "urn:ngsi-ld:TrafficSignal:k-ln:<signal>" in result.output, result.output


def test_full_queue_coalesces_and_never_blocks() -> None:
    q = CoalescingQueue(maxsize=4)
    for n in range(1000):  # nobody takes: put must return every time
        q.put(f"e{n % 3}", {"id": f"e{n % 3}", "a": n, **({"first": True} if n < 3 else {})})
    items: list[tuple[str, dict[str, Any]]] = []
    while batch := q.take(10, timeout=0):
        assert len({eid for eid, _ in batch}) == len(batch)  # no entity twice in a batch
        items += batch
    assert len(items) <= 4
    merged: dict[str, dict[str, Any]] = {}
    for eid, frag in items:  # what the bank ends up with, applying them in order
        merged[eid] = {**merged.get(eid, {}), **frag}
    assert {k: v["a"] for k, v in merged.items()} == {"e0": 999, "e1": 997, "e2": 998}
    assert all(v["first"] for v in merged.values())  # older attributes merged, not lost
    assert q.coalesced == 1000 - len(items) and q.dropped == 0
    for n in range(6):  # more distinct entities than room: the oldest go
        q.put(f"x{n}", {"id": f"x{n}"})
    assert [eid for eid, _ in q.take(10, timeout=0)] == ["x2", "x3", "x4", "x5"]
    assert q.dropped == 2


def test_a_batch_never_holds_one_entity_twice() -> None:
    # the bank keeps one state per entity of a batch upsert: two updates of one entity in one
    # batch would reach its history as one instance
    q = CoalescingQueue(maxsize=100)
    for n in range(5):
        q.put("ev", {"id": "ev", "currentLane": f"lane{n}"})
        q.put(f"s{n}", {"id": f"s{n}"})
    batches = []
    while batch := q.take(50, timeout=0):
        batches.append([(eid, frag.get("currentLane")) for eid, frag in batch])
    assert [b[0] for b in batches] == [("ev", f"lane{n}") for n in range(5)]
    assert all(len({eid for eid, _ in b}) == len(b) for b in batches)
    assert sum(len(b) for b in batches) == 10  # nothing lost, order kept


X = Intersection(
    "J1",
    (
        Phase(0, "GGrr", 30, 30, 30),
        Phase(1, "yyrr", 3, 3, 3),
        Phase(2, "rrGG", 30, 30, 30),
        Phase(3, "rryy", 3, 3, 3),
    ),
    (("a_0", "b_0"), ("a_1", "c_0"), ("d_0", "e_0"), ("d_1", "f_0")),
)
CONTROLLERS = ("fixed-time", "max-pressure")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"phase": 2, "durationS": 120}, OverrideSpec(120.0, phase=2)),
        (
            {"controller": "fixed-time", "durationS": 600},
            OverrideSpec(600.0, controller="fixed-time"),
        ),
        ({"phase": 0, "durationS": 3600}, OverrideSpec(3600.0, phase=0)),
        (None, None),
        ({}, None),
        ({"clear": True}, None),
        (NO_OVERRIDE, None),
        ("none", None),
    ],
)
def test_valid_overrides(value: object, expected: OverrideSpec | None) -> None:
    assert parse_override(value, X, CONTROLLERS) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"phase": 7, "durationS": 60}, "phase 7 is not a green phase of J1; green phases: 0, 2"),
        ({"phase": 1, "durationS": 60}, "phase 1 is not a green phase of J1; green phases: 0, 2"),
        ({"phase": "2", "durationS": 60}, "phase must be an integer; green phases of J1: 0, 2"),
        ({"phase": 2}, "durationS is required: seconds, more than 0 and at most 3600"),
        ({"phase": 2, "durationS": 0}, "durationS 0 must be more than 0 and at most 3600"),
        ({"phase": 2, "durationS": 3601}, "durationS 3601 must be more than 0 and at most 3600"),
        ({"phase": 2, "durationS": True}, "durationS is required: seconds, more than 0"),
        (
            {"controller": "magic", "durationS": 60},
            "controller 'magic' is not registered; registered: fixed-time, max-pressure",
        ),
        ({"phase": 0, "controller": "fixed-time", "durationS": 5}, "give either phase or"),
        ({"durationS": 5}, "give either phase or controller (one of them)"),
        ({"phase": 0, "durationS": 5, "by": "me"}, "unknown key(s) by; expected phase"),
        ({"clear": False}, 'to clear an override, write {"clear": true} alone'),
        (2, "the override must be a JSON object such as"),
    ],
)
def test_invalid_overrides_say_why(value: object, message: str) -> None:
    with pytest.raises(OverrideError) as err:
        parse_override(value, X, CONTROLLERS)
    assert str(err.value).startswith(message)


def test_georeferenced_network_gives_wgs84_locations() -> None:
    from cityward.traffic.bankfeed import _Geo

    cfg = shared_path("data", "traffic", "resco", "cologne1", "cologne1.sumocfg")
    backend = SumoBackend([*scenario_args(cfg, seed=1), "--begin", "25200", "--end", "25201"])
    try:
        geo = _Geo(backend.t)
        assert geo.enabled
        x = backend.intersections()[0]
        loc = geo.signal(x)
        assert loc is not None and loc["type"] == "Point"
        lon, lat = loc["coordinates"]
        assert 6.8 < lon < 7.1 and 50.8 < lat < 51.1  # Cologne
        line = geo.lane(x.in_lanes[0])
        assert line is not None and line["type"] == "LineString"
    finally:
        backend.close()


def test_each_run_of_an_emergency_vehicle_is_its_own_entity_and_ends_with_the_simulation(
    bank: Bank, grid_cfg: Path
) -> None:
    """Two days' simulations of one scenario, each ending before its ambulance arrives. The
    id held only the simulated start second: the second day's run took over the first's
    entity (and kept its end), and a run cut off by the end stayed en route for ever."""
    days = [datetime(2026, 3, 1, 8, tzinfo=UTC), datetime(2026, 3, 2, 8, tzinfo=UTC)]
    for day in days:
        backend = SumoBackend([*scenario_args(grid_cfg, seed=3), "--end", "30"])
        feed = BankFeed(
            backend,
            bank.url,
            bank.tokens["admin"],
            scenario="grid-days",
            controller="max-pressure",
            start_instant=day,
        )

        def on_step(
            now: float,
            guards: dict[str, SafetyGuard],
            feed: BankFeed = feed,
            backend: SumoBackend = backend,
        ) -> None:
            feed.on_step(now, guards)
            if int(now) == 5:
                add_emergency_vehicle(backend.t)

        try:
            feed.start()
            control_loop(backend, "max-pressure", 30.0, rules=RULES, on_step=on_step)
        finally:
            backend.close()
            feed.close()
    runs = bank.get("operator", NGSI + "/entities", type="EmergencyVehicleRun", limit="100")
    runs = sorted((r for r in runs if ":grid-days:" in r["id"]), key=lambda r: r["id"])
    assert len(runs) == 2, [r["id"] for r in runs]
    for run, day in zip(runs, days, strict=True):
        start = run["validFrom"]["value"]["@value"]
        assert start.startswith(day.strftime("%Y-%m-%d")), run
        assert run["runStatus"]["value"] == "interrupted"
        assert start < run["validTo"]["value"]["@value"]
        assert "travelTime" not in run


def wait_polls(feed: BankFeed, n: int = 2) -> None:
    """Until the feed has polled the bank ``n`` times more (a whole poll after a PATCH)."""
    polls, deadline = feed.stats.polls, time.monotonic() + 30
    while feed.stats.polls < polls + n:
        assert time.monotonic() < deadline, "the feed did not poll the bank"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def small_page_bank(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bank]:
    """A bank whose pages hold at most 5 entities (the 3x3 grid has 9 signals)."""
    data = tmp_path_factory.mktemp("small-page-bank") / "data"
    with serve_bank(data, {"max_limit": "5", "default_limit": "2"}) as b:
        yield b


def test_overrides_are_read_on_every_page_of_a_bank_with_a_small_max_limit(
    small_page_bank: Bank, grid_cfg: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The feed polled with limit=1000: a bank whose max_limit is lower refused every poll
    (403 TooManyResults), the feed logged it and went on, and no override was ever applied. It
    now asks for the maximum the refusal names and follows the pages."""
    bank = small_page_bank
    # the admin token reads the audit trail: the override's author is named
    backend, feed = grid_feed(grid_cfg, 5, 40, bank.url, bank.tokens["admin"], "grid-pages")
    xs = {x.id: x for x in backend.intersections() if x.greens}
    assert len(xs) > 5  # more signals than one page
    wanted: dict[str, int] = {}

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        feed.on_step(now, guards)
        if int(now) == 10:
            for tls, x in xs.items():
                current = guards[tls].current.index
                wanted[tls] = next(g.index for g in x.greens if g.index != current)
                patch_override(bank, feed.signal_id(tls), {"phase": wanted[tls], "durationS": 15})
            wait_polls(feed)

    caplog.set_level(logging.WARNING, logger="cityward.traffic.bankfeed")
    try:
        feed.start()
        control_loop(
            backend,
            "max-pressure",
            40.0,
            rules=RULES,
            on_step=on_step,
            overrides=feed.overrides,
        )
    finally:
        backend.close()
        stats = feed.close()
    assert not [r.getMessage() for r in caplog.records if "override poll" in r.getMessage()]
    assert (stats.overrides_applied, stats.overrides_rejected) == (len(xs), 0), stats
    assert stats.overrides_ended == len(xs) and stats.rejected == 0 and stats.dropped == 0
    for tls in xs:
        eid = quote(feed.signal_id(tls), safe=":")
        history = bank.get("operator", f"{NGSI}/temporal/entities/{eid}", lastN="50")
        statuses = [i["value"] for i in history["overrideStatus"]]
        assert any(s.startswith("applied until ") for s in statuses), (tls, statuses)
        assert statuses[-1].endswith(": the override expired"), (tls, statuses)
        active = [i["value"] for i in history["activeOverride"] if i["value"].get("active")]
        assert active and active[0]["phase"] == wanted[tls], (tls, active)
        assert active[0]["by"] == OPERATOR


class FlakyBank:
    """A proxy in front of a bank that answers the next ``fail_upserts`` batch upserts slowly
    and with 503: a bank briefly overloaded. Everything else goes through."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.fail_upserts = 0
        self.failed = 0
        self.delay_s = 0.3
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else b""
                if "/entityOperations/upsert" in self.path and proxy.take_failure():
                    time.sleep(proxy.delay_s)
                    self.reply(503, {"Content-Type": "application/json"}, b'{"title": "busy"}')
                    return
                skip = {"host", "content-length", "connection", "accept-encoding"}
                r = httpx.request(
                    self.command,
                    proxy.target + self.path,
                    content=body,
                    headers={k: v for k, v in self.headers.items() if k.lower() not in skip},
                    timeout=30,
                )
                drop = {"content-length", "content-encoding", "transfer-encoding", "connection"}
                headers = {k: v for k, v in r.headers.items() if k.lower() not in drop}
                self.reply(r.status_code, headers, r.content)

            def reply(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = forward

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def take_failure(self) -> bool:
        with self._lock:
            if self.fail_upserts <= 0:
                return False
            self.fail_upserts -= 1
            self.failed += 1
            return True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_override_running_when_the_simulation_ends_is_written_as_ended(
    bank: Bank, grid_cfg: Path
) -> None:
    """An override still running at the end of a run stayed "applied" and active in the bank
    for ever. It now ends with the run, written with the run's other last updates (the last
    lane period, the interrupted emergency run), through a bank that is briefly failing."""
    end = 30.0
    proxy = FlakyBank(bank.url)
    backend, feed = grid_feed(grid_cfg, 3, end, proxy.url, bank.tokens["feed"], "grid-end")
    xs = {x.id: x for x in backend.intersections()}
    forced_tls = "B1"

    def on_step(now: float, guards: dict[str, SafetyGuard]) -> None:
        feed.on_step(now, guards)
        if int(now) == 5:
            add_emergency_vehicle(backend.t)
        if int(now) == 10:
            current = guards[forced_tls].current.index
            want = next(g.index for g in xs[forced_tls].greens if g.index != current)
            patch_override(bank, feed.signal_id(forced_tls), {"phase": want, "durationS": 600})
            wait_polls(feed)

    try:
        feed.start()
        control_loop(
            backend, "max-pressure", end, rules=RULES, on_step=on_step, overrides=feed.overrides
        )
        assert forced_tls in feed.overrides  # 600 s: still running when the run ends
        proxy.fail_upserts = 3  # the bank is busy while the feed writes its last updates
    finally:
        backend.close()
        stats = feed.close()
        proxy.close()
    assert proxy.failed == 3 and stats.failed_requests >= 3
    assert stats.dropped == 0 and stats.rejected == 0, stats
    assert (stats.overrides_applied, stats.overrides_ended) == (1, 1), stats
    assert forced_tls not in feed.overrides

    signal = bank.get("operator", f"{NGSI}/entities/{feed.signal_id(forced_tls)}")
    status = signal["overrideStatus"]["value"]
    assert re.fullmatch(r"ended at \S+Z: the simulation ended", status), status
    assert signal["activeOverride"]["value"] == NO_OVERRIDE
    history = bank.get(
        "operator", f"{NGSI}/temporal/entities/{feed.signal_id(forced_tls)}", lastN="50"
    )
    statuses = [i["value"] for i in history["overrideStatus"]]
    assert statuses[-2].startswith("applied until ") and statuses[-1] == status, statuses

    # the run's other last updates got through too
    runs = bank.get("operator", NGSI + "/entities", type="EmergencyVehicleRun", limit="100")
    runs = [r for r in runs if ":grid-end:" in r["id"]]
    assert [r["runStatus"]["value"] for r in runs] == ["interrupted"]
    flows = bank.get(
        "operator",
        NGSI + "/entities",
        type="TrafficFlowObserved",
        idPattern="^urn:ngsi-ld:TrafficFlowObserved:grid-end:",
        limit="1000",
    )
    lanes = {lane for x in xs.values() for lane in x.in_lanes}
    assert sorted(f["name"]["value"] for f in flows) == sorted(lanes)  # the last period


@pytest.mark.parametrize(
    ("status", "problem", "page"),
    [
        (
            403,
            {"type": ERRORS + "TooManyResults", "detail": "limit 1000 is above the maximum of 5"},
            5,
        ),
        (400, {"field": "limit", "detail": "limit must be between 1 and 1000"}, None),
        (403, {"type": ERRORS + "TooManyResults", "detail": "too many"}, None),
    ],
)
def test_a_refused_page_size_gives_the_next_one_to_ask_for(
    status: int, problem: dict[str, str], page: int | None
) -> None:
    """The maximum the refusal names; None (ask without limit: the bank's default page) when it
    names none smaller than the page asked for."""
    r = httpx.Response(status, json=problem)
    assert _limit_refused(r)
    assert _smaller_page(r, PAGE) == page


@pytest.mark.parametrize(
    ("status", "problem"),
    [
        (400, {"field": "idPattern", "detail": "at most 5"}),
        (403, {"type": ERRORS + "Forbidden", "detail": "at most 5"}),
        (500, {"field": "limit", "detail": "at most 5"}),
    ],
)
def test_other_refusals_are_not_about_the_page_size(status: int, problem: dict[str, str]) -> None:
    assert not _limit_refused(httpx.Response(status, json=problem))
