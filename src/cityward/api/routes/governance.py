"""cityward's own endpoints: the public register, who am I, the audit trail, identities."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from cityward.api.params import parse_int
from cityward.bank.errors import BadRequestData, ResourceNotFound, ServiceUnavailable
from cityward.bank.model import now_iso
from cityward.governance.audit import norm_bound
from cityward.governance.middleware import principal_of
from cityward.governance.policy import MATRIX, ROLE_HELP, Role, matrix_markdown
from cityward.governance.runtime import Governance

router = APIRouter()
API = "/cityward/v1"


def _gov(request: Request) -> Governance:
    gov = request.app.state.governance
    assert isinstance(gov, Governance)
    return gov


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


async def _register(request: Request) -> dict[str, Any]:
    from cityward.governance.register import build_register, collect_entities

    gov = _gov(request)
    store = request.app.state.runtime.bank.store
    devices = await run_in_threadpool(collect_entities, store, gov.catalog)
    return build_register(
        gov.catalog,
        devices,
        site_name=gov.gov.site_name,
        site_contact=gov.gov.site_contact,
        generated_at=now_iso(),
    )


# HEAD as GET on the public pages, as the policy allows (it was a 405); left out of the
# OpenAPI schema, where it would repeat the GET's operation id
@router.get("/register", response_class=HTMLResponse, include_in_schema=True)
@router.head("/register", response_class=HTMLResponse, include_in_schema=False)
async def register_page(request: Request) -> Response:
    """The public register of sensors and cameras (HTML, no token needed)."""
    from cityward.governance.register import render_html

    if "application/json" in request.headers.get("accept", "") and "text/html" not in (
        request.headers.get("accept", "")
    ):
        return _json(await _register(request))
    return HTMLResponse(render_html(await _register(request)))


@router.get("/register.json")
@router.head("/register.json", include_in_schema=False)
async def register_json(request: Request) -> Response:
    """The public register as JSON (no token needed)."""
    return _json(await _register(request))


@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> Response:
    return _json({"status": "ok"})


@router.get(API + "/whoami")
async def whoami(request: Request) -> Response:
    """The caller's identity, role, purposes and permissions."""
    p = principal_of(request.scope.get("state", {}))
    return _json(
        {
            "subject": p.subject,
            "role": p.role.value,
            "purposes": sorted(p.purposes),
            "kind": p.kind,
            "permissions": sorted(x.value for x in MATRIX[p.role]),
        }
    )


@router.get(API + "/policy")
async def policy(request: Request) -> Response:
    """Roles, the permission matrix and the declared data sources."""
    gov = _gov(request)
    return _json(
        {
            "roles": {r.value: ROLE_HELP[r] for r in Role},
            "matrix": {r.value: sorted(x.value for x in MATRIX[r]) for r in Role},
            "matrixMarkdown": matrix_markdown(),
            "sources": [s.model_dump(mode="json") for s in gov.catalog.all_sources()],
        }
    )


@router.get(API + "/dpia")
async def dpia(request: Request) -> Response:
    """The data-protection impact assessment draft, as Markdown."""
    from cityward.governance.dpia import dpia_markdown

    gov = _gov(request)
    text = dpia_markdown(
        gov.catalog,
        site_name=gov.gov.site_name,
        generated_at=now_iso(),
        backend=request.app.state.runtime.bank.store.dialect,
        retention_interval_s=gov.gov.retention_interval_s,
    )
    return Response(text, media_type="text/markdown; charset=utf-8")


_AUDIT_PARAMS = {"since", "until", "actor", "action", "entity", "after", "limit"}


@router.get(API + "/audit")
async def audit_query(request: Request) -> Response:
    """Audit records (auditor, admin), oldest first; page with ``after`` = the last seq seen."""
    gov = _gov(request)
    if gov.audit is None:
        raise ServiceUnavailable("the audit trail is disabled", field="audit")
    params = request.query_params
    for key in params:
        if key not in _AUDIT_PARAMS:
            raise BadRequestData(f"unknown query parameter {key!r}", field=key)
    # bounded like every page parameter: a seq past 2**63 cannot be bound on either store
    after = parse_int(params.get("after"), "after", 0)
    limit = parse_int(params.get("limit"), "limit", 100)
    if not 1 <= limit <= 1000:
        raise BadRequestData("limit must be between 1 and 1000", field="limit")
    for name in ("since", "until"):
        try:
            norm_bound(params.get(name))
        except ValueError as exc:
            raise BadRequestData(f"{name}: {exc}", field=name) from exc
    audit = gov.audit
    rows = await run_in_threadpool(
        lambda: audit.query(
            since=params.get("since"),
            until=params.get("until"),
            actor=params.get("actor"),
            action=params.get("action"),
            entity=params.get("entity"),
            after_seq=after,
            limit=limit,
        )
    )
    return _json(rows)


@router.get(API + "/audit/verify")
async def audit_verify(request: Request) -> Response:
    """Check the whole chain and its seals (auditor, admin)."""
    gov = _gov(request)
    if gov.audit is None:
        raise ServiceUnavailable("the audit trail is disabled", field="audit")
    audit = gov.audit
    await run_in_threadpool(audit.flush)
    result = await run_in_threadpool(audit.verify)
    return _json(
        {
            "ok": result.ok,
            "records": result.records,
            "seals": result.seals,
            "firstBadSeq": result.first_bad_seq,
            "reason": result.reason,
        }
    )


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequestData(f"request body is not valid JSON: {exc}", field="body") from exc
    if not isinstance(body, dict):
        raise BadRequestData("the body must be a JSON object", field="body")
    return body


def _strings(body: dict[str, Any], key: str, required: bool = True) -> list[str]:
    value = body.get(key, None if required else [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequestData(f"{key} must be a list of strings", field=key)
    if required and not value:
        raise BadRequestData(f"{key} must not be empty", field=key)
    return value


@router.post(API + "/tokens")
async def create_token(request: Request) -> Response:
    """Issue a local bearer token (admin): {"role", "purposes", "subject"?, "ttlDays"?}."""
    gov = _gov(request)
    body = await _body(request)
    try:
        role = Role(str(body.get("role")))
    except ValueError as exc:
        raise BadRequestData(
            f"role must be one of {', '.join(r.value for r in Role)}", field="role"
        ) from exc
    if role in (Role.DEVICE, Role.PUBLIC):
        raise BadRequestData("devices get device keys; the public needs no token", field="role")
    purposes = _strings(body, "purposes", required=role is not Role.AUDITOR)
    ttl = body.get("ttlDays", gov.gov.token_ttl_days)
    if not isinstance(ttl, int | float) or not 0 < ttl <= 3650:
        raise BadRequestData("ttlDays must be a number between 0 and 3650", field="ttlDays")
    subject = body.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise BadRequestData("subject must be a string", field="subject")
    try:
        token = gov.identities.issue(role, purposes, subject=subject, ttl_s=ttl * 86400)
    except ValueError as exc:
        raise BadRequestData(str(exc), field="purposes") from exc
    return _json({"token": token, "role": role.value, "purposes": sorted(purposes)}, 201)


@router.post(API + "/device-keys")
async def create_device_key(request: Request) -> Response:
    """A device key (admin): {"device", "entityIdPatterns", "purposes"?}; shown once."""
    gov = _gov(request)
    body = await _body(request)
    device = body.get("device")
    if not isinstance(device, str) or not device:
        raise BadRequestData("device must be a non-empty string", field="device")
    patterns = _strings(body, "entityIdPatterns")
    purposes = _strings(body, "purposes", required=False)
    from cityward.governance.sources import check_purpose

    for p in purposes:  # named as its own field (it was reported as entityIdPatterns)
        try:
            check_purpose(p)
        except ValueError as exc:
            raise BadRequestData(str(exc), field="purposes") from exc
    try:
        key_id, key = await run_in_threadpool(
            gov.identities.create_device_key, device, patterns, purposes
        )
    except Exception as exc:  # a bad regex
        raise BadRequestData(str(exc), field="entityIdPatterns") from exc
    return _json({"keyId": key_id, "key": key, "device": device}, 201)


@router.get(API + "/device-keys")
async def list_device_keys(request: Request) -> Response:
    return _json(await run_in_threadpool(_gov(request).identities.list_device_keys))


@router.delete(API + "/device-keys/{key_id}")
async def revoke_device_key(request: Request, key_id: str) -> Response:
    if not await run_in_threadpool(_gov(request).identities.revoke_device_key, key_id):
        raise ResourceNotFound(f"no active device key {key_id!r}", field="keyId")
    return Response(status_code=204)
