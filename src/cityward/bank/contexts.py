"""@context management (/jsonldContexts): contexts the bank hosts, and the ones it cached.

Hosted contexts are stored per tenant in the ``jsonld_contexts`` table, so every worker process
and a restart see them; their URL is this server's ``/ngsi-ld/v1/jsonldContexts/{id}``, and the
resolver answers that URL from the table without a network round trip. Cached contexts are the
remote documents the resolver fetched or preloaded for requests; that cache is per process, and
a tenant sees (lists, reads, deletes) only the documents its own requests used. A hosted URL
resolves for its own tenant only. Use counts (numberOfHits, lastUsage) are kept in memory, per
tenant, since the process started: counting every use in the database would turn each request
that names a context into a write.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from cityward.bank.errors import BadRequestData, ResourceNotFound
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import iso_at, now_iso
from cityward.bank.store import Store

HOSTED_PATH = "/ngsi-ld/v1/jsonldContexts/"
Kind = Literal["Hosted", "Cached", "ImplicitlyCreated"]
KINDS: tuple[Kind, ...] = ("Hosted", "Cached", "ImplicitlyCreated")
_MAX_USAGE = 100_000  # (tenant, context) pairs whose use is counted


@dataclass
class ContextEntry:
    local_id: str
    kind: Kind
    url: str
    created: str | None
    body: Any  # the @context value

    def details(self, hits: int, last: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {"URL": self.url, "localId": self.local_id, "kind": self.kind}
        if self.created is not None:
            out["createdAt"] = self.created
        if last is not None:
            out["lastUsage"] = last
        out["numberOfHits"] = hits
        return out


def _hosted_id(url: str) -> str | None:
    """The local id in a URL of this server's /jsonldContexts (None for any other URL)."""
    at = url.find(HOSTED_PATH)
    if at < 0:
        return None
    return url[at + len(HOSTED_PATH) :].split("?", 1)[0]


def cached_id(url: str) -> str:
    """The local id of a cached remote context: stable, derived from its URL."""
    return "cached-" + hashlib.blake2b(url.encode(), digest_size=10).hexdigest()


class ContextRegistry:
    """The /jsonldContexts operations over a store and the process's context resolver."""

    def __init__(self, store: Store, resolver: ContextResolver) -> None:
        self.store = store
        self.resolver = resolver
        # (tenant, local id) -> [hits, time of the last use]
        self._usage: dict[tuple[str, str], list[float]] = {}
        self._lock = threading.Lock()
        resolver.local = self._lookup
        resolver.on_use = self._used

    # -- resolution of our own URLs ---------------------------------------------------------
    def _lookup(self, url: str, tenant: str) -> Any | None:
        local_id = _hosted_id(url)
        if local_id is None:
            return None
        rows = self.store.select(
            "SELECT body FROM jsonld_contexts WHERE tenant = ? AND id = ? AND kind = 'Hosted'",
            [tenant, local_id],
        )
        if not rows:
            return None
        return orjson.loads(rows[0][0])

    def _used(self, tenant: str, urls: tuple[str, ...]) -> None:
        """Every request served with a context built from ``urls`` counts (resolver.on_use)."""
        now = time.time()
        with self._lock:
            for url in urls:
                key = (tenant, _hosted_id(url) or cached_id(url))
                use = self._usage.get(key)
                if use is None:
                    if len(self._usage) >= _MAX_USAGE:
                        continue  # counting is best effort; memory is not
                    self._usage[key] = [1, now]
                else:
                    use[0] += 1
                    use[1] = now

    # -- operations -------------------------------------------------------------------------
    def register(self, tenant: str, body: Any) -> str:
        """Store a client's context (kind Hosted) and return its local id."""
        if not isinstance(body, dict) or "@context" not in body:
            raise BadRequestData("the body must be an object with an @context", field="@context")
        value = body["@context"]
        # the same checks as any request's @context: a broken one is refused now, not later
        self.resolver.resolve(value, tenant, record=False)
        local_id = uuid.uuid4().hex
        with self.store.write(tenant, create_tenant=True) as txn:
            txn.execute(
                "INSERT INTO jsonld_contexts(tenant, id, kind, body, created) "
                "VALUES (?, ?, 'Hosted', ?, ?)",
                [tenant, local_id, orjson.dumps(value).decode(), now_iso()],
            )
        return local_id

    def entries(self, tenant: str, base_url: str) -> list[ContextEntry]:
        rows = self.store.select(
            "SELECT id, kind, body, created FROM jsonld_contexts WHERE tenant = ? ORDER BY created",
            [tenant],
        )
        out = [
            ContextEntry(r[0], r[1], base_url + HOSTED_PATH + r[0], r[3], orjson.loads(r[2]))
            for r in rows
        ]
        for url, value in sorted(self.resolver.documents(tenant).items()):
            out.append(ContextEntry(cached_id(url), "Cached", url, None, value))
        return out

    def find(self, tenant: str, local_id: str, base_url: str) -> ContextEntry:
        for entry in self.entries(tenant, base_url):
            if entry.local_id == local_id:
                return entry
        raise ResourceNotFound(f"no @context with id {local_id}", field="contextId")

    def usage(self, tenant: str, entry: ContextEntry) -> tuple[int, str | None]:
        with self._lock:
            use = self._usage.get((tenant, entry.local_id))
        if use is None:
            return 0, None
        return int(use[0]), iso_at(use[1])

    def delete(self, tenant: str, local_id: str, base_url: str, reload: bool) -> None:
        entry = self.find(tenant, local_id, base_url)
        if entry.kind == "Cached":
            if reload:
                self.resolver.refetch(entry.url, tenant)
            else:
                self.resolver.forget(entry.url)
            return
        if reload:
            raise BadRequestData("reload applies to cached contexts only", field="reload")
        with self.store.write(tenant, create_tenant=False) as txn:
            txn.execute(
                "DELETE FROM jsonld_contexts WHERE tenant = ? AND id = ?", [tenant, local_id]
            )
        # contexts built from it must not outlive it
        self.resolver.forget(entry.url)
