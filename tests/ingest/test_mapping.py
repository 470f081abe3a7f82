"""The declarative payload mapping: valid configs map real-looking payloads exactly; bad configs
fail on load with the offending setting; bad payloads raise MappingError naming the field."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from cityward.ingest.mapping import Mapping, MappingConfig, MappingError, compile_path, resolve

AIR: dict[str, Any] = {
    "entity_type": "AirQualityObserved",
    "id": "urn:ngsi-ld:AirQualityObserved:{$.dev}",
    "timestamp": {"path": "$.ts", "format": "epoch_s"},
    "message_id": "$.seq",
    "attributes": {
        "no2": {"path": "$.r.no2", "unit": "GQ"},
        "pm10": {"path": '$.r["pm-10"]', "unit": "GQ"},
        "temperature": {"path": "$.r.t_dk", "unit": "CEL", "scale": 0.1, "offset": -273.15},
        "battery": {"path": "$.bat[0]", "kind": "integer"},
    },
    "location": {"lon": "$.gps[0]", "lat": "$.gps[1]"},
}
PAYLOAD: dict[str, Any] = {
    "dev": "aq-17",
    "ts": 1795400000,
    "seq": 991,
    "r": {"no2": 41.5, "pm-10": "23", "t_dk": 2931.5},
    "bat": [87, "ok"],
    "gps": [3.7215, 51.0543],
}


def test_paths_compile_and_resolve() -> None:
    assert compile_path("$") == ()
    assert compile_path('$.a.b[0]["c.d"][-1]') == ("a", "b", 0, "c.d", -1)
    doc = {"a": {"b": [{"c.d": [1, 2, 3]}]}}
    assert resolve(doc, compile_path('$.a.b[0]["c.d"][-1]')) == 3
    assert resolve(doc, compile_path("$.a.x")) is not None  # the missing marker, not None
    for bad in ("a.b", "$.a..b", "$[x]", "$.a[", '$["a]'):
        with pytest.raises(ValueError, match="path"):
            compile_path(bad)


def test_a_payload_maps_to_one_exact_update() -> None:
    m = Mapping(MappingConfig.model_validate(AIR))
    u = m.apply(PAYLOAD)
    at = "2026-11-23T02:13:20.000Z"  # 1795400000 s after 1970-01-01T00:00:00Z
    assert u.entity_id == "urn:ngsi-ld:AirQualityObserved:aq-17"
    assert u.entity_type == "AirQualityObserved"
    assert u.observed_at == at
    assert u.message_key == "m:991"
    assert u.attrs["no2"] == {"type": "Property", "value": 41.5, "observedAt": at, "unitCode": "GQ"}
    assert u.attrs["pm10"]["value"] == 23.0  # a number sent as a string
    # scaled in decimal, as docs/ingest.md says: 20.0, not 20.000000000000057
    assert u.attrs["temperature"]["value"] == 20.0
    assert u.attrs["battery"]["value"] == 87
    assert "unitCode" not in u.attrs["battery"]
    assert u.attrs["location"] == {
        "type": "GeoProperty",
        "value": {"type": "Point", "coordinates": [3.7215, 51.0543]},
    }
    frag = u.fragment()
    assert frag["id"] == u.entity_id and frag["type"] == "AirQualityObserved"


def test_topic_levels_time_formats_and_defaults() -> None:
    cfg = {
        "entity_type": "NoiseLevelObserved",
        "id": "urn:ngsi-ld:NoiseLevelObserved:{topic[1]}:{topic[-1]}",
        "timestamp": {"path": "$.when", "format": "iso8601"},
        "attributes": {"LAeq": {"path": "$.db"}},
    }
    m = Mapping(MappingConfig.model_validate(cfg))
    u = m.apply({"db": 55, "when": "2026-11-23T10:00:00+01:00"}, topic="city/ghent/noise/n4")
    assert u.entity_id == "urn:ngsi-ld:NoiseLevelObserved:ghent:n4"
    assert u.observed_at == "2026-11-23T09:00:00.000Z"
    # no message id: the key is the entity and the observation time (a retry maps the same)
    assert u.message_key == "o:2026-11-23T09:00:00.000Z@urn:ngsi-ld:NoiseLevelObserved:ghent:n4"
    ms = dict(cfg, timestamp={"path": "$.when", "format": "epoch_ms"})
    u2 = Mapping(MappingConfig.model_validate(ms)).apply(
        {"db": 1, "when": 1795400000123}, topic="a/b"
    )
    assert u2.observed_at == "2026-11-23T02:13:20.123Z"
    # no timestamp configured: the time of receipt
    plain = dict(cfg)
    del plain["timestamp"]
    got = Mapping(MappingConfig.model_validate(plain)).apply(
        {"db": 1}, topic="a/b", received_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    )
    assert got.observed_at == "2026-01-02T03:04:05.000Z"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"dev": None}, "$.dev", "id is missing"),
        ({"dev": {"x": 1}}, "$.dev", "string or an integer"),
        ({"dev": "a b"}, "id", "cannot go into an entity id"),
        ({"ts": "yesterday"}, "$.ts", "not a time in epoch_s"),
        ({"ts": None}, "$.ts", "time is missing"),
        ({"seq": None}, "$.seq", "message id is missing"),
        # the bank keeps each message's key: PostgreSQL stores no NUL, indexes no long row
        ({"seq": "a\x00b"}, "$.seq", "without a NUL character"),
        ({"seq": "x" * 511}, "$.seq", "at most 510 bytes"),
        ({"dev": "d" * 1000}, "id", "longer than 1000 bytes"),
        ({"r": {"no2": "n/a"}}, "$.r.no2", "expected a number"),
        ({"r": {"no2": True}}, "$.r.no2", "expected a number"),
        # Python's float() reads these; JSON does not
        ({"r": {"no2": "1_0"}}, "$.r.no2", "expected a number"),
        ({"r": {"no2": "\u0663"}}, "$.r.no2", "expected a number"),
        ({"gps": [True, 51.0]}, "location", "must be numbers"),
        ({"ts": True}, "$.ts", "not a time in epoch_s"),
        ({"bat": [87.5]}, "$.bat[0]", "expected an integer"),
        # past 64 bits no store takes it: it stalled the writer (orjson could not write it)
        ({"bat": [1e20]}, "$.bat[0]", "not a 64-bit integer"),
        ({"bat": ["9223372036854775808"]}, "$.bat[0]", "not a 64-bit integer"),
        ({"gps": [3.7, 99.0]}, "location", "not a WGS84"),
        ({"gps": ["x", 1]}, "location", "must be numbers"),
        ({"r": {}, "bat": [], "gps": []}, "$", "none of the mapped attributes"),
    ],
)
def test_a_bad_payload_names_the_field(change: dict[str, Any], field: str, reason: str) -> None:
    m = Mapping(MappingConfig.model_validate(AIR))
    with pytest.raises(MappingError) as err:
        m.apply({**PAYLOAD, **change})
    assert err.value.field == field
    assert reason in err.value.reason


def test_a_text_with_a_nul_character_is_refused() -> None:
    cfg = dict(AIR, attributes={"status": {"path": "$.s", "kind": "string"}})
    m = Mapping(MappingConfig.model_validate(cfg))
    assert m.apply({**PAYLOAD, "s": "ok"}).attrs["status"]["value"] == "ok"
    # JSON scalars as JSON writes them (str() gave "True")
    for raw, text in ((True, "true"), (False, "false"), (12, "12"), (1.5, "1.5")):
        assert m.apply({**PAYLOAD, "s": raw}).attrs["status"]["value"] == text
    with pytest.raises(MappingError) as err:
        m.apply({**PAYLOAD, "s": "o\x00k"})
    assert err.value.field == "$.s" and "NUL" in err.value.reason
    assert m.apply({**PAYLOAD, "seq": "x" * 510}).message_key == "m:" + "x" * 510


def test_not_an_object_and_missing_required_and_topic() -> None:
    m = Mapping(MappingConfig.model_validate(AIR))
    with pytest.raises(MappingError, match="expected a JSON object"):
        m.apply([1, 2])
    cfg = dict(AIR, attributes={"no2": {"path": "$.r.no2", "required": True}, "x": {"path": "$.x"}})
    with pytest.raises(MappingError) as err:
        Mapping(MappingConfig.model_validate(cfg)).apply({**PAYLOAD, "r": {}, "x": 1})
    assert err.value.field == "$.r.no2" and "required" in err.value.reason
    by_topic = dict(AIR, id="urn:ngsi-ld:AirQualityObserved:{topic[3]}")
    with pytest.raises(MappingError, match="no level 3"):
        Mapping(MappingConfig.model_validate(by_topic)).apply(PAYLOAD, topic="a/b")


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (2**53 + 1, 2**53 + 1),
        (2**63 - 1, 2**63 - 1),
        ("9007199254740995", 9007199254740995),
        (" -9007199254740993 ", -(2**53 + 1)),
    ],
)
def test_integers_stay_exact(raw: Any, want: int) -> None:
    """Read through a float, 2**53 + 1 was stored as 2**53 and 2**63 - 1 was refused."""
    m = Mapping(MappingConfig.model_validate(AIR))
    got = m.apply({**PAYLOAD, "bat": [raw]}).attrs["battery"]["value"]
    assert type(got) is int and got == want


def test_an_integer_past_what_python_reads_is_refused_as_too_large() -> None:
    m = Mapping(MappingConfig.model_validate(AIR))
    with pytest.raises(MappingError, match="not a 64-bit integer") as err:
        m.apply({**PAYLOAD, "bat": ["9" * 5000]})
    assert err.value.field == "$.bat[0]"


def test_a_value_scaled_past_the_float_range_is_refused() -> None:
    """Finite, but infinite once scaled: it was stored as null."""
    cfg = dict(AIR, attributes={"power": {"path": "$.p", "scale": 1e300}})
    with pytest.raises(MappingError, match="out of range once scaled") as err:
        Mapping(MappingConfig.model_validate(cfg)).apply({**PAYLOAD, "p": 1e10})
    assert err.value.field == "$.p"


@pytest.mark.parametrize("when", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+01:00"])
def test_an_iso_time_past_the_calendar_in_utc_is_refused(when: str) -> None:
    """An offset that takes the time past year 9999 or before year 1 in UTC: the uncaught
    OverflowError ended the MQTT reader and answered an HTTP push with a 500."""
    cfg = dict(AIR, timestamp={"path": "$.ts", "format": "iso8601"})
    with pytest.raises(MappingError, match="not a time in iso8601") as err:
        Mapping(MappingConfig.model_validate(cfg)).apply({**PAYLOAD, "ts": when})
    assert err.value.field == "$.ts"


def test_readings_stamped_at_receipt_never_share_a_key() -> None:
    """Without message_id and timestamp, two readings of a device received in the same
    millisecond had the same key, and the writer dropped the second as a repeat."""
    plain = {k: v for k, v in AIR.items() if k not in ("message_id", "timestamp")}
    m = Mapping(MappingConfig.model_validate(plain))
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    keys = {m.apply(PAYLOAD, received_at=at).message_key for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("r:2026-01-02T03:04:05.000Z@") for k in keys)


def test_readings_less_than_a_millisecond_apart_have_keys_of_their_own() -> None:
    """observedAt is cut to the millisecond; the key was made of that cut time, so the second
    of two readings 0.8 ms apart was accepted and then dropped as a repeat. Whole-millisecond
    times keep the key an earlier version wrote (a resumed replay finds them)."""
    cfg = {k: v for k, v in AIR.items() if k != "message_id"}
    cfg["timestamp"] = {"path": "$.ts", "format": "iso8601"}
    m = Mapping(MappingConfig.model_validate(cfg))
    eid = "urn:ngsi-ld:AirQualityObserved:aq-17"
    a = m.apply({**PAYLOAD, "ts": "2026-01-01T00:00:00.000100Z"})
    b = m.apply({**PAYLOAD, "ts": "2026-01-01T01:00:00.000900+01:00"})
    assert a.observed_at == b.observed_at == "2026-01-01T00:00:00.000Z"
    assert a.message_key == f"o:2026-01-01T00:00:00.000100Z@{eid}"
    assert b.message_key == f"o:2026-01-01T00:00:00.000900Z@{eid}"
    whole = m.apply({**PAYLOAD, "ts": "2026-01-01T01:00:00.123+01:00"})
    assert whole.message_key == f"o:2026-01-01T00:00:00.123Z@{eid}"
    ms = Mapping(
        MappingConfig.model_validate(dict(cfg, timestamp={"path": "$.ts", "format": "epoch_ms"}))
    )
    assert ms.apply({**PAYLOAD, "ts": 1795400000123}).message_key == (
        f"o:2026-11-23T02:13:20.123Z@{eid}"
    )
    half = ms.apply({**PAYLOAD, "ts": 1795400000123.5})
    assert half.observed_at == "2026-11-23T02:13:20.123Z"
    assert half.message_key == f"o:2026-11-23T02:13:20.123500Z@{eid}"


def test_naive_iso_time_is_refused() -> None:
    cfg = dict(AIR, timestamp={"path": "$.ts", "format": "iso8601"})
    with pytest.raises(MappingError, match="no time zone"):
        Mapping(MappingConfig.model_validate(cfg)).apply({**PAYLOAD, "ts": "2026-11-23T10:00:00"})


@pytest.mark.parametrize(
    ("change", "where", "message"),
    [
        ({"id": "AirQualityObserved:{$.dev}"}, "id", "URN"),
        ({"id": "urn:ngsi-ld:AirQualityObserved:one"}, "id", "placeholder"),
        ({"id": "urn:x:{dev}"}, "id", "path starts with"),
        ({"entity_type": "Air Quality"}, "entity_type", "letters"),
        ({"attributes": {}}, "attributes", "at least one"),
        ({"attributes": {"id": {"path": "$.x"}}}, "attributes", "not one of"),
        ({"attributes": {"no2": {"path": "$.r..no2"}}}, "attributes.no2.path", "cannot read"),
        (
            {"attributes": {"s": {"path": "$.s", "kind": "string", "scale": 2}}},
            "attributes.s",
            "numbers",
        ),
        ({"timestamp": {"path": "$.ts", "format": "unix"}}, "timestamp.format", ""),
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_a_bad_config_fails_on_load_with_the_setting(
    change: dict[str, Any], where: str, message: str
) -> None:
    with pytest.raises(ValidationError) as err:
        MappingConfig.model_validate({**AIR, **change})
    errors = err.value.errors()
    locs = [".".join(str(p) for p in e["loc"]) for e in errors]
    assert any(loc.startswith(where) for loc in locs), locs
    assert message in str(err.value)


@pytest.mark.parametrize(
    "name", ["createdAt", "modifiedAt", "observedAt", "value", "scope", "unitCode", "datasetId"]
)
def test_an_attribute_named_after_an_ngsi_ld_term_fails_on_load(name: str) -> None:
    """Accepted before: the fast path stored readings under a reserved name (or, with a json
    attribute, the bank refused every message at run time)."""
    cfg = dict(AIR, attributes={name: {"path": "$.v", "kind": "string"}, "no2": {"path": "$.n"}})
    with pytest.raises(ValidationError) as err:
        MappingConfig.model_validate(cfg)
    assert [e["loc"] for e in err.value.errors()] == [("attributes",)]
    assert f"attribute name {name!r} is reserved in NGSI-LD" in str(err.value)


def test_location_is_mapped_with_its_own_setting() -> None:
    with pytest.raises(ValidationError, match="map a position with the mapping's location"):
        MappingConfig.model_validate(dict(AIR, attributes={"location": {"path": "$.gps"}}))


def test_observation_times_are_written_like_isoformat() -> None:
    """The cached formatting of observation times gives isoformat's text to the millisecond
    (truncated), for times in any zone, before 1970 and across second boundaries."""
    import random
    from datetime import timedelta, timezone

    from cityward.ingest.mapping import _iso

    rng = random.Random(7)
    for _ in range(20_000):
        at = datetime.fromtimestamp(rng.uniform(-3e10, 4e9), UTC)
        if rng.random() < 0.3:
            at = at.astimezone(timezone(timedelta(minutes=rng.randint(-720, 840))))
        want = at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        assert _iso(at) == want
        assert _iso(at + timedelta(milliseconds=999)) == (
            at + timedelta(milliseconds=999)
        ).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
