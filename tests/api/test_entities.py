"""The NGSI-LD entity API end to end over HTTP, on both backends."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

E = "/ngsi-ld/v1/entities"
JSON = {"Content-Type": "application/json"}


def vehicle(n: int = 1, speed: float = 50, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"urn:ngsi-ld:Vehicle:V{n}",
        "type": "Vehicle",
        "speed": {"type": "Property", "value": speed, "unitCode": "KMH"},
        "location": {
            "type": "GeoProperty",
            "value": {"type": "Point", "coordinates": [3.72, 51.05]},
        },
        **extra,
    }


def test_create_retrieve_delete(client: TestClient) -> None:
    r = client.post(E, json=vehicle())
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/ngsi-ld/v1/entities/urn:ngsi-ld:Vehicle:V1"
    r = client.get(f"{E}/urn:ngsi-ld:Vehicle:V1")
    assert r.status_code == 200
    body = r.json()
    assert body == vehicle()
    assert "json-ld#context" in r.headers["link"]
    assert client.post(E, json=vehicle()).status_code == 409
    assert client.delete(f"{E}/urn:ngsi-ld:Vehicle:V1").status_code == 204
    r = client.get(f"{E}/urn:ngsi-ld:Vehicle:V1")
    assert r.status_code == 404
    assert r.json()["type"] == "https://uri.etsi.org/ngsi-ld/errors/ResourceNotFound"


def test_representations(client: TestClient) -> None:
    client.post(E, json=vehicle(owner={"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"}))
    kv = client.get(f"{E}/urn:ngsi-ld:Vehicle:V1?options=keyValues").json()
    assert kv == {
        "id": "urn:ngsi-ld:Vehicle:V1",
        "type": "Vehicle",
        "speed": 50,
        "location": {"type": "Point", "coordinates": [3.72, 51.05]},
        "owner": "urn:ngsi-ld:Person:P1",
    }
    concise = client.get(f"{E}/urn:ngsi-ld:Vehicle:V1?options=concise").json()
    assert concise["speed"] == {"value": 50, "unitCode": "KMH"}
    assert concise["owner"] == {"object": "urn:ngsi-ld:Person:P1"}
    assert concise["location"] == {"type": "Point", "coordinates": [3.72, 51.05]}
    sys = client.get(f"{E}/urn:ngsi-ld:Vehicle:V1?options=sysAttrs").json()
    assert sys["createdAt"].endswith("Z") and "modifiedAt" in sys["speed"]


def test_query_type_q_and_paging(client: TestClient) -> None:
    items = [vehicle(n, speed=n * 10) for n in range(1, 26)]
    r = client.post("/ngsi-ld/v1/entityOperations/create", json=items)
    assert r.status_code == 201, r.text
    r = client.get(E, params={"type": "Vehicle", "q": "speed>200", "count": "true", "limit": 3})
    assert r.status_code == 200, r.text
    assert r.headers["NGSILD-Results-Count"] == "5"
    assert [e["speed"]["value"] for e in r.json()] == [210, 220, 230]
    assert 'rel="next"' in r.headers["link"]
    seen: list[str] = []
    offset = 0
    while True:
        page = client.get(E, params={"type": "Vehicle", "limit": 7, "offset": offset}).json()
        if not page:
            break
        seen.extend(e["id"] for e in page)
        offset += 7
    assert sorted(seen) == sorted(i["id"] for i in items)
    assert len(seen) == len(set(seen))


def test_geo_near(client: TestClient) -> None:
    a = vehicle(1)
    b = vehicle(2)
    b["location"]["value"]["coordinates"] = [3.80, 51.05]  # ~5.6 km east
    client.post("/ngsi-ld/v1/entityOperations/create", json=[a, b])
    r = client.get(
        E,
        params={
            "type": "Vehicle",
            "georel": "near;maxDistance==1000",
            "geometry": "Point",
            "coordinates": "[3.721,51.05]",
        },
    )
    assert r.status_code == 200, r.text
    assert [e["id"] for e in r.json()] == ["urn:ngsi-ld:Vehicle:V1"]


def test_batch_reports_bad_items_without_dropping_neighbours(client: TestClient) -> None:
    bad = {"id": "not a uri", "type": "Vehicle"}
    r = client.post("/ngsi-ld/v1/entityOperations/upsert", json=[vehicle(1), bad, vehicle(2)])
    assert r.status_code == 207, r.text
    body = r.json()
    assert body["success"] == ["urn:ngsi-ld:Vehicle:V1", "urn:ngsi-ld:Vehicle:V2"]
    assert body["errors"][0]["error"]["type"].endswith("BadRequestData")
    assert client.get(f"{E}/urn:ngsi-ld:Vehicle:V2").status_code == 200


def test_merge_append_and_attribute_ops(client: TestClient) -> None:
    client.post(E, json=vehicle())
    url = f"{E}/urn:ngsi-ld:Vehicle:V1"
    r = client.patch(url, json={"speed": {"type": "Property", "value": 80}, "color": "red"})
    assert r.status_code == 204, r.text
    body = client.get(url).json()
    assert body["speed"] == {"type": "Property", "value": 80, "unitCode": "KMH"}
    assert body["color"] == {"type": "Property", "value": "red"}
    r = client.post(f"{url}/attrs?options=noOverwrite", json={"color": "blue", "doors": 4})
    assert r.status_code == 207
    assert r.json()["notUpdated"][0]["attributeName"] == "color"
    assert client.get(url).json()["doors"]["value"] == 4
    assert client.delete(f"{url}/attrs/doors").status_code == 204
    assert client.delete(f"{url}/attrs/doors").status_code == 404
    r = client.patch(url, json={"color": "urn:ngsi-ld:null"})
    assert r.status_code == 204
    assert "color" not in client.get(url).json()


def test_tenants_are_isolated(client: TestClient) -> None:
    h = {"NGSILD-Tenant": "ghent"}
    r = client.get(E, params={"type": "Vehicle"}, headers=h)
    assert r.status_code == 404
    assert r.json()["type"].endswith("NonexistentTenant")
    assert client.post(E, json=vehicle(), headers=h).status_code == 201
    r = client.get(E, params={"type": "Vehicle"}, headers=h)
    assert [e["id"] for e in r.json()] == ["urn:ngsi-ld:Vehicle:V1"]
    assert r.headers["NGSILD-Tenant"] == "ghent"
    assert client.get(E, params={"type": "Vehicle"}).json() == []


def test_a_merge_that_changes_a_kind_needs_the_new_payload_and_drops_the_old_metadata(
    client: TestClient,
) -> None:
    """A merge turning speed into a Relationship without an object stored an attribute with no
    payload, and every read of the entity (and every query that found it) answered 500; a
    kind change with its payload kept the old kind's unitCode (the entity could then not be
    written back)."""
    eid = "urn:ngsi-ld:Vehicle:kind-1"
    body = {"id": eid, "type": "Vehicle", "speed": {"type": "Property", "value": 5}}
    body["owner"] = {"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"}
    body["gauge"] = {"type": "Property", "value": 3, "unitCode": "KMH"}
    assert client.post(E, json=body).status_code == 201
    r = client.patch(f"{E}/{eid}", json={"speed": {"type": "Relationship"}})
    assert r.status_code == 400 and r.json()["field"] == "speed", r.text
    r = client.patch(f"{E}/{eid}/attrs/owner", json={"type": "Property"})
    assert r.status_code == 400 and r.json()["field"] == "owner", r.text
    r = client.post(
        "/ngsi-ld/v1/entityOperations/merge", json=[{"id": eid, "speed": {"type": "GeoProperty"}}]
    )
    assert r.status_code in (207, 400), r.text  # refused, not a 500
    got = client.get(f"{E}/{eid}")
    assert got.status_code == 200 and got.json()["speed"]["value"] == 5, got.text
    assert client.get(E, params={"type": "Vehicle"}).status_code == 200
    new = {"gauge": {"type": "Relationship", "object": "urn:ngsi-ld:Thing:T1"}}
    assert client.patch(f"{E}/{eid}", json=new).status_code == 204
    gauge = client.get(f"{E}/{eid}").json()["gauge"]
    assert gauge == {"type": "Relationship", "object": "urn:ngsi-ld:Thing:T1"}


def test_a_count_alone_has_no_next_page_and_merges_refuse_unknown_options(
    client: TestClient,
) -> None:
    """limit=0&count=true linked rel=next to the same request (a client following it looped);
    PATCH of an entity or of its attrs ignored options=bogus and format=bogus."""
    for n in (1, 2):
        body = {
            "id": f"urn:ngsi-ld:Lamp:{n}",
            "type": "Lamp",
            "on": {"type": "Property", "value": True},
        }
        assert client.post(E, json=body).status_code == 201
    r = client.get(E, params={"type": "Lamp", "limit": "0", "count": "true"})
    assert r.status_code == 200 and r.headers["NGSILD-Results-Count"] == "2"
    assert 'rel="next"' not in r.headers.get("Link", "")
    frag = {"on": {"type": "Property", "value": False}}
    for path, params in (
        (f"{E}/urn:ngsi-ld:Lamp:1", {"options": "bogus"}),
        (f"{E}/urn:ngsi-ld:Lamp:1", {"format": "bogus"}),
        (f"{E}/urn:ngsi-ld:Lamp:1/attrs", {"options": "bogus"}),
    ):
        r = client.patch(path, json=frag, params=params)
        assert r.status_code == 400 and r.json()["field"] in params, (path, r.text)


def test_an_entity_id_with_an_attrs_segment_is_refused(client: TestClient) -> None:
    """urn:x:S/attrs/b was reached as attribute b of urn:x:S: a DELETE on its own Location
    deleted the other entity's attribute."""
    for eid in ("urn:x:S/attrs/b", "urn:x:S/attrs"):
        r = client.post(E, json={"id": eid, "type": "T"})
        assert r.status_code == 400 and r.json()["field"] == "id", r.text
    r = client.post(
        "/ngsi-ld/v1/entityOperations/upsert", json=[{"id": "urn:x:S/attrs", "type": "T"}]
    )
    assert r.status_code in (207, 400) and "urn:x:S/attrs" not in str(r.json().get("success"))
    assert client.post(E, json={"id": "urn:x:S/attrsx", "type": "T"}).status_code == 201


NULL = "urn:ngsi-ld:null"


def test_a_concise_multi_attribute_written_back_keeps_every_instance(client: TestClient) -> None:
    """Concise output shows a multi-attribute as [1, {"value": 2, "datasetId": ...}] (the
    default instance a bare value); written back, that array was stored as ONE Property whose
    value was the array, and the second instance was lost. A plain array stays a value."""
    eid = "urn:ngsi-ld:Vehicle:multi-1"
    body = {
        "id": eid,
        "type": "Vehicle",
        "speed": [
            {"type": "Property", "value": 1},
            {"type": "Property", "value": 2, "datasetId": "urn:ds:2"},
        ],
        "owner": [
            {"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"},
            {"type": "Relationship", "object": "urn:ngsi-ld:Person:P2", "datasetId": "urn:ds:2"},
        ],
        "tags": {"type": "Property", "value": [1, 2]},
    }
    assert client.post(E, json=body).status_code == 201
    normalized = client.get(f"{E}/{eid}").json()
    concise = client.get(f"{E}/{eid}", params={"format": "concise"}).json()
    assert concise["speed"] == [1, {"value": 2, "datasetId": "urn:ds:2"}]
    fragment = {k: v for k, v in concise.items() if k not in ("id", "type")}
    for method, url in (
        ("PUT", f"{E}/{eid}"),
        ("PATCH", f"{E}/{eid}"),
        ("POST", f"{E}/{eid}/attrs"),
    ):
        r = client.request(method, url, json=fragment)
        assert r.status_code == 204, (method, r.text)
        assert client.get(f"{E}/{eid}").json() == normalized, method
    r = client.post("/ngsi-ld/v1/entityOperations/merge", json=[{"id": eid, **fragment}])
    assert r.status_code == 204, r.text
    assert client.get(f"{E}/{eid}").json() == normalized
    copy = {**concise, "id": "urn:ngsi-ld:Vehicle:multi-2"}
    assert client.post(E, json=copy).status_code == 201
    assert client.get(f"{E}/{copy['id']}").json() == {**normalized, "id": copy["id"]}
    # a bare array without instances in it is one Property with an array value
    assert client.patch(f"{E}/{eid}", json={"tags": [3, {"a": 4}]}).status_code == 204
    tags = client.get(f"{E}/{eid}").json()["tags"]
    assert tags == {"type": "Property", "value": [3, {"a": 4}]}


def test_a_merge_null_deletes_a_language_and_keeps_a_json_value_verbatim(
    client: TestClient,
) -> None:
    """A merge with NGSI-LD Null inside a languageMap stored the text urn:ngsi-ld:null as
    that language (and replaced the whole map): it deletes that language. A JsonProperty's
    json is a JSON literal (@type @json in the core context): its content is data, Null
    included, and is replaced whole."""
    eid = "urn:ngsi-ld:Bridge:lang-1"
    body = {
        "id": eid,
        "type": "Bridge",
        "name": {
            "type": "LanguageProperty",
            "languageMap": {"en": "Bridge", "fr": "Pont", "nl": "Brug"},
        },
        "cfg": {"type": "JsonProperty", "json": {"a": 1, "b": 2}},
    }
    assert client.post(E, json=body).status_code == 201
    url = f"{E}/{eid}"
    frag = {"name": {"type": "LanguageProperty", "languageMap": {"fr": NULL, "de": "Brücke"}}}
    frag["cfg"] = {"type": "JsonProperty", "json": {"b": NULL}}
    assert client.patch(url, json=frag).status_code == 204
    got = client.get(url).json()
    assert got["name"]["languageMap"] == {"en": "Bridge", "nl": "Brug", "de": "Brücke"}
    assert got["cfg"]["json"] == {"b": NULL}
    r = client.post(
        "/ngsi-ld/v1/entityOperations/merge",
        json=[{"id": eid, "name": {"languageMap": {"nl": NULL}}}],
    )
    assert r.status_code == 204, r.text
    r = client.patch(f"{url}/attrs/name", json={"languageMap": {"en": NULL}})
    assert r.status_code == 204, r.text
    assert client.get(url).json()["name"]["languageMap"] == {"de": "Brücke"}
    # a new attribute: the Null deletes nothing; the last language gone, the attribute goes
    new = {"motto": {"languageMap": {"en": "Cross", "fr": NULL}}}
    assert client.patch(url, json={**new, "name": {"languageMap": {"de": NULL}}}).status_code == 204
    got = client.get(url).json()
    assert got["motto"]["languageMap"] == {"en": "Cross"} and "name" not in got
    # Null is not a text: on create it is refused
    name = {"type": "LanguageProperty", "languageMap": {"en": "x", "fr": NULL}}
    r = client.post(E, json={"id": "urn:ngsi-ld:Bridge:lang-2", "type": "Bridge", "name": name})
    assert r.status_code == 400 and r.json()["field"] == "name", r.text


def test_sub_attribute_system_times(client: TestClient) -> None:
    """Sub-attributes had no createdAt/modifiedAt; one added by a merge got them only at its
    next change (createdAt then that change's time), and an unchanged one re-sent with its
    attribute looked modified. createdAt: when it first appeared; modifiedAt: when its own
    content last changed."""
    eid = "urn:ngsi-ld:Vehicle:sys-1"
    speed = {"type": "Property", "value": 1, "acc": {"type": "Property", "value": 0.1}}
    assert client.post(E, json={"id": eid, "type": "Vehicle", "speed": speed}).status_code == 201
    url = f"{E}/{eid}"

    def speed_now() -> dict[str, Any]:
        got = client.get(url, params={"options": "sysAttrs"}).json()["speed"]
        assert isinstance(got, dict)
        return got

    s0 = speed_now()
    assert s0["acc"]["createdAt"] == s0["acc"]["modifiedAt"] == s0["createdAt"]
    # a merge adds src beside acc
    r = client.patch(url, json={"speed": {"value": 2, "src": {"value": "gps"}}})
    assert r.status_code == 204
    s1 = speed_now()
    assert s1["src"]["createdAt"] == s1["src"]["modifiedAt"] == s1["modifiedAt"]
    assert (s1["acc"]["createdAt"], s1["acc"]["modifiedAt"]) == (
        s0["acc"]["createdAt"],
        s0["acc"]["modifiedAt"],
    )
    # a merge changes src only
    assert client.patch(url, json={"speed": {"src": {"value": "gps2"}}}).status_code == 204
    s2 = speed_now()
    assert s2["src"]["createdAt"] == s1["src"]["createdAt"]
    assert s2["src"]["modifiedAt"] == s2["modifiedAt"]
    assert s2["acc"]["modifiedAt"] == s0["acc"]["modifiedAt"]
    # an update replaces the attribute: acc re-sent unchanged keeps its times, src changes
    whole = {"type": "Property", "value": 3, "acc": {"type": "Property", "value": 0.1}}
    whole["src"] = {"type": "Property", "value": "radar"}
    assert client.patch(f"{url}/attrs", json={"speed": whole}).status_code == 204
    s3 = speed_now()
    assert s3["acc"] == s0["acc"]
    assert s3["src"]["createdAt"] == s1["src"]["createdAt"]
    assert s3["src"]["modifiedAt"] == s3["modifiedAt"]


def test_geojson_geometry_is_null_unless_the_named_attribute_is_a_geoproperty(
    client: TestClient,
) -> None:
    """geometryProperty naming a number (or a Relationship) put its value in Feature.geometry,
    for one entity and for each Feature of a query; geometry is null unless the attribute is
    a GeoProperty."""
    owner = {"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"}
    assert client.post(E, json=vehicle(owner=owner)).status_code == 201
    geo = {"Accept": "application/geo+json"}
    point = {"type": "Point", "coordinates": [3.72, 51.05]}
    url = f"{E}/urn:ngsi-ld:Vehicle:V1"
    for prop, geometry in (("speed", None), ("owner", None), ("location", point)):
        params = {"geometryProperty": prop}
        r = client.get(url, params=params, headers=geo)
        assert r.status_code == 200 and r.json()["geometry"] == geometry, (prop, r.text)
        r = client.get(E, params={"type": "Vehicle", **params}, headers=geo)
        assert r.status_code == 200, r.text
        assert [f["geometry"] for f in r.json()["features"]] == [geometry], prop


def test_q_compares_datetimes_as_instants(client: TestClient) -> None:
    """A DateTime in q was compared as text: 10:00:00.000Z did not equal a stored 10:00:00Z,
    and an offset or a lowercase z ordered by its characters (ETSI GS CIM 009, 4.9)."""
    stamps = {"T1": "2024-03-01T10:00:00Z", "T2": "2024-03-01T11:30:00+01:00"}
    for n, at in stamps.items():
        body = {
            "id": f"urn:ngsi-ld:Trip:{n}",
            "type": "Trip",
            "d": {"type": "Property", "value": {"@type": "DateTime", "@value": at}},
        }
        assert client.post(E, json=body).status_code == 201
    for q, want in [
        ("d==2024-03-01T10:00:00.000Z", ["T1"]),
        ("d==2024-03-01T11:00:00+01:00", ["T1"]),
        ("d==2024-03-01T10:00:00z", ["T1"]),
        ("d<2024-03-01T10:45:00Z", ["T1", "T2"]),
        ("d>2024-03-01T10:00:00.5Z", ["T2"]),
        ("d==2024-03-01T09:00:00Z..2024-03-01T11:00:00+01:00", ["T1"]),
    ]:
        r = client.get(E, params={"type": "Trip", "q": q})
        assert r.status_code == 200, (q, r.text)
        assert sorted(e["id"].rsplit(":", 1)[1] for e in r.json()) == want, q
    # the stored value is what the client wrote
    got = client.get(f"{E}/urn:ngsi-ld:Trip:T2").json()["d"]["value"]
    assert got == {"@type": "DateTime", "@value": "2024-03-01T11:30:00+01:00"}


def test_a_lowercase_z_datetime_is_accepted(client: TestClient) -> None:
    """RFC 3339 (5.6) allows a lowercase z; observedAt "...z" was refused with 400."""
    body = vehicle()
    body["speed"]["observedAt"] = "2024-03-01T10:00:00.5z"
    r = client.post(E, json=body)
    assert r.status_code == 201, r.text
    got = client.get(f"{E}/urn:ngsi-ld:Vehicle:V1").json()["speed"]["observedAt"]
    assert got == "2024-03-01T10:00:00.5Z"
    r = client.patch(
        f"{E}/urn:ngsi-ld:Vehicle:V1/attrs",
        json={"speed": {"type": "Property", "value": 1, "observedAt": "2024-03-01T11:00:00z"}},
    )
    assert r.status_code == 204, r.text
    for q in ("speed.observedAt==2024-03-01T11:00:00z", "speed.observedAt>2024-03-01T10:30:00Z"):
        r = client.get(E, params={"type": "Vehicle", "q": q})
        assert r.status_code == 200, (q, r.text)
        assert [e["id"] for e in r.json()] == ["urn:ngsi-ld:Vehicle:V1"], q
