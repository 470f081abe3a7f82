"""Smart Data Models examples round-trip through create and retrieve, on both backends.

Every ``<Type>/`` folder under ``../shared/data/ngsi-ld/smartdatamodels`` holds a normalized
example (``example-normalized.jsonld``) and a key-values one (``example.jsonld``), both with
their ``@context``. Each example is created with ``application/ld+json`` and read back in the
normalized, keyValues and concise representations (NGSI-LD.md, A "Representations").

Multi-URL contexts (core + data model) do not fit a Link header, so every read is done twice:
GET with the data model URL in the Link header (the core context is always implied), and
POST /entityOperations/query with the example's own @context in the body.

Some examples break an NGSI-LD rule this broker enforces. They are not skipped: ``RULE_BREAKS``
lists each one, ``test_rule_break_is_rejected`` checks the exact 400, and the round trips run on
a copy with that one value fixed. Typed values (``{"@type": "DateTime", "@value": ...}``) are
kept verbatim, and q compares their ``@value``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.bank.jsonld import CORE_CONTEXT_URL, JSONLD_CONTEXT_REL, is_core_url
from tests.conftest import SDM, shared_path

E = "/ngsi-ld/v1/entities"
QUERY = "/ngsi-ld/v1/entityOperations/query"
LD = "application/ld+json"
BAD_REQUEST_DATA = "https://uri.etsi.org/ngsi-ld/errors/BadRequestData"
SDM_DIR = ("data", "ngsi-ld", "smartdatamodels")
NORMALIZED = "example-normalized.jsonld"
KEY_VALUES = "example.jsonld"
PAYLOAD_MEMBERS = {"value", "object", "languageMap", "valueList", "objectList", "json", "vocab"}
GEOJSON_TYPES = {
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
}

Entity = dict[str, Any]


def _type_folders() -> list[str]:
    """The example folders (ids of the parametrized tests), read when the module is collected.

    Without ../shared there is one placeholder; its test then skips (or fails in CI) through
    ``shared_path``, like every other test that needs the shared data.
    """
    if not SDM.is_dir():
        return ["shared-data-missing"]
    return sorted(d.name for d in SDM.iterdir() if d.is_dir() and not d.name.startswith("_"))


TYPES = _type_folders()


def load(type_name: str, file_name: str) -> Entity:
    data = json.loads(shared_path(*SDM_DIR, type_name, file_name).read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


# -- the examples that break a rule, each with the fix applied before the round trip ---------
@dataclass(frozen=True)
class RuleBreak:
    """One value of one example that the broker rejects, and how the round trip fixes it."""

    type_name: str
    file_name: str
    fix: Callable[[Entity], None]
    field: str  # the ProblemDetails field of the 400 BadRequestData
    detail: str  # a fragment of its detail

    @property
    def id(self) -> str:
        return f"{self.type_name}-{self.file_name}"


def _vehicle_observed_at_in_utc(entity: Entity) -> None:
    # 2021-03-11T15:51:02+05:30 is 2021-03-11T10:21:02Z
    assert entity["battery"]["observedAt"] == "2021-03-11T15:51:02+05:30"
    entity["battery"]["observedAt"] = "2021-03-11T10:21:02Z"


def _device_without_value_attribute(entity: Entity) -> None:
    del entity["value"]


def _road_accident_latitude_in_range(entity: Entity) -> None:
    # example-normalized.jsonld has the same point with latitude 88.370658
    assert entity["location"]["coordinates"] == [-56.6404505, 168.370658]
    entity["location"]["coordinates"] = [-56.6404505, 88.370658]


RULE_BREAKS = [
    # NGSI-LD.md A: observedAt is a UTC DateTime; "an offset such as +02:00 ... → 400".
    RuleBreak(
        "Vehicle",
        NORMALIZED,
        _vehicle_observed_at_in_utc,
        "battery.observedAt",
        "'2021-03-11T15:51:02+05:30'",
    ),
    # NGSI-LD.md A: core terms ("datasetId", "observedAt", …) cannot name attributes. The list
    # there is open; we follow the broker, which counts "value" (the core term for
    # ngsi-ld:hasValue, and the core context is applied last, so no data model can remap it).
    *(
        RuleBreak("Device", f, _device_without_value_attribute, "value", "'value' is reserved")
        for f in (NORMALIZED, KEY_VALUES)
    ),
    # NGSI-LD.md D "Geo-query": an out-of-range lon/lat is an invalid geometry → 400.
    RuleBreak(
        "RoadAccident",
        KEY_VALUES,
        _road_accident_latitude_in_range,
        "location",
        "latitude 168.370658 is out of range",
    ),
]


def example(type_name: str, file_name: str) -> Entity:
    """An example as the broker accepts it: the known rule breaks fixed (see RULE_BREAKS)."""
    entity = load(type_name, file_name)
    for rb in RULE_BREAKS:
        if (rb.type_name, rb.file_name) == (type_name, file_name):
            rb.fix(entity)
    return entity


# -- contexts and requests --------------------------------------------------------------------
def domain_url(context: Any) -> str:
    """The data model's context URL: one URL fits a Link header, and the core one is implied."""
    urls = [u for u in (context if isinstance(context, list) else [context]) if not is_core_url(u)]
    assert len(urls) == 1 and isinstance(urls[0], str), context
    return urls[0]


def link(url: str) -> dict[str, str]:
    return {
        "Link": f'<{url}>; rel="http://www.w3.org/ns/json-ld#context"; type="application/ld+json"',
        "Accept": LD,
    }


def post_ld(client: TestClient, entity: Entity) -> None:
    r = client.post(E, content=json.dumps(entity), headers={"Content-Type": LD})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"{E}/{entity['id']}"


def get_ld(client: TestClient, eid: str, context: Any, options: str | None = None) -> Entity:
    """GET the entity as application/ld+json with the data model context in a Link header."""
    url = domain_url(context)
    params = {"options": options} if options else {}
    r = client.get(f"{E}/{eid}", params=params, headers=link(url))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(LD)
    body = r.json()
    assert isinstance(body, dict)
    assert body.pop("@context") == [url, CORE_CONTEXT_URL]
    return body


def query_ld(client: TestClient, entity: Entity, options: str | None = None) -> Entity:
    """POST /entityOperations/query with the example's own (possibly multi-URL) @context."""
    context = entity["@context"]
    query = {
        "type": "Query",
        "entities": [{"type": entity["type"], "id": entity["id"]}],
        "@context": context,
    }
    params = {"options": options} if options else {}
    r = client.post(
        QUERY, params=params, content=json.dumps(query), headers={"Content-Type": LD, "Accept": LD}
    )
    assert r.status_code == 200, r.text
    found = r.json()
    assert isinstance(found, list) and len(found) == 1, found
    body = found[0]
    assert isinstance(body, dict)
    # the request context comes back, with the core context added when it was not named
    has_core = any(is_core_url(u) for u in context)
    assert body.pop("@context") == (context if has_core else [*context, CORE_CONTEXT_URL])
    return body


# -- what the representations of an input entity must be -------------------------------------
def _normalized_instance(inst: Entity) -> Entity:
    out: Entity = {}
    for key, val in inst.items():
        if key == "datasetId" and val == "@none":
            continue  # the default instance: the output leaves it out
        if key == "value" and inst["type"] == "Property":
            out[key] = val
        elif key == "objectList":  # the output gives {"object": URI} items
            out[key] = [o if isinstance(o, dict) else {"object": o} for o in val]
        elif key not in PAYLOAD_MEMBERS and isinstance(val, dict):
            out[key] = _normalized_instance(val)  # a sub-attribute
        else:
            out[key] = val
    return out


def expected_normalized(entity: Entity) -> Entity:
    """The normalized output for a normalized input (NGSI-LD.md A, with its normalisations)."""
    out: Entity = {}
    for key, val in entity.items():
        if key == "@context":
            continue
        if key in ("id", "@id"):
            out["id"] = val
        elif key in ("type", "@type"):
            out["type"] = val[0] if isinstance(val, list) and len(val) == 1 else val
        elif isinstance(val, list):
            instances = [_normalized_instance(i) for i in val]
            out[key] = instances[0] if len(instances) == 1 else instances
        else:
            out[key] = _normalized_instance(val)
    return out


def _key_value(inst: Entity) -> Any:
    """NGSI-LD.md A, "Simplified / keyValues": an attribute becomes its value, object, ..."""
    kind = inst["type"]
    if kind == "Property":
        return inst["value"]
    if kind == "GeoProperty":
        return inst["value"]
    if kind == "Relationship":
        return inst["object"]
    if kind == "LanguageProperty":
        return {"languageMap": inst["languageMap"]}
    if kind == "ListProperty":
        return inst["valueList"]
    if kind == "ListRelationship":
        return [o["object"] if isinstance(o, dict) else o for o in inst["objectList"]]
    pytest.fail(f"no keyValues rule for a {kind} here yet; extend _key_value")


def expected_key_values(entity: Entity) -> Entity:
    out = {k: v for k, v in expected_normalized(entity).items() if k in ("id", "type")}
    for key, val in entity.items():
        if key in ("@context", "id", "@id", "type", "@type"):
            continue
        values = [_key_value(i) for i in (val if isinstance(val, list) else [val])]
        out[key] = values[0] if len(values) == 1 else values
    return out


def as_concise_input(key_values: Entity) -> Entity:
    """A key-values example as concise input.

    In concise form a bare JSON object is an attribute (with sub-attributes), unless it is a
    GeoJSON geometry; a compound value must be written ``{"value": ...}`` (NGSI-LD.md A,
    "Concise": a type-less ``{value, …sub-attrs}`` is a Property).
    """
    out: Entity = {}
    for key, val in key_values.items():
        compound = isinstance(val, dict) and val.get("type") not in GEOJSON_TYPES
        out[key] = {"value": val} if compound and key != "@context" else val
    return out


def as_input(entity: Entity, file_name: str) -> Entity:
    """The create body of an example: a key-values one goes in as concise input."""
    return as_concise_input(entity) if file_name == KEY_VALUES else entity


# -- the round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", TYPES)
def test_normalized_round_trip(client: TestClient, type_name: str) -> None:
    entity = example(type_name, NORMALIZED)
    post_ld(client, entity)
    expected = expected_normalized(entity)
    assert get_ld(client, entity["id"], entity["@context"]) == expected
    assert query_ld(client, entity) == expected


@pytest.mark.parametrize("type_name", TYPES)
def test_key_values_output(client: TestClient, type_name: str) -> None:
    entity = example(type_name, NORMALIZED)
    post_ld(client, entity)
    expected = expected_key_values(entity)
    assert get_ld(client, entity["id"], entity["@context"], "keyValues") == expected
    assert query_ld(client, entity, "keyValues") == expected


@pytest.mark.parametrize("type_name", TYPES)
def test_concise_round_trip(client: TestClient, type_name: str) -> None:
    entity = example(type_name, NORMALIZED)
    context = entity["@context"]
    post_ld(client, entity)
    concise = get_ld(client, entity["id"], context, "concise")
    assert query_ld(client, entity, "concise") == concise
    # "type" is left out wherever it can be inferred
    for name, attr in concise.items():
        if isinstance(attr, dict):
            assert attr.get("type") not in ("Property", "Relationship"), (name, attr)

    copy_id = f"{entity['id']}:concise-copy"
    post_ld(client, {**concise, "id": copy_id, "@context": context})
    expected = {**expected_normalized(entity), "id": copy_id}
    assert get_ld(client, copy_id, context) == expected


@pytest.mark.parametrize("type_name", TYPES)
def test_key_values_example(client: TestClient, type_name: str) -> None:
    key_values = example(type_name, KEY_VALUES)
    concise = as_concise_input(key_values)
    compound = {k for k, v in key_values.items() if concise[k] != v}
    if compound:
        # as published, a bare JSON object value is read as an attribute, and rejected
        r = client.post(E, content=json.dumps(key_values), headers={"Content-Type": LD})
        assert r.status_code == 400, r.text
        assert r.json()["type"] == BAD_REQUEST_DATA
        assert r.json()["field"] in compound
    post_ld(client, concise)
    expected = {k: v for k, v in key_values.items() if k != "@context"}
    assert get_ld(client, key_values["id"], key_values["@context"], "keyValues") == expected
    assert query_ld(client, key_values, "keyValues") == expected


# -- the known rule breaks ---------------------------------------------------------------------
@pytest.mark.parametrize("rule_break", RULE_BREAKS, ids=[rb.id for rb in RULE_BREAKS])
def test_rule_break_is_rejected(client: TestClient, rule_break: RuleBreak) -> None:
    """The example as published is refused with a 400 that names the one offending value."""
    original = load(rule_break.type_name, rule_break.file_name)
    body = as_input(original, rule_break.file_name)
    r = client.post(E, content=json.dumps(body), headers={"Content-Type": LD})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")
    problem = r.json()
    assert problem["type"] == BAD_REQUEST_DATA
    assert problem["field"] == rule_break.field
    assert rule_break.detail in problem["detail"]
    assert client.get(f"{E}/{original['id']}").status_code == 404
    # with that one value fixed, the same body is accepted
    rule_break.fix(original)
    post_ld(client, as_input(original, rule_break.file_name))


def test_typed_value_keeps_its_type(client: TestClient) -> None:
    entity = example("Alert", NORMALIZED)
    typed = entity["dateIssued"]["value"]
    if typed != {"@type": "DateTime", "@value": "2017-01-02T09:25:55.00Z"}:
        pytest.fail(f"Alert/{NORMALIZED} changed: dateIssued is {typed!r}")
    post_ld(client, entity)
    assert get_ld(client, entity["id"], entity["@context"])["dateIssued"]["value"] == typed
    # q compares the @value of a typed value
    link = f'<{domain_url(entity["@context"])}>; rel="{JSONLD_CONTEXT_REL}"'
    for q, hits in (("dateIssued==2017-01-02T09:25:55.00Z", 1), ("dateIssued<2017-01-01", 0)):
        r = client.get(E, params={"type": "Alert", "q": q}, headers={"Link": link})
        assert r.status_code == 200, r.text
        assert len(r.json()) == hits, q
