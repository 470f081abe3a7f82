"""HTTP plumbing shared by the NGSI-LD routes: bodies, contexts, Accept, tenants, responses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from cityward.bank.errors import (
    BadRequestData,
    InvalidRequest,
    LengthRequired,
    NotAcceptable,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from cityward.bank.jsonld import (
    Context,
    ContextResolver,
    current_tenant,
    link_header,
    parse_link_header,
)
from cityward.bank.service import Bank

JSON = "application/json"
LD_JSON = "application/ld+json"
GEO_JSON = "application/geo+json"
MERGE_PATCH = "application/merge-patch+json"
_PREFERENCE = (JSON, LD_JSON, GEO_JSON)


@dataclass
class Runtime:
    """What every route needs: the bank, the context resolver and the limits."""

    bank: Bank
    contexts: ContextResolver
    max_body: int = 8 * 1024 * 1024


def runtime(request: Request) -> Runtime:
    rt = request.app.state.runtime
    assert isinstance(rt, Runtime)
    return rt


TENANT_MAX = 255  # characters of an NGSILD-Tenant name


def tenant_of(request: Request) -> str:
    """The request's tenant ('' = the default one). A name past TENANT_MAX characters is a
    400 naming the header: PostgreSQL refused one of 3,000 (its index row limit, reported
    against the entity) where SQLite took it, so the two stores answered differently."""
    tenant = request.headers.get("ngsild-tenant", "") or ""
    if len(tenant) > TENANT_MAX:
        raise BadRequestData(
            f"the tenant name is {len(tenant)} characters long; at most {TENANT_MAX}",
            field="NGSILD-Tenant",
        )
    return tenant


def check_params(request: Request, allowed: Iterable[str]) -> None:
    """Unknown query parameters are an InvalidRequest (ETSI GS CIM 009, 6.3.x)."""
    allowed_set = set(allowed)
    for key, value in request.query_params.multi_items():
        if key not in allowed_set:
            raise InvalidRequest(f"unknown query parameter {key!r}", field=key)
        if "\x00" in value:
            # no stored text holds NUL (PostgreSQL cannot): such a value can only be an attack
            raise BadRequestData(f"{key} contains a NUL character", field=key)


def _enter_tenant(request: Request) -> None:
    """Resolve the request's contexts for its tenant: a URL names a hosted context of that
    tenant only, and the cache records which tenant used what. The value lives in the
    request's task (and the worker threads it starts); tenant_of checks the name later."""
    current_tenant.set(request.headers.get("ngsild-tenant", "") or "")


async def resolve_context(rt: Runtime, source: Any) -> Context:
    """Resolve a context; a fetch runs in a worker thread so it never stalls other requests."""
    hit = rt.contexts.cached(source)
    if hit is not None:
        return hit
    return await run_in_threadpool(rt.contexts.resolve, source)


async def header_context(request: Request, rt: Runtime) -> Context:
    """The @context of a GET/DELETE request: its Link header, or the core context."""
    _enter_tenant(request)
    url = parse_link_header(request.headers.get("link"))
    return await resolve_context(rt, url) if url else rt.contexts.core


async def read_json(
    request: Request, rt: Runtime, merge_patch: bool = False
) -> tuple[Any, Context, bool]:
    """Parse a request body and find its @context.

    Returns (body, context, body_is_ld): for application/ld+json the context is the body's
    @context (mandatory) and a Link header is an error; for application/json it is the Link
    header's, and an @context in the body is an error (reported per entity in batches).
    """
    _enter_tenant(request)
    length = request.headers.get("content-length")
    chunked = "chunked" in request.headers.get("transfer-encoding", "").lower()
    if length is None and not chunked:
        raise LengthRequired("a Content-Length header is required", field="Content-Length")
    if length is not None and length.isdigit() and int(length) > rt.max_body:
        raise PayloadTooLarge(
            f"request body of {length} bytes exceeds the limit of {rt.max_body} bytes",
            field="body",
        )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    allowed = (JSON, LD_JSON, MERGE_PATCH) if merge_patch else (JSON, LD_JSON)
    if ctype not in allowed:
        raise UnsupportedMediaType(
            f"Content-Type {ctype or '(none)'} is not supported; use {' or '.join(allowed)}",
            field="Content-Type",
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw.extend(chunk)
        if len(raw) > rt.max_body:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {rt.max_body} bytes", field="body"
            )
    try:
        body = orjson.loads(bytes(raw))
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", field="body") from exc
    link = parse_link_header(request.headers.get("link"))
    if ctype == LD_JSON:
        if link is not None:
            raise BadRequestData(
                "a JSON-LD Link header cannot be used with application/ld+json", field="Link"
            )
        return body, rt.contexts.core, True
    ctx = await resolve_context(rt, link) if link else rt.contexts.core
    return body, ctx, False


def body_context(item: Any, rt: Runtime, body_is_ld: bool, ctx: Context) -> Context:
    """The context one entity of a body is read with (checks @context presence rules).

    It may fetch: call it from a worker thread, or use :func:`body_context_async`."""
    source = _body_source(item, body_is_ld)
    return ctx if source is _NO_SOURCE else rt.contexts.resolve(source)


async def body_context_async(item: Any, rt: Runtime, body_is_ld: bool, ctx: Context) -> Context:
    """:func:`body_context` for async routes: a fetch runs in a worker thread, so a slow
    remote context never stalls the event loop."""
    source = _body_source(item, body_is_ld)
    return ctx if source is _NO_SOURCE else await resolve_context(rt, source)


_NO_SOURCE = object()


def _body_source(item: Any, body_is_ld: bool) -> Any:
    if not isinstance(item, dict):
        return _NO_SOURCE
    if body_is_ld:
        if "@context" not in item:
            raise BadRequestData(
                "application/ld+json bodies need an @context member", field="@context"
            )
        return item["@context"]
    if "@context" in item:
        raise BadRequestData(
            "an @context in the body needs Content-Type application/ld+json", field="@context"
        )
    return _NO_SOURCE


def negotiate(request: Request, allow_geo: bool = False) -> str:
    """The response media type from the Accept header (RFC 9110 weights)."""
    header = request.headers.get("accept")
    if not header:
        return JSON
    offered = [t for t in _PREFERENCE if allow_geo or t != GEO_JSON]
    weights: dict[str, float] = {}
    wildcard: float | None = None
    for part in header.split(","):
        bits = [b.strip() for b in part.split(";")]
        mtype = bits[0].lower()
        q = 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 1.0
        if mtype in ("*/*", "application/*"):
            wildcard = max(wildcard or 0.0, q)
        elif mtype in _PREFERENCE:
            weights[mtype] = max(weights.get(mtype, 0.0), q)
    best: str | None = None
    best_q = 0.0
    for t in offered:
        q = weights.get(t, wildcard if wildcard is not None and t not in weights else 0.0)
        if q > best_q:
            best, best_q = t, q
    if best is None:
        if GEO_JSON in weights and not allow_geo:
            raise NotAcceptable("application/geo+json is not available here", field="Accept")
        raise NotAcceptable(
            f"none of {header!r} can be produced; use application/json or application/ld+json",
            field="Accept",
        )
    return best


def json_response(
    data: Any,
    request: Request,
    ctx: Context,
    media: str = JSON,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    """A JSON(-LD) response: the context in a Link header, or in the body for ld+json."""
    out_headers = dict(headers or {})
    if media == LD_JSON:
        out_ctx = ctx.output_context()
        if isinstance(data, list):
            data = [{**d, "@context": out_ctx} if isinstance(d, dict) else d for d in data]
        elif isinstance(data, dict):
            data = {**data, "@context": out_ctx}
    else:
        ctx_link = link_header(ctx.link_url)
        page_links = out_headers.get("Link")
        out_headers["Link"] = f"{ctx_link}, {page_links}" if page_links else ctx_link
    tenant = request.headers.get("ngsild-tenant")
    if tenant is not None:
        out_headers["NGSILD-Tenant"] = tenant
    return Response(orjson.dumps(data), status_code=status, media_type=media, headers=out_headers)


def empty_response(
    request: Request, status: int = 204, headers: dict[str, str] | None = None
) -> Response:
    out = dict(headers or {})
    tenant = request.headers.get("ngsild-tenant")
    if tenant is not None:
        out["NGSILD-Tenant"] = tenant
    return Response(status_code=status, headers=out)
