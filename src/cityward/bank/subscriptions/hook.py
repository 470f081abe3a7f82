"""The glue to the data bank's write path: a write hook and a commit listener.

::

    hook = NotificationHook(outbox, resolver.resolve, dispatcher)
    hook.load(tenant, subscriptions)        # at start, per tenant; then put/remove on changes
    bank.hooks.append(hook)                 # inside each write transaction: match + enqueue
    bank.feed.subscribe(hook.committed)     # after each commit: wake the dispatcher

The hook runs in the writer's thread, inside its transaction, so a notification is stored if
and only if the write commits. Matching takes a lock (the indexes are shared by all writer
threads); rendering and the INSERT do not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from cityward.bank.jsonld import Context
from cityward.bank.subscriptions.dispatcher import Dispatcher
from cityward.bank.subscriptions.matcher import (
    ChangeEvent,
    Fire,
    SubscriptionIndex,
    build_notification,
    notification_for,
    render_data,
)
from cityward.bank.subscriptions.model import Subscription
from cityward.bank.subscriptions.outbox import Outbox, OutboxItem

__all__ = ["NotificationHook"]

log = logging.getLogger(__name__)


class _Txn(Protocol):
    """What the hook needs of ``cityward.bank.store.base.WriteTxn``."""

    @property
    def conn(self) -> Any: ...


class _Change(Protocol):
    """What the hook needs of ``cityward.bank.changes.Change``."""

    @property
    def tenant(self) -> str: ...

    @property
    def entity_id(self) -> str: ...

    @property
    def before(self) -> Any: ...

    @property
    def after(self) -> Any: ...

    @property
    def at(self) -> str: ...


class NotificationHook:
    """Matches every committed-to-be change against the live subscriptions of its tenant."""

    def __init__(
        self,
        outbox: Outbox,
        resolve: Callable[[Any, str], Context],
        dispatcher: Dispatcher | None = None,
        *,
        link_for: Callable[[Subscription], str | None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.resolve = resolve  # sub.notification_context -> Context (ContextResolver.resolve)
        self.dispatcher = dispatcher
        # the Link URL of a subscription's context when it is not a URL itself (an inline
        # @context the broker hosts under /jsonldContexts); None: Context.link_url
        self.link_for = link_for
        self._indexes: dict[str, SubscriptionIndex] = {}
        # governance: whether a subscription's owner may see an entity (id, types)
        self.visible: Callable[[Subscription, str, Sequence[str]], bool] | None = None
        self._lock = threading.Lock()
        self.enqueued = 0
        self.dropped = 0

    # -- the subscriptions ------------------------------------------------------------------
    def load(self, tenant: str, subs: Iterable[Subscription]) -> None:
        """Replace a tenant's subscriptions (at start-up, from the database, and after another
        process changed them); when each one last fired is kept, for throttling."""
        index = SubscriptionIndex(subs)
        with self._lock:
            old = self._indexes.get(tenant)
            if old is not None:
                index.carry_over(old)
            self._indexes[tenant] = index

    def put(self, tenant: str, sub: Subscription) -> None:
        """A subscription was created or updated (call after its own commit)."""
        with self._lock:
            self._indexes.setdefault(tenant, SubscriptionIndex()).put(sub)

    def remove(self, tenant: str, sid: str) -> None:
        with self._lock:
            index = self._indexes.get(tenant)
            if index is not None:
                index.remove(sid)

    def get(self, tenant: str, sid: str) -> Subscription | None:
        with self._lock:
            index = self._indexes.get(tenant)
            return None if index is None else index.get(sid)

    def ids(self) -> set[tuple[str, str]]:
        """(tenant, id) of every subscription held."""
        with self._lock:
            return {(t, s.id) for t, index in self._indexes.items() for s in index}

    # -- the write path ---------------------------------------------------------------------
    def __call__(self, txn: _Txn, changes: Sequence[_Change]) -> None:
        """The write hook: enqueue the notifications of ``changes`` in ``txn``."""
        now = datetime.now(UTC)
        fired: list[tuple[str, ChangeEvent, Subscription, Fire]] = []
        # per tenant, the subscriptions this write fired so far: throttling decides once per
        # write (the first change let through, the write's other changes join its notification)
        this_write: dict[str, set[str]] = {}
        with self._lock:
            for change in changes:
                index = self._indexes.get(change.tenant)
                if index is None or not len(index):
                    continue
                event = ChangeEvent.from_change(change)
                seen = this_write.setdefault(change.tenant, set())
                for sub, fire in index.match(event, now=now, fired=seen):
                    if self.visible is not None and sub.owner_purposes is not None:
                        doc = event.after if event.after is not None else event.before
                        assert doc is not None
                        if not self.visible(sub, event.entity_id, doc["type"]):
                            continue
                    fired.append((change.tenant, event, sub, fire))
        if not fired:
            return
        # One notification per subscription and trigger for the whole write, its entities in
        # ``data``: a batch of 1,000 changes watched by 10 subscriptions makes 10 deliveries,
        # not 10,000 (NGSI-LD notifications carry an array of entities for this).
        groups: dict[tuple[str, str, str], list[tuple[ChangeEvent, Subscription, Fire]]] = {}
        for tenant, event, sub, fire in fired:
            groups.setdefault((tenant, sub.id, fire.trigger), []).append((event, sub, fire))
        items: list[OutboxItem] = []
        for (tenant, _, trigger), members in groups.items():
            sub = members[0][1]
            try:
                ctx = self._context(sub, tenant)
                link = self.link_for(sub) if self.link_for is not None else None
                if len(members) == 1:
                    event, _, fire = members[0]
                    items.append(
                        notification_for(sub, event, fire, ctx, now=now, tenant=tenant, link=link)
                    )
                    continue
                deleted = trigger in ("entityDeleted", "attributeDeleted")
                items.append(
                    build_notification(
                        sub,
                        members[0][2].trigger,
                        [render_data(sub, event, fire, ctx) for event, _, fire in members],
                        ctx,
                        now=now,
                        tenant=tenant,
                        link=link,
                        key=sub.id,
                        docs=[None if deleted else event.after for event, _, _ in members],
                    )
                )
            except Exception:  # never fail the write because of one notification
                log.exception("rendering a notification of %s failed", sub.id)
        self.dropped += self.outbox.enqueue(txn.conn, items)
        self.enqueued += len(items)

    def _context(self, sub: Subscription, tenant: str) -> Context:
        """The subscription's context; the core one when it cannot be had right now (a remote
        jsonldContext that is unreachable must not fail the entity write). Resolved for the
        subscription's tenant, whose hosted contexts it may name (a write outside a request,
        from ingest, has no request tenant to go by)."""
        try:
            ctx = self.resolve(sub.notification_context, tenant)
        except Exception:
            log.warning(
                "the @context of subscription %s is not available; notifying with the core one",
                sub.id,
                exc_info=True,
            )
            return self.resolve(None, tenant)
        if (
            sub.notification.endpoint.accept != "application/ld+json"
            and self.link_for is None
            and not ctx.linkable
        ):
            # the context goes in a Link header, and an inline one has no URL: the data was
            # compacted with it while the Link named the core context, so the receiver read
            # every term of it wrong (Car as the default context's Car). Compacted with the
            # core context, those terms stay full IRIs, which any receiver reads right
            return self.resolve(None, tenant)
        return ctx

    def committed(self, changes: Sequence[Any]) -> None:
        """The change-feed listener: the write committed, so delivery can start now."""
        if self.dispatcher is not None:
            self.dispatcher.wake()
