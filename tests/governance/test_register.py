"""The public register: entities by source from a real data bank, the JSON document, the page."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest

from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser, now_iso
from cityward.bank.service import Bank, new_document
from cityward.bank.store import Store
from cityward.governance.register import (
    NEVER_STATEMENTS,
    PAGE_SIZE,
    DevicesBySource,
    RegisterDevice,
    build_register,
    collect_entities,
    render_html,
    representative_point,
    retention_text,
)
from cityward.governance.sources import (
    UNDECLARED,
    Catalog,
    DataSource,
    PersonalData,
    SourceKind,
    default_sources,
)

CORE = ContextResolver(allow_fetch=False).core
VOCAB = "https://uri.etsi.org/ngsi-ld/default-context/"
GENERATED = "2026-03-01T12:00:00Z"

SOURCE_FIELDS = {
    "id",
    "name",
    "kind",
    "types",
    "purposes",
    "legal_basis",
    "personal_data",
    "personal_data_text",
    "retention",
    "owner",
    "contact",
    "description",
    "computes",
    "never_computes",
    "devices",
    "device_count",
    "listed",
    "not_listed_why",
    "entity_count",
}


def catalog() -> Catalog:
    """The demo sources plus one selected by id pattern and one declared by type IRI."""
    extra = [
        DataSource(
            id="parking",
            name="Parking bay sensors",
            id_patterns=(r"urn:ngsi-ld:[A-Za-z]+:parking-\d+",),
            purposes=("parking-management",),
            legal_basis="GDPR art. 6(1)(e)",
            retention="P180D",
            owner="Mobility department",
            contact="https://city.example/parking",
            computes=("bay occupancy",),
        ),
        DataSource(
            id="weather",
            name="Weather stations",
            types=(VOCAB + "WeatherObserved",),
            purposes=("environment-monitoring",),
            legal_basis="GDPR art. 6(1)(e)",
            retention="P1Y6M",
            owner="Environment department",
        ),
    ]
    return Catalog(default_sources() + extra)


def entity(eid: str, etype: str, geometry: dict[str, Any] | None = None) -> dict[str, Any]:
    e: dict[str, Any] = {"id": eid, "type": etype, "name": {"type": "Property", "value": "x"}}
    if geometry is not None:
        e["location"] = {"type": "GeoProperty", "value": geometry}
    return e


def write(store: Store, entities: list[dict[str, Any]], tenant: str = "") -> None:
    bank = Bank(store)
    parser = EntityParser(CORE)
    for start in range(0, len(entities), 1000):
        docs = [parser.entity(e) for e in entities[start : start + 1000]]
        result = bank.batch_upsert(tenant, docs, "update")
        assert not result.errors, result.errors


def point(lon: float, lat: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [lon, lat]}


def test_every_declared_source_has_all_fields(store: Store) -> None:
    cat = catalog()
    write(store, [entity("urn:ngsi-ld:TrafficFlowObserved:j1", "TrafficFlowObserved")])
    reg = build_register(
        cat, collect_entities(store, cat), "Ghent", "privacy@ghent.example", GENERATED
    )
    orjson.dumps(reg)  # JSON-ready
    assert reg["site"] == {"name": "Ghent", "contact": "privacy@ghent.example"}
    assert reg["generated_at"] == GENERATED
    assert reg["never"] == list(NEVER_STATEMENTS)
    never = " ".join(reg["never"]).lower()
    for phrase in ("face recognition", "licence-plate", "tracking", "re-identification"):
        assert phrase in never
    assert [s["id"] for s in reg["sources"]] == [s.id for s in cat.sources]
    by_id = {s["id"]: s for s in reg["sources"]}
    for source in cat.sources:
        got = by_id[source.id]
        assert set(got) == SOURCE_FIELDS
        assert got["name"] == source.name
        assert got["kind"] == source.kind.value
        assert got["purposes"] == list(source.purposes)
        assert got["legal_basis"] == source.legal_basis
        assert got["personal_data"] == source.personal_data.value
        assert got["retention"]["iso"] == source.retention
        assert got["retention"]["text"]
        assert got["owner"] == source.owner
        assert got["contact"] == source.contact
        assert got["computes"] == list(source.computes)
        assert got["never_computes"] == list(source.never_computes)
        assert got["device_count"] == len(got["devices"])
    assert by_id["traffic-detectors"]["retention"]["text"] == "1 year"
    assert by_id["traffic-signals"]["retention"]["text"] == "90 days"
    assert by_id["weather"]["retention"]["text"] == "1 year and 6 months"
    assert by_id["traffic-cameras"]["personal_data"] == PersonalData.INDIRECT.value
    assert by_id["traffic-cameras"]["kind"] == SourceKind.CAMERA.value
    assert reg["device_count"] == 1
    assert reg["undeclared"]["device_count"] == 0


def test_entities_land_under_their_source_by_type_and_id_pattern(store: Store) -> None:
    cat = catalog()
    write(
        store,
        [
            entity("urn:ngsi-ld:TrafficFlowObserved:j1", "TrafficFlowObserved", point(3.7, 51.0)),
            entity("urn:ngsi-ld:AirQualityObserved:a1", "AirQualityObserved", point(3.8, 51.1)),
            entity("urn:ngsi-ld:CrowdFlowObserved:c1", "CrowdFlowObserved"),
            entity("urn:ngsi-ld:ItemFlowObserved:c2", "ItemFlowObserved"),
            # declared by the IRI of its type
            entity("urn:ngsi-ld:WeatherObserved:w1", "WeatherObserved"),
            # by id pattern, whatever its type; the pattern wins over a declared type
            entity("urn:ngsi-ld:ParkingSpot:parking-1", "ParkingSpot"),
            entity("urn:ngsi-ld:TrafficFlowObserved:parking-2", "TrafficFlowObserved"),
            # a full match is needed
            entity("urn:ngsi-ld:ParkingSpot:parking-3x", "ParkingSpot"),
        ],
    )
    got = collect_entities(store, cat)
    assert set(got) == {s.id for s in cat.sources}
    ids = {k: [d.id for d in v] for k, v in got.items()}
    assert ids["traffic-detectors"] == ["urn:ngsi-ld:TrafficFlowObserved:j1"]
    assert ids["air-quality"] == ["urn:ngsi-ld:AirQualityObserved:a1"]
    assert ids["traffic-cameras"] == [
        "urn:ngsi-ld:CrowdFlowObserved:c1",
        "urn:ngsi-ld:ItemFlowObserved:c2",
    ]
    assert ids["weather"] == ["urn:ngsi-ld:WeatherObserved:w1"]
    assert ids["parking"] == [
        "urn:ngsi-ld:ParkingSpot:parking-1",
        "urn:ngsi-ld:TrafficFlowObserved:parking-2",
    ]
    assert ids["noise"] == ids["alerts"] == ids["traffic-signals"] == []
    assert got.undeclared_count == 1
    types = {d.id: d.type for v in got.values() for d in v}
    assert types["urn:ngsi-ld:TrafficFlowObserved:j1"] == "TrafficFlowObserved"
    assert types["urn:ngsi-ld:WeatherObserved:w1"] == "WeatherObserved"
    assert types["urn:ngsi-ld:ParkingSpot:parking-1"] == "ParkingSpot"


def test_catalog_with_expansion_map_classifies_the_same(store: Store) -> None:
    sources = default_sources()
    expand = {t: CORE.expand(t) for s in sources for t in s.types}
    cat = Catalog(sources, expand=expand)
    write(store, [entity("urn:ngsi-ld:NoiseLevelObserved:n1", "NoiseLevelObserved")])
    got = collect_entities(store, cat)
    assert [d.id for d in got["noise"]] == ["urn:ngsi-ld:NoiseLevelObserved:n1"]
    assert got.undeclared_count == 0


def test_locations(store: Store) -> None:
    cat = catalog()
    square = [[[3.0, 51.0], [3.2, 51.0], [3.2, 51.2], [3.0, 51.2], [3.0, 51.0]]]
    write(
        store,
        [
            entity(
                "urn:ngsi-ld:TrafficFlowObserved:p", "TrafficFlowObserved", point(3.7215, 51.05)
            ),
            entity(
                "urn:ngsi-ld:TrafficFlowObserved:line",
                "TrafficFlowObserved",
                {"type": "LineString", "coordinates": [[3.0, 51.0], [3.4, 51.2]]},
            ),
            entity(
                "urn:ngsi-ld:TrafficFlowObserved:poly",
                "TrafficFlowObserved",
                {"type": "Polygon", "coordinates": square},
            ),
            entity("urn:ngsi-ld:TrafficFlowObserved:none", "TrafficFlowObserved"),
        ],
    )
    got = {
        d.id.rsplit(":", 1)[1]: d.location
        for d in collect_entities(store, cat)["traffic-detectors"]
    }
    assert got["p"] == (3.7215, 51.05)
    assert got["line"] == pytest.approx((3.2, 51.1))
    assert got["poly"] == pytest.approx((3.1, 51.1))
    assert got["none"] is None
    reg = build_register(cat, collect_entities(store, cat), "Ghent", "", GENERATED)
    devices = {d["id"]: d for d in reg["sources"][0]["devices"]}
    assert devices["urn:ngsi-ld:TrafficFlowObserved:p"]["location"] == {"lon": 3.7215, "lat": 51.05}
    assert devices["urn:ngsi-ld:TrafficFlowObserved:none"]["location"] is None


def test_representative_point_of_other_geometries() -> None:
    multi = {"type": "MultiPoint", "coordinates": [[1.0, 2.0], [3.0, 4.0]]}
    assert representative_point(multi) == (2.0, 3.0)
    coll = {"type": "GeometryCollection", "geometries": [point(0.0, 0.0), point(2.0, 2.0)]}
    assert representative_point(coll) == (1.0, 1.0)
    assert representative_point({"type": "Point", "coordinates": []}) is None
    assert representative_point("nonsense") is None


def test_undeclared_entities_are_only_counted(store: Store) -> None:
    cat = catalog()
    write(
        store,
        [
            entity("urn:ngsi-ld:Mystery:m1", "Mystery", point(1.0, 2.0)),
            entity("urn:ngsi-ld:Mystery:m2", "Mystery"),
            entity("urn:ngsi-ld:TrafficFlowObserved:j1", "TrafficFlowObserved"),
        ],
    )
    # another tenant's entities are not this tenant's register
    write(store, [entity("urn:ngsi-ld:Mystery:other", "Mystery")], tenant="other")
    got = collect_entities(store, cat)
    assert isinstance(got, DevicesBySource)
    assert UNDECLARED not in got
    assert got.undeclared_count == 2
    reg = build_register(cat, got, "Ghent", "privacy@ghent.example", GENERATED)
    assert reg["undeclared"]["device_count"] == 2
    assert UNDECLARED not in {s["id"] for s in reg["sources"]}
    assert "Mystery" not in orjson.dumps(reg).decode()
    page = render_html(reg)
    assert "Mystery" not in page
    assert "Entities not yet classified: <strong>2</strong>" in page
    other = collect_entities(store, cat, tenant="other")
    assert other.undeclared_count == 1
    assert sum(len(v) for v in other.values()) == 0
    # the count can also be given explicitly
    explicit = build_register(cat, dict(got), "Ghent", "", GENERATED, undeclared_count=5)
    assert explicit["undeclared"]["device_count"] == 5


def test_moving_vehicles_alerts_and_personal_data_are_counted_not_listed(store: Store) -> None:
    """The register listed every entity of every declared source with its place: an
    ambulance on a run (its live position, updated with every move), every alert, and a
    source declared personal. It lists installed devices; the others are counted."""
    complaints = DataSource(
        id="complaints",
        name="Complaints",
        kind=SourceKind.SENSOR,  # even declared as a sensor: personal data is never listed
        types=("Complaint",),
        purposes=("public-safety",),
        personal_data=PersonalData.PERSONAL,
        legal_basis="GDPR art. 6(1)(e)",
        retention="P1Y",
        owner="City",
    )
    cat = Catalog([*default_sources(), complaints])
    run = "urn:ngsi-ld:EmergencyVehicleRun:ev-1"
    write(
        store,
        [
            entity(run, "EmergencyVehicleRun", point(3.7301, 51.0612)),
            entity("urn:ngsi-ld:Alert:a1", "Alert", point(3.7402, 51.0513)),
            entity("urn:ngsi-ld:Complaint:c1", "Complaint", point(3.7503, 51.0414)),
            entity("urn:ngsi-ld:Camera:cam1", "Camera", point(3.7604, 51.0315)),
            # alerts that belong to a device's source: a traffic detector's (derived), a
            # camera's event; they are events, not devices
            entity("urn:ngsi-ld:Alert:from:traffic-detectors:a2", "Alert", point(3.7705, 51.0216)),
            entity("urn:ngsi-ld:Alert:camera:cam1:a3", "Alert", point(3.7806, 51.0117)),
        ],
    )
    got = collect_entities(store, cat)
    reg = build_register(cat, got, "Ghent", "", GENERATED)
    by_id = {s["id"]: s for s in reg["sources"]}
    for sid in ("emergency-runs", "alerts", "complaints"):
        assert by_id[sid]["listed"] is False and by_id[sid]["devices"] == [], sid
        assert by_id[sid]["entity_count"] == 1 and by_id[sid]["device_count"] == 0, sid
        assert by_id[sid]["not_listed_why"], sid
    assert [d["id"] for d in by_id["traffic-cameras"]["devices"]] == ["urn:ngsi-ld:Camera:cam1"]
    assert by_id["traffic-detectors"]["devices"] == []
    # counted all the same, with their source
    assert by_id["traffic-detectors"]["entity_count"] == 1
    assert by_id["traffic-cameras"]["entity_count"] == 2
    assert by_id["traffic-cameras"]["device_count"] == 1
    assert "And 1 record computed from them (alerts)" in render_html(reg)
    assert reg["device_count"] == 1
    text = orjson.dumps(reg).decode() + render_html(reg)
    hidden_ids = (run, "Alert:a1", "Complaint:c1", "Alert:from", "Alert:camera")
    for hidden in (*hidden_ids, "51.0612", "51.0513", "51.0414", "51.0216", "51.0117"):
        assert hidden not in text, hidden
    assert "51.0315" in text  # a camera's place is what the register is for
    assert "their positions are not published" in render_html(reg)


def test_html_escapes_hostile_ids(store: Store) -> None:
    cat = catalog()
    hostile = "urn:ngsi-ld:TrafficFlowObserved:<script>alert(1)</script>"
    # the API refuses such ids, but the register must be safe whatever the bank holds
    now = now_iso()
    frag = {
        "id": hostile,
        "type": [VOCAB + "TrafficFlowObserved"],
        "attrs": {},
    }
    with store.write("", create_tenant=True) as txn:
        pk = txn.new_pks(1)[0]
        txn.put([(pk, new_document(frag, now))], replacing=[])
    # what the API does accept: ampersands and quotes
    write(store, [entity("urn:ngsi-ld:TrafficFlowObserved:a&b'c", "TrafficFlowObserved")])
    reg = build_register(cat, collect_entities(store, cat), "<b>Town</b>", "a@b.example", GENERATED)
    assert hostile in {d["id"] for d in reg["sources"][0]["devices"]}
    page = render_html(reg)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&amp;b&#x27;c" in page
    assert "<b>Town</b>" not in page and "&lt;b&gt;Town&lt;/b&gt;" in page
    # escaped in attributes too (description with quotes)
    src = DataSource(
        id="x",
        name='Quoted "name" <i>',
        types=("X",),
        purposes=("p",),
        legal_basis="b",
        retention="P1D",
        owner="o",
        contact='"><svg onload=alert(1)>',
    )
    devices = {"x": [RegisterDevice('"><img src=x onerror=alert(1)>', "X", (1.0, 2.0))]}
    page = render_html(build_register(Catalog([src]), devices, "T", "", GENERATED))
    assert "<img" not in page and "<svg" not in page and "<i>" not in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page


def test_html_is_a_self_contained_accessible_page(store: Store) -> None:
    cat = catalog()
    write(
        store,
        [entity("urn:ngsi-ld:TrafficFlowObserved:j1", "TrafficFlowObserved", point(3.7, 51.0))],
    )
    reg = build_register(
        cat, collect_entities(store, cat), "Ghent", "privacy@ghent.example", GENERATED
    )
    page = render_html(reg)
    assert page.startswith("<!DOCTYPE html>")
    assert '<html lang="en">' in page
    assert '<meta charset="utf-8">' in page
    assert "<title>" in page
    for heading in ("What we measure here", "What we never do"):
        assert heading in page
    # nothing loaded from elsewhere: no scripts, stylesheets, images, fonts or remote URLs
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert "@import" not in page and "url(" not in page
    assert re.search(r"\ssrc=", page) is None
    hrefs = re.findall(r'href="([^"]*)"', page)
    assert hrefs and all(
        h.startswith(("#", "mailto:", "geo:", "https://city.example")) for h in hrefs
    )
    assert 'href="mailto:privacy@ghent.example"' in page
    assert 'href="geo:51.0,3.7"' in page
    for source in cat.sources:
        assert source.name in page
    assert page.count("<table>") == 1  # only sources with devices get a table
    assert '<th scope="col">Device</th>' in page
    assert "No devices of this kind are installed at the moment." in page


def test_thousands_of_entities_page_correctly(store: Store) -> None:
    cat = catalog()
    n_traffic, n_air, n_undeclared = 1400, 700, 400
    entities = [
        entity(
            f"urn:ngsi-ld:TrafficFlowObserved:t{i:05d}", "TrafficFlowObserved", point(i / 10, 1.0)
        )
        for i in range(n_traffic)
    ]
    entities += [
        entity(f"urn:ngsi-ld:AirQualityObserved:a{i:05d}", "AirQualityObserved", point(1.0, i / 10))
        for i in range(n_air)
    ]
    entities += [entity(f"urn:ngsi-ld:Mystery:m{i:05d}", "Mystery") for i in range(n_undeclared)]
    # interleave the sources so every page holds several of them
    entities.sort(key=lambda e: e["id"].rsplit(":", 1)[1][1:])
    assert len(entities) == 2500 > 2 * PAGE_SIZE
    write(store, entities)
    got = collect_entities(store, cat)
    traffic = got["traffic-detectors"]
    air = got["air-quality"]
    assert len(traffic) == n_traffic and len({d.id for d in traffic}) == n_traffic
    assert len(air) == n_air and len({d.id for d in air}) == n_air
    assert got.undeclared_count == n_undeclared
    assert [d.id for d in traffic] == sorted(d.id for d in traffic)
    assert all(d.location == (int(d.id[-5:]) / 10, 1.0) for d in traffic)
    assert all(d.location == (1.0, int(d.id[-5:]) / 10) for d in air)
    reg = build_register(cat, got, "Ghent", "", GENERATED)
    assert reg["device_count"] == n_traffic + n_air
    page = render_html(reg)
    assert page.count("<tr>") == n_traffic + n_air + 2  # + one header row per table


@pytest.mark.parametrize(
    ("iso", "text"),
    [
        ("P1Y", "1 year"),
        ("P5Y", "5 years"),
        ("P90D", "90 days"),
        ("P1D", "1 day"),
        ("P2W", "2 weeks"),
        ("P18M", "18 months"),
        ("P1Y6M", "1 year and 6 months"),
        ("PT12H", "12 hours"),
        ("P1DT2H30M", "1 day, 2 hours and 30 minutes"),
        ("PT1.5H", "1.5 hours"),
    ],
)
def test_retention_text(iso: str, text: str) -> None:
    assert retention_text(iso) == text
