"""Subscription bodies in: validation with exact errors, PATCH merge, JSON and stored forms."""

from __future__ import annotations

import copy
import doctest
import json
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from cityward.bank.errors import BadRequestData, NgsiError, OperationNotSupported
from cityward.bank.jsonld import Context
from cityward.bank.subscriptions import model
from cityward.bank.subscriptions.model import (
    DEFAULT_TRIGGERS,
    DeliveryStats,
    Subscription,
    apply_patch,
    format_ts,
    parse_subscription,
)

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
EX = "https://example.org/ns/"
DEFAULT = "https://uri.etsi.org/ngsi-ld/default-context/"


def body(**changes: Any) -> dict[str, Any]:
    """A minimal valid subscription, with top-level members replaced or (None) removed."""
    b: dict[str, Any] = {
        "id": "urn:ngsi-ld:Subscription:S1",
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": {"endpoint": {"uri": "http://127.0.0.1:8080/notify"}},
    }
    for key, value in changes.items():
        if value is None:
            b.pop(key, None)
        else:
            b[key] = value
    return b


def endpoint(**changes: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"uri": "http://127.0.0.1:8080/notify"}
    e.update(changes)
    return {"endpoint": e}


def parse(b: Any, ctx: Context) -> Subscription:
    return parse_subscription(b, ctx, now=NOW)


def test_doctests() -> None:
    assert doctest.testmod(model).failed == 0


def test_minimal_body_gets_the_defaults(core: Context) -> None:
    sub = parse(body(id=None), core)
    assert sub.id.startswith("urn:ngsi-ld:Subscription:")
    assert sub.notification_trigger == DEFAULT_TRIGGERS
    assert sub.notification.format == "normalized"
    assert sub.notification.endpoint.accept == "application/json"
    assert sub.is_active and sub.status(NOW) == "active"
    assert sub.entities[0].terms == {"Vehicle": DEFAULT + "Vehicle"}
    assert sub.created_at == sub.modified_at == format_ts(NOW)
    assert sub.context is None  # the core context


def test_generated_ids_are_unique(core: Context) -> None:
    assert parse(body(id=None), core).id != parse(body(id=None), core).id


FULL: dict[str, Any] = {
    "id": "urn:ngsi-ld:Subscription:full",
    "type": "Subscription",
    "subscriptionName": "fast cars",
    "description": "cars over 50",
    "entities": [
        {"type": "Vehicle", "idPattern": "^urn:ngsi-ld:Vehicle:"},
        {"type": "(Vehicle;Car)|Truck", "id": "urn:ngsi-ld:Car:1"},
    ],
    "watchedAttributes": ["speed", "brand"],
    "notificationTrigger": ["entityCreated", "attributeUpdated", "entityDeleted"],
    "q": 'speed>50;brand=="Fiat"',
    "geoQ": {
        "geometry": "Point",
        "coordinates": [8.1, 49.0],
        "georel": "near;maxDistance==2000",
        "geoproperty": "location",
    },
    "scopeQ": "/Madrid/#",
    "lang": "en",
    "datasetId": ["urn:ngsi-ld:Dataset:a", "@none"],
    "isActive": False,
    "expiresAt": "2030-01-01T00:00:00Z",
    "throttling": 5,
    "notification": {
        "attributes": ["speed", "owner"],
        "format": "concise",
        "showChanges": True,
        "sysAttrs": True,
        "endpoint": {
            "uri": "mqtt://user:pw@127.0.0.1:1883/city/cars",
            "accept": "application/ld+json",
            "receiverInfo": [{"key": "X-Token", "value": "secret"}],
            "notifierInfo": [
                {"key": "MQTT-QoS", "value": "1"},
                {"key": "MQTT-Version", "value": "mqtt5.0"},
            ],
            "timeout": 2500,
        },
    },
}


def test_full_body_is_parsed_and_expanded(user_ctx: Context) -> None:
    sub = parse(copy.deepcopy(FULL), user_ctx)
    assert sub.id == "urn:ngsi-ld:Subscription:full"
    assert sub.watched_attributes == (EX + "speed", EX + "brand")
    assert sub.notification.attributes == (EX + "speed", EX + "owner")
    assert sub.entities[1].terms == {
        "Vehicle": EX + "Vehicle",
        "Car": EX + "Car",
        "Truck": DEFAULT + "Truck",
    }
    assert sub.entities[0].id_pattern == "^urn:ngsi-ld:Vehicle:"
    assert sub.q_terms == {"speed": EX + "speed", "brand": EX + "brand"}
    assert sub.geo_q is not None
    assert sub.geo_q.geoproperty == "https://uri.etsi.org/ngsi-ld/location"
    assert sub.geo_q.query.max_distance == 2000
    assert sub.dataset_id == ("urn:ngsi-ld:Dataset:a", "@none")
    assert sub.expires_at == "2030-01-01T00:00:00.000000Z"
    assert sub.throttling == 5.0
    assert sub.status(NOW) == "paused"
    e = sub.notification.endpoint
    assert e.scheme == "mqtt" and e.accept == "application/ld+json"
    assert e.receiver_info == (("X-Token", "secret"),)
    assert e.notifier("MQTT-QoS") == "1" and e.timeout_ms == 2500
    assert sub.context == user_ctx.source


def test_json_round_trip_with_the_same_context(user_ctx: Context) -> None:
    sub = parse(copy.deepcopy(FULL), user_ctx)
    out = sub.to_json(user_ctx, now=NOW)
    assert out["watchedAttributes"] == ["speed", "brand"]
    assert out["entities"][1] == {"id": "urn:ngsi-ld:Car:1", "type": "(Vehicle;Car)|Truck"}
    assert out["q"] == 'speed>50;brand=="Fiat"'
    assert out["notification"]["attributes"] == ["speed", "owner"]
    assert out["notification"]["endpoint"]["receiverInfo"] == [
        {"key": "X-Token", "value": "secret"}
    ]
    assert out["geoQ"]["geoproperty"] == "location"
    assert out["status"] == "paused"
    assert out["notification"]["status"] == "ok" and out["notification"]["timesSent"] == 0
    assert "createdAt" not in out
    assert out["isActive"] is False
    # what GET returns can be sent back as a new subscription and means the same
    again = parse(json.loads(json.dumps(out)), user_ctx)
    assert again == sub
    assert sub.to_json(user_ctx, sys_attrs=True)["createdAt"] == format_ts(NOW)


def test_json_compacts_with_the_reading_context(user_ctx: Context, core: Context) -> None:
    sub = parse(copy.deepcopy(FULL), user_ctx)
    out = sub.to_json(core, now=NOW)
    assert out["watchedAttributes"] == [EX + "speed", EX + "brand"]
    assert out["entities"][0]["type"] == EX + "Vehicle"
    assert out["entities"][1]["type"] == f"{EX}Vehicle;{EX}Car,Truck"
    assert out["q"] == f'{EX}speed>50;{EX}brand=="Fiat"'


def test_stored_form_round_trip(user_ctx: Context) -> None:
    sub = parse(copy.deepcopy(FULL), user_ctx)
    sub.stats.record(True, "2024-06-01T12:00:01.000000Z")
    stored = json.loads(json.dumps(sub.to_stored()))
    back = Subscription.from_stored(stored)
    assert back == sub
    assert back.stats == sub.stats
    assert back.q_expr == sub.q_expr and back.geo_q is not None


def test_delivery_stats() -> None:
    stats = DeliveryStats()
    stats.record(False, "2024-06-01T12:00:01.000000Z")
    statuses = [stats.status]
    stats.record(True, "2024-06-01T12:00:02.000000Z")
    statuses.append(stats.status)
    assert statuses == ["failed", "ok"]
    assert (stats.times_sent, stats.times_failed) == (2, 1)
    assert stats.last_notification == stats.last_success == "2024-06-01T12:00:02.000000Z"
    assert stats.last_failure == "2024-06-01T12:00:01.000000Z"


def _set(path: str, value: Any) -> dict[str, Any]:
    """The minimal body with the member at a dotted path set (None: removed)."""
    b = body()
    *parents, last = path.split(".")
    obj: Any = b
    for p in parents:
        obj = obj.setdefault(p, {})
    if value is None:
        obj.pop(last, None)
    else:
        obj[last] = value
    return b


BAD: list[tuple[str, Any, type[NgsiError], str]] = [
    ("not an object", ["x"], BadRequestData, "body"),
    ("empty object", {}, BadRequestData, "body"),
    ("bad id", body(id="not a uri"), BadRequestData, "id"),
    ("no type", body(type=None), BadRequestData, "type"),
    ("wrong type", body(type="Subscriptions"), BadRequestData, "type"),
    ("unknown member", body(foo=1), BadRequestData, "foo"),
    ("no notification", body(notification=None), BadRequestData, "notification"),
    ("notification not an object", body(notification=[]), BadRequestData, "notification"),
    ("no endpoint", body(notification={}), BadRequestData, "notification.endpoint"),
    ("no uri", body(notification={"endpoint": {}}), BadRequestData, "notification.endpoint.uri"),
    (
        "uri not a uri",
        _set("notification.endpoint.uri", "no uri"),
        BadRequestData,
        "notification.endpoint.uri",
    ),
    (
        "ftp uri",
        _set("notification.endpoint.uri", "ftp://h/x"),
        BadRequestData,
        "notification.endpoint.uri",
    ),
    (
        "no host",
        _set("notification.endpoint.uri", "http:///x"),
        BadRequestData,
        "notification.endpoint.uri",
    ),
    (
        "bad port",
        _set("notification.endpoint.uri", "http://h:99999/x"),
        BadRequestData,
        "notification.endpoint.uri",
    ),
    (
        "mqtt without topic",
        _set("notification.endpoint.uri", "mqtt://h:1883"),
        BadRequestData,
        "notification.endpoint.uri",
    ),
    (
        "mqtt wildcard topic",
        _set("notification.endpoint.uri", "mqtt://h/a/#"),
        BadRequestData,
        "notification.endpoint.uri",
    ),
    (
        "accept",
        body(notification=endpoint(accept="text/plain")),
        BadRequestData,
        "notification.endpoint.accept",
    ),
    (
        "receiverInfo not a list",
        body(notification=endpoint(receiverInfo={"k": "v"})),
        BadRequestData,
        "notification.endpoint.receiverInfo",
    ),
    (
        "receiverInfo number",
        body(notification=endpoint(receiverInfo=[{"key": "k", "value": 1}])),
        BadRequestData,
        "notification.endpoint.receiverInfo",
    ),
    (
        "receiverInfo bad header",
        body(notification=endpoint(receiverInfo=[{"key": "a b", "value": "v"}])),
        BadRequestData,
        "notification.endpoint.receiverInfo",
    ),
    (
        "receiverInfo header with a final newline",  # $ took it: header injection
        body(notification=endpoint(receiverInfo=[{"key": "X-A\n", "value": "v"}])),
        BadRequestData,
        "notification.endpoint.receiverInfo",
    ),
    (
        "MQTT-QoS 3",
        body(notification=endpoint(notifierInfo=[{"key": "MQTT-QoS", "value": "3"}])),
        BadRequestData,
        "notification.endpoint.notifierInfo",
    ),
    (
        "MQTT-Version",
        body(notification=endpoint(notifierInfo=[{"key": "MQTT-Version", "value": "mqtt4"}])),
        BadRequestData,
        "notification.endpoint.notifierInfo",
    ),
    (
        "endpoint timeout 0",
        body(notification=endpoint(timeout=0)),
        BadRequestData,
        "notification.endpoint.timeout",
    ),
    (
        "unknown endpoint member",
        body(notification=endpoint(foo=1)),
        BadRequestData,
        "notification.endpoint.foo",
    ),
    ("format", _set("notification.format", "xml"), BadRequestData, "notification.format"),
    (
        "empty attributes",
        _set("notification.attributes", []),
        BadRequestData,
        "notification.attributes",
    ),
    (
        "attribute name",
        _set("notification.attributes", ["a b"]),
        BadRequestData,
        "notification.attributes[0]",
    ),
    ("sysAttrs", _set("notification.sysAttrs", "yes"), BadRequestData, "notification.sysAttrs"),
    (
        "unknown notification member",
        _set("notification.foo", 1),
        BadRequestData,
        "notification.foo",
    ),
    ("join", _set("notification.join", "flat"), OperationNotSupported, "notification.join"),
    ("entities empty", body(entities=[]), BadRequestData, "entities"),
    ("entities not a list", body(entities={"type": "A"}), BadRequestData, "entities"),
    ("selector not an object", body(entities=["A"]), BadRequestData, "entities[0]"),
    (
        "selector without type",
        body(entities=[{"id": "urn:a:1"}]),
        BadRequestData,
        "entities[0].type",
    ),
    (
        "selector type syntax",
        body(entities=[{"type": "A"}, {"type": "A;;B"}]),
        BadRequestData,
        "entities[1].type",
    ),
    ("selector id", body(entities=[{"type": "A", "id": "x y"}]), BadRequestData, "entities[0].id"),
    (
        "selector idPattern",
        body(entities=[{"type": "A", "idPattern": "("}]),
        BadRequestData,
        "entities[0].idPattern",
    ),
    ("selector member", body(entities=[{"type": "A", "q": "x"}]), BadRequestData, "entities[0].q"),
    ("neither entities nor watchedAttributes", body(entities=None), BadRequestData, "entities"),
    ("watchedAttributes empty", body(watchedAttributes=[]), BadRequestData, "watchedAttributes"),
    (
        "watched name",
        body(watchedAttributes=["ok", "not ok"]),
        BadRequestData,
        "watchedAttributes[1]",
    ),
    ("watched reserved", body(watchedAttributes=["id"]), BadRequestData, "watchedAttributes[0]"),
    ("trigger", body(notificationTrigger=["entityChanged"]), BadRequestData, "notificationTrigger"),
    ("trigger empty", body(notificationTrigger=[]), BadRequestData, "notificationTrigger"),
    (
        "timeInterval with watchedAttributes",
        body(timeInterval=10, watchedAttributes=["speed"]),
        BadRequestData,
        "timeInterval",
    ),
    (
        "timeInterval with throttling",
        body(timeInterval=10, throttling=1),
        BadRequestData,
        "timeInterval",
    ),
    ("timeInterval 0", body(timeInterval=0), BadRequestData, "timeInterval"),
    ("timeInterval string", body(timeInterval="10"), BadRequestData, "timeInterval"),
    ("throttling negative", body(throttling=-1), BadRequestData, "throttling"),
    ("throttling bool", body(throttling=True), BadRequestData, "throttling"),
    ("q syntax", body(q="speed>"), BadRequestData, "q"),
    ("q not a string", body(q=5), BadRequestData, "q"),
    ("scopeQ", body(scopeQ="Madrid"), BadRequestData, "scopeQ"),
    ("geoQ not an object", body(geoQ="near"), BadRequestData, "geoQ"),
    (
        "geoQ no coordinates",
        body(geoQ={"geometry": "Point", "georel": "within"}),
        BadRequestData,
        "geoQ.coordinates",
    ),
    (
        "geoQ georel",
        body(geoQ={"geometry": "Point", "coordinates": [1, 2], "georel": "near"}),
        BadRequestData,
        "geoQ.georel",
    ),
    (
        "geoQ geometry",
        body(geoQ={"geometry": "Circle", "coordinates": [1, 2], "georel": "within"}),
        BadRequestData,
        "geoQ.geometry",
    ),
    (
        "geoQ coordinates",
        body(geoQ={"geometry": "Point", "coordinates": [1], "georel": "within"}),
        BadRequestData,
        "geoQ.coordinates",
    ),
    (
        "geoQ member",
        body(geoQ={"geometry": "Point", "coordinates": [1, 2], "georel": "within", "foo": 1}),
        BadRequestData,
        "geoQ.foo",
    ),
    ("expiresAt past", body(expiresAt="2024-01-01T00:00:00Z"), BadRequestData, "expiresAt"),
    ("expiresAt syntax", body(expiresAt="tomorrow"), BadRequestData, "expiresAt"),
    ("expiresAt offset", body(expiresAt="2030-01-01T00:00:00+02:00"), BadRequestData, "expiresAt"),
    ("isActive", body(isActive="yes"), BadRequestData, "isActive"),
    ("description", body(description=5), BadRequestData, "description"),
    ("lang", body(lang="e n"), BadRequestData, "lang"),
    ("datasetId", body(datasetId=["urn:a:1", "x y"]), BadRequestData, "datasetId"),
    ("jsonldContext", body(jsonldContext="not a uri"), BadRequestData, "jsonldContext"),
    (
        "showChanges with keyValues",
        body(notification={**endpoint(), "showChanges": True, "format": "keyValues"}),
        BadRequestData,
        "notification.showChanges",
    ),
    (
        "attributes with pick",
        body(notification={**endpoint(), "attributes": ["a"], "pick": ["b"]}),
        BadRequestData,
        "notification.attributes",
    ),
    (
        "pick and omit overlap",
        body(notification={**endpoint(), "pick": ["a"], "omit": "a"}),
        BadRequestData,
        "notification.omit",
    ),
    ("null member", body(description=None) | {"description": None}, BadRequestData, "description"),
]


@pytest.mark.parametrize(
    ("body_", "error", "field"),
    [pytest.param(b, e, f, id=name) for name, b, e, f in BAD],
)
def test_bad_bodies(body_: Any, error: type[NgsiError], field: str, core: Context) -> None:
    with pytest.raises(error) as info:
        parse(copy.deepcopy(body_), core)
    assert type(info.value) is error
    assert info.value.field == field


def test_output_only_members_are_ignored(core: Context) -> None:
    b = body(status="active", timesSent=3, createdAt="2020-01-01T00:00:00Z")
    b["notification"]["status"] = "ok"
    sub = parse(b, core)
    assert sub.stats.times_sent == 0 and sub.created_at == format_ts(NOW)


def test_simplified_means_key_values(core: Context) -> None:
    sub = parse(_set("notification.format", "simplified"), core)
    assert sub.notification.format == "keyValues"


def test_id_wins_over_id_pattern(core: Context) -> None:
    sub = parse(body(entities=[{"type": "A", "id": "urn:a:1", "idPattern": ".*"}]), core)
    assert sub.entities[0].id == "urn:a:1" and sub.entities[0].id_pattern is None


def test_status_expires(core: Context) -> None:
    sub = parse(body(expiresAt="2024-06-01T13:00:00Z"), core)
    assert sub.status(NOW) == "active"
    assert sub.status(NOW + timedelta(hours=1)) == "expired"
    paused = parse(body(expiresAt="2024-06-01T13:00:00Z", isActive=False), core)
    assert paused.status(NOW + timedelta(hours=2)) == "expired"


# --------------------------------------------------------------------------------------------
# PATCH


def patch(sub: Subscription, fragment: Any, ctx: Context, minutes: int = 1) -> Subscription:
    return apply_patch(sub, fragment, ctx, now=NOW + timedelta(minutes=minutes))


def test_patch_replaces_members_and_merges_notification(user_ctx: Context) -> None:
    sub = parse(copy.deepcopy(FULL), user_ctx)
    sub.stats.record(True, "2024-06-01T12:00:01.000000Z")
    new = patch(
        sub,
        {"q": "speed>80", "watchedAttributes": ["brand"], "notification": {"format": "normalized"}},
        user_ctx,
    )
    assert new.q == "speed>80" and new.q_terms == {"speed": EX + "speed"}
    assert new.watched_attributes == (EX + "brand",)
    assert new.notification.format == "normalized"
    assert new.notification.endpoint == sub.notification.endpoint  # merged, not replaced
    assert new.notification.attributes == sub.notification.attributes
    assert new.entities == sub.entities
    assert new.created_at == sub.created_at
    assert new.modified_at == format_ts(NOW + timedelta(minutes=1))
    assert new.stats == sub.stats and new.stats is not sub.stats
    assert sub.q == 'speed>50;brand=="Fiat"'  # the original is untouched


def test_patch_endpoint_is_replaced_whole(core: Context) -> None:
    sub = parse(body(notification=endpoint(accept="application/ld+json")), core)
    new = patch(sub, {"notification": {"endpoint": {"uri": "https://h.example/n"}}}, core)
    assert new.notification.endpoint.uri == "https://h.example/n"
    assert new.notification.endpoint.accept == "application/json"


def test_patch_pause_resume_and_expiry(core: Context) -> None:
    sub = parse(body(expiresAt="2024-06-01T12:30:00Z"), core)
    paused = patch(sub, {"isActive": False}, core)
    assert paused.status(NOW) == "paused"
    resumed = patch(paused, {"isActive": True}, core)
    assert resumed.status(NOW) == "active"
    later = NOW + timedelta(hours=1)
    assert resumed.status(later) == "expired"
    revived = apply_patch(resumed, {"expiresAt": "2024-06-02T00:00:00Z"}, core, now=later)
    assert revived.status(later) == "active"


def test_patch_null_removes_optional_members(core: Context) -> None:
    sub = parse(body(description="d", q="speed>1", throttling=3), core)
    new = patch(sub, {"description": None, "q": "urn:ngsi-ld:null", "throttling": None}, core)
    assert new.description is None and new.q is None and new.q_terms == {}
    assert new.throttling is None


def test_patch_keeps_compact_names_expanded_with_its_own_context(
    core: Context, user_ctx: Context
) -> None:
    sub = parse(body(watchedAttributes=["speed"]), core)
    new = patch(sub, {"notification": {"attributes": ["speed"]}}, user_ctx)
    assert sub.watched_attributes == (DEFAULT + "speed",)
    assert new.notification.attributes == (EX + "speed",)


BAD_PATCHES: list[tuple[str, Any, str]] = [
    ("not an object", [1], "body"),
    ("empty", {}, "body"),
    ("null notification", {"notification": None}, "notification"),
    ("null endpoint", {"notification": {"endpoint": None}}, "notification.endpoint"),
    (
        "null endpoint uri",
        {"notification": {"endpoint": {"uri": None}}},
        "notification.endpoint.uri",
    ),
    ("other id", {"id": "urn:ngsi-ld:Subscription:other"}, "id"),
    ("wrong type", {"type": "Entity"}, "type"),
    ("past expiresAt", {"expiresAt": "2024-06-01T11:00:00Z"}, "expiresAt"),
    ("timeInterval on watched", {"timeInterval": 5}, "timeInterval"),
    ("remove last selector", {"entities": None, "watchedAttributes": None}, "entities"),
    (
        "keyValues with showChanges",
        {"notification": {"format": "keyValues"}},
        "notification.showChanges",
    ),
    ("unknown", {"foo": 1}, "foo"),
]


@pytest.mark.parametrize(
    ("fragment", "field"), [pytest.param(f, fld, id=name) for name, f, fld in BAD_PATCHES]
)
def test_bad_patches(fragment: Any, field: str, core: Context) -> None:
    sub = parse(
        body(watchedAttributes=["speed"], notification={**endpoint(), "showChanges": True}), core
    )
    with pytest.raises(BadRequestData) as info:
        patch(sub, fragment, core)
    assert info.value.field == field


# Accepted before, then harmful: a topic Mosquitto refuses dropped the broker connection that
# every subscription to that broker shares; a huge number broke every GET of the tenant's
# subscriptions; a bad bracketed host was a 500; a header value that is not Latin-1 failed
# every delivery; an id past the entity limit was stored by SQLite and refused by PostgreSQL.
REFUSED: list[tuple[str, Any, str]] = [
    ("topic NUL", _set("notification.endpoint.uri", "mqtt://h/a%00b"), "notification.endpoint.uri"),
    (
        "topic control",
        _set("notification.endpoint.uri", "mqtt://h/a%01b"),
        "notification.endpoint.uri",
    ),
    ("topic DEL", _set("notification.endpoint.uri", "mqtt://h/a%7Fb"), "notification.endpoint.uri"),
    (
        "topic C1",
        _set("notification.endpoint.uri", "mqtt://h/a%C2%85b"),
        "notification.endpoint.uri",
    ),
    (
        "topic not UTF-8",
        _set("notification.endpoint.uri", "mqtt://h/a%FFb"),
        "notification.endpoint.uri",
    ),
    (
        "topic noncharacter",
        _set("notification.endpoint.uri", "mqtt://h/a%EF%B7%90b"),
        "notification.endpoint.uri",
    ),
    (
        "topic raw noncharacter",
        _set("notification.endpoint.uri", "mqtt://h/a\U0010ffff"),
        "notification.endpoint.uri",
    ),
    (
        "topic too long",
        _set("notification.endpoint.uri", "mqtt://h/" + "t" * 65536),
        "notification.endpoint.uri",
    ),
    (
        "bad IPv6 host",
        _set("notification.endpoint.uri", "http://[::1/x"),
        "notification.endpoint.uri",
    ),
    (
        "bad bracketed host",
        _set("notification.endpoint.uri", "http://[zz]/x"),
        "notification.endpoint.uri",
    ),
    ("throttling 1e20", body(throttling=1e20), "throttling"),
    ("throttling 10**30", body(throttling=10**30), "throttling"),
    ("throttling past the bound", body(throttling=10**9 + 1), "throttling"),
    ("timeInterval 1e308", body(timeInterval=1e308), "timeInterval"),
    ("throttling infinite", body(throttling=float("inf")), "throttling"),
    ("throttling NaN", body(throttling=float("nan")), "throttling"),
    ("timeout 1e308", body(notification=endpoint(timeout=1e308)), "notification.endpoint.timeout"),
    (
        "timeout 10**40",
        body(notification=endpoint(timeout=10**40)),
        "notification.endpoint.timeout",
    ),
    (
        "cooldown 1e308",
        body(notification=endpoint(cooldown=1e308)),
        "notification.endpoint.cooldown",
    ),
    (
        "receiverInfo not Latin-1",
        body(notification=endpoint(receiverInfo=[{"key": "X-Label", "value": "Zürich → Genève"}])),
        "notification.endpoint.receiverInfo",
    ),
    (
        "receiverInfo control character",
        body(notification=endpoint(receiverInfo=[{"key": "X-Label", "value": "a\x01b"}])),
        "notification.endpoint.receiverInfo",
    ),
    ("id past 1,000 bytes", body(id="urn:ngsi-ld:Subscription:" + "x" * 976), "id"),
    ("id past 1,000 UTF-8 bytes", body(id="urn:ngsi-ld:Subscription:" + "é" * 488), "id"),
]


@pytest.mark.parametrize(("body_", "field"), [pytest.param(b, f, id=n) for n, b, f in REFUSED])
def test_harmful_values_are_refused(body_: Any, field: str, core: Context) -> None:
    with pytest.raises(BadRequestData) as info:
        parse(copy.deepcopy(body_), core)
    assert info.value.field == field


def test_values_at_the_limits_are_taken(core: Context) -> None:
    sub = parse(
        body(
            id="urn:ngsi-ld:Subscription:" + "x" * 975,  # 1,000 bytes
            throttling=10**9,
            notification=endpoint(timeout=10**9, cooldown=10**9),
        ),
        core,
    )
    assert len(sub.id) == 1000 and sub.throttling == 10**9
    assert sub.to_json(core)["throttling"] == 10**9
    for uri, topic in [
        ("mqtt://h/caf%C3%A9/%E2%98%83", "café/☃"),
        ("mqtt://h/café/☃", "café/☃"),
        ("mqtt://h/" + "t" * 65535, "t" * 65535),
    ]:
        b = _set("notification.endpoint.uri", uri)
        b["notification"]["endpoint"]["receiverInfo"] = [
            {"key": "X-Label", "value": "Zürich → Genève"}
        ]
        e = parse(b, core).notification.endpoint  # MQTT carries receiverInfo in JSON: any text
        assert e.uri == uri and model._mqtt_topic(urlsplit(uri).path) == topic
    latin1 = [{"key": "X-Label", "value": "Zürich\tGenève"}]
    e = parse(body(notification=endpoint(receiverInfo=latin1)), core).notification.endpoint
    assert e.receiver_info == (("X-Label", "Zürich\tGenève"),)


def test_a_huge_number_stored_before_the_bound_can_still_be_read(core: Context) -> None:
    stored = parse(body(), core).to_stored()
    stored["throttling"] = 1e20
    stored["notification"]["endpoint"]["timeout"] = 1e308
    sub = Subscription.from_stored(stored)
    out = sub.to_json(core)
    orjson.dumps(out)  # as the API writes it: no integer past 64 bits
    assert out["throttling"] == 1e20
    assert out["notification"]["endpoint"]["timeout"] == 1e308
