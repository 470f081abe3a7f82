"""The ASGI middleware in front of every route: authenticate, authorize, audit.

A plain ASGI class rather than Starlette's BaseHTTPMiddleware: that one runs the app in a
separate task and copies every response body through a stream, which costs far more than the
checks themselves.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import unquote

import anyio.to_thread
import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cityward.bank.access import current_access
from cityward.bank.errors import Forbidden, NgsiError, Unauthorized
from cityward.governance.events import Action, AuditRecord
from cityward.governance.identity import (
    ANONYMOUS,
    API_KEY_PREFIX,
    DEVELOPER,
    AuthError,
    Principal,
)
from cityward.governance.policy import Route, allowed, route_for
from cityward.governance.runtime import Governance, RequestTrail

log = logging.getLogger("cityward.governance")

NO_AUTH_HEADER = (b"x-cityward-auth", b"DISABLED: development mode, every request is admin")
_ENTITY_IN_PATH = re.compile(r"/(?:entities|subscriptions|jsonldContexts)/([^/]+)")
_AUDITED_ALWAYS = {"write", "export"}
AUDIT_WAIT_S = 10.0


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


class GovernanceMiddleware:
    def __init__(self, app: ASGIApp, governance: Governance) -> None:
        self.app = app
        self.gov = governance

    async def authenticate(self, scope: Scope) -> Principal:
        """The request's principal. A check that may wait on I/O (a device key not cached, a
        JWKS fetch) runs on a worker thread: on the event loop it held up every request."""
        if self.gov.no_auth:
            return DEVELOPER
        auth = _header(scope, b"authorization")
        api_key = _header(scope, b"x-api-key")
        if auth is None and api_key is None:
            return ANONYMOUS
        ids = self.gov.identities
        if api_key is not None:
            credential, is_key = api_key.strip(), True
        else:
            assert auth is not None
            scheme, _, credential = auth.strip().partition(" ")
            credential = credential.strip()
            if not credential or scheme.lower() not in ("bearer", "apikey"):
                raise AuthError("the Authorization header must be 'Bearer <token>'")
            is_key = scheme.lower() == "apikey" or credential.startswith(API_KEY_PREFIX)
        verify = ids.verify_api_key if is_key else ids.verify_bearer
        if ids.may_block(credential, api_key=is_key):
            return await anyio.to_thread.run_sync(verify, credential)
        return verify(credential)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        path: str = scope["path"]
        route = route_for(method, path)
        try:
            principal = await self.authenticate(scope)
        except AuthError as exc:
            await self._refuse(
                scope, send, route, ANONYMOUS, Unauthorized(str(exc), field="Authorization")
            )
            return
        if not allowed(principal.role, route.permission):
            if principal is ANONYMOUS:
                err: NgsiError = Unauthorized(
                    f"{method} {path} needs a bearer token (permission {route.permission.value})",
                    field="Authorization",
                )
            else:
                err = Forbidden(
                    f"role {principal.role.value!r} lacks the permission "
                    f"{route.permission.value!r} that {method} {path} needs",
                    field="Authorization",
                    missing=route.permission.value,
                )
            await self._refuse(scope, send, route, principal, err)
            return

        trail = RequestTrail()
        scope.setdefault("state", {})["principal"] = principal
        reset = current_access.set(self.gov.access_for(principal, trail))
        no_auth = self.gov.no_auth

        async def send_audited(message: Message) -> None:
            if message["type"] == "http.response.start":
                if no_auth:
                    message["headers"] = [*message.get("headers", []), NO_AUTH_HEADER]
                rec = self._record_for(scope, route, principal, trail, int(message["status"]))
                if rec is not None:
                    await self._audit(rec)
            await send(message)

        try:
            await self.app(scope, receive, send_audited)
        finally:
            current_access.reset(reset)

    def _record_for(
        self, scope: Scope, route: Route, principal: Principal, trail: RequestTrail, status: int
    ) -> AuditRecord | None:
        method = scope["method"]
        if status in (401, 403):
            action = Action.DENIED
        elif route.audit in _AUDITED_ALWAYS:
            action = Action.WRITE if route.audit == "write" else Action.EXPORT
        elif route.audit == "config" and method not in ("GET", "HEAD"):
            action = Action.CONFIG
        elif route.audit == "stream" or (
            route.audit == "read" and (trail.sensitive or route.permission.value == "audit:read")
        ):
            # a stream is audited when it opens: what it will carry is not known yet
            action = Action.READ
        else:
            return None
        ids = trail.entity_ids
        if not ids and not trail.denied:
            m = _ENTITY_IN_PATH.search(scope["path"])
            if m is not None:
                ids = [unquote(m.group(1))]
        if trail.denied:  # found by a search for the entity; told apart in ``extra``
            ids = [*ids, *(d for d in trail.denied if d not in ids)]
        return AuditRecord(
            action=action,
            actor=principal.subject,
            role=principal.role.value,
            purposes=tuple(sorted(principal.purposes)),
            method=method,
            path=scope["path"]
            + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else ""),
            entity_ids=tuple(ids),
            count=trail.count,
            result=status,
            extra={"denied": list(trail.denied)} if trail.denied else {},
        )

    async def _audit(self, rec: AuditRecord) -> None:
        """Append a record; the answer leaves once it is committed (shared group commits).

        If the audit database stays unreachable the record stays queued (the log retries it)
        and the answer goes out after AUDIT_WAIT_S rather than hanging the client.
        """
        audit = self.gov.audit
        if audit is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(audit.record(rec)), AUDIT_WAIT_S)
        except TimeoutError:
            log.error(
                "audit record not committed after %.0f s; still queued: %s", AUDIT_WAIT_S, rec
            )

    async def _refuse(
        self, scope: Scope, send: Send, route: Route, principal: Principal, err: NgsiError
    ) -> None:
        body = orjson.dumps(err.problem())
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if err.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="cityward"'))
        rec = self._record_for(scope, route, principal, RequestTrail(), err.status)
        if rec is not None:
            rec.detail = err.detail
            await self._audit(rec)
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def principal_of(scope_state: dict[str, Any]) -> Principal:
    p = scope_state.get("principal")
    return p if isinstance(p, Principal) else ANONYMOUS
