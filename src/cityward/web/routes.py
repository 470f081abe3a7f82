"""HTTP routes of the dashboard: the page at ``/``, its files under ``/ui/``, and
``GET /dashboard/v1/events``, the live stream (SSE).

The page and its files are public: they hold no data. The page asks for a token and reads
everything through the API with it, so what an operator sees and does is exactly what the
token allows, and every write is audited like any API write. A visitor without a token sees
the login and the public register.

The stream needs ``data:read`` (an operator's or analyst's token) and carries only the entities
of the tenant it asked for (``NGSILD-Tenant``, as in the NGSI-LD API; the default tenant without
it) and of the data sources the token's purposes may read. Every connection is audited as a
read (the policy's ``stream`` audit class), since what it will carry is not known when it opens.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from cityward.api.ngsi import runtime, tenant_of
from cityward.bank.errors import BadRequestData, ResourceNotFound
from cityward.config import Settings
from cityward.governance.middleware import principal_of
from cityward.web.assets import Asset, asset, with_config
from cityward.web.live import LiveHub

router = APIRouter()
MAX_TYPES = 50
CONFIG_MARK = b"__CITYWARD_CONFIG__"


def _serve(request: Request, item: Asset) -> Response:
    """One file, gzipped when the client takes it, 304 when its ETag still matches."""
    cache = f"public, max-age={item.max_age}" if item.max_age else "no-cache"
    headers = {"ETag": item.etag, "Cache-Control": cache, "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == item.etag:
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return Response(item.gzipped, media_type=item.media_type, headers=headers)
    return Response(item.body, media_type=item.media_type, headers=headers)


def _page_config(settings: Settings) -> bytes:
    config = {
        "tiles": settings.dashboard_tiles,
        "attribution": settings.dashboard_tiles_attribution,
        "site": settings.governance.site_name,
        # the page reads the city in pages of this size at most: a larger one is refused
        "maxLimit": settings.max_limit,
    }
    # inside a <script> element: no "</" may appear
    return orjson.dumps(config).replace(b"<", b"\\u003c")


# HEAD as GET (the policy allows both on the public files; uvicorn sends no body for HEAD)
@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def dashboard(request: Request) -> Response:
    """The operations room (HTML; it logs in with a token and reads the API with it)."""
    state = request.app.state
    page: Asset | None = getattr(state, "dashboard_page", None)
    if page is None:  # the app's settings do not change: the page is made once
        template = asset("index.html")
        assert template is not None
        page = with_config(template, CONFIG_MARK, _page_config(state.settings))
        state.dashboard_page = page
    return _serve(request, page)


@router.api_route("/ui/{name}", methods=["GET", "HEAD"], include_in_schema=False)
async def ui_file(request: Request, name: str) -> Response:
    item = asset(name)
    if item is None:
        raise ResourceNotFound(f"no dashboard file {name!r}")
    return _serve(request, item)


# not in the OpenAPI description: an endless event stream is not a request/response operation
# (and generic clients that walk the description, schemathesis among them, would never return)
@router.get("/dashboard/v1/events", include_in_schema=False)
async def events(request: Request, type: str | None = None) -> StreamingResponse:
    """Server-sent events: ``hello``, then ``entity`` / ``delete`` per change and ``stats``."""
    hub: LiveHub = request.app.state.live
    types: frozenset[str] | None = None
    if type is not None:
        names = [t.strip() for t in type.split(",") if t.strip()]
        if not names or len(names) > MAX_TYPES:
            raise BadRequestData(
                f"type: 1 to {MAX_TYPES} comma-separated entity types", field="type"
            )
        types = frozenset(names)
    tenant = tenant_of(request)
    # as every NGSI-LD read: an unknown tenant is a 404, not a stream that stays silent
    runtime(request).bank.check_tenant(tenant)
    principal = principal_of(request.scope.get("state", {}))
    return StreamingResponse(
        # the stream ends when the token expires: a token's short life is the only control
        hub.stream(tenant, frozenset(principal.purposes), types, expires=principal.expires),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
