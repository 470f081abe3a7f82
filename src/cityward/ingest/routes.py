"""``POST /ingest/{source}``: devices push their own payloads (the ``http`` adapter's route).

The body is one JSON object, a JSON array of them, or JSON lines. Each message goes through
the source's mapping and the batching writer like an MQTT message; the answer waits until
every message of the push is settled, so a 2xx means its readings are in the bank:

- 200 ``{"accepted": n}`` when all were taken (repeats of earlier pushes included);
- 207 with ``errors`` (index, field, reason) when some were refused: the others are written;
- 400 problem+json when none was usable; 404 for an unknown source; 503 when the writer could
  not take the push in time (the device retries; the delivery keys make that safe).

A device key may only write the entities its patterns allow (the governance layer's write
check, as for any NGSI-LD write); a refused message is a dead letter like a malformed one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from cityward.bank.access import current_access
from cityward.bank.errors import BadRequestData, ResourceNotFound, ServiceUnavailable
from cityward.governance.middleware import principal_of
from cityward.governance.policy import Role

if TYPE_CHECKING:
    from cityward.ingest.worker import IngestWorker

router = APIRouter()


def _messages(body: bytes) -> list[tuple[bytes, Any]]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        # JSON lines, or one malformed message: each undecodable one becomes a dead letter
        lines = [line for line in body.splitlines() if line.strip()] or [body]
        out: list[tuple[bytes, Any]] = []
        for line in lines:
            try:
                out.append((line, orjson.loads(line)))
            except orjson.JSONDecodeError:
                out.append((line, None))  # the intake makes it a dead letter with the reason
        return out
    if isinstance(doc, list):
        return [(orjson.dumps(d), d) for d in doc]
    return [(body, doc)]


@router.post("/ingest/{source}", include_in_schema=True, tags=["ingest"])
async def push(source: str, request: Request) -> Response:
    worker: IngestWorker | None = request.app.state.ingest
    intake = worker.intakes.get(source) if worker is not None else None
    adapter = worker.adapters.get(source) if worker is not None else None
    if worker is None or intake is None or adapter is None or adapter.name != "http":
        raise ResourceNotFound(f"no HTTP ingest source named {source!r}", field="source")
    config = adapter.config
    tenant = request.headers.get("ngsild-tenant")
    if tenant is not None and tenant != worker.writer.tenant:
        # the source writes into [ingest] tenant: a header naming another tenant was ignored,
        # and the readings landed where the device did not ask
        raise BadRequestData(
            f"source {source!r} writes into tenant {worker.writer.tenant or '(the default)'!r}; "
            "send no NGSILD-Tenant header, or that one",
            field="NGSILD-Tenant",
        )
    principal = principal_of(request.scope.get("state", {}))
    if getattr(config, "device_key", True) and principal.role not in (Role.DEVICE, Role.ADMIN):
        raise BadRequestData(
            f"source {source!r} takes pushes from devices: send a device key in X-API-Key",
            field="X-API-Key",
        )
    body = await request.body()
    max_body = request.app.state.settings.max_body_bytes
    if len(body) > max_body:
        raise BadRequestData(f"the push is larger than {max_body} bytes", field="body")
    messages = _messages(body)
    if not messages:  # a JSON array with nothing in it (it was a 500)
        raise BadRequestData("the push holds no message", field="$")
    limit = int(getattr(config, "max_messages", 1000))
    if len(messages) > limit:
        raise BadRequestData(f"{len(messages)} messages in one push; at most {limit}", field="$")
    loop = asyncio.get_running_loop()
    results: list[asyncio.Future[str | None]] = [loop.create_future() for _ in messages]
    access = current_access.get()
    check = access.write if access is not None else None

    def settle(fut: asyncio.Future[str | None]) -> Any:
        def resolve(why: str | None) -> None:
            if not fut.done():
                fut.set_result(why)

        def done(why: str | None) -> None:
            loop.call_soon_threadsafe(resolve, why)

        return done

    def hand_over() -> None:
        for (raw, doc), fut in zip(messages, results, strict=True):
            intake.receive(
                raw,
                topic=f"ingest/{source}",
                done=settle(fut),
                decoded=doc,
                check=check,
                timeout=float(getattr(config, "timeout_s", 30)),
            )

    timeout = float(getattr(config, "timeout_s", 30))
    try:
        # a thread: the writer may make it wait (backpressure), and the access check of the
        # request (a context variable) goes with it
        await asyncio.to_thread(hand_over)
        reasons = await asyncio.wait_for(asyncio.gather(*results), timeout)
    except TimeoutError:
        raise ServiceUnavailable(
            "the ingest writer did not take the push in time; retry later", field="source"
        ) from None
    errors = []
    for n, why in enumerate(reasons):
        if why is not None:
            field, _, reason = why.partition(": ")
            errors.append({"index": n, "field": field, "reason": reason})
    accepted = len(messages) - len(errors)
    if not accepted:
        first = errors[0]
        raise _AllRefused(
            f"no message of the push was usable; the first: {first['field']}: {first['reason']}",
            errors,
        )
    body_out: dict[str, Any] = {"accepted": accepted}
    if errors:
        body_out["errors"] = errors
    return Response(
        orjson.dumps(body_out), status_code=207 if errors else 200, media_type="application/json"
    )


class _AllRefused(BadRequestData):
    def __init__(self, detail: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(detail, field=str(errors[0]["field"]) or "$")
        self.errors = errors

    def problem(self) -> dict[str, Any]:
        body = super().problem()
        body["errors"] = self.errors
        return body
