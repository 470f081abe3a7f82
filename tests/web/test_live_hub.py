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
from cityward.web import live
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
    now = time.monotonic()
    h._count([change("", "urn:ngsi-ld:TrafficFlowObserved:old", 1)], now - RATE_WINDOW_S - 1)
    h._count([change("", "urn:ngsi-ld:TrafficFlowObserved:a", 1)], now)
    assert len(h._counts) == 1
    assert h.ingest_rate("", ALL) == pytest.approx(1 / RATE_WINDOW_S)


def test_the_rate_counts_only_what_the_dashboards_token_may_read() -> None:
    """The rate counted every tenant's and every data source's changes: a token of one
    purpose watching a quiet tenant saw another tenant's traffic, to the second."""
    h = hub()
    h._count(
        [change("", f"urn:ngsi-ld:TrafficFlowObserved:{n}", n) for n in range(20)]
        + [change("cityB", "urn:ngsi-ld:TrafficFlowObserved:b", 1)],
        time.monotonic(),
    )
    assert h.ingest_rate("", ALL) == pytest.approx(20 / RATE_WINDOW_S)
    assert h.ingest_rate("", frozenset({"traffic-management"})) == pytest.approx(2.0)
    assert h.ingest_rate("cityB", ALL) == pytest.approx(1 / RATE_WINDOW_S)
    assert h.ingest_rate("quiet", ALL) == 0
    assert h.ingest_rate("", frozenset({"environment-monitoring"})) == 0


def test_a_dashboard_reading_one_large_batch_is_not_dropped() -> None:
    """One batch of more than 2000 changed entities filled every queue in one tick and
    dropped every dashboard, prompt readers included. Behind is a backlog that stays."""
    h = hub()
    prompt, stalled = Viewer("", ALL, None), Viewer("", ALL, None)
    h.viewers |= {prompt, stalled}
    h._fan_out([change("", f"urn:ngsi-ld:TrafficFlowObserved:{n}", n) for n in range(2500)])
    assert not prompt.dropped and not stalled.dropped
    now = time.monotonic()
    h._check_backlog(now)  # the next tick: both still hold the batch
    events(prompt)  # one reads it away
    h._check_backlog(now + live.FALL_BEHIND_S / 2)
    h._check_backlog(now + live.FALL_BEHIND_S)
    assert prompt in h.viewers and not prompt.dropped
    assert stalled.dropped and stalled not in h.viewers and stalled.queue.empty()


def test_a_dashboard_dropped_for_falling_behind_holds_no_events() -> None:
    h = hub()
    slow = Viewer("", ALL, None, queue=asyncio.Queue(3))
    h.viewers.add(slow)
    h._fan_out([change("", f"urn:ngsi-ld:TrafficFlowObserved:{n}", n) for n in range(5)])
    assert slow.dropped and slow not in h.viewers
    assert slow.queue.empty()


def test_a_stream_ends_when_the_server_stops() -> None:
    """An open stream never ended by itself: every graceful stop waited out the server's
    timeout and then cancelled it with an error. The stop path (a signal handler's thread)
    ends them with ``reload`` at once."""

    async def scenario() -> list[str]:
        h = hub()
        h.start()
        stream = h.stream("", ALL, None, stats_every_s=3600)
        seen = [await anext(stream), await anext(stream)]  # hello, stats
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)  # the stream waits on its queue, for an hour of stats
        await asyncio.to_thread(h.close_streams)
        seen.append(await asyncio.wait_for(waiting, 5))
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        await h.stop()
        return [e.decode().splitlines()[0] for e in seen]

    assert asyncio.run(scenario()) == ["event: hello", "event: stats", "event: reload"]
