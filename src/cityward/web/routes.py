"""HTTP routes of the dashboard: ``GET /dashboard/v1/events``, the live stream (SSE).

The stream needs ``data:read`` (an operator's or analyst's token) and carries only the entities
of the data sources the token's purposes may read. Every connection is audited as a read (the
policy's ``stream`` audit class), since what it will carry is not known when it opens.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from cityward.bank.errors import BadRequestData
from cityward.governance.middleware import principal_of
from cityward.web.live import LiveHub

router = APIRouter()
MAX_TYPES = 50


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
    principal = principal_of(request.scope.get("state", {}))
    return StreamingResponse(
        hub.stream(frozenset(principal.purposes), types),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
