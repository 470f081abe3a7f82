"""Which subscriptions an entity change fires, and the notification each one sends.

The write path describes every change as a :class:`ChangeEvent` (the stored documents before
and after, either None for a create or a delete). :func:`evaluate` decides whether one
subscription fires and with which trigger; :func:`notification_for` renders the notification
as an :class:`~cityward.bank.subscriptions.outbox.OutboxItem`, ready to be enqueued in the
same transaction as the write. :class:`SubscriptionIndex` keeps the live subscriptions of a
tenant indexed by entity type, so that a change is only checked against the subscriptions
that can match it.

Trigger rules (the spec leaves several open; these are ours):

* The attributes that changed are ``event.changed`` or, when None, those whose instances differ
  between the two documents. Only watched attributes count when ``watchedAttributes`` is set.
* Create: ``entityCreated`` if subscribed (with watchedAttributes: only when the new entity has
  one of them), else ``attributeCreated`` for the (watched) attributes it was created with.
* Delete: ``entityDeleted`` if subscribed (with watchedAttributes: only when the entity had one
  of them), else ``attributeDeleted`` for its (watched) attributes.
* Update: each changed attribute was created (absent before), deleted (absent after) or
  updated (present in both). The reason reported is the first subscribed one of
  attributeCreated, attributeUpdated, attributeDeleted that happened, else entityUpdated.
* Then the filters: entity selectors (id / idPattern and type), q, geoQ and scopeQ, evaluated on
  the entity after the change (before it, for a deleted entity).
* Paused or expired subscriptions, and periodic ones (timeInterval), never fire on a change.
  Throttling drops a notification when the last one went out less than ``throttling`` seconds
  ago. It decides once per write: the changes of one write make one notification, and a
  subscription that fires for one of them is not throttled for the others.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any, Final, Literal, Protocol

from cityward.bank import geo
from cityward.bank.jsonld import Context, link_header
from cityward.bank.model import NGSI_NULL, PAYLOAD
from cityward.bank.query.evaluate import DocIndex, matches, scope_matches, type_matches
from cityward.bank.render import View, render_entity, render_instance
from cityward.bank.subscriptions.model import Subscription, Trigger, _now, format_ts, parse_ts
from cityward.bank.subscriptions.outbox import OutboxItem

__all__ = [
    "ChangeEvent",
    "ChangeLike",
    "Fire",
    "SubscriptionIndex",
    "build_notification",
    "evaluate",
    "notification_for",
    "render_data",
]

log = logging.getLogger(__name__)
ChangeKind = Literal["create", "update", "delete"]

_PREVIOUS: Final = {
    "value": "previousValue",
    "object": "previousObject",
    "languageMap": "previousLanguageMap",
    "valueList": "previousValueList",
    "objectList": "previousObjectList",
    "json": "previousJson",
    "vocab": "previousVocab",
}
_NULL_PAYLOAD: Final[dict[str, Any]] = {
    "value": NGSI_NULL,
    "object": NGSI_NULL,
    "languageMap": {"@none": NGSI_NULL},
    "valueList": [NGSI_NULL],
    "objectList": [NGSI_NULL],
    "json": NGSI_NULL,
    "vocab": NGSI_NULL,
}
_LOCATION: Final = "https://uri.etsi.org/ngsi-ld/location"


class ChangeLike(Protocol):
    """What :meth:`ChangeEvent.from_change` reads (``cityward.bank.changes.Change`` has it)."""

    @property
    def entity_id(self) -> str: ...

    @property
    def before(self) -> Mapping[str, Any] | None: ...

    @property
    def after(self) -> Mapping[str, Any] | None: ...

    @property
    def at(self) -> str: ...


@dataclass(frozen=True)
class ChangeEvent:
    """One entity write: the stored documents before and after it (None: absent)."""

    entity_id: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    changed: frozenset[str] | None = None  # attribute IRIs written; None: diff the documents
    at: str | None = None  # when it happened (stored timestamp form); deletedAt of a delete

    def __post_init__(self) -> None:
        if self.before is None and self.after is None:
            raise ValueError("a change needs a document before or after it")

    @classmethod
    def from_change(cls, change: ChangeLike, changed: frozenset[str] | None = None) -> ChangeEvent:
        """The event of a write hook's change (``cityward.bank.changes.Change``)."""
        return cls(change.entity_id, change.before, change.after, changed, change.at)

    @property
    def kind(self) -> ChangeKind:
        if self.before is None:
            return "create"
        if self.after is None:
            return "delete"
        return "update"

    @property
    def doc(self) -> Mapping[str, Any]:
        """The document the filters look at: after the change, or before a deletion."""
        doc = self.after if self.after is not None else self.before
        assert doc is not None
        return doc

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(self.doc.get("type") or ())

    @cached_property
    def index(self) -> DocIndex:
        """The document's q index, built once for all the subscriptions checked."""
        return DocIndex(self.doc)

    @cached_property
    def changed_attrs(self) -> frozenset[str]:
        before = _attrs(self.before)
        after = _attrs(self.after)
        if self.changed is not None:
            return frozenset(a for a in self.changed if a in before or a in after)
        keys = before.keys() | after.keys()
        return frozenset(k for k in keys if before.get(k) != after.get(k))


def _attrs(doc: Mapping[str, Any] | None) -> Mapping[str, list[dict[str, Any]]]:
    if doc is None:
        return {}
    attrs: Mapping[str, list[dict[str, Any]]] = doc.get("attrs") or {}
    return attrs


@dataclass(frozen=True)
class Fire:
    """A subscription fires: the reason, and which attributes were created/updated/deleted."""

    trigger: Trigger
    created: frozenset[str] = frozenset()
    updated: frozenset[str] = frozenset()
    deleted: frozenset[str] = frozenset()


def _trigger(sub: Subscription, event: ChangeEvent) -> Fire | None:
    triggers = sub.notification_trigger
    watched = None if sub.watched_attributes is None else frozenset(sub.watched_attributes)
    kind = event.kind
    if kind == "create":
        present = frozenset(_attrs(event.after))
        relevant = present if watched is None else present & watched
        if "entityCreated" in triggers and (watched is None or relevant):
            return Fire("entityCreated", created=relevant)
        if "attributeCreated" in triggers and relevant:
            return Fire("attributeCreated", created=relevant)
        return None
    if kind == "delete":
        present = frozenset(_attrs(event.before))
        relevant = present if watched is None else present & watched
        if "entityDeleted" in triggers and (watched is None or relevant):
            return Fire("entityDeleted", deleted=relevant)
        if "attributeDeleted" in triggers and relevant:
            return Fire("attributeDeleted", deleted=relevant)
        return None
    changed = event.changed_attrs if watched is None else event.changed_attrs & watched
    if not changed:
        return None
    before, after = _attrs(event.before), _attrs(event.after)
    created = frozenset(a for a in changed if a not in before)
    deleted = frozenset(a for a in changed if a not in after)
    updated = changed - created - deleted
    for trig, happened in (
        ("attributeCreated", created),
        ("attributeUpdated", updated),
        ("attributeDeleted", deleted),
    ):
        if happened and trig in triggers:
            return Fire(trig, created, updated, deleted)
    if "entityUpdated" in triggers:
        return Fire("entityUpdated", created, updated, deleted)
    return None


def _expander(terms: Mapping[str, str]) -> Callable[[str], str]:
    return lambda name: terms.get(name, name)


def _selected(sub: Subscription, event: ChangeEvent) -> bool:
    if not sub.entities:
        return True
    doc = event.doc
    for sel in sub.entities:
        if not sel.matches_id(event.entity_id):
            continue
        if type_matches(sel.type_expr, doc, _expander(sel.terms)):
            return True
    return False


def _filters_pass(sub: Subscription, event: ChangeEvent) -> bool:
    q = sub.q_expr
    if q is not None and not matches(q, event.index, sub.expand_q):
        return False
    scope = sub.scope_expr
    if scope is not None and not scope_matches(scope, event.doc):
        return False
    if sub.geo_q is not None:
        instances = _attrs(event.doc).get(sub.geo_q.geoproperty) or ()
        if not any(
            i.get("type") == "GeoProperty"
            and isinstance(i.get("value"), dict)
            and geo.matches(sub.geo_q.query, i["value"])
            for i in instances
        ):
            return False
    return True


def evaluate(
    sub: Subscription,
    event: ChangeEvent,
    *,
    now: datetime | None = None,
    last_notified: str | None = None,
    throttle: bool = True,
) -> Fire | None:
    """Whether ``sub`` fires for ``event``, and why (None: it does not).

    ``last_notified`` is when this subscription last produced a notification (stored
    timestamp form), for throttling; it defaults to ``sub.stats.last_notification``.
    ``throttle=False`` skips throttling (the subscription fired for an earlier change of the
    same write, whose notification this change joins).
    """
    t = _now(now)
    if sub.time_interval is not None or not sub.is_live(t):
        return None
    if not _selected(sub, event):
        return None
    fire = _trigger(sub, event)
    if fire is None or not _filters_pass(sub, event):
        return None
    last = last_notified if last_notified is not None else sub.stats.last_notification
    # seconds as floats: a timedelta of a throttling stored before it was bounded overflowed
    if (
        throttle
        and sub.throttling
        and last is not None
        and (t - parse_ts(last)).total_seconds() < sub.throttling
    ):
        return None
    return fire


# --------------------------------------------------------------------------------------------
# Notification content


def _view(sub: Subscription) -> View:
    n = sub.notification
    return View(
        fmt=n.format,
        sys_attrs=n.sys_attrs,
        lang=sub.lang,
        attrs=None if n.attributes is None else frozenset(n.attributes),
        omit=frozenset(n.omit or ()),
        pick=None if n.pick is None else frozenset(n.pick),
        dataset_ids=None if sub.dataset_id is None else frozenset(sub.dataset_id),
    )


def _shown(iri: str, view: View) -> bool:
    if view.attrs is not None and iri not in view.attrs:
        return False
    return not ((view.pick is not None and iri not in view.pick) or iri in view.omit)


def _instances(instances: Iterable[dict[str, Any]], view: View) -> list[dict[str, Any]]:
    if view.dataset_ids is None:
        return list(instances)
    return [i for i in instances if i.get("datasetId", "@none") in view.dataset_ids]


def _previous(inst: dict[str, Any], ctx: Context) -> tuple[str, Any]:
    member = PAYLOAD.get(inst["type"], "value")
    payload = inst[member]
    if member == "vocab":
        payload = (
            [ctx.compact(v) for v in payload]
            if isinstance(payload, list)
            else (ctx.compact(payload))
        )
    elif member == "objectList":
        payload = [{"object": o} for o in payload]
    return _PREVIOUS[member], payload


def _with_previous(out: Any, inst: dict[str, Any], prev: dict[str, Any], ctx: Context) -> Any:
    """A rendered instance with its previous payload added (showChanges)."""
    if not isinstance(out, dict):
        out = {"value": out}  # a concise bare value
    elif inst["type"] == "GeoProperty" and "value" not in out:
        out = {"type": "GeoProperty", "value": out}  # a concise bare geometry
    name, payload = _previous(prev, ctx)
    out[name] = payload
    return out


def _rendered_attr(
    instances: list[dict[str, Any]],
    ctx: Context,
    view: View,
    previous: Iterable[dict[str, Any]] | None,
    null: bool,
) -> Any:
    """One attribute's instances rendered, with the matching ``previous`` instances added
    (showChanges) and, for a deletion (``null``), the payload replaced by NGSI-LD Null."""
    prev_by_ds = {p.get("datasetId", "@none"): p for p in previous or ()}
    items: list[Any] = []
    for inst in instances:
        shown = inst
        if null:
            member = PAYLOAD.get(inst["type"], "value")
            shown = {"type": inst["type"], member: _NULL_PAYLOAD[member]}
            if "datasetId" in inst:
                shown["datasetId"] = inst["datasetId"]
        out = render_instance(shown, ctx, View(fmt=view.fmt, lang=view.lang) if null else view)
        prev = prev_by_ds.get(inst.get("datasetId", "@none"))
        if prev is not None and view.fmt != "keyValues":
            out = _with_previous(out, inst, prev, ctx)
        items.append(out)
    return items[0] if len(items) == 1 else items


def render_data(sub: Subscription, event: ChangeEvent, fire: Fire, ctx: Context) -> dict[str, Any]:
    """The entity of one notification (an item of ``data``) in the subscription's format."""
    view = _view(sub)
    show_changes = sub.notification.show_changes and sub.notification.format != "keyValues"
    before = _attrs(event.before)
    if fire.trigger in ("entityDeleted", "attributeDeleted"):
        doc = event.doc
        types = [ctx.compact(t) for t in doc.get("type") or ()]
        item: dict[str, Any] = {
            "id": event.entity_id,
            "type": types[0] if len(types) == 1 else types,
        }
        if fire.trigger == "entityDeleted":
            item["deletedAt"] = event.at
        for iri in sorted(fire.deleted):
            if not _shown(iri, view):
                continue
            instances = _instances(before.get(iri) or (), view)
            if instances:
                prev = instances if show_changes else None
                item[ctx.compact(iri)] = _rendered_attr(instances, ctx, view, prev, null=True)
        return item
    after = event.after
    assert after is not None
    item = render_entity(dict(after), ctx, view)
    # one write fires one notification, under the first of its triggers that happened (a
    # write that creates one attribute and updates another is an attributeCreated): what else
    # it did is carried too, or it was lost. Updated attributes carry their previous values
    # (showChanges), whatever the reason; deleted ones come as NGSI-LD Null when the
    # subscription asks about deletions
    if show_changes:
        for iri in fire.updated:
            if not _shown(iri, view):
                continue
            instances = _instances(_attrs(after).get(iri) or (), view)
            if instances:
                prev = list(before.get(iri) or ())
                item[ctx.compact(iri)] = _rendered_attr(instances, ctx, view, prev, null=False)
    if fire.trigger == "entityUpdated" or "attributeDeleted" in sub.notification_trigger:
        for iri in fire.deleted:
            if not _shown(iri, view):
                continue
            instances = _instances(before.get(iri) or (), view)
            if instances:
                prev = instances if show_changes else None
                item[ctx.compact(iri)] = _rendered_attr(instances, ctx, view, prev, null=True)
    return item


def _feature(item: dict[str, Any], doc: Mapping[str, Any] | None, geometry_iri: str) -> Any:
    geometry = None if doc is None else geo.feature_geometry(_attrs(doc).get(geometry_iri))
    props = {k: v for k, v in item.items() if k != "id"}
    return {"id": item["id"], "type": "Feature", "geometry": geometry, "properties": props}


def build_notification(
    sub: Subscription,
    trigger: Trigger | None,
    data: Sequence[dict[str, Any]],
    ctx: Context,
    *,
    now: datetime | None = None,
    tenant: str = "",
    link: str | None = None,
    key: str | None = None,
    docs: Sequence[Mapping[str, Any] | None] | None = None,
    notification_id: str | None = None,
) -> OutboxItem:
    """The outbox item that delivers ``data`` (rendered entities) to the subscriber.

    ``ctx`` must be the context the data was compacted with, normally
    ``resolver.resolve(sub.notification_context)``. With ``accept: application/json`` the
    context goes in a Link header (``link``, default ``ctx.link_url``; an inline context has no
    URL of its own, so a caller that hosts one passes its URL here); with
    ``application/ld+json`` it goes in the body. ``docs`` (the stored documents behind
    ``data``) give the geometries for ``application/geo+json``. ``trigger`` is None for a
    periodic (timeInterval) or initial notification. ``key`` (default: the subscription id)
    orders deliveries: the dispatcher sends the items of one endpoint with the same key one
    after the other.
    """
    t = _now(now)
    e = sub.notification.endpoint
    body: dict[str, Any] = {
        "id": notification_id or f"urn:ngsi-ld:Notification:{uuid.uuid4()}",
        "type": "Notification",
        "subscriptionId": sub.id,
        "notifiedAt": format_ts(t),
    }
    if trigger is not None:
        body["triggerReason"] = trigger
    if e.accept == "application/geo+json":
        geometry_iri = sub.geo_q.geoproperty if sub.geo_q is not None else _LOCATION
        feature_docs = list(docs) if docs is not None else [None] * len(data)
        body["data"] = {
            "type": "FeatureCollection",
            "features": [
                _feature(item, d, geometry_iri) for item, d in zip(data, feature_docs, strict=True)
            ],
        }
    else:
        body["data"] = list(data)
    headers: dict[str, str] = {"Content-Type": e.accept}
    if e.accept == "application/ld+json":
        body["@context"] = ctx.output_context()
    else:
        headers["Link"] = link_header(link or ctx.link_url)
    if tenant:
        headers["NGSILD-Tenant"] = tenant
    return OutboxItem(
        id=body["id"],
        subscription_id=sub.id,
        endpoint=e.uri,
        payload=_addressed(sub, headers, body),
        tenant=tenant,
        key=key if key is not None else sub.id,
    )


def _addressed(
    sub: Subscription, headers: Mapping[str, str], body: Mapping[str, Any]
) -> dict[str, Any]:
    """The outbox payload of ``body``: ``headers`` (those of the content) with what the
    subscription's endpoint adds (receiverInfo, notifierInfo, timeout, cooldown)."""
    e = sub.notification.endpoint
    out = dict(headers)
    for k, v in e.receiver_info:
        out[k] = v
    payload: dict[str, Any] = {"headers": out, "body": body}
    if e.notifier_info:
        payload["notifierInfo"] = dict(e.notifier_info)
    if e.timeout_ms is not None:
        payload["timeout"] = e.timeout_ms / 1000.0
    if e.cooldown_ms is not None:
        payload["cooldown"] = e.cooldown_ms / 1000.0
    return payload


def readdressed(
    old: Subscription, new: Subscription, payload: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The endpoint and payload of a queued notification of ``old`` once the subscription is
    ``new``: its current endpoint, with its current receiverInfo, notifierInfo, timeout and
    cooldown. The content (and its media type and Link) stays as it was rendered."""
    receiver_info = {k for k, _ in old.notification.endpoint.receiver_info}
    headers = {k: v for k, v in payload["headers"].items() if k not in receiver_info}
    return new.notification.endpoint.uri, _addressed(new, headers, payload["body"])


def notification_for(
    sub: Subscription,
    event: ChangeEvent,
    fire: Fire,
    ctx: Context,
    *,
    now: datetime | None = None,
    tenant: str = "",
    link: str | None = None,
) -> OutboxItem:
    """The notification of one fired change.

    Keyed by the subscription, as the notifications of a write of several entities are: each
    entity's notifications then reach the endpoint in order, whichever kind carries them (keyed
    by the entity, a retried notification of a batch arrived after a newer one of its entity).
    """
    t = _now(now)
    if event.at is None and fire.trigger == "entityDeleted":
        event = ChangeEvent(event.entity_id, event.before, event.after, event.changed, format_ts(t))
    item = render_data(sub, event, fire, ctx)
    deleted = fire.trigger in ("entityDeleted", "attributeDeleted")
    return build_notification(
        sub,
        fire.trigger,
        [item],
        ctx,
        now=t,
        tenant=tenant,
        link=link,
        docs=[None if deleted else event.after],
    )


# --------------------------------------------------------------------------------------------
# Many subscriptions


class SubscriptionIndex:
    """The subscriptions of one tenant, indexed by the entity types they select.

    An entity can only match a selector whose type expression names one of its types, so a
    change is checked against the subscriptions indexed under its types plus those without
    entity selectors. The index remembers when each subscription last fired, for throttling.
    Not thread-safe: guard it with a lock if writers in several threads share it.
    """

    def __init__(self, subs: Iterable[Subscription] = ()) -> None:
        self._subs: dict[str, Subscription] = {}
        self._by_type: dict[str, set[str]] = {}
        self._untyped: set[str] = set()
        self._last: dict[str, str] = {}
        for sub in subs:
            self.put(sub)

    def __len__(self) -> int:
        return len(self._subs)

    def __iter__(self) -> Iterator[Subscription]:
        return iter(list(self._subs.values()))

    def get(self, sid: str) -> Subscription | None:
        return self._subs.get(sid)

    def put(self, sub: Subscription) -> None:
        """Add or replace a subscription (after a create or a PATCH)."""
        self.remove(sub.id, keep_last=True)
        self._subs[sub.id] = sub
        if not sub.entities:
            self._untyped.add(sub.id)
            return
        for sel in sub.entities:
            for iri in sel.type_iris():
                self._by_type.setdefault(iri, set()).add(sub.id)

    def remove(self, sid: str, *, keep_last: bool = False) -> None:
        old = self._subs.pop(sid, None)
        if not keep_last:
            self._last.pop(sid, None)
        if old is None:
            return
        self._untyped.discard(sid)
        for sel in old.entities:
            for iri in sel.type_iris():
                ids = self._by_type.get(iri)
                if ids is not None:
                    ids.discard(sid)
                    if not ids:
                        del self._by_type[iri]

    def candidates(self, types: Iterable[str]) -> list[Subscription]:
        ids = set(self._untyped)
        for t in types:
            ids |= self._by_type.get(t, set())
        return [self._subs[i] for i in sorted(ids)]

    def match(
        self,
        event: ChangeEvent,
        *,
        now: datetime | None = None,
        fired: set[str] | None = None,
    ) -> list[tuple[Subscription, Fire]]:
        """The subscriptions that fire for ``event`` (their fire time is recorded).

        ``fired`` carries the ids of the subscriptions that fired for the earlier changes of
        the same write (this call adds to it): throttling decides once per write, so the one
        notification a write makes holds all its entities, not only the first one's.
        """
        t = _now(now)
        stamp = format_ts(t)
        out: list[tuple[Subscription, Fire]] = []
        for sub in self.candidates(event.types):
            joins = fired is not None and sub.id in fired
            try:
                fire = evaluate(
                    sub, event, now=t, last_notified=self._last.get(sub.id), throttle=not joins
                )
            except Exception:  # a bug here must never fail the write that is being matched
                log.exception("matching subscription %s failed", sub.id)
                continue
            if fire is not None:
                if sub.throttling:
                    self._last[sub.id] = stamp
                if fired is not None:
                    fired.add(sub.id)
                out.append((sub, fire))
        return out

    def carry_over(self, old: SubscriptionIndex) -> None:
        """Keep what ``old`` (the index this one replaces) knows of when its subscriptions
        last fired, so that reloading the subscriptions does not reset their throttling."""
        for sid, stamp in old._last.items():
            if sid in self._subs:
                self._last[sid] = stamp

    def notifications(
        self,
        event: ChangeEvent,
        resolve: Callable[[Any, str], Context],
        *,
        now: datetime | None = None,
        tenant: str = "",
    ) -> list[OutboxItem]:
        """Match ``event`` and render one outbox item per firing subscription.

        ``resolve`` turns ``sub.notification_context`` into a Context (ContextResolver.resolve).
        """
        t = _now(now)
        return [
            notification_for(
                sub, event, fire, resolve(sub.notification_context, tenant), now=t, tenant=tenant
            )
            for sub, fire in self.match(event, now=t)
        ]


# --------------------------------------------------------------------------------------------
# Periodic (timeInterval) notifications: the current state, not a change


def selects(sub: Subscription, entity_id: str, doc: Mapping[str, Any]) -> bool:
    """Whether the entity, as it is now, is one the subscription selects (entities, q, geoQ,
    scopeQ), whatever changed or did not."""
    event = ChangeEvent(entity_id, doc, doc)
    return _selected(sub, event) and _filters_pass(sub, event)


def render_current(sub: Subscription, doc: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """An entity as a periodic notification shows it (the subscription's format and attrs)."""
    return render_entity(dict(doc), ctx, _view(sub))
