"""The dashboard's live stream against a real ``cityward serve`` (SQLite, governance on).

A change written through the API reaches a connected dashboard within 2 s; a token sees only
the data sources of its purposes, and a dashboard only its tenant; no token, no stream; every
connection is audited.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from cityward.config import Settings
from cityward.governance.identity import Identities
from cityward.governance.policy import Role
from tests.servers import cityward_serve, free_port

EVENTS = "/dashboard/v1/events"


@dataclass
class Server:
    url: str
    admin: str
    operator: str  # traffic-management only
    ids: Identities


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("live") / "data"
    with cityward_serve(data, free_port(), data.parent / "server.log") as url:
        ids = Identities(Settings(data_dir=data).governance, data, None)
        yield Server(
            url,
            (data / "governance" / "admin.token").read_text().strip(),
            ids.issue(Role.OPERATOR, ["traffic-management"], subject="operator-live"),
            ids,
        )


def follow(
    url: str,
    token: str,
    out: queue.Queue[tuple[float, str, Any]],
    stop: threading.Event,
    tenant: str | None = None,
) -> None:
    """Parse the SSE stream into (arrival time, event, data) until ``stop``."""
    headers = {"Authorization": f"Bearer {token}"}
    if tenant is not None:
        headers["NGSILD-Tenant"] = tenant
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=30)) as client,
        client.stream("GET", url, headers=headers) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = ""
        for line in r.iter_lines():
            if stop.is_set():
                return
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.put((time.monotonic(), event, orjson.loads(line[6:])))


def entity(eid: str, type_: str, **attrs: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": eid, "type": type_}
    for k, v in attrs.items():
        doc[k] = {"type": "Property", "value": v}
    return doc


def seed_tenant(server: Server, tenant: str, eid: str) -> None:
    """Create ``tenant`` with one air-quality entity, as the admin."""
    r = httpx.post(
        server.url + "/ngsi-ld/v1/entities",
        json=entity(eid, "AirQualityObserved", no2=3.0),
        headers={"Authorization": f"Bearer {server.admin}", "NGSILD-Tenant": tenant},
        timeout=10,
    )
    assert r.status_code == 201, r.text


def test_changes_reach_a_dashboard_within_two_seconds_by_purpose(server: Server) -> None:
    got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
    stop = threading.Event()
    url = server.url + EVENTS + "?type=TrafficSignal,AirQualityObserved"
    reader = threading.Thread(target=follow, args=(url, server.operator, got, stop), daemon=True)
    reader.start()
    first = got.get(timeout=10)
    assert first[1] == "hello"
    admin = {"Authorization": f"Bearer {server.admin}"}
    air = entity("urn:ngsi-ld:AirQualityObserved:live-1", "AirQualityObserved", no2=41.0)
    sig = entity("urn:ngsi-ld:TrafficSignal:live:J1", "TrafficSignal", phase=2)
    r = httpx.post(server.url + "/ngsi-ld/v1/entities", json=air, headers=admin, timeout=10)
    assert r.status_code == 201, r.text
    written = time.monotonic()
    r = httpx.post(server.url + "/ngsi-ld/v1/entities", json=sig, headers=admin, timeout=10)
    assert r.status_code == 201, r.text
    seen: list[tuple[float, str, Any]] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            item = got.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(item)
        if item[1] == "entity" and item[2]["id"] == sig["id"]:
            break
    stop.set()
    entities = {d["id"]: (at, d) for at, ev, d in seen if ev == "entity"}
    assert sig["id"] in entities, seen
    at, doc = entities[sig["id"]]
    assert doc["type"] == "TrafficSignal" and doc["phase"] == 2  # keyValues
    assert at - written < 2.0
    # the operator's token carries traffic-management only: no air quality
    assert air["id"] not in entities
    assert any(ev == "stats" and d["ingestRate"] >= 0 for _, ev, d in seen)


def test_a_dashboard_sees_only_the_tenant_it_asked_for(server: Server) -> None:
    admin = {"Authorization": f"Bearer {server.admin}"}
    # creates the tenant; the operator (traffic-management) is never sent air quality
    seed_tenant(server, "cityB", "urn:ngsi-ld:AirQualityObserved:tenant-b")
    streams: dict[str | None, queue.Queue[tuple[float, str, Any]]] = {}
    stop = threading.Event()
    for tenant in (None, "cityB"):  # None: no header, the default tenant
        got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
        streams[tenant] = got
        args = (server.url + EVENTS, server.operator, got, stop, tenant)
        threading.Thread(target=follow, args=args, daemon=True).start()
        assert got.get(timeout=10)[1] == "hello"

    def write(tenant: str | None, name: str) -> str:
        doc = entity(f"urn:ngsi-ld:TrafficFlowObserved:{name}", "TrafficFlowObserved", intensity=7)
        headers = admin if tenant is None else {**admin, "NGSILD-Tenant": tenant}
        r = httpx.post(server.url + "/ngsi-ld/v1/entities", json=doc, headers=headers, timeout=10)
        assert r.status_code == 201, r.text
        return str(doc["id"])

    # each stream hands out changes in commit order: once a stream has the change written
    # last to its own tenant, the other tenant's (written before) would have come first
    in_b = write("cityB", "tenant-b-loop")
    in_default = write(None, "default-loop")
    last_in_b = write("cityB", "tenant-b-loop-2")
    seen: dict[str | None, list[str]] = {}
    for tenant, own_last in ((None, in_default), ("cityB", last_in_b)):
        seen[tenant] = []
        deadline = time.monotonic() + 10
        while own_last not in seen[tenant]:
            assert time.monotonic() < deadline, (tenant, seen)
            with contextlib.suppress(queue.Empty):
                _, ev, data = streams[tenant].get(timeout=0.2)
                if ev in ("entity", "delete"):
                    seen[tenant].append(data["id"])
    stop.set()
    assert seen[None] == [in_default]
    assert seen["cityB"] == [in_b, last_in_b]
    # as every NGSI-LD read, a tenant that does not exist is a 404 naming the header
    unknown = {"Authorization": f"Bearer {server.operator}", "NGSILD-Tenant": "cityZ"}
    with httpx.stream("GET", server.url + EVENTS, headers=unknown, timeout=10) as r:
        assert r.status_code == 404  # (not read otherwise: an open stream never ends)
        assert orjson.loads(r.read())["field"] == "NGSILD-Tenant"


def test_no_token_no_stream_and_bad_types_say_which_field(server: Server) -> None:
    r = httpx.get(server.url + EVENTS, timeout=10)
    assert r.status_code == 401
    assert r.json()["field"] == "Authorization"
    headers = {"Authorization": f"Bearer {server.operator}"}
    r = httpx.get(server.url + EVENTS, params={"type": " , "}, headers=headers, timeout=10)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/")
    assert r.json()["field"] == "type"


def test_every_connection_is_audited(server: Server) -> None:
    got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
    stop = threading.Event()
    url = server.url + EVENTS
    reader = threading.Thread(target=follow, args=(url, server.operator, got, stop), daemon=True)
    reader.start()
    assert got.get(timeout=10)[1] == "hello"
    stop.set()
    r = httpx.get(
        server.url + "/cityward/v1/audit",
        params={"actor": "operator-live", "action": "read", "limit": 1000},
        headers={"Authorization": f"Bearer {server.admin}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    paths = [row["path"] for row in r.json()]
    assert any(p.startswith(EVENTS) for p in paths), paths


def test_a_stream_ends_when_its_token_expires(server: Server) -> None:
    """Bearer tokens cannot be revoked, a short life is their only control: a stream opened
    with a token kept sending city data after it had expired (and the page never learnt)."""
    token = server.ids.issue(Role.ANALYST, ["traffic-management"], subject="short", ttl_s=2)
    got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
    stop = threading.Event()
    reader = threading.Thread(
        target=follow, args=(server.url + EVENTS, token, got, stop), daemon=True
    )
    reader.start()
    assert got.get(timeout=10)[1] == "hello"
    reader.join(timeout=15)  # follow returns when the server ends the stream
    stop.set()
    assert not reader.is_alive(), "the stream outlived its token"
    seen = []
    while not got.empty():
        seen.append(got.get_nowait()[1:])
    assert seen[-1] == ("reload", {"reason": "the token expired"}), seen
    # and the page's reconnection is refused, so it logs out
    r = httpx.get(server.url + EVENTS, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert r.status_code == 401


def test_the_page_and_its_files_answer_head(server: Server) -> None:
    """The policy allows GET and HEAD on the public files; HEAD was a 405."""
    for path in ("/", "/ui/app.js"):
        get = httpx.get(server.url + path, timeout=10)
        head = httpx.head(server.url + path, timeout=10)
        assert get.status_code == head.status_code == 200, (path, head.status_code)
        assert head.headers["etag"] == get.headers["etag"] and head.content == b""
    for path in ("/register", "/register.json", "/healthz"):
        head = httpx.head(server.url + path, timeout=10)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)


def test_the_ingest_rate_counts_only_what_the_token_may_read(server: Server) -> None:
    """The rate counted every tenant's and data source's changes: a side channel on data
    the token may not read. Here a traffic-only token watches a tenant that holds only air
    quality while the default tenant's traffic is written."""
    admin = {"Authorization": f"Bearer {server.admin}"}
    seed_tenant(server, "quiet", "urn:ngsi-ld:AirQualityObserved:quiet")
    got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
    stop = threading.Event()
    args = (server.url + EVENTS, server.operator, got, stop, "quiet")
    threading.Thread(target=follow, args=args, daemon=True).start()
    assert got.get(timeout=10)[1] == "hello"
    assert got.get(timeout=10)[1] == "stats"  # the first, at once
    signals = [
        entity(f"urn:ngsi-ld:TrafficSignal:rate:{n}", "TrafficSignal", phase=1) for n in range(50)
    ]
    r = httpx.post(
        server.url + "/ngsi-ld/v1/entityOperations/upsert", json=signals, headers=admin, timeout=10
    )
    assert r.status_code in (201, 204), r.text
    _, event, data = got.get(timeout=10)  # the next, 2 s later
    stop.set()
    assert (event, data) == ("stats", {"ingestRate": 0})


def test_a_stop_signal_ends_the_open_streams_first(tmp_path: Any) -> None:
    """The server's graceful stop waits for open responses, and a stream never ends by itself:
    every stop with a dashboard open waited the whole graceful timeout, then cancelled the
    stream with an error in the log. A stop signal now ends each stream with reload first."""
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    got: queue.Queue[tuple[float, str, Any]] = queue.Queue()
    stop = threading.Event()
    with cityward_serve(data, free_port(), log) as url:
        admin = (data / "governance" / "admin.token").read_text().strip()
        reader = threading.Thread(target=follow, args=(url + EVENTS, admin, got, stop), daemon=True)
        reader.start()
        assert got.get(timeout=10)[1] == "hello"
    # the server has stopped (SIGINT): the stream got its last word
    events = []
    with contextlib.suppress(queue.Empty):
        while True:
            events.append(got.get(timeout=5)[1:])
    assert ("reload", {"reason": "the server is stopping"}) in events
    said = log.read_text()
    assert "graceful shutdown exceeded" not in said and "CancelledError" not in said, said
