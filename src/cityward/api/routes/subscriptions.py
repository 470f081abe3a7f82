"""/ngsi-ld/v1/subscriptions: create, list, retrieve, update and delete subscriptions."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from cityward.api.ngsi import (
    Runtime,
    check_params,
    empty_response,
    header_context,
    json_response,
    negotiate,
    read_json,
    resolve_context,
    runtime,
    tenant_of,
)
from cityward.api.params import parse_int
from cityward.api.routes.entities import page_headers
from cityward.bank.errors import BadRequestData
from cityward.bank.jsonld import Context
from cityward.bank.store import QuerySpec
from cityward.bank.subscriptions.model import Subscription, apply_patch, parse_subscription
from cityward.bank.subscriptions.service import Subscriptions
from cityward.governance.sources import ALL_PURPOSES

router = APIRouter()
PATH = "/ngsi-ld/v1/subscriptions/"


def _subs(request: Request) -> Subscriptions:
    subs = request.app.state.subscriptions
    assert isinstance(subs, Subscriptions)
    return subs


async def _body(request: Request, rt: Runtime) -> tuple[object, Context]:
    body, ctx, is_ld = await read_json(request, rt)
    if is_ld:
        if not isinstance(body, dict) or "@context" not in body:
            raise BadRequestData("application/ld+json bodies need an @context", field="@context")
        ctx = await resolve_context(rt, body["@context"])
    elif isinstance(body, dict) and "@context" in body:
        raise BadRequestData(
            "an @context in the body needs Content-Type application/ld+json", field="@context"
        )
    return body, ctx


def _sys_attrs(request: Request) -> bool:
    opts = {o.strip() for o in request.query_params.get("options", "").split(",") if o.strip()}
    unknown = opts - {"sysAttrs"}
    if unknown:
        raise BadRequestData(f"unknown option {sorted(unknown)[0]!r}", field="options")
    return "sysAttrs" in opts


def _owned(request: Request, sub: Subscription) -> Subscription:
    """Bind the subscription to the purposes of the caller who creates or changes it."""
    principal = request.scope.get("state", {}).get("principal")
    purposes = getattr(principal, "purposes", None)
    if purposes is None or ALL_PURPOSES in purposes:
        return dataclasses.replace(sub, owner_purposes=None)
    return dataclasses.replace(sub, owner_purposes=tuple(sorted(purposes)))


@router.post("/subscriptions")
async def create_subscription(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx = await _body(request, rt)
    sub = _owned(request, parse_subscription(body, ctx))
    await run_in_threadpool(_subs(request).create, tenant_of(request), sub)
    return empty_response(request, status=201, headers={"Location": PATH + sub.id})


@router.get("/subscriptions")
async def list_subscriptions(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("limit", "offset", "count", "options"))
    media = negotiate(request)
    ctx = await header_context(request, rt)
    sys_attrs = _sys_attrs(request)
    params = request.query_params
    spec = QuerySpec(
        limit=parse_int(params.get("limit"), "limit", rt.bank.default_limit),
        offset=parse_int(params.get("offset"), "offset", 0),
        count=params.get("count") == "true",
    )
    if spec.limit > rt.bank.max_limit:
        raise BadRequestData(f"limit must be at most {rt.bank.max_limit}", field="limit")
    subs, total = await run_in_threadpool(
        _subs(request).page, tenant_of(request), spec.limit, spec.offset
    )
    data = [s.to_json(ctx, sys_attrs=sys_attrs) for s in subs]
    headers = page_headers(request, spec, len(data), total if spec.count else None)
    return json_response(data, request, ctx, media, headers=headers)


@router.get("/subscriptions/{sid:path}")
async def retrieve_subscription(request: Request, sid: str) -> Response:
    rt = runtime(request)
    check_params(request, ("options",))
    media = negotiate(request)
    ctx = await header_context(request, rt)
    sys_attrs = _sys_attrs(request)
    sub = await run_in_threadpool(_subs(request).get, tenant_of(request), sid)
    return json_response(sub.to_json(ctx, sys_attrs=sys_attrs), request, ctx, media)


@router.patch("/subscriptions/{sid:path}")
async def update_subscription(request: Request, sid: str) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx = await _body(request, rt)
    subs = _subs(request)
    tenant = tenant_of(request)
    current = await run_in_threadpool(subs.get, tenant, sid)
    updated = _owned(request, apply_patch(current, body, ctx))
    await run_in_threadpool(subs.replace, tenant, updated)
    return empty_response(request)


@router.delete("/subscriptions/{sid:path}")
async def delete_subscription(request: Request, sid: str) -> Response:
    check_params(request, ())
    await run_in_threadpool(_subs(request).delete, tenant_of(request), sid)
    return empty_response(request)
