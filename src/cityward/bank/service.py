"""The NGSI-LD entity operations: create, read, merge, replace, delete, batches and queries.

The service works on stored-form documents (docs/bank-internals.md); HTTP and JSON-LD details
stay in ``cityward.api``. Every write is one store transaction, so a failure leaves nothing
half-written, and a batch reports each entity's failure without dropping its neighbours.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from cityward.bank.access import check_read, write_error
from cityward.bank.changes import Change, ChangeFeed
from cityward.bank.errors import (
    AlreadyExists,
    BadRequestData,
    NgsiError,
    NonexistentTenant,
    ResourceNotFound,
    StoreRefused,
)
from cityward.bank.model import NGSI_NULL, PAYLOAD, now_iso
from cityward.bank.store import Store, WriteTxn
from cityward.bank.store.base import Derived, derive

Doc = dict[str, Any]
Instance = dict[str, Any]


@dataclass
class BatchResult:
    """Outcome of a batch: ids that succeeded (and were created) and per-entity errors."""

    success: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list, repr=False)  # for hooks and the feed
    # the errors themselves, in the order of ``errors`` (single-entity calls re-raise them)
    raised: list[NgsiError] = field(default_factory=list, repr=False)

    def fail(self, entity_id: str | None, error: NgsiError) -> None:
        self.errors.append({"entityId": entity_id, "error": error.problem()})
        self.raised.append(error)

    def extend(self, other: BatchResult) -> None:
        """Add the outcome of another part of the same batch, after this one's."""
        self.success.extend(other.success)
        self.created.extend(other.created)
        self.errors.extend(other.errors)
        self.raised.extend(other.raised)
        self.changes.extend(other.changes)


@dataclass
class UpdateResult:
    updated: list[str] = field(default_factory=list)
    not_updated: list[tuple[str, str]] = field(default_factory=list)  # (attribute IRI, reason)


# -- helpers on stored documents ------------------------------------------------------------
# markers EntityParser leaves on fragment instances; never stored
_PARSER_FLAGS = ("_untyped", "_delete", "_name")


def strip_flags(inst: Instance) -> Instance:
    for flag in _PARSER_FLAGS:
        inst.pop(flag, None)
    return inst


def _clean(inst: Instance, now: str, old: Instance | None) -> Instance:
    """Drop parser flags and stamp system times of an instance that is new or replaces ``old``
    (createdAt kept from it), its sub-attributes' included."""
    strip_flags(inst)
    inst["createdAt"] = (old.get("createdAt") if old else None) or now
    inst["modifiedAt"] = now
    _stamp_subs(inst, old, now)
    return inst


_SYSTEM_TIMES = ("createdAt", "modifiedAt")


def _content(inst: Instance) -> Instance:
    """An instance without its system times, at any depth: what a change changes."""
    out = {k: v for k, v in inst.items() if k not in _SYSTEM_TIMES and k != "sub"}
    sub = inst.get("sub")
    if sub:
        out["sub"] = {iri: _content(s) for iri, s in sub.items()}
    return out


def _same_content(a: Instance, b: Instance) -> bool:
    # as JSON text: in Python 1 == 1.0 == True, and a value turned from 1 into true changed
    dump = orjson.OPT_SORT_KEYS
    return orjson.dumps(_content(a), option=dump) == orjson.dumps(_content(b), option=dump)


def _stamp(sub: Instance, old: Instance | None, now: str) -> None:
    """System times of a sub-attribute that is new (``old`` None) or replaces ``old``: created
    when it first appeared, modified when its own content last changed. (Sub-attributes had no
    times, or took ``now`` for both at their first merge, and an unchanged one re-sent with
    its attribute looked modified.)"""
    sub["createdAt"] = (old.get("createdAt") if old else None) or now
    if old is not None and "modifiedAt" in old and _same_content(sub, old):
        sub["modifiedAt"] = old["modifiedAt"]
    else:
        sub["modifiedAt"] = now


def _stamp_subs(inst: Instance, old: Instance | None, now: str) -> None:
    """:func:`_stamp` every sub-attribute of ``inst``, at any depth, against the same-named
    ones of ``old`` (the instance it replaces, or None)."""
    sub = inst.get("sub")
    if not sub:
        return
    old_sub: dict[str, Instance] = (old.get("sub") if old else None) or {}
    for iri, s in sub.items():
        strip_flags(s)
        prev = old_sub.get(iri)
        _stamp_subs(s, prev, now)
        _stamp(s, prev, now)


def _languages(lang_map: dict[str, Any]) -> dict[str, Any]:
    """A languageMap without the languages a merge's NGSI-LD Null deletes."""
    return {tag: text for tag, text in lang_map.items() if text != NGSI_NULL}


def _fresh(inst: Instance) -> Instance | None:
    """An instance a merge adds, without what its NGSI-LD Nulls asked for: with nothing stored
    to delete they mean nothing, so a Null member (``observedAt``), a sub-attribute that is
    Null and a language that is Null are dropped, at any depth. (They were stored as data:
    ``observedAt`` the text ``urn:ngsi-ld:null``, which ``q`` then compared as a time.) None
    when nothing is left: a languageMap of Nulls alone."""
    sub = inst.get("sub")
    if sub:
        for iri in list(sub):
            if sub[iri].get("_delete") or _fresh(sub[iri]) is None:
                del sub[iri]
        if not sub:
            del inst["sub"]
    strip_flags(inst)
    for key in [k for k, v in inst.items() if v == NGSI_NULL and k != "type"]:
        del inst[key]
    lang_map = inst.get("languageMap")
    if isinstance(lang_map, dict):
        inst["languageMap"] = _languages(lang_map)
        if not inst["languageMap"]:
            return None
    return inst


def _copy(doc: Doc) -> Doc:
    """A deep copy of a stored document (JSON data: orjson is several times deepcopy's speed)."""
    out = orjson.loads(orjson.dumps(doc))
    assert isinstance(out, dict)
    return out


WriteHook = Callable[[WriteTxn, list[Change]], None]


def _find(instances: list[Instance], dataset_id: str | None) -> int:
    for n, inst in enumerate(instances):
        if inst.get("datasetId") == dataset_id:
            return n
    return -1


def new_document(frag: Doc, now: str) -> Doc:
    """A complete stored document from a parsed create body."""
    doc: Doc = {"id": frag["id"], "type": frag["type"]}
    if frag.get("scope"):
        doc["scope"] = frag["scope"]
    doc["createdAt"] = now
    doc["modifiedAt"] = now
    doc["attrs"] = {
        iri: [_clean(i, now, None) for i in instances] for iri, instances in frag["attrs"].items()
    }
    return doc


def _merge_instance(old: Instance, new: Instance, now: str) -> Instance | None:
    """Deep-merge a fragment instance into a stored one (payload replaced, sub-attrs merged,
    a languageMap merged language by language). None when nothing is left of it: a merge
    whose NGSI-LD Nulls deleted every language of a LanguageProperty."""
    out = copy.deepcopy(old)
    kind = old["type"] if new.get("_untyped") else new["type"]
    if kind != old["type"]:
        if PAYLOAD[kind] not in new:
            # stored, an attribute of the new kind without its payload made every later read
            # of the entity (and every query that found it) a 500
            name = new.get("_name", "attribute")
            raise BadRequestData(
                f"{name!r}: a {kind} needs its {PAYLOAD[kind]!r} to replace a {old['type']}",
                field=name,
            )
        # what belongs to the old kind only goes: a Relationship has no unitCode, only
        # relationships have an objectType (kept, the entity could not be written back)
        if kind in ("Relationship", "ListRelationship"):
            out.pop("unitCode", None)
        else:
            out.pop("objectType", None)
        # a different kind replaces the payload member
        for member in (
            "value",
            "object",
            "languageMap",
            "valueList",
            "objectList",
            "json",
            "vocab",
        ):
            out.pop(member, None)
        out["type"] = kind
    for key, val in new.items():
        if key in ("type", "createdAt", "modifiedAt") or key in _PARSER_FLAGS:
            continue
        if key == "sub":
            subs = out.setdefault("sub", {})
            for iri, s in val.items():
                prev = subs.get(iri)
                merged = None
                if s.get("_delete"):
                    pass
                elif prev is not None:
                    merged = _merge_instance(prev, s, now)
                else:
                    merged = _fresh(s)
                    if merged is not None:
                        _stamp_subs(merged, None, now)
                if merged is None:
                    subs.pop(iri, None)
                else:
                    _stamp(merged, prev, now)
                    subs[iri] = merged
            if not subs:
                out.pop("sub")
        elif key == "languageMap" and isinstance(val, dict):
            # the language map is JSON-LD's @language container: a set of strings, one per
            # language, so a merge sets the languages it names and its Nulls delete theirs
            # (the whole map was replaced, and a Null stored as the text of its language)
            lang_map = _languages({**out.get("languageMap", {}), **val})
            if not lang_map:
                return None
            out[key] = lang_map
        elif val == NGSI_NULL:
            out.pop(key, None)
        else:
            out[key] = val
    out["modifiedAt"] = now
    out.setdefault("createdAt", now)
    return out


def _require_payload(inst: Instance, iri: str) -> None:
    """A new attribute instance needs its value (a merge fragment may leave it out otherwise)."""
    if inst.get("_untyped") or PAYLOAD[inst["type"]] not in inst:
        name = inst.get("_name", iri)
        raise BadRequestData(
            f"new attribute {name!r} needs its {PAYLOAD[inst['type']]!r} member", field=name
        )


class Bank:
    """NGSI-LD entity operations over one :class:`Store`."""

    def __init__(self, store: Store, default_limit: int = 20, max_limit: int = 1000) -> None:
        self.store = store
        self.default_limit = default_limit
        self.max_limit = max_limit
        # run inside every write transaction, before it commits (history, notifications)
        self.hooks: list[WriteHook] = []
        # run before each write transaction opens, with the documents or fragments it is to
        # store: work that must not happen inside one (history: PostgreSQL month partitions,
        # made on a pooled connection of their own)
        self.before_write: list[Callable[[Sequence[Doc]], None]] = []
        # committed changes for in-process followers
        self.feed = ChangeFeed()
        # False when a bus (cityward.bus) feeds ``feed`` instead: followers would see each
        # change twice otherwise
        self.publish_local = True

    def _before_write(self, docs: Sequence[Doc]) -> None:
        for prepare in self.before_write:
            prepare(docs)

    def _after_write(self, txn: WriteTxn, changes: list[Change]) -> None:
        for hook in self.hooks:
            hook(txn, changes)

    # -- tenants ----------------------------------------------------------------------------
    def check_tenant(self, tenant: str) -> None:
        if not self.store.tenant_exists(tenant):
            raise NonexistentTenant(f"tenant {tenant!r} does not exist", field="NGSILD-Tenant")

    # -- single entity ----------------------------------------------------------------------
    def create(self, tenant: str, frag: Doc) -> None:
        result = self.batch_create(tenant, [frag])
        if result.errors:
            raise result.raised[0]

    def retrieve(self, tenant: str, eid: str, types: Sequence[str] | None = None) -> Doc:
        self.check_tenant(tenant)
        doc = self.store.get(tenant, eid)
        if doc is None or (types is not None and not set(types) & set(doc["type"])):
            raise ResourceNotFound(f"entity {eid} not found", field="id")
        check_read(eid, doc["type"])
        return doc

    def _modify(
        self,
        tenant: str,
        eid: str,
        change: Callable[[Doc, str], Doc | None],
        types: Sequence[str] | None = None,
        incoming: Doc | None = None,
    ) -> None:
        """Read-modify-write of one entity in a transaction; ``change`` returns None to delete.
        ``incoming``: what the change brings in, for the before_write callbacks."""
        self.check_tenant(tenant)
        if incoming is not None:
            self._before_write([incoming])
        with self.store.write(tenant, create_tenant=False) as txn:
            found = txn.get_many([eid]).get(eid)
            if found is None or (types is not None and not set(types) & set(found[1]["type"])):
                raise ResourceNotFound(f"entity {eid} not found", field="id")
            pk, doc = found
            _check_write(eid, doc["type"])
            before = _copy(doc)
            now = now_iso()
            new = change(doc, now)
            if new is not None and new["type"] != before["type"]:
                _check_write(eid, new["type"])
            if new is None:
                txn.delete([pk])
            else:
                new["modifiedAt"] = now
                txn.put([(pk, new)], replacing=[pk])
            changes = [Change(tenant, pk, eid, before, new, now)]
            self._after_write(txn, changes)
        if self.publish_local:
            self.feed.publish(changes)

    def replace(self, tenant: str, eid: str, frag: Doc) -> None:
        def change(doc: Doc, now: str) -> Doc:
            new = new_document({**frag, "id": eid, "type": frag.get("type", doc["type"])}, now)
            new["createdAt"] = doc["createdAt"]
            return new

        self._modify(tenant, eid, change, incoming=frag)

    def delete(self, tenant: str, eid: str, types: Sequence[str] | None = None) -> None:
        self._modify(tenant, eid, lambda doc, now: None, types)

    def merge(self, tenant: str, eid: str, frag: Doc) -> None:
        self._modify(tenant, eid, lambda doc, now: self._merge_doc(doc, frag, now), incoming=frag)

    def append(self, tenant: str, eid: str, frag: Doc, no_overwrite: bool) -> UpdateResult:
        result = UpdateResult()
        self._modify(
            tenant,
            eid,
            lambda doc, now: self._append_doc(doc, frag, now, no_overwrite, result),
            incoming=frag,
        )
        return result

    def update_attrs(self, tenant: str, eid: str, frag: Doc) -> UpdateResult:
        result = UpdateResult()
        self._modify(
            tenant, eid, lambda doc, now: self._update_doc(doc, frag, now, result), incoming=frag
        )
        return result

    def patch_attr(self, tenant: str, eid: str, iri: str, instances: list[Instance]) -> None:
        """Partial update of one attribute: the attribute and each datasetId must exist."""

        def change(doc: Doc, now: str) -> Doc:
            current = doc["attrs"].get(iri)
            if current is None:
                raise ResourceNotFound(f"attribute {iri} not found in {eid}", field="attrId")
            for inst in instances:
                n = _find(current, inst.get("datasetId"))
                if n < 0:
                    raise ResourceNotFound(
                        f"attribute {iri} has no instance with datasetId {inst.get('datasetId')}",
                        field="datasetId",
                    )
                merged = None if inst.get("_delete") else _merge_instance(current[n], inst, now)
                if merged is None:
                    current.pop(n)
                else:
                    current[n] = merged
            if not current:
                del doc["attrs"][iri]
            return doc

        self._modify(tenant, eid, change, incoming={"attrs": {iri: instances}})

    def replace_attr(self, tenant: str, eid: str, iri: str, instances: list[Instance]) -> None:
        def change(doc: Doc, now: str) -> Doc:
            current = doc["attrs"].get(iri)
            if current is None:
                raise ResourceNotFound(f"attribute {iri} not found in {eid}", field="attrId")
            for inst in instances:
                n = _find(current, inst.get("datasetId"))
                if n < 0:
                    current.append(_clean(inst, now, None))
                else:
                    current[n] = _clean(inst, now, current[n])
            return doc

        self._modify(tenant, eid, change, incoming={"attrs": {iri: instances}})

    def delete_attr(
        self, tenant: str, eid: str, iri: str, dataset_id: str | None, delete_all: bool
    ) -> None:
        def change(doc: Doc, now: str) -> Doc:
            current = doc["attrs"].get(iri)
            if current is None:
                raise ResourceNotFound(f"attribute {iri} not found in {eid}", field="attrId")
            if delete_all:
                del doc["attrs"][iri]
                return doc
            n = _find(current, dataset_id)
            if n < 0:
                what = f"datasetId {dataset_id}" if dataset_id else "a default instance"
                raise ResourceNotFound(f"attribute {iri} has no {what}", field="datasetId")
            current.pop(n)
            if not current:
                del doc["attrs"][iri]
            return doc

        self._modify(tenant, eid, change)

    # -- document transforms ----------------------------------------------------------------
    @staticmethod
    def _merge_doc(doc: Doc, frag: Doc, now: str) -> Doc:
        if "type" in frag:
            doc["type"] = list(dict.fromkeys([*doc["type"], *frag["type"]]))
        if "scope" in frag:
            if frag["scope"] == NGSI_NULL:
                doc.pop("scope", None)
            else:
                doc["scope"] = frag["scope"]
        for iri, instances in frag["attrs"].items():
            current = doc["attrs"].get(iri)
            for inst in instances:
                ds = inst.get("datasetId")
                if inst.get("_delete"):
                    if current is not None:
                        n = _find(current, ds)
                        if n >= 0:
                            current.pop(n)
                    continue
                if current is None:
                    current = doc["attrs"][iri] = []
                n = _find(current, ds)
                if n < 0:
                    _require_payload(inst, iri)
                    fresh = _fresh(inst)
                    if fresh is not None:
                        current.append(_clean(fresh, now, None))
                    continue
                merged = _merge_instance(current[n], inst, now)
                if merged is None:
                    current.pop(n)
                else:
                    current[n] = merged
            if current is not None and not current:
                doc["attrs"].pop(iri, None)
        return doc

    @staticmethod
    def _append_doc(doc: Doc, frag: Doc, now: str, no_overwrite: bool, result: UpdateResult) -> Doc:
        if "type" in frag:
            doc["type"] = list(dict.fromkeys([*doc["type"], *frag["type"]]))
        if "scope" in frag:
            if no_overwrite:
                doc["scope"] = list(dict.fromkeys([*doc.get("scope", []), *frag["scope"]]))
            else:
                doc["scope"] = frag["scope"]
        for iri, instances in frag["attrs"].items():
            current = doc["attrs"].setdefault(iri, [])
            changed = False
            for inst in instances:
                n = _find(current, inst.get("datasetId"))
                if n < 0:
                    current.append(_clean(inst, now, None))
                    changed = True
                elif no_overwrite:
                    result.not_updated.append((iri, "attribute exists and noOverwrite is set"))
                else:
                    current[n] = _clean(inst, now, current[n])
                    changed = True
            if changed:
                result.updated.append(iri)
        return doc

    @staticmethod
    def _update_doc(doc: Doc, frag: Doc, now: str, result: UpdateResult) -> Doc:
        for iri, instances in frag["attrs"].items():
            current = doc["attrs"].get(iri)
            if current is None:
                result.not_updated.append((iri, "attribute does not exist"))
                continue
            changed = False
            for inst in instances:
                n = _find(current, inst.get("datasetId"))
                if n < 0:
                    result.not_updated.append((iri, "no instance with this datasetId"))
                elif inst.get("_delete"):
                    current.pop(n)
                    changed = True
                else:
                    current[n] = _clean(inst, now, current[n])
                    changed = True
            if not current:
                del doc["attrs"][iri]
            if changed:
                result.updated.append(iri)
        return doc

    # -- batches ----------------------------------------------------------------------------
    def _batch(
        self,
        tenant: str,
        items: Sequence[Doc | tuple[str | None, NgsiError]],
        create_tenant: bool,
        apply: Callable[[WriteTxn, list[Doc], BatchResult], None],
        prepare: Callable[[list[Doc]], None] | None = None,
    ) -> BatchResult:
        """Run ``apply`` on the well-formed items in one transaction.

        ``prepare`` runs first, outside the write lock: whatever does not depend on the stored
        state (new documents, their index rows) is built there, so that concurrent requests
        build theirs while another one writes.
        """
        result = BatchResult()
        good: list[Doc] = []
        for item in items:
            if isinstance(item, tuple):
                result.fail(item[0], item[1])
            elif "type" in item and (denied := write_error(item["id"], item["type"])):
                result.fail(item["id"], denied)
            else:
                good.append(item)
        if not create_tenant:
            self.check_tenant(tenant)
        if good and prepare is not None:
            prepare(good)
        if good:
            self._before_write(good)
            self._write_batch(tenant, good, create_tenant, apply, result)
        return result

    def _write_batch(
        self,
        tenant: str,
        items: list[Doc],
        create_tenant: bool,
        apply: Callable[[WriteTxn, list[Doc], BatchResult], None],
        result: BatchResult,
    ) -> None:
        """Apply ``items`` in one transaction. If the database refuses it for its data (a text
        PostgreSQL cannot store or index: StoreRefused), the halves are written apart, in
        order, until the entity that causes it is alone and fails by itself: a bad entity
        never costs its neighbours their write."""
        part = BatchResult()
        try:
            with self.store.write(tenant, create_tenant=create_tenant) as txn:
                apply(txn, items, part)
                self._after_write(txn, part.changes)
        except StoreRefused as exc:
            if len(items) == 1:
                result.fail(items[0].get("id"), exc)
                return
            half = len(items) // 2
            self._write_batch(tenant, items[:half], create_tenant, apply, result)
            self._write_batch(tenant, items[half:], create_tenant, apply, result)
            return
        result.extend(part)
        if self.publish_local:
            self.feed.publish(part.changes)

    def batch_create(
        self, tenant: str, items: Sequence[Doc | tuple[str | None, NgsiError]]
    ) -> BatchResult:
        now = now_iso()
        built: dict[int, tuple[Doc, Derived]] = {}

        def prepare(frags: list[Doc]) -> None:
            for frag in frags:
                doc = new_document(frag, now)
                built[id(frag)] = (doc, derive(doc))

        def apply(txn: WriteTxn, frags: list[Doc], result: BatchResult) -> None:
            existing = txn.get_many([f["id"] for f in frags])
            seen: set[str] = set()
            new: list[tuple[Doc, Derived]] = []
            for frag in frags:
                eid = frag["id"]
                if eid in existing or eid in seen:
                    result.fail(eid, AlreadyExists(f"entity {eid} already exists", field="id"))
                    continue
                seen.add(eid)
                new.append(built[id(frag)])
            pks = txn.new_pks(len(new))
            txn.put(
                [(pk, doc) for pk, (doc, _) in zip(pks, new, strict=True)],
                replacing=[],
                derived=[d for _, d in new],
            )
            result.changes.extend(
                Change(tenant, pk, doc["id"], None, doc, now)
                for pk, (doc, _) in zip(pks, new, strict=True)
            )
            result.success.extend(d["id"] for d, _ in new)
            result.created.extend(d["id"] for d, _ in new)

        return self._batch(tenant, items, True, apply, prepare)

    def batch_upsert(
        self,
        tenant: str,
        items: Sequence[Doc | tuple[str | None, NgsiError]],
        mode: Literal["replace", "update"],
        gate: Callable[[WriteTxn, list[Doc]], list[Doc]] | None = None,
    ) -> BatchResult:
        """Create or change entities (``mode``: replace them, or update their attributes).

        ``gate`` runs first inside the write transaction and returns the items to apply: the
        ingest writer drops deliveries it has applied before and records the new ones there,
        so the record commits or rolls back with the write (exactly-once ingest).
        """
        now = now_iso()
        built: dict[int, tuple[Doc, Derived]] = {}

        def prepare(frags: list[Doc]) -> None:
            # replace: the new document does not depend on the stored one (but for createdAt,
            # which no index row holds); update: only entities that turn out new use it
            if mode == "replace":
                for frag in frags:
                    doc = new_document(frag, now)
                    built[id(frag)] = (doc, derive(doc))

        def apply(txn: WriteTxn, frags: list[Doc], result: BatchResult) -> None:
            if gate is not None:
                frags = gate(txn, frags)
            existing = txn.get_many([f["id"] for f in frags])
            touched: dict[str, tuple[int | None, Doc, Derived | None]] = {}
            # an entity named again: the documents its earlier items made (_store_touched)
            earlier: dict[str, list[Doc]] = {}
            for frag in frags:
                eid = frag["id"]
                ready = built.get(id(frag))
                prior = touched.get(eid)
                again = prior is not None
                if prior is None and eid in existing:
                    prior = (*existing[eid], None)
                if prior is None:
                    doc, derived = ready or (new_document(frag, now), None)
                    touched[eid] = (None, doc, derived)
                    continue
                pk, old, _ = prior
                if (denied := write_error(eid, old["type"])) is not None:
                    result.fail(eid, denied)
                    continue
                if ready is not None:
                    new, derived = ready
                    new["createdAt"] = old["createdAt"]
                else:
                    new = self._append_doc(_copy(old), frag, now, False, UpdateResult())
                    new["modifiedAt"] = now
                    derived = None
                if again:
                    earlier.setdefault(eid, []).append(old)
                touched[eid] = (pk, new, derived)
            self._store_touched(txn, touched, result, tenant, existing, now, earlier)

        return self._batch(tenant, items, True, apply, prepare)

    @staticmethod
    def _store_touched(
        txn: WriteTxn,
        touched: dict[str, tuple[int | None, Doc, Derived | None]],
        result: BatchResult,
        tenant: str,
        existing: dict[str, tuple[int, Doc]],
        now: str,
        earlier: dict[str, list[Doc]],
    ) -> None:
        """Write the documents a batch produced: new ones get fresh pks, the rest replace.

        ``existing`` holds the documents as stored before the batch (never modified in place).
        ``earlier``: for an entity the batch names more than once, the documents its earlier
        items made, in order. Only the last document is stored, but each item gets a Change of
        its own, chained, as if the items had been written one after another: one Change from
        the stored document to the last skipped the earlier items' values (the attribute
        history lost those readings; subscriptions and change-feed followers never saw them).
        Nothing is kept for an entity named once, the common case.
        """
        fresh = [eid for eid, (pk, _, _) in touched.items() if pk is None]
        pks = iter(txn.new_pks(len(fresh)))
        items: list[tuple[int, Doc]] = []
        derived: list[Derived | None] = []
        replacing: list[int] = []
        same_types: set[int] = set()
        for eid, (pk, doc, d) in touched.items():
            before = existing.get(eid)
            if pk is None:
                pk = next(pks)
                result.created.append(eid)
            else:
                replacing.append(pk)
                if before is not None and before[1]["type"] == doc["type"]:
                    same_types.add(pk)
            items.append((pk, doc))
            derived.append(d)
            result.success.append(eid)
            prev = before[1] if before else None
            for step in earlier.get(eid, ()) if earlier else ():
                result.changes.append(Change(tenant, pk, eid, prev, step, now))
                prev = step
            result.changes.append(Change(tenant, pk, eid, prev, doc, now))
        txn.put(items, replacing=replacing, derived=derived, same_types=same_types)

    def batch_update(
        self,
        tenant: str,
        items: Sequence[Doc | tuple[str | None, NgsiError]],
        no_overwrite: bool,
        merge: bool = False,
    ) -> BatchResult:
        def apply(txn: WriteTxn, frags: list[Doc], result: BatchResult) -> None:
            existing = txn.get_many([f["id"] for f in frags])
            now = now_iso()
            # An entity is in ``success`` once one of its items is applied, and each refused
            # item (or, with noOverwrite, its refused part) is in ``errors``: an entity given
            # twice whose second item is refused keeps the first item's change, and says so.
            # (It was reported as failed alone while the first item's change was committed.)
            touched: dict[str, tuple[int | None, Doc, Derived | None]] = {}
            earlier: dict[str, list[Doc]] = {}  # as in batch_upsert
            for frag in frags:
                eid = frag["id"]
                prior = touched.get(eid)
                again = prior is not None
                if prior is None and eid in existing:
                    prior = (*existing[eid], None)
                if prior is None:
                    result.fail(eid, ResourceNotFound(f"entity {eid} not found", field="id"))
                    continue
                pk, doc, _ = prior
                if (denied := write_error(eid, doc["type"])) is not None:
                    result.fail(eid, denied)
                    continue
                upd = UpdateResult()
                try:
                    if merge:
                        new = self._merge_doc(_copy(doc), frag, now)
                    else:
                        new = self._append_doc(_copy(doc), frag, now, no_overwrite, upd)
                except NgsiError as exc:
                    result.fail(eid, exc)
                    continue
                if upd.not_updated:
                    names = ", ".join(sorted({a for a, _ in upd.not_updated}))
                    result.fail(
                        eid,
                        BadRequestData(
                            f"attributes not overwritten (noOverwrite): {names}", field="attrs"
                        ),
                    )
                    if not upd.updated and (new["type"], new.get("scope")) == (
                        doc["type"],
                        doc.get("scope"),
                    ):
                        continue  # nothing of the item applies: the entity is left as it was
                new["modifiedAt"] = now
                if again:
                    earlier.setdefault(eid, []).append(doc)
                touched[eid] = (pk, new, None)
            self._store_touched(txn, touched, result, tenant, existing, now, earlier)

        return self._batch(tenant, items, False, apply)

    def batch_delete(
        self, tenant: str, ids: Sequence[str | tuple[str | None, NgsiError]]
    ) -> BatchResult:
        result = BatchResult()
        good: list[str] = []
        for item in ids:
            if isinstance(item, tuple):
                result.fail(item[0], item[1])
            else:
                good.append(item)
        self.check_tenant(tenant)
        if not good:
            return result
        with self.store.write(tenant, create_tenant=False) as txn:
            existing = txn.get_many(good)
            pks: list[int] = []
            seen: set[str] = set()
            for eid in good:
                if eid not in existing or eid in seen:
                    result.fail(eid, ResourceNotFound(f"entity {eid} not found", field="id"))
                    continue
                if (denied := write_error(eid, existing[eid][1]["type"])) is not None:
                    result.fail(eid, denied)
                    continue
                seen.add(eid)
                pks.append(existing[eid][0])
                result.success.append(eid)
            txn.delete(pks)
            now = now_iso()
            result.changes.extend(
                Change(tenant, existing[eid][0], eid, existing[eid][1], None, now)
                for eid in result.success
            )
            self._after_write(txn, result.changes)
        if self.publish_local:
            self.feed.publish(result.changes)
        return result


def _check_write(eid: str, types: Sequence[str]) -> None:
    denied = write_error(eid, types)
    if denied is not None:
        raise denied
