"""Query parameters of the NGSI-LD entity API: representation options, projection, filters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from cityward.bank import geo
from cityward.bank.errors import BadRequestData, TooManyResults, pattern_refused
from cityward.bank.jsonld import Context
from cityward.bank.model import SYSTEM_MEMBERS, check_attr_name, check_type_name, is_uri
from cityward.bank.query import (
    And,
    Match,
    Or,
    QExpr,
    TypeAnd,
    TypeName,
    parse_q,
    parse_scope_q,
    parse_type_expr,
)
from cityward.bank.query.sqlgen import (
    Conjunct,
    attrs_conjunct,
    q_conjuncts,
    regex_condition,
    scope_conjuncts,
    type_conjuncts,
)
from cityward.bank.render import Format, View
from cityward.bank.store import QuerySpec, Store
from cityward.bank.store.base import Dialect

KNOWN_OPTIONS = frozenset(
    {
        "keyValues",
        "simplified",
        "concise",
        "normalized",
        "sysAttrs",
        "noOverwrite",
        "replace",
        "update",
        "temporalValues",
        "aggregatedValues",
    }
)
FORMATS: dict[str, Format] = {
    "keyValues": "keyValues",
    "simplified": "keyValues",
    "concise": "concise",
    "normalized": "normalized",
}
_ENTITY_MEMBERS = ("id", "type", "scope")


def parse_options(params: Mapping[str, str]) -> tuple[set[str], Format]:
    """The ``options`` set and the representation (``format`` wins over ``options``)."""
    opts: set[str] = set()
    raw = params.get("options")
    if raw is not None:
        for o in raw.split(","):
            o = o.strip()
            if o not in KNOWN_OPTIONS:
                raise BadRequestData(f"unknown option {o!r}", field="options")
            opts.add(o)
    fmt: Format = "normalized"
    for o in ("keyValues", "simplified", "concise", "normalized"):
        if o in opts:
            fmt = FORMATS[o]
            break
    raw_fmt = params.get("format")
    if raw_fmt is not None:
        if raw_fmt not in FORMATS:
            raise BadRequestData(f"unknown format {raw_fmt!r}", field="format")
        fmt = FORMATS[raw_fmt]
    return opts, fmt


def split_list(raw: str, field: str) -> list[str]:
    items = [i.strip() for i in raw.split(",")]
    if not raw or any(not i for i in items):
        raise BadRequestData(f"{field} has an empty item", field=field)
    return items


def attr_iris(raw: str | None, ctx: Context, field: str = "attrs") -> list[str] | None:
    if raw is None:
        return None
    names = split_list(raw, field)
    out = []
    for n in names:
        check_attr_name(n, field)
        out.append(ctx.expand(n))
    return out


def projection(raw: str | None, ctx: Context, field: str) -> frozenset[str] | None:
    """pick/omit: entity members (id, type, scope) and attribute names, ``,`` or ``|``."""
    if raw is None:
        return None
    items = [i.strip() for i in re.split(r"[,|]", raw)]
    if any(not i for i in items):
        raise BadRequestData(f"{field} has an empty item", field=field)
    out: set[str] = set()
    for item in items:
        if "{" in item or "}" in item:
            raise BadRequestData(
                f"{field}: linked-entity projection needs join, which is not supported",
                field=field,
            )
        if item in _ENTITY_MEMBERS:
            out.add(item)
        else:
            check_attr_name(item, field)
            out.add(ctx.expand(item))
    return frozenset(out)


def build_view(params: Mapping[str, str], ctx: Context, *, allow_dataset: bool = True) -> View:
    opts, fmt = parse_options(params)
    attrs = attr_iris(params.get("attrs"), ctx)
    pick = projection(params.get("pick"), ctx, "pick")
    omit = projection(params.get("omit"), ctx, "omit")
    if attrs is not None and (pick is not None or omit is not None):
        raise BadRequestData("attrs cannot be combined with pick or omit", field="attrs")
    if pick is not None and omit is not None and pick & omit:
        raise BadRequestData("the same member is in both pick and omit", field="pick")
    lang = params.get("lang")
    if lang is not None and not lang:
        raise BadRequestData("lang must not be empty", field="lang")
    dataset_ids: frozenset[str] | None = None
    if allow_dataset and params.get("datasetId") is not None:
        ds = split_list(params["datasetId"], "datasetId")
        for d in ds:
            if d != "@none" and not is_uri(d):
                raise BadRequestData(f"datasetId {d!r} is not a URI", field="datasetId")
        dataset_ids = frozenset(ds)
    return View(
        fmt=fmt,
        sys_attrs="sysAttrs" in opts,
        lang=lang,
        attrs=frozenset(attrs) if attrs is not None else None,
        pick=pick,
        omit=omit or frozenset(),
        dataset_ids=dataset_ids,
    )


#: the largest ``limit`` or ``offset`` taken: past 2**63 - 1 neither store can bind the number
MAX_PAGE_INT = 2**62


def parse_int(raw: str | None, field: str, default: int) -> int:
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]+", raw):
        raise BadRequestData(f"{field} must be a non-negative integer, got {raw!r}", field=field)
    value = int(raw)
    if value > MAX_PAGE_INT:
        raise BadRequestData(f"{field} must be at most {MAX_PAGE_INT}, got {raw}", field=field)
    return value


@dataclass
class EntityFilter:
    """The selection part of a query, as given by GET parameters or a POST Query body."""

    type: str | None = None
    id: list[str] | None = None
    id_pattern: str | None = None
    attrs: list[str] | None = None  # expanded
    q: str | None = None
    scope_q: str | None = None
    georel: str | None = None
    geometry: str | None = None
    coordinates: Any = None
    geoproperty: str | None = None
    local: bool = False


def filter_from_params(params: Mapping[str, str], ctx: Context) -> EntityFilter:
    ids = None
    if params.get("id") is not None:
        ids = split_list(params["id"], "id")
        for i in ids:
            if not is_uri(i):
                raise BadRequestData(f"id {i!r} is not a URI", field="id")
    local = params.get("local")
    if local is not None and local not in ("true", "false"):
        raise BadRequestData("local must be true or false", field="local")
    return EntityFilter(
        type=params.get("type"),
        id=ids,
        id_pattern=params.get("idPattern"),
        attrs=attr_iris(params.get("attrs"), ctx),
        q=params.get("q"),
        scope_q=params.get("scopeQ"),
        georel=params.get("georel"),
        geometry=params.get("geometry"),
        coordinates=params.get("coordinates"),
        geoproperty=params.get("geoproperty"),
        local=local == "true",
    )


def compile_filter(
    f: EntityFilter, ctx: Context, dialect: Dialect, spec: QuerySpec, require_qualifier: bool = True
) -> None:
    """Add the SQL conditions of a filter to ``spec`` (and check the qualifying-filter rule)."""
    gq = geo.parse_geoquery(f.georel, f.geometry, f.coordinates, f.geoproperty)
    q = parse_q(f.q) if f.q is not None else None
    qualified = bool(f.type or f.attrs or (q and _names_attribute(q)) or gq is not None or f.local)
    if require_qualifier and not qualified:
        raise BadRequestData(
            "a query needs type, attrs, q, a geo-query or local=true", field="type"
        )
    if f.type == "*" and not f.local:
        raise BadRequestData("type=* (all entity types) needs local=true", field="type")
    if f.type is not None and f.type != "*":
        texpr = parse_type_expr(f.type)
        spec.conjuncts.extend(type_conjuncts(texpr, ctx.expand, dialect))
        names = [texpr] if isinstance(texpr, TypeName) else getattr(texpr, "items", ())
        if not isinstance(texpr, TypeAnd) and all(isinstance(n, TypeName) for n in names):
            spec.type_names = frozenset(ctx.expand(n.name) for n in names)
    if f.id is not None:
        marks = ",".join("?" * len(f.id))
        spec.conjuncts.append(
            Conjunct(
                f"e.eid IN ({marks})",
                list(f.id),
                f"SELECT pk AS e FROM entities WHERE eid IN ({marks})",
                list(f.id),
            )
        )
    elif f.id_pattern is not None:
        try:
            spec.add(*regex_condition("e.eid", f.id_pattern, dialect))
        except re.error as exc:  # RegexNotPortable says what the portable subset lacks
            raise BadRequestData(
                f"idPattern is not a valid pattern: {exc}", field="idPattern"
            ) from exc
    if f.attrs:
        spec.conjuncts.append(attrs_conjunct(f.attrs, dialect))
    if q is not None:
        spec.conjuncts.extend(q_conjuncts(q, ctx.expand, dialect))
    if f.scope_q is not None:
        spec.conjuncts.extend(scope_conjuncts(parse_scope_q(f.scope_q), dialect))
    if gq is not None:
        spec.geo = gq
        spec.geo_path = ctx.expand(gq.geoproperty)


def query_store(
    store: Store, tenant: str, spec: QuerySpec, flt: EntityFilter
) -> tuple[list[dict[str, Any]], int | None]:
    """``store.query``, where a store refusing (PostgreSQL) or giving up on (SQLite) a
    regular expression of the filter is the client's 400 on that parameter."""
    try:
        return store.query(tenant, spec)
    except Exception as exc:
        field = pattern_field(flt)
        refused = None if field is None else pattern_refused(exc, field)
        if refused is None:
            raise
        raise refused from exc


def pattern_field(f: EntityFilter) -> str | None:
    """The parameter holding the filter's regular expressions (q first), or None."""
    if f.q is not None and _has_match(parse_q(f.q)):
        return "q"
    return "idPattern" if f.id_pattern is not None and f.id is None else None


def _has_match(q: QExpr) -> bool:
    if isinstance(q, And | Or):
        return any(_has_match(item) for item in q.items)
    return isinstance(q, Match)


def _names_attribute(q: QExpr) -> bool:
    """Whether q tests some attribute that is not a system one (createdAt, modifiedAt, ...)."""
    if isinstance(q, And | Or):
        return any(_names_attribute(item) for item in q.items)
    return q.path.attr not in SYSTEM_MEMBERS


def paging(params: Mapping[str, str], spec: QuerySpec, default_limit: int, max_limit: int) -> None:
    spec.limit = parse_int(params.get("limit"), "limit", default_limit)
    spec.offset = parse_int(params.get("offset"), "offset", 0)
    count = params.get("count")
    if count is not None and count not in ("true", "false"):
        raise BadRequestData("count must be true or false", field="count")
    spec.count = count == "true"
    if spec.limit > max_limit:
        raise TooManyResults(
            f"limit {spec.limit} is above the maximum of {max_limit}", field="limit"
        )
    if spec.limit == 0 and not spec.count:
        raise BadRequestData("limit=0 is only allowed with count=true", field="limit")


def filter_from_body(body: Any, ctx: Context) -> tuple[EntityFilter, dict[str, str]]:
    """A POST /entityOperations/query body as a filter plus view parameters."""
    if not isinstance(body, dict):
        raise BadRequestData("a Query must be a JSON object", field="body")
    if body.get("type") != "Query":
        raise BadRequestData('a Query needs "type": "Query"', field="type")
    if "temporalQ" in body:
        raise BadRequestData("temporalQ is not allowed in an entity query", field="temporalQ")
    f = EntityFilter()
    view_params: dict[str, str] = {}
    entities = body.get("entities")
    if entities is not None:
        if not isinstance(entities, list) or not entities:
            raise BadRequestData("entities must be a non-empty array", field="entities")
        types: list[str] = []
        ids: list[str] = []
        patterns: list[str] = []
        for sel in entities:
            if not isinstance(sel, dict) or "type" not in sel:
                raise BadRequestData("every entities selector needs a type", field="entities")
            t = sel["type"]
            if not isinstance(t, str):
                raise BadRequestData("entities[].type must be a string", field="entities")
            types.append(t if re.fullmatch(r"[\w:/.#-]+", t) else f"({t})")
            if "id" in sel:
                sid = sel["id"]
                for i in sid if isinstance(sid, list) else [sid]:
                    if not is_uri(i):
                        raise BadRequestData(f"id {i!r} is not a URI", field="entities")
                    ids.append(i)
            elif "idPattern" in sel:
                patterns.append(str(sel["idPattern"]))
        f.type = "|".join(types)
        if len(entities) > 1 and (ids or patterns):
            raise BadRequestData(
                "several entity selectors with ids are not supported; send one query each",
                field="entities",
            )
        f.id = ids or None
        f.id_pattern = patterns[0] if patterns else None
    attrs = body.get("attrs")
    if attrs is not None:
        if not isinstance(attrs, list) or not attrs or not all(isinstance(a, str) for a in attrs):
            raise BadRequestData("attrs must be a non-empty array of names", field="attrs")
        for a in attrs:
            check_attr_name(a, "attrs")
        f.attrs = [ctx.expand(a) for a in attrs]
        view_params["attrs"] = ",".join(attrs)
    q = body.get("q")
    if q is not None:
        if not isinstance(q, str):
            raise BadRequestData("q must be a string", field="q")
        f.q = q
    scope_q = body.get("scopeQ")
    if scope_q is not None:
        if not isinstance(scope_q, str):
            raise BadRequestData("scopeQ must be a string", field="scopeQ")
        f.scope_q = scope_q
    geo_q = body.get("geoQ")
    if geo_q is not None:
        if not isinstance(geo_q, dict):
            raise BadRequestData("geoQ must be an object", field="geoQ")
        f.georel = geo_q.get("georel")
        f.geometry = geo_q.get("geometry")
        coords = geo_q.get("coordinates")
        f.coordinates = orjson.dumps(coords).decode() if isinstance(coords, list) else coords
        f.geoproperty = geo_q.get("geoproperty")
    for key in ("pick", "omit"):
        if key in body:
            val = body[key]
            if isinstance(val, list):
                val = ",".join(str(v) for v in val)
            if not isinstance(val, str):
                raise BadRequestData(f"{key} must be a string or an array", field=key)
            view_params[key] = val
    if "lang" in body:
        view_params["lang"] = str(body["lang"])
    if "local" in body:
        f.local = bool(body["local"])
    jl = body.get("joinLevel")
    if jl is not None and (not isinstance(jl, int) or jl < 1):
        raise BadRequestData("joinLevel must be an integer >= 1", field="joinLevel")
    for t in (f.type or "").replace("(", "").replace(")", "").replace("|", ",").split(","):
        if t:
            for part in t.split(";"):
                check_type_name(part)
    return f, view_params
