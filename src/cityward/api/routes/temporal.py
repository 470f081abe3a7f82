"""/ngsi-ld/v1/temporal: attribute history of entities, as instances, values or aggregates.

The history lives in the data bank itself (``attr_history``, see cityward.bank.temporal): every
write records the attribute instances it created or changed, stamped with their observedAt or,
without one, the time the bank received them. Entity selection (type, id, q, geo, paging)
works on the entities' current state, as in the entity query; ``attrs`` on the history (an
instance of one of them in the time window); the time window, ``lastN`` and aggregation work
on the history, in SQL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

import cityward.api.rawpath  # noqa: F401  (registers the escaped_* path convertors used below)
from cityward.api.ngsi import (
    Runtime,
    body_context_async,
    check_params,
    empty_response,
    header_context,
    json_response,
    negotiate,
    read_json,
    resolve_context,
    runtime,
    tenant_of,
)
from cityward.api.params import (
    attr_iris,
    compile_filter,
    filter_from_body,
    filter_from_params,
    paging,
    query_store,
)
from cityward.api.routes.entities import QUERY_PARAMS, page_headers
from cityward.bank.errors import (
    BadRequestData,
    OperationNotSupported,
    ResourceNotFound,
)
from cityward.bank.history import History, settle, settle_txn
from cityward.bank.jsonld import Context
from cityward.bank.model import PAYLOAD, EntityParser, check_uri, now_iso
from cityward.bank.query.indexer import normalize_timestamp, path_id
from cityward.bank.query.sqlgen import Conjunct
from cityward.bank.render import View, render_instance
from cityward.bank.service import new_document, strip_flags
from cityward.bank.store import QuerySpec, Store
from cityward.bank.temporal import (
    AggregateBucket,
    HistoryInstance,
    TemporalQuery,
    aggregates,
    decode_instances,
    instance_row,
    instances_sql,
    parse_temporal_query,
)
from cityward.bank.temporal.sql import Dialect, kinds_sql, recorded_attrs_sql
from cityward.bank.temporal.times import LAST_US, iso_to_us, us_to_iso

router = APIRouter()
_T = TypeVar("_T")

TEMPORAL_PARAMS = (
    "timerel",
    "timeAt",
    "endTimeAt",
    "timeproperty",
    "lastN",
    "aggrMethods",
    "aggrPeriodDuration",
)
# instances returned per attribute at most; more makes the answer a 206 Partial Content
INSTANCE_LIMIT = 1000
Shape = Literal["normalized", "temporalValues", "aggregatedValues"]

# the member holding [value, time] pairs in the temporalValues form, per attribute kind
_LIST_MEMBER = {
    "Property": "values",
    "GeoProperty": "values",
    "Relationship": "objects",
    "LanguageProperty": "languageMaps",
    "ListProperty": "valueLists",
    "ListRelationship": "objectLists",
    "JsonProperty": "jsons",
    "VocabProperty": "vocabs",
}
_WRAPPED = {"LanguageProperty", "JsonProperty", "VocabProperty"}


def _shape(params: Mapping[str, str]) -> tuple[Shape, bool, dict[str, str]]:
    """The temporal representation, sysAttrs, and the params left for the entity view."""
    shape: Shape = "normalized"
    rest = dict(params)
    opts = [o.strip() for o in params.get("options", "").split(",") if o.strip()]
    fmt = params.get("format")
    for name in (*opts, fmt):
        if name in ("temporalValues", "aggregatedValues"):
            if shape != "normalized" and shape != name:
                raise BadRequestData(
                    "temporalValues and aggregatedValues exclude each other", field="options"
                )
            shape = name  # type: ignore[assignment]
        elif name in ("keyValues", "simplified", "concise"):
            raise BadRequestData(
                f"{name} is not a temporal representation",
                field="options" if name in opts else "format",
            )
        elif name not in (None, "normalized", "sysAttrs"):
            raise BadRequestData(f"unknown option {name!r}", field="options")
    rest.pop("format", None)
    return shape, "sysAttrs" in opts, rest


def _pks(store: Store, tenant: str, eids: list[str]) -> dict[str, int]:
    if not eids:
        return {}
    marks = ",".join("?" * len(eids))
    rows = store.select(
        f"SELECT eid, pk FROM entities WHERE tenant = ? AND eid IN ({marks})", [tenant, *eids]
    )
    return {str(r[0]): int(r[1]) for r in rows}


def _per_dataset(
    items: list[_T], ds_of: Callable[[_T], str | None], render: Callable[[list[_T]], dict[str, Any]]
) -> Any:
    """``render(items)``; for an attribute with datasetIds a list instead, one rendered object
    per datasetId carrying it (as a multi-attribute renders; the default instance first and
    without one): the datasets are separate series, not to be mixed into one."""
    groups: dict[str | None, list[_T]] = defaultdict(list)
    for item in items:
        groups[ds_of(item)].append(item)
    if list(groups) == [None]:
        return render(items)
    return [
        {**render(part), **({} if ds is None else {"datasetId": ds})}
        for ds, part in sorted(groups.items(), key=lambda g: (g[0] is not None, g[0] or ""))
    ]


def _temporal_values(insts: list[HistoryInstance]) -> dict[str, Any]:
    kind = insts[-1].inst["type"]
    member = _LIST_MEMBER.get(kind, "values")
    payload = PAYLOAD.get(kind, "value")
    pairs = []
    for h in insts:
        value = h.inst.get(PAYLOAD.get(h.inst["type"], "value"), "urn:ngsi-ld:null")
        pairs.append([{payload: value} if kind in _WRAPPED else value, h.time])
    return {"type": kind, member: pairs}


def _render_instances(
    insts: list[HistoryInstance], ctx: Context, shape: Shape, sys_attrs: bool, tq: TemporalQuery
) -> Any:
    view = View(sys_attrs=sys_attrs)
    if shape == "temporalValues":
        return _per_dataset(insts, lambda h: h.ds, _temporal_values)
    out = []
    for h in insts:
        rendered = render_instance(h.inst, ctx, view)
        rendered["instanceId"] = f"urn:ngsi-ld:Instance:{h.id}"
        if tq.timeproperty != "observedAt":
            rendered[tq.timeproperty] = h.time
        elif "observedAt" not in h.inst:
            # Filed, filtered and paged at the time the bank received it: without a time the
            # client could not place it among the others. That time is its modifiedAt (the
            # write stamps both), a system time, so no observation time is made up for it.
            rendered["modifiedAt"] = h.inst["modifiedAt"]
        out.append(rendered)
    return out


def _render_buckets(buckets: list[AggregateBucket], kind_of: Mapping[str | None, str]) -> Any:
    """The aggregates of one attribute; ``kind_of[datasetId]`` is the kind of that series."""

    def render(part: list[AggregateBucket]) -> dict[str, Any]:
        out: dict[str, Any] = {"type": kind_of[part[0].ds]}
        for b in part:
            for method, value in b.values.items():
                out.setdefault(method, []).append([value, b.start, b.end])
        return out

    return _per_dataset(buckets, lambda b: b.ds, render)


def _kinds(
    store: Store, tq: TemporalQuery, buckets: list[AggregateBucket]
) -> dict[tuple[int, int, str | None], str]:
    """The kind (``type``) of each aggregated (entity, attribute path, datasetId): its newest
    instance's in the window, as temporalValues reports it. Not the current entity's: an
    attribute deleted from it keeps its history, and one whose kind changed was aggregated as
    what it was. Per datasetId: each dataset is a series of its own, of its own kind (one
    attribute may hold a Property under one datasetId and a Relationship under another)."""
    sql, params = kinds_sql(store.dialect, tq, [(b.e, b.path, b.ds) for b in buckets])
    return {
        (int(e), int(path), ds): str(kind)
        for e, path, ds, kind in store.select(sql, params)
        if kind is not None
    }


def _tie(store: Store, tq: TemporalQuery, e: int, iri: str, t: str) -> list[HistoryInstance]:
    """Every instance of attribute ``iri`` of entity ``e`` at time ``t`` (in tq's window)."""
    us = iso_to_us(t)
    q = TemporalQuery(
        timerel="between" if us < LAST_US else "after",  # nothing is later than LAST_US
        time_at=t,
        end_time_at=us_to_iso(us + 1) if us < LAST_US else None,
        timeproperty=tq.timeproperty,
    )
    sql, params = instances_sql(store.dialect, q, [e], [iri])
    return decode_instances(store.dialect, q, store.select(sql, params))


def _page(
    store: Store, tq: TemporalQuery, series: dict[tuple[int, str], list[HistoryInstance]]
) -> tuple[str, str] | None:
    """Cut ``series`` (fetched with up to INSTANCE_LIMIT + 1 instances each) to one page, in
    place; the page's time range when instances were left out (a 206), else None.

    The client continues after the range's end (before its start with lastN), so the page
    must hold every instance of every attribute within the range and none outside it:
    - never cut inside a timestamp: a tie cut in two could not be continued (continuing after
      its time skips the rest, at its time repeats the part sent). The cut timestamp is left
      out whole, unless it is all the page holds; then the whole tie is sent, however long;
    - the range ends at the earliest cut across all attributes (lastN: starts at the latest),
      and every attribute is trimmed to it: beyond it another attribute was cut short.
    """
    newest = tq.last_n is not None  # then the newest are kept, the oldest left out
    ranges: list[tuple[str, str]] = []
    for (e, iri), insts in series.items():
        if len(insts) <= INSTANCE_LIMIT:
            continue
        t = insts[0].time if newest else insts[-1].time  # the time of the one left out
        kept = [h for h in insts if (h.time > t if newest else h.time < t)]
        if not kept:
            kept = _tie(store, tq, e, iri, t)
        series[(e, iri)] = kept
        ranges.append((kept[0].time, kept[-1].time))
    if not ranges:
        return None
    if newest:
        start = max(r[0] for r in ranges)
        for key, insts in series.items():
            series[key] = [h for h in insts if h.time >= start]
    else:
        end = min(r[1] for r in ranges)
        for key, insts in series.items():
            series[key] = [h for h in insts if h.time <= end]
    # the other end covers what the page holds, of any attribute
    sent = [insts for insts in series.values() if insts]
    if newest:
        end = max(insts[-1].time for insts in sent)
    else:
        start = min(insts[0].time for insts in sent)
    return start, end


def _history(
    store: Store,
    tenant: str,
    docs: list[dict[str, Any]],
    tq: TemporalQuery,
    shape: Shape,
    attrs: list[str] | None,
    ctx: Context,
    sys_attrs: bool,
) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
    """The temporal representation of ``docs``; the time range returned when cut short."""
    settle(store)
    pks = _pks(store, tenant, [d["id"] for d in docs])
    keys = list(pks.values())
    by_entity: dict[int, dict[str, Any]] = defaultdict(dict)
    cut: tuple[str, str] | None = None
    if keys and shape == "aggregatedValues":
        grouped: dict[tuple[int, str], list[AggregateBucket]] = defaultdict(list)
        found = aggregates(store.select, store.dialect, tq, keys, attrs)
        for b in found:
            grouped[(b.e, b.iri)].append(b)
        kinds = _kinds(store, tq, found) if found else {}
        for (e, iri), buckets in grouped.items():
            kind_of = {b.ds: kinds.get((e, b.path, b.ds), "Property") for b in buckets}
            by_entity[e][iri] = _render_buckets(buckets, kind_of)
    elif keys:
        sql, params = instances_sql(store.dialect, tq, keys, attrs, limit=INSTANCE_LIMIT + 1)
        series: dict[tuple[int, str], list[HistoryInstance]] = defaultdict(list)
        for h in decode_instances(store.dialect, tq, store.select(sql, params)):
            series[(h.e, h.iri)].append(h)
        cut = _page(store, tq, series)
        for (e, iri), insts in series.items():
            if insts:
                by_entity[e][iri] = _render_instances(insts, ctx, shape, sys_attrs, tq)
    out = []
    for doc in docs:
        types = [ctx.compact(t) for t in doc["type"]]
        item: dict[str, Any] = {"id": doc["id"], "type": types[0] if len(types) == 1 else types}
        for iri, rendered in by_entity.get(pks.get(doc["id"], -1), {}).items():
            item[ctx.compact(iri)] = rendered
        out.append(item)
    return out, cut


def _respond(
    request: Request,
    data: Any,
    ctx: Context,
    media: str,
    cut: tuple[str, str] | None,
    headers: dict[str, str] | None = None,
) -> Response:
    headers = dict(headers or {})
    status = 200
    if cut is not None:
        status = 206
        headers["Content-Range"] = f"date-time {cut[0]}-{cut[1]}/*"
    return json_response(data, request, ctx, media, status=status, headers=headers)


def _in_window(iris: list[str], tq: TemporalQuery, dialect: Dialect) -> Conjunct:
    """The temporal ``attrs`` condition: the entity's history holds an instance of one of these
    attributes in the time window (the whole history without timerel), as a temporal query
    matches (ETSI GS CIM 009): whether the entity still has the attribute or it was deleted
    (its history kept), and not when all its instances lie outside the window, even if the
    entity has the attribute now. A probe only: no index lists the entities by attribute
    across the history, so the other conditions (type, id, q) or a scan find the candidates,
    each checked with one index seek per attribute."""
    sql, params = recorded_attrs_sql(dialect, iris, tq)
    return Conjunct(sql, params)


async def _query(
    request: Request,
    rt: Runtime,
    ctx: Context,
    flt_params: Mapping[str, str],
    flt: Any,
    temporal: Mapping[str, object],
) -> Response:
    media = negotiate(request)
    shape, sys_attrs, rest = _shape(flt_params)
    tq = parse_temporal_query(temporal, aggregated=shape == "aggregatedValues")
    attrs = attr_iris(rest.get("attrs"), ctx)
    spec = QuerySpec()
    dialect = rt.bank.store.dialect
    if flt.attrs:
        # attrs selects the entities with an instance of one of them in the window, taken
        # from the history: an attribute deleted from the entity keeps its history, which the
        # temporal retrieval of that entity shows, and one the entity has now may have no
        # instance in the window (the other conditions: the current state)
        compile_filter(replace(flt, attrs=None), ctx, dialect, spec, require_qualifier=False)
        spec.conjuncts.append(_in_window(flt.attrs, tq, dialect))
    else:
        compile_filter(flt, ctx, dialect, spec)
    paging(rest, spec, rt.bank.default_limit, rt.bank.max_limit)
    tenant = tenant_of(request)
    rt.bank.check_tenant(tenant)

    def run() -> tuple[list[dict[str, Any]], int | None, list[dict[str, Any]], Any]:
        if flt.attrs:
            settle(rt.bank.store)  # SQLite: the staged history rows, for _in_window
        docs, total = query_store(rt.bank.store, tenant, spec, flt)
        data, cut = _history(rt.bank.store, tenant, docs, tq, shape, attrs, ctx, sys_attrs)
        return docs, total, data, cut

    docs, total, data, cut = await run_in_threadpool(run)
    return _respond(request, data, ctx, media, cut, page_headers(request, spec, len(docs), total))


@router.get("/temporal/entities")
async def query_temporal(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, (*QUERY_PARAMS, *TEMPORAL_PARAMS))
    ctx = await header_context(request, rt)
    params = dict(request.query_params)
    _, _, rest = _shape(params)
    return await _query(request, rt, ctx, params, filter_from_params(rest, ctx), params)


@router.get("/temporal/entities/{eid:escaped_path}")
async def retrieve_temporal(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ("attrs", "options", "format", "lang", *TEMPORAL_PARAMS))
    ctx = await header_context(request, rt)
    media = negotiate(request)
    params = dict(request.query_params)
    shape, sys_attrs, rest = _shape(params)
    tq = parse_temporal_query(params, aggregated=shape == "aggregatedValues")
    attrs = attr_iris(rest.get("attrs"), ctx)
    tenant = tenant_of(request)

    def run() -> tuple[list[dict[str, Any]], Any]:
        doc = rt.bank.retrieve(tenant, eid)
        return _history(rt.bank.store, tenant, [doc], tq, shape, attrs, ctx, sys_attrs)

    data, cut = await run_in_threadpool(run)
    if not data:
        raise ResourceNotFound(f"entity {eid} not found", field="id")
    return _respond(request, data[0], ctx, media, cut)


@router.post("/temporal/entityOperations/query")
async def query_temporal_post(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ("limit", "offset", "count", "options", "format"))
    body, ctx, is_ld = await read_json(request, rt)
    if is_ld and isinstance(body, dict):
        if "@context" not in body:
            raise BadRequestData("application/ld+json bodies need an @context", field="@context")
        ctx = await resolve_context(rt, body["@context"])
    if not isinstance(body, dict):
        raise BadRequestData("a Query must be a JSON object", field="body")
    temporal = body.get("temporalQ", {})
    if not isinstance(temporal, dict):
        raise BadRequestData("temporalQ must be an object", field="temporalQ")
    flt, view_params = filter_from_body({k: v for k, v in body.items() if k != "temporalQ"}, ctx)
    params = {**dict(request.query_params), **view_params}
    return await _query(request, rt, ctx, params, flt, {str(k): v for k, v in temporal.items()})


# -- writes -----------------------------------------------------------------------------------
# The temporal API writes history directly: POST adds instances (creating the entity, with the
# newest instance of each attribute as its current state, when it does not exist), DELETE
# removes history. These writes bypass the write hooks, so they send no notifications.

_CORE_MEMBERS = ("id", "type", "@id", "@type", "@context", "scope")


def _history_of(request: Request) -> History:
    h = request.app.state.history
    assert isinstance(h, History)
    return h


def _parse_instances(
    body: Any, ctx: Context, eid: str | None
) -> tuple[str, list[str] | None, list[tuple[str, dict[str, Any]]]]:
    """(entity id, expanded types or None, [(attribute IRI, instance)]) of a temporal body."""
    if not isinstance(body, dict):
        raise BadRequestData("a temporal entity must be a JSON object", field="body")
    body_id = body.get("id", body.get("@id"))
    if eid is None:
        eid = check_uri(body_id, "id")
    elif body_id is not None and body_id != eid:
        raise BadRequestData("the body's id differs from the URL's", field="id")
    raw_type = body.get("type", body.get("@type"))
    parser = EntityParser(ctx)
    types = parser.types(raw_type) if raw_type is not None else None
    out: list[tuple[str, dict[str, Any]]] = []
    for name, value in body.items():
        if name in _CORE_MEMBERS:
            continue
        for item in value if isinstance(value, list) else [value]:
            frag = parser.entity({"id": eid, "type": "Thing", name: item}, "create")
            ((iri, insts),) = frag["attrs"].items()
            out.extend((iri, strip_flags(inst)) for inst in insts)
    if not out and eid is None:
        raise BadRequestData("no attribute instances in the body", field="body")
    return eid, types, out


def _newest(
    instances: list[tuple[str, dict[str, Any]]], now: str
) -> dict[str, list[dict[str, Any]]]:
    """Per attribute, the newest instance per datasetId: by observedAt, an instance without
    one at ``now``, as the history files it (it counted as the oldest, so the entity showed
    another value than the history's newest); the last given wins a tie."""
    best: dict[tuple[str, str | None], dict[str, Any]] = {}

    def when(inst: dict[str, Any]) -> str:
        # compared as instants: the raw texts differ in fraction width ("...00Z" sorts after
        # "...00.500Z"); normalized to six fraction digits, text order is time order
        return normalize_timestamp(str(inst.get("observedAt", now)))

    for iri, inst in instances:
        key = (iri, inst.get("datasetId"))
        old = best.get(key)
        if old is None or when(inst) >= when(old):
            best[key] = inst
    attrs: dict[str, list[dict[str, Any]]] = {}
    for (iri, _), inst in best.items():
        attrs.setdefault(iri, []).append(dict(inst))
    return attrs


def _append(
    rt: Runtime,
    history: History,
    tenant: str,
    eid: str,
    types: list[str] | None,
    instances: list[tuple[str, dict[str, Any]]],
    must_exist: bool,
) -> bool:
    """Record ``instances``; True when the entity was created."""
    now = now_iso()
    history.prepare([str(i.get("observedAt", now)) for _, i in instances] + [now])
    if must_exist:
        rt.bank.check_tenant(tenant)
    with rt.bank.store.write(tenant, create_tenant=not must_exist) as txn:
        found = txn.get_many([eid]).get(eid)
        created = False
        if found is None:
            if must_exist:
                raise ResourceNotFound(f"entity {eid} not found", field="id")
            if types is None:
                raise BadRequestData("a new temporal entity needs a type", field="type")
            doc = new_document({"id": eid, "type": types, "attrs": _newest(instances, now)}, now)
            (pk,) = txn.new_pks(1)
            txn.put([(pk, doc)], replacing=[])
            created = True
        else:
            pk = found[0]
        rows = [instance_row(pk, iri, inst, now) for iri, inst in instances]
        history.insert(txn, rows)
    history.refresh_statistics()
    return created


@router.post("/temporal/entities")
async def create_temporal(request: Request) -> Response:
    rt = runtime(request)
    check_params(request, ())
    body, ctx, is_ld = await read_json(request, rt)
    if is_ld:
        ctx = await body_context_async(body, rt, True, ctx)
    eid, types, instances = _parse_instances(body, ctx, None)
    created = await run_in_threadpool(
        _append, rt, _history_of(request), tenant_of(request), eid, types, instances, False
    )
    if created:
        # encoded as on /entities: a "%" or "/" in the id reaches the entity when followed
        location = f"/ngsi-ld/v1/temporal/entities/{quote(eid, safe=':')}"
        return empty_response(request, 201, {"Location": location})
    return empty_response(request)


@router.post("/temporal/entities/{eid:escaped_path}/attrs")
async def append_temporal(request: Request, eid: str) -> Response:
    rt = runtime(request)
    check_params(request, ())
    check_uri(eid, "id")
    body, ctx, is_ld = await read_json(request, rt)
    if is_ld:
        ctx = await body_context_async(body, rt, True, ctx)
    _, _, instances = _parse_instances(body, ctx, eid)
    if not instances:
        raise BadRequestData("no attribute instances in the body", field="body")
    await run_in_threadpool(
        _append, rt, _history_of(request), tenant_of(request), eid, None, instances, True
    )
    return empty_response(request)


def _pk_of(rt: Runtime, tenant: str, eid: str) -> int:
    rt.bank.check_tenant(tenant)
    pk = _pks(rt.bank.store, tenant, [eid]).get(eid)
    if pk is None:
        raise ResourceNotFound(f"entity {eid} not found", field="id")
    return pk


# {attr} is one segment: an attribute named by its IRI has its slashes percent-encoded, and
# those stay in the segment (cityward.api.rawpath)
_ATTR_PATH = "/temporal/entities/{eid:escaped_path}/attrs/{attr:escaped_segment}"
_INSTANCE_PATH = _ATTR_PATH + "/{instance_id:escaped_path}"
_INSTANCE_PREFIX = "urn:ngsi-ld:Instance:"
_MAX_ID = 2**63 - 1  # attr_history.id is a signed 64-bit integer in both stores


def _instance_number(instance_id: str) -> int | None:
    """The history row id an instance id names, or None when it names none.

    ASCII digits only: str.isdigit() also accepts other scripts' digits, which int() reads
    ("\u0662" is 2) or rejects ("\u00b2"). Beyond 64 bits no row can match, and SQLite
    refuses such a parameter (OverflowError), so that is no instance either.
    """
    digits = instance_id.removeprefix(_INSTANCE_PREFIX)
    if digits == instance_id or not digits.isascii() or not digits.isdigit():
        return None
    number = int(digits)
    return number if number <= _MAX_ID else None


@router.delete(_INSTANCE_PATH)
async def delete_instance(request: Request, eid: str, attr: str, instance_id: str) -> Response:
    rt = runtime(request)
    check_params(request, ())
    ctx = await header_context(request, rt)
    iri = ctx.expand(attr)
    number = _instance_number(instance_id)
    if number is None:
        raise ResourceNotFound(f"no instance {instance_id}", field="instanceId")
    tenant = tenant_of(request)

    def run() -> None:
        pk = _pk_of(rt, tenant, eid)
        with rt.bank.store.write(tenant, create_tenant=False) as txn:
            settle_txn(txn)
            gone = txn.execute(
                "DELETE FROM attr_history WHERE e = ? AND path = ? AND id = ? RETURNING id",
                [pk, path_id(iri), number],
            )
            if not gone:
                raise ResourceNotFound(f"no instance {instance_id} of {attr}", field="instanceId")

    await run_in_threadpool(run)
    return empty_response(request)


@router.patch(_INSTANCE_PATH)
async def patch_instance(eid: str, attr: str, instance_id: str) -> Response:
    raise OperationNotSupported(
        "modifying a recorded instance is not supported: history is append-only here",
        field="instanceId",
    )


@router.delete(_ATTR_PATH)
async def delete_temporal_attr(request: Request, eid: str, attr: str) -> Response:
    rt = runtime(request)
    check_params(request, ("datasetId", "deleteAll"))
    ctx = await header_context(request, rt)
    iri = ctx.expand(attr)
    params = request.query_params
    delete_all = params.get("deleteAll", "false")
    if delete_all not in ("true", "false"):
        raise BadRequestData("deleteAll must be true or false", field="deleteAll")
    ds = params.get("datasetId")
    tenant = tenant_of(request)

    def run() -> None:
        pk = _pk_of(rt, tenant, eid)
        sql = "DELETE FROM attr_history WHERE e = ? AND path = ?"
        args: list[Any] = [pk, path_id(iri)]
        if delete_all != "true":
            sql += " AND ds = ?" if ds is not None else " AND ds IS NULL"
            args += [ds] if ds is not None else []
        with rt.bank.store.write(tenant, create_tenant=False) as txn:
            settle_txn(txn)
            if not txn.execute(sql + " RETURNING id", args):
                raise ResourceNotFound(f"no history of {attr} in {eid}", field="attrId")

    await run_in_threadpool(run)
    return empty_response(request)


@router.delete("/temporal/entities/{eid:escaped_path}")
async def delete_temporal(request: Request, eid: str) -> Response:
    """The entity's history and the entity itself."""
    rt = runtime(request)
    check_params(request, ())
    tenant = tenant_of(request)

    def run() -> None:
        pk = _pk_of(rt, tenant, eid)
        with rt.bank.store.write(tenant, create_tenant=False) as txn:
            settle_txn(txn)
            txn.execute("DELETE FROM attr_history WHERE e = ?", [pk])
            txn.delete([pk])

    await run_in_threadpool(run)
    return empty_response(request)
