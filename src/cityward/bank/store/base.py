"""The storage interface of the data bank, and what both SQL backends share."""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from cityward.bank import geo
from cityward.bank.access import current_access
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
    # the expanded entity types the query is limited to (one of them), when ``type`` is a plain
    # list: lets an access restriction that those types already satisfy be left out
    type_names: frozenset[str] | None = None

    def add(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.where.append(sql)
        self.params.extend(params)


def dump_doc(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()


def load_doc(raw: str | bytes) -> dict[str, Any]:
    doc = orjson.loads(raw)
    assert isinstance(doc, dict)
    return doc


@dataclass(slots=True)
class Derived:
    """What a document adds to etypes, attr_index and geo, before it has a pk.

    Computed outside the write lock (see Bank.batch_upsert): it depends on the attributes only,
    not on the entity's system times or primary key.
    """

    types: list[str]
    idx: list[tuple[int, int, float | None, str | None]]  # (path id, vt, num, txt)
    geos: list[tuple[str, float, float, float, float, str]]  # (path, minx, miny, maxx, maxy, json)


def derive(doc: dict[str, Any]) -> Derived:
    idx = [(path_id(path), vt, num, txt) for path, vt, num, txt in index_rows(doc)]
    geos: list[tuple[str, float, float, float, float, str]] = []
    for iri, instances in doc["attrs"].items():
        for inst in instances:
            if inst["type"] == "GeoProperty":
                value = inst["value"]
                minx, miny, maxx, maxy = geo.bbox(value)
                geos.append((iri, minx, miny, maxx, maxy, orjson.dumps(value).decode()))
    return Derived(list(doc["type"]), idx, geos)


def derived_rows(
    pk: int, doc: dict[str, Any], derived: Derived | None = None
) -> tuple[list[tuple[int, str]], list[IndexRow], list[GeoRow]]:
    """The rows of etypes, attr_index and geo that mirror one stored document."""
    d = derived or derive(doc)
    return (
        [(pk, t) for t in d.types],
        [(pk, *row) for row in d.idx],
        [(pk, *g) for g in d.geos],
    )


@dataclass
class Plan:
    """How one query runs: an optional driver (a SELECT of candidate pks) and the filter."""

    where: str
    params: list[Any]
    driver: str | None = None
    driver_params: list[Any] = field(default_factory=list)


#: the advisory lock of PostgreSQL table creation (the store's own migration takes it too)
MIGRATION_LOCK = 74110001


class WriteTxn(abc.ABC):
    """One atomic write: read the entities it changes, then put or delete them.

    ``conn`` is the backend's connection (sqlite3 or psycopg) for write hooks that keep tables
    of their own in the same transaction; ``dialect`` says which.
    """

    dialect: Dialect
    conn: Any

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (``?`` placeholders) in this transaction; rows it returns."""

    def lock_migrations(self) -> None:
        """Wait for other processes creating tables at this moment, until this transaction
        ends. PostgreSQL: two nodes starting together on a new database otherwise race in
        ``CREATE TABLE IF NOT EXISTS`` (a unique violation in the catalog, seen when two
        ingest writers started at once); SQLite's write lock serialises them already."""
        if self.dialect == "postgres":
            self.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")

    def lock_entities(self, eids: Sequence[str]) -> None:
        """Hold these entities until this transaction ends: another writer of one of them
        waits (PostgreSQL: advisory locks, taken in one order; ``get_many`` takes them too).
        SQLite's write lock serialises writers already: nothing to do."""
        return None

    @abc.abstractmethod
    def get_many(self, eids: Sequence[str]) -> dict[str, tuple[int, dict[str, Any]]]:
        """Current (pk, doc) of the given entity ids that exist, locked until commit."""

    @abc.abstractmethod
    def new_pks(self, n: int) -> list[int]:
        """``n`` fresh primary keys for new entities."""

    @abc.abstractmethod
    def put(
        self,
        items: Sequence[tuple[int, dict[str, Any]]],
        replacing: Sequence[int],
        derived: Sequence[Derived | None] = (),
        same_types: Collection[int] = (),
    ) -> None:
        """Store documents under their pks; ``replacing`` lists the pks that exist already.

        ``derived`` may carry each item's :func:`derive` result, computed beforehand.
        ``same_types``: pks of ``replacing`` whose entity types did not change (a store may
        then leave their type rows alone).
        """

    @abc.abstractmethod
    def delete(self, pks: Sequence[int]) -> None:
        """Remove entities and everything derived from them."""


class Store(abc.ABC):
    """One data bank: entities of every tenant with their query indexes."""

    dialect: Dialect

    @abc.abstractmethod
    def write(self, tenant: str, create_tenant: bool) -> AbstractContextManager[WriteTxn]:
        """A write transaction; ``create_tenant`` creates an unknown tenant implicitly."""

    def tenant_exists(self, tenant: str) -> bool:
        """The default tenant always exists; others once something created them."""
        if tenant == "":
            return True
        return bool(self._select("SELECT 1 FROM tenants WHERE name = ?", [tenant]))

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query (``?`` placeholders) outside any write transaction."""
        return self._select(sql, params)

    def get(self, tenant: str, eid: str) -> dict[str, Any] | None:
        """The stored document of one entity, or None."""
        rows = self._select("SELECT doc FROM entities WHERE tenant = ? AND eid = ?", [tenant, eid])
        return load_doc(rows[0][0]) if rows else None

    @abc.abstractmethod
    def _select(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run a read query (``?`` placeholders) and return all rows."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- shared read logic ------------------------------------------------------------------
    def _geo_candidates_sql(self, spec: QuerySpec) -> tuple[str, list[Any]]:
        """SQL selecting (pk, geometry JSON) of candidate entities by bounding box."""
        raise NotImplementedError

    # Counting how many entities a driver lists stops at this many index entries; a driver
    # under CLEARLY_SELECTIVE is taken without counting the others. Examining an entity from a
    # driver costs about DRIVER_WEIGHT times a scanned one (distinct, lookup, sort): measured
    # ~7 us against ~1.4 us on SQLite at 100,000 entities.
    COUNT_CAP = 10_000
    CLEARLY_SELECTIVE = 500
    DRIVER_WEIGHT = 4.0

    def plan(self, tenant: str, spec: QuerySpec, scan_ok: bool = True) -> Plan:
        """The cheapest starting point for a query and the conditions checked on top of it.

        Two ways to find a page: scan entities in creation order and probe every condition
        per entity (cheap when matches are common: the page fills early), or start from the
        one condition whose index lists the fewest entities and probe the rest on those. The
        scan examines about (offset + limit) / selectivity entities, the selectivity estimated
        as the product of the counted drivers' fractions; a driver examines its own count. A
        count needs every match, so then any driver under the cap beats a scan. Types are
        counted only when nothing else can drive: a city has thousands of entities per type.
        """
        best: Conjunct | None = None
        candidates = [c for c in spec.conjuncts if c.driver is not None] if scan_ok else []
        values = [c for c in candidates if "FROM etypes" not in (c.driver or "")]
        drivers = values or candidates
        if drivers:
            total = max(1, int(self._select("SELECT coalesce(max(pk), 0) FROM entities", [])[0][0]))
            cap = min(self.COUNT_CAP, total)
            selectivity = 1.0
            best_n = cap
            for c in drivers:
                n = int(
                    self._select(
                        f"SELECT count(*) FROM ({c.driver} LIMIT {cap}) d", c.driver_params
                    )[0][0]
                )
                selectivity *= min(1.0, max(n, 1) / total)
                if n < best_n:
                    best, best_n = c, n
                if n < self.CLEARLY_SELECTIVE:
                    break
            scan_cost = min(total, (spec.offset + spec.limit) / selectivity)
            if best is not None and not spec.count and best_n * self.DRIVER_WEIGHT >= scan_cost:
                best = None
        if best is None and scan_ok and self.dialect == "sqlite":
            return self._with_driver(tenant, spec, None, ordered_scan=True)
        return self._with_driver(tenant, spec, best)

    def _with_driver(
        self, tenant: str, spec: QuerySpec, best: Conjunct | None, ordered_scan: bool = False
    ) -> Plan:
        """The plan that starts from ``best`` (None: from the entities) and probes the rest."""
        # SQLite: a unary + keeps the planner off the (tenant, eid) index when scanning, so the
        # scan runs in pk order and stops at the page's end instead of sorting everything.
        parts = ["+e.tenant = ?" if ordered_scan else "e.tenant = ?"]
        params: list[Any] = [tenant]
        for c in spec.conjuncts:
            if c is not best:
                # PostgreSQL turns a bare EXISTS into a semi-join over the whole index; "IS TRUE"
                # keeps it a per-row check, so an ordered scan can stop at the page's end.
                parts.append(f"({c.probe}) IS TRUE" if self.dialect == "postgres" else c.probe)
                params.extend(c.probe_params)
        parts.extend(spec.where)
        params.extend(spec.params)
        if best is None or best.driver is None:
            return Plan(" AND ".join(parts), params)
        return Plan(" AND ".join(parts), params, best.driver, best.driver_params)

    # A page query first scans a window of this many entities in pk order (see _adaptive)
    FIRST_WINDOW = 2000
    # Deeper pages than this use the planner alone: the adaptive path holds the pks in Python
    ADAPTIVE_MAX_NEED = 5000

    def query(self, tenant: str, spec: QuerySpec) -> tuple[list[dict[str, Any]], int | None]:
        """One page of matching entities (in creation order) and the total when asked.

        Under an access restriction (see cityward.bank.access) only what may be read matches,
        and the answer is reported back for the audit trail.
        """
        access = current_access.get()
        if access is None:
            return self._query(tenant, spec)
        restriction = access.conjunct(self.dialect, spec.type_names)
        if restriction is not None:
            spec.conjuncts.append(restriction)
        docs, total = self._query(tenant, spec)
        access.returned(docs)
        return docs, total

    def _query(self, tenant: str, spec: QuerySpec) -> tuple[list[dict[str, Any]], int | None]:
        if spec.geo is not None:
            # the spatial index drives; every other condition is probed per candidate
            geo_plan = self.plan(tenant, spec, scan_ok=False)
            return self._geo_query(geo_plan.where, geo_plan.params, spec)
        need = spec.offset + spec.limit
        if (
            not spec.count
            and spec.limit > 0
            and need <= self.ADAPTIVE_MAX_NEED
            and any(c.driver is not None for c in spec.conjuncts)
        ):
            pks = self._adaptive(tenant, spec, need)
            return self.docs_by_pk(pks[spec.offset : need]), None
        plan = self.plan(tenant, spec)
        source, where, params = self._source(plan)
        total: int | None = None
        if spec.count:
            total = int(self._select(f"SELECT count(*) FROM {source} WHERE {where}", params)[0][0])
        if spec.limit == 0:
            return [], total
        if plan.driver is not None:
            # sort the driver's matches by pk alone, then read just the page's documents
            page = self._select(
                f"SELECT e.pk FROM {source} WHERE {where} ORDER BY e.pk LIMIT ? OFFSET ?",
                [*params, spec.limit, spec.offset],
            )
            return self.docs_by_pk([int(r[0]) for r in page]), total
        rows = self._select(
            f"SELECT e.doc FROM {source} WHERE {where} ORDER BY e.pk LIMIT ? OFFSET ?",
            [*params, spec.limit, spec.offset],
        )
        return [load_doc(r[0]) for r in rows], total

    def _source(self, plan: Plan) -> tuple[str, str, list[Any]]:
        """FROM clause, WHERE clause and parameters that run a plan."""
        if plan.driver is None:
            return "entities e", plan.where, plan.params
        if self.dialect == "sqlite":
            # CROSS JOIN makes SQLite loop over the driver's few pks; left to itself it
            # prefers scanning every entity in pk order to avoid sorting the page.
            source = f"(SELECT DISTINCT * FROM ({plan.driver})) d CROSS JOIN entities e"
            return source, f"e.pk = d.e AND {plan.where}", [*plan.driver_params, *plan.params]
        return (
            "entities e",
            f"e.pk IN ({plan.driver}) AND {plan.where}",
            [*plan.driver_params, *plan.params],
        )

    def _adaptive(self, tenant: str, spec: QuerySpec, need: int) -> list[int]:
        """The first ``need`` matching pks: scan a first window, then scan on or drive.

        Estimating a filter's selectivity from per-condition counts goes wrong exactly where it
        matters (capped counts, correlated conditions), and a wrong guess costs several times
        the right plan. So the query starts by scanning the first FIRST_WINDOW entities in pk
        order, which is cheap (about a microsecond per entity on SQLite) and is useful work:
        a common filter fills its page right there. Otherwise the window measured the
        selectivity, which prices scanning on; a driver is taken for the rest only when its
        count, capped at that price, says it is cheaper.
        """
        scan = self._with_driver(tenant, spec, None, ordered_scan=self.dialect == "sqlite")
        window = max(self.FIRST_WINDOW, 2 * need)
        top = int(self._select("SELECT coalesce(max(pk), 0) FROM entities", [])[0][0])
        rows = self._select(
            f"SELECT e.pk FROM entities e WHERE {scan.where} AND e.pk <= ? ORDER BY e.pk LIMIT ?",
            [*scan.params, window, need],
        )
        pks = [int(r[0]) for r in rows]
        if len(pks) >= need or window >= top:
            return pks
        missing = need - len(pks)
        selectivity = max(len(pks), 0.5) / window
        scan_cost = min(top - window, missing / selectivity)
        cap = int(scan_cost / self.DRIVER_WEIGHT)
        best: Conjunct | None = None
        best_n = cap
        drivers = [c for c in spec.conjuncts if c.driver is not None]
        # value conditions first: a type usually lists far more entities
        drivers.sort(key=lambda c: "FROM etypes" in (c.driver or ""))
        for c in drivers:
            sql = f"SELECT count(*) FROM ({c.driver} LIMIT {cap}) d"
            n = int(self._select(sql, c.driver_params)[0][0])
            if n < best_n:
                best, best_n = c, n
            if n < self.CLEARLY_SELECTIVE:
                break
        if best is None:
            rest = self._select(
                f"SELECT e.pk FROM entities e WHERE {scan.where} AND e.pk > ? "
                "ORDER BY e.pk LIMIT ?",
                [*scan.params, window, missing],
            )
        else:
            plan = self._with_driver(tenant, spec, best)
            source, where, params = self._source(plan)
            rest = self._select(
                f"SELECT e.pk FROM {source} WHERE {where} AND e.pk > ? ORDER BY e.pk LIMIT ?",
                [*params, window, missing],
            )
        pks.extend(int(r[0]) for r in rest)
        return pks

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
