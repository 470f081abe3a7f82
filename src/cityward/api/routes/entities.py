"""/ngsi-ld/v1/entities: create, retrieve, query, replace, merge, delete and attribute routes."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

import cityward.api.rawpath  # noqa: F401  (registers the escaped_* path convertors used below)
from cityward.api.ngsi import (
    GEO_JSON,
    Runtime,
    body_context,
    body_context_async,
    check_params,
    empty_response,
    header_context,
    json_response,
    negotiate,
    read_json,
    runtime,
    tenant_of,
)
from cityward.api.params import (
    build_view,
    compile_filter,
    filter_from_params,
    paging,
    parse_options,
    query_store,
    split_list,
)
from cityward.bank.errors import BadRequestData, InvalidRequest
from cityward.bank.geo import feature_geometry
from cityward.bank.jsonld import Context
from cityward.bank.model import EntityParser, Mode, check_attr_name, check_type_name, check_uri
from cityward.bank.render import View, render_entity
from cityward.bank.service import UpdateResult
from cityward.bank.store import QuerySpec

router = APIRouter()

VIEW_PARAMS = ("attrs", "pick", "omit", "options", "format", "lang", "datasetId")
QUERY_PARAMS = (
    *VIEW_PARAMS,
    "type",
    "id",
    "idPattern",
    "q",
    "scopeQ",
    "csf",
    "georel",
    "geometry",
    "coordinates",
    "geoproperty",
    "geometryProperty",
    "limit",
    "offset",
    "count",
    "local",
)


def parse_body_entity(
    body: Any, ctx: Context, rt: Runtime, is_ld: bool, mode: Mode, path_id: str | None = None
) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequestData("the body must be a JSON object", field="body")
    ectx = body_context(body, rt, is_ld, ctx)
    return EntityParser(ectx).entity(body, mode, path_id=path_id)


def types_param(request: Request, ctx: Context) -> list[str] | None:
    raw = request.query_params.get("type")
    if raw is None:
        return None
    return [ctx.expand(check_type_name(t)) for t in split_list(raw, "type")]


def geojson_feature(
    entity: dict[str, Any], doc: dict[str, Any], geometry_iri: str
) -> dict[str, Any]:
    geometry = feature_geometry(doc["attrs"].get(geometry_iri))
    props = {k: v for k, v in entity.items() if k != "id"}
    return {"id": entity["id"], "type": "Feature", "geometry": geometry, "properties": props}


def render_many(
    docs: list[dict[str, Any]], ctx: Context, view: View, media: str, geometry_iri: str
) -> Any:
    rendered = [render_entity(d, ctx, view) for d in docs]
    if media == GEO_JSON:
        return {
            "type": "FeatureCollection",
            "features": [
                geojson_feature(r, d, geometry_iri) for r, d in zip(rendered, docs, strict=True)
            ],
        }
    return rendered


def geo_response(data: Any, request: Request, ctx: Context) -> Response:
    if isinstance(data, dict) and request.headers.get("prefer", "") != "body=json":
        data = {**data, "@context": ctx.output_context()}
        return json_response(data, request, ctx, media=GEO_JSON)
    return json_response(data, request, ctx, media=GEO_JSON)


@router.post("/entities")
async def create_entity(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx, is_ld = await read_json(request, rt)
    if body == {} or body == []:
        # an empty body is a malformed request on create (batches answer BadRequestData)
        raise InvalidRequest("the body is empty", field="body")
    frag = await run_in_threadpool(parse_body_entity, body, ctx, rt, is_ld, "create")
    await run_in_threadpool(rt.bank.create, tenant_of(request), frag)
    return empty_response(
        request, 201, {"Location": f"/ngsi-ld/v1/entities/{quote(frag['id'], safe=':')}"}
    )


@router.get("/entities")
async def query_entities(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, QUERY_PARAMS)
    media = negotiate(request, allow_geo=True)
    ctx = await header_context(request, rt)
    params = request.query_params
    if "geometryProperty" in params and media != GEO_JSON:
        raise BadRequestData(
            "geometryProperty needs Accept: application/geo+json", field="geometryProperty"
        )
    view = build_view(params, ctx)
    spec = QuerySpec()
    flt = filter_from_params(params, ctx)
    compile_filter(flt, ctx, rt.bank.store.dialect, spec)
    paging(params, spec, rt.bank.default_limit, rt.bank.max_limit)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)
    docs, total = await run_in_threadpool(query_store, rt.bank.store, tenant, spec, flt)
    headers = page_headers(request, spec, len(docs), total)
    data = render_many(
        docs, ctx, view, media, ctx.expand(params.get("geometryProperty", "location"))
    )
    if media == GEO_JSON:
        resp = geo_response(data, request, ctx)
        resp.headers.update(headers)
        return resp
    return json_response(data, request, ctx, media, headers=headers)


def page_headers(
    request: Request, spec: QuerySpec, returned: int, total: int | None
) -> dict[str, str]:
    """NGSILD-Results-Count and next/prev Link headers for a page of results."""
    headers: dict[str, str] = {}
    if total is not None:
        headers["NGSILD-Results-Count"] = str(total)
    links = []
    base = dict(request.query_params)
    path = request.url.path
    # limit=0 (a count alone) has no next page: its "next" was the same request again
    more = (total is not None and spec.limit > 0 and spec.offset + returned < total) or (
        total is None and spec.limit > 0 and returned == spec.limit
    )
    if more:
        nxt = {**base, "offset": str(spec.offset + spec.limit), "limit": str(spec.limit)}
        links.append(f'<{path}?{urlencode(nxt)}>; rel="next"; type="application/json"')
    if spec.offset > 0:
        prev = {**base, "offset": str(max(0, spec.offset - spec.limit)), "limit": str(spec.limit)}
        links.append(f'<{path}?{urlencode(prev)}>; rel="prev"; type="application/json"')
    if links:
        headers["Link"] = ", ".join(links)
    return headers


@router.get("/entities/{eid:escaped_path}/attrs/{attr:escaped_segment}")
async def retrieve_attr_not_allowed(eid: str, attr: str) -> Response:
    from cityward.bank.errors import MethodNotAllowed

    raise MethodNotAllowed("GET is not allowed on an attribute; retrieve the entity with attrs=")


@router.patch("/entities/{eid:escaped_path}/attrs/{attr:escaped_segment}")
async def partial_attr_update(request: Request, eid: str, attr: str) -> Response:
    return await _attr_write(request, eid, attr, "patch")


@router.put("/entities/{eid:escaped_path}/attrs/{attr:escaped_segment}")
async def replace_attr(request: Request, eid: str, attr: str) -> Response:
    return await _attr_write(request, eid, attr, "put")


async def _attr_write(request: Request, eid: str, attr: str, how: str) -> Response:
    rt = runtime(request)
    check_params(request, ())
    check_uri(eid, "id")
    check_attr_name(attr, "attrId")
    body, ctx, is_ld = await read_json(request, rt)
    if not isinstance(body, dict | list) or not body:
        raise BadRequestData("the body must be a non-empty attribute", field="body")
    actx = await body_context_async(body if isinstance(body, dict) else {}, rt, is_ld, ctx)
    parser = EntityParser(actx)
    iri = actx.expand(attr)
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k != "@context"}
    mode: Mode = "merge" if how == "patch" else "create"
    instances = parser.attribute(body, attr, mode)
    if how == "patch":
        await run_in_threadpool(rt.bank.patch_attr, tenant_of(request), eid, iri, instances)
    else:
        await run_in_threadpool(rt.bank.replace_attr, tenant_of(request), eid, iri, instances)
    return empty_response(request)


@router.delete("/entities/{eid:escaped_path}/attrs/{attr:escaped_segment}")
async def delete_attr(request: Request, eid: str, attr: str) -> Response:
    rt = runtime(request)
    check_params(request, ("datasetId", "deleteAll"))
    check_uri(eid, "id")
    check_attr_name(attr, "attrId")
    ctx = await header_context(request, rt)
    dataset_id = request.query_params.get("datasetId")
    if dataset_id is not None and dataset_id != "@none":
        check_uri(dataset_id, "datasetId")
    delete_all = request.query_params.get("deleteAll", "false")
    if delete_all not in ("true", "false"):
        raise BadRequestData("deleteAll must be true or false", field="deleteAll")
    await run_in_threadpool(
        rt.bank.delete_attr,
        tenant_of(request),
        eid,
        ctx.expand(attr),
        None if dataset_id == "@none" else dataset_id,
        delete_all == "true",
    )
    return empty_response(request)


@router.post("/entities/{eid:escaped_path}/attrs")
async def append_attrs(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ("options",))
    check_uri(eid, "id")
    opts, _ = parse_options(request.query_params)
    body, ctx, is_ld = await read_json(request, rt)
    frag = await run_in_threadpool(parse_body_entity, body, ctx, rt, is_ld, "fragment", path_id=eid)
    result = await run_in_threadpool(
        rt.bank.append, tenant_of(request), eid, frag, "noOverwrite" in opts
    )
    return update_result_response(request, result, ctx)


@router.patch("/entities/{eid:escaped_path}/attrs")
async def update_attrs(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ("options",))
    parse_options(request.query_params)  # an unknown option is a 400, as on every route
    check_uri(eid, "id")
    body, ctx, is_ld = await read_json(request, rt)
    frag = await run_in_threadpool(parse_body_entity, body, ctx, rt, is_ld, "update", path_id=eid)
    result = await run_in_threadpool(rt.bank.update_attrs, tenant_of(request), eid, frag)
    return update_result_response(request, result, ctx)


def update_result_response(request: Request, result: UpdateResult, ctx: Context) -> Response:
    if not result.not_updated:
        return empty_response(request)
    body = {
        "updated": [ctx.compact(a) for a in result.updated],
        "notUpdated": [
            {"attributeName": ctx.compact(a), "reason": reason} for a, reason in result.not_updated
        ],
    }
    return json_response(body, request, ctx, status=207)


@router.get("/entities/{eid:escaped_path}")
async def retrieve_entity(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, (*VIEW_PARAMS, "type", "geometryProperty", "local"))
    check_uri(eid, "id")
    media = negotiate(request, allow_geo=True)
    ctx = await header_context(request, rt)
    params = request.query_params
    if "geometryProperty" in params and media != GEO_JSON:
        raise BadRequestData(
            "geometryProperty needs Accept: application/geo+json", field="geometryProperty"
        )
    view = build_view(params, ctx)
    doc = await run_in_threadpool(
        rt.bank.retrieve, tenant_of(request), eid, types_param(request, ctx)
    )
    entity = render_entity(doc, ctx, view)
    if media == GEO_JSON:
        feature = geojson_feature(
            entity, doc, ctx.expand(params.get("geometryProperty", "location"))
        )
        return geo_response(feature, request, ctx)
    return json_response(entity, request, ctx, media)


@router.put("/entities/{eid:escaped_path}")
async def replace_entity(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ())
    check_uri(eid, "id")
    body, ctx, is_ld = await read_json(request, rt)
    frag = await run_in_threadpool(parse_body_entity, body, ctx, rt, is_ld, "fragment", path_id=eid)
    await run_in_threadpool(rt.bank.replace, tenant_of(request), eid, frag)
    return empty_response(request)


@router.patch("/entities/{eid:escaped_path}")
async def merge_entity(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ("options", "format", "lang"))
    parse_options(request.query_params)  # an unknown option or format is a 400 (was ignored)
    check_uri(eid, "id")
    body, ctx, is_ld = await read_json(request, rt, merge_patch=True)
    frag = await run_in_threadpool(parse_body_entity, body, ctx, rt, is_ld, "merge", path_id=eid)
    await run_in_threadpool(rt.bank.merge, tenant_of(request), eid, frag)
    return empty_response(request)


@router.delete("/entities/{eid:escaped_path}")
async def delete_entity(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ("type",))
    check_uri(eid, "id")
    ctx = await header_context(request, rt)
    await run_in_threadpool(rt.bank.delete, tenant_of(request), eid, types_param(request, ctx))
    return empty_response(request)
