"""Geometry validation, geo-query parsing, the bbox prefilter and exact geo matching."""

from __future__ import annotations

import doctest
import json
import math
import threading
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cityward.bank import geo
from cityward.bank.errors import BadRequestData
from cityward.bank.geo import (
    GeoQuery,
    bbox,
    boxes_intersect,
    candidate_bbox,
    distance_m,
    matches,
    parse_geometry,
    parse_geoquery,
)

R = geo.EARTH_RADIUS_M


def point(lon: float, lat: float) -> dict[str, Any]:
    return {"type": "Point", "coordinates": [lon, lat]}


def polygon(*rings: list[list[float]]) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": list(rings)}


def box_ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def line(*positions: tuple[float, float]) -> dict[str, Any]:
    return {"type": "LineString", "coordinates": [list(p) for p in positions]}


def query(georel: str, geometry: dict[str, Any]) -> GeoQuery:
    q = parse_geoquery(georel, geometry["type"], json.dumps(geometry["coordinates"]), None)
    assert q is not None
    return q


def destination(lon: float, lat: float, bearing_deg: float, metres: float) -> tuple[float, float]:
    """The point `metres` away from (lon, lat) along `bearing_deg`, on the module's sphere."""
    p1, l1 = math.radians(lat), math.radians(lon)
    th, dl = math.radians(bearing_deg), metres / R
    sin_p2 = math.sin(p1) * math.cos(dl) + math.cos(p1) * math.sin(dl) * math.cos(th)
    p2 = math.asin(max(-1.0, min(1.0, sin_p2)))
    l2 = l1 + math.atan2(
        math.sin(th) * math.sin(dl) * math.cos(p1), math.cos(dl) - math.sin(p1) * math.sin(p2)
    )
    lon2 = (math.degrees(l2) + 180.0) % 360.0 - 180.0
    return lon2, max(-90.0, min(90.0, math.degrees(p2)))


# --------------------------------------------------------------------------------------------
# parse_geometry

HOLED = polygon(box_ring(0, 0, 10, 10), box_ring(4, 4, 6, 6))

VALID_GEOMETRIES: list[tuple[object, dict[str, Any]]] = [
    (point(8, 49), point(8, 49)),
    (
        {"type": "Point", "coordinates": [8.5, 49.1, 120]},
        {"type": "Point", "coordinates": [8.5, 49.1, 120]},
    ),
    ('{"type": "Point", "coordinates": [8, 49]}', point(8, 49)),
    ({"type": "Point", "coordinates": [-180, -90]}, point(-180, -90)),
    ({"type": "Point", "coordinates": [180, 90]}, point(180, 90)),
    (
        {"type": "Point", "coordinates": [1, 2], "bbox": [1, 2, 1, 2], "name": "foreign"},
        point(1, 2),
    ),
    (
        {"type": "MultiPoint", "coordinates": [[0, 0], [1, 1, 5]]},
        {"type": "MultiPoint", "coordinates": [[0, 0], [1, 1, 5]]},
    ),
    (line((0, 0), (1, 1)), line((0, 0), (1, 1))),
    (
        {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[2, 2], [3, 3], [4, 2]]]},
        {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[2, 2], [3, 3], [4, 2]]]},
    ),
    (HOLED, HOLED),
    (
        {"type": "MultiPolygon", "coordinates": [HOLED["coordinates"], [box_ring(20, 20, 21, 21)]]},
        {"type": "MultiPolygon", "coordinates": [HOLED["coordinates"], [box_ring(20, 20, 21, 21)]]},
    ),
    # A self-intersecting ring is accepted (see the module docstring) and repaired for matching.
    (
        polygon([[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]),
        polygon([[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]),
    ),
]


@pytest.mark.parametrize(("given_", "expected"), VALID_GEOMETRIES)
def test_parse_geometry_accepts(given_: object, expected: dict[str, Any]) -> None:
    assert parse_geometry(given_, "location") == expected


def test_parse_geometry_copies_and_keeps_integers() -> None:
    raw = {"type": "LineString", "coordinates": [[1, 2], [3.5, 4]]}
    clean = parse_geometry(raw, "location")
    clean["coordinates"][0][0] = 99
    assert raw["coordinates"] == [[1, 2], [3.5, 4]]
    assert type(parse_geometry(point(8, 49), "x")["coordinates"][0]) is int


POINT_NESTING = "Point coordinates are nested 2 levels deep, expected 1: [lon, lat]"
POLYGON_NESTING = (
    "Polygon coordinates are nested 2 levels deep, expected 3: [[[lon, lat], ...], ...] (rings)"
)
INVALID_GEOMETRIES: list[tuple[object, str]] = [
    (None, "a geometry must be a JSON object, got null"),
    ([0, 0], "a geometry must be a JSON object, got an array"),
    ("not json", "geometry is a string but not valid JSON"),
    ('"a string in a string"', "a geometry must be a JSON object, got a string"),
    ({"coordinates": [0, 0]}, "geometry has no 'type'"),
    ({"type": 5, "coordinates": [0, 0]}, "geometry type must be a string, got a number"),
    (
        {"type": "GeometryCollection", "geometries": [point(0, 0)]},
        "GeometryCollection is not supported; use Point, MultiPoint, LineString, "
        "MultiLineString, Polygon or MultiPolygon",
    ),
    (
        {"type": "Feature", "geometry": point(0, 0)},
        "unsupported geometry type 'Feature'; expected Point, MultiPoint, LineString, "
        "MultiLineString, Polygon or MultiPolygon",
    ),
    ({"type": "Point"}, "Point has no 'coordinates'"),
    (
        {"type": "Point", "coordinates": "1,2"},
        "Point coordinates must be an array [lon, lat], got a string",
    ),
    ({"type": "Point", "coordinates": [1]}, "Point position must have 2 or 3 numbers, got 1"),
    (
        {"type": "Point", "coordinates": [1, 2, 3, 4]},
        "Point position must have 2 or 3 numbers, got 4",
    ),
    ({"type": "Point", "coordinates": [[1, 2]]}, POINT_NESTING),
    ({"type": "Point", "coordinates": ["1", 2]}, "Point position must hold numbers, got a string"),
    (
        {"type": "Point", "coordinates": [True, 2]},
        "Point position must hold numbers, got a boolean",
    ),
    ({"type": "Point", "coordinates": [0, None]}, "Point position must hold numbers, got null"),
    (
        '{"type": "Point", "coordinates": [NaN, 0]}',
        "Point position holds a non-finite number (nan)",
    ),
    (
        {"type": "Point", "coordinates": [181, 0]},
        "Point position: longitude 181 is out of range [-180, 180]",
    ),
    (
        {"type": "Point", "coordinates": [0, -90.5]},
        "Point position: latitude -90.5 is out of range [-90, 90]",
    ),
    (
        {"type": "Point", "coordinates": [0, 0, 10**20]},
        "Point position: altitude 100000000000000000000 is too large",
    ),
    ({"type": "MultiPoint", "coordinates": []}, "MultiPoint needs at least one position"),
    (
        {"type": "MultiPoint", "coordinates": [1, 2]},
        "MultiPoint coordinates are nested 1 levels deep, expected 2: [[lon, lat], ...]",
    ),
    (
        {"type": "MultiPoint", "coordinates": [[1, 2], 3]},
        "MultiPoint position 1 must be an array of 2 or 3 numbers, got a number",
    ),
    (
        {"type": "LineString", "coordinates": [[0, 0]]},
        "LineString needs at least 2 positions, got 1",
    ),
    (
        {"type": "LineString", "coordinates": [[0, 0], [1]]},
        "LineString position 1 must have 2 or 3 numbers, got 1",
    ),
    (
        {"type": "LineString", "coordinates": [[0, 0], [200, 0]]},
        "LineString position 1: longitude 200 is out of range [-180, 180]",
    ),
    ({"type": "MultiLineString", "coordinates": []}, "MultiLineString needs at least one line"),
    (
        {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[0, 0]]]},
        "MultiLineString line 1 needs at least 2 positions, got 1",
    ),
    (
        {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], 7]},
        "MultiLineString line 1 must be an array of positions, got a number",
    ),
    ({"type": "Polygon", "coordinates": []}, "Polygon needs at least one ring"),
    ({"type": "Polygon", "coordinates": [[0, 0], [1, 0], [1, 1], [0, 0]]}, POLYGON_NESTING),
    (
        polygon([[0, 0], [1, 0], [1, 1], [0, 1]]),
        "Polygon ring 0 is not closed: its first and last positions differ",
    ),
    (
        polygon([[0, 0], [1, 0], [1, 1], [0, 0, 5]]),
        "Polygon ring 0 is not closed: its first and last positions differ",
    ),
    (
        polygon(box_ring(0, 0, 10, 10), [[4, 4], [6, 4], [4, 4]]),
        "Polygon ring 1 needs at least 4 positions, got 3",
    ),
    (
        polygon([[0, 0], [1, 0], [0, 0]]),
        "Polygon ring 0 needs at least 4 positions, got 3",
    ),
    (
        {"type": "Polygon", "coordinates": [box_ring(0, 0, 10, 10), [0, 0]]},
        "Polygon ring 1 position 0 must be an array of 2 or 3 numbers, got a number",
    ),
    ({"type": "MultiPolygon", "coordinates": []}, "MultiPolygon needs at least one polygon"),
    (
        {"type": "MultiPolygon", "coordinates": [[]]},
        "MultiPolygon polygon 0 needs at least one ring",
    ),
    (
        {
            "type": "MultiPolygon",
            "coordinates": [[box_ring(0, 0, 1, 1)], [[[0, 0], [1, 0], [1, 91], [0, 0]]]],
        },
        "MultiPolygon polygon 1 ring 0 position 2: latitude 91 is out of range [-90, 90]",
    ),
    (
        {"type": "MultiPolygon", "coordinates": [box_ring(0, 0, 1, 1)]},
        "MultiPolygon coordinates are nested 3 levels deep, expected 4: "
        "[[[[lon, lat], ...], ...], ...] (polygons of rings)",
    ),
]


@pytest.mark.parametrize(("given_", "complaint"), INVALID_GEOMETRIES)
def test_parse_geometry_rejects(given_: object, complaint: str) -> None:
    with pytest.raises(BadRequestData) as err:
        parse_geometry(given_, "location")
    assert err.value.detail == complaint
    assert err.value.field == "location"
    assert err.value.status == 400


# --------------------------------------------------------------------------------------------
# parse_geoquery

SQUARE = [box_ring(0, 0, 1, 1)]

VALID_QUERIES: list[tuple[tuple[Any, ...], GeoQuery | None]] = [
    ((None, None, None, None), None),
    ((None, None, None, "location"), None),
    (
        ("near;maxDistance==1000", "Point", "[8, 40]", None),
        GeoQuery("near", 1000.0, None, point(8, 40), "location"),
    ),
    (
        ("near;minDistance==0.5", "Point", [8, 40], "observationSpace"),
        GeoQuery("near", None, 0.5, point(8, 40), "observationSpace"),
    ),
    (
        ("near;maxDistance==1e3", "Point", "[8,40]", None),
        GeoQuery("near", 1000.0, None, point(8, 40), "location"),
    ),
    (
        ("near;maxDistance==.5", "Point", "[8,40]", None),
        GeoQuery("near", 0.5, None, point(8, 40), "location"),
    ),
    *(
        (
            (rel, "Polygon", json.dumps(SQUARE), "https://example.org/area"),
            GeoQuery(rel, None, None, polygon(*SQUARE), "https://example.org/area"),
        )
        for rel in ("within", "contains", "intersects", "equals", "disjoint", "overlaps")
    ),
    (
        ("intersects", "MultiLineString", "[[[0,0],[1,1]],[[2,2],[3,3]]]", None),
        GeoQuery(
            "intersects",
            None,
            None,
            {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[2, 2], [3, 3]]]},
            "location",
        ),
    ),
]


@pytest.mark.parametrize(("args", "expected"), VALID_QUERIES)
def test_parse_geoquery_accepts(args: tuple[Any, ...], expected: GeoQuery | None) -> None:
    assert parse_geoquery(*args) == expected


MODIFIER = "expected maxDistance==<metres> or minDistance==<metres>"
INVALID_QUERIES: list[tuple[tuple[Any, ...], str, str]] = [
    (
        ("within", None, "[0,0]", None),
        "geometry",
        "a geo-query needs georel, geometry and coordinates; geometry is missing",
    ),
    (
        (None, "Point", "[0,0]", None),
        "georel",
        "a geo-query needs georel, geometry and coordinates; georel is missing",
    ),
    (
        ("within", "Point", None, None),
        "coordinates",
        "a geo-query needs georel, geometry and coordinates; coordinates is missing",
    ),
    (
        (None, None, "[0,0]", "location"),
        "georel",
        "a geo-query needs georel, geometry and coordinates; georel is missing",
    ),
    (
        ("near", "Point", "[0,0]", None),
        "georel",
        "georel near needs maxDistance==<metres> or minDistance==<metres>",
    ),
    (
        ("near;maxDistance==10;minDistance==1", "Point", "[0,0]", None),
        "georel",
        "georel near takes exactly one of maxDistance or minDistance, got "
        "'near;maxDistance==10;minDistance==1'",
    ),
    (
        ("near;maxDistance==0", "Point", "[0,0]", None),
        "georel",
        "maxDistance must be a positive number of metres, got 0",
    ),
    (
        ("near;minDistance==-5", "Point", "[0,0]", None),
        "georel",
        "minDistance must be a positive number of metres, got -5",
    ),
    (
        ("near;maxDistance==1e999", "Point", "[0,0]", None),
        "georel",
        "maxDistance is too large: 1e999",
    ),
    (
        ("near;maxDistance==abc", "Point", "[0,0]", None),
        "georel",
        "maxDistance must be a number of metres, got 'abc'",
    ),
    (
        ("near;maxDistance== 5", "Point", "[0,0]", None),
        "georel",
        "maxDistance must be a number of metres, got ' 5'",
    ),
    (
        ("near;maxDistance==nan", "Point", "[0,0]", None),
        "georel",
        "maxDistance must be a number of metres, got 'nan'",
    ),
    (
        ("near;distance==5", "Point", "[0,0]", None),
        "georel",
        f"unknown near modifier 'distance==5'; {MODIFIER}",
    ),
    (
        ("near;maxDistance=5", "Point", "[0,0]", None),
        "georel",
        f"unknown near modifier 'maxDistance=5'; {MODIFIER}",
    ),
    (
        ("near;", "Point", "[0,0]", None),
        "georel",
        f"unknown near modifier ''; {MODIFIER}",
    ),
    (
        ("within;maxDistance==5", "Point", "[0,0]", None),
        "georel",
        "georel within takes no modifiers, got 'within;maxDistance==5'",
    ),
    (
        ("nearby", "Point", "[0,0]", None),
        "georel",
        "unknown georel 'nearby'; expected near;maxDistance==<metres>, near;minDistance==<metres>, "
        "within, contains, intersects, equals, disjoint or overlaps",
    ),
    (
        ("", "Point", "[0,0]", None),
        "georel",
        "unknown georel ''; expected near;maxDistance==<metres>, near;minDistance==<metres>, "
        "within, contains, intersects, equals, disjoint or overlaps",
    ),
    ((5, "Point", "[0,0]", None), "georel", "georel must be a string, got a number"),
    (
        ("intersects", "GeometryCollection", "[]", None),
        "geometry",
        "GeometryCollection is not supported; use Point, MultiPoint, LineString, "
        "MultiLineString, Polygon or MultiPolygon",
    ),
    (
        ("intersects", "point", "[0,0]", None),
        "geometry",
        "unsupported geometry type 'point'; expected Point, MultiPoint, LineString, "
        "MultiLineString, Polygon or MultiPolygon",
    ),
    (
        ("intersects", "Point", "[8,", None),
        "coordinates",
        "coordinates is a string but not valid JSON",
    ),
    (
        ("intersects", "Point", "[200, 0]", None),
        "coordinates",
        "Point position: longitude 200 is out of range [-180, 180]",
    ),
    (
        ("within", "Polygon", "[[[0,0],[0,1],[1,1]]]", None),
        "coordinates",
        "Polygon ring 0 needs at least 4 positions, got 3",
    ),
    (
        ("within", "Polygon", "[[[0,0],[0,1],[1,1],[1,0]]]", None),
        "coordinates",
        "Polygon ring 0 is not closed: its first and last positions differ",
    ),
    (("within", "Polygon", "[[0,0],[0,1],[1,1],[0,0]]", None), "coordinates", POLYGON_NESTING),
    (
        ("within", "Point", '{"x": 1}', None),
        "coordinates",
        "Point coordinates must be an array [lon, lat], got an object",
    ),
    (
        ("within", "Polygon", 17, None),
        "coordinates",
        "Polygon coordinates must be an array [[[lon, lat], ...], ...] (rings), got a number",
    ),
    (
        ("within", "Point", "[0,0]", ""),
        "geoproperty",
        "geoproperty must be a non-empty attribute name",
    ),
    (
        ("within", "Point", "[0,0]", "my location"),
        "geoproperty",
        "geoproperty 'my location' contains whitespace or control characters",
    ),
]


@pytest.mark.parametrize(("args", "field", "complaint"), INVALID_QUERIES)
def test_parse_geoquery_rejects(args: tuple[Any, ...], field: str, complaint: str) -> None:
    with pytest.raises(BadRequestData) as err:
        parse_geoquery(*args)
    assert (err.value.field, err.value.detail) == (field, complaint)


# --------------------------------------------------------------------------------------------
# bbox and candidate_bbox


@pytest.mark.parametrize(
    ("geometry", "expected"),
    [
        (point(8, 49), (8.0, 49.0, 8.0, 49.0)),
        ({"type": "Point", "coordinates": [8.5, -1, 300]}, (8.5, -1.0, 8.5, -1.0)),
        (HOLED, (0.0, 0.0, 10.0, 10.0)),
        (line((3, -2), (-1, 7), (0, 0)), (-1.0, -2.0, 3.0, 7.0)),
        ({"type": "MultiPoint", "coordinates": [[1, 5], [-3, 2, 9]]}, (-3.0, 2.0, 1.0, 5.0)),
        (
            {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[5, -5], [6, 6]]]},
            (0.0, -5.0, 6.0, 6.0),
        ),
        (
            {
                "type": "MultiPolygon",
                "coordinates": [[box_ring(0, 0, 1, 1)], [box_ring(-4, 2, -3, 3)]],
            },
            (-4.0, 0.0, 1.0, 3.0),
        ),
    ],
)
def test_bbox(geometry: dict[str, Any], expected: tuple[float, ...]) -> None:
    assert bbox(geometry) == expected
    assert all(type(v) is float for v in bbox(geometry))


def test_candidate_bbox_by_georel() -> None:
    square = polygon(box_ring(2, 3, 4, 5))
    for rel in ("within", "contains", "intersects", "equals", "overlaps"):
        assert candidate_bbox(query(rel, square)) == (2.0, 3.0, 4.0, 5.0)
    assert candidate_bbox(query("disjoint", square)) is None
    assert candidate_bbox(query("near;minDistance==10", square)) is None


def test_candidate_bbox_near_grows_by_the_distance() -> None:
    # 1 km around Madrid: ~0.009 degrees of latitude, ~0.0118 of longitude at 40.4 degrees.
    q = query("near;maxDistance==1000", point(-3.7038, 40.4168))
    box = candidate_bbox(q)
    assert box is not None
    minx, miny, maxx, maxy = box
    assert (maxy - miny) / 2 == pytest.approx(1000 / (R * math.pi / 180), rel=1e-6)
    assert (maxx - minx) / 2 == pytest.approx(
        1000 / (R * math.pi / 180 * math.cos(math.radians(40.4168 + 0.009))), rel=1e-4
    )
    assert minx < -3.7038 < maxx


@pytest.mark.parametrize(
    ("centre", "metres", "expected_lon_range"),
    [
        ((179.99, 10.0), 5000.0, (-180.0, 180.0)),  # reaches across the antimeridian
        ((-179.999, -20.0), 1000.0, (-180.0, 180.0)),
        ((30.0, 89.99), 5000.0, (-180.0, 180.0)),  # reaches over the pole
        ((30.0, 60.0), 30_000_000.0, (-180.0, 180.0)),  # half the Earth
    ],
)
def test_candidate_bbox_near_wraps_to_every_longitude(
    centre: tuple[float, float], metres: float, expected_lon_range: tuple[float, float]
) -> None:
    box = candidate_bbox(query(f"near;maxDistance=={metres}", point(*centre)))
    assert box is not None
    assert (box[0], box[2]) == expected_lon_range
    assert -90.0 <= box[1] <= box[3] <= 90.0


# --------------------------------------------------------------------------------------------
# The georels on hand-made cases. HOLED is the square (0,0)-(10,10) with the hole (4,4)-(6,6).

RELATION_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # (georel, query geometry, entity geometry, expected)
    ("within", HOLED, point(2, 2), True),
    ("within", HOLED, point(5, 5), False),  # in the hole
    ("within", HOLED, point(0, 5), False),  # on the outer boundary
    ("within", HOLED, point(4, 5), False),  # on the hole's boundary
    ("within", HOLED, point(20, 20), False),
    ("within", HOLED, line((1, 1), (3, 1)), True),
    ("within", HOLED, line((-5, 2), (15, 2)), False),  # crosses the polygon
    ("within", HOLED, line((1, 5), (9, 5)), False),  # crosses the hole
    ("within", HOLED, polygon(box_ring(1, 1, 3, 3)), True),
    ("within", HOLED, polygon(box_ring(3, 3, 7, 7)), False),  # covers the hole
    ("within", HOLED, HOLED, True),
    ("within", polygon(box_ring(0, 0, 10, 10)), {"type": "Point", "coordinates": [2, 2, 50]}, True),
    ("intersects", HOLED, point(0, 5), True),
    ("intersects", HOLED, point(4, 5), True),
    ("intersects", HOLED, point(5, 5), False),
    ("intersects", HOLED, line((-5, 2), (15, 2)), True),
    ("intersects", HOLED, line((4.5, 5), (5.5, 5)), False),  # inside the hole
    ("intersects", HOLED, polygon(box_ring(10, 0, 12, 2)), True),  # shares an edge
    ("intersects", line((-1, -1), (1, 1)), line((-1, 1), (1, -1)), True),
    ("disjoint", HOLED, point(5, 5), True),
    ("disjoint", HOLED, point(0, 5), False),
    ("disjoint", HOLED, line((4.5, 5), (5.5, 5)), True),
    ("disjoint", HOLED, polygon(box_ring(20, 20, 21, 21)), True),
    ("contains", point(2, 2), HOLED, True),  # the entity (HOLED) contains the query point
    ("contains", point(5, 5), HOLED, False),
    ("contains", point(0, 5), HOLED, False),  # a boundary point is not contained
    ("contains", line((1, 1), (3, 1)), HOLED, True),
    ("contains", line((-5, 2), (15, 2)), HOLED, False),
    ("contains", point(2, 2), point(2, 2), True),
    ("contains", HOLED, point(2, 2), False),
    ("equals", HOLED, HOLED, True),
    (
        "equals",
        polygon(box_ring(0, 0, 10, 10)),
        polygon([[10, 10], [0, 10], [0, 0], [10, 0], [10, 0], [10, 10]]),  # other start, order
        True,
    ),
    ("equals", polygon(box_ring(0, 0, 10, 10)), HOLED, False),
    ("equals", point(1, 2), {"type": "Point", "coordinates": [1.0, 2.0, 7]}, True),
    ("equals", point(1, 2), point(1, 2.000001), False),
    ("equals", line((0, 0), (2, 2)), line((2, 2), (1, 1), (0, 0)), True),
    ("overlaps", HOLED, polygon(box_ring(8, 8, 12, 12)), True),
    ("overlaps", HOLED, polygon(box_ring(1, 1, 3, 3)), True),  # inside: shares interior area
    ("overlaps", polygon(box_ring(1, 1, 3, 3)), HOLED, True),
    ("overlaps", HOLED, polygon(box_ring(10, 0, 12, 2)), False),  # only touches
    ("overlaps", HOLED, polygon(box_ring(4.5, 4.5, 5.5, 5.5)), False),  # in the hole
    ("overlaps", HOLED, line((-5, 2), (15, 2)), True),  # partly inside
    ("overlaps", HOLED, line((1, 1), (3, 1)), False),  # fully inside
    ("overlaps", HOLED, line((0, -1), (0, 11)), False),  # runs along the boundary
    ("overlaps", HOLED, point(2, 2), False),
    ("overlaps", HOLED, point(0, 5), False),
    ("overlaps", HOLED, {"type": "MultiPoint", "coordinates": [[2, 2], [20, 20]]}, True),
    ("overlaps", line((0, 0), (2, 0)), line((1, 0), (3, 0)), True),
    ("overlaps", line((0, 0), (2, 0)), line((0, 0), (1, 0)), False),
    ("overlaps", point(1, 1), point(1, 1), False),
    # A bow-tie query is repaired into its two triangles.
    ("within", polygon([[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]), point(0.2, 1), True),
    ("within", polygon([[0, 0], [2, 2], [2, 0], [0, 2], [0, 0]]), point(1, 1.5), False),
]


@pytest.mark.parametrize(("georel", "q_geom", "geometry", "expected"), RELATION_CASES)
def test_georel(
    georel: str, q_geom: dict[str, Any], geometry: dict[str, Any], expected: bool
) -> None:
    q = query(georel, q_geom)
    assert matches(q, geometry) is expected
    if expected:
        box = candidate_bbox(q)
        assert box is None or boxes_intersect(bbox(geometry), box)


def test_within_and_contains_are_mirror_images() -> None:
    a = polygon(box_ring(1, 1, 3, 3))
    assert matches(query("within", HOLED), a)
    assert matches(query("contains", a), HOLED)
    assert not matches(query("contains", HOLED), a)


# --------------------------------------------------------------------------------------------
# near and distances

MADRID = (-3.7038, 40.4168)
WGS84_A = 6_378_137.0
WGS84_E2 = 0.00669437999014


def wgs84_radii(lat: float) -> tuple[float, float]:
    """Meridian and prime-vertical radii of curvature of the WGS84 ellipsoid at `lat`."""
    w = 1 - WGS84_E2 * math.sin(math.radians(lat)) ** 2
    return WGS84_A * (1 - WGS84_E2) / w**1.5, WGS84_A / math.sqrt(w)


def test_two_points_one_km_apart_in_madrid() -> None:
    meridian, normal = wgs84_radii(MADRID[1])
    north = (MADRID[0], MADRID[1] + math.degrees(1000 / meridian))
    east = (
        MADRID[0] + math.degrees(1000 / (normal * math.cos(math.radians(MADRID[1])))),
        MADRID[1],
    )
    for other in (north, east):
        assert distance_m(point(*MADRID), point(*other)) == pytest.approx(1000, rel=0.005)
        assert matches(query("near;maxDistance==1010", point(*MADRID)), point(*other))
        assert not matches(query("near;maxDistance==990", point(*MADRID)), point(*other))
        assert matches(query("near;minDistance==990", point(*MADRID)), point(*other))
        assert not matches(query("near;minDistance==1010", point(*MADRID)), point(*other))


def test_known_geodesic_flinders_peak_to_buninyong() -> None:
    # Vincenty (1975)'s worked example: 54 972.271 m on the ellipsoid.
    flinders = (144 + 25 / 60 + 29.52440 / 3600, -(37 + 57 / 60 + 3.72030 / 3600))
    buninyong = (143 + 55 / 60 + 35.38390 / 3600, -(37 + 39 / 60 + 10.15610 / 3600))
    assert distance_m(point(*flinders), point(*buninyong)) == pytest.approx(54_972.271, rel=0.005)


def test_point_distance_wraps_the_antimeridian() -> None:
    d = distance_m(point(179.995, 0), point(-179.995, 0))
    assert d == pytest.approx(0.01 * R * math.pi / 180, rel=1e-9)
    assert matches(query("near;maxDistance==1200", point(179.995, 0)), point(-179.995, 0))


def test_distance_to_polygon_edge_line_and_hole() -> None:
    # A 2 km square block around Madrid's centre, with a 1 km square courtyard.
    meridian, normal = wgs84_radii(MADRID[1])
    dlat = math.degrees(1000 / meridian)
    dlon = math.degrees(1000 / (normal * math.cos(math.radians(MADRID[1]))))
    x, y = MADRID
    block = polygon(
        box_ring(x - dlon, y - dlat, x + dlon, y + dlat),
        box_ring(x - dlon / 2, y - dlat / 2, x + dlon / 2, y + dlat / 2),
    )
    # 1 km east of the block's east edge.
    outside = point(x + 2 * dlon, y)
    assert distance_m(block, outside) == pytest.approx(1000, rel=0.005)
    # The courtyard's centre is 500 m from the courtyard's walls: holes are respected.
    assert distance_m(block, point(x, y)) == pytest.approx(500, rel=0.005)
    assert distance_m(block, point(x + 0.75 * dlon, y)) == 0.0
    near_500 = query("near;maxDistance==450", block)
    assert not matches(near_500, point(x, y))
    assert matches(query("near;maxDistance==550", block), point(x, y))
    assert matches(query("near;minDistance==450", block), point(x, y))
    # A north-south street 1 km west of a point; and that street as the entity.
    street = line((x - dlon, y - dlat), (x - dlon, y + dlat))
    assert distance_m(street, point(x, y)) == pytest.approx(1000, rel=0.005)
    assert distance_m(point(x, y), street) == pytest.approx(1000, rel=0.005)
    assert query("near;maxDistance==1000", point(x, y)).distance_to(street) == pytest.approx(
        1000, rel=0.005
    )
    # An entity polygon containing the query point is at distance 0.
    assert distance_m(point(x, y), polygon(box_ring(x - 1, y - 1, x + 1, y + 1))) == 0.0


def test_multipoint_distances_are_exact_haversines() -> None:
    mp = {"type": "MultiPoint", "coordinates": [[0, 0], [0, 1], [0, 2]]}
    assert distance_m(mp, point(0, 1.5)) == pytest.approx(0.5 * R * math.pi / 180, rel=1e-12)
    assert distance_m(point(0, 1.5), mp) == pytest.approx(0.5 * R * math.pi / 180, rel=1e-12)


def nearest_on_segment(
    p: tuple[float, float], a: tuple[float, float], b: tuple[float, float]
) -> float:
    """Minimum haversine from p to the lon/lat-straight segment a-b, by golden-section search."""

    def at(t: float) -> float:
        return distance_m(point(*p), point(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])))

    lo, hi = 0.0, 1.0
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if at(m1) <= at(m2):
            hi = m2
        else:
            lo = m1
    return min(at(0.0), at(1.0), at((lo + hi) / 2))


@settings(max_examples=200, deadline=None)
@given(
    lat=st.floats(-70, 70),
    lon=st.floats(-170, 170),
    size_km=st.floats(0.05, 5),
    bearing=st.floats(0, 360),
    dist_km=st.floats(0.01, 10),
)
def test_distance_to_a_polygon_matches_a_fine_search(
    lat: float, lon: float, size_km: float, bearing: float, dist_km: float
) -> None:
    """distance_m never underestimates, and is within 0.01 % of the true nearest distance."""
    half_lat = math.degrees(size_km * 1000 / R)
    half_lon = half_lat / math.cos(math.radians(lat))
    # A quadrilateral, not a box, so that edges run in every direction.
    ring = [
        (lon - half_lon, lat - half_lat),
        (lon + half_lon, lat - 0.3 * half_lat),
        (lon + 0.5 * half_lon, lat + half_lat),
        (lon - 0.8 * half_lon, lat + 0.6 * half_lat),
    ]
    shape = polygon([list(p) for p in [*ring, ring[0]]])
    p = destination(lon, lat, bearing, (size_km + dist_km) * 1000)
    got = distance_m(shape, point(*p))
    if got == 0.0:
        return  # inside: the exact predicate said so
    truth = min(nearest_on_segment(p, ring[i], ring[(i + 1) % 4]) for i in range(4))
    assert got >= truth * (1 - 1e-9)
    assert got <= truth * (1 + 1e-4)
    # Swapping the roles measures the same distance.
    assert distance_m(point(*p), shape) == pytest.approx(got, rel=1e-4)


# --------------------------------------------------------------------------------------------
# The prefilter never loses a match

lats = st.floats(-89.9, 89.9)
lons = st.floats(-180, 180)


@settings(max_examples=500, deadline=None)
@given(
    lon=lons,
    lat=lats,
    max_km=st.floats(0.001, 2000),
    bearing=st.floats(0, 360),
    ratio=st.floats(0, 1.2),
)
def test_near_point_prefilter_keeps_every_match(
    lon: float, lat: float, max_km: float, bearing: float, ratio: float
) -> None:
    metres = max_km * 1000
    q = query(f"near;maxDistance=={metres!r}", point(lon, lat))
    # Entities at every distance up to 1.2 x maxDistance, many right at the edge.
    entity = point(*destination(lon, lat, bearing, metres * ratio))
    hit = matches(q, entity)
    if ratio < 1 - 1e-6:
        assert hit
    if hit:
        box = candidate_bbox(q)
        assert box is not None
        assert boxes_intersect(bbox(entity), box)


@settings(max_examples=200, deadline=None)
@given(
    lon=st.floats(-179, 179),
    lat=st.floats(-80, 80),
    size_m=st.floats(10, 5000),
    max_m=st.floats(1, 5000),
    bearing=st.floats(0, 360),
    ratio=st.floats(0, 1.5),
    entity_kind=st.sampled_from(["Point", "LineString", "Polygon"]),
)
def test_near_polygon_prefilter_keeps_every_match(
    lon: float,
    lat: float,
    size_m: float,
    max_m: float,
    bearing: float,
    ratio: float,
    entity_kind: str,
) -> None:
    half = math.degrees(size_m / R)
    area = polygon(box_ring(lon - half, lat - half, lon + half, lat + half))
    q = query(f"near;maxDistance=={max_m!r}", area)
    ex, ey = destination(lon, lat, bearing, (size_m + max_m) * ratio)
    small = math.degrees(20 / R)
    entity: dict[str, Any]
    if entity_kind == "Point":
        entity = point(ex, ey)
    elif entity_kind == "LineString":
        entity = line((ex, ey), (max(-180, ex - small), min(90, ey + small)))
    else:
        e0, e1 = max(-180, ex - small), min(180, ex + small)
        entity = polygon(box_ring(e0, max(-90, ey - small), e1, min(90, ey + small)))
    if matches(q, entity):
        box = candidate_bbox(q)
        assert box is not None
        assert boxes_intersect(bbox(entity), box)


# Boxes on a coarse grid, so that equal, touching, nested and crossing shapes all come up.
grid = st.integers(0, 8)


@st.composite
def grid_geometries(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Point", "LineString", "Box", "Triangle", "HoledBox"]))
    x0, y0, x1, y1 = draw(grid), draw(grid), draw(grid), draw(grid)
    if kind == "Point":
        return point(x0, y0)
    if kind == "LineString":
        assume((x0, y0) != (x1, y1))
        return line((x0, y0), (x1, y1))
    lo_x, hi_x, lo_y, hi_y = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    assume(lo_x < hi_x and lo_y < hi_y)
    if kind == "Triangle":
        return polygon([[lo_x, lo_y], [hi_x, lo_y], [lo_x, hi_y], [lo_x, lo_y]])
    if kind == "HoledBox":
        assume(hi_x - lo_x >= 2 and hi_y - lo_y >= 2)
        return polygon(
            box_ring(lo_x, lo_y, hi_x, hi_y),
            box_ring(lo_x + 0.5, lo_y + 0.5, hi_x - 0.5, hi_y - 0.5),
        )
    return polygon(box_ring(lo_x, lo_y, hi_x, hi_y))


@settings(max_examples=400, deadline=None)
@given(
    georel=st.sampled_from(["within", "contains", "intersects", "equals", "overlaps"]),
    q_geom=grid_geometries(),
    entity=grid_geometries(),
)
def test_relation_prefilter_keeps_every_match(
    georel: str, q_geom: dict[str, Any], entity: dict[str, Any]
) -> None:
    q = query(georel, q_geom)
    if matches(q, entity):
        box = candidate_bbox(q)
        assert box is not None
        assert boxes_intersect(bbox(entity), box)


@settings(max_examples=300, deadline=None)
@given(q_geom=grid_geometries(), entity=grid_geometries())
def test_relations_agree_with_each_other(q_geom: dict[str, Any], entity: dict[str, Any]) -> None:
    def rel(georel: str, a: dict[str, Any], b: dict[str, Any]) -> bool:
        return matches(query(georel, a), b)

    intersects = rel("intersects", q_geom, entity)
    assert rel("disjoint", q_geom, entity) is not intersects
    assert rel("intersects", entity, q_geom) is intersects
    assert rel("within", q_geom, entity) is rel("contains", entity, q_geom)
    assert rel("overlaps", q_geom, entity) is rel("overlaps", entity, q_geom)
    assert rel("equals", q_geom, entity) is (
        rel("within", q_geom, entity) and rel("contains", q_geom, entity)
    )
    for georel in ("within", "contains", "equals", "overlaps"):
        if rel(georel, q_geom, entity):
            assert intersects
    # near;maxDistance agrees with intersects at distance zero.
    assert (distance_m(q_geom, entity) == 0.0) is intersects


# --------------------------------------------------------------------------------------------
# Sharing a query


def test_one_query_shared_by_threads() -> None:
    q = query("within", HOLED)
    near = query("near;maxDistance==100000", HOLED)
    entities = [point(x / 4, y / 4) for x in range(-4, 45) for y in range(-4, 45)]
    entities += [
        polygon(box_ring(x, y, x + 1, y + 1)) for x in range(-1, 11) for y in range(-1, 11)
    ]
    expected = [(matches(query("within", HOLED), e), matches(near, e)) for e in entities]
    results: list[list[tuple[bool, bool]]] = []

    def work() -> None:
        results.append([(matches(q, e), matches(near, e)) for e in entities])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 8


def test_geoquery_compares_by_value() -> None:
    a = query("within", HOLED)
    matches(a, point(1, 1))  # compiles the shape; must not affect equality or repr
    assert a == query("within", HOLED)
    assert "shape" not in repr(a)


def test_doctests() -> None:
    result = doctest.testmod(geo)
    assert result.attempted > 0
    assert result.failed == 0
