"""GeoJSON geometries and NGSI-LD geo-queries: validation, bounding boxes and exact matching.

The storage layer keeps one bounding box per GeoProperty instance (`bbox`) and asks
`candidate_bbox` which boxes can possibly match a geo-query; `matches` then decides exactly.

Model, stated once because every function relies on it:

* Positions are (longitude, latitude) in degrees. Edges are straight lines in that plane, as in
  GeoJSON and in the R-tree, so `within`/`contains`/`intersects`/... are planar predicates in
  lon/lat (shapely/GEOS). An altitude, when given, is kept in the stored value and ignored here.
  Geometries that cross the antimeridian are not split (RFC 7946 asks producers to split them);
  only point-to-point distances wrap around it.
* Distances are great-circle distances on a sphere of the mean Earth radius (6 371 008.8 m). The
  sphere differs from the WGS84 ellipsoid by at most about 0.5 %, less at city scale.
* Polygons that are not valid (a self-intersecting ring, a hole outside its shell, a collapsed
  ring) are accepted on input, as the specification only asks for closed rings and sane
  positions, and repaired with `shapely.make_valid` before any predicate, so they mean the area
  they visibly enclose instead of whatever GEOS makes of an invalid polygon.
"""

from __future__ import annotations

import json
import math
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Final

import numpy as np
import shapely

from cityward.bank.errors import BadRequestData

__all__ = [
    "GEOMETRY_TYPES",
    "GEORELS",
    "GeoQuery",
    "bbox",
    "boxes_intersect",
    "candidate_bbox",
    "distance_m",
    "feature_geometry",
    "matches",
    "parse_geometry",
    "parse_geoquery",
]

Box = tuple[float, float, float, float]

# How many array levels sit above a single position, per geometry type.
_DEPTH: Final[dict[str, int]] = {
    "Point": 0,
    "MultiPoint": 1,
    "LineString": 1,
    "MultiLineString": 2,
    "Polygon": 2,
    "MultiPolygon": 3,
}
GEOMETRY_TYPES: Final = tuple(_DEPTH)
_SHAPES: Final[dict[str, str]] = {
    "Point": "[lon, lat]",
    "MultiPoint": "[[lon, lat], ...]",
    "LineString": "[[lon, lat], ...]",
    "MultiLineString": "[[[lon, lat], ...], ...]",
    "Polygon": "[[[lon, lat], ...], ...] (rings)",
    "MultiPolygon": "[[[[lon, lat], ...], ...], ...] (polygons of rings)",
}
GEORELS: Final = ("near", "within", "contains", "intersects", "equals", "disjoint", "overlaps")

EARTH_RADIUS_M: Final = 6_371_008.8
# Metres per degree of latitude on that same sphere. Deriving it from the radius used by the
# haversine (not the customary 111 320 m, which is the equatorial WGS84 value) keeps the box
# prefilter exactly consistent with the distance it prefilters for.
_M_PER_DEG: Final = EARTH_RADIUS_M * math.pi / 180.0
# Widening applied to every prefilter box so that float rounding can never drop a true match.
_BOX_REL_SLACK: Final = 1e-9
_BOX_ABS_SLACK_DEG: Final = 1e-9
# Altitudes beyond this are rejected: they mean nothing and a huge JSON integer would not
# survive storage (orjson refuses integers above 64 bits).
_MAX_ABS_NUMBER: Final = 2**53
# Distances to non-point geometries are measured in local planes whose reference latitudes are
# snapped to bands this wide (about 2.2 km), so one projection of the query serves a band.
_PLANE_BAND_DEG: Final = 0.02
_MAX_PLANES: Final = 256
# Above this many point pairs, MultiPoint distances go through the planar search instead of
# an exact all-pairs haversine.
_MAX_BRUTE_PAIRS: Final = 4096

_NUMBER_RE: Final = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_BAD_TERM_RE: Final = re.compile(r"[\s\x00-\x1f\x7f]")

_GEOREL_HELP: Final = (
    "expected near;maxDistance==<metres>, near;minDistance==<metres>, within, contains, "
    "intersects, equals, disjoint or overlaps"
)


# --------------------------------------------------------------------------------------------
# Validation


def _kind(v: object) -> str:
    """Name a JSON value's kind for an error message."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _geometry_type(gtype: object, field: str) -> str:
    if gtype is None:
        raise BadRequestData("geometry has no 'type'", field=field)
    if not isinstance(gtype, str):
        raise BadRequestData(f"geometry type must be a string, got {_kind(gtype)}", field=field)
    if gtype == "GeometryCollection":
        raise BadRequestData(
            "GeometryCollection is not supported; use Point, MultiPoint, LineString, "
            "MultiLineString, Polygon or MultiPolygon",
            field=field,
        )
    if gtype not in _DEPTH:
        raise BadRequestData(
            f"unsupported geometry type {gtype!r}; expected Point, MultiPoint, LineString, "
            "MultiLineString, Polygon or MultiPolygon",
            field=field,
        )
    return gtype


def _nesting(coords: object) -> int | None:
    """Array levels down the first elements to a number; None when that path ends elsewhere."""
    levels = 0
    while isinstance(coords, list | tuple):
        if not coords:
            return None
        levels += 1
        coords = coords[0]
    return levels if _is_number(coords) else None


def _array(v: object, where: str, what: str, field: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(v, list | tuple):
        raise BadRequestData(f"{where} must be {what}, got {_kind(v)}", field=field)
    return v


def _position(v: object, where: str, field: str) -> list[int | float]:
    pos = _array(v, where, "an array of 2 or 3 numbers", field)
    if len(pos) not in (2, 3):
        raise BadRequestData(f"{where} must have 2 or 3 numbers, got {len(pos)}", field=field)
    for n in pos:
        if not _is_number(n):
            raise BadRequestData(f"{where} must hold numbers, got {_kind(n)}", field=field)
        if isinstance(n, float) and not math.isfinite(n):
            raise BadRequestData(f"{where} holds a non-finite number ({n})", field=field)
    lon, lat = pos[0], pos[1]
    if not -180 <= lon <= 180:
        raise BadRequestData(f"{where}: longitude {lon} is out of range [-180, 180]", field=field)
    if not -90 <= lat <= 90:
        raise BadRequestData(f"{where}: latitude {lat} is out of range [-90, 90]", field=field)
    if len(pos) == 3 and abs(pos[2]) > _MAX_ABS_NUMBER:
        raise BadRequestData(f"{where}: altitude {pos[2]} is too large", field=field)
    return list(pos)


def _positions(v: object, where: str, field: str) -> list[list[int | float]]:
    arr = _array(v, where, "an array of positions", field)
    return [_position(p, f"{where} position {i}", field) for i, p in enumerate(arr)]


def _line(v: object, where: str, field: str) -> list[list[int | float]]:
    pts = _positions(v, where, field)
    if len(pts) < 2:
        raise BadRequestData(f"{where} needs at least 2 positions, got {len(pts)}", field=field)
    return pts


def _polygon(v: object, where: str, field: str) -> list[list[list[int | float]]]:
    rings = _array(v, where, "an array of rings", field)
    if not rings:
        raise BadRequestData(f"{where} needs at least one ring", field=field)
    out = []
    for r, raw in enumerate(rings):
        ring_where = f"{where} ring {r}"
        ring = _positions(raw, ring_where, field)
        if len(ring) < 4:
            raise BadRequestData(
                f"{ring_where} needs at least 4 positions, got {len(ring)}", field=field
            )
        if ring[0] != ring[-1]:
            raise BadRequestData(
                f"{ring_where} is not closed: its first and last positions differ", field=field
            )
        out.append(ring)
    return out


def _coordinates(gtype: str, coords: object, field: str) -> list[Any]:
    """Validate `coords` for a geometry of type `gtype` and return a clean copy."""
    if not isinstance(coords, list | tuple):
        raise BadRequestData(
            f"{gtype} coordinates must be an array {_SHAPES[gtype]}, got {_kind(coords)}",
            field=field,
        )
    # The commonest mistake is one array level too many or too few; say so plainly instead of
    # complaining about whichever element happens to break first.
    levels = _nesting(coords)
    expected = _DEPTH[gtype] + 1
    if levels is not None and levels != expected:
        raise BadRequestData(
            f"{gtype} coordinates are nested {levels} levels deep, expected {expected}: "
            f"{_SHAPES[gtype]}",
            field=field,
        )
    if gtype == "Point":
        return _position(coords, "Point position", field)
    if gtype == "MultiPoint":
        pts = _positions(coords, "MultiPoint", field)
        if not pts:
            raise BadRequestData("MultiPoint needs at least one position", field=field)
        return pts
    if gtype == "LineString":
        return _line(coords, "LineString", field)
    if gtype == "MultiLineString":
        if not coords:
            raise BadRequestData("MultiLineString needs at least one line", field=field)
        return [_line(c, f"MultiLineString line {i}", field) for i, c in enumerate(coords)]
    if gtype == "Polygon":
        return _polygon(coords, "Polygon", field)
    if not coords:
        raise BadRequestData("MultiPolygon needs at least one polygon", field=field)
    return [_polygon(c, f"MultiPolygon polygon {i}", field) for i, c in enumerate(coords)]


def _loads(text: str, what: str, field: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise BadRequestData(f"{what} is a string but not valid JSON", field=field) from None


def feature_geometry(instances: object) -> Any:
    """A GeoJSON Feature's ``geometry`` from the stored instances of the attribute that
    ``geometryProperty`` names: the first GeoProperty's value, else None (a number or a
    Relationship named there was put into ``geometry`` verbatim)."""
    if not isinstance(instances, list):
        return None
    return next(
        (i["value"] for i in instances if isinstance(i, dict) and i.get("type") == "GeoProperty"),
        None,
    )


def parse_geometry(obj: object, field: str) -> dict[str, Any]:
    """Validate a GeoJSON geometry (or its JSON text) and return a clean `{type, coordinates}`.

    Members other than `type` and `coordinates` (a GeoJSON `bbox`, foreign members) are dropped.

    >>> parse_geometry('{"type": "Point", "coordinates": [8, 49.5]}', "location")
    {'type': 'Point', 'coordinates': [8, 49.5]}
    >>> parse_geometry({"type": "LineString", "coordinates": [[0, 0]]}, "route")
    Traceback (most recent call last):
    ...
    cityward.bank.errors.BadRequestData: LineString needs at least 2 positions, got 1
    """
    if isinstance(obj, str):
        obj = _loads(obj, "geometry", field)
    if not isinstance(obj, dict):
        raise BadRequestData(f"a geometry must be a JSON object, got {_kind(obj)}", field=field)
    gtype = _geometry_type(obj.get("type"), field)
    if "coordinates" not in obj:
        raise BadRequestData(f"{gtype} has no 'coordinates'", field=field)
    return {"type": gtype, "coordinates": _coordinates(gtype, obj["coordinates"], field)}


# --------------------------------------------------------------------------------------------
# Bounding boxes


def bbox(geom: dict[str, Any]) -> Box:
    """(minx, miny, maxx, maxy) of a geometry returned by `parse_geometry`.

    >>> bbox({"type": "Point", "coordinates": [8, 49.5]})
    (8.0, 49.5, 8.0, 49.5)
    """
    coords = geom["coordinates"]
    gtype = geom["type"]
    if gtype == "Point":
        x = float(coords[0])
        y = float(coords[1])
        return (x, y, x, y)
    # Every position counts, holes included: a hole of a repaired invalid polygon may stick out.
    pts = coords
    for _ in range(_DEPTH[gtype] - 1):
        pts = [p for part in pts for p in part]
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))


def _grow(box: Box, metres: float) -> Box:
    """The box holding every point within `metres` (great-circle) of some point of `box`."""
    minx, miny, maxx, maxy = box
    # Latitude: a great-circle distance d never changes latitude by more than d / R.
    dlat = math.degrees(metres / EARTH_RADIUS_M) * (1 + _BOX_REL_SLACK) + _BOX_ABS_SLACK_DEG
    south = miny - dlat
    north = maxy + dlat
    # Longitude: haversine gives hav(d/R) >= cos(lat1) cos(lat2) hav(dlon), and both latitudes
    # lie within [south, north], so sin(dlon / 2) <= sin(d / 2R) / cos(lat_far) with lat_far
    # the latitude of that band farthest from the equator. This is slightly wider than the
    # first-order d / (R cos(lat)), which would miss points by a few ppm on the far side.
    lat_far = max(abs(south), abs(north))
    full = (-180.0, max(-90.0, south), 180.0, min(90.0, north))
    if lat_far >= 90.0:
        return full  # the band reaches a pole: every longitude is within reach
    s = math.sin(metres / (2 * EARTH_RADIUS_M)) / math.cos(math.radians(lat_far))
    if s >= 1.0:
        return full
    dlon = math.degrees(2 * math.asin(s)) * (1 + _BOX_REL_SLACK) + _BOX_ABS_SLACK_DEG
    west = minx - dlon
    east = maxx + dlon
    if west <= -180.0 or east >= 180.0:
        # The reach wraps across the antimeridian; one box cannot say "both ends", so widen
        # to every longitude rather than lose the matches on the other side.
        return full
    return (west, max(-90.0, south), east, min(90.0, north))


def boxes_intersect(a: Box, b: Box) -> bool:
    """Whether two (minx, miny, maxx, maxy) boxes share a point (edges included)."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


# --------------------------------------------------------------------------------------------
# Geo-queries


@dataclass(frozen=True)
class GeoQuery:
    """A parsed NGSI-LD geo-query; `georel` is the bare relation ("near", "within", ...).

    Matching needs the query geometry as a shapely object; it is built once, on first use, and
    kept on the instance (frozen dataclasses allow `cached_property`, which bypasses
    `__setattr__`), since one query is matched against many entities.
    """

    georel: str
    max_distance: float | None
    min_distance: float | None
    geometry: dict[str, Any]
    geoproperty: str = "location"

    @cached_property
    def _shape(self) -> _QueryShape:
        return _QueryShape(self.geometry)

    def distance_to(self, geom: dict[str, Any]) -> float:
        """`distance_m(self.geometry, geom)`, reusing this query's prepared geometry."""
        return self._shape.distance(geom)


def _parse_georel(text: object) -> tuple[str, float | None, float | None]:
    if not isinstance(text, str):
        raise BadRequestData(f"georel must be a string, got {_kind(text)}", field="georel")
    rel, *mods = text.split(";")
    if rel not in GEORELS:
        raise BadRequestData(f"unknown georel {text!r}; {_GEOREL_HELP}", field="georel")
    if rel != "near":
        if mods:
            raise BadRequestData(f"georel {rel} takes no modifiers, got {text!r}", field="georel")
        return rel, None, None
    if not mods:
        raise BadRequestData(
            "georel near needs maxDistance==<metres> or minDistance==<metres>", field="georel"
        )
    if len(mods) > 1:
        raise BadRequestData(
            f"georel near takes exactly one of maxDistance or minDistance, got {text!r}",
            field="georel",
        )
    name, sep, num = mods[0].partition("==")
    if not sep or name not in ("maxDistance", "minDistance"):
        raise BadRequestData(
            f"unknown near modifier {mods[0]!r}; expected maxDistance==<metres> or "
            "minDistance==<metres>",
            field="georel",
        )
    if not _NUMBER_RE.fullmatch(num):
        raise BadRequestData(f"{name} must be a number of metres, got {num!r}", field="georel")
    value = float(num)
    if not math.isfinite(value):
        raise BadRequestData(f"{name} is too large: {num}", field="georel")
    if value <= 0:
        raise BadRequestData(
            f"{name} must be a positive number of metres, got {num}", field="georel"
        )
    return ("near", value, None) if name == "maxDistance" else ("near", None, value)


def parse_geoquery(
    georel: str | None,
    geometry: str | None,
    coordinates: str | list[Any] | None,
    geoproperty: str | None,
) -> GeoQuery | None:
    """Parse the geo-query parameters of a query or subscription; None when there is none.

    `coordinates` is JSON text (already URL-decoded) or, from a POST body, the array itself.
    A `geoproperty` without georel, geometry and coordinates is not a geo-query: None as well.

    >>> parse_geoquery("near;maxDistance==500", "Point", "[8, 49]", None)
    GeoQuery(georel='near', max_distance=500.0, min_distance=None, \
geometry={'type': 'Point', 'coordinates': [8, 49]}, geoproperty='location')
    """
    if georel is None and geometry is None and coordinates is None:
        return None
    for name, value in (("georel", georel), ("geometry", geometry), ("coordinates", coordinates)):
        if value is None:
            raise BadRequestData(
                f"a geo-query needs georel, geometry and coordinates; {name} is missing",
                field=name,
            )
    rel, max_d, min_d = _parse_georel(georel)
    gtype = _geometry_type(geometry, "geometry")
    coords: object = coordinates
    if isinstance(coords, str):
        coords = _loads(coords, "coordinates", "coordinates")
    clean = {"type": gtype, "coordinates": _coordinates(gtype, coords, "coordinates")}
    if geoproperty is None:
        prop = "location"
    elif not isinstance(geoproperty, str) or not geoproperty:
        raise BadRequestData("geoproperty must be a non-empty attribute name", field="geoproperty")
    elif _BAD_TERM_RE.search(geoproperty):
        raise BadRequestData(
            f"geoproperty {geoproperty!r} contains whitespace or control characters",
            field="geoproperty",
        )
    else:
        prop = geoproperty
    return GeoQuery(rel, max_d, min_d, clean, prop)


def candidate_bbox(q: GeoQuery) -> Box | None:
    """The box an entity geometry's bbox must intersect to possibly match; None: no prefilter.

    For within/contains/intersects/equals/overlaps a match shares at least one point with the
    query geometry, so its box meets the query's box. For near;maxDistance some point of the
    entity lies within that distance of the query geometry (`_grow`). disjoint and
    near;minDistance match far-away entities, which no box can bound.
    """
    if q.georel == "disjoint":
        return None
    if q.georel == "near":
        return None if q.max_distance is None else _grow(q._shape.box, q.max_distance)
    return q._shape.box


def matches(q: GeoQuery, geom: dict[str, Any]) -> bool:
    """Whether an entity's geometry `geom` satisfies the geo-query `q`.

    The relations read "entity <georel> query geometry", with DE-9IM semantics in lon/lat:

    * within: the entity lies in the query geometry and shares an interior point with it, so a
      point on a polygon's boundary (or in a hole) is not within it;
    * contains: the entity contains the query geometry;
    * intersects / disjoint: they share at least one point (boundaries included) / none;
    * equals: topologically equal (same point set; vertex order and repeated vertices do not
      matter, altitude is ignored);
    * overlaps: DE-9IM `overlaps` is false for anything of different dimensions and for a
      region inside another, which makes "parks overlapping this district" miss the parks that
      lie inside it. NGSI-LD gives no finer definition, so here two regions overlap when they
      share interior area (containment included, touching edges not); when a point or a line
      is involved they overlap when their interiors meet and neither covers the other (a road
      partly inside a district overlaps it, one fully inside does not, and a lone point never
      overlaps anything: it is either within, on the boundary, or outside);
    * near: `distance_m` <= maxDistance, or >= minDistance.
    """
    rel = q.georel
    shape = q._shape
    if rel == "near":
        d = shape.distance(geom)
        if q.max_distance is not None:
            return d <= q.max_distance
        return q.min_distance is not None and d >= q.min_distance
    return shape.relate(rel, geom)


def distance_m(q_geom: dict[str, Any], geom: dict[str, Any]) -> float:
    """Great-circle distance in metres from `geom` to the nearest point of `q_geom`.

    0 when they intersect. Between points (Point, MultiPoint) it is the exact haversine.
    Otherwise the nearest pair of points is searched in a local plane in metres (equirectangular,
    its x-scale right at a latitude within 0.02 degrees of the pair's middle) and the haversine
    distance of that pair is returned. The pair really lies on both geometries, so the result
    never underestimates; the plane only chooses the pair. With its scale off by at most
    eps = tan(lat) * (3.5e-4 + d / 2R) over the pair (d the distance, R the Earth radius), the
    chosen pair is at worst (1 + 2 eps) times the true minimum: 0.15 % for 1 km and 0.4 % for
    10 km at 60 degrees of latitude, half that at 40 degrees. In practice it is far less, as a
    misjudged direction changes a nearest distance only to second order: against a fine
    search, polygons and distances up to 10 km stay within 2e-6 at latitudes up to 70 degrees.
    The sphere itself is up to 0.5 % off the WGS84 ellipsoid.

    >>> round(distance_m({"type": "Point", "coordinates": [0, 0]},
    ...                  {"type": "Point", "coordinates": [0, 1]}))
    111195
    """
    if q_geom["type"] == "Point" and geom["type"] == "Point":
        a = q_geom["coordinates"]
        b = geom["coordinates"]
        return _haversine(float(a[0]), float(a[1]), float(b[0]), float(b[1]))
    return _QueryShape(q_geom).distance(geom)


# --------------------------------------------------------------------------------------------
# Geometry machinery


def _haversine(lon1: float, lat1: float, lon2: float, lat2: float) -> float:
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    h = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


def _xy(positions: list[Any]) -> list[tuple[float, float]]:
    # shapely refuses a ring mixing 2- and 3-number positions; the predicates are 2-D anyway.
    return [(p[0], p[1]) for p in positions]


def _to_shapely(geom: dict[str, Any]) -> Any:
    """A valid 2-D shapely geometry for a geometry returned by `parse_geometry`."""
    gtype = geom["type"]
    c = geom["coordinates"]
    if gtype == "Point":
        return shapely.Point(c[0], c[1])
    if gtype == "MultiPoint":
        return shapely.MultiPoint(_xy(c))  # points are always valid
    if gtype == "LineString":
        g = shapely.LineString(_xy(c))
    elif gtype == "MultiLineString":
        g = shapely.MultiLineString([_xy(line) for line in c])
    elif gtype == "Polygon":
        g = shapely.Polygon(_xy(c[0]), [_xy(r) for r in c[1:]])
    else:
        g = shapely.MultiPolygon([shapely.Polygon(_xy(p[0]), [_xy(r) for r in p[1:]]) for p in c])
    return _valid(g)


def _valid(g: Any) -> Any:
    if shapely.is_valid(g):
        return g
    fixed = shapely.make_valid(g)
    if fixed.geom_type == "GeometryCollection":
        # make_valid leaves the collapsed bits of a region (a dangling line, a lone point) next
        # to its areas. Keep the highest dimension only: a region is meant, and relate() on
        # collections is unsupported before GEOS 3.13.
        parts = shapely.get_parts(fixed)
        dims = shapely.get_dimensions(parts)
        fixed = shapely.union_all(parts[dims == dims.max()])
    return fixed


class _Plane:
    """An equirectangular plane in metres around (lon0, lat0): affine in lon/lat.

    Being affine, it keeps every lon/lat edge straight, so intersection and containment mean
    the same in the plane as in the predicates, and points found in it map back exactly onto
    the lon/lat geometries.
    """

    __slots__ = ("kx", "lat0", "lon0")

    def __init__(self, lon0: float, lat0: float) -> None:
        self.lon0 = lon0
        self.lat0 = lat0
        # Kept away from 0 so that a plane at a pole still projects to something.
        self.kx = _M_PER_DEG * max(math.cos(math.radians(lat0)), 1e-6)

    def project(self, g: Any) -> Any:
        """Project a shapely geometry, or a bare (lon, lat) (cheaper than a shapely Point)."""
        if isinstance(g, tuple):
            return shapely.Point((g[0] - self.lon0) * self.kx, (g[1] - self.lat0) * _M_PER_DEG)
        offset = np.array([self.lon0, self.lat0])
        scale = np.array([self.kx, _M_PER_DEG])
        return shapely.transform(g, lambda xy: (xy - offset) * scale)

    def nearest_pair(self, qp: Any, ep: Any) -> tuple[float, float]:
        """Haversine length and mid latitude of the planar shortest line from `qp` to `ep`."""
        (x1, y1), (x2, y2) = shapely.get_coordinates(shapely.shortest_line(qp, ep)).tolist()
        lat1 = y1 / _M_PER_DEG + self.lat0
        lat2 = y2 / _M_PER_DEG + self.lat0
        d = _haversine(x1 / self.kx + self.lon0, lat1, x2 / self.kx + self.lon0, lat2)
        return d, (lat1 + lat2) / 2


class _QueryShape:
    """A query geometry compiled for matching many entity geometries against it."""

    def __init__(self, geom: dict[str, Any]) -> None:
        gtype = geom["type"]
        c = geom["coordinates"]
        self.point: tuple[float, float] | None = (
            (float(c[0]), float(c[1])) if gtype == "Point" else None
        )
        self.points: list[tuple[float, float]] | None = (
            [(float(p[0]), float(p[1])) for p in c] if gtype == "MultiPoint" else None
        )
        self.box = bbox(geom)
        self.shape = _to_shapely(geom)
        shapely.prepare(self.shape)
        # GEOS builds a prepared geometry's indexes lazily and without locking, and shapely
        # releases the GIL inside predicates: a query shared by threads (a subscription) must
        # not run two predicates on it at once.
        self._lock = threading.Lock()
        # Projections of the query geometry, one per latitude band (see _plane).
        self._planes: dict[int, tuple[_Plane, Any]] = {}

    def _plane(self, lat: float) -> tuple[_Plane, Any]:
        """A plane whose reference latitude is within half a band of `lat`, and the query in it.

        Snapping to bands lets one projection of the query serve every entity in the band,
        where a plane per entity would re-project the query geometry for each of them.
        """
        key = round(lat / _PLANE_BAND_DEG)
        hit = self._planes.get(key)
        if hit is None:
            if len(self._planes) >= _MAX_PLANES:
                self._planes.clear()
            lon0 = (self.box[0] + self.box[2]) / 2
            plane = _Plane(lon0, min(90.0, max(-90.0, key * _PLANE_BAND_DEG)))
            hit = self._planes[key] = (plane, plane.project(self.shape))
        return hit

    def relate(self, rel: str, geom: dict[str, Any]) -> bool:
        if geom["type"] == "Point" and rel in ("within", "intersects", "disjoint"):
            # The hot case (point entities, area queries) without building a shapely Point.
            x, y = geom["coordinates"][0], geom["coordinates"][1]
            with self._lock:
                if rel == "within":
                    return bool(shapely.contains_xy(self.shape, x, y))
                hit = bool(shapely.intersects_xy(self.shape, x, y))
            return hit if rel == "intersects" else not hit
        e = _to_shapely(geom)
        q = self.shape
        with self._lock:
            if rel == "within":
                return bool(shapely.contains(q, e))
            if rel == "contains":
                return bool(shapely.within(q, e))
            if rel == "intersects":
                return bool(shapely.intersects(q, e))
            if rel == "disjoint":
                return bool(shapely.disjoint(q, e))
            if rel == "equals":
                return bool(shapely.equals(q, e))
            if rel == "overlaps":
                return _overlaps(q, e)
        raise ValueError(f"not a georel: {rel!r}")

    def distance(self, geom: dict[str, Any]) -> float:
        gtype = geom["type"]
        c = geom["coordinates"]
        e: Any
        if gtype == "Point":
            x, y = float(c[0]), float(c[1])
            if self.point is not None:
                return _haversine(self.point[0], self.point[1], x, y)
            if self.points is not None and len(self.points) <= _MAX_BRUTE_PAIRS:
                return min(_haversine(px, py, x, y) for px, py in self.points)
            with self._lock:
                if shapely.intersects_xy(self.shape, x, y):
                    return 0.0
            e, lat = (x, y), y
        else:
            mine = self.points or ([self.point] if self.point is not None else [])
            if gtype == "MultiPoint" and mine and len(mine) * len(c) <= _MAX_BRUTE_PAIRS:
                return min(
                    _haversine(px, py, float(p[0]), float(p[1])) for px, py in mine for p in c
                )
            e = _to_shapely(geom)
            if e.is_empty:
                return math.inf
            with self._lock:
                if shapely.intersects(self.shape, e):
                    return 0.0
            _, south, _, north = bbox(geom)
            lat = (south + north) / 2
        if self.shape.is_empty:
            return math.inf
        # Guess the latitude of the nearest pair: between the entity and the part of the
        # query's latitude span closest to it.
        guess = (lat + min(max(lat, self.box[1]), self.box[3])) / 2
        plane, qp = self._plane(guess)
        d, mid = plane.nearest_pair(qp, plane.project(e))
        if abs(mid - plane.lat0) > _PLANE_BAND_DEG:
            # A poor guess (a large entity or query): the plane's x-scale is right only near
            # its reference latitude, so search again around the pair found. Both answers are
            # real pairs, so the shorter one is the better.
            plane, qp = self._plane(mid)
            d = min(d, plane.nearest_pair(qp, plane.project(e))[0])
        return d


def _overlaps(q: Any, e: Any) -> bool:
    """NGSI-LD overlaps as documented on `matches` (symmetric in q and e)."""
    if shapely.get_dimensions(q) == 2 and shapely.get_dimensions(e) == 2:
        return bool(shapely.relate_pattern(e, q, "2********"))
    return (
        bool(shapely.relate_pattern(e, q, "T********"))
        and not shapely.covers(e, q)
        and not shapely.covers(q, e)
    )
