"""Stored documents out to NGSI-LD representations: normalized, concise and simplified."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cityward.bank.jsonld import Context

Format = Literal["normalized", "concise", "keyValues"]
_META = ("datasetId", "observedAt", "unitCode", "valueType")


@dataclass(frozen=True)
class View:
    """How to show an entity: representation, projection and language."""

    fmt: Format = "normalized"
    sys_attrs: bool = False
    lang: str | None = None
    attrs: frozenset[str] | None = None  # expanded attribute IRIs to keep (None: all)
    omit: frozenset[str] = frozenset()  # expanded attribute IRIs, or "id" / "type" / "scope"
    pick: frozenset[str] | None = None  # same vocabulary as omit
    dataset_ids: frozenset[str] | None = None  # "@none" = default instance


def render_entity(doc: dict[str, Any], ctx: Context, view: View) -> dict[str, Any]:
    """The entity as the client asked to see it, names compacted with ``ctx``."""
    out: dict[str, Any] = {}
    pick, omit = view.pick, view.omit
    if (pick is None or "id" in pick) and "id" not in omit:
        out["id"] = doc["id"]
    if (pick is None or "type" in pick) and "type" not in omit:
        types = [ctx.compact(t) for t in doc["type"]]
        out["type"] = types[0] if len(types) == 1 else types
    scope = doc.get("scope")
    if scope and (pick is None or "scope" in pick) and "scope" not in omit:
        out["scope"] = scope[0] if len(scope) == 1 else scope
    if view.sys_attrs and view.fmt != "keyValues":
        out["createdAt"] = doc["createdAt"]
        out["modifiedAt"] = doc["modifiedAt"]
    for iri, instances in doc["attrs"].items():
        if view.attrs is not None and iri not in view.attrs:
            continue
        if (pick is not None and iri not in pick) or iri in omit:
            continue
        if view.dataset_ids is not None:
            instances = [i for i in instances if i.get("datasetId", "@none") in view.dataset_ids]
            if not instances:
                continue
        rendered = [render_instance(i, ctx, view) for i in instances]
        out[ctx.compact(iri)] = rendered[0] if len(rendered) == 1 else rendered
    return out


def render_instance(inst: dict[str, Any], ctx: Context, view: View) -> Any:
    """One attribute instance in the requested representation."""
    kind = inst["type"]
    fmt = view.fmt
    if kind == "LanguageProperty" and view.lang is not None:
        tag, text = pick_language(inst["languageMap"], view.lang)
        if fmt == "keyValues":
            return text
        out: dict[str, Any] = {"type": "Property", "value": text, "lang": tag}
        if fmt == "concise":
            del out["type"]
        _metadata(out, inst, ctx, view)
        return out
    if fmt == "keyValues":
        return _simplified(inst, ctx)
    out = {"type": kind}
    if kind == "Relationship" or kind == "ListRelationship":
        if kind == "Relationship":
            out["object"] = inst["object"]
        else:
            out["objectList"] = [{"object": o} for o in inst["objectList"]]
        if "objectType" in inst:
            ot = inst["objectType"]
            out["objectType"] = (
                [ctx.compact(t) for t in ot] if isinstance(ot, list) else ctx.compact(ot)
            )
    elif kind == "VocabProperty":
        v = inst["vocab"]
        out["vocab"] = [ctx.compact(t) for t in v] if isinstance(v, list) else ctx.compact(v)
    elif kind == "JsonProperty":
        out["json"] = inst["json"]
    elif kind == "LanguageProperty":
        out["languageMap"] = inst["languageMap"]
    elif kind == "ListProperty":
        out["valueList"] = inst["valueList"]
    else:
        out["value"] = inst["value"]
    _metadata(out, inst, ctx, view)
    if fmt == "concise":
        return _concise(out)
    return out


def _metadata(out: dict[str, Any], inst: dict[str, Any], ctx: Context, view: View) -> None:
    for key in _META:
        if key in inst:
            out[key] = inst[key]
    if view.sys_attrs:
        if "createdAt" in inst:
            out["createdAt"] = inst["createdAt"]
        if "modifiedAt" in inst:
            out["modifiedAt"] = inst["modifiedAt"]
    sub = inst.get("sub")
    if sub:
        for iri, s in sub.items():
            out[ctx.compact(iri)] = render_instance(s, ctx, view)


def _concise(out: dict[str, Any]) -> Any:
    kind = out["type"]
    if kind == "Property":
        if len(out) == 2:
            value = out["value"]
            # a bare object or array could be mistaken for an attribute or a multi-attribute
            if not isinstance(value, dict | list):
                return value
        del out["type"]
        return out
    if kind == "GeoProperty":
        if len(out) == 2:
            return out["value"]
        return out  # type kept: {"value": <geometry>} alone would read back as a Property
    del out["type"]
    return out


def _simplified(inst: dict[str, Any], ctx: Context) -> Any:
    kind = inst["type"]
    if kind == "Relationship":
        return inst["object"]
    if kind == "ListRelationship":
        return inst["objectList"]
    if kind == "LanguageProperty":
        return {"languageMap": inst["languageMap"]}
    if kind == "ListProperty":
        return inst["valueList"]
    if kind == "JsonProperty":
        return {"json": inst["json"]}
    if kind == "VocabProperty":
        v = inst["vocab"]
        return {"vocab": [ctx.compact(t) for t in v] if isinstance(v, list) else ctx.compact(v)}
    return inst["value"]


def pick_language(lang_map: dict[str, Any], wanted: str) -> tuple[str, Any]:
    """The (tag, text) of a languageMap for ``lang``: exact, then base language, @none, first."""
    if wanted != "*":
        for tag in wanted.split(","):
            tag = tag.strip().split(";")[0]
            if tag in lang_map:
                return tag, lang_map[tag]
            base = tag.split("-")[0].lower()
            for key, text in lang_map.items():
                if key.split("-")[0].lower() == base:
                    return key, text
    if "@none" in lang_map:
        return "@none", lang_map["@none"]
    tag = next(iter(lang_map))
    return tag, lang_map[tag]
