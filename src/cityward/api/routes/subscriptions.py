"""/ngsi-ld/v1/subscriptions: create, list, retrieve, update and delete subscriptions.

A subscription belongs to the subject of the token that created it. Only its owner sees and
changes it; admins see and change every subscription. For anyone else it does not exist (404,
absent from the list), so that neither its endpoint nor the secrets of its receiverInfo leak.
Subscriptions without an owner (made before owners were recorded, or with --no-auth) are
managed by admins only. With --no-auth every caller is admin, so nothing changes there.
"""

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
from cityward.governance.identity import Principal
from cityward.governance.middleware import principal_of
from cityward.governance.policy import Role
from cityward.governance.sources import ALL_PURPOSES

router = APIRouter()
PATH = "/ngsi-ld/v1/subscriptions/"


def _subs(request: Request) -> Subscriptions:
    subs = request.app.state.subscriptions
    assert isinstance(subs, Subscriptions)
    return subs


async def _body(
    request: Request, rt: Runtime, *, merge_patch: bool = False
) -> tuple[object, Context]:
    body, ctx, is_ld = await read_json(request, rt, merge_patch=merge_patch)
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


def _caller(request: Request) -> Principal:
    return principal_of(request.scope.get("state", {}))


def _only_owner(caller: Principal) -> str | None:
    """The owner whose subscriptions ``caller`` may see and change (None: all, for admins)."""
    return None if caller.role is Role.ADMIN else caller.subject


def _bound(caller: Principal, sub: Subscription) -> Subscription:
    """Bind the subscription to the purposes of the caller who creates or changes it."""
    if ALL_PURPOSES in caller.purposes:
        return dataclasses.replace(sub, owner_purposes=None)
    return dataclasses.replace(sub, owner_purposes=tuple(sorted(caller.purposes)))


@router.post("/subscriptions")
async def create_subscription(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx = await _body(request, rt)
    caller = _caller(request)
    # --no-auth has no real identity: what it creates is left without an owner (admins only
    # once authentication is on), rather than owned by whoever is later given its name
    owner = None if caller.kind == "dev" else caller.subject
    sub = dataclasses.replace(_bound(caller, parse_subscription(body, ctx)), owner=owner)
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
        _subs(request).page,
        tenant_of(request),
        spec.limit,
        spec.offset,
        owner=_only_owner(_caller(request)),
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
    sub = await run_in_threadpool(
        _subs(request).get, tenant_of(request), sid, owner=_only_owner(_caller(request))
    )
    return json_response(sub.to_json(ctx, sys_attrs=sys_attrs), request, ctx, media)


@router.patch("/subscriptions/{sid:path}")
async def update_subscription(request: Request, sid: str) -> Response:
    rt = runtime(request)
    check_params(request, ())
    # the body is a merge patch: NGSI-LD accepts application/merge-patch+json (RFC 7396) here
    body, ctx = await _body(request, rt, merge_patch=True)
    subs = _subs(request)
    tenant = tenant_of(request)
    caller = _caller(request)
    only = _only_owner(caller)

    def change(current: Subscription) -> Subscription:
        updated = apply_patch(current, body, ctx)  # keeps the owner: a body cannot name one
        if caller.kind == "dev" or current.owner == caller.subject:
            return _bound(caller, updated)
        # else an admin changes someone else's subscription (or one without an owner): its
        # notifications still go to the owner's endpoint, so they keep the purposes they had
        # rather than gaining every purpose of the admin
        return updated

    # read, patched and written in one transaction: two PATCHes at once both count
    await run_in_threadpool(subs.update, tenant, sid, change, owner=only)
    return empty_response(request)


@router.delete("/subscriptions/{sid:path}")
async def delete_subscription(request: Request, sid: str) -> Response:
    check_params(request, ())
    await run_in_threadpool(
        _subs(request).delete, tenant_of(request), sid, owner=_only_owner(_caller(request))
    )
    return empty_response(request)
