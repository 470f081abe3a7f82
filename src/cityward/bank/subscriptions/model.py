"""NGSI-LD subscriptions: validation of request bodies, PATCH merge, JSON and stored forms.

A :class:`Subscription` is parsed once from a request body and a :class:`~cityward.bank.jsonld.
Context`. Attribute names (``watchedAttributes``, ``notification.attributes``, ``pick``/``omit``,
``geoQ.geoproperty``) are kept as expanded IRIs. The expressions (entity ``type`` selections and
``q``) are kept as the client wrote them, together with the IRI of every term they use
(``terms``): a stored subscription can then be matched after a restart without resolving its
@context again, which may be a remote document that is no longer reachable.

Every validation error is a :class:`BadRequestData` (or :class:`OperationNotSupported` for a
valid but unsupported feature) whose ``field`` names the offending member with a dotted path,
e.g. ``notification.endpoint.uri`` or ``entities[1].idPattern``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast, get_args
from urllib.parse import unquote_to_bytes, urlsplit

from cityward.bank import geo
from cityward.bank.errors import BadRequestData, NgsiError, OperationNotSupported
from cityward.bank.jsonld import Context
from cityward.bank.model import (
    MAX_ID_BYTES,
    NGSI_NULL,
    check_attr_name,
    check_datetime,
    is_uri,
    normalize_datetime,
)
from cityward.bank.query.qlang import (
    And,
    Compare,
    Exists,
    Match,
    NotExists,
    Or,
    Path,
    QExpr,
    ScopeExpr,
    TypeAnd,
    TypeExpr,
    TypeName,
    TypeOr,
    parse_q,
    parse_scope_q,
    parse_type_expr,
    render_q,
    render_type_expr,
)
from cityward.bank.query.sqlgen import compile_pattern

__all__ = [
    "ACCEPTS",
    "DEFAULT_TRIGGERS",
    "FORMATS",
    "TRIGGERS",
    "Accept",
    "DeliveryStats",
    "Endpoint",
    "EntitySelector",
    "GeoQ",
    "NotificationFormat",
    "NotificationParams",
    "Status",
    "Subscription",
    "Trigger",
    "apply_patch",
    "format_ts",
    "parse_subscription",
    "parse_ts",
]

Trigger: TypeAlias = Literal[
    "entityCreated",
    "entityUpdated",
    "entityDeleted",
    "attributeCreated",
    "attributeUpdated",
    "attributeDeleted",
]
TRIGGERS: Final[tuple[Trigger, ...]] = get_args(Trigger)
# The spec marks this default "unconfirmed"; it is the ETSI GS CIM 009 v1.8 default.
DEFAULT_TRIGGERS: Final[tuple[Trigger, ...]] = ("attributeCreated", "attributeUpdated")
NotificationFormat: TypeAlias = Literal["normalized", "keyValues", "concise"]
FORMATS: Final[tuple[NotificationFormat, ...]] = get_args(NotificationFormat)
_FORMAT_ALIASES: Final[dict[str, NotificationFormat]] = {
    "normalized": "normalized",
    "keyValues": "keyValues",
    "simplified": "keyValues",
    "concise": "concise",
}
Accept: TypeAlias = Literal["application/json", "application/ld+json", "application/geo+json"]
ACCEPTS: Final[tuple[Accept, ...]] = get_args(Accept)
Status: TypeAlias = Literal["active", "paused", "expired"]
ENDPOINT_SCHEMES: Final = ("http", "https", "mqtt", "mqtts")
MQTT_VERSIONS: Final = ("mqtt3.1.1", "mqtt5.0")

# members that only ever appear in output; a client that sends back what it read gets them
# ignored rather than rejected
_OUTPUT_ONLY: Final = frozenset(
    {"status", "timesSent", "timesFailed", "lastNotification", "lastSuccess", "lastFailure"}
)
_SYSTEM: Final = frozenset({"createdAt", "modifiedAt"})
_TOP_MEMBERS: Final = frozenset(
    {
        "id",
        "@id",
        "type",
        "@type",
        "subscriptionName",
        "description",
        "entities",
        "watchedAttributes",
        "notificationTrigger",
        "timeInterval",
        "q",
        "geoQ",
        "scopeQ",
        "csf",
        "lang",
        "datasetId",
        "jsonldContext",
        "isActive",
        "expiresAt",
        "throttling",
        "notification",
        "@context",
    }
)
_NOTIFICATION_MEMBERS: Final = frozenset(
    {"attributes", "format", "endpoint", "showChanges", "sysAttrs", "pick", "omit"}
)
_ENDPOINT_MEMBERS: Final = frozenset(
    {"uri", "accept", "receiverInfo", "notifierInfo", "timeout", "cooldown"}
)
_GEOQ_MEMBERS: Final = frozenset({"geometry", "coordinates", "georel", "geoproperty"})
_PROJECTION_CORE: Final = frozenset({"id", "type", "scope"})
_HEADER_NAME: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_LANG: Final = re.compile(
    r"^(\*|@none|[A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*)(;q=(0(\.[0-9]{0,3})?|1(\.0{0,3})?))?$"
)
_TS_FORMAT: Final = "%Y-%m-%dT%H:%M:%S.%fZ"
# the largest throttling and timeInterval (seconds) and endpoint timeout and cooldown
# (milliseconds): larger numbers were stored and then broke every GET of the tenant's
# subscriptions (JSON has no integer past 64 bits) and the throttling arithmetic
MAX_NUMBER: Final = 10**9
# MQTT topics: at most 65,535 bytes of UTF-8 (the length prefix), and none of the code points
# Mosquitto refuses: it drops the connection, which every subscription notifying that broker
# shares, so their notifications were lost while reported sent
MAX_TOPIC_BYTES: Final = 65535
_TOPIC_REFUSED: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p << 16 | 0xFFFE)}{chr(p << 16 | 0xFFFF)}" for p in range(1, 17))
    + "]"
)
# what an HTTP header value may hold (RFC 9110 field-value: VCHAR, obs-text, SP, HTAB): the
# request head goes out as Latin-1, and anything else failed every delivery
_HEADER_VALUE: Final = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


def format_ts(t: datetime) -> str:
    """A datetime as the stored fixed-width UTC form ``YYYY-MM-DDThh:mm:ss.ffffffZ``."""
    return t.astimezone(UTC).strftime(_TS_FORMAT)


def parse_ts(text: str) -> datetime:
    """The inverse of :func:`format_ts`; also takes any validated NGSI-LD DateTime.

    >>> parse_ts("2024-01-01T10:00:00Z")
    datetime.datetime(2024, 1, 1, 10, 0, tzinfo=datetime.timezone.utc)
    """
    return datetime.strptime(normalize_datetime(text), _TS_FORMAT).replace(tzinfo=UTC)


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


# --------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True)
class EntitySelector:
    """One item of ``entities``: a type selection plus an optional id or id pattern."""

    type: str  # the type expression as written, e.g. "Vehicle" or "(A;B)|C"
    terms: Mapping[str, str]  # every type name in it -> its expanded IRI
    id: str | None = None
    id_pattern: str | None = None

    @property
    def type_expr(self) -> TypeExpr:
        return _cached_type_expr(self.type)

    def type_iris(self) -> frozenset[str]:
        """Every type IRI named by the selection (an entity must have one of them to match)."""
        return frozenset(self.terms[n] for n in _type_names(self.type_expr))

    def matches_id(self, entity_id: str) -> bool:
        if self.id is not None:
            return entity_id == self.id
        if self.id_pattern is not None:
            return compile_pattern(self.id_pattern).search(entity_id) is not None
        return True


@dataclass(frozen=True)
class GeoQ:
    """``geoQ``: the members as given, the geo-property IRI and the parsed query."""

    georel: str
    geometry: str
    coordinates: Any  # the JSON array (or JSON text) as given
    geoproperty: str  # expanded IRI
    query: geo.GeoQuery = field(compare=False, repr=False)


@dataclass(frozen=True)
class Endpoint:
    """``notification.endpoint``: where and how notifications are delivered."""

    uri: str
    accept: Accept = "application/json"
    receiver_info: tuple[tuple[str, str], ...] = ()
    notifier_info: tuple[tuple[str, str], ...] = ()
    timeout_ms: float | None = None  # per-request timeout asked by the subscriber
    cooldown_ms: float | None = None  # minimum wait after a failure, asked by the subscriber

    @property
    def scheme(self) -> str:
        return self.uri.split(":", 1)[0].lower()

    def notifier(self, key: str) -> str | None:
        for k, v in self.notifier_info:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class NotificationParams:
    """``notification``: what a notification holds and where it goes."""

    endpoint: Endpoint
    attributes: tuple[str, ...] | None = None  # expanded IRIs; None: all attributes
    format: NotificationFormat = "normalized"
    show_changes: bool = False
    sys_attrs: bool = False
    pick: tuple[str, ...] | None = None  # "id" / "type" / "scope" or expanded attribute IRIs
    omit: tuple[str, ...] | None = None


@dataclass
class DeliveryStats:
    """The delivery counters and times shown with a subscription (mutable, output only)."""

    times_sent: int = 0
    times_failed: int = 0
    last_notification: str | None = None
    last_success: str | None = None
    last_failure: str | None = None

    @property
    def status(self) -> Literal["ok", "failed"]:
        """``notification.status``: failed when the last attempt failed."""
        if self.last_failure is not None and (
            self.last_success is None or self.last_failure > self.last_success
        ):
            return "failed"
        return "ok"

    def record(self, ok: bool, at: str) -> None:
        """Count one delivery attempt (``at`` in the stored timestamp form)."""
        self.times_sent += 1
        self.last_notification = at
        if ok:
            self.last_success = at
        else:
            self.times_failed += 1
            self.last_failure = at

    def to_dict(self) -> dict[str, Any]:
        return {
            "timesSent": self.times_sent,
            "timesFailed": self.times_failed,
            "lastNotification": self.last_notification,
            "lastSuccess": self.last_success,
            "lastFailure": self.last_failure,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeliveryStats:
        return cls(
            times_sent=int(d.get("timesSent", 0)),
            times_failed=int(d.get("timesFailed", 0)),
            last_notification=d.get("lastNotification"),
            last_success=d.get("lastSuccess"),
            last_failure=d.get("lastFailure"),
        )


@dataclass(frozen=True)
class Subscription:
    """A validated NGSI-LD subscription (configuration) plus its delivery statistics."""

    id: str
    notification: NotificationParams
    entities: tuple[EntitySelector, ...] = ()
    watched_attributes: tuple[str, ...] | None = None  # expanded IRIs
    notification_trigger: tuple[Trigger, ...] = DEFAULT_TRIGGERS
    q: str | None = None
    q_terms: Mapping[str, str] = field(default_factory=dict)  # q attribute names -> IRIs
    geo_q: GeoQ | None = None
    scope_q: str | None = None
    csf: str | None = None  # kept and shown; there are no context sources to filter
    lang: str | None = None
    dataset_id: tuple[str, ...] | None = None
    jsonld_context: str | None = None  # URI of the @context for notifications
    # the @context of the creating request (Context.source; None = core): notifications are
    # compacted with it unless jsonld_context names another
    context: Any = None
    subscription_name: str | None = None
    description: str | None = None
    time_interval: float | None = None  # seconds
    throttling: float | None = None  # seconds
    expires_at: str | None = None  # stored timestamp form
    is_active: bool = True
    created_at: str | None = None
    modified_at: str | None = None
    # the purposes of whoever created or last changed it: notifications carry only entities
    # those purposes may read (None: no restriction, e.g. created without governance)
    owner_purposes: tuple[str, ...] | None = None
    # the subject of the token that created it: only its owner (and admins) may see and
    # change it. None: created before owners were recorded, or without authentication
    # (--no-auth); such a subscription is managed by admins only. Never taken from a body.
    owner: str | None = None
    stats: DeliveryStats = field(default_factory=DeliveryStats, compare=False)

    # -- derived ----------------------------------------------------------------------------
    @property
    def q_expr(self) -> QExpr | None:
        return None if self.q is None else _cached_q(self.q)

    @property
    def scope_expr(self) -> ScopeExpr | None:
        return None if self.scope_q is None else _cached_scope(self.scope_q)

    def expand_q(self, name: str) -> str:
        """The IRI of an attribute name used in ``q`` (as expanded when it was parsed)."""
        return self.q_terms.get(name, name)

    @property
    def notification_context(self) -> Any:
        """The @context value (for ContextResolver.resolve) that notifications are compacted
        with: ``jsonldContext`` when given, else the creating request's context."""
        return self.jsonld_context if self.jsonld_context is not None else self.context

    def status(self, now: datetime | None = None) -> Status:
        """``expired`` once expiresAt has passed, else ``paused`` when not active."""
        if self.expires_at is not None and parse_ts(self.expires_at) <= _now(now):
            return "expired"
        return "active" if self.is_active else "paused"

    def is_live(self, now: datetime | None = None) -> bool:
        return self.status(now) == "active"

    # -- output -----------------------------------------------------------------------------
    def to_json(
        self, ctx: Context, *, now: datetime | None = None, sys_attrs: bool = False
    ) -> dict[str, Any]:
        """The subscription as GET returns it (no @context), names compacted with ``ctx``."""
        c = ctx.compact
        out: dict[str, Any] = {"id": self.id, "type": "Subscription"}
        if self.subscription_name is not None:
            out["subscriptionName"] = self.subscription_name
        if self.description is not None:
            out["description"] = self.description
        if self.entities:
            items = []
            for sel in self.entities:
                item: dict[str, Any] = {}
                if sel.id is not None:
                    item["id"] = sel.id
                if sel.id_pattern is not None:
                    item["idPattern"] = sel.id_pattern
                item["type"] = _compact_type_expr(sel, c)
                items.append(item)
            out["entities"] = items
        if self.watched_attributes is not None:
            out["watchedAttributes"] = [c(a) for a in self.watched_attributes]
        out["notificationTrigger"] = list(self.notification_trigger)
        if self.time_interval is not None:
            out["timeInterval"] = _number_out(self.time_interval)
        if self.q is not None:
            out["q"] = _compact_q(self, c)
        if self.geo_q is not None:
            g = self.geo_q
            out["geoQ"] = {
                "geometry": g.geometry,
                "coordinates": g.coordinates,
                "georel": g.georel,
                "geoproperty": c(g.geoproperty),
            }
        if self.scope_q is not None:
            out["scopeQ"] = self.scope_q
        if self.csf is not None:
            out["csf"] = self.csf
        if self.lang is not None:
            out["lang"] = self.lang
        if self.dataset_id is not None:
            out["datasetId"] = list(self.dataset_id)
        if self.jsonld_context is not None:
            out["jsonldContext"] = self.jsonld_context
        out["isActive"] = self.is_active
        if self.expires_at is not None:
            out["expiresAt"] = self.expires_at
        if self.throttling is not None:
            out["throttling"] = _number_out(self.throttling)
        out["notification"] = _notification_json(self.notification, self.stats, c)
        out["status"] = self.status(now)
        if sys_attrs:
            if self.created_at is not None:
                out["createdAt"] = self.created_at
            if self.modified_at is not None:
                out["modifiedAt"] = self.modified_at
        return out

    # -- persistence ------------------------------------------------------------------------
    def to_stored(self) -> dict[str, Any]:
        """A JSON-serializable form for the database (expanded; see :meth:`from_stored`)."""
        n = self.notification
        e = n.endpoint
        return {
            "v": 1,
            "id": self.id,
            "entities": [
                {"type": s.type, "terms": dict(s.terms), "id": s.id, "idPattern": s.id_pattern}
                for s in self.entities
            ],
            "watchedAttributes": _list_or_none(self.watched_attributes),
            "notificationTrigger": list(self.notification_trigger),
            "q": self.q,
            "qTerms": dict(self.q_terms),
            "geoQ": None
            if self.geo_q is None
            else {
                "georel": self.geo_q.georel,
                "geometry": self.geo_q.geometry,
                "coordinates": self.geo_q.coordinates,
                "geoproperty": self.geo_q.geoproperty,
            },
            "scopeQ": self.scope_q,
            "csf": self.csf,
            "lang": self.lang,
            "datasetId": _list_or_none(self.dataset_id),
            "jsonldContext": self.jsonld_context,
            "context": self.context,
            "subscriptionName": self.subscription_name,
            "description": self.description,
            "timeInterval": self.time_interval,
            "throttling": self.throttling,
            "expiresAt": self.expires_at,
            "isActive": self.is_active,
            "createdAt": self.created_at,
            "modifiedAt": self.modified_at,
            "ownerPurposes": _list_or_none(self.owner_purposes),
            "owner": self.owner,
            "notification": {
                "attributes": _list_or_none(n.attributes),
                "format": n.format,
                "showChanges": n.show_changes,
                "sysAttrs": n.sys_attrs,
                "pick": _list_or_none(n.pick),
                "omit": _list_or_none(n.omit),
                "endpoint": {
                    "uri": e.uri,
                    "accept": e.accept,
                    "receiverInfo": [list(kv) for kv in e.receiver_info],
                    "notifierInfo": [list(kv) for kv in e.notifier_info],
                    "timeout": e.timeout_ms,
                    "cooldown": e.cooldown_ms,
                },
            },
            "stats": self.stats.to_dict(),
        }

    @classmethod
    def from_stored(cls, d: Mapping[str, Any]) -> Subscription:
        """Rebuild a subscription from :meth:`to_stored` output (trusted: no re-validation)."""
        n = d["notification"]
        e = n["endpoint"]
        geo_q = None
        if d.get("geoQ") is not None:
            g = d["geoQ"]
            query = geo.parse_geoquery(g["georel"], g["geometry"], g["coordinates"], None)
            assert query is not None
            geo_q = GeoQ(g["georel"], g["geometry"], g["coordinates"], g["geoproperty"], query)
        return cls(
            id=d["id"],
            entities=tuple(
                EntitySelector(s["type"], dict(s["terms"]), s.get("id"), s.get("idPattern"))
                for s in d.get("entities") or ()
            ),
            watched_attributes=_tuple_or_none(d.get("watchedAttributes")),
            notification_trigger=tuple(d["notificationTrigger"]),
            q=d.get("q"),
            q_terms=dict(d.get("qTerms") or {}),
            geo_q=geo_q,
            scope_q=d.get("scopeQ"),
            csf=d.get("csf"),
            lang=d.get("lang"),
            dataset_id=_tuple_or_none(d.get("datasetId")),
            jsonld_context=d.get("jsonldContext"),
            context=d.get("context"),
            subscription_name=d.get("subscriptionName"),
            description=d.get("description"),
            time_interval=d.get("timeInterval"),
            throttling=d.get("throttling"),
            expires_at=d.get("expiresAt"),
            is_active=bool(d.get("isActive", True)),
            created_at=d.get("createdAt"),
            modified_at=d.get("modifiedAt"),
            owner_purposes=_tuple_or_none(d.get("ownerPurposes")),
            owner=d.get("owner"),
            notification=NotificationParams(
                endpoint=Endpoint(
                    uri=e["uri"],
                    accept=e.get("accept", "application/json"),
                    receiver_info=tuple((k, v) for k, v in e.get("receiverInfo") or ()),
                    notifier_info=tuple((k, v) for k, v in e.get("notifierInfo") or ()),
                    timeout_ms=e.get("timeout"),
                    cooldown_ms=e.get("cooldown"),
                ),
                attributes=_tuple_or_none(n.get("attributes")),
                format=n.get("format", "normalized"),
                show_changes=bool(n.get("showChanges", False)),
                sys_attrs=bool(n.get("sysAttrs", False)),
                pick=_tuple_or_none(n.get("pick")),
                omit=_tuple_or_none(n.get("omit")),
            ),
            stats=DeliveryStats.from_dict(d.get("stats") or {}),
        )


def _list_or_none(t: tuple[str, ...] | None) -> list[str] | None:
    return None if t is None else list(t)


def _tuple_or_none(v: Any) -> tuple[str, ...] | None:
    return None if v is None else tuple(v)


def _number_out(v: float) -> int | float:
    # a float past 2**53 stays one: an integer past 64 bits cannot be written as JSON (rows
    # stored before MAX_NUMBER bounded the input hold such numbers)
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else v


def _notification_json(
    n: NotificationParams, stats: DeliveryStats, c: Callable[[str], str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if n.attributes is not None:
        out["attributes"] = [c(a) for a in n.attributes]
    if n.pick is not None:
        out["pick"] = [a if a in _PROJECTION_CORE else c(a) for a in n.pick]
    if n.omit is not None:
        out["omit"] = [a if a in _PROJECTION_CORE else c(a) for a in n.omit]
    out["format"] = n.format
    if n.show_changes:
        out["showChanges"] = True
    if n.sys_attrs:
        out["sysAttrs"] = True
    e = n.endpoint
    endpoint: dict[str, Any] = {"uri": e.uri, "accept": e.accept}
    if e.receiver_info:
        endpoint["receiverInfo"] = [{"key": k, "value": v} for k, v in e.receiver_info]
    if e.notifier_info:
        endpoint["notifierInfo"] = [{"key": k, "value": v} for k, v in e.notifier_info]
    if e.timeout_ms is not None:
        endpoint["timeout"] = _number_out(e.timeout_ms)
    if e.cooldown_ms is not None:
        endpoint["cooldown"] = _number_out(e.cooldown_ms)
    out["endpoint"] = endpoint
    out["status"] = stats.status
    out["timesSent"] = stats.times_sent
    if stats.times_failed:
        out["timesFailed"] = stats.times_failed
    for key, value in (
        ("lastNotification", stats.last_notification),
        ("lastSuccess", stats.last_success),
        ("lastFailure", stats.last_failure),
    ):
        if value is not None:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Expressions: parsed once per text, names walked for expansion and compaction

_T = TypeVar("_T")
_Q_CACHE: dict[str, QExpr] = {}
_TYPE_CACHE: dict[str, TypeExpr] = {}
_SCOPE_CACHE: dict[str, ScopeExpr] = {}


def _cached(cache: dict[str, _T], parse: Callable[[str], _T], text: str) -> _T:
    hit = cache.get(text)
    if hit is None:
        hit = parse(text)
        if len(cache) < 10_000:
            cache[text] = hit
    return hit


def _cached_q(text: str) -> QExpr:
    return _cached(_Q_CACHE, parse_q, text)


def _cached_type_expr(text: str) -> TypeExpr:
    return _cached(_TYPE_CACHE, parse_type_expr, text)


def _cached_scope(text: str) -> ScopeExpr:
    return _cached(_SCOPE_CACHE, parse_scope_q, text)


def _type_names(expr: TypeExpr) -> Iterator[str]:
    if isinstance(expr, TypeName):
        yield expr.name
    else:
        for item in expr.items:
            yield from _type_names(item)


def _map_type_expr(expr: TypeExpr, fn: Callable[[str], str]) -> TypeExpr:
    if isinstance(expr, TypeName):
        return TypeName(fn(expr.name))
    items = tuple(_map_type_expr(i, fn) for i in expr.items)
    return TypeAnd(items) if isinstance(expr, TypeAnd) else TypeOr(items)


def _q_names(expr: QExpr) -> Iterator[str]:
    if isinstance(expr, And | Or):
        for item in expr.items:
            yield from _q_names(item)
    else:
        yield expr.path.attr
        yield from expr.path.subs


def _map_q(expr: QExpr, fn: Callable[[str], str]) -> QExpr:
    if isinstance(expr, And):
        return And(tuple(_map_q(i, fn) for i in expr.items))
    if isinstance(expr, Or):
        return Or(tuple(_map_q(i, fn) for i in expr.items))
    p = expr.path
    path = Path(fn(p.attr), tuple(fn(s) for s in p.subs), p.meta, p.member)
    if isinstance(expr, Exists):
        return Exists(path)
    if isinstance(expr, NotExists):
        return NotExists(path)
    if isinstance(expr, Match):
        return Match(path, expr.pattern, expr.negated)
    return Compare(path, expr.op, expr.value)


def _compact_type_expr(sel: EntitySelector, c: Callable[[str], str]) -> str:
    expr = sel.type_expr
    if all(c(sel.terms[n]) == n for n in _type_names(expr)):
        return sel.type  # the names read the same: keep the text as the client wrote it
    return render_type_expr(_map_type_expr(expr, lambda n: c(sel.terms[n])))


def _compact_q(sub: Subscription, c: Callable[[str], str]) -> str:
    assert sub.q is not None
    expr = sub.q_expr
    assert expr is not None
    if all(c(sub.expand_q(n)) == n for n in _q_names(expr)):
        return sub.q
    text = render_q(_map_q(expr, lambda n: c(sub.expand_q(n))))
    try:
        parse_q(text)  # an IRI with a dot in its path cannot be written in q: keep the original
    except NgsiError:
        return sub.q
    return text


# --------------------------------------------------------------------------------------------
# Parsing


def parse_subscription(
    body: object,
    ctx: Context,
    *,
    now: datetime | None = None,
    new_id: Callable[[], str] | None = None,
) -> Subscription:
    """Validate a POST /subscriptions body; names are expanded with ``ctx``.

    ``id`` is generated (``urn:ngsi-ld:Subscription:<uuid4>``) when absent. ``now`` is the
    clock for the expiresAt check and the system timestamps.
    """
    if not isinstance(body, dict):
        raise BadRequestData("a subscription must be a JSON object", field="body")
    if not body:
        raise BadRequestData("a subscription must not be empty", field="body")
    p = _Parser(ctx, _now(now))
    _check_members(body, _TOP_MEMBERS, "")
    raw_id = body.get("id", body.get("@id"))
    if raw_id is None:
        sid = new_id() if new_id is not None else f"urn:ngsi-ld:Subscription:{uuid.uuid4()}"
    else:
        sid = p.uri(raw_id, "id")
        # the limit entities have: PostgreSQL's index cannot take much more (a 400 naming
        # "entity" there, while SQLite stored it)
        if len(sid.encode()) > MAX_ID_BYTES:
            raise BadRequestData(
                f"a subscription id is at most {MAX_ID_BYTES} bytes (UTF-8)", field="id"
            )
    p.check_type(body)
    if "notification" not in body:
        raise BadRequestData("a subscription needs a notification member", field="notification")
    stamp = format_ts(p.now)
    values: dict[str, Any] = {"id": sid, "created_at": stamp, "modified_at": stamp}
    for key, value in body.items():
        if key in ("id", "@id", "type", "@type", "@context"):
            continue
        values.update(p.member(key, value, None))
    values["context"] = ctx.source
    sub = Subscription(**values)
    _check_combination(sub, body)
    return sub


def apply_patch(
    sub: Subscription, fragment: object, ctx: Context, *, now: datetime | None = None
) -> Subscription:
    """PATCH /subscriptions/{id}: the fragment's members replace the stored ones.

    ``notification`` is merged one level deep (its members replace the stored ones; its
    ``endpoint`` is replaced whole). ``null`` (or NGSI-LD Null) removes an optional member and
    is a 400 on a mandatory one. Attribute names are expanded with ``ctx``, the context of the
    PATCH request. The statistics and createdAt are kept.
    """
    if not isinstance(fragment, dict):
        raise BadRequestData("a subscription fragment must be a JSON object", field="body")
    if not fragment:
        raise BadRequestData("a subscription fragment must not be empty", field="body")
    p = _Parser(ctx, _now(now))
    _check_members(fragment, _TOP_MEMBERS, "")
    raw_id = fragment.get("id", fragment.get("@id"))
    if raw_id is not None and raw_id != sub.id:
        raise BadRequestData(
            f"the fragment's id {raw_id!r} differs from the subscription's id {sub.id}", field="id"
        )
    if "type" in fragment or "@type" in fragment:
        p.check_type(fragment)
    values: dict[str, Any] = {}
    for key, value in fragment.items():
        if key in ("id", "@id", "type", "@type", "@context"):
            continue
        if key == "notification":
            values["notification"] = p.notification(value, sub.notification)
            continue
        if _is_null(value):
            values.update(_clear(key))
            continue
        values.update(p.member(key, value, sub))
    values["modified_at"] = format_ts(p.now)
    stats = dataclasses.replace(sub.stats)
    new = dataclasses.replace(sub, **values, stats=stats)
    _check_combination(new, fragment)
    return new


def _is_null(value: object) -> bool:
    return value is None or value == NGSI_NULL


_CLEARABLE: Final[dict[str, dict[str, Any]]] = {
    "subscriptionName": {"subscription_name": None},
    "description": {"description": None},
    "entities": {"entities": ()},
    "watchedAttributes": {"watched_attributes": None},
    "notificationTrigger": {"notification_trigger": DEFAULT_TRIGGERS},
    "timeInterval": {"time_interval": None},
    "q": {"q": None, "q_terms": {}},
    "geoQ": {"geo_q": None},
    "scopeQ": {"scope_q": None},
    "csf": {"csf": None},
    "lang": {"lang": None},
    "datasetId": {"dataset_id": None},
    "jsonldContext": {"jsonld_context": None},
    "expiresAt": {"expires_at": None},
    "throttling": {"throttling": None},
    "isActive": {"is_active": True},
}


def _clear(key: str) -> dict[str, Any]:
    if key in _OUTPUT_ONLY or key in _SYSTEM:
        return {}
    if key not in _CLEARABLE:
        raise BadRequestData(f"{key} is mandatory and cannot be removed", field=key)
    return dict(_CLEARABLE[key])


def _check_members(obj: Mapping[str, Any], allowed: frozenset[str], prefix: str) -> None:
    for key in obj:
        if key in allowed or key in _OUTPUT_ONLY or key in _SYSTEM:
            continue
        name = prefix + key
        if key in ("join", "joinLevel"):
            raise OperationNotSupported(f"{name} (linked entities) is not supported", field=name)
        raise BadRequestData(f"unknown member {name!r}", field=name)


def _check_combination(sub: Subscription, body: Mapping[str, Any]) -> None:
    """Rules that tie members together; checked after a create and after every PATCH."""
    if not sub.entities and sub.watched_attributes is None:
        raise BadRequestData("a subscription needs entities or watchedAttributes", field="entities")
    if sub.time_interval is not None:
        blame = "timeInterval" if "timeInterval" in body else None
        if sub.watched_attributes is not None:
            raise BadRequestData(
                "timeInterval cannot be combined with watchedAttributes",
                field=blame or "watchedAttributes",
            )
        if sub.throttling is not None:
            raise BadRequestData(
                "timeInterval cannot be combined with throttling", field=blame or "throttling"
            )
        if not sub.entities:
            raise BadRequestData("a periodic subscription needs entities", field="entities")
    n = sub.notification
    if n.show_changes and n.format == "keyValues":
        raise BadRequestData(
            "showChanges cannot be combined with the keyValues (simplified) format",
            field="notification.showChanges",
        )
    if n.attributes is not None and (n.pick is not None or n.omit is not None):
        raise BadRequestData(
            "notification.attributes cannot be combined with pick or omit",
            field="notification.attributes",
        )
    if n.pick is not None and n.omit is not None and set(n.pick) & set(n.omit):
        raise BadRequestData(
            "the same member cannot be in both pick and omit", field="notification.omit"
        )


class _Parser:
    """Member-by-member validation; each method returns dataclass field values."""

    def __init__(self, ctx: Context, now: datetime) -> None:
        self.ctx = ctx
        self.now = now

    # -- primitives -------------------------------------------------------------------------
    @staticmethod
    def uri(value: object, f: str) -> str:
        if not is_uri(value):
            raise BadRequestData(f"{f} must be an absolute URI, got {value!r}", field=f)
        assert isinstance(value, str)
        return value

    @staticmethod
    def string(value: object, f: str) -> str:
        if not isinstance(value, str):
            raise BadRequestData(f"{f} must be a string", field=f)
        return value

    @staticmethod
    def boolean(value: object, f: str) -> bool:
        if not isinstance(value, bool):
            raise BadRequestData(f"{f} must be true or false", field=f)
        return value

    @staticmethod
    def number(value: object, f: str, *, positive: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequestData(f"{f} must be a number", field=f)
        if isinstance(value, float) and not math.isfinite(value):
            raise BadRequestData(f"{f} must be a finite number, got {value}", field=f)
        if positive and value <= 0:
            raise BadRequestData(f"{f} must be greater than 0, got {value}", field=f)
        if value < 0:
            raise BadRequestData(f"{f} must not be negative, got {value}", field=f)
        if value > MAX_NUMBER:
            raise BadRequestData(f"{f} must be at most {MAX_NUMBER:,}, got {value}", field=f)
        return float(value)

    def names(self, value: object, f: str) -> tuple[str, ...]:
        """A non-empty array of attribute names, expanded (duplicates dropped)."""
        if not isinstance(value, list) or not value:
            raise BadRequestData(f"{f} must be a non-empty array of attribute names", field=f)
        out: list[str] = []
        for i, name in enumerate(value):
            if not isinstance(name, str):
                raise BadRequestData(f"{f} must hold attribute names (strings)", field=f)
            check_attr_name(name, f"{f}[{i}]")
            out.append(self.ctx.expand(name))
        return tuple(dict.fromkeys(out))

    @staticmethod
    def check_type(body: Mapping[str, Any]) -> None:
        t = body.get("type", body.get("@type"))
        if t is None:
            raise BadRequestData('a subscription needs "type": "Subscription"', field="type")
        if t != "Subscription":
            raise BadRequestData(f'type must be "Subscription", got {t!r}', field="type")

    # -- members ----------------------------------------------------------------------------
    def member(self, key: str, value: object, old: Subscription | None) -> dict[str, Any]:
        if key in _OUTPUT_ONLY or key in _SYSTEM:
            return {}
        if key == "notification":
            return {"notification": self.notification(value, None)}
        if value is None:
            raise BadRequestData(f"{key} must not be null", field=key)
        if key == "subscriptionName":
            return {"subscription_name": self.string(value, key)}
        if key == "description":
            return {"description": self.string(value, key)}
        if key == "entities":
            return {"entities": self.entities(value)}
        if key == "watchedAttributes":
            return {"watched_attributes": self.names(value, key)}
        if key == "notificationTrigger":
            return {"notification_trigger": self.triggers(value)}
        if key == "timeInterval":
            return {"time_interval": self.number(value, key, positive=True)}
        if key == "throttling":
            return {"throttling": self.number(value, key, positive=False)}
        if key == "q":
            return self.q(value)
        if key == "geoQ":
            return {"geo_q": self.geo_q(value)}
        if key == "scopeQ":
            text = self.string(value, key)
            parse_scope_q(text)  # errors have field="scopeQ"
            return {"scope_q": text}
        if key == "csf":
            return {"csf": self.string(value, key)}
        if key == "lang":
            return {"lang": self.lang(value)}
        if key == "datasetId":
            return {"dataset_id": self.dataset_ids(value)}
        if key == "jsonldContext":
            return {"jsonld_context": self.uri(value, key)}
        if key == "isActive":
            return {"is_active": self.boolean(value, key)}
        if key == "expiresAt":
            return {"expires_at": self.expires_at(value)}
        raise BadRequestData(f"unknown member {key!r}", field=key)  # pragma: no cover

    def entities(self, value: object) -> tuple[EntitySelector, ...]:
        if not isinstance(value, list) or not value:
            raise BadRequestData("entities must be a non-empty array", field="entities")
        out: list[EntitySelector] = []
        for i, sel in enumerate(value):
            f = f"entities[{i}]"
            if not isinstance(sel, dict):
                raise BadRequestData(f"{f} must be an object", field=f)
            for key in sel:
                if key not in ("id", "@id", "idPattern", "type", "@type"):
                    raise BadRequestData(f"unknown member {f}.{key}", field=f"{f}.{key}")
            t = sel.get("type", sel.get("@type"))
            if t is None:
                raise BadRequestData(f"{f} needs a type", field=f"{f}.type")
            if not isinstance(t, str) or not t:
                raise BadRequestData(f"{f}.type must be a non-empty string", field=f"{f}.type")
            try:
                expr = _cached_type_expr(t)
            except BadRequestData as exc:
                raise BadRequestData(exc.detail, field=f"{f}.type") from exc
            terms = {n: self.ctx.expand(n) for n in _type_names(expr)}
            sid = sel.get("id", sel.get("@id"))
            if sid is not None:
                sid = self.uri(sid, f"{f}.id")
            pattern = sel.get("idPattern")
            if pattern is not None:
                if not isinstance(pattern, str):
                    raise BadRequestData(f"{f}.idPattern must be a string", field=f"{f}.idPattern")
                try:
                    compile_pattern(pattern)
                except re.error as exc:
                    raise BadRequestData(
                        f"{f}.idPattern is not a valid regular expression: {exc}",
                        field=f"{f}.idPattern",
                    ) from exc
                if sid is not None:
                    pattern = None  # id wins over idPattern
            out.append(EntitySelector(t, terms, sid, pattern))
        return tuple(out)

    def triggers(self, value: object) -> tuple[Trigger, ...]:
        f = "notificationTrigger"
        if not isinstance(value, list) or not value:
            raise BadRequestData(f"{f} must be a non-empty array", field=f)
        for t in value:
            if t not in TRIGGERS:
                raise BadRequestData(
                    f"unknown notification trigger {t!r}; expected one of {', '.join(TRIGGERS)}",
                    field=f,
                )
        return tuple(dict.fromkeys(cast(list[Trigger], value)))

    def q(self, value: object) -> dict[str, Any]:
        text = self.string(value, "q")
        expr = _cached_q(text)  # errors have field="q"
        return {"q": text, "q_terms": {n: self.ctx.expand(n) for n in _q_names(expr)}}

    def geo_q(self, value: object) -> GeoQ:
        if not isinstance(value, dict):
            raise BadRequestData("geoQ must be an object", field="geoQ")
        _check_members(value, _GEOQ_MEMBERS, "geoQ.")
        for key in ("georel", "geometry", "coordinates"):
            if value.get(key) is None:
                raise BadRequestData(f"geoQ needs {key}", field=f"geoQ.{key}")
        prop = value.get("geoproperty")
        try:
            query = geo.parse_geoquery(
                value["georel"], value["geometry"], value["coordinates"], prop
            )
        except BadRequestData as exc:
            raise BadRequestData(exc.detail, field=f"geoQ.{exc.field}") from exc
        assert query is not None
        if prop is not None:
            check_attr_name(query.geoproperty, "geoQ.geoproperty")
        return GeoQ(
            georel=value["georel"],
            geometry=value["geometry"],
            coordinates=value["coordinates"],
            geoproperty=self.ctx.expand(query.geoproperty),
            query=query,
        )

    @staticmethod
    def lang(value: object) -> str:
        if not isinstance(value, str) or not value:
            raise BadRequestData("lang must be a non-empty string", field="lang")
        for part in value.split(","):
            if _LANG.match(part.strip()) is None:
                raise BadRequestData(f"lang {value!r} is not a language tag list", field="lang")
        return value

    def dataset_ids(self, value: object) -> tuple[str, ...]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise BadRequestData("datasetId must not be empty", field="datasetId")
        for d in items:
            if d != "@none":
                self.uri(d, "datasetId")
        return tuple(dict.fromkeys(cast(list[str], items)))

    def expires_at(self, value: object) -> str:
        text = normalize_datetime(check_datetime(value, "expiresAt"))
        if parse_ts(text) <= self.now:
            raise BadRequestData(f"expiresAt {value} is in the past", field="expiresAt")
        return text

    # -- notification -----------------------------------------------------------------------
    def notification(self, value: object, old: NotificationParams | None) -> NotificationParams:
        f = "notification"
        if not isinstance(value, dict):
            raise BadRequestData(f"{f} must be an object", field=f)
        _check_members(value, _NOTIFICATION_MEMBERS, "notification.")
        if old is None:
            if "endpoint" not in value:
                raise BadRequestData(f"{f} needs an endpoint", field="notification.endpoint")
            base = NotificationParams(endpoint=self.endpoint(value["endpoint"]))
        else:
            base = old
        changes: dict[str, Any] = {}
        for key, v in value.items():
            name = f"{f}.{key}"
            if key in _OUTPUT_ONLY:
                continue
            if key == "endpoint":
                if old is not None:
                    changes["endpoint"] = self.endpoint(v)
                continue
            if v is None or v == NGSI_NULL:
                changes[_NOTIFICATION_FIELDS[key]] = _NOTIFICATION_DEFAULTS[key]
                continue
            if key == "attributes":
                changes["attributes"] = self.names(v, name)
            elif key == "format":
                if not isinstance(v, str) or v not in _FORMAT_ALIASES:
                    raise BadRequestData(
                        f"{name} must be normalized, keyValues, simplified or concise, got {v!r}",
                        field=name,
                    )
                changes["format"] = _FORMAT_ALIASES[v]
            elif key == "showChanges":
                changes["show_changes"] = self.boolean(v, name)
            elif key == "sysAttrs":
                changes["sys_attrs"] = self.boolean(v, name)
            elif key in ("pick", "omit"):
                changes[key] = self.projection(v, name)
        return dataclasses.replace(base, **changes)

    def projection(self, value: object, f: str) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise BadRequestData(f"{f} must be a non-empty array of names", field=f)
        out: list[str] = []
        for i, name in enumerate(items):
            if not isinstance(name, str) or not name:
                raise BadRequestData(f"{f} must hold member names (strings)", field=f)
            if name in _PROJECTION_CORE:
                out.append(name)
                continue
            check_attr_name(name, f"{f}[{i}]")
            out.append(self.ctx.expand(name))
        return tuple(dict.fromkeys(out))

    def endpoint(self, value: object) -> Endpoint:
        f = "notification.endpoint"
        if not isinstance(value, dict):
            raise BadRequestData(f"{f} must be an object", field=f)
        _check_members(value, _ENDPOINT_MEMBERS, f"{f}.")
        uri = value.get("uri")
        if uri is None:
            raise BadRequestData(f"{f} needs a uri", field=f"{f}.uri")
        uri = _endpoint_uri(uri)
        accept = value.get("accept", "application/json")
        if accept not in ACCEPTS:
            raise BadRequestData(
                f"{f}.accept must be one of {', '.join(ACCEPTS)}, got {accept!r}",
                field=f"{f}.accept",
            )
        http = uri.split(":", 1)[0].lower() in ("http", "https")
        receiver = self.key_values(
            value.get("receiverInfo"), f"{f}.receiverInfo", header=True, http=http
        )
        notifier = self.key_values(value.get("notifierInfo"), f"{f}.notifierInfo", header=False)
        for k, v in notifier:
            if k == "MQTT-Version" and v not in MQTT_VERSIONS:
                raise BadRequestData(
                    f"MQTT-Version must be {' or '.join(MQTT_VERSIONS)}, got {v!r}",
                    field=f"{f}.notifierInfo",
                )
            if k == "MQTT-QoS" and v not in ("0", "1", "2"):
                raise BadRequestData(
                    f"MQTT-QoS must be 0, 1 or 2, got {v!r}", field=f"{f}.notifierInfo"
                )
        timeout = value.get("timeout")
        cooldown = value.get("cooldown")
        return Endpoint(
            uri=uri,
            accept=cast(Accept, accept),
            receiver_info=receiver,
            notifier_info=notifier,
            timeout_ms=None
            if timeout is None
            else self.number(timeout, f"{f}.timeout", positive=True),
            cooldown_ms=None
            if cooldown is None
            else self.number(cooldown, f"{f}.cooldown", positive=False),
        )

    @staticmethod
    def key_values(
        value: object, f: str, *, header: bool, http: bool = False
    ) -> tuple[tuple[str, str], ...]:
        """``{key, value}`` pairs; ``header``: the keys are header names; ``http``: the values
        go out as HTTP header values (an MQTT message carries them in JSON)."""
        if value is None:
            return ()
        if not isinstance(value, list):
            raise BadRequestData(f"{f} must be an array of {{key, value}} objects", field=f)
        out: list[tuple[str, str]] = []
        for item in value:
            if (
                not isinstance(item, dict)
                or set(item) != {"key", "value"}
                or not isinstance(item["key"], str)
                or not isinstance(item["value"], str)
            ):
                raise BadRequestData(
                    f"{f} items must be {{key, value}} objects with string members", field=f
                )
            k, v = item["key"], item["value"]
            if not k or (header and _HEADER_NAME.match(k) is None):
                raise BadRequestData(f"{f} key {k!r} is not a valid header name", field=f)
            if "\r" in v or "\n" in v or "\x00" in v:
                raise BadRequestData(f"{f} value for {k!r} has a line break", field=f)
            if http and _HEADER_VALUE.fullmatch(v) is None:
                raise BadRequestData(
                    f"{f} value for {k!r} is not a valid HTTP header value (Latin-1 text "
                    "without control characters)",
                    field=f,
                )
            out.append((k, v))
        return tuple(out)


_NOTIFICATION_FIELDS: Final = {
    "attributes": "attributes",
    "format": "format",
    "showChanges": "show_changes",
    "sysAttrs": "sys_attrs",
    "pick": "pick",
    "omit": "omit",
}
_NOTIFICATION_DEFAULTS: Final[dict[str, Any]] = {
    "attributes": None,
    "format": "normalized",
    "showChanges": False,
    "sysAttrs": False,
    "pick": None,
    "omit": None,
}


def _endpoint_uri(value: object) -> str:
    """Check an endpoint URI: http(s) with a host, or mqtt(s) with a host and a topic."""
    f = "notification.endpoint.uri"
    if not is_uri(value):
        raise BadRequestData(f"{f} must be an absolute URI, got {value!r}", field=f)
    assert isinstance(value, str)
    try:
        parts = urlsplit(value)
    except ValueError as exc:  # a bad bracketed host: http://[::1/x, http://[zz]/x
        raise BadRequestData(f"{f} has an invalid host: {exc}", field=f) from exc
    scheme = parts.scheme.lower()
    if scheme not in ENDPOINT_SCHEMES:
        raise BadRequestData(
            f"{f} must use http, https, mqtt or mqtts, got {parts.scheme!r}", field=f
        )
    try:
        port = parts.port
    except ValueError as exc:
        raise BadRequestData(f"{f} has an invalid port: {value!r}", field=f) from exc
    if not parts.hostname or port == 0:
        raise BadRequestData(f"{f} needs a host: {value!r}", field=f)
    if scheme.startswith("mqtt"):
        topic = _mqtt_topic(parts.path)
        if not topic:
            raise BadRequestData(f"{f} needs a topic (mqtt://host:port/topic)", field=f)
        if "+" in topic or "#" in topic or "#" in value or parts.query:
            raise BadRequestData(
                f"{f} topic must not hold the wildcards + or # (nor a query)", field=f
            )
    return value


def _mqtt_topic(path: str) -> str:
    """The topic of an mqtt(s) URI path, as MqttTransport publishes to it (percent-decoded),
    refused unless it is UTF-8 that MQTT and Mosquitto take."""
    f = "notification.endpoint.uri"
    try:
        raw = unquote_to_bytes(path.lstrip("/"))
        topic = raw.decode("utf-8")
    except UnicodeError as exc:
        raise BadRequestData(f"{f} topic is not valid UTF-8 once percent-decoded", field=f) from exc
    if len(raw) > MAX_TOPIC_BYTES:
        raise BadRequestData(f"{f} topic is longer than {MAX_TOPIC_BYTES} bytes", field=f)
    bad = _TOPIC_REFUSED.search(topic)
    if bad is not None:
        raise BadRequestData(
            f"{f} topic holds U+{ord(bad.group()):04X} (a control character, surrogate or "
            "noncharacter), which MQTT brokers refuse",
            field=f,
        )
    return topic
