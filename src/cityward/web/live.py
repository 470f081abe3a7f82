"""The dashboard's live stream: committed changes as server-sent events, rendered once.

One :class:`LiveHub` per API process follows the bank's change feed. The feed listener runs on
the writers' threads and only appends to a deque (the writers never wait for a dashboard). Every
``tick_s`` one task on the event loop takes what came, keeps the newest state of each entity
(a signal that changed five times in 200 ms is sent once), renders it once as keyValues with
the core context, and hands the encoded event to every connected dashboard of the entity's
tenant whose token's purposes may read the entity's data source. So ten open dashboards cost
ten queue puts per change, not ten renderings.

A dashboard that stops reading is dropped with a ``reload`` event rather than holding memory;
the page then reconnects and reloads its state. Falling behind is judged across ticks: one batch
of many thousand changes fills every queue at once, and a dashboard that reads it away promptly
is not behind.

A stream lives no longer than the token that opened it: bearer tokens cannot be revoked, their
short lifetime is the only control, so at the token's expiry the stream sends ``reload`` and
ends (the page reconnects, is refused and logs out). Its ``stats`` count only the changes the
token could read itself: its tenant's, of the data sources its purposes allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import orjson

from cityward.bank.changes import Change, ChangeFeed, Unsubscribe
from cityward.bank.jsonld import Context
from cityward.bank.render import View, render_entity
from cityward.governance.sources import Catalog, DataSource

KEY_VALUES = View(fmt="keyValues")
WAKE = b""  # queued to wake a stream up: it sends nothing
log = logging.getLogger("cityward.web")
RATE_WINDOW_S = 10.0
# a dashboard whose queue has held more than MAX_BACKLOG events at every tick for FALL_BEHIND_S
# is dropped; HARD_BACKLOG bounds one queue's memory whatever the ticks say
MAX_BACKLOG = 2000
FALL_BEHIND_S = 5.0
HARD_BACKLOG = 100_000
SOURCE_CACHE = 200_000  # (entity id, types) whose data source is kept


def sse(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


@dataclass(eq=False)
class Viewer:
    """One connected dashboard."""

    tenant: str  # the NGSILD-Tenant it asked for ("": the default tenant)
    purposes: frozenset[str]
    types: frozenset[str] | None  # short type names wanted (None: all)
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(HARD_BACKLOG))
    dropped: bool = False
    behind_since: float | None = None  # monotonic s since its backlog is above MAX_BACKLOG


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
        # (monotonic s, changes per (tenant, data source id)), one entry per tick with changes
        self._counts: deque[tuple[float, dict[tuple[str, str], int]]] = deque()
        self._sources: dict[str, DataSource] = {}  # the data sources counted, by id
        # the data source of each (entity id, types) seen: every change is counted by its
        # source, dashboards or none, and the catalog's id patterns are regex searches
        self._source_of: dict[tuple[str, tuple[str, ...]], DataSource] = {}
        self._handle: Unsubscribe | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False  # set by close_streams: the server is stopping

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Follow the feed; call on the event loop."""
        self._loop = asyncio.get_running_loop()
        self._handle = self.feed.subscribe(self._listen)
        self._task = self._loop.create_task(self._pump())

    def close_streams(self) -> None:
        """End every open stream with ``reload``, now; from any thread (a signal handler).

        The server's graceful stop waits for open responses before the application's own
        shutdown (and stop()) runs: an open stream never ends by itself, so it held every stop
        for the server's whole graceful timeout and was then cancelled with an error. The
        server's stop path calls this first."""
        self.closing = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_all)

    def close_streams_on_stop(self) -> Callable[[], None]:
        """Have a stop signal (SIGINT, SIGTERM) end every stream first (close_streams), then
        go on to the handler it had: the server's. Returns what puts the handlers back.

        Called in the application's startup, where the server (uvicorn: one process, each of
        its workers, the demo's) has its own handlers installed: so every way of serving the
        app gets it, none has to be told. Outside the main thread (a test client) there are no
        signals to take: nothing is done."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def handler(sig: int, frame: FrameType | None) -> None:
            self.close_streams()
            prev = previous.get(sig)
            if callable(prev):
                prev(sig, frame)
            else:  # the default action (or ignored): as if we had not been here
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
                signal.raise_signal(sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)

        def restore() -> None:
            for sig, prev in previous.items():
                if signal.getsignal(sig) is handler:
                    signal.signal(sig, prev)

        return restore

    def _wake_all(self) -> None:
        for viewer in list(self.viewers):
            with contextlib.suppress(asyncio.QueueFull):  # a full queue wakes its stream anyway
                viewer.queue.put_nowait(WAKE)

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
        with self._lock:
            self._pending.extend(changes)

    def _count(self, changes: Sequence[Change], now: float) -> None:
        """Count one tick's changes by tenant and data source (on the event loop: the
        writers' threads only append), and forget counts older than the rate window: they
        were kept until a dashboard asked for the rate, without end while none was connected."""
        if changes:
            tick: dict[tuple[str, str], int] = {}
            for c in changes:
                source = self._source(c.entity_id, c.types)
                key = (c.tenant, source.id)
                tick[key] = tick.get(key, 0) + 1
            self._counts.append((now, tick))
        while self._counts and self._counts[0][0] < now - RATE_WINDOW_S:
            self._counts.popleft()

    def _source(self, eid: str, types: Sequence[str]) -> DataSource:
        """The catalog's source of an entity, looked up once per id and types."""
        key = (eid, tuple(types))
        source = self._source_of.get(key)
        if source is None:
            if len(self._source_of) >= SOURCE_CACHE:
                self._source_of.clear()
            source = self._source_of[key] = self.catalog.source_of(eid, types)
            self._sources[source.id] = source
        return source

    # -- figures --------------------------------------------------------------------------
    def ingest_rate(self, tenant: str, purposes: frozenset[str]) -> float:
        """Entity changes committed per second over the last RATE_WINDOW_S seconds to
        ``tenant``, of the data sources ``purposes`` may read: the rate of every tenant and
        source would tell a token about data it may not read (a tenant's or a source's
        activity, to the second)."""
        self._count((), time.monotonic())
        n = 0
        for _, tick in self._counts:
            for (t, source), count in tick.items():
                if t == tenant and self.catalog.allows(purposes, self._sources[source]):
                    n += count
        return n / RATE_WINDOW_S

    # -- fan-out --------------------------------------------------------------------------
    async def _pump(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            with self._lock:
                changes = list(self._pending)
                self._pending.clear()
            now = time.monotonic()
            try:
                self._count(changes, now)
            except Exception:  # the dashboards must still get the changes
                log.exception("live hub: could not count the changes")
            self._check_backlog(now)
            if changes and self.viewers:
                self._fan_out(changes)

    def _check_backlog(self, now: float) -> None:
        """Drop the dashboards that have not read their backlog down for FALL_BEHIND_S.

        Measured at each tick, before its changes are queued: a dashboard that was sent one
        batch of 2,500 changes and reads them away within a few ticks is not behind (one full
        queue per batch dropped every dashboard, prompt readers too)."""
        for viewer in list(self.viewers):
            if viewer.queue.qsize() <= MAX_BACKLOG:
                viewer.behind_since = None
            elif viewer.behind_since is None:
                viewer.behind_since = now
            elif now - viewer.behind_since >= FALL_BEHIND_S:
                self._drop(viewer)

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
        source = self._source(eid, types)
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
            self._drop(viewer)

    def _drop(self, viewer: Viewer) -> None:
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
        expires: float = float("inf"),
    ) -> AsyncIterator[bytes]:
        """The events of one dashboard of ``tenant``, with a ``stats`` event every
        ``stats_every_s``, until ``expires`` (the token's expiry, Unix time)."""
        viewer = Viewer(tenant, purposes, types)
        self.viewers.add(viewer)
        try:
            yield sse("hello", {"types": sorted(types) if types else None})
            next_stats = 0.0
            while True:
                if viewer.dropped:
                    yield sse("reload", {"reason": "the dashboard fell behind the city"})
                    return
                if self.closing:  # the page reconnects to the next server process
                    yield sse("reload", {"reason": "the server is stopping"})
                    return
                # checked before every event: a backlog must not outlive the token either
                left = expires - time.time()
                if left <= 0:
                    yield sse("reload", {"reason": "the token expired"})
                    return
                now = time.monotonic()
                if now >= next_stats:
                    next_stats = now + stats_every_s
                    rate = self.ingest_rate(tenant, purposes)
                    yield sse("stats", {"ingestRate": round(rate, 2)})
                wait = max(0.05, min(next_stats - now, left))
                try:
                    event = await asyncio.wait_for(viewer.queue.get(), wait)
                except TimeoutError:
                    continue
                if event:  # not a WAKE
                    yield event
        finally:
            self.viewers.discard(viewer)
