"""Everything governance needs at run time, built once per API process from the settings."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from cityward.bank.access import Access, DerivedIds, selection_conjunct
from cityward.bank.errors import Forbidden, NgsiError
from cityward.bank.jsonld import ContextResolver
from cityward.bank.query.sqlgen import Conjunct
from cityward.bank.store import Store
from cityward.config import Settings
from cityward.governance.audit import _SqliteBackend
from cityward.governance.events import Action, AuditRecord
from cityward.governance.identity import Identities, Principal
from cityward.governance.keys import load_or_create_key
from cityward.governance.policy import Role
from cityward.governance.sources import (
    DERIVED_PREFIX,
    Catalog,
    DataSource,
    PersonalData,
    default_sources,
)

if TYPE_CHECKING:
    from cityward.governance.audit import AuditLog
    from cityward.governance.retention import Retention

log = logging.getLogger("cityward.governance")


class RequestTrail:
    """What one request touched, for its audit record."""

    __slots__ = ("_seen", "count", "denied", "entity_ids", "sensitive")

    def __init__(self) -> None:
        self.entity_ids: list[str] = []
        self.count = 0  # distinct entities
        self.sensitive = False  # read data marked personal or indirect
        # entities refused inside a request that went on (an item of a batch or a push): its
        # record names them, or a refused write left no trace a search by entity finds
        self.denied: list[str] = []
        self._seen: set[str] = set()

    def deny(self, eid: str) -> None:
        if eid not in self.denied and len(self.denied) < MAX_IDS_PER_RECORD:
            self.denied.append(eid)

    def add(self, eid: str) -> None:
        # an upsert checks an entity twice (its new and its stored type): count it once
        if eid in self._seen:
            return
        self._seen.add(eid)
        self.count += 1
        if len(self.entity_ids) < MAX_IDS_PER_RECORD:
            self.entity_ids.append(eid)


MAX_IDS_PER_RECORD = 100


def build_catalog(sources: list[DataSource] | None, resolver: ContextResolver) -> Catalog:
    declared = sources if sources is not None else default_sources()
    names = {t for s in declared for t in s.types}
    return Catalog(declared, {t: resolver.core.expand(t) for t in names})


class Governance:
    """Identities, catalog, audit log and retention of one API process."""

    def __init__(
        self, settings: Settings, store: Store, resolver: ContextResolver, audit: AuditLog | None
    ) -> None:
        self.settings = settings
        self.gov = settings.governance
        self.no_auth = settings.no_auth
        self.catalog = build_catalog(self.gov.sources, resolver)
        self.identities = Identities(self.gov, settings.data_dir, store)
        self.audit = audit
        self.retention: Retention | None = None

    # -- the access of one request ------------------------------------------------------------
    def access_for(self, principal: Principal, trail: RequestTrail) -> Access:
        catalog = self.catalog
        purposes = principal.purposes

        def denied(eid: str, source: DataSource, doing: str) -> Forbidden:
            return Forbidden(
                f"{eid} belongs to data source {source.id!r}; {doing} it needs one of the "
                f"purposes {', '.join(source.purposes)}, and this token carries "
                f"{', '.join(sorted(purposes)) or 'none'}",
                field="id",
                missing="purpose:" + "|".join(source.purposes),
            )

        def read(eid: str, types: Sequence[str]) -> NgsiError | None:
            source = catalog.source_of(eid, types)
            if not catalog.allows(purposes, source):
                return denied(eid, source, "reading")
            if source.personal_data is not PersonalData.NONE:
                trail.sensitive = True
            trail.add(eid)
            return None

        def write(eid: str, types: Sequence[str]) -> NgsiError | None:
            if principal.role is Role.DEVICE:
                if not principal.owns(eid):
                    trail.deny(eid)
                    return Forbidden(
                        f"device {principal.subject!r} may only write its own entities, not {eid}",
                        field="id",
                        missing="device:own-entity",
                    )
                trail.add(eid)
                return None
            source = catalog.source_of(eid, types)
            if not catalog.allows(purposes, source):
                trail.deny(eid)
                return denied(eid, source, "changing")
            trail.add(eid)
            return None

        def conjunct(dialect: Any, query_types: frozenset[str] | None) -> Conjunct | None:
            sel = catalog.selection(purposes)
            if sel.everything:
                return None
            visible, hidden = sel.visible_types, sel.hidden_types
            # derived ids (alerts computed from a source) belong to their source, whatever
            # their type: a cheap prefix test on every entity
            derived = DerivedIds(DERIVED_PREFIX, sel.visible_derived, sel.known_derived)
            # without id patterns an entity's source follows from its types alone, so in a
            # query already limited to visible (or visible undeclared) types only a hidden type
            # listed before the entity's visible one can hide it: no check at all when no type
            # is hidden (the check costs an index probe per candidate: +5 ms p50 on a
            # PostgreSQL type+q query)
            typed = (
                query_types is not None
                and not sel.pattern_rules
                and (
                    query_types <= set(visible)
                    or (sel.undeclared and query_types.isdisjoint(hidden))
                )
            )
            return selection_conjunct(
                visible,
                hidden,
                sel.pattern_rules,
                sel.undeclared,
                dialect,
                derived,
                typed=typed,
            )

        def returned(docs: Sequence[Mapping[str, Any]]) -> None:
            # a query's answer: its personal or indirect entities make the request a read
            # that the audit trail records
            for doc in docs:
                source = catalog.source_of(doc["id"], doc["type"])
                if source.personal_data is not PersonalData.NONE:
                    trail.sensitive = True
                    trail.add(doc["id"])

        return Access(read=read, write=write, conjunct=conjunct, returned=returned)

    def subscription_visible(self, sub: Any, eid: str, types: Sequence[str]) -> bool:
        """Whether a subscription's owner may receive this entity in a notification."""
        purposes = sub.owner_purposes
        if purposes is None:
            return True
        return self.catalog.allows(frozenset(purposes), self.catalog.source_of(eid, types))

    # -- audit -----------------------------------------------------------------------------
    def record(self, rec: AuditRecord) -> None:
        if self.audit is not None:
            self.audit.record_nowait(rec)

    def config_fingerprint(self) -> str:
        doc = {
            "sources": [s.model_dump(mode="json") for s in self.catalog.sources],
            "issuer": self.gov.jwt_issuer,
            "audience": self.gov.jwt_audience,
            "public_keys": [str(p) for p in self.gov.jwt_public_keys],
            "jwks_url": self.gov.jwks_url,
            "jwks_file": str(self.gov.jwks_file) if self.gov.jwks_file else None,
            "no_auth": self.no_auth,
        }
        return hashlib.sha256(orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def record_start(self) -> None:
        """Audit the start, and a configuration change since the last start."""
        fingerprint = self.config_fingerprint()
        marker = self.settings.data_dir / "governance" / "config.sha256"
        previous = marker.read_text().strip() if marker.exists() else None
        if previous != fingerprint:
            self.record(
                AuditRecord(
                    action=Action.CONFIG,
                    actor="cityward",
                    detail="governance configuration loaded"
                    + (
                        " (first start)" if previous is None else f" (changed from {previous[:12]})"
                    ),
                    extra={"sha256": fingerprint, "sources": [s.id for s in self.catalog.sources]},
                )
            )
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(fingerprint + "\n")
        self.record(
            AuditRecord(
                action=Action.SYSTEM,
                actor="cityward",
                detail="API process started" + (" WITHOUT AUTHENTICATION" if self.no_auth else ""),
                extra={"sha256": fingerprint},
            )
        )


class AuditNotFound(ValueError):
    """No audit log, or no key to check its seals, where the settings point."""


def open_audit_to_verify(settings: Settings) -> AuditLog:
    """The audit log of ``settings`` for :meth:`AuditLog.verify`, read-only: nothing created.

    ``cityward audit verify`` went through :func:`open_audit`, which makes what is missing:
    on a mistyped data folder a new bank, audit.db and key ("Audit log OK: 0 records"); with
    the key kept away from the machine a new key there, with which the next server sealed;
    on a read-only copy an OperationalError. :class:`AuditNotFound` says what is missing.
    """
    from cityward.bank.store import backend_name, open_store, sqlite_file
    from cityward.governance.audit import AuditLog

    gov = settings.governance
    key_file = gov.audit_key_file or settings.data_dir / "governance" / "audit.key"
    if backend_name(settings.database_url) == "PostgreSQL":
        # the log is in the bank's database, which a server keeps: nothing made on this machine
        if not key_file.is_file():
            raise AuditNotFound(f"no audit key {key_file} (governance.audit_key_file)")
        store = open_store(
            settings.database_url,
            settings.data_dir,
            connect_timeout_s=settings.database_connect_timeout_s,
        )
        try:
            return open_audit(settings, store)
        finally:
            store.close()
    path = sqlite_file(settings.database_url, settings.data_dir).with_name("audit.db")
    if not path.is_file():
        raise AuditNotFound(f"no audit log {path} (check --data-dir or --database-url)")
    if not key_file.is_file():
        raise AuditNotFound(f"no audit key {key_file} (governance.audit_key_file)")
    key = load_or_create_key(key_file, "audit key")  # it exists: only read
    return AuditLog(
        _ReadOnlySqlite(path),
        key,
        seal_every=gov.audit_seal_every,
        seal_interval_s=gov.audit_seal_interval_s,
    )


class _ReadOnlySqlite(_SqliteBackend):
    """audit.db opened with mode=ro: no folder or schema made, no journal mode set, readable
    on a read-only copy of the data folder. Writing fails (verify does not write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = None

    def _connect(self) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri()
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, isolation_level=None)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            # a WAL database reader needs audit.db-shm, which a read-only folder cannot get;
            # with no -wal file every commit is in audit.db and nobody is writing: read it as
            # immutable (a -wal file means a writer or unmerged commits: the error stands)
            conn.close()
            if self.path.with_name(f"{self.path.name}-wal").exists():
                raise
        return sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None)


def open_audit(settings: Settings, store: Store) -> AuditLog:
    from cityward.governance.audit import AuditLog

    gov = settings.governance
    key = load_or_create_key(
        gov.audit_key_file or settings.data_dir / "governance" / "audit.key", "audit key"
    )
    if store.dialect == "postgres":
        url = store.url  # type: ignore[attr-defined]
        schema = store.schema or "public"  # type: ignore[attr-defined]
        return AuditLog.postgres(
            url,
            key,
            schema=schema,
            seal_every=gov.audit_seal_every,
            seal_interval_s=gov.audit_seal_interval_s,
        )
    path = Path(store.path)  # type: ignore[attr-defined]
    return AuditLog.sqlite(
        path.with_name("audit.db"),
        key,
        seal_every=gov.audit_seal_every,
        seal_interval_s=gov.audit_seal_interval_s,
    )
