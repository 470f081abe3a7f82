"""Which changes fire which subscriptions, and what their notifications hold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cityward.bank.jsonld import CORE_CONTEXT_URL, Context
from cityward.bank.model import NGSI_NULL, EntityParser
from cityward.bank.subscriptions.matcher import (
    ChangeEvent,
    Fire,
    SubscriptionIndex,
    build_notification,
    evaluate,
    notification_for,
)
from cityward.bank.subscriptions.model import Subscription, format_ts, parse_subscription

NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=UTC)
STAMP = "2024-06-01T11:00:00.000000Z"
DEFAULT = "https://uri.etsi.org/ngsi-ld/default-context/"
SPEED = DEFAULT + "speed"
NAME = DEFAULT + "name"
OWNER = DEFAULT + "owner"
LOCATION = "https://uri.etsi.org/ngsi-ld/location"


def stamp(doc: dict[str, Any]) -> dict[str, Any]:
    """System timestamps as the store adds them."""
    doc["createdAt"] = doc["modifiedAt"] = STAMP
    for instances in doc["attrs"].values():
        for inst in instances:
            inst["createdAt"] = inst["modifiedAt"] = STAMP
    return doc


def entity(core: Context, **attrs: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"id": "urn:ngsi-ld:Vehicle:V1", "type": "Vehicle"}
    raw.update(attrs)
    return stamp(EntityParser(core).entity(raw))


def vehicle(core: Context, speed: float = 40, **more: Any) -> dict[str, Any]:
    return entity(
        core,
        speed={"type": "Property", "value": speed, "unitCode": "KMH"},
        name={"type": "Property", "value": "bus 7"},
        owner={"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"},
        location={"type": "GeoProperty", "value": {"type": "Point", "coordinates": [8.0, 49.0]}},
        **more,
    )


def sub(core: Context, **members: Any) -> Subscription:
    notification = members.pop("notification", {})
    notification.setdefault("endpoint", {"uri": "http://127.0.0.1:9/notify"})
    body: dict[str, Any] = {
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": notification,
    }
    body.update(members)
    body = {k: v for k, v in body.items() if v is not None}
    return parse_subscription(body, core, now=NOW - timedelta(days=1))


def fire(s: Subscription, event: ChangeEvent, **kw: Any) -> Fire | None:
    return evaluate(s, event, now=NOW, **kw)


def create(doc: dict[str, Any]) -> ChangeEvent:
    return ChangeEvent(doc["id"], None, doc)


def update(
    before: dict[str, Any], after: dict[str, Any], changed: set[str] | None = None
) -> ChangeEvent:
    return ChangeEvent(before["id"], before, after, None if changed is None else frozenset(changed))


def delete(doc: dict[str, Any]) -> ChangeEvent:
    return ChangeEvent(doc["id"], doc, None, at="2024-06-01T12:00:00.000000Z")


def without(doc: dict[str, Any], iri: str) -> dict[str, Any]:
    out = dict(doc)
    out["attrs"] = {k: v for k, v in doc["attrs"].items() if k != iri}
    return out


# --------------------------------------------------------------------------------------------
# Triggers


def test_event_needs_a_document() -> None:
    with pytest.raises(ValueError):
        ChangeEvent("urn:a:1", None, None)


def test_create_fires_attribute_created_by_default(core: Context) -> None:
    f = fire(sub(core), create(vehicle(core)))
    assert f is not None and f.trigger == "attributeCreated"
    assert f.created == {SPEED, NAME, OWNER, LOCATION}


def test_create_fires_entity_created_when_asked(core: Context) -> None:
    s = sub(core, notificationTrigger=["entityCreated", "attributeCreated"])
    f = fire(s, create(vehicle(core)))
    assert f is not None and f.trigger == "entityCreated"


def test_create_without_create_triggers_is_silent(core: Context) -> None:
    s = sub(core, notificationTrigger=["attributeUpdated", "entityDeleted"])
    assert fire(s, create(vehicle(core))) is None


def test_update_fires_attribute_updated(core: Context) -> None:
    f = fire(sub(core), update(vehicle(core, 40), vehicle(core, 60)))
    assert f is not None and f.trigger == "attributeUpdated" and f.updated == {SPEED}


def test_given_changed_set_wins_over_the_diff(core: Context) -> None:
    doc = vehicle(core)
    f = fire(sub(core), update(doc, doc, {NAME}))  # rewritten with the same value
    assert f is not None and f.updated == {NAME}
    assert fire(sub(core), update(doc, doc)) is None  # nothing differs, nothing said


def test_new_attribute_is_attribute_created(core: Context) -> None:
    before = vehicle(core)
    after = vehicle(core, brand={"type": "Property", "value": "Fiat"})
    f = fire(sub(core), update(before, after))
    assert f is not None and f.trigger == "attributeCreated" and f.created == {DEFAULT + "brand"}


def test_attribute_deleted(core: Context) -> None:
    before = vehicle(core)
    after = without(before, NAME)
    assert fire(sub(core), update(before, after)) is None  # not in the default triggers
    s = sub(core, notificationTrigger=["attributeDeleted"])
    f = fire(s, update(before, after))
    assert f is not None and f.trigger == "attributeDeleted" and f.deleted == {NAME}


def test_entity_updated_covers_any_change(core: Context) -> None:
    s = sub(core, notificationTrigger=["entityUpdated"])
    before = vehicle(core)
    f = fire(s, update(before, without(before, NAME)))
    assert f is not None and f.trigger == "entityUpdated" and f.deleted == {NAME}
    assert fire(s, create(before)) is None


def test_attribute_trigger_is_preferred_to_entity_updated(core: Context) -> None:
    s = sub(core, notificationTrigger=["entityUpdated", "attributeUpdated"])
    f = fire(s, update(vehicle(core, 40), vehicle(core, 50)))
    assert f is not None and f.trigger == "attributeUpdated"


def test_delete(core: Context) -> None:
    doc = vehicle(core)
    assert fire(sub(core), delete(doc)) is None
    f = fire(sub(core, notificationTrigger=["entityDeleted"]), delete(doc))
    assert f is not None and f.trigger == "entityDeleted"
    f = fire(sub(core, notificationTrigger=["attributeDeleted"]), delete(doc))
    assert (
        f is not None
        and f.trigger == "attributeDeleted"
        and f.deleted
        == {
            SPEED,
            NAME,
            OWNER,
            LOCATION,
        }
    )


def test_watched_attributes(core: Context) -> None:
    s = sub(core, watchedAttributes=["speed"])
    before = vehicle(core)
    renamed = vehicle(core)
    renamed["attrs"][NAME] = [{"type": "Property", "value": "bus 8"}]
    assert fire(s, update(before, renamed)) is None
    f = fire(s, update(before, vehicle(core, 99)))
    assert f is not None and f.updated == {SPEED}
    created = fire(s, create(before))
    assert created is not None and created.created == {SPEED}
    no_speed = without(before, SPEED)
    assert fire(s, create(no_speed)) is None
    s2 = sub(core, watchedAttributes=["speed"], notificationTrigger=["entityDeleted"])
    assert fire(s2, delete(no_speed)) is None
    assert fire(s2, delete(before)) is not None


def test_watched_attributes_without_entities(core: Context) -> None:
    s = sub(core, entities=None, watchedAttributes=["speed"])
    other = stamp(EntityParser(core).entity({"id": "urn:x:1", "type": "Thing", "speed": 1}))
    assert fire(s, create(other)) is not None


# --------------------------------------------------------------------------------------------
# Filters


@pytest.mark.parametrize(
    ("entities", "hit"),
    [
        ([{"type": "Vehicle"}], True),
        ([{"type": "Car"}], False),
        ([{"type": "Car"}, {"type": "Vehicle"}], True),
        ([{"type": "Vehicle", "id": "urn:ngsi-ld:Vehicle:V1"}], True),
        ([{"type": "Vehicle", "id": "urn:ngsi-ld:Vehicle:V2"}], False),
        ([{"type": "Vehicle", "idPattern": "Vehicle:V[0-9]$"}], True),
        ([{"type": "Vehicle", "idPattern": "^V1"}], False),
        ([{"type": "Car,Vehicle"}], True),
        ([{"type": "Car;Vehicle"}], False),
        ([{"type": "(Bus;Vehicle)|Car"}], True),
    ],
)
def test_entity_selectors(core: Context, entities: list[dict[str, Any]], hit: bool) -> None:
    doc = vehicle(core)
    doc["type"] = [DEFAULT + "Vehicle", DEFAULT + "Bus"]
    assert (fire(sub(core, entities=entities), create(doc)) is not None) is hit


def test_selector_types_use_the_subscription_context(core: Context, user_ctx: Context) -> None:
    body = {
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": {"endpoint": {"uri": "http://h/n"}},
    }
    s = parse_subscription(body, user_ctx, now=NOW)
    doc = vehicle(core)  # a default-context Vehicle, not ex:Vehicle
    assert fire(s, create(doc)) is None
    doc["type"] = ["https://example.org/ns/Vehicle"]
    assert fire(s, create(doc)) is not None


@pytest.mark.parametrize(
    ("q", "hit"),
    [
        ("speed>50", True),
        ("speed<50", False),
        ('name=="bus 7"', True),
        ("owner==urn:ngsi-ld:Person:P1", True),
        ('speed.unitCode=="KMH";speed>=60', True),
        ("!brand", True),
        ("brand|speed==1", False),
    ],
)
def test_q_is_checked_after_the_change(core: Context, q: str, hit: bool) -> None:
    s = sub(core, q=q)
    assert (fire(s, update(vehicle(core, 40), vehicle(core, 60))) is not None) is hit


def test_q_on_a_deleted_entity_looks_at_it_before(core: Context) -> None:
    s = sub(core, q="speed>50", notificationTrigger=["entityDeleted"])
    assert fire(s, delete(vehicle(core, 60))) is not None
    assert fire(s, delete(vehicle(core, 40))) is None


@pytest.mark.parametrize(
    ("geo_q", "hit"),
    [
        (
            {"georel": "near;maxDistance==1000", "geometry": "Point", "coordinates": [8.0, 49.005]},
            True,
        ),
        (
            {"georel": "near;maxDistance==100", "geometry": "Point", "coordinates": [8.0, 49.005]},
            False,
        ),
        (
            {
                "georel": "within",
                "geometry": "Polygon",
                "coordinates": [[[7, 48], [9, 48], [9, 50], [7, 50], [7, 48]]],
            },
            True,
        ),
        ({"georel": "intersects", "geometry": "Point", "coordinates": [1, 1]}, False),
        (
            {
                "georel": "near;maxDistance==1000",
                "geometry": "Point",
                "coordinates": [8.0, 49.0],
                "geoproperty": "operationSpace",
            },
            False,
        ),
    ],
)
def test_geo_q(core: Context, geo_q: dict[str, Any], hit: bool) -> None:
    s = sub(core, geoQ=geo_q)
    assert (fire(s, create(vehicle(core))) is not None) is hit


def test_scope_q(core: Context) -> None:
    s = sub(core, scopeQ="/Madrid/#")
    doc = vehicle(core)
    assert fire(s, create(doc)) is None
    doc["scope"] = ["/Madrid/Centro"]
    assert fire(s, create(doc)) is not None


def test_paused_expired_and_periodic_never_fire(core: Context) -> None:
    event = update(vehicle(core, 40), vehicle(core, 60))
    assert fire(sub(core, isActive=False), event) is None
    expiring = sub(core, expiresAt="2024-06-01T11:59:00Z")
    assert evaluate(expiring, event, now=NOW - timedelta(minutes=2)) is not None
    assert fire(expiring, event) is None
    assert fire(sub(core, timeInterval=60), event) is None


def test_throttling(core: Context) -> None:
    s = sub(core, throttling=10)
    event = update(vehicle(core, 40), vehicle(core, 60))
    assert fire(s, event) is not None
    assert fire(s, event, last_notified=format_ts(NOW - timedelta(seconds=5))) is None
    assert fire(s, event, last_notified=format_ts(NOW - timedelta(seconds=11))) is not None
    s.stats.record(True, format_ts(NOW - timedelta(seconds=1)))
    assert fire(s, event) is None  # the stats' last notification counts too


def test_index_candidates_and_throttling(core: Context) -> None:
    vehicles = sub(core, throttling=60)
    cars = sub(core, entities=[{"type": "Car"}])
    mixed = sub(core, entities=[{"type": "(Bus;Vehicle)|Car"}])
    watched = sub(core, entities=None, watchedAttributes=["speed"])
    index = SubscriptionIndex([vehicles, cars, mixed, watched])
    assert len(index) == 4
    ids = {s.id for s in index.candidates([DEFAULT + "Vehicle"])}
    assert ids == {vehicles.id, mixed.id, watched.id}
    event = update(vehicle(core, 40), vehicle(core, 60))
    first = {s.id for s, _ in index.match(event, now=NOW)}
    assert first == {vehicles.id, watched.id}
    second = {s.id for s, _ in index.match(event, now=NOW + timedelta(seconds=1))}
    assert second == {watched.id}  # vehicles is throttled
    index.remove(vehicles.id)
    assert index.get(vehicles.id) is None
    assert {s.id for s in index.candidates([DEFAULT + "Vehicle"])} == {mixed.id, watched.id}
    index.put(cars)  # replacing keeps the index consistent
    assert {s.id for s in index.candidates([DEFAULT + "Car"])} == {cars.id, mixed.id, watched.id}


# --------------------------------------------------------------------------------------------
# Notifications


def notify(s: Subscription, event: ChangeEvent, ctx: Context, **kw: Any) -> dict[str, Any]:
    f = evaluate(s, event, now=NOW)
    assert f is not None
    item = notification_for(s, event, f, ctx, now=NOW, **kw)
    assert item.endpoint == s.notification.endpoint.uri and item.subscription_id == s.id
    return dict(item.payload)


def test_notification_envelope_and_headers(core: Context) -> None:
    s = sub(
        core,
        notification={
            "endpoint": {
                "uri": "http://127.0.0.1:9/n",
                "receiverInfo": [{"key": "X-Auth", "value": "t0k"}],
            }
        },
    )
    payload = notify(s, update(vehicle(core, 40), vehicle(core, 60)), core, tenant="city1")
    body = payload["body"]
    assert body["id"].startswith("urn:ngsi-ld:Notification:")
    assert body["type"] == "Notification" and body["subscriptionId"] == s.id
    assert body["notifiedAt"] == format_ts(NOW)
    assert body["triggerReason"] == "attributeUpdated"
    assert "@context" not in body
    assert payload["headers"] == {
        "Content-Type": "application/json",
        "Link": f'<{CORE_CONTEXT_URL}>; rel="http://www.w3.org/ns/json-ld#context"; '
        'type="application/ld+json"',
        "NGSILD-Tenant": "city1",
        "X-Auth": "t0k",
    }
    [data] = body["data"]
    assert data["id"] == "urn:ngsi-ld:Vehicle:V1" and data["type"] == "Vehicle"
    assert data["speed"] == {"type": "Property", "value": 60, "unitCode": "KMH"}
    assert "createdAt" not in data


def test_ld_json_puts_the_context_in_the_body(user_ctx: Context, core: Context) -> None:
    body = {
        "type": "Subscription",
        "entities": [{"type": "Vehicle"}],
        "notification": {"endpoint": {"uri": "http://h/n", "accept": "application/ld+json"}},
    }
    s = parse_subscription(body, user_ctx, now=NOW)
    doc = vehicle(core)
    doc["type"] = ["https://example.org/ns/Vehicle"]
    doc["attrs"]["https://example.org/ns/speed"] = doc["attrs"].pop(SPEED)
    payload = notify(s, create(doc), user_ctx)
    assert payload["headers"] == {"Content-Type": "application/ld+json"}
    assert payload["body"]["@context"] == user_ctx.output_context()
    data = payload["body"]["data"][0]
    assert data["type"] == "Vehicle" and "speed" in data  # compacted with the user context


@pytest.mark.parametrize(
    ("fmt", "speed", "location"),
    [
        ("keyValues", 60, {"type": "Point", "coordinates": [8.0, 49.0]}),
        (
            "concise",
            {"value": 60, "unitCode": "KMH"},
            {"type": "Point", "coordinates": [8.0, 49.0]},
        ),
    ],
)
def test_formats(core: Context, fmt: str, speed: Any, location: Any) -> None:
    s = sub(core, notification={"format": fmt})
    data = notify(s, update(vehicle(core, 40), vehicle(core, 60)), core)["body"]["data"][0]
    assert data["speed"] == speed
    assert data["location"] == location


def test_attributes_sys_attrs_and_pick(core: Context) -> None:
    s = sub(core, notification={"attributes": ["speed", "brand"], "sysAttrs": True})
    data = notify(s, update(vehicle(core, 40), vehicle(core, 60)), core)["body"]["data"][0]
    assert set(data) == {"id", "type", "createdAt", "modifiedAt", "speed"}
    assert data["speed"]["createdAt"] == STAMP
    s = sub(core, notification={"pick": ["id", "name"]})
    data = notify(s, update(vehicle(core, 40), vehicle(core, 60)), core)["body"]["data"][0]
    assert data == {"id": "urn:ngsi-ld:Vehicle:V1", "name": {"type": "Property", "value": "bus 7"}}


def test_show_changes(core: Context) -> None:
    s = sub(core, notification={"showChanges": True})
    before = vehicle(core, 40)
    after = vehicle(core, 60)
    after["attrs"][OWNER] = [{"type": "Relationship", "object": "urn:ngsi-ld:Person:P2"}]
    data = notify(s, update(before, after), core)["body"]["data"][0]
    assert data["speed"] == {
        "type": "Property",
        "value": 60,
        "unitCode": "KMH",
        "previousValue": 40,
    }
    assert data["owner"] == {
        "type": "Relationship",
        "object": "urn:ngsi-ld:Person:P2",
        "previousObject": "urn:ngsi-ld:Person:P1",
    }
    assert "previousValue" not in data["name"]  # unchanged
    concise = sub(core, notification={"showChanges": True, "format": "concise"})
    data = notify(concise, update(vehicle(core, 40), vehicle(core, 60)), core)["body"]["data"][0]
    assert data["speed"] == {"value": 60, "unitCode": "KMH", "previousValue": 40}
    # a creation never carries previous values
    data = notify(s, create(after), core)["body"]["data"][0]
    assert "previousObject" not in data["owner"]


def test_one_notification_carries_everything_its_write_did(core: Context) -> None:
    """A write fires once, under the first of its triggers that happened: the notification of
    a write that updated speed and created an attribute (attributeCreated) had no previous
    speed, and that of one that updated speed and deleted name (attributeUpdated) did not
    mention name at all, though the subscription asked about deletions."""
    color = DEFAULT + "color"
    s = sub(core, notification={"showChanges": True})
    after = vehicle(core, 60)
    after["attrs"][color] = [{"type": "Property", "value": "red"}]
    payload = notify(s, update(vehicle(core, 40), after), core)
    assert payload["body"]["triggerReason"] == "attributeCreated"
    data = payload["body"]["data"][0]
    assert data["speed"]["previousValue"] == 40 and data["color"]["value"] == "red"
    s = sub(core, notificationTrigger=["attributeUpdated", "attributeDeleted"])
    payload = notify(s, update(vehicle(core, 40), without(vehicle(core, 60), NAME)), core)
    assert payload["body"]["triggerReason"] == "attributeUpdated"
    data = payload["body"]["data"][0]
    assert data["speed"]["value"] == 60 and data["name"] == {"type": "Property", "value": NGSI_NULL}
    # without attributeDeleted among its triggers a subscription is not told of deletions
    s = sub(core, notificationTrigger=["attributeUpdated"])
    data = notify(s, update(vehicle(core, 40), without(vehicle(core, 60), NAME)), core)
    assert "name" not in data["body"]["data"][0]


def test_entity_deleted_notification(core: Context) -> None:
    s = sub(core, notificationTrigger=["entityDeleted"], notification={"showChanges": True})
    payload = notify(s, delete(vehicle(core, 40)), core)
    assert payload["body"]["triggerReason"] == "entityDeleted"
    data = payload["body"]["data"][0]
    assert data["deletedAt"] == "2024-06-01T12:00:00.000000Z"
    assert data["speed"] == {"type": "Property", "value": NGSI_NULL, "previousValue": 40}
    assert data["owner"] == {
        "type": "Relationship",
        "object": NGSI_NULL,
        "previousObject": "urn:ngsi-ld:Person:P1",
    }


def test_attribute_deleted_notification(core: Context) -> None:
    s = sub(core, notificationTrigger=["attributeDeleted"], notification={"format": "keyValues"})
    before = vehicle(core)
    data = notify(s, update(before, without(before, NAME)), core)["body"]["data"][0]
    assert data == {"id": "urn:ngsi-ld:Vehicle:V1", "type": "Vehicle", "name": NGSI_NULL}


def test_geo_json_notification(core: Context) -> None:
    s = sub(
        core, notification={"endpoint": {"uri": "http://h/n", "accept": "application/geo+json"}}
    )
    payload = notify(s, create(vehicle(core)), core)
    assert payload["headers"]["Content-Type"] == "application/geo+json"
    collection = payload["body"]["data"]
    assert collection["type"] == "FeatureCollection"
    [feature] = collection["features"]
    assert feature["geometry"] == {"type": "Point", "coordinates": [8.0, 49.0]}
    assert feature["properties"]["type"] == "Vehicle"


def test_geo_json_notification_geometry_is_null_for_a_location_that_is_no_geoproperty(
    core: Context,
) -> None:
    # an entity whose location is a plain Property (a street name) has no geometry: its value
    # went into Feature.geometry verbatim
    s = sub(
        core, notification={"endpoint": {"uri": "http://h/n", "accept": "application/geo+json"}}
    )
    named = entity(core, speed=40, location={"type": "Property", "value": "Korenmarkt"})
    [feature] = notify(s, create(named), core)["body"]["data"]["features"]
    assert feature["geometry"] is None
    assert feature["properties"]["location"]["value"] == "Korenmarkt"


def test_build_notification_for_several_entities(core: Context) -> None:
    s = sub(
        core,
        notification={
            "endpoint": {
                "uri": "mqtt://127.0.0.1/t",
                "notifierInfo": [{"key": "MQTT-QoS", "value": "1"}],
                "timeout": 1500,
                "cooldown": 200,
            }
        },
    )
    item = build_notification(s, None, [{"id": "urn:a:1", "type": "T"}] * 2, core, now=NOW)
    assert "triggerReason" not in item.payload["body"]
    assert len(item.payload["body"]["data"]) == 2
    assert item.payload["notifierInfo"] == {"MQTT-QoS": "1"}
    assert item.payload["timeout"] == 1.5 and item.payload["cooldown"] == 0.2
    assert item.key == s.id


def test_event_from_a_write_hook_change(core: Context) -> None:
    from cityward.bank.changes import Change

    before = vehicle(core, 40)
    change = Change("", 1, before["id"], before, None, "2024-06-01T12:00:00.000000Z")
    event = ChangeEvent.from_change(change)
    assert event.kind == "delete" and event.at == change.at
    s = sub(core, notificationTrigger=["entityDeleted"])
    data = notify(s, event, core)["body"]["data"][0]
    assert data["deletedAt"] == change.at


def test_a_filter_that_backtracks_without_end_does_not_hold_up_the_write(
    core: Context, caplog: pytest.LogCaptureFixture
) -> None:
    """q=name~="(a+)+b" against a long run of a's: Python's re backtracked for ever inside the
    write that was being matched. The search gives up: that subscription does not fire (and
    the matcher says why), the others do."""
    costly = sub(core, q='name~="(a+)+b"')
    plain = sub(core)
    index = SubscriptionIndex([costly, plain])

    def named(value: str) -> dict[str, Any]:
        return entity(core, name={"type": "Property", "value": value})

    event = update(named("x"), named("a" * 2000 + "c"))
    with caplog.at_level("ERROR", logger="cityward.bank.subscriptions"):
        fired = {s.id for s, _ in index.match(event, now=NOW)}
    assert fired == {plain.id}
    assert any(costly.id in r.getMessage() and r.exc_info for r in caplog.records)
    # on an ordinary value the same filter is an ordinary search
    short = update(named("x"), named("aab"))
    assert {s.id for s, _ in index.match(short, now=NOW)} == {costly.id, plain.id}
