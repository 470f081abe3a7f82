"""The cityward HTTP application: the NGSI-LD API under /ngsi-ld/v1."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cityward.api.ngsi import Runtime
from cityward.api.routes import (
    batch,
    contexts,
    discovery,
    entities,
    temporal,
)
from cityward.api.routes import (
    subscriptions as subscription_routes,
)
from cityward.bank.contexts import ContextRegistry
from cityward.bank.errors import InternalError, NgsiError
from cityward.bank.history import History
from cityward.bank.jsonld import ContextResolver
from cityward.bank.service import Bank
from cityward.bank.store import Store, open_store
from cityward.bank.subscriptions.service import Subscriptions
from cityward.config import Settings

log = logging.getLogger("cityward.api")
NGSI_PREFIX = "/ngsi-ld/v1"


def problem_response(exc: NgsiError, request: Request) -> Response:
    headers: dict[str, str] = {}
    tenant = request.headers.get("ngsild-tenant")
    if tenant is not None:
        headers["NGSILD-Tenant"] = tenant
    body = exc.problem()
    if exc.status in (405, 406, 411, 413, 415):
        body["type"] = "about:blank"
    if exc.status == 405:
        headers["Allow"] = ", ".join(sorted(_allowed_methods(request)))
    return Response(
        orjson.dumps(body),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _allowed_methods(request: Request) -> set[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match.name != "NONE" and getattr(route, "methods", None):
            methods.update(route.methods)
    return methods or {"GET"}


def create_app(settings: Settings, store: Store | None = None) -> FastAPI:
    """The FastAPI app over a store (opened from ``settings`` when not given)."""
    store = store or open_store(settings.database_url, settings.data_dir)
    resolver = ContextResolver(
        preload=settings.contexts,
        fetch_timeout=settings.context_timeout_s,
        allow_fetch=settings.context_fetch,
    )

    bank = Bank(store, default_limit=settings.default_limit, max_limit=settings.max_limit)
    history = History(store, bank)
    subscriptions = Subscriptions(store, bank, resolver)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await subscriptions.start()
        try:
            yield
        finally:
            await subscriptions.stop()
            store.close()

    app = FastAPI(
        title="cityward", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )
    app.state.runtime = Runtime(bank=bank, contexts=resolver, max_body=settings.max_body_bytes)
    app.state.subscriptions = subscriptions
    app.state.history = history
    app.state.context_registry = ContextRegistry(store, resolver)
    for module in (entities, batch, discovery, contexts, subscription_routes, temporal):
        app.include_router(module.router, prefix=NGSI_PREFIX)

    @app.exception_handler(NgsiError)
    async def _ngsi_error(request: Request, exc: NgsiError) -> Response:
        return problem_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        from cityward.bank.errors import BadRequestData

        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return problem_response(BadRequestData(str(first.get("msg", exc)), field=field), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        from cityward.bank import errors

        if exc.status_code == 405:
            err: NgsiError = errors.MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}"
            )
        elif exc.status_code == 404:
            err = errors.ResourceNotFound(f"no such resource: {request.url.path}")
        else:
            err = errors.InvalidRequest(str(exc.detail))
            err.status = exc.status_code
        return problem_response(err, request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem_response(InternalError(f"internal error: {exc.__class__.__name__}"), request)

    return app


def app_from_env() -> FastAPI:
    """The app of one `cityward serve --workers N` process, from the settings it was handed."""
    import os

    from cityward.config import SETTINGS_ENV

    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    return create_app(settings)
