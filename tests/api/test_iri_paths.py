"""Attributes named in a URL path by their full, percent-encoded IRI, on both backends.

NGSI-LD lets a client name an attribute in a path by its short name or by its expanded IRI
(``.../attrs/https%3A%2F%2Fex.org%2Fspeed``). The server decoded ``%2F`` before routing, so the
IRI's slashes split the path: the request reached the entity routes with a wrong entity id
(a 404 for the entity, or the attribute's body merged as an entity fragment, a 400) and the
temporal routes with a wrong attribute and instance id.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient

import cityward.api.routes as route_modules

NGSI = "/ngsi-ld/v1"
E = f"{NGSI}/entities"
T = f"{NGSI}/temporal/entities"
ERRORS = "https://uri.etsi.org/ngsi-ld/errors/"
DEFAULT = "https://uri.etsi.org/ngsi-ld/default-context/"
CAR = "urn:ngsi-ld:Car:1"
SPEED = "https://ex.org/speed"
TIMES = ["2024-05-01T10:00:00Z", "2024-05-01T11:00:00Z", "2024-05-01T12:00:00Z"]


def seg(text: str) -> str:
    """``text`` as one path segment: every reserved character percent-encoded."""
    return quote(text, safe=":")


def attr_url(eid: str, name: str, base: str = E) -> str:
    return f"{base}/{seg(eid)}/attrs/{quote(name, safe='')}"


def prop(value: Any, **members: Any) -> dict[str, Any]:
    return {"type": "Property", "value": value, **members}


def create_car(client: TestClient, eid: str = CAR, iri: str = SPEED) -> None:
    body = {"id": eid, "type": "Car", iri: prop(1), "speed": prop(10)}
    r = client.post(E, json=body)
    assert r.status_code == 201, r.text


def entity(client: TestClient, eid: str = CAR) -> dict[str, Any]:
    r = client.get(f"{E}/{seg(eid)}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_problem(r: Any, status: int, kind: str, field: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    problem: dict[str, Any] = r.json()
    assert problem["type"] == ERRORS + kind, problem
    assert problem["status"] == status and problem["field"] == field, problem
    return problem


# an IRI with a percent-encoded character of its own (``%20`` travels as ``%2520``) and a query
@pytest.mark.parametrize("iri", [SPEED, "https://ex.org/max%20speed", "https://ex.org/v?unit=kmh"])
def test_patch_put_delete_an_attribute_named_by_its_iri(client: TestClient, iri: str) -> None:
    create_car(client, iri=iri)
    r = client.patch(attr_url(CAR, iri), json={"value": 2})
    assert r.status_code == 204, r.text
    car = entity(client)
    assert car[iri] == prop(2) and car["speed"] == prop(10)

    r = client.put(attr_url(CAR, iri), json=prop(3, unitCode="KMH"))
    assert r.status_code == 204, r.text
    assert entity(client)[iri] == prop(3, unitCode="KMH")

    r = client.delete(attr_url(CAR, iri))
    assert r.status_code == 204, r.text
    car = entity(client)
    assert iri not in car and car["speed"] == prop(10)
    problem = assert_problem(client.delete(attr_url(CAR, iri)), 404, "ResourceNotFound", "attrId")
    assert iri in problem["detail"]
    # the other routes that take an IRI in their path still decode it whole
    assert client.get(f"/ngsi-ld/v1/attributes/{quote(DEFAULT + 'speed', safe='')}").is_success
    assert client.get(f"/ngsi-ld/v1/types/{quote(DEFAULT + 'Car', safe='')}").is_success


def test_get_of_an_attribute_by_iri_answers_as_by_short_name(client: TestClient) -> None:
    create_car(client)
    short = client.get(attr_url(CAR, "speed"))
    for name in (SPEED, DEFAULT + "speed"):
        r = client.get(attr_url(CAR, name))
        assert r.status_code == short.status_code == 405, r.text
        assert r.json()["type"] == short.json()["type"]
        assert r.headers["allow"] == short.headers["allow"]


def test_short_name_and_default_context_iri_name_one_attribute(client: TestClient) -> None:
    create_car(client)
    r = client.patch(attr_url(CAR, DEFAULT + "speed"), json={"value": 11})
    assert r.status_code == 204, r.text
    assert entity(client)["speed"] == prop(11)
    assert client.patch(attr_url(CAR, "speed"), json={"value": 12}).status_code == 204
    assert entity(client)["speed"] == prop(12)
    assert client.delete(attr_url(CAR, DEFAULT + "speed")).status_code == 204
    assert "speed" not in entity(client)
    assert_problem(client.delete(attr_url(CAR, "speed")), 404, "ResourceNotFound", "attrId")


@pytest.mark.parametrize(
    ("method", "body"),
    [("PATCH", {"value": 5}), ("PUT", prop(5)), ("DELETE", None)],
)
@pytest.mark.parametrize("iri", ["https://ex.org/nope", SPEED + "/more", "https://ex.org"])
def test_a_wrong_iri_is_a_clean_404(client: TestClient, method: str, body: Any, iri: str) -> None:
    create_car(client)
    before = entity(client)
    r = client.request(method, attr_url(CAR, iri), json=body)
    problem = assert_problem(r, 404, "ResourceNotFound", "attrId")
    assert iri in problem["detail"] and CAR in problem["detail"]
    assert entity(client) == before


def test_a_query_string_still_applies_to_an_iri_attribute(client: TestClient) -> None:
    body = {"id": CAR, "type": "Car", SPEED: [prop(1), prop(2, datasetId="urn:ds:b")]}
    assert client.post(E, json=body).status_code == 201
    r = client.delete(attr_url(CAR, SPEED), params={"datasetId": "urn:ds:b"})
    assert r.status_code == 204, r.text
    assert entity(client)[SPEED] == prop(1)
    r = client.delete(attr_url(CAR, SPEED), params={"deleteAll": "maybe"})
    assert_problem(r, 400, "BadRequestData", "deleteAll")


@pytest.mark.parametrize(
    "eid", ["urn:ngsi-ld:Car:a/b", "urn:ngsi-ld:Car:50%25off", "urn:ngsi-ld:Car:a%2Fb/c"]
)
def test_entity_ids_with_slashes_and_percent_signs_still_route(
    client: TestClient, eid: str
) -> None:
    create_car(client, eid)
    assert entity(client, eid)["id"] == eid
    r = client.patch(attr_url(eid, SPEED), json={"value": 7})
    assert r.status_code == 204, r.text
    r = client.patch(attr_url(eid, "speed"), json={"value": 8})
    assert r.status_code == 204, r.text
    car = entity(client, eid)
    assert car[SPEED] == prop(7) and car["speed"] == prop(8)
    r = client.post(f"{E}/{seg(eid)}/attrs", json={"doors": prop(4)})
    assert r.status_code == 204, r.text
    assert client.delete(attr_url(eid, SPEED)).status_code == 204
    assert SPEED not in entity(client, eid)
    if "%" not in eid:  # a slash sent as it is still separates nothing but the id's own parts
        r = client.patch(f"{E}/{eid}/attrs/{quote(DEFAULT + 'doors', safe='')}", json={"value": 5})
        assert r.status_code == 204, r.text
        assert client.get(f"{E}/{eid}").json()["doors"] == prop(5)
    assert client.delete(f"{E}/{seg(eid)}").status_code == 204
    assert client.get(f"{E}/{seg(eid)}").status_code == 404


def temporal_car(client: TestClient, eid: str) -> list[str]:
    """A Car with three instances of SPEED and one of speed; SPEED's instance ids."""
    body = {
        "id": eid,
        "type": "Car",
        SPEED: [prop(v, observedAt=t) for v, t in zip((1, 2, 3), TIMES, strict=True)],
        "speed": prop(10, observedAt=TIMES[0]),
    }
    r = client.post(T, json=body)
    assert r.status_code == 201, r.text
    r = client.get(f"{T}/{seg(eid)}")
    assert r.status_code == 200, r.text
    return [i["instanceId"] for i in r.json()[SPEED]]


def history(client: TestClient, eid: str) -> dict[str, Any]:
    r = client.get(f"{T}/{seg(eid)}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("eid", ["urn:ngsi-ld:Car:T1", "urn:ngsi-ld:Car:t/2"])
def test_temporal_attribute_routes_by_iri(client: TestClient, eid: str) -> None:
    ids = temporal_car(client, eid)
    url = attr_url(eid, SPEED, T)
    r = client.delete(f"{url}/{ids[0]}")
    assert r.status_code == 204, r.text
    assert [i["value"] for i in history(client, eid)[SPEED]] == [2, 3]
    assert_problem(client.delete(f"{url}/{ids[0]}"), 404, "ResourceNotFound", "instanceId")
    r = client.patch(f"{url}/{ids[1]}", json={})
    assert_problem(r, 422, "OperationNotSupported", "instanceId")
    nope = attr_url(eid, "https://ex.org/nope", T)
    assert_problem(client.delete(f"{nope}/{ids[1]}"), 404, "ResourceNotFound", "instanceId")
    assert_problem(client.delete(nope), 404, "ResourceNotFound", "attrId")
    assert [i["value"] for i in history(client, eid)[SPEED]] == [2, 3]

    assert client.delete(url).status_code == 204
    left = history(client, eid)
    assert SPEED not in left and [i["value"] for i in _as_list(left["speed"])] == [10]
    assert_problem(client.delete(url), 404, "ResourceNotFound", "attrId")
    # the short name's default-context IRI names the short-named attribute's history
    speed_id = _as_list(left["speed"])[0]["instanceId"]
    r = client.delete(f"{attr_url(eid, DEFAULT + 'speed', T)}/{speed_id}")
    assert r.status_code == 204, r.text
    assert "speed" not in history(client, eid)


def _as_list(value: Any) -> list[dict[str, Any]]:
    return value if isinstance(value, list) else [value]


def test_a_temporal_location_reaches_the_entity(client: TestClient) -> None:
    """The Location of a created temporal entity is its id percent-encoded, as on /entities:
    sent as it was, ``%25`` in an id was decoded once more by the client's next request."""
    eid = "urn:ngsi-ld:Car:50%25off/x"
    body = {"id": eid, "type": "Car", SPEED: prop(1, observedAt=TIMES[0])}
    r = client.post(T, json=body)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"{T}/{seg(eid)}"
    r = client.get(r.headers["location"])
    assert r.status_code == 200 and r.json()["id"] == eid, r.text


def test_every_entity_route_decodes_its_path_parameters() -> None:
    """Each route under /entities/ and /temporal/entities/ is routed on the raw path: its
    parameters must be the ones that decode what cityward.api.rawpath kept encoded."""
    from cityward.api import rawpath

    checked = 0
    for info in pkgutil.iter_modules(route_modules.__path__):
        module = importlib.import_module(f"{route_modules.__name__}.{info.name}")
        for route in module.router.routes:
            path = NGSI + getattr(route, "path", "")
            if not path.startswith(rawpath.RAW_PREFIXES):
                continue
            plain = {
                name
                for name, conv in getattr(route, "param_convertors", {}).items()
                if not isinstance(conv, rawpath.EscapedPath | rawpath.EscapedSegment)
            }
            assert not plain, f"{path}: {sorted(plain)} would keep %2F and %25 encoded"
            checked += 1
    assert checked >= 12
