"""Changes of entities, as the rest of cityward sees them: write hooks and the change feed.

Every write of the data bank produces one :class:`Change` per entity it created, changed or
deleted; a batch that names an entity more than once, one per item applied, chained in the
items' order (each one's ``before`` is the previous one's ``after``), as if the items had been
written one by one. Two kinds of listeners get them:

- write hooks run inside the write transaction, before it commits, so what they store (history
  rows, queued notifications) commits or rolls back with the write itself;
- the :class:`ChangeFeed` hands them, after the commit, to in-process followers (anomaly
  detection, alert rules, the dashboard) as callbacks or async iterators. The bus issue carries
  the same feed over NATS: a follower only sees :class:`Change` objects, never where they came
  from, so that is a change of transport, not of the followers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

Doc = dict[str, Any]
log = logging.getLogger(__name__)

SYSTEM_TIMES = ("createdAt", "modifiedAt")


def _content(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in inst.items() if k not in SYSTEM_TIMES} for inst in instances]


@dataclass(frozen=True, eq=False)
class Change:
    """One entity before and after a committed write (None: did not exist / deleted)."""

    tenant: str
    pk: int
    entity_id: str
    before: Doc | None
    after: Doc | None
    at: str  # the write's time (the modifiedAt it stamped)

    @property
    def kind(self) -> Literal["created", "updated", "deleted"]:
        if self.before is None:
            return "created"
        return "deleted" if self.after is None else "updated"

    @property
    def types(self) -> list[str]:
        doc = self.after if self.after is not None else self.before
        assert doc is not None
        return list(doc["type"])

    @cached_property
    def attrs(self) -> frozenset[str]:
        """IRIs of the attributes whose content changed (system times aside)."""
        old = self.before["attrs"] if self.before is not None else {}
        new = self.after["attrs"] if self.after is not None else {}
        out = {a for a in old.keys() ^ new.keys()}
        for a in old.keys() & new.keys():
            if _content(old[a]) != _content(new[a]):
                out.add(a)
        return frozenset(out)

    @cached_property
    def created_attrs(self) -> frozenset[str]:
        old = self.before["attrs"] if self.before is not None else {}
        new = self.after["attrs"] if self.after is not None else {}
        return frozenset(new.keys() - old.keys())

    @cached_property
    def deleted_attrs(self) -> frozenset[str]:
        old = self.before["attrs"] if self.before is not None else {}
        new = self.after["attrs"] if self.after is not None else {}
        return frozenset(old.keys() - new.keys())


Listener = Callable[[Sequence[Change]], None]


@dataclass
class Unsubscribe:
    """Handle returned by :meth:`ChangeFeed.subscribe`; ``close()`` stops the deliveries."""

    _feed: ChangeFeed
    _listener: Listener
    closed: bool = field(default=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._feed._remove(self._listener)

    def __enter__(self) -> Unsubscribe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChangeFeed:
    """Committed changes, fanned out in-process to callbacks and async iterators."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> Unsubscribe:
        """Call ``listener`` with every committed batch of changes, on the writing thread.

        It must be quick and must not write to the bank (hand work to a queue instead); an
        exception it raises is logged and never undoes or blocks the write.
        """
        with self._lock:
            self._listeners = [*self._listeners, listener]
        return Unsubscribe(self, listener)

    def _remove(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not listener]

    @property
    def active(self) -> bool:
        return bool(self._listeners)

    @property
    def listeners(self) -> int:
        return len(self._listeners)

    def publish(self, changes: Sequence[Change]) -> None:
        if not changes:
            return
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:
                log.exception("a change-feed listener failed")

    async def stream(self, maxsize: int = 10_000) -> AsyncGenerator[Change, None]:
        """Changes as an async iterator on the running loop; stops following when closed.

        A follower that falls more than ``maxsize`` changes behind loses the oldest ones and
        the loss is logged: the feed never slows the writers down.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Change] = asyncio.Queue(maxsize)
        lost = 0

        def put(changes: Sequence[Change]) -> None:
            nonlocal lost
            for change in changes:
                if queue.full():
                    queue.get_nowait()
                    lost += 1
                    if lost in (1, 100) or lost % 10_000 == 0:
                        log.warning("a change-feed stream fell behind: %d changes dropped", lost)
                queue.put_nowait(change)

        def listener(changes: Sequence[Change]) -> None:
            loop.call_soon_threadsafe(put, list(changes))

        handle = self.subscribe(listener)
        try:
            while True:
                yield await queue.get()
        finally:
            handle.close()
