"""/ngsi-ld/v1/types and /attributes: what entity types and attributes the bank holds."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from cityward.api.ngsi import (
    check_params,
    header_context,
    json_response,
    negotiate,
    runtime,
    tenant_of,
)
from cityward.bank.access import current_access
from cityward.bank.errors import BadRequestData, ResourceNotFound
from cityward.bank.jsonld import Context
from cityward.bank.store import Store

router = APIRouter()


def _details(request: Request) -> bool:
    raw = request.query_params.get("details", "false")
    if raw not in ("true", "false"):
        raise BadRequestData("details must be true or false", field="details")
    return raw == "true"


def _list_id(kind: str, names: list[str]) -> str:
    digest = hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]
    return f"urn:ngsi-ld:{kind}:{digest}"


def _scan(store: Store, tenant: str, type_iri: str | None = None) -> dict[str, Any]:
    """Per type: entity count, attribute -> kinds; per attribute: count and types."""
    types: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    type_count: dict[str, int] = defaultdict(int)
    attr_count: dict[str, int] = defaultdict(int)
    attr_kinds: dict[str, set[str]] = defaultdict(set)
    attr_types: dict[str, set[str]] = defaultdict(set)
    where, params = ("", [])
    if type_iri is not None:
        where, params = ("e.pk IN (SELECT t.e FROM etypes t WHERE t.type = ?)", [type_iri])
    # the entities this request may read, as a query would answer (governance): the counts,
    # attribute names and kinds of the others are not told, and what is told of personal or
    # indirect data is an audited read of those entities
    access = current_access.get()
    for doc in store.iter_docs(tenant, where, params):
        if access is not None:
            if access.read(str(doc["id"]), doc["type"]) is not None:
                continue
            access.returned((doc,))
        for t in doc["type"]:
            type_count[t] += 1
            for iri, instances in doc["attrs"].items():
                for inst in instances:
                    types[t][iri].add(inst["type"])
        for iri, instances in doc["attrs"].items():
            attr_count[iri] += 1
            attr_types[iri].update(doc["type"])
            for inst in instances:
                attr_kinds[iri].add(inst["type"])
    return {
        "types": types,
        "type_count": type_count,
        "attr_count": attr_count,
        "attr_kinds": attr_kinds,
        "attr_types": attr_types,
    }


@router.get("/types")
async def list_types(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("details", "local"))
    negotiate(request)
    ctx = await header_context(request, rt)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)
    if not _details(request):
        counts = await run_in_threadpool(rt.bank.store.type_counts, tenant)
        names = [ctx.compact(t) for t, _ in counts]
        body: Any = {
            "id": _list_id("EntityTypeList", names),
            "type": "EntityTypeList",
            "typeList": names,
        }
        return json_response(body, request, ctx)
    scan = await run_in_threadpool(_scan, rt.bank.store, tenant)
    body = [
        {
            "id": t,
            "type": "EntityType",
            "typeName": ctx.compact(t),
            "attributeNames": sorted(ctx.compact(a) for a in attrs),
        }
        for t, attrs in sorted(scan["types"].items())
    ]
    for t, n in scan["type_count"].items():
        if t not in scan["types"] and n:
            body.append(
                {"id": t, "type": "EntityType", "typeName": ctx.compact(t), "attributeNames": []}
            )
    return json_response(body, request, ctx)


@router.get("/types/{type_name:path}")
async def type_info(request: Request, type_name: str) -> Response:
    rt = runtime(request)
    check_params(request, ("local",))
    negotiate(request)
    ctx = await header_context(request, rt)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)
    iri = ctx.expand(type_name)
    scan = await run_in_threadpool(_scan, rt.bank.store, tenant, iri)
    count = scan["type_count"].get(iri, 0)
    if not count:
        raise ResourceNotFound(f"no entity of type {type_name}", field="type")
    details = [
        {
            "id": a,
            "type": "Attribute",
            "attributeName": ctx.compact(a),
            "attributeTypes": sorted(kinds),
        }
        for a, kinds in sorted(scan["types"][iri].items())
    ]
    body = {
        "id": iri,
        "type": "EntityTypeInfo",
        "typeName": ctx.compact(iri),
        "entityCount": count,
        "attributeDetails": details,
    }
    return json_response(body, request, ctx)


@router.get("/attributes")
async def list_attributes(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("details", "local"))
    negotiate(request)
    ctx = await header_context(request, rt)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)
    scan = await run_in_threadpool(_scan, rt.bank.store, tenant)
    if not _details(request):
        names = sorted(ctx.compact(a) for a in scan["attr_count"])
        body: Any = {
            "id": _list_id("AttributeList", names),
            "type": "AttributeList",
            "attributeList": names,
        }
        return json_response(body, request, ctx)
    body = [_attr_body(a, scan, ctx, with_counts=False) for a in sorted(scan["attr_count"])]
    return json_response(body, request, ctx)


def _attr_body(iri: str, scan: dict[str, Any], ctx: Context, with_counts: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": iri, "type": "Attribute", "attributeName": ctx.compact(iri)}
    if with_counts:
        out["attributeCount"] = scan["attr_count"][iri]
        out["attributeTypes"] = sorted(scan["attr_kinds"][iri])
    out["typeNames"] = sorted(ctx.compact(t) for t in scan["attr_types"][iri])
    return out


@router.get("/attributes/{attr:path}")
async def attribute_info(request: Request, attr: str) -> Response:
    rt = runtime(request)
    check_params(request, ("local",))
    negotiate(request)
    ctx = await header_context(request, rt)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)
    iri = ctx.expand(attr)
    scan = await run_in_threadpool(_scan, rt.bank.store, tenant)
    if iri not in scan["attr_count"]:
        raise ResourceNotFound(f"no attribute {attr}", field="attrId")
    return json_response(_attr_body(iri, scan, ctx, with_counts=True), request, ctx)
