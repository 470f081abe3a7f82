"""The storage interface of the data bank, and what both SQL backends share."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from cityward.bank import geo
from cityward.bank.query.indexer import index_rows, path_id
from cityward.bank.query.sqlgen import Conjunct

Dialect = Literal["sqlite", "postgres"]
IndexRow = tuple[int, int, int, float | None, str | None]
GeoRow = tuple[int, str, float, float, float, float, str]


@dataclass
class QuerySpec:
    """A compiled entity query: SQL conditions over the entity alias ``e`` plus geo and paging."""

    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    # AND-ed index conditions the planner may start from (see Store.plan)
    conjuncts: list[Conjunct] = field(default_factory=list)
    geo: geo.GeoQuery | None = None
    geo_path: str | None = None  # expanded IRI of the GeoProperty the geo-query looks at
    limit: int = 20
    offset: int = 0
    count: bool = False

    def add(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.where.append(sql)
        self.params.extend(params)


def dump_doc(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()


def load_doc(raw: str | bytes) -> dict[str, Any]:
    doc = orjson.loads(raw)
    assert isinstance(doc, dict)
    return doc


def derived_rows(
    pk: int, doc: dict[str, Any]
) -> tuple[list[tuple[int, str]], list[IndexRow], list[GeoRow]]:
    """The rows of etypes, attr_index and geo that mirror one stored document."""
    types = [(pk, t) for t in doc["type"]]
    idx = [(pk, path_id(path), vt, num, txt) for path, vt, num, txt in index_rows(doc)]
    geos: list[GeoRow] = []
    for iri, instances in doc["attrs"].items():
        for inst in instances:
            if inst["type"] == "GeoProperty":
                value = inst["value"]
                minx, miny, maxx, maxy = geo.bbox(value)
                geos.append((pk, iri, minx, miny, maxx, maxy, orjson.dumps(value).decode()))
    return types, idx, geos


class WriteTxn(abc.ABC):
    """One atomic write: read the entities it changes, then put or delete them."""

    @abc.abstractmethod
    def get_many(self, eids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """Current (pk, doc) of the given entity ids that exist, locked until commit."""

    @abc.abstractmethod
    def new_pks(self, n: int) -> list[int]:
        """``n`` fresh primary keys for new entities."""

    @abc.abstractmethod
    def put(self, items: Sequence[tuple[int, dict[str, Any]]], replacing: Sequence[int]) -> None:
        """Store documents under their pks; ``replacing`` lists the pks that exist already."""

    @abc.abstractmethod
    def delete(self, pks: Sequence[int]) -> None:
        """Remove entities and everything derived from them."""


class Store(abc.ABC):
    """One data bank: entities of every tenant with their query indexes."""

    dialect: Dialect

    @abc.abstractmethod
    def write(self, tenant: str, create_tenant: bool) -> AbstractContextManager[WriteTxn]:
        """A write transaction; ``create_tenant`` creates an unknown tenant implicitly."""

    @abc.abstractmethod
    def tenant_exists(self, tenant: str) -> bool: ...

    @abc.abstractmethod
    def get(self, tenant: str, eid: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run a read query (``?`` placeholders) and return all rows."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- shared read logic ------------------------------------------------------------------
    def _geo_candidates_sql(self, spec: QuerySpec) -> tuple[str, list[Any]]:
        """SQL selecting (pk, geometry JSON) of candidate entities by bounding box."""
        raise NotImplementedError

    # A driver that lists fewer entities than this starts the query; otherwise entities are
    # scanned in creation order and every condition is probed per entity, which fills a page
    # fast when matches are common. Counting up to the cap costs at most this many index steps.
    DRIVER_CAP = 2000

    def plan(self, tenant: str, spec: QuerySpec, scan_ok: bool = True) -> tuple[str, list[Any]]:
        """The WHERE clause and parameters for a query, with the cheapest starting point."""
        best: Conjunct | None = None
        best_n = self.DRIVER_CAP
        if scan_ok:
            for c in spec.conjuncts:
                if c.driver is None:
                    continue
                n = int(
                    self._select(
                        f"SELECT count(*) FROM ({c.driver} LIMIT {self.DRIVER_CAP}) d",
                        c.driver_params,
                    )[0][0]
                )
                if n < best_n:
                    best, best_n = c, n
        # SQLite: a unary + keeps the planner off the (tenant, eid) index when scanning, so the
        # scan runs in pk order and stops at the page's end instead of sorting everything.
        scan = best is None and scan_ok and self.dialect == "sqlite"
        parts = ["+e.tenant = ?" if scan else "e.tenant = ?"]
        params: list[Any] = [tenant]
        for c in spec.conjuncts:
            if c is best and c.driver is not None:
                parts.append(f"e.pk IN ({c.driver})")
                params.extend(c.driver_params)
            else:
                parts.append(c.probe)
                params.extend(c.probe_params)
        parts.extend(spec.where)
        params.extend(spec.params)
        return " AND ".join(parts), params

    def query(self, tenant: str, spec: QuerySpec) -> tuple[list[dict[str, Any]], int | None]:
        """One page of matching entities (in creation order) and the total when asked."""
        if spec.geo is not None:
            # the spatial index drives; every other condition is probed per candidate
            where, params = self.plan(tenant, spec, scan_ok=False)
            return self._geo_query(where, params, spec)
        where, params = self.plan(tenant, spec)
        total: int | None = None
        if spec.count:
            total = int(
                self._select(f"SELECT count(*) FROM entities e WHERE {where}", params)[0][0]
            )
        if spec.limit == 0:
            return [], total
        rows = self._select(
            f"SELECT e.doc FROM entities e WHERE {where} ORDER BY e.pk LIMIT ? OFFSET ?",
            [*params, spec.limit, spec.offset],
        )
        return [load_doc(r[0]) for r in rows], total

    def _geo_query(
        self, where: str, params: list[Any], spec: QuerySpec
    ) -> tuple[list[dict[str, Any]], int | None]:
        # Candidates come from the spatial index by bounding box, then the exact predicate runs
        # on their geometries only; paging is applied after it so pages stay exact.
        gq = spec.geo
        assert gq is not None and spec.geo_path is not None
        sql, gparams = self._geo_candidates_sql(spec)
        rows = self._select(
            f"SELECT e.pk, g.geom FROM entities e JOIN ({sql}) g ON g.e = e.pk "
            f"WHERE {where} ORDER BY e.pk",
            [*gparams, *params],
        )
        matched: list[int] = []
        last = None
        for pk, geom in rows:
            if pk == last:
                continue
            if geo.matches(gq, orjson.loads(geom)):
                matched.append(pk)
                last = pk
        total = len(matched) if spec.count else None
        page = matched[spec.offset : spec.offset + spec.limit] if spec.limit else []
        return self.docs_by_pk(page), total

    def docs_by_pk(self, pks: Sequence[int]) -> list[dict[str, Any]]:
        if not pks:
            return []
        marks = ",".join("?" * len(pks))
        rows = self._select(f"SELECT pk, doc FROM entities WHERE pk IN ({marks})", list(pks))
        by_pk = {pk: doc for pk, doc in rows}
        return [load_doc(by_pk[pk]) for pk in pks if pk in by_pk]

    def iter_docs(
        self, tenant: str, where: str = "", params: Sequence[Any] = ()
    ) -> Iterator[dict[str, Any]]:
        """Every document of a tenant matching ``where``, in pages (for discovery)."""
        last = -1
        cond = f" AND {where}" if where else ""
        while True:
            rows = self._select(
                f"SELECT e.pk, e.doc FROM entities e WHERE e.tenant = ? AND e.pk > ?{cond} "
                "ORDER BY e.pk LIMIT 1000",
                [tenant, last, *params],
            )
            if not rows:
                return
            for pk, doc in rows:
                yield load_doc(doc)
                last = pk

    def type_counts(self, tenant: str) -> list[tuple[str, int]]:
        """(type IRI, number of entities) for every type in a tenant."""
        rows = self._select(
            "SELECT t.type, count(*) FROM etypes t JOIN entities e ON e.pk = t.e "
            "WHERE e.tenant = ? GROUP BY t.type ORDER BY t.type",
            [tenant],
        )
        return [(str(r[0]), int(r[1])) for r in rows]
