"""NGSI-LD entities in, stored documents out: validation and expansion of request bodies.

The layout of a stored document is described in docs/bank-internals.md. Validation is written
by hand rather than with pydantic models: an entity is a free-form map of attributes, and a
batch of 1,000 entities must be checked in a few milliseconds.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from cityward.bank import geo
from cityward.bank.errors import BadRequestData
from cityward.bank.jsonld import PREVIOUS_MEMBERS, RESERVED_MEMBERS, Context

NGSI_NULL = "urn:ngsi-ld:null"
KINDS = frozenset(
    {
        "Property",
        "Relationship",
        "GeoProperty",
        "LanguageProperty",
        "ListProperty",
        "ListRelationship",
        "JsonProperty",
        "VocabProperty",
    }
)
PAYLOAD = {
    "Property": "value",
    "GeoProperty": "value",
    "Relationship": "object",
    "LanguageProperty": "languageMap",
    "ListProperty": "valueList",
    "ListRelationship": "objectList",
    "JsonProperty": "json",
    "VocabProperty": "vocab",
}
PAYLOAD_MEMBERS = frozenset(PAYLOAD.values())
# members of an attribute that are not sub-attributes
ATTR_MEMBERS = frozenset(
    {
        "type",
        "@type",
        *PAYLOAD_MEMBERS,
        "objectType",
        "datasetId",
        "observedAt",
        "unitCode",
        "valueType",
        "createdAt",
        "modifiedAt",
        "deletedAt",
        "instanceId",
        "lang",
    }
)
SYSTEM_MEMBERS = frozenset({"createdAt", "modifiedAt", "deletedAt"})
# core terms that can never be attribute names
RESERVED_NAMES = RESERVED_MEMBERS
# a type-less concise attribute with one of these types is a bare geometry (GeometryCollection
# included so that parse_geometry can say it is not supported)
GEOJSON_TYPES = frozenset({*geo.GEOMETRY_TYPES, "GeometryCollection"})

_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s<>\"{}|\\^`\x00-\x1f\x7f]*\Z")
# bidi controls, zero-width characters and the BOM are forbidden in ids
_BAD_ID_CHARS = re.compile("[\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u00a0]")
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+\Z")
# RFC 3339 (section 5.6) also allows a lowercase z; check_datetime turns it into Z
# ASCII digits only and nothing after the zone (\d took full-width digits and $ a final
# newline: accepted here, they were then filed at the write time, or a 500 further on). \Z,
# not $, in every pattern here: "urn:a:b\n" passed as an entity id.
_DATETIME_RE = re.compile(
    r"(?a)^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,9})?[Zz]\Z"
)
_SCOPE_RE = re.compile(r"^(/[A-Za-z][A-Za-z0-9_]*)+\Z")
_LANG_RE = re.compile(r"^([A-Za-z]{1,8}(-[A-Za-z0-9]{1,8})*|@none)\Z")

Mode = Literal["create", "fragment", "update", "merge"]
# modes in which NGSI-LD Null (as a whole attribute or payload) deletes instead of being an error
_NULL_DELETES: frozenset[Mode] = frozenset({"update", "merge"})
# members each kind of attribute must not carry: other kinds' payloads and output-only members
_FORBIDDEN = {
    kind: frozenset((PAYLOAD_MEMBERS - {member}) | PREVIOUS_MEMBERS)
    for kind, member in PAYLOAD.items()
}
_VALID_DATETIMES: dict[str, bool] = {}


INSTANT_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def now_iso() -> str:
    """Current UTC time, fixed width with microseconds, so string order is time order."""
    return datetime.now(UTC).strftime(INSTANT_FORMAT)


def iso_at(t: float) -> str:
    """Unix time ``t`` as an instant in the same format as :func:`now_iso`."""
    return datetime.fromtimestamp(t, UTC).strftime(INSTANT_FORMAT)


def epoch_of(value: object) -> float | None:
    """An ISO 8601 date-time (naive: UTC) as Unix time; None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def is_uri(value: object) -> bool:
    """True when ``value`` is an absolute URI acceptable as an NGSI-LD identifier."""
    return (
        isinstance(value, str)
        and _URI_RE.match(value) is not None
        and _BAD_ID_CHARS.search(value) is None
    )


#: the longest entity id, in UTF-8 bytes: PostgreSQL's unique index on (tenant, id) takes at
#: most about 2,700 bytes a row, and a longer id failed the whole write with an internal error
MAX_ID_BYTES = 1000


def nul_field(value: object, where: str) -> str | None:
    """The path of the first string or member name in ``value`` that holds a NUL character
    (U+0000), or None."""
    if isinstance(value, str):
        return where if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and "\x00" in key:
                return path
            found = nul_field(item, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for n, item in enumerate(value):
            found = nul_field(item, f"{where}[{n}]")
            if found is not None:
                return found
    return None


def check_no_nul(value: object, where: str) -> None:
    """BadRequestData naming the field when a string in ``value`` holds a NUL character.

    PostgreSQL cannot store one in a text (an entity with one failed its whole batch with an
    internal error, and an ingest writer retried it for ever); SQLite could, so the rule is
    the bank's, the same on both stores. orjson writes NUL as the escape ``\\u0000``: a value
    without that text has none, and only one with it is walked.
    """
    try:
        if b"\\u0000" not in orjson.dumps(value):
            return
    except TypeError:
        pass  # not JSON data: walk it
    found = nul_field(value, where)
    if found is not None:
        raise BadRequestData(
            f"{found} contains a NUL character (U+0000), which the bank does not store",
            field=found,
        )


_ATTRS_SEGMENT = re.compile(r"/attrs(?:/|$)")


def check_uri(value: object, field: str) -> str:
    if not is_uri(value):
        raise BadRequestData(f"{field} must be an absolute URI, got {value!r}", field=field)
    assert isinstance(value, str)
    return value


def check_datetime(value: object, field: str) -> str:
    """Validate an NGSI-LD DateTime (UTC, ``Z`` or ``z`` suffix) and return it with ``Z``,
    otherwise unchanged."""
    if isinstance(value, str) and value in _VALID_DATETIMES:
        return value  # devices in one batch often share timestamps; skip the regex
    if isinstance(value, str):
        m = _DATETIME_RE.match(value)
        if m is not None:
            try:
                y, mo, d, h, mi, sec = (int(m.group(i)) for i in range(1, 7))
                datetime(y, mo, d, h, mi, sec, tzinfo=UTC)
            except ValueError:
                pass
            else:
                if value[-1] == "z":  # stored, compared and echoed in the one form, with Z
                    return value[:-1] + "Z"
                if len(_VALID_DATETIMES) > 10_000:
                    _VALID_DATETIMES.clear()
                _VALID_DATETIMES[value] = True
                return value
    raise BadRequestData(
        f"{field} must be a UTC DateTime like 2024-01-31T10:00:00Z, got {value!r}", field=field
    )


def normalize_datetime(value: str) -> str:
    """A validated DateTime in the stored fixed-width microsecond form."""
    head, _, frac = value[:-1].partition(".")
    return f"{head}.{(frac + '000000')[:6]}Z"


_GOOD_NAMES: set[str] = set()


def check_attr_name(name: str, field: str | None = None) -> None:
    """Reject reserved and malformed attribute names (valid ones are remembered)."""
    if name in _GOOD_NAMES:
        return
    if name in RESERVED_NAMES:
        raise BadRequestData(
            f"{name!r} is reserved and cannot name an attribute", field=field or name
        )
    if _NAME_RE.match(name) is None and not is_uri(name):
        raise BadRequestData(
            f"attribute name {name!r} must be letters, digits and _ or an absolute IRI",
            field=field or name,
        )
    if len(_GOOD_NAMES) < 100_000:
        _GOOD_NAMES.add(name)


def check_type_name(name: object, field: str = "type") -> str:
    if not isinstance(name, str) or not name:
        raise BadRequestData(f"entity type must be a non-empty string, got {name!r}", field=field)
    if _NAME_RE.match(name) is None and not is_uri(name):
        raise BadRequestData(
            f"entity type {name!r} must be letters, digits and _ or an absolute IRI", field=field
        )
    return name


def parse_scope(value: object, *, allow_null: bool = False) -> list[str] | None:
    """Validate ``scope`` (a string or an array); None means NGSI-LD Null (remove)."""
    if allow_null and value == NGSI_NULL:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise BadRequestData("scope must not be empty", field="scope")
    for s in items:
        if not isinstance(s, str) or _SCOPE_RE.match(s) is None:
            raise BadRequestData(
                f"scope {s!r} must look like /Level/SubLevel (letters, digits, _)", field="scope"
            )
    return list(dict.fromkeys(items))


class EntityParser:
    """Validates one request body against NGSI-LD rules and expands it with a context."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # -- entities ---------------------------------------------------------------------------
    def entity(
        self, body: object, mode: Mode = "create", path_id: str | None = None
    ) -> dict[str, Any]:
        """An entity or fragment as a stored-form document without timestamps.

        ``mode``: ``create`` needs id and type and forbids NGSI-LD Null; ``fragment`` (append,
        replace, batch update) makes id/type optional; ``update`` (update attrs) also lets Null
        delete an attribute; ``merge`` also lets Null delete members, and is the only mode in which
        an attribute may leave out its payload (the stored one keeps it): in the others an
        attribute replaces the stored one, so it must be complete.
        """
        if not isinstance(body, dict):
            raise BadRequestData("an entity must be a JSON object", field="entity")
        check_no_nul(body, "")
        doc: dict[str, Any] = {}
        attrs: dict[str, list[dict[str, Any]]] = {}
        raw_id = body.get("id", body.get("@id"))
        if raw_id is not None or mode == "create":
            if raw_id is None:
                raise BadRequestData("entity id is missing", field="id")
            doc["id"] = check_uri(raw_id, "id")
            if len(doc["id"].encode()) > MAX_ID_BYTES:
                raise BadRequestData(f"entity id is longer than {MAX_ID_BYTES} bytes", field="id")
            if _ATTRS_SEGMENT.search(doc["id"]):
                # /entities/{id}/attrs/{attr}: the server decodes %2F before routing, so
                # urn:x:S/attrs/b was reached as attribute b of urn:x:S (a DELETE of the
                # one deleted the other's attribute), and the entity itself never
                raise BadRequestData(
                    "an entity id may not hold a '/attrs' segment: the API's attribute paths "
                    "could not be told from it",
                    field="id",
                )
        if path_id is not None and "id" in doc and doc["id"] != path_id:
            raise BadRequestData(
                f"entity id {doc['id']} in the body differs from {path_id} in the path", field="id"
            )
        raw_type = body.get("type", body.get("@type"))
        if raw_type is not None or mode == "create":
            doc["type"] = self.types(raw_type)
        for key, value in body.items():
            if key in ("id", "@id", "type", "@type"):
                continue
            if key == "@context":
                continue  # checked by the caller against the Content-Type
            if key == "scope":
                scope = parse_scope(value, allow_null=mode == "merge")
                doc["scope"] = scope if scope is not None else NGSI_NULL
                continue
            if key in SYSTEM_MEMBERS:
                continue  # output-only members are ignored on input
            check_attr_name(key)
            iri = self.ctx.expand(key)
            attrs[iri] = self._attribute(value, key, mode)
        doc["attrs"] = attrs
        return doc

    def types(self, raw: object) -> list[str]:
        if raw is None:
            raise BadRequestData("entity type is missing", field="type")
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise BadRequestData("entity type must not be an empty array", field="type")
        return list(dict.fromkeys(self.ctx.expand(check_type_name(t)) for t in items))

    # -- attributes -------------------------------------------------------------------------
    def attribute(self, value: object, name: str, mode: Mode) -> list[dict[str, Any]]:
        """All instances of one attribute (a multi-attribute is a JSON array of instances)."""
        check_no_nul(value, name)
        return self._attribute(value, name, mode)

    def _attribute(self, value: object, name: str, mode: Mode) -> list[dict[str, Any]]:
        """:meth:`attribute` of a value already checked for NUL characters (in its entity)."""
        if type(value) is dict:
            fast = _fast_instance(value, name)
            if fast is not None:
                return [fast]
        if isinstance(value, list) and _is_multi_attribute(value):
            instances = [self.instance(v, name, mode, top=True) for v in value]
        else:
            instances = [self.instance(value, name, mode, top=True)]
        seen: set[str | None] = set()
        for inst in instances:
            ds = inst.get("datasetId")
            if ds in seen:
                what = f"datasetId {ds}" if ds else "the default instance (no datasetId)"
                raise BadRequestData(f"attribute {name!r} repeats {what}", field=name)
            seen.add(ds)
        return instances

    def instance(self, raw: object, name: str, mode: Mode, top: bool) -> dict[str, Any]:
        """One attribute instance in stored form (normalized or concise input)."""
        if raw is None:
            raise BadRequestData(f"attribute {name!r} is null", field=name)
        if not isinstance(raw, dict):
            if raw == NGSI_NULL:
                if mode not in _NULL_DELETES:
                    raise BadRequestData(
                        f"NGSI-LD Null is only allowed in merge and update operations ({name!r})",
                        field=name,
                    )
                return {"type": "Property", "value": NGSI_NULL, "_delete": True}
            # concise form: a bare value is a Property
            return {"type": "Property", "value": raw}
        if "@context" in raw:
            raise BadRequestData(f"attribute {name!r} must not contain @context", field=name)
        kind = raw.get("type", raw.get("@type"))
        if isinstance(kind, str) and kind in GEOJSON_TYPES and "value" not in raw:
            # concise form: a bare GeoJSON geometry is a GeoProperty
            return {"type": "GeoProperty", "value": geo.parse_geometry(raw, name)}
        untyped = False
        if kind is None:
            kind = _infer_kind(raw)
            untyped = kind is None
            if kind is None:
                if mode != "merge":
                    raise BadRequestData(
                        f"attribute {name!r} has no type and no value, object, languageMap, "
                        "valueList, objectList, json or vocab member",
                        field=name,
                    )
                kind = "Property"
        if not isinstance(kind, str) or kind not in KINDS:
            raise BadRequestData(
                f"attribute {name!r} has type {kind!r}; expected one of {', '.join(sorted(KINDS))}",
                field=name,
            )
        payload_member = PAYLOAD[kind]
        wrong = raw.keys() & _FORBIDDEN[kind]
        if wrong:
            member = sorted(wrong)[0]
            if member in PREVIOUS_MEMBERS:
                raise BadRequestData(f"{member!r} is output only ({name!r})", field=name)
            raise BadRequestData(f"a {kind} cannot have a {member!r} member ({name!r})", field=name)
        inst: dict[str, Any] = {"type": kind}
        if untyped:
            inst["_untyped"] = True  # a partial update that keeps the stored kind
        if payload_member in raw:
            payload = raw[payload_member]
            if self._is_null(payload, kind):
                if mode not in _NULL_DELETES:
                    raise BadRequestData(
                        f"NGSI-LD Null is only allowed in merge and update operations ({name!r})",
                        field=name,
                    )
                inst["_delete"] = True
                inst[payload_member] = payload
            else:
                inst[payload_member] = self._payload(kind, payload, name)
                if kind == "LanguageProperty" and NGSI_NULL in payload.values():
                    self._null_languages(inst, mode, name)
        elif mode != "merge":
            raise BadRequestData(
                f"a {kind} needs a {payload_member!r} member ({name!r})", field=name
            )
        else:
            inst["_name"] = name  # a merge that turns out to add this attribute names it
        for key, val in raw.items():
            if key in ("type", "@type", payload_member):
                continue
            if key == "datasetId":
                if val == "@none":
                    continue
                if not top:
                    raise BadRequestData(
                        f"sub-attribute {name!r} cannot have a datasetId", field=name
                    )
                inst["datasetId"] = check_uri(val, f"{name}.datasetId")
            elif key == "observedAt":
                if val == NGSI_NULL and mode == "merge":
                    inst["observedAt"] = NGSI_NULL
                else:
                    inst["observedAt"] = check_datetime(val, f"{name}.observedAt")
            elif key == "unitCode":
                if kind == "Relationship":
                    raise BadRequestData(
                        f"a Relationship cannot have a unitCode ({name!r})", field=name
                    )
                if not isinstance(val, str) or not val:
                    raise BadRequestData(f"unitCode of {name!r} must be a string", field=name)
                inst["unitCode"] = val
            elif key == "objectType":
                if kind not in ("Relationship", "ListRelationship"):
                    raise BadRequestData(
                        f"objectType is only for relationships ({name!r})", field=name
                    )
                items = val if isinstance(val, list) else [val]
                expanded = [
                    self.ctx.expand(check_type_name(t, f"{name}.objectType")) for t in items
                ]
                inst["objectType"] = expanded if isinstance(val, list) else expanded[0]
            elif key == "valueType":
                if not isinstance(val, str):
                    raise BadRequestData(f"valueType of {name!r} must be a string", field=name)
                if kind == "LanguageProperty" and val != "langString":
                    raise BadRequestData(
                        f"valueType of LanguageProperty {name!r} must be langString", field=name
                    )
                inst["valueType"] = val
            elif key in SYSTEM_MEMBERS or key in ("instanceId", "lang"):
                continue
            else:
                check_attr_name(key)
                sub_iri = self.ctx.expand(key)
                # an update replaces the whole attribute: a sub-attribute cannot be Null there
                sub_mode: Mode = "fragment" if mode == "update" else mode
                inst.setdefault("sub", {})[sub_iri] = self.instance(val, key, sub_mode, top=False)
        return inst

    @staticmethod
    def _null_languages(inst: dict[str, Any], mode: Mode, name: str) -> None:
        """A languageMap in which some languages are NGSI-LD Null: in a merge they delete those
        languages (the bank merges the map language by language); in an update, which replaces
        the attribute, they are left out, and a map of Nulls alone deletes it. Anywhere else
        Null is an error (it was stored as the text of those languages)."""
        if mode not in _NULL_DELETES:
            raise BadRequestData(
                f"NGSI-LD Null is only allowed in merge and update operations ({name!r})",
                field=name,
            )
        if mode == "update":
            lang_map = inst["languageMap"]
            kept = {tag: text for tag, text in lang_map.items() if text != NGSI_NULL}
            if kept:
                inst["languageMap"] = kept
            else:
                inst["_delete"] = True

    @staticmethod
    def _is_null(payload: object, kind: str) -> bool:
        if payload == NGSI_NULL:
            return True
        if kind == "LanguageProperty" and isinstance(payload, dict):
            return payload == {"@none": NGSI_NULL}
        return isinstance(payload, list) and len(payload) == 1 and payload[0] == NGSI_NULL

    def _payload(self, kind: str, payload: object, name: str) -> Any:
        if payload is None:
            raise BadRequestData(f"the value of {name!r} is null", field=name)
        if kind == "Property":
            return payload  # typed values such as {"@type": "DateTime", "@value": ...} verbatim
        if kind == "GeoProperty":
            return geo.parse_geometry(payload, name)
        if kind == "Relationship":
            if isinstance(payload, list):
                if not payload:
                    raise BadRequestData(f"object of {name!r} must not be empty", field=name)
                return [check_uri(o, f"{name}.object") for o in payload]
            return check_uri(payload, f"{name}.object")
        if kind == "LanguageProperty":
            if not isinstance(payload, dict) or not payload:
                raise BadRequestData(
                    f"languageMap of {name!r} must be a non-empty object", field=name
                )
            for tag, text in payload.items():
                if not tag or _LANG_RE.match(tag) is None:
                    raise BadRequestData(f"{tag!r} is not a language tag ({name!r})", field=name)
                texts = text if isinstance(text, list) else [text]
                if not all(isinstance(t, str) for t in texts):
                    raise BadRequestData(
                        f"languageMap values of {name!r} must be strings", field=name
                    )
            return payload
        if kind == "ListProperty":
            if not isinstance(payload, list):
                raise BadRequestData(f"valueList of {name!r} must be an array", field=name)
            return payload
        if kind == "ListRelationship":
            if not isinstance(payload, list):
                raise BadRequestData(f"objectList of {name!r} must be an array", field=name)
            out = []
            for item in payload:
                uri = item.get("object") if isinstance(item, dict) else item
                out.append(check_uri(uri, f"{name}.objectList"))
            return out
        if kind == "JsonProperty":
            return payload
        # VocabProperty
        items = payload if isinstance(payload, list) else [payload]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise BadRequestData(f"vocab of {name!r} must be a string or strings", field=name)
        expanded = [self.ctx.expand(str(v)) for v in items]
        return expanded if isinstance(payload, list) else expanded[0]


_FAST_PROPERTY_KEYS = frozenset({"type", "value", "observedAt", "unitCode"})
_FAST_GEO_KEYS = frozenset({"type", "value"})


def _fast_instance(raw: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The stored form of the most common attribute shapes, or None to take the full path.

    Sensor readings are nearly always a Property with a scalar value, observedAt and unitCode,
    or a GeoProperty Point; checking those directly halves the cost of parsing a batch.
    """
    kind = raw.get("type")
    if kind == "Property" and raw.keys() <= _FAST_PROPERTY_KEYS:
        v: Any = raw.get("value")
        tv = type(v)
        if not (tv is int or tv is float or tv is bool or (tv is str and v != NGSI_NULL)):
            return None
        inst: dict[str, Any] = {"type": "Property", "value": v}
        if "observedAt" in raw:
            if raw["observedAt"] == NGSI_NULL:
                return None  # a merge's Null (it deletes observedAt): the full path decides
            inst["observedAt"] = check_datetime(raw["observedAt"], f"{name}.observedAt")
        if "unitCode" in raw:
            unit = raw["unitCode"]
            if type(unit) is not str or not unit:
                return None  # the full path explains what is wrong
            inst["unitCode"] = unit
        return inst
    if kind == "GeoProperty" and raw.keys() <= _FAST_GEO_KEYS:
        g = raw.get("value")
        if type(g) is not dict or g.get("type") != "Point" or len(g) != 2:
            return None
        c = g.get("coordinates")
        if type(c) is not list or len(c) != 2:
            return None
        lon, lat = c
        if (
            (type(lon) is float or type(lon) is int)
            and (type(lat) is float or type(lat) is int)
            and -180 <= lon <= 180
            and -90 <= lat <= 90
        ):
            return {"type": "GeoProperty", "value": {"type": "Point", "coordinates": c}}
    return None


def _is_multi_attribute(items: list[Any]) -> bool:
    """Whether a JSON array given as an attribute is its instances rather than one Property
    whose value is the array.

    Normalized: every member is an instance object (``type`` or ``datasetId``). Concise: the
    default instance may be a bare value (``[1, {"value": 2, "datasetId": "urn:ds:2"}]`` is
    what a multi-attribute renders as), so one member carrying a ``datasetId`` is enough. A
    multi-attribute has at most one instance without a datasetId, so an array of two or more
    instances always has one; an array with none (``[1, 2]``, ``[{"a": 1}]``) is a value.
    """
    if not items:
        return False
    if all(isinstance(v, dict) and ("datasetId" in v or "type" in v) for v in items):
        return True
    return any(isinstance(v, dict) and "datasetId" in v for v in items)


def _infer_kind(raw: dict[str, Any]) -> str | None:
    """The attribute kind of a concise attribute object, or None when nothing tells."""
    if "value" in raw:
        return "Property"
    if "object" in raw:
        return "Relationship"
    if "languageMap" in raw:
        return "LanguageProperty"
    if "valueList" in raw:
        return "ListProperty"
    if "objectList" in raw:
        return "ListRelationship"
    if "json" in raw:
        return "JsonProperty"
    if "vocab" in raw:
        return "VocabProperty"
    return None
