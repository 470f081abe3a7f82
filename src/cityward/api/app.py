"""The cityward HTTP application: the NGSI-LD API under /ngsi-ld/v1."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cityward.anomaly.service import AnomalyService
from cityward.api.ngsi import Runtime
from cityward.api.rawpath import RawPathMiddleware
from cityward.api.routes import (
    batch,
    contexts,
    discovery,
    entities,
    temporal,
)
from cityward.api.routes import governance as governance_routes
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
from cityward.governance.events import Action, AuditRecord
from cityward.governance.middleware import GovernanceMiddleware
from cityward.governance.retention import Retention
from cityward.governance.runtime import Governance, open_audit
from cityward.ingest import routes as ingest_routes
from cityward.ingest.deadletter import DeadLetters
from cityward.ingest.worker import IngestWorker
from cityward.web import routes as web_routes
from cityward.web.live import LiveHub

if TYPE_CHECKING:
    from cityward.bus.feed import ChangeBus

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


def create_app(
    settings: Settings, store: Store | None = None, *, single_process: bool = True
) -> FastAPI:
    """The FastAPI app over a store (opened from ``settings`` when not given).

    ``single_process``: False in the processes of ``cityward serve --workers N``; each of
    them sees only its own writes on the in-process change feed, so none runs the anomaly
    service.
    """
    store = store or open_store(
        settings.database_url,
        settings.data_dir,
        connect_timeout_s=settings.database_connect_timeout_s,
    )
    resolver = settings.context_resolver()

    bank = Bank(store, default_limit=settings.default_limit, max_limit=settings.max_limit)
    history = History(store, bank)
    subscriptions = Subscriptions(store, bank, resolver)
    gov_settings = settings.governance
    if not gov_settings.audit and not settings.no_auth:
        raise ValueError("governance.audit = false is only allowed together with no_auth")
    governance = Governance(
        settings, store, resolver, open_audit(settings, store) if gov_settings.audit else None
    )
    subscriptions.hook.visible = governance.subscription_visible
    if not settings.no_auth:
        created = governance.identities.bootstrap_admin()
        if created is not None:
            log.warning("first start: an admin token was written to %s (mode 0600)", created)
    else:
        log.warning(
            "AUTHENTICATION IS DISABLED (--no-auth): every request is treated as admin; "
            "development only"
        )

    # [bus] kind = "nats": every process sees every committed change (docs/bus.md). The
    # outbox hook and the relay carry this process's writes to JetStream; an ordered
    # consumer feeds bank.feed (live hub, notification wake-ups) with every node's changes.
    bus: ChangeBus | None = None
    anomaly_bank = bank
    if settings.bus.kind == "nats":
        from cityward.bus.feed import ChangeBus

        bus = ChangeBus(settings.bus, store, bank, name=f"cityward-{os.getpid()}")
        bus.follow(bank.feed)

    anomaly: AnomalyService | None = None
    if settings.anomaly.enabled and not single_process:
        log.error(
            "the anomaly service does not run with --workers > 1: each worker process sees only "
            "its own writes on the change feed; serve with one worker to raise alerts"
        )
    elif settings.anomaly.enabled:
        if bus is not None:
            # the anomaly service follows the durable consumer instead: a restart (or the
            # node that takes over) goes on from the last change it handled. Its own bank
            # object shares the store and the write hooks (and what runs before a write:
            # history's month partitions); only its feed differs.
            anomaly_bank = Bank(
                store, default_limit=settings.default_limit, max_limit=settings.max_limit
            )
            anomaly_bank.hooks = bank.hooks
            anomaly_bank.before_write = bank.before_write
            anomaly_bank.publish_local = False
        # built here, so that a configuration it cannot run with stops the start at once
        anomaly = AnomalyService(
            anomaly_bank, settings.anomaly, governance=governance, context=resolver.core
        )
        if bus is not None:
            # a batch is acknowledged once the service has handled it, not when it is queued
            bus.follow(
                anomaly_bank.feed, durable=settings.bus.anomaly_durable, settle=anomaly.wait_idle
            )

    live = LiveHub(bank.feed, governance.catalog, resolver.core)
    ingest = _ingest_worker(settings, bank, resolver) if settings.ingest.enabled else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        governance.record_start()
        live.start()
        # a stop signal ends the dashboards' live streams first: the server waits for open
        # responses before this lifespan ends, and a stream never ends by itself (every stop
        # waited the whole graceful timeout, then cancelled it with an error)
        restore_signals = live.close_streams_on_stop()
        await subscriptions.start()
        if anomaly is not None:
            # reads back the open alerts first: a thread, not the event loop
            await asyncio.to_thread(anomaly.start)
        if bus is not None:
            # after the followers' listeners subscribed: a durable follower acknowledges
            # what it hands on, so nothing may reach it before its listener is there
            await asyncio.to_thread(bus.start)
        retention = Retention(
            store, governance.catalog, governance.audit, batch=gov_settings.retention_batch
        )
        governance.retention = retention
        if gov_settings.retention_enabled:
            # the first run waits a little: a start is busy enough (migrations, caches)
            retention.start(gov_settings.retention_interval_s, first_delay_s=30.0)
        if ingest is not None:
            ingest.start()
        try:
            yield
        finally:
            if ingest is not None:
                # adapters first: what they received is written before the bank closes
                await asyncio.to_thread(ingest.stop)
                ingest.dead_letters.close()
            await live.stop()
            restore_signals()
            if bus is not None:
                await asyncio.to_thread(bus.stop_followers)
            if anomaly is not None:
                await asyncio.to_thread(anomaly.stop)
            if bus is not None:
                await asyncio.to_thread(bus.stop)  # publishes what is left in the outbox once
            retention.stop()
            await subscriptions.stop()
            if governance.audit is not None:
                governance.audit.record_nowait(
                    AuditRecord(
                        action=Action.SYSTEM, actor="cityward", detail="API process stopped"
                    )
                )
                governance.audit.close()
            store.close()

    app = FastAPI(
        title="cityward", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan
    )
    app.state.runtime = Runtime(bank=bank, contexts=resolver, max_body=settings.max_body_bytes)
    app.state.subscriptions = subscriptions
    app.state.history = history
    app.state.context_registry = ContextRegistry(store, resolver)
    app.state.governance = governance
    app.state.anomaly = anomaly
    app.state.live = live
    app.state.ingest = ingest
    app.state.bus = bus
    app.state.settings = settings
    for module in (entities, batch, discovery, contexts, subscription_routes, temporal):
        app.include_router(module.router, prefix=NGSI_PREFIX)
    app.include_router(governance_routes.router)
    app.include_router(web_routes.router)
    app.include_router(ingest_routes.router)
    app.add_middleware(GovernanceMiddleware, governance=governance)
    # added last, so outermost: every later layer sees the path the routes match (rawpath.py)
    app.add_middleware(RawPathMiddleware)

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


def _ingest_worker(settings: Settings, bank: Bank, resolver: ContextResolver) -> IngestWorker:
    """The ``[ingest]`` sources inside this process, writing through its bank (with ``[bus]
    kind = "nats"`` through the ingest stream: this process is a front and a writer)."""
    dead = DeadLetters(
        settings.data_dir / "ingest" / "deadletter.db",
        max_payload=settings.ingest.deadletter_max_payload,
    )
    return IngestWorker(
        bank,
        settings.ingest,
        dead,
        context=resolver.core,
        bus=settings.bus,
        name=f"cityward-ingest-{os.getpid()}",
        front_process=settings.ingest.front_process,
    )


def app_from_env() -> FastAPI:
    """The app of one `cityward serve --workers N` process, from the settings it was handed."""
    import os

    from cityward.config import SETTINGS_ENV

    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    return create_app(settings, single_process=False)
