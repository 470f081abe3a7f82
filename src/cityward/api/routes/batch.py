"""/ngsi-ld/v1/entityOperations: batch create, upsert, update, merge, delete and query."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from cityward.api.ngsi import (
    Runtime,
    check_params,
    empty_response,
    json_response,
    negotiate,
    read_json,
    resolve_context,
    runtime,
    tenant_of,
)
from cityward.api.params import (
    build_view,
    compile_filter,
    filter_from_body,
    paging,
    parse_options,
    query_store,
)
from cityward.api.routes.entities import page_headers, parse_body_entity
from cityward.bank.errors import BadRequestData, NgsiError
from cityward.bank.jsonld import Context
from cityward.bank.model import Mode, check_uri
from cityward.bank.render import render_entity
from cityward.bank.service import BatchResult
from cityward.bank.store import QuerySpec

router = APIRouter()

Item = dict[str, Any] | tuple[str | None, NgsiError]


async def _read_array(request: Request, rt: Runtime) -> tuple[list[Any], Context, bool]:
    body, ctx, is_ld = await read_json(request, rt)
    if not isinstance(body, list):
        raise BadRequestData("a batch body must be a JSON array", field="body")
    if not body:
        raise BadRequestData("a batch body must not be an empty array", field="body")
    if any(item is None for item in body):
        raise BadRequestData("a batch body must not contain null", field="body")
    return body, ctx, is_ld


def _parse_items(body: list[Any], ctx: Context, rt: Runtime, is_ld: bool, mode: Mode) -> list[Item]:
    items: list[Item] = []
    for raw in body:
        eid = raw.get("id", raw.get("@id")) if isinstance(raw, dict) else None
        try:
            frag = parse_body_entity(raw, ctx, rt, is_ld, mode)
            if "id" not in frag:
                raise BadRequestData("entity id is missing", field="id")
            items.append(frag)
        except NgsiError as exc:
            items.append((eid if isinstance(eid, str) else None, exc))
    return items


def _result(request: Request, result: BatchResult, ctx: Context, created_status: bool) -> Response:
    if result.errors:
        body = {"success": result.success, "errors": result.errors}
        return json_response(body, request, ctx, status=207)
    if created_status and result.created:
        return json_response(result.created, request, ctx, status=201)
    return empty_response(request)


@router.post("/entityOperations/create")
async def batch_create(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx, is_ld = await _read_array(request, rt)
    items = await run_in_threadpool(_parse_items, body, ctx, rt, is_ld, "create")
    result = await run_in_threadpool(rt.bank.batch_create, tenant_of(request), items)
    if result.errors:
        return _result(request, result, ctx, True)
    return json_response(result.success, request, ctx, status=201)


@router.post("/entityOperations/upsert")
async def batch_upsert(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("options",))
    opts, _ = parse_options(request.query_params)
    if "replace" in opts and "update" in opts:
        raise BadRequestData("options replace and update exclude each other", field="options")
    mode: Literal["replace", "update"] = "update" if "update" in opts else "replace"
    body, ctx, is_ld = await _read_array(request, rt)
    items = await run_in_threadpool(_parse_items, body, ctx, rt, is_ld, "create")
    result = await run_in_threadpool(rt.bank.batch_upsert, tenant_of(request), items, mode)
    return _result(request, result, ctx, True)


@router.post("/entityOperations/update")
async def batch_update(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("options",))
    opts, _ = parse_options(request.query_params)
    body, ctx, is_ld = await _read_array(request, rt)
    items = await run_in_threadpool(_parse_items, body, ctx, rt, is_ld, "fragment")
    result = await run_in_threadpool(
        rt.bank.batch_update, tenant_of(request), items, "noOverwrite" in opts
    )
    return _result(request, result, ctx, False)


@router.post("/entityOperations/merge")
async def batch_merge(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx, is_ld = await _read_array(request, rt)
    items = await run_in_threadpool(_parse_items, body, ctx, rt, is_ld, "merge")
    result = await run_in_threadpool(rt.bank.batch_update, tenant_of(request), items, False, True)
    return _result(request, result, ctx, False)


@router.post("/entityOperations/delete")
async def batch_delete(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx, _ = await _read_array(request, rt)
    ids: list[str | tuple[str | None, NgsiError]] = []
    for raw in body:
        try:
            ids.append(check_uri(raw, "id"))
        except NgsiError as exc:
            ids.append((raw if isinstance(raw, str) else None, exc))
    result = await run_in_threadpool(rt.bank.batch_delete, tenant_of(request), ids)
    return _result(request, result, ctx, False)


@router.post("/entityOperations/query")
async def batch_query(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("limit", "offset", "count", "options", "format", "local"))
    media = negotiate(request)
    body, ctx, is_ld = await read_json(request, rt)
    if is_ld and isinstance(body, dict):
        if "@context" not in body:
            raise BadRequestData("application/ld+json bodies need an @context", field="@context")
        ctx = await resolve_context(rt, body["@context"])
    elif isinstance(body, dict) and "@context" in body:
        raise BadRequestData(
            "an @context in the body needs Content-Type application/ld+json", field="@context"
        )
    flt, view_params = filter_from_body(body, ctx)
    params = {**dict(request.query_params), **view_params}
    view = build_view(params, ctx)
    spec = QuerySpec()
    compile_filter(flt, ctx, rt.bank.store.dialect, spec)
    paging(params, spec, rt.bank.default_limit, rt.bank.max_limit)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)
    # as GET: a pattern the store refuses or gives up on is a 400 naming q or idPattern
    docs, total = await run_in_threadpool(query_store, rt.bank.store, tenant, spec, flt)
    data = [render_entity(d, ctx, view) for d in docs]
    headers = page_headers(request, spec, len(docs), total)
    return json_response(data, request, ctx, media, headers=headers)
