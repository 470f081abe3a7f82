"""Malformed requests and the exact ProblemDetails they get, on both backends.

Each row of a table is one bad request with the status, the error type and the `field` member
(the part of the request to blame) the broker must answer. Every rejected request must also leave
nothing written: the tests compare the whole store before and after.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient

from cityward.api.app import create_app
from cityward.bank.store import Store
from cityward.bank.store.sqlite import SqliteStore
from cityward.config import Settings
from tests.conftest import SDM, drop_pg_store, make_pg_store, sdm_context_map

BASE = "/ngsi-ld/v1"
E = f"{BASE}/entities"
OPS = f"{BASE}/entityOperations"
V1 = "urn:ngsi-ld:Vehicle:V1"  # stored before every request of the tables
V2 = "urn:ngsi-ld:Vehicle:V2"  # what the create rows try to create
U1 = f"{E}/{V1}"
TENANT = "nowhere"  # a tenant that is never created
CORE = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.9.jsonld"
JSONLD_REL = "http://www.w3.org/ns/json-ld#context"
NGSI_NULL = "urn:ngsi-ld:null"
ERRORS = "https://uri.etsi.org/ngsi-ld/errors/"
# plain HTTP errors: no NGSI-LD error type fits them, so their ProblemDetails say about:blank
HTTP_LEVEL = frozenset(
    {
        "MethodNotAllowed",
        "NotAcceptable",
        "LengthRequired",
        "PayloadTooLarge",
        "UnsupportedMediaType",
    }
)


# -- requests and expected problems ---------------------------------------------------------------
@dataclass(frozen=True)
class Req:
    """One HTTP request: a JSON body (``json``) or bytes sent as they are (``raw``)."""

    method: str
    url: str
    json: Any = None
    raw: bytes | None = None
    params: Mapping[str, str] | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Problem:
    status: int
    error: str
    field: str | None


@dataclass(frozen=True)
class Case:
    name: str
    req: Req
    expected: Problem


def bad(field: str | None) -> Problem:
    return Problem(400, "BadRequestData", field)


def invalid(field: str | None) -> Problem:
    return Problem(400, "InvalidRequest", field)


UNSUPPORTED = Problem(415, "UnsupportedMediaType", "Content-Type")
NOT_ACCEPTABLE = Problem(406, "NotAcceptable", "Accept")
NO_TENANT = Problem(404, "NonexistentTenant", "NGSILD-Tenant")
NO_CONTEXT = Problem(504, "LdContextNotAvailable", "@context")


def link(url: str) -> dict[str, str]:
    return {"Link": f'<{url}>; rel="{JSONLD_REL}"; type="application/ld+json"'}


def v2(**members: Any) -> dict[str, Any]:
    """The entity the create rows post, with extra (usually broken) members."""
    return {"id": V2, "type": "Vehicle", **members}


def create(**members: Any) -> Req:
    return Req("POST", E, json=v2(**members))


def ld(method: str, url: str, body: Any, headers: Mapping[str, str] | None = None) -> Req:
    """A request with an application/ld+json body."""
    raw = json.dumps(body).encode()
    return Req(
        method, url, raw=raw, headers={"Content-Type": "application/ld+json", **(headers or {})}
    )


def query(**params: str) -> Req:
    """GET /entities with type=Vehicle (a qualifying filter) and more parameters."""
    return Req("GET", E, params={"type": "Vehicle", **params})


def geo_query(georel: str, geometry: str, coordinates: str) -> Req:
    return query(georel=georel, geometry=geometry, coordinates=coordinates)


def post_query(body: Any) -> Req:
    return Req("POST", f"{OPS}/query", json=body)


def vq(members: dict[str, Any]) -> Req:
    """POST /entityOperations/query for Vehicles, with more members."""
    return post_query({"type": "Query", "entities": [{"type": "Vehicle"}], **members})


def raw(method: str, url: str, data: bytes, content_type: str) -> Req:
    """A request whose body is sent as it is, with this Content-Type."""
    return Req(method, url, raw=data, headers={"Content-Type": content_type})


def point(*coordinates: Any) -> dict[str, Any]:
    return {"type": "Point", "coordinates": list(coordinates)}


def geo(value: Any) -> dict[str, Any]:
    return {"type": "GeoProperty", "value": value}


def prop(value: Any, **members: Any) -> dict[str, Any]:
    return {"type": "Property", "value": value, **members}


def rel(obj: Any = "urn:ngsi-ld:Person:P1", **members: Any) -> dict[str, Any]:
    return {"type": "Relationship", "object": obj, **members}


def lang(language_map: Any) -> dict[str, Any]:
    return {"type": "LanguageProperty", "languageMap": language_map}


SQUARE = [[[0, 0], [0, 1], [1, 1], [1, 0], [0, 0]]]
UNCLOSED = [[[0, 0], [0, 1], [1, 1], [1, 0]]]
GOOD_TIME = "2024-01-01T10:00:00Z"


# -- the tables -----------------------------------------------------------------------------------
# Entity ids: no scheme, whitespace, '<', zero-width, bidi, BOM, no-break space, control chars.
BAD_IDS = {
    "no-scheme": "Vehicle-V9",
    "space": "urn:ngsi-ld:Vehicle:V 9",
    "less-than": "urn:ngsi-ld:Vehicle:<V9>",
    "zero-width-space": "urn:ngsi-ld:Vehicle:V\u200b9",
    "zero-width-joiner": "urn:ngsi-ld:Vehicle:V\u200d9",
    "bidi-override": "urn:ngsi-ld:Vehicle:V\u202e9",
    "bidi-isolate": "urn:ngsi-ld:Vehicle:V\u20669",
    "bom": "\ufeffurn:ngsi-ld:Vehicle:V9",
    "no-break-space": "urn:ngsi-ld:Vehicle:V\u00a09",
    "control-char": "urn:ngsi-ld:Vehicle:V\x079",
}


def _path(eid: str) -> str:
    return f"{E}/{quote(eid, safe=':')}"


ID_CASES = [
    *(
        Case(f"body-{n}", Req("POST", E, json={"id": i, "type": "Vehicle"}), bad("id"))
        for n, i in BAD_IDS.items()
    ),
    # ("$" took a final newline: the id was stored with it)
    Case(
        "body-trailing-newline",
        Req("POST", E, json={"id": "urn:ngsi-ld:Vehicle:V9\n", "type": "Vehicle"}),
        bad("id"),
    ),
    *(Case(f"path-get-{n}", Req("GET", _path(i)), bad("id")) for n, i in BAD_IDS.items()),
    *(
        Case(f"path-append-{n}", Req("POST", f"{_path(i)}/attrs", json={"speed": 1}), bad("id"))
        for n, i in BAD_IDS.items()
    ),
    *(
        Case(
            f"path-{m.lower()}{suffix.replace('/', '-')}",
            Req(m, f"{_path(BAD_IDS['less-than'])}{suffix}", json=body),
            bad("id"),
        )
        for m, suffix, body in (
            ("DELETE", "", None),
            ("PUT", "", {"type": "Vehicle"}),
            ("PATCH", "", {"speed": 1}),
            ("PATCH", "/attrs", {"speed": 1}),
            ("PATCH", "/attrs/speed", {"value": 1}),
            ("PUT", "/attrs/speed", prop(1)),
            ("DELETE", "/attrs/speed", None),
        )
    ),
    Case("path-empty-id", Req("POST", f"{E}//attrs", json={"speed": 1}), bad("id")),
    Case("body-id-missing", Req("POST", E, json={"type": "Vehicle"}), bad("id")),
    # a longer id failed PostgreSQL's unique index with an internal error
    Case(
        "body-id-too-long",
        Req("POST", E, json={"id": "urn:ngsi-ld:Vehicle:" + "v" * 1000, "type": "Vehicle"}),
        bad("id"),
    ),
    Case("body-id-number", Req("POST", E, json={"id": 9, "type": "Vehicle"}), bad("id")),
    Case("body-id-null", Req("POST", E, json={"id": None, "type": "Vehicle"}), bad("id")),
    Case("body-@id-bad", Req("POST", E, json={"@id": "V9", "type": "Vehicle"}), bad("id")),
    Case(
        "body-id-differs-from-path", Req("PUT", U1, json={"id": V2, "type": "Vehicle"}), bad("id")
    ),
    Case(
        "append-id-differs-from-path",
        Req("POST", f"{U1}/attrs", json={"id": V2, "speed": 1}),
        bad("id"),
    ),
    Case("type-missing", Req("POST", E, json={"id": V2}), bad("type")),
    Case("type-null", create(type=None), bad("type")),
    Case("type-empty-array", create(type=[]), bad("type")),
    Case("type-with-space", create(type="Electric Vehicle"), bad("type")),
    Case("type-object", create(type={"name": "Vehicle"}), bad("type")),
]

ATTRIBUTE_CASES = [
    Case(
        "property-without-value",
        create(speed={"type": "Property", "unitCode": "KMH"}),
        bad("speed"),
    ),
    Case("relationship-without-object", create(owner={"type": "Relationship"}), bad("owner")),
    # PostgreSQL stores no NUL character: on both stores such a text is refused, naming it
    Case("nul-in-a-value", create(name=prop("a\x00b")), bad("name.value")),
    Case("nul-in-a-json-member", create(spec=prop({"x": ["ok", "\x00"]})), bad("spec.value.x[1]")),
    Case("nul-in-an-attribute-name", create(**{"na\x00me": prop(1)}), bad("na\x00me")),
    Case(
        "nul-in-an-update",
        Req("PATCH", f"{U1}/attrs/speed", json={"value": "\x00"}),
        bad("speed.value"),
    ),
    Case("language-property-without-map", create(name={"type": "LanguageProperty"}), bad("name")),
    Case("concise-without-payload", create(speed={"unitCode": "KMH"}), bad("speed")),
    Case("relationship-with-unitCode", create(owner=rel(unitCode="KMH")), bad("owner")),
    Case("relationship-with-value", create(owner=rel(value=1)), bad("owner")),
    Case("relationship-object-not-uri", create(owner=rel("Person 1")), bad("owner.object")),
    Case("property-with-object", create(speed=prop(5, object="urn:ngsi-ld:X:1")), bad("speed")),
    Case("property-with-languageMap", create(speed=prop(5, languageMap={"en": "x"})), bad("speed")),
    Case("property-with-valueList", create(speed=prop(5, valueList=[5])), bad("speed")),
    Case("property-with-previousValue", create(speed=prop(5, previousValue=4)), bad("speed")),
    Case(
        "relationship-with-previousObject",
        create(owner=rel(previousObject="urn:ngsi-ld:P:0")),
        bad("owner"),
    ),
    Case("property-with-objectType", create(speed=prop(5, objectType="Person")), bad("speed")),
    Case("unknown-attribute-type", create(speed={"type": "Temperature", "value": 5}), bad("speed")),
    Case("attribute-type-array", create(speed={"type": ["Property"], "value": 5}), bad("speed")),
    Case("attribute-type-object", create(speed={"type": {"a": 1}, "value": 5}), bad("speed")),
    Case("unitCode-not-string", create(speed=prop(5, unitCode=5)), bad("speed")),
    Case("name-with-space", create(**{"max speed": prop(5)}), bad("max speed")),
    Case(
        "name-with-space-as-sub-attribute",
        create(speed=prop(5, **{"max speed": prop(1)})),
        bad("max speed"),
    ),
    *(
        Case(f"reserved-name-{name}", create(**{name: prop(5)}), bad(name))
        for name in (
            "observedAt",
            "datasetId",
            "instanceId",
            "unitCode",
            "value",
            "object",
            "previousValue",
        )
    ),
    Case("reserved-name-as-sub-attribute", create(speed=prop(5, scope=prop(1))), bad("scope")),
    Case("@context-in-attribute", create(speed=prop(5, **{"@context": CORE})), bad("speed")),
    Case(
        "@context-in-sub-attribute",
        create(speed=prop(5, accuracy=prop(1, **{"@context": CORE}))),
        bad("accuracy"),
    ),
    Case(
        "datasetId-on-sub-attribute",
        create(speed=prop(5, accuracy=prop(1, datasetId="urn:ngsi-ld:D:1"))),
        bad("accuracy"),
    ),
    Case("datasetId-not-uri", create(speed=prop(5, datasetId="radar 1")), bad("speed.datasetId")),
    Case(
        "multi-attribute-duplicate-datasetId",
        create(speed=[prop(5, datasetId="urn:ngsi-ld:D:1"), prop(6, datasetId="urn:ngsi-ld:D:1")]),
        bad("speed"),
    ),
    Case("multi-attribute-two-default-instances", create(speed=[prop(5), prop(6)]), bad("speed")),
    Case(
        "multi-attribute-@none-and-default",
        create(speed=[prop(5), prop(6, datasetId="@none")]),
        bad("speed"),
    ),
    Case(
        "multi-attribute-instance-without-value",
        create(speed=[prop(5), {"type": "Property", "datasetId": "urn:ngsi-ld:D:1"}]),
        bad("speed"),
    ),
    Case("language-value-number", create(name=lang({"en": 5})), bad("name")),
    Case("language-value-list-with-number", create(name=lang({"en": ["bus", 5]})), bad("name")),
    Case("language-value-object", create(name=lang({"en": {"text": "bus"}})), bad("name")),
    Case("language-map-array", create(name=lang(["bus"])), bad("name")),
    Case("language-map-empty", create(name=lang({})), bad("name")),
    Case("language-tag-underscore", create(name=lang({"en_GB": "bus"})), bad("name")),
    Case("language-tag-empty", create(name=lang({"": "bus"})), bad("name")),
    Case(
        "language-valueType-not-langString",
        create(name={**lang({"en": "bus"}), "valueType": "string"}),
        bad("name"),
    ),
]

NULL_CASES = [
    Case("json-null-attribute", create(speed=None), bad("speed")),
    Case("json-null-value", create(speed=prop(None)), bad("speed")),
    Case("json-null-object", create(owner=rel(None)), bad("owner")),
    Case("json-null-languageMap", create(name=lang(None)), bad("name")),
    Case("json-null-sub-attribute", create(speed=prop(5, accuracy=None)), bad("accuracy")),
    Case("json-null-observedAt", create(speed=prop(5, observedAt=None)), bad("speed.observedAt")),
    Case("json-null-scope", create(scope=None), bad("scope")),
    Case("ngsi-null-bare-on-create", create(speed=NGSI_NULL), bad("speed")),
    Case("ngsi-null-value-on-create", create(speed=prop(NGSI_NULL)), bad("speed")),
    Case("ngsi-null-object-on-create", create(owner=rel(NGSI_NULL)), bad("owner")),
    Case("ngsi-null-languageMap-on-create", create(name=lang({"@none": NGSI_NULL})), bad("name")),
    Case(
        "ngsi-null-valueList-on-create",
        create(tags={"type": "ListProperty", "valueList": [NGSI_NULL]}),
        bad("tags"),
    ),
    Case(
        "ngsi-null-json-on-create",
        create(raw={"type": "JsonProperty", "json": NGSI_NULL}),
        bad("raw"),
    ),
    Case(
        "ngsi-null-sub-attribute-on-create",
        create(speed=prop(5, accuracy=prop(NGSI_NULL))),
        bad("accuracy"),
    ),
    Case(
        "ngsi-null-observedAt-on-create",
        create(speed=prop(5, observedAt=NGSI_NULL)),
        bad("speed.observedAt"),
    ),
    Case("ngsi-null-scope-on-create", create(scope=NGSI_NULL), bad("scope")),
    Case(
        "ngsi-null-on-append", Req("POST", f"{U1}/attrs", json={"speed": NGSI_NULL}), bad("speed")
    ),
    Case(
        "ngsi-null-on-replace-entity",
        Req("PUT", U1, json={"type": "Vehicle", "speed": NGSI_NULL}),
        bad("speed"),
    ),
    Case(
        "ngsi-null-on-replace-attribute",
        Req("PUT", f"{U1}/attrs/speed", json=prop(NGSI_NULL)),
        bad("speed"),
    ),
    Case(
        "ngsi-null-sub-attribute-on-update",
        Req("PATCH", f"{U1}/attrs", json={"speed": prop(5, accuracy=NGSI_NULL)}),
        bad("accuracy"),
    ),
    Case("json-null-on-merge", Req("PATCH", U1, json={"speed": None}), bad("speed")),
    Case(
        "json-null-value-on-merge", Req("PATCH", U1, json={"speed": {"value": None}}), bad("speed")
    ),
]

# Attributes that replace a stored one must be complete (only merge may leave the payload out).
INCOMPLETE_CASES = [
    Case(
        "append-property-without-value",
        Req("POST", f"{U1}/attrs", json={"brand": {"type": "Property"}}),
        bad("brand"),
    ),
    Case(
        "append-concise-without-payload",
        Req("POST", f"{U1}/attrs", json={"speed": {"unitCode": "MTS"}}),
        bad("speed"),
    ),
    Case(
        "update-property-without-value",
        Req("PATCH", f"{U1}/attrs", json={"speed": {"type": "Property"}}),
        bad("speed"),
    ),
    Case(
        "update-relationship-without-object",
        Req("PATCH", f"{U1}/attrs", json={"owner": {"type": "Relationship"}}),
        bad("owner"),
    ),
    Case(
        "update-concise-without-payload",
        Req("PATCH", f"{U1}/attrs", json={"speed": {"unitCode": "MTS"}}),
        bad("speed"),
    ),
    Case(
        "replace-entity-property-without-value",
        Req("PUT", U1, json={"speed": {"type": "Property"}}),
        bad("speed"),
    ),
    Case(
        "replace-attribute-without-value",
        Req("PUT", f"{U1}/attrs/speed", json={"type": "Property"}),
        bad("speed"),
    ),
    Case(
        "merge-property-with-object",
        Req("PATCH", U1, json={"speed": prop(5, object="urn:ngsi-ld:X:1")}),
        bad("speed"),
    ),
    Case(
        "partial-update-relationship-with-unitCode",
        Req("PATCH", f"{U1}/attrs/owner", json=rel(unitCode="KMH")),
        bad("owner"),
    ),
    Case(
        "attribute-name-with-space-in-path",
        Req("PATCH", f"{U1}/attrs/max%20speed", json={"value": 1}),
        bad("attrId"),
    ),
    Case("reserved-attribute-name-in-path", Req("DELETE", f"{U1}/attrs/observedAt"), bad("attrId")),
]

DATE_CASES = [
    *(
        Case(f"observedAt-{n}", create(speed=prop(5, observedAt=v)), bad("speed.observedAt"))
        for n, v in (
            ("word", "yesterday"),
            ("offset", "2024-01-01T12:00:00+02:00"),
            ("zero-offset", "2024-01-01T10:00:00+00:00"),
            ("no-zone", "2024-01-01T10:00:00"),
            ("date-only", "2024-01-01"),
            ("space-separator", "2024-01-01 10:00:00Z"),
            ("reified", {"type": "DateTime", "value": GOOD_TIME}),
            ("reified-json-ld", {"@type": "DateTime", "@value": GOOD_TIME}),
            ("number", 1704103200),
            ("february-30", "2024-02-30T10:00:00Z"),
            ("hour-24", "2024-01-01T24:00:00Z"),
            # filed at the write time, or a 500 on PostgreSQL: \d and $ let them through
            ("trailing-newline", "2024-01-01T10:00:00.5Z\n"),
            ("full-width-digits", "\uff12\uff10\uff12\uff14-01-01T10:00:00Z"),
        )
    ),
    Case(
        "observedAt-in-sub-attribute",
        create(speed=prop(5, accuracy=prop(1, observedAt="now"))),
        bad("accuracy.observedAt"),
    ),
    Case(
        "observedAt-on-append",
        Req("POST", f"{U1}/attrs", json={"speed": prop(5, observedAt="now")}),
        bad("speed.observedAt"),
    ),
]

SCOPE_CASES = [
    *(
        Case(f"scope-{n}", create(scope=v), bad("scope"))
        for n, v in (
            ("empty-level", "/Ghent//Centre"),
            ("hyphen", "/Ghent-Centre"),
            ("no-leading-slash", "Ghent"),
            ("level-starts-with-digit", "/9Ghent"),
            ("slash-only", "/"),
            ("trailing-slash", "/Ghent/"),
            ("with-space", "/Ghent Centre"),
            ("empty-array", []),
            ("number-in-array", ["/Ghent", 9]),
            ("object", {"level": "/Ghent"}),
        )
    ),
]

GEO_CREATE_CASES = [
    *(
        Case(f"geometry-{n}", create(location=geo(v)), bad("location"))
        for n, v in (
            ("collection", {"type": "GeometryCollection", "geometries": [point(8, 49)]}),
            ("unclosed-ring", {"type": "Polygon", "coordinates": UNCLOSED}),
            ("ring-too-short", {"type": "Polygon", "coordinates": [[[0, 0], [0, 1], [0, 0]]]}),
            ("latitude-out-of-range", point(8, 91)),
            ("longitude-out-of-range", point(181, 49)),
            ("point-nested-too-deep", {"type": "Point", "coordinates": [[8, 49]]}),
            ("polygon-nested-too-shallow", {"type": "Polygon", "coordinates": SQUARE[0]}),
            ("one-number-position", point(8)),
            ("string-coordinates", point("8", "49")),
            ("linestring-one-position", {"type": "LineString", "coordinates": [[8, 49]]}),
            ("without-coordinates", {"type": "Point"}),
            ("without-type", {"coordinates": [8, 49]}),
            ("unknown-type", {"type": "Circle", "coordinates": [8, 49], "radius": 5}),
            ("not-an-object", [8, 49]),
            ("broken-json-string", '{"type": "Point", "coordinates": [8, '),
        )
    ),
    Case(
        "concise-geometry-collection",
        create(location={"type": "GeometryCollection", "geometries": []}),
        bad("location"),
    ),
    Case(
        "concise-unclosed-ring",
        create(location={"type": "Polygon", "coordinates": UNCLOSED}),
        bad("location"),
    ),
]

QUERY_CASES = [
    # q
    *(
        Case(f"q-{n}", query(q=q), bad("q"))
        for n, q in (
            ("double-operator", "speed>>1"),
            ("unbalanced-parenthesis", "(speed==1"),
            ("bare-word", "speed==fast"),
            ("range-after-ordering-operator", "speed>4..5"),
            ("empty", ""),
            ("missing-value", "speed=="),
            ("leading-and", ";speed==1"),
            ("trailing-or", "speed==1|"),
            ("whitespace", "speed == 1"),
            ("linked-entity-without-join", 'owner{name}=="x"'),
            ("unterminated-string", 'brand=="Volv'),
        )
    ),
    # type expressions
    *(
        Case(f"type-{n}", Req("GET", E, params={"type": t}), bad("type"))
        for n, t in (
            ("unbalanced-parenthesis", "(Vehicle"),
            ("empty-item", "Vehicle,,Bus"),
            ("space", "Electric Vehicle"),
            ("dangling-and", "Vehicle;"),
            ("leading-or", "|Vehicle"),
            ("empty-parentheses", "()"),
            ("all-types-without-local", "*"),
        )
    ),
    Case(
        "type-all-types-with-local-false",
        Req("GET", E, params={"type": "*", "local": "false"}),
        bad("type"),
    ),
    # scopeQ
    *(
        Case(f"scopeQ-{n}", query(scopeQ=s), bad("scopeQ"))
        for n, s in (
            ("empty-level", "/Ghent//Centre"),
            ("no-leading-slash", "Ghent"),
            ("unbalanced-parenthesis", "(/Ghent"),
            ("hyphen", "/Ghent-Centre"),
            ("empty", ""),
            ("dangling-and", "/Ghent;"),
        )
    ),
    # geo-queries
    Case("georel-near-without-modifier", geo_query("near", "Point", "[8,49]"), bad("georel")),
    Case(
        "georel-near-two-modifiers",
        geo_query("near;maxDistance==10;minDistance==1", "Point", "[8,49]"),
        bad("georel"),
    ),
    Case(
        "georel-zero-distance", geo_query("near;maxDistance==0", "Point", "[8,49]"), bad("georel")
    ),
    Case(
        "georel-negative-distance",
        geo_query("near;minDistance==-5", "Point", "[8,49]"),
        bad("georel"),
    ),
    Case(
        "georel-distance-not-number",
        geo_query("near;maxDistance==far", "Point", "[8,49]"),
        bad("georel"),
    ),
    Case(
        "georel-unknown-modifier", geo_query("near;distance==5", "Point", "[8,49]"), bad("georel")
    ),
    Case("georel-unknown", geo_query("nearby", "Point", "[8,49]"), bad("georel")),
    Case(
        "georel-within-with-modifier",
        geo_query("within;maxDistance==5", "Polygon", json.dumps(SQUARE)),
        bad("georel"),
    ),
    Case(
        "geoquery-without-coordinates",
        query(georel="within", geometry="Polygon"),
        bad("coordinates"),
    ),
    Case(
        "geoquery-without-geometry",
        query(georel="within", coordinates=json.dumps(SQUARE)),
        bad("geometry"),
    ),
    Case("geoquery-without-georel", query(geometry="Point", coordinates="[8,49]"), bad("georel")),
    Case(
        "geoquery-geometry-collection",
        geo_query("intersects", "GeometryCollection", "[]"),
        bad("geometry"),
    ),
    Case("geoquery-unknown-geometry", geo_query("intersects", "Circle", "[8,49]"), bad("geometry")),
    Case(
        "geoquery-unclosed-ring",
        geo_query("within", "Polygon", json.dumps(UNCLOSED)),
        bad("coordinates"),
    ),
    Case(
        "geoquery-latitude-out-of-range",
        geo_query("near;maxDistance==10", "Point", "[8,91]"),
        bad("coordinates"),
    ),
    Case(
        "geoquery-longitude-out-of-range",
        geo_query("near;maxDistance==10", "Point", "[-181,49]"),
        bad("coordinates"),
    ),
    Case(
        "geoquery-wrong-nesting",
        geo_query("within", "Polygon", json.dumps(SQUARE[0])),
        bad("coordinates"),
    ),
    Case(
        "geoquery-point-nested",
        geo_query("near;maxDistance==10", "Point", "[[8,49]]"),
        bad("coordinates"),
    ),
    Case(
        "geoquery-empty-coordinates",
        geo_query("near;maxDistance==10", "Point", "[]"),
        bad("coordinates"),
    ),
    Case(
        "geoquery-coordinates-not-json",
        geo_query("near;maxDistance==10", "Point", "[8,"),
        bad("coordinates"),
    ),
    Case(
        "geoproperty-with-space",
        query(
            georel="near;maxDistance==10",
            geometry="Point",
            coordinates="[8,49]",
            geoproperty="my location",
        ),
        bad("geoproperty"),
    ),
    # unknown parameters: InvalidRequest on every endpoint
    Case("unknown-parameter-query", query(colour="red"), invalid("colour")),
    Case("unknown-parameter-retrieve", Req("GET", U1, params={"colour": "red"}), invalid("colour")),
    Case(
        "unknown-parameter-create",
        Req("POST", E, json=v2(), params={"colour": "red"}),
        invalid("colour"),
    ),
    Case(
        "unknown-parameter-merge",
        Req("PATCH", U1, json={"speed": 1}, params={"colour": "red"}),
        invalid("colour"),
    ),
    Case(
        "unknown-parameter-delete", Req("DELETE", U1, params={"colour": "red"}), invalid("colour")
    ),
    Case(
        "unknown-parameter-types",
        Req("GET", f"{BASE}/types", params={"colour": "red"}),
        invalid("colour"),
    ),
    Case(
        "unknown-parameter-batch",
        Req("POST", f"{OPS}/create", json=[v2()], params={"colour": "red"}),
        invalid("colour"),
    ),
    Case("parameter-name-case-matters", query(Limit="5"), invalid("Limit")),
    # options and format
    Case("unknown-option-query", query(options="pretty"), bad("options")),
    Case(
        "unknown-option-retrieve",
        Req("GET", U1, params={"options": "keyValues,pretty"}),
        bad("options"),
    ),
    Case("empty-option-item", query(options="keyValues,"), bad("options")),
    Case(
        "unknown-option-append",
        Req("POST", f"{U1}/attrs", json={"brand": "Volvo"}, params={"options": "overwrite"}),
        bad("options"),
    ),
    Case("unknown-format", query(format="pretty"), bad("format")),
    Case("format-case-matters", Req("GET", U1, params={"format": "KeyValues"}), bad("format")),
    Case(
        "upsert-replace-and-update",
        Req("POST", f"{OPS}/upsert", json=[v2()], params={"options": "replace,update"}),
        bad("options"),
    ),
    # paging
    *(
        Case(f"limit-{n}", query(limit=v), bad("limit"))
        for n, v in (("word", "ten"), ("negative", "-1"), ("fraction", "1.5"), ("empty", ""))
    ),
    *(
        Case(f"offset-{n}", query(offset=v), bad("offset"))
        for n, v in (
            ("word", "x"),
            ("negative", "-3"),
            ("fraction", "0.5"),
            ("arabic-indic-digit", "\u0663"),
            # past what a 64-bit integer column takes: it was a 500 on both stores
            ("past-int64", str(2**63)),
            ("huge", "9" * 30),
        )
    ),
    Case("limit-zero-without-count", query(limit="0"), bad("limit")),
    Case("limit-zero-with-count-false", query(limit="0", count="false"), bad("limit")),
    Case("limit-over-maximum", query(limit="1001"), Problem(403, "TooManyResults", "limit")),
    Case("count-not-boolean", query(count="yes"), bad("count")),
    # qualifying filter
    Case("no-filter", Req("GET", E), bad("type")),
    Case("id-only", Req("GET", E, params={"id": V1}), bad("type")),
    Case(
        "idPattern-only",
        Req("GET", E, params={"idPattern": "^urn:ngsi-ld:Vehicle:.*"}),
        bad("type"),
    ),
    Case("options-only", Req("GET", E, params={"options": "keyValues"}), bad("type")),
    Case("geoproperty-only", Req("GET", E, params={"geoproperty": "location"}), bad("type")),
    Case(
        "q-on-system-attribute-only",
        Req("GET", E, params={"q": 'createdAt>"2020-01-01T00:00:00Z"'}),
        bad("type"),
    ),
    Case("local-false-only", Req("GET", E, params={"local": "false"}), bad("type")),
    # projection
    Case("pick-with-attrs", query(pick="speed", attrs="speed"), bad("attrs")),
    Case("omit-with-attrs", query(omit="speed", attrs="owner"), bad("attrs")),
    Case(
        "pick-with-attrs-on-retrieve",
        Req("GET", U1, params={"pick": "speed", "attrs": "speed"}),
        bad("attrs"),
    ),
    Case("pick-and-omit-same-member", query(pick="id,speed", omit="speed"), bad("pick")),
    Case("pick-empty-item", query(pick="speed,,owner"), bad("pick")),
    Case("pick-linked-entity-without-join", query(pick="owner{name}"), bad("pick")),
    Case("omit-empty", query(omit=""), bad("omit")),
    Case("attrs-name-with-space", query(attrs="max speed"), bad("attrs")),
    Case("attrs-reserved-name", query(attrs="observedAt"), bad("attrs")),
    Case("attrs-empty-item", query(attrs="speed,"), bad("attrs")),
    # other parameters
    Case("id-not-uri", query(id="V1"), bad("id")),
    Case("id-list-with-bad-item", query(id=f"{V1},V 2"), bad("id")),
    Case("idPattern-invalid-regex", query(idPattern="urn:(ngsi"), bad("idPattern")),
    Case("query-datasetId-not-uri", query(datasetId="radar 1"), bad("datasetId")),
    Case("lang-empty", query(lang=""), bad("lang")),
    Case("local-not-boolean", query(local="yes"), bad("local")),
    Case(
        "geometryProperty-without-geojson",
        query(geometryProperty="location"),
        bad("geometryProperty"),
    ),
    Case(
        "geometryProperty-on-retrieve-without-geojson",
        Req("GET", U1, params={"geometryProperty": "location"}),
        bad("geometryProperty"),
    ),
    Case(
        "deleteAll-not-boolean",
        Req("DELETE", f"{U1}/attrs/speed", params={"deleteAll": "yes"}),
        bad("deleteAll"),
    ),
    Case(
        "delete-attribute-datasetId-not-uri",
        Req("DELETE", f"{U1}/attrs/speed", params={"datasetId": "radar 1"}),
        bad("datasetId"),
    ),
    Case(
        "types-details-not-boolean",
        Req("GET", f"{BASE}/types", params={"details": "yes"}),
        bad("details"),
    ),
]

POST_QUERY_CASES = [
    Case(
        "post-query-type-not-Query",
        post_query({"type": "Querry", "entities": [{"type": "Vehicle"}]}),
        bad("type"),
    ),
    Case("post-query-type-missing", post_query({"entities": [{"type": "Vehicle"}]}), bad("type")),
    Case("post-query-not-object", post_query([{"type": "Query"}]), bad("body")),
    Case("post-query-without-filter", post_query({"type": "Query"}), bad("type")),
    Case(
        "post-query-empty-entities", post_query({"type": "Query", "entities": []}), bad("entities")
    ),
    Case(
        "post-query-selector-without-type",
        post_query({"type": "Query", "entities": [{"id": V1}]}),
        bad("entities"),
    ),
    Case(
        "post-query-selector-bad-id",
        post_query({"type": "Query", "entities": [{"type": "Vehicle", "id": "V 1"}]}),
        bad("entities"),
    ),
    Case(
        "post-query-empty-attrs",
        vq({"attrs": []}),
        bad("attrs"),
    ),
    Case(
        "post-query-q-not-string",
        vq({"q": 5}),
        bad("q"),
    ),
    Case(
        "post-query-bad-q",
        vq({"q": "speed>>1"}),
        bad("q"),
    ),
    Case(
        "post-query-scopeQ-not-string",
        vq({"scopeQ": ["/a"]}),
        bad("scopeQ"),
    ),
    Case(
        "post-query-joinLevel-zero",
        vq({"joinLevel": 0}),
        bad("joinLevel"),
    ),
    Case(
        "post-query-temporalQ",
        vq({"temporalQ": {"timerel": "after", "timeAt": GOOD_TIME}}),
        bad("temporalQ"),
    ),
    Case("post-query-geoQ-not-object", post_query({"type": "Query", "geoQ": "near"}), bad("geoQ")),
    Case(
        "post-query-geoQ-two-modifiers",
        post_query(
            {
                "type": "Query",
                "geoQ": {
                    "georel": "near;maxDistance==1;minDistance==1",
                    "geometry": "Point",
                    "coordinates": [8, 49],
                },
            }
        ),
        bad("georel"),
    ),
    Case(
        "post-query-geoQ-without-coordinates",
        post_query({"type": "Query", "geoQ": {"georel": "within", "geometry": "Polygon"}}),
        bad("coordinates"),
    ),
    Case(
        "post-query-pick-with-attrs",
        vq({"attrs": ["speed"], "pick": ["speed"]}),
        bad("attrs"),
    ),
    Case(
        "post-query-@context-in-json-body",
        vq({"@context": CORE}),
        bad("@context"),
    ),
    Case(
        "post-query-ld-without-@context",
        ld("POST", f"{OPS}/query", {"type": "Query", "entities": [{"type": "Vehicle"}]}),
        bad("@context"),
    ),
]

BODY_CASES = [
    Case(
        "not-json",
        raw("POST", E, b'{"id": "urn:ngsi-ld:Vehicle:V2",', "application/json"),
        invalid("body"),
    ),
    Case(
        "not-json-single-quotes",
        raw("POST", E, b"{'id': 'x'}", "application/json"),
        invalid("body"),
    ),
    Case(
        "not-json-on-append",
        raw("POST", f"{U1}/attrs", b"speed=5", "application/json"),
        invalid("body"),
    ),
    Case(
        "not-json-on-merge",
        raw("PATCH", U1, b"{", "application/merge-patch+json"),
        invalid("body"),
    ),
    Case(
        "empty-body",
        raw("POST", E, b"", "application/json"),
        invalid("body"),
    ),
    Case("empty-object-on-create", Req("POST", E, json={}), invalid("body")),
    Case("empty-array-on-create", Req("POST", E, json=[]), invalid("body")),
    Case("array-on-create", Req("POST", E, json=[v2()]), bad("body")),
    Case("string-on-create", Req("POST", E, json="urn:ngsi-ld:Vehicle:V2"), bad("body")),
    Case(
        "json-null-body-on-create",
        raw("POST", E, b"null", "application/json"),
        bad("body"),
    ),
    Case("array-on-merge", Req("PATCH", U1, json=[{"speed": 1}]), bad("body")),
    Case("empty-attribute-body", Req("PATCH", f"{U1}/attrs/speed", json={}), bad("body")),
    # where the @context comes from
    Case("@context-in-json-body", create(**{"@context": CORE}), bad("@context")),
    Case(
        "@context-in-json-append",
        Req("POST", f"{U1}/attrs", json={"brand": "Volvo", "@context": CORE}),
        bad("@context"),
    ),
    Case(
        "@context-in-json-merge",
        Req("PATCH", U1, json={"speed": 1, "@context": CORE}),
        bad("@context"),
    ),
    Case("ld-without-@context", ld("POST", E, v2()), bad("@context")),
    Case("ld-without-@context-on-merge", ld("PATCH", U1, {"speed": 1}), bad("@context")),
    Case("ld-with-link-header", ld("POST", E, v2(**{"@context": CORE}), link(CORE)), bad("Link")),
    Case("ld-@context-number", ld("POST", E, v2(**{"@context": 5})), bad("@context")),
    Case("ld-@context-not-url", ld("POST", E, v2(**{"@context": "vocabulary"})), bad("@context")),
    Case(
        "ld-scoped-context",
        ld(
            "POST", E, v2(**{"@context": {"speed": {"@id": "http://ex.org/speed", "@context": {}}}})
        ),
        bad("@context"),
    ),
    Case(
        "ld-@context-nested-too-deep",
        ld("POST", E, v2(**{"@context": [[[[[[[[[[{}]]]]]]]]]]})),
        bad("@context"),
    ),
    # remote contexts are not fetched by the table's client: a context it does not hold is a 504
    Case(
        "link-context-not-available",
        Req("POST", E, json=v2(), headers=link("https://example.org/ctx.jsonld")),
        NO_CONTEXT,
    ),
    Case(
        "ld-context-not-available",
        ld("POST", E, v2(**{"@context": ["https://example.org/ctx.jsonld"]})),
        NO_CONTEXT,
    ),
    Case(
        "link-context-not-available-on-query",
        Req("GET", E, params={"type": "Vehicle"}, headers=link("https://example.org/ctx.jsonld")),
        NO_CONTEXT,
    ),
    # Content-Type and Accept
    Case(
        "content-type-xml",
        raw("POST", E, b"<entity/>", "application/xml"),
        UNSUPPORTED,
    ),
    Case(
        "content-type-text",
        raw("POST", E, json.dumps(v2()).encode(), "text/plain"),
        UNSUPPORTED,
    ),
    Case("content-type-missing", Req("POST", E, raw=json.dumps(v2()).encode()), UNSUPPORTED),
    Case(
        "content-type-form",
        raw("POST", E, b"id=x", "application/x-www-form-urlencoded"),
        UNSUPPORTED,
    ),
    Case(
        "merge-patch-on-create",
        raw("POST", E, json.dumps(v2()).encode(), "application/merge-patch+json"),
        UNSUPPORTED,
    ),
    Case(
        "merge-patch-on-append",
        raw("POST", f"{U1}/attrs", b'{"brand": "Volvo"}', "application/merge-patch+json"),
        UNSUPPORTED,
    ),
    Case(
        "content-type-xml-on-batch",
        raw("POST", f"{OPS}/upsert", b"<entities/>", "application/xml"),
        UNSUPPORTED,
    ),
    Case(
        "accept-xml-retrieve", Req("GET", U1, headers={"Accept": "application/xml"}), NOT_ACCEPTABLE
    ),
    Case(
        "accept-xml-query",
        Req("GET", E, params={"type": "Vehicle"}, headers={"Accept": "application/xml"}),
        NOT_ACCEPTABLE,
    ),
    Case("accept-text-html", Req("GET", U1, headers={"Accept": "text/html"}), NOT_ACCEPTABLE),
    Case(
        "accept-json-refused-by-q0",
        Req("GET", U1, headers={"Accept": "application/json;q=0, application/xml"}),
        NOT_ACCEPTABLE,
    ),
    Case(
        "accept-xml-types",
        Req("GET", f"{BASE}/types", headers={"Accept": "application/xml"}),
        NOT_ACCEPTABLE,
    ),
    Case(
        "accept-geojson-types",
        Req("GET", f"{BASE}/types", headers={"Accept": "application/geo+json"}),
        NOT_ACCEPTABLE,
    ),
    Case(
        "accept-geojson-post-query",
        Req(
            "POST",
            f"{OPS}/query",
            json={"type": "Query", "entities": [{"type": "Vehicle"}]},
            headers={"Accept": "application/geo+json"},
        ),
        NOT_ACCEPTABLE,
    ),
]


def _batch_cases(op: str) -> list[Case]:
    """Requests a batch operation rejects as a whole (nothing of them is processed)."""
    url = f"{OPS}/{op}"
    item: Any = V1 if op == "delete" else {"id": V1, "type": "Vehicle", "brand": "Volvo"}
    return [
        Case(
            f"{op}-body-object",
            Req("POST", url, json=item if op != "delete" else {"id": V1}),
            bad("body"),
        ),
        Case(f"{op}-body-string", Req("POST", url, json="urn:ngsi-ld:Vehicle:V1"), bad("body")),
        Case(f"{op}-empty-array", Req("POST", url, json=[]), bad("body")),
        Case(f"{op}-null-item", Req("POST", url, json=[item, None]), bad("body")),
        Case(
            f"{op}-not-json",
            raw("POST", url, b"[{", "application/json"),
            invalid("body"),
        ),
        Case(f"{op}-ld-with-link-header", ld("POST", url, [item], link(CORE)), bad("Link")),
        Case(
            f"{op}-content-type-text",
            raw("POST", url, json.dumps([item]).encode(), "text/plain"),
            UNSUPPORTED,
        ),
    ]


BATCH_CASES = [
    c for op in ("create", "upsert", "update", "merge", "delete") for c in _batch_cases(op)
]

TENANT_CASES = [
    Case(
        f"tenant-{n}",
        Req(m, url, json=body, params=params, headers={"NGSILD-Tenant": TENANT}),
        NO_TENANT,
    )
    for n, m, url, body, params in (
        ("query", "GET", E, None, {"type": "Vehicle"}),
        ("retrieve", "GET", U1, None, None),
        ("merge", "PATCH", U1, {"speed": 1}, None),
        ("append", "POST", f"{U1}/attrs", {"speed": 1}, None),
        ("delete", "DELETE", U1, None, None),
        ("delete-attribute", "DELETE", f"{U1}/attrs/speed", None, None),
        ("types", "GET", f"{BASE}/types", None, None),
        ("attributes", "GET", f"{BASE}/attributes", None, None),
        (
            "post-query",
            "POST",
            f"{OPS}/query",
            {"type": "Query", "entities": [{"type": "Vehicle"}]},
            None,
        ),
        ("batch-update", "POST", f"{OPS}/update", [{"id": V1, "speed": 1}], None),
        ("batch-delete", "POST", f"{OPS}/delete", [V1], None),
    )
] + [
    # a rejected create must not create its tenant either
    Case(
        "tenant-rejected-create",
        Req("POST", E, json={"id": "V 2", "type": "Vehicle"}, headers={"NGSILD-Tenant": TENANT}),
        bad("id"),
    ),
]

CASES = [
    *ID_CASES,
    *ATTRIBUTE_CASES,
    *NULL_CASES,
    *INCOMPLETE_CASES,
    *DATE_CASES,
    *SCOPE_CASES,
    *GEO_CREATE_CASES,
    *QUERY_CASES,
    *POST_QUERY_CASES,
    *BODY_CASES,
    *BATCH_CASES,
    *TENANT_CASES,
]


# -- helpers --------------------------------------------------------------------------------------
def send(client: TestClient, req: Req) -> httpx.Response:
    response: httpx.Response = client.request(
        req.method,
        req.url,
        json=req.json if req.raw is None else None,
        content=req.raw,
        params=dict(req.params) if req.params is not None else None,
        headers=dict(req.headers) if req.headers is not None else None,
    )
    return response


def type_uri(error: str) -> str:
    return "about:blank" if error in HTTP_LEVEL else ERRORS + error


def problem_of(expected: Problem) -> dict[str, Any]:
    """The ProblemDetails expected, less its free-text ``detail``."""
    body: dict[str, Any] = {
        "type": type_uri(expected.error),
        "title": expected.error,
        "status": expected.status,
    }
    if expected.field is not None:
        body["field"] = expected.field
    return body


def without_detail(problem: dict[str, Any]) -> dict[str, Any]:
    """A ProblemDetails less its ``detail``, which must be a non-empty explanation."""
    rest = dict(problem)
    detail = rest.pop("detail", None)
    assert isinstance(detail, str) and detail.strip(), problem
    return rest


def assert_problem(r: httpx.Response, expected: Problem) -> None:
    assert r.status_code == expected.status, r.text
    assert r.headers["content-type"] == "application/json"
    assert without_detail(r.json()) == problem_of(expected)


def seed(client: TestClient) -> None:
    """V1: one attribute of most kinds, a multi-attribute, a scope."""
    v1 = {
        "id": V1,
        "type": "Vehicle",
        "scope": "/Ghent/Centre",
        "speed": [
            prop(50, unitCode="KMH", observedAt=GOOD_TIME, accuracy=prop(0.5)),
            prop(48, datasetId="urn:ngsi-ld:Dataset:radar"),
        ],
        "owner": rel(),
        "name": lang({"en": "bus", "nl": "bus"}),
        "tags": {"type": "ListProperty", "valueList": ["a", "b"]},
        "location": geo(point(3.72, 51.05)),
    }
    r = client.post(E, json=v1)
    assert r.status_code == 201, r.text


def snapshot(client: TestClient) -> tuple[Any, int]:
    """Everything the default tenant holds (with system times), and whether TENANT exists."""
    r = client.get(E, params={"local": "true", "options": "sysAttrs", "limit": "1000"})
    assert r.status_code == 200, r.text
    tenant = client.get(E, params={"local": "true"}, headers={"NGSILD-Tenant": TENANT})
    return r.json(), tenant.status_code


# -- the table tests ------------------------------------------------------------------------------
class SeededBank:
    """One API client over one seeded store, shared by the rows of the table on a backend.

    Every row must leave the store as it found it (checked against the snapshot taken after
    seeding), so a row that passes hands the next one the same state a fresh store would. A row
    that fails may have written something: the next row then starts over on a fresh store. A
    store, an app and a seed for each of the 756 rows were two thirds of the table's time
    (0.14 of 0.22 s a row).
    """

    def __init__(self, backend: str, folder: Path) -> None:
        self.backend = backend
        self.folder = folder
        self.made = 0
        self._open: ExitStack | None = None
        self._client: TestClient | None = None
        self.before: tuple[Any, int] = ({}, 0)

    def client(self) -> TestClient:
        if self._client is None:
            self.made += 1
            data = self.folder / f"bank-{self.made}"
            data.mkdir()
            with ExitStack() as stack:
                if self.backend == "sqlite":
                    store: Store = SqliteStore(data / "bank.db")
                    stack.callback(store.close)
                else:
                    pg = make_pg_store()
                    stack.callback(drop_pg_store, pg)
                    store = pg
                contexts = sdm_context_map() if SDM.exists() else {}
                settings = Settings(
                    data_dir=data, contexts=contexts, context_fetch=False, no_auth=True
                )
                client = stack.enter_context(TestClient(create_app(settings, store)))
                seed(client)
                self.before = snapshot(client)
                self._open = stack.pop_all()
            self._client = client
        return self._client

    def discard(self) -> None:
        if self._open is not None:
            self._open.close()
        self._open = None
        self._client = None


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeededBank]:
    bank = SeededBank(request.param, tmp_path_factory.mktemp(f"table-{request.param}"))
    yield bank
    bank.discard()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_malformed_request(seeded: SeededBank, case: Case) -> None:
    client = seeded.client()
    passed = False
    try:
        before = seeded.before
        assert before[1] == 404
        r = send(client, case.req)
        assert_problem(r, case.expected)
        if case.req.headers and "NGSILD-Tenant" in case.req.headers:
            assert r.headers["NGSILD-Tenant"] == case.req.headers["NGSILD-Tenant"]
        assert snapshot(client) == before
        if case.req.method == "POST" and case.req.url == E:
            assert client.get(f"{E}/{V2}").status_code == 404
        passed = True
    finally:
        if not passed:
            seeded.discard()


def test_table_names_are_unique() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))


def test_well_formed_neighbours_of_the_table_pass(client: TestClient) -> None:
    """Near misses of the table rows that are fine, so the rows fail for the reason they name."""
    seed(client)
    ok = [
        Req("GET", E, params={"type": "*", "local": "true"}),
        query(limit="0", count="true"),
        query(limit="1000"),
        query(q='speed.observedAt>"2020-01-01T00:00:00Z"'),
        query(georel="near;maxDistance==10", geometry="Point", coordinates="[3.72,51.05]"),
        query(scopeQ="/Ghent/#"),
        Req("GET", U1, headers={"Accept": "application/json;q=0.5, application/xml"}),
        raw("PATCH", U1, b'{"brand": "Volvo"}', "application/merge-patch+json"),
        Req("PATCH", U1, json={"speed": {"type": "Property", "observedAt": GOOD_TIME}}),
        raw("POST", E, json.dumps(v2()).encode(), "application/json; charset=utf-8"),
        ld("POST", E, {**v2(), "id": "urn:ngsi-ld:Vehicle:V3", "@context": CORE}),
    ]
    for req in ok:
        r = send(client, req)
        assert r.status_code < 300, (req, r.text)


def test_merge_cannot_add_an_attribute_without_its_payload(client: TestClient) -> None:
    seed(client)
    before = snapshot(client)
    r = client.patch(U1, json={"brand": {"type": "Property", "unitCode": "KMH"}})
    assert_problem(r, bad("brand"))
    assert snapshot(client) == before


def test_a_merge_null_adds_nothing_where_there_is_nothing_to_delete(client: TestClient) -> None:
    """Nulls in an attribute or sub-attribute a merge adds mean nothing and are not stored
    (they were: observedAt "urn:ngsi-ld:null" then matched q=...observedAt>2020...)."""
    seed(client)
    r = client.patch(
        U1,
        json={
            "load": {
                "type": "Property",
                "value": 2,
                "datasetId": "urn:ngsi-ld:Dataset:a",
                "observedAt": NGSI_NULL,
            },
            "weight": prop(1, note=NGSI_NULL, origin=prop("x", observedAt=NGSI_NULL)),
            "speed": {
                "type": "Property",
                "value": 51,
                "observedAt": NGSI_NULL,  # deletes the stored one
                "fresh": prop(3, observedAt=NGSI_NULL, gone=NGSI_NULL),
            },
        },
    )
    assert r.status_code == 204, r.text
    stored = client.get(U1, params={"options": "sysAttrs"}).json()
    assert "observedAt" not in stored["load"]
    assert "note" not in stored["weight"]
    assert "observedAt" not in stored["weight"]["origin"]
    speed = next(s for s in stored["speed"] if "datasetId" not in s)
    assert "observedAt" not in speed
    assert speed["value"] == 51
    assert speed["fresh"]["value"] == 3
    assert "observedAt" not in speed["fresh"] and "gone" not in speed["fresh"]
    assert NGSI_NULL not in json.dumps(stored)
    r = client.get(E, params={"type": "Vehicle", "q": "load.observedAt>2020-01-01T00:00:00Z"})
    assert r.status_code == 200 and r.json() == []


# -- batches: per-entity errors inside a 207 ------------------------------------------------------
def vehicle(n: int, **members: Any) -> dict[str, Any]:
    return {"id": f"urn:ngsi-ld:Vehicle:V{n}", "type": "Vehicle", "speed": prop(n), **members}


BAD_ITEMS = [
    pytest.param(
        {"id": "urn:ngsi-ld:Vehicle:V 9", "type": "Vehicle"},
        "urn:ngsi-ld:Vehicle:V 9",
        bad("id"),
        id="bad-id",
    ),
    pytest.param(
        {"id": "\ufeffurn:ngsi-ld:Vehicle:V9", "type": "Vehicle"},
        "\ufeffurn:ngsi-ld:Vehicle:V9",
        bad("id"),
        id="bom-id",
    ),
    pytest.param(
        vehicle(9, speed={"type": "Property"}),
        "urn:ngsi-ld:Vehicle:V9",
        bad("speed"),
        id="property-without-value",
    ),
    pytest.param(
        vehicle(9, owner=rel(unitCode="KMH")),
        "urn:ngsi-ld:Vehicle:V9",
        bad("owner"),
        id="relationship-with-unitCode",
    ),
    pytest.param(
        vehicle(9, speed=NGSI_NULL), "urn:ngsi-ld:Vehicle:V9", bad("speed"), id="ngsi-null"
    ),
    pytest.param(
        vehicle(9, speed=None), "urn:ngsi-ld:Vehicle:V9", bad("speed"), id="json-null-attribute"
    ),
    pytest.param(
        vehicle(9, location=geo({"type": "GeometryCollection", "geometries": []})),
        "urn:ngsi-ld:Vehicle:V9",
        bad("location"),
        id="geometry-collection",
    ),
    pytest.param(
        vehicle(9, speed=prop(1, observedAt="2024-01-01T12:00:00+02:00")),
        "urn:ngsi-ld:Vehicle:V9",
        bad("speed.observedAt"),
        id="observedAt-offset",
    ),
    pytest.param(
        vehicle(9, **{"@context": CORE}),
        "urn:ngsi-ld:Vehicle:V9",
        bad("@context"),
        id="@context-in-json-entry",
    ),
    pytest.param(
        vehicle(9, speed=prop("fast\x00")),
        "urn:ngsi-ld:Vehicle:V9",
        bad("speed.value"),
        id="nul-in-a-value",
    ),
    pytest.param(42, None, bad("body"), id="not-an-object"),
    pytest.param({}, None, bad("id"), id="empty-object"),
]


@pytest.mark.parametrize("op", ["create", "upsert"])
@pytest.mark.parametrize(("item", "entity_id", "expected"), BAD_ITEMS)
def test_batch_item_errors_keep_neighbours(
    client: TestClient, op: str, item: Any, entity_id: str | None, expected: Problem
) -> None:
    good = [vehicle(1), vehicle(2)]
    r = client.post(f"{OPS}/{op}", json=[good[0], item, good[1]])
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == [g["id"] for g in good]
    assert len(body["errors"]) == 1
    error = body["errors"][0]
    assert error["entityId"] == entity_id
    assert without_detail(error["error"]) == problem_of(expected)
    for g in good:
        stored = client.get(f"{E}/{g['id']}")
        assert stored.status_code == 200
        assert stored.json() == g
    listed = client.get(E, params={"local": "true"}).json()
    assert sorted(e["id"] for e in listed) == [g["id"] for g in good]


def test_batch_ld_entries_without_context_fail_alone(client: TestClient) -> None:
    items = [{**vehicle(1), "@context": CORE}, vehicle(2), {**vehicle(3), "@context": [CORE]}]
    r = client.post(
        f"{OPS}/create", content=json.dumps(items), headers={"Content-Type": "application/ld+json"}
    )
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == ["urn:ngsi-ld:Vehicle:V1", "urn:ngsi-ld:Vehicle:V3"]
    [error] = body["errors"]
    assert error["entityId"] == "urn:ngsi-ld:Vehicle:V2"
    assert without_detail(error["error"]) == problem_of(bad("@context"))
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V2").status_code == 404
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V3").status_code == 200


def test_batch_create_duplicates_and_existing_ids(client: TestClient) -> None:
    seed(client)
    r = client.post(f"{OPS}/create", json=[vehicle(2), {"id": V1, "type": "Vehicle"}, vehicle(2)])
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == ["urn:ngsi-ld:Vehicle:V2"]
    assert [(e["entityId"], without_detail(e["error"])) for e in body["errors"]] == [
        (V1, problem_of(Problem(409, "AlreadyExists", "id"))),
        ("urn:ngsi-ld:Vehicle:V2", problem_of(Problem(409, "AlreadyExists", "id"))),
    ]
    assert client.get(U1).json()["speed"][0]["value"] == 50  # the existing V1 is untouched


@pytest.mark.parametrize(
    ("op", "bad_item", "expected"),
    [
        ("update", {"id": "urn:ngsi-ld:Vehicle:V3", "speed": {"type": "Property"}}, bad("speed")),
        ("update", {"id": "urn:ngsi-ld:Vehicle:V3", "speed": NGSI_NULL}, bad("speed")),
        (
            "update",
            {"id": "urn:ngsi-ld:Vehicle:V3", "owner": {"type": "Relationship"}},
            bad("owner"),
        ),
        ("merge", {"id": "urn:ngsi-ld:Vehicle:V3", "speed": None}, bad("speed")),
        ("merge", {"id": "urn:ngsi-ld:Vehicle:V3", "speed": prop(1, object=V1)}, bad("speed")),
        ("merge", {"id": "urn:ngsi-ld:Vehicle:V3", "@context": CORE, "speed": 1}, bad("@context")),
    ],
    ids=[
        "update-no-value",
        "update-ngsi-null",
        "update-no-object",
        "merge-json-null",
        "merge-property-with-object",
        "merge-@context",
    ],
)
def test_batch_update_and_merge_item_errors(
    client: TestClient, op: str, bad_item: dict[str, Any], expected: Problem
) -> None:
    r = client.post(f"{OPS}/create", json=[vehicle(1), vehicle(2), vehicle(3)])
    assert r.status_code == 201, r.text
    v3 = client.get(f"{E}/urn:ngsi-ld:Vehicle:V3", params={"options": "sysAttrs"}).json()
    items = [
        {"id": "urn:ngsi-ld:Vehicle:V1", "speed": prop(100)},
        bad_item,
        {"id": "V 4", "speed": prop(1)},
        {"id": "urn:ngsi-ld:Vehicle:V2", "speed": prop(200)},
    ]
    r = client.post(f"{OPS}/{op}", json=items)
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == ["urn:ngsi-ld:Vehicle:V1", "urn:ngsi-ld:Vehicle:V2"]
    assert [(e["entityId"], without_detail(e["error"])) for e in body["errors"]] == [
        ("urn:ngsi-ld:Vehicle:V3", problem_of(expected)),
        ("V 4", problem_of(bad("id"))),
    ]
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V1").json()["speed"]["value"] == 100
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V2").json()["speed"]["value"] == 200
    after = client.get(f"{E}/urn:ngsi-ld:Vehicle:V3", params={"options": "sysAttrs"}).json()
    assert after == v3


@pytest.mark.parametrize("op", ["update", "merge"])
def test_an_entity_given_twice_keeps_its_applied_item(client: TestClient, op: str) -> None:
    """The second item of an entity is refused: the first one's change is committed and
    reported (it was committed while the entity was reported as failed alone)."""
    r = client.post(f"{OPS}/create", json=[vehicle(1)])
    assert r.status_code == 201, r.text
    items = [
        {"id": V1, "load": prop(10)},
        {"id": V1, "color": {"type": "Property"}},  # no value
    ]
    r = client.post(f"{OPS}/{op}", json=items)
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == [V1]
    assert [(e["entityId"], without_detail(e["error"])) for e in body["errors"]] == [
        (V1, problem_of(bad("color")))
    ]
    stored = client.get(U1).json()
    assert stored["load"]["value"] == 10
    assert "color" not in stored


def test_batch_update_no_overwrite_reports_what_it_applied(client: TestClient) -> None:
    r = client.post(f"{OPS}/create", json=[vehicle(1), vehicle(2)])
    assert r.status_code == 201, r.text
    v2 = client.get(f"{E}/urn:ngsi-ld:Vehicle:V2", params={"options": "sysAttrs"}).json()
    items = [
        {"id": V1, "speed": prop(99), "color": prop("red")},  # color is new, speed is kept
        {"id": "urn:ngsi-ld:Vehicle:V2", "speed": prop(99)},  # nothing of it applies
    ]
    r = client.post(f"{OPS}/update", json=items, params={"options": "noOverwrite"})
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == [V1]
    assert [(e["entityId"], without_detail(e["error"])) for e in body["errors"]] == [
        (V1, problem_of(bad("attrs"))),
        ("urn:ngsi-ld:Vehicle:V2", problem_of(bad("attrs"))),
    ]
    stored = client.get(U1).json()
    assert (stored["speed"]["value"], stored["color"]["value"]) == (1, "red")
    after = client.get(f"{E}/urn:ngsi-ld:Vehicle:V2", params={"options": "sysAttrs"}).json()
    assert after == v2  # not even its modifiedAt moved


def test_batch_delete_item_errors(client: TestClient) -> None:
    seed(client)
    r = client.post(f"{OPS}/create", json=[vehicle(2)])
    assert r.status_code == 201, r.text
    r = client.post(f"{OPS}/delete", json=[V1, "V 2", "urn:ngsi-ld:Vehicle:V404", 7, V1])
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == [V1]
    not_found = problem_of(Problem(404, "ResourceNotFound", "id"))
    assert [(e["entityId"], without_detail(e["error"])) for e in body["errors"]] == [
        ("V 2", problem_of(bad("id"))),
        (None, problem_of(bad("id"))),
        ("urn:ngsi-ld:Vehicle:V404", not_found),
        (V1, not_found),
    ]
    assert client.get(U1).status_code == 404
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V2").status_code == 200


# -- HTTP-level limits: 411 and 413 ---------------------------------------------------------------
@pytest.fixture
def make_client(store: Store, tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """A client over the test's store with other Settings (at most one per test)."""
    with ExitStack() as stack:

        def make(**settings: Any) -> TestClient:
            app = create_app(Settings(data_dir=tmp_path, no_auth=True, **settings), store)
            return stack.enter_context(TestClient(app))

        yield make


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", E, v2()),
        ("PUT", U1, {"type": "Vehicle", "brand": "Volvo"}),
        ("PATCH", U1, {"brand": "Volvo"}),
        ("POST", f"{U1}/attrs", {"brand": "Volvo"}),
        ("PATCH", f"{U1}/attrs", {"speed": 1}),
        ("POST", f"{OPS}/upsert", [v2()]),
    ],
)
def test_length_required(client: TestClient, method: str, url: str, body: Any) -> None:
    seed(client)
    before = snapshot(client)
    req = client.build_request(
        method, url, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    del req.headers["Content-Length"]
    assert "transfer-encoding" not in req.headers
    r = client.send(req)
    assert_problem(r, Problem(411, "LengthRequired", "Content-Length"))
    assert snapshot(client) == before


def test_chunked_body_needs_no_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield json.dumps(v2()).encode()

    r = client.post(E, content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text


def test_payload_too_large(make_client: Callable[..., TestClient]) -> None:
    client = make_client(context_fetch=False, max_body_bytes=1024)
    big = v2(notes=prop("x" * 2000))
    too_large = Problem(413, "PayloadTooLarge", "body")
    assert_problem(client.post(E, json=big), too_large)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        text = json.dumps(big).encode()
        for i in range(0, len(text), 256):
            yield text[i : i + 256]

    r = client.post(E, content=chunks(), headers={"Content-Type": "application/json"})
    assert_problem(r, too_large)
    assert_problem(client.post(f"{OPS}/create", json=[big]), too_large)
    assert client.get(f"{E}/{V2}").status_code == 404
    assert client.post(E, json=v2(notes=prop("x" * 500))).status_code == 201


# -- remote @context that cannot be fetched: 504 --------------------------------------------------
# The resolver's fetch timeout. These tests do not time the requests (the project measures no
# wall clock in tests): they read from the resolver's log whether a fetch was waited out.
TIMEOUT = 1.0


def _timeouts(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The resolver's log lines of fetches that ran out of time (httpx's ReadTimeout)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cityward.bank.jsonld" and "Timeout" in r.getMessage()
    ]


class _ContextHandler(BaseHTTPRequestHandler):
    """Serves /good (a context), /not-json, /no-context; everything else is a 404."""

    def do_GET(self) -> None:
        bodies = {
            "/good": b'{"@context": {"brand": "https://example.org/brand"}}',
            "/not-json": b"<html>hello</html>",
            "/no-context": b'{"brand": "https://example.org/brand"}',
        }
        body = bodies.get(self.path)
        self.send_response(200 if body is not None else 404)
        body = body if body is not None else b"not found"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def context_urls() -> Iterator[dict[str, str]]:
    """URLs on 127.0.0.1: a small context server, a port that never answers, a closed port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ContextHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    silent = socket.socket()  # listens but never accepts: connects, then nothing comes back
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {
            "good": f"{base}/good",
            "missing": f"{base}/missing",
            "not-json": f"{base}/not-json",
            "no-context": f"{base}/no-context",
            "silent": f"http://127.0.0.1:{silent.getsockname()[1]}/ctx",
            "refused": f"http://127.0.0.1:{closed_port}/ctx",
        }
    finally:
        server.shutdown()
        server.server_close()
        silent.close()


def _context_request(how: str, url: str, n: int) -> Req:
    eid = f"urn:ngsi-ld:Vehicle:C{n}"
    if how == "link-create":
        return Req("POST", E, json={"id": eid, "type": "Vehicle", "brand": "x"}, headers=link(url))
    if how == "ld-create":
        return ld("POST", E, {"id": eid, "type": "Vehicle", "brand": "x", "@context": [url, CORE]})
    if how == "link-query":
        return Req("GET", E, params={"type": "Vehicle"}, headers=link(url))
    assert how == "link-merge"
    return Req("PATCH", U1, json={"brand": "x"}, headers=link(url))


@pytest.mark.parametrize("how", ["link-create", "ld-create", "link-query", "link-merge"])
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("missing", NO_CONTEXT),
        ("silent", NO_CONTEXT),
        ("refused", NO_CONTEXT),
        ("not-json", bad("@context")),
        ("no-context", bad("@context")),
    ],
)
def test_remote_context_failures(
    make_client: Callable[..., TestClient],
    context_urls: dict[str, str],
    how: str,
    source: str,
    expected: Problem,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client(context_fetch=True, context_timeout_s=TIMEOUT, context_allow_private=True)
    seed(client)
    before = snapshot(client)
    req = _context_request(how, context_urls[source], 1)
    with caplog.at_level("INFO", logger="cityward.bank.jsonld"):
        r = send(client, req)
    assert_problem(r, expected)
    timeouts = _timeouts(caplog)
    if source == "silent":
        # the server that never answers is given up on when the timeout runs out, once
        assert len(timeouts) == 1, caplog.text
        assert context_urls["silent"] in timeouts[0]
    else:
        assert timeouts == [], timeouts  # an answer (or a refusal) is not waited out
    assert snapshot(client) == before
    # the same request with a context that can be fetched goes through
    ok = send(client, _context_request(how, context_urls["good"], 2))
    assert ok.status_code < 300, ok.text


def test_remote_context_failure_in_batch_is_per_entity(
    make_client: Callable[..., TestClient],
    context_urls: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = make_client(context_fetch=True, context_timeout_s=TIMEOUT, context_allow_private=True)
    items = [
        {**vehicle(1), "@context": [context_urls["good"], CORE]},
        {**vehicle(2), "@context": [context_urls["silent"]]},
        {**vehicle(3), "@context": CORE},
    ]
    with caplog.at_level("INFO", logger="cityward.bank.jsonld"):
        r = client.post(
            f"{OPS}/create",
            content=json.dumps(items),
            headers={"Content-Type": "application/ld+json"},
        )
    assert r.status_code == 207, r.text
    assert len(_timeouts(caplog)) == 1, caplog.text  # the silent server, waited out once
    body = r.json()
    assert body["success"] == ["urn:ngsi-ld:Vehicle:V1", "urn:ngsi-ld:Vehicle:V3"]
    [error] = body["errors"]
    assert error["entityId"] == "urn:ngsi-ld:Vehicle:V2"
    assert without_detail(error["error"]) == problem_of(NO_CONTEXT)
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V2").status_code == 404


# -- tenants --------------------------------------------------------------------------------------
def test_a_text_the_store_cannot_index_fails_alone(client: TestClient, store: Store) -> None:
    """PostgreSQL indexes no row over about 2,700 bytes (8 KB compressed): a long text that
    does not compress failed the whole write with an internal error, and a batch lost its
    neighbours. SQLite stores it. On both, the neighbours are written."""
    long = prop(os.urandom(6000).hex())  # 12,000 characters that do not compress
    r = client.post(E, json=vehicle(7, note=long))
    items = [vehicle(1), vehicle(8, note=long), vehicle(2), vehicle(3)]
    batch = client.post(f"{OPS}/upsert", json=items)
    listed = sorted(e["id"] for e in client.get(E, params={"local": "true"}).json())
    if store.dialect == "sqlite":
        assert r.status_code == 201 and batch.status_code == 201, batch.text
        assert listed == sorted(v["id"] for v in [vehicle(7), *items])
        return
    assert r.status_code == 400, r.text
    assert without_detail(r.json()) == problem_of(bad("entity"))
    assert "the store cannot take it" in r.json()["detail"]
    assert batch.status_code == 207, batch.text
    assert batch.json()["success"] == [vehicle(n)["id"] for n in (1, 2, 3)]
    (error,) = batch.json()["errors"]
    assert error["entityId"] == "urn:ngsi-ld:Vehicle:V8" and error["error"]["status"] == 400
    assert listed == [vehicle(n)["id"] for n in (1, 2, 3)]
    assert client.get(f"{E}/{vehicle(2)['id']}").json() == vehicle(2)


def test_unknown_tenant_then_created(client: TestClient) -> None:
    h = {"NGSILD-Tenant": TENANT}
    r = client.get(E, params={"type": "Vehicle"}, headers=h)
    assert_problem(r, NO_TENANT)
    assert r.headers["NGSILD-Tenant"] == TENANT
    r = client.post(f"{OPS}/create", json=[{"id": "V 1", "type": "Vehicle"}], headers=h)
    assert r.status_code == 207  # nothing created: the tenant is still unknown
    assert_problem(client.get(E, params={"type": "Vehicle"}, headers=h), NO_TENANT)
    assert client.post(E, json=v2(), headers=h).status_code == 201
    r = client.get(E, params={"type": "Vehicle"}, headers=h)
    assert r.status_code == 200
    assert [e["id"] for e in r.json()] == [V2]


def test_a_tenant_name_past_the_limit_is_a_400_naming_the_header(client: TestClient) -> None:
    """PostgreSQL refused a 3,000-character tenant (its index row limit, reported against the
    entity) where SQLite took it: both now refuse a name past 255 characters alike."""
    long, limit = "t" * 3000, "t" * 255
    r = client.post(E, json=v2(), headers={"NGSILD-Tenant": long})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "NGSILD-Tenant" and "at most 255" in r.json()["detail"]
    assert (
        client.get(E, params={"type": "Vehicle"}, headers={"NGSILD-Tenant": long}).json()["field"]
        == "NGSILD-Tenant"
    )
    assert client.post(E, json=v2(), headers={"NGSILD-Tenant": limit}).status_code == 201
    r = client.get(E, params={"type": "Vehicle"}, headers={"NGSILD-Tenant": limit})
    assert [e["id"] for e in r.json()] == [V2]
