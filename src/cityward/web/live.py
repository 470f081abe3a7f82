"""The dashboard's live stream: committed changes as server-sent events, rendered once.

One :class:`LiveHub` per API process follows the bank's change feed. The feed listener runs on
the writers' threads and only appends to a deque (the writers never wait for a dashboard). Every
``tick_s`` one task on the event loop takes what came, keeps the newest state of each entity
(a signal that changed five times in 200 ms is sent once), renders it once as keyValues with
the core context, and hands the encoded event to every connected dashboard of the entity's
tenant whose token's purposes may read the entity's data source. So ten open dashboards cost
ten queue puts per change, not ten renderings.

A dashboard that stops reading (its queue full) is dropped with a ``reload`` event rather than
holding memory; the page then reconnects and reloads its state.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from cityward.bank.changes import Change, ChangeFeed, Unsubscribe
from cityward.bank.jsonld import Context
from cityward.bank.render import View, render_entity
from cityward.governance.sources import Catalog

KEY_VALUES = View(fmt="keyValues")
log = logging.getLogger("cityward.web")
RATE_WINDOW_S = 10.0


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(eq=False)
class Viewer:
    """One connected dashboard."""

    tenant: str  # the NGSILD-Tenant it asked for ("": the default tenant)
    purposes: frozenset[str]
    types: frozenset[str] | None  # short type names wanted (None: all)
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(2000))
    dropped: bool = False


class LiveHub:
    def __init__(
        self, feed: ChangeFeed, catalog: Catalog, context: Context, tick_s: float = 0.2
    ) -> None:
        self.feed = feed
        self.catalog = catalog
        self.context = context
        self.tick_s = tick_s
        self.viewers: set[Viewer] = set()
        self._pending: deque[Change] = deque()
        self._lock = threading.Lock()
        self._counts: deque[tuple[float, int]] = deque()  # (monotonic s, changes)
        self._handle: Unsubscribe | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the feed; call on the event loop."""
        self._handle = self.feed.subscribe(self._listen)
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            except Exception:  # the rest of the app's shutdown must still run
                log.exception("live hub: the fan-out task had failed")

    def _listen(self, changes: Sequence[Change]) -> None:
        now = time.monotonic()
        with self._lock:
            self._pending.extend(changes)
            self._counts.append((now, len(changes)))
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget counts older than the rate window (with the lock held): they were kept
        until a dashboard asked for the rate, without end while none was connected."""
        while self._counts and self._counts[0][0] < now - RATE_WINDOW_S:
            self._counts.popleft()

    # -- figures --------------------------------------------------------------------------
    def ingest_rate(self) -> float:
        """Entity changes committed per second over the last RATE_WINDOW_S seconds."""
        now = time.monotonic()
        with self._lock:
            self._prune(now)
            n = sum(c for _, c in self._counts)
        return n / RATE_WINDOW_S

    # -- fan-out --------------------------------------------------------------------------
    async def _pump(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            with self._lock:
                changes = list(self._pending)
                self._pending.clear()
            if changes and self.viewers:
                self._fan_out(changes)

    def _fan_out(self, changes: list[Change]) -> None:
        # the newest change of each entity of each tenant (tenants reuse entity ids)
        latest: dict[tuple[str, str], Change] = {}
        for c in changes:
            latest[(c.tenant, c.entity_id)] = c
        for change in latest.values():
            try:
                self._send(change)
            except Exception:  # one bad change must not end the fan-out for every dashboard
                log.exception("live hub: could not send the change of %s", change.entity_id)

    def _send(self, change: Change) -> None:
        eid = change.entity_id
        types = change.types
        source = self.catalog.source_of(eid, types)
        short = frozenset(self.context.compact(t) for t in types)
        if change.after is None:
            event = sse("delete", {"id": eid, "type": sorted(short)})
        else:
            event = sse("entity", render_entity(dict(change.after), self.context, KEY_VALUES))
        for viewer in list(self.viewers):
            # tenants are separate data banks: a dashboard never sees another's entities
            if viewer.tenant != change.tenant:
                continue
            if not self.catalog.allows(viewer.purposes, source):
                continue
            if viewer.types is not None and viewer.types.isdisjoint(short):
                continue
            self._put(viewer, event)

    def _put(self, viewer: Viewer, event: bytes) -> None:
        try:
            viewer.queue.put_nowait(event)
        except asyncio.QueueFull:
            viewer.dropped = True
            self.viewers.discard(viewer)
            # its stream sends "reload" next, if the client ever reads again: the queued
            # events would be held for as long as a stalled connection stays open
            while not viewer.queue.empty():
                viewer.queue.get_nowait()

    async def stream(
        self,
        tenant: str,
        purposes: frozenset[str],
        types: frozenset[str] | None,
        stats_every_s: float = 2.0,
    ) -> AsyncIterator[bytes]:
        """The events of one dashboard of ``tenant``, with a ``stats`` event every
        ``stats_every_s``."""
        viewer = Viewer(tenant, purposes, types)
        self.viewers.add(viewer)
        try:
            yield sse("hello", {"types": sorted(types) if types else None})
            next_stats = 0.0
            while True:
                if viewer.dropped:
                    yield sse("reload", {"reason": "the dashboard fell behind the city"})
                    return
                now = time.monotonic()
                if now >= next_stats:
                    next_stats = now + stats_every_s
                    yield sse("stats", {"ingestRate": round(self.ingest_rate(), 2)})
                try:
                    yield await asyncio.wait_for(viewer.queue.get(), max(0.05, next_stats - now))
                except TimeoutError:
                    continue
        finally:
            self.viewers.discard(viewer)
