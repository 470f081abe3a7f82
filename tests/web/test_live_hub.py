"""The live hub's fan-out on its own (no server): tenants, damaged changes, memory."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest

from cityward.bank.changes import Change, ChangeFeed
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bus.feed import decode_change, encode_change
from cityward.governance.runtime import build_catalog
from cityward.web.live import RATE_WINDOW_S, LiveHub, Viewer

RESOLVER = ContextResolver(allow_fetch=False)
CORE = RESOLVER.core
PARSER = EntityParser(CORE)
ALL = frozenset({"traffic-management", "environment-monitoring", "public-safety"})


def hub() -> LiveHub:
    return LiveHub(ChangeFeed(), build_catalog(None, RESOLVER), CORE)


def change(tenant: str, eid: str, intensity: int) -> Change:
    doc = PARSER.entity(
        {
            "id": eid,
            "type": "TrafficFlowObserved",
            "intensity": {"type": "Property", "value": intensity},
        }
    )
    doc["createdAt"] = doc["modifiedAt"] = "2026-11-25T00:00:00Z"
    return Change(tenant, 1, eid, None, doc, "2026-11-25T00:00:00Z")


def events(viewer: Viewer) -> list[tuple[str, Any]]:
    out = []
    while not viewer.queue.empty():
        lines = viewer.queue.get_nowait().decode().splitlines()
        out.append(
            (lines[0].removeprefix("event: "), orjson.loads(lines[1].removeprefix("data: ")))
        )
    return out


def test_tenants_writing_the_same_entity_id_in_one_tick_each_reach_their_dashboard() -> None:
    """The newest change of each entity was kept by entity id alone: the default tenant's
    change replaced cityB's, which its dashboard never got."""
    h = hub()
    default, city_b = Viewer("", ALL, None), Viewer("cityB", ALL, None)
    h.viewers |= {default, city_b}
    eid = "urn:ngsi-ld:TrafficFlowObserved:J1"
    h._fan_out([change("cityB", eid, 1), change("", eid, 2), change("cityB", eid, 3)])
    assert [(e, d["id"], d["intensity"]) for e, d in events(city_b)] == [("entity", eid, 3)]
    assert [(e, d["id"], d["intensity"]) for e, d in events(default)] == [("entity", eid, 2)]


def test_a_damaged_change_is_logged_and_skipped_and_the_rest_goes_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A change whose document has no type (one bad message on the NATS change subject)
    ended the fan-out task: no dashboard got another entity, and shutdown failed on it."""
    bad = change("", "urn:ngsi-ld:TrafficFlowObserved:bad", 1)
    assert bad.after is not None
    del bad.after["type"]
    good = change("", "urn:ngsi-ld:TrafficFlowObserved:good", 2)

    async def scenario() -> list[tuple[str, Any]]:
        h = hub()
        h.tick_s = 0.01
        viewer = Viewer("", ALL, None)
        h.viewers.add(viewer)
        h.start()
        h._listen([bad])
        await asyncio.sleep(0.1)
        h._listen([good])
        await asyncio.sleep(0.1)
        await h.stop()  # does not raise
        return events(viewer)

    with caplog.at_level(logging.ERROR, logger="cityward.web"):
        got = asyncio.run(scenario())
    assert [d["id"] for _, d in got] == ["urn:ngsi-ld:TrafficFlowObserved:good"]
    assert any("bad" in r.getMessage() for r in caplog.records)
    # and the bus refuses such a message before any listener sees it
    body = orjson.loads(encode_change(good))
    del body["after"]["type"]
    with pytest.raises(ValueError, match="after is not an entity document"):
        decode_change(orjson.dumps(body))
    assert decode_change(encode_change(good)).entity_id == good.entity_id


def test_the_rate_counts_are_kept_for_the_window_only_with_no_dashboard() -> None:
    """They were trimmed only when a dashboard asked for the rate: an API process with none
    connected grew by every committed batch (88 MB a million)."""
    h = hub()
    old = time.monotonic() - RATE_WINDOW_S - 1
    h._counts.extend((old, 1) for _ in range(1000))
    h._listen([change("", "urn:ngsi-ld:TrafficFlowObserved:a", 1)])
    assert len(h._counts) == 1
    assert h.ingest_rate() == pytest.approx(1 / RATE_WINDOW_S)


def test_a_dashboard_dropped_for_falling_behind_holds_no_events() -> None:
    h = hub()
    slow = Viewer("", ALL, None, queue=asyncio.Queue(3))
    h.viewers.add(slow)
    h._fan_out([change("", f"urn:ngsi-ld:TrafficFlowObserved:{n}", n) for n in range(5)])
    assert slow.dropped and slow not in h.viewers
    assert slow.queue.empty()
