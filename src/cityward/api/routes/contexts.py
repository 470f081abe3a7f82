"""/ngsi-ld/v1/jsonldContexts: register, list, serve and delete @contexts."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from cityward.api.ngsi import check_params, empty_response, read_json, runtime, tenant_of
from cityward.bank.contexts import HOSTED_PATH, KINDS, ContextRegistry
from cityward.bank.errors import BadRequestData

router = APIRouter()


def _registry(request: Request) -> ContextRegistry:
    reg = request.app.state.context_registry
    assert isinstance(reg, ContextRegistry)
    return reg


def _bool(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "false")
    if raw not in ("true", "false"):
        raise BadRequestData(f"{name} must be true or false", field=name)
    return raw == "true"


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _json(data: object, request: Request, status: int = 200) -> Response:
    headers = {}
    tenant = request.headers.get("ngsild-tenant")
    if tenant is not None:
        headers["NGSILD-Tenant"] = tenant
    return Response(
        orjson.dumps(data), status_code=status, media_type="application/json", headers=headers
    )


@router.post("/jsonldContexts")
async def register_context(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, _, _ = await read_json(request, rt)
    local_id = await run_in_threadpool(_registry(request).register, tenant_of(request), body)
    return empty_response(request, status=201, headers={"Location": HOSTED_PATH + local_id})


@router.get("/jsonldContexts")
async def list_contexts(request: Request) -> Response:
    check_params(request, ("details", "kind"))
    details = _bool(request, "details")
    kind = request.query_params.get("kind")
    if kind is not None and kind not in KINDS:
        raise BadRequestData(f"kind must be one of {', '.join(KINDS)}", field="kind")
    reg = _registry(request)
    tenant = tenant_of(request)
    entries = await run_in_threadpool(reg.entries, tenant, _base(request))
    entries = [e for e in entries if kind is None or e.kind == kind]
    if details:
        return _json([e.details(*reg.usage(tenant, e)) for e in entries], request)
    return _json([e.url for e in entries], request)


@router.get("/jsonldContexts/{local_id}")
async def get_context(request: Request, local_id: str) -> Response:
    check_params(request, ("details",))
    details = _bool(request, "details")
    reg = _registry(request)
    tenant = tenant_of(request)
    entry = await run_in_threadpool(reg.find, tenant, local_id, _base(request))
    if details:
        return _json(entry.details(*reg.usage(tenant, entry)), request)
    return Response(orjson.dumps({"@context": entry.body}), media_type="application/ld+json")


@router.delete("/jsonldContexts/{local_id}")
async def delete_context(request: Request, local_id: str) -> Response:
    check_params(request, ("reload",))
    reload = _bool(request, "reload")
    await run_in_threadpool(
        _registry(request).delete, tenant_of(request), local_id, _base(request), reload
    )
    return empty_response(request)
