"""JSON-LD @context handling: expand and compact NGSI-LD terms without the network.

We do not run a general JSON-LD processor (pyld): NGSI-LD only needs term <-> IRI mapping for
entity types, attribute names and a few typed values, and a full expansion of every request
would cost more than the rest of the request. A context is reduced to a term map once and cached.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx
import orjson

from cityward.bank.errors import BadRequestData, LdContextNotAvailable

log = logging.getLogger(__name__)

CORE_CONTEXT_URL = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.9.jsonld"
NGSILD = "https://uri.etsi.org/ngsi-ld/"
DEFAULT_VOCAB = "https://uri.etsi.org/ngsi-ld/default-context/"
JSONLD_CONTEXT_REL = "http://www.w3.org/ns/json-ld#context"
_CORE_URL_RE = re.compile(
    r"^https?://uri\.etsi\.org/ngsi-ld/(v1/)?ngsi-ld-core-context(-v\d+(\.\d+)*)?\.jsonld$"
)
_MAX_DEPTH = 8
_MAX_CONTEXT_BYTES = 4 * 1024 * 1024
# Work one @context value may cause: array items, references and objects visited (a repeated
# reference is folded once, but each occurrence still counts), and distinct URLs it names.
_MAX_ENTRIES = 10_000
_MAX_URLS = 64
_MAX_TERMS = 200_000  # term definitions folded for one @context (an @import can repeat many)
_MAX_REDIRECTS = 5
# Entries of the expand/compact caches of one Context: the core one serves every request and
# ingest; the others are many (one per client context and tenant), so theirs stay small.
_CORE_CACHE_LIMIT = 100_000
_USER_CACHE_LIMIT = 4_096

# the previous values a notification carries (cityward.bank.model uses them too)
PREVIOUS_MEMBERS = frozenset(
    {
        "previousValue",
        "previousObject",
        "previousLanguageMap",
        "previousValueList",
        "previousObjectList",
        "previousJson",
        "previousVocab",
    }
)
# Member names of NGSI-LD entities and attributes: no attribute is ever shown under one of these
# (it would replace the entity's id, type, value... in the output), nor written as one.
RESERVED_MEMBERS = PREVIOUS_MEMBERS | frozenset(
    {
        "id",
        "@id",
        "type",
        "@type",
        "scope",
        "@context",
        "datasetId",
        "instanceId",
        "observedAt",
        "unitCode",
        "createdAt",
        "modifiedAt",
        "deletedAt",
        "value",
        "object",
        "objectType",
        "languageMap",
        "valueList",
        "objectList",
        "json",
        "vocab",
        "valueType",
        "lang",
    }
)

# The tenant (NGSILD-Tenant) a resolution acts for when the caller names none: the API sets it
# per request (api/ngsi.py), so hosted contexts and the cache records stay per tenant even
# where a route resolves a context without knowing the tenant. Worker threads inherit it.
current_tenant: ContextVar[str] = ContextVar("cityward_ld_tenant", default="")


def is_core_url(url: str) -> bool:
    """True for any published version of the NGSI-LD core context URL."""
    return bool(_CORE_URL_RE.match(url))


@cache
def _load_core_definitions() -> dict[str, Any]:
    raw = resources.files("cityward.bank").joinpath("contexts/ngsi-ld-core-context-v1.9.jsonld")
    doc = orjson.loads(raw.read_bytes())
    defs = doc["@context"]
    assert isinstance(defs, dict)
    return defs


@cache
def _core_terms() -> dict[str, str]:
    """Every term of the core context -> its IRI, or its keyword ("id" -> "@id")."""
    defs = _load_core_definitions()
    out: dict[str, str] = {}
    for term, value in defs.items():
        if term.startswith("@"):
            continue
        iri = value.get("@id", DEFAULT_VOCAB + term) if isinstance(value, dict) else value
        if isinstance(iri, str):
            out[term] = iri if iri.startswith("@") else _expand_value(iri, defs, {})
    return out


@cache
def core_member_iris() -> dict[str, str]:
    """IRI -> member name for the IRIs that stand for an NGSI-LD member: the core context's
    (``ngsi-ld:hasValue`` is ``value``) and the member names under the NGSI-LD and default
    namespaces (``default-context/id``). An attribute named by one of them would be shown as
    that member."""
    core = _core_terms()
    out: dict[str, str] = {}
    for name in RESERVED_MEMBERS:
        if name.startswith("@"):
            continue
        out[NGSILD + name] = name
        out[DEFAULT_VOCAB + name] = name
        iri = core.get(name)
        if iri is not None and not iri.startswith("@"):
            out[iri] = name
    return out


@dataclass
class Context:
    """A resolved @context: the term -> IRI map used to expand and compact names."""

    terms: dict[str, str]
    vocab: str | None
    # the @context value as the client gave it (echoed back in ld+json responses); None = core
    source: Any = None
    # terms whose values are IRIs to expand/compact too (``"@type": "@vocab"``)
    vocab_terms: frozenset[str] = frozenset()
    # the hosted and remote context URLs it was built from (use counts of /jsonldContexts)
    urls: tuple[str, ...] = ()
    cache_limit: int = _USER_CACHE_LIMIT
    _reverse: dict[str, str] = field(default_factory=dict, repr=False)
    _expand_cache: dict[str, str] = field(default_factory=dict, repr=False)
    _compact_cache: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        reverse: dict[str, str] = {}
        for term, iri in self.terms.items():
            if term in RESERVED_MEMBERS:
                continue  # "value" is the core term of ngsi-ld:hasValue, never an attribute's
            best = reverse.get(iri)
            if best is None or (len(term), term) < (len(best), best):
                reverse[iri] = term
        self._reverse = reverse

    def expand(self, term: str) -> str:
        """Expand a term, compact IRI or absolute IRI to its full IRI.

        A name other than a member name itself that expands to the IRI of an NGSI-LD member
        (``ngsi-ld:createdAt``, ``default-context/id``, a client term for ``ngsi-ld:hasValue``)
        is a 400: as an attribute it would pose as that member."""
        hit = self._expand_cache.get(term)
        if hit is not None:
            return hit
        iri = self.terms.get(term)
        if iri is None:
            prefix, sep, suffix = term.partition(":")
            if sep:
                base = self.terms.get(prefix)
                iri = base + suffix if base is not None and not suffix.startswith("//") else term
            else:
                iri = (self.vocab or DEFAULT_VOCAB) + term
        if term not in RESERVED_MEMBERS:
            member = core_member_iris().get(iri)
            if member is not None:
                raise BadRequestData(
                    f"{term!r} expands to {iri}, the IRI of the NGSI-LD member {member!r}",
                    field=term,
                )
        if len(self._expand_cache) < self.cache_limit:
            self._expand_cache[term] = iri
        return iri

    def compact(self, iri: str) -> str:
        """Compact a full IRI to the shortest term the context has for it.

        A short name is given only when expanding it with this context gives back ``iri``
        (two IRIs never share a name), and never a member name; else the full IRI."""
        hit = self._compact_cache.get(iri)
        if hit is not None:
            return hit
        term = self._reverse.get(iri)
        if term is None:
            term = iri
            vocab = self.vocab or DEFAULT_VOCAB
            if iri.startswith(vocab) and len(iri) > len(vocab):
                rest = iri[len(vocab) :]
                if (
                    ":" not in rest
                    and "/" not in rest
                    and "#" not in rest
                    and rest not in self.terms
                    and rest not in RESERVED_MEMBERS
                ):
                    term = rest
        if len(self._compact_cache) < self.cache_limit:
            self._compact_cache[iri] = term
        return term

    @property
    def link_url(self) -> str:
        """The URL that names this context in a Link header (the core context's for one that
        has none of its own: see ``linkable``)."""
        src = self.source
        if isinstance(src, str):
            return src
        if isinstance(src, list) and len(src) == 1 and isinstance(src[0], str):
            return str(src[0])
        return CORE_CONTEXT_URL

    @property
    def linkable(self) -> bool:
        """Whether one URL names this context (the core one, or a single URL): an inline
        context, or several, cannot be given in a Link header."""
        src = self.source
        return (
            src is None
            or isinstance(src, str)
            or (isinstance(src, list) and len(src) == 1 and isinstance(src[0], str))
        )

    def output_context(self) -> Any:
        """The @context member of an application/ld+json response body."""
        if self.source is None:
            return CORE_CONTEXT_URL
        items = self.source if isinstance(self.source, list) else [self.source]
        if any(isinstance(i, str) and is_core_url(i) for i in items):
            return self.source
        return [*items, CORE_CONTEXT_URL]


@dataclass
class _Fold:
    """The running state of reducing context definitions into one term map."""

    terms: dict[str, str] = field(default_factory=dict)
    vocab: str | None = None
    vocab_terms: set[str] = field(default_factory=set)
    # terms a client context marked @protected -> their IRI (or keyword)
    protected: dict[str, str] = field(default_factory=dict)


def _reduce(defs: Mapping[str, Any], st: _Fold, trusted: bool = False) -> None:
    """Fold one context definition object into the running term map (later wins).

    ``trusted`` is the core context: it may use scoped contexts, and nothing checks it. A
    client's may not redefine a core term (the core context is @protected, and the core
    applies last, so the client's meaning would be dropped silently), nor a term it marked
    @protected itself."""
    if "@vocab" in defs:
        v = defs["@vocab"]
        if v is not None and not isinstance(v, str):
            raise BadRequestData("@vocab must be a string", field="@context")
        st.vocab = _expand_value(v, defs, st.terms) if isinstance(v, str) else None
    protect_all = not trusted and defs.get("@protected") is True
    for term, value in defs.items():
        if term.startswith("@"):
            continue
        if value is None:
            if not trusted:
                _check_term(term, None, st)
            st.terms.pop(term, None)
            continue
        protect = protect_all
        vocab_type = False
        if isinstance(value, str):
            iri = value
        elif isinstance(value, dict):
            if "@context" in value and not trusted:
                raise BadRequestData(
                    f"scoped contexts are not supported (term {term!r} has its own @context)",
                    field="@context",
                )
            raw = value.get("@id")
            iri = (st.vocab or DEFAULT_VOCAB) + term if raw is None else raw
            if not isinstance(iri, str):
                raise BadRequestData(f"@id of term {term!r} must be a string", field="@context")
            protect = value.get("@protected", protect_all) is True
            vocab_type = value.get("@type") == "@vocab"
        else:
            raise BadRequestData(
                f"term {term!r} must map to a string or an object", field="@context"
            )
        if not iri.startswith("@"):
            # a client's compact IRI may use a core prefix (ngsi-ld:): the core applies last
            iri = _expand_value(iri, defs, st.terms, None if trusted else _core_terms())
        if not trusted:
            _check_term(term, iri, st)
            if protect:
                st.protected[term] = iri
        if iri.startswith("@"):
            # a keyword alias such as "id": "@id": the term is not an IRI (and a client's
            # earlier definition of it must not survive)
            st.terms.pop(term, None)
            continue
        st.terms[term] = iri
        if vocab_type:
            st.vocab_terms.add(term)


def _check_term(term: str, iri: str | None, st: _Fold) -> None:
    """A client context's (re)definition of ``term`` as ``iri`` (None: removed) is allowed."""
    core = _core_terms().get(term)
    if core is not None and core != iri:
        raise BadRequestData(
            f"@context term {term!r} is defined by the NGSI-LD core context, which is "
            f"@protected: it cannot be redefined{'' if iri is None else ' as ' + iri}",
            field=term,
        )
    old = st.protected.get(term)
    if old is not None and old != iri:
        raise BadRequestData(
            f"@context term {term!r} is @protected: it cannot be redefined", field=term
        )


def _expand_value(
    value: str,
    defs: Mapping[str, Any],
    terms: Mapping[str, str],
    fallback: Mapping[str, str] | None = None,
    seen: tuple[str, ...] = (),
) -> str:
    prefix, sep, suffix = value.partition(":")
    if sep and not suffix.startswith("//"):
        base = defs.get(prefix)
        if isinstance(base, dict):
            base = base.get("@id")
        if isinstance(base, str) and base != value:
            if prefix in seen or len(seen) >= _MAX_DEPTH:
                raise BadRequestData(
                    f"@context prefix {prefix!r} is defined through itself ({value!r})",
                    field="@context",
                )
            return _expand_value(base, defs, terms, fallback, (*seen, prefix)) + suffix
        known = terms.get(prefix)
        if known is None and fallback is not None:
            known = fallback.get(prefix)
        if known is not None:
            return known + suffix
        return value
    if not sep and value in terms:
        return terms[value]
    return value


def _last_wins(items: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Definition objects folded more than once keep only their last place: folding one again
    later would redo what its last fold does anyway."""
    if len(items) < 2:
        return items
    seen: set[int] = set()
    out: list[Mapping[str, Any]] = []
    for item in reversed(items):
        if id(item) not in seen:
            seen.add(id(item))
            out.append(item)
    out.reverse()
    return out


@dataclass
class _Document:
    """A remote @context document in the cache."""

    value: Any
    size: int  # bytes of the document as fetched (what the cache bound counts)
    tenants: set[str] = field(default_factory=set)  # the tenants that used it


def _host_allowed(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """One ``context_allow_hosts`` entry: an address or network, else a host name."""
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return entry.strip().lower().rstrip(".")


class ContextResolver:
    """Turns @context values (URLs, objects, arrays) into cached :class:`Context` objects.

    Remote contexts come from the preload map first (air-gapped cities), then from the network
    with a short timeout; a failure is a 504 LdContextNotAvailable, never a hung request. The
    network is only asked for public addresses unless ``allow_private`` or ``allow_hosts``
    say otherwise: any client that may read can name a context URL, and the server must not
    become its way into loopback, link-local (cloud metadata) or private services.
    """

    def __init__(
        self,
        preload: Mapping[str, Path] | None = None,
        fetch_timeout: float = 3.0,
        allow_fetch: bool = True,
        *,
        allow_private: bool = False,
        allow_hosts: Iterable[str] = (),
        max_documents: int = 128,
        max_document_bytes: int = 32 * 1024 * 1024,
        max_contexts: int = 256,
        max_context_terms: int = 1_000_000,
    ) -> None:
        self._core_defs = _load_core_definitions()
        self.preload = dict(preload or {})
        self.fetch_timeout = fetch_timeout
        self.allow_fetch = allow_fetch
        self.allow_private = allow_private
        self.allow_hosts = [_host_allowed(h) for h in allow_hosts]
        self.max_documents = max_documents
        self.max_document_bytes = max_document_bytes
        self.max_contexts = max_contexts
        self.max_context_terms = max_context_terms
        self._documents: OrderedDict[str, _Document] = OrderedDict()
        self._document_bytes = 0
        self._contexts: OrderedDict[bytes, Context] = OrderedDict()
        self._context_terms = 0
        self._lock = threading.Lock()
        # contexts this server hosts itself (/jsonldContexts): (URL, tenant) -> @context value
        # or None
        self.local: Callable[[str, str], Any | None] | None = None
        # told (tenant, URLs) each time a context built from those URLs serves a request
        self.on_use: Callable[[str, tuple[str, ...]], None] | None = None
        self.core = self._build(None, "", 0.0)

    def resolve(self, source: Any, tenant: str | None = None, *, record: bool = True) -> Context:
        """The Context for a request's @context value (None: the core context alone).

        ``tenant``: whose hosted contexts the URLs may name (default: ``current_tenant``);
        ``record``: count this as a use of the contexts it names (not for a mere check)."""
        if source is None:
            return self.core
        if isinstance(source, str) and is_core_url(source):
            return self.core
        if tenant is None:
            tenant = current_tenant.get()
        # per tenant: a URL can name a hosted context of this tenant only
        key = tenant.encode() + b"\x00" + orjson.dumps(source, option=orjson.OPT_SORT_KEYS)
        with self._lock:
            ctx = self._contexts.get(key)
            if ctx is not None:
                self._contexts.move_to_end(key)
        if ctx is None:
            # one deadline for the whole resolution, however many URLs it names
            ctx = self._build(source, tenant, time.monotonic() + self.fetch_timeout)
            with self._lock:
                old = self._contexts.pop(key, None)
                if old is not None:
                    self._context_terms -= len(old.terms)
                self._contexts[key] = ctx
                self._context_terms += len(ctx.terms)
                while len(self._contexts) > 1 and (
                    len(self._contexts) > self.max_contexts
                    or self._context_terms > self.max_context_terms
                ):
                    _, gone = self._contexts.popitem(last=False)
                    self._context_terms -= len(gone.terms)
        if record and ctx.urls and self.on_use is not None:
            self.on_use(tenant, ctx.urls)
        return ctx

    def cached(self, source: Any, tenant: str | None = None) -> Context | None:
        """The Context for ``source`` if it is known already (never fetches)."""
        if source is None or (isinstance(source, str) and is_core_url(source)):
            return self.core
        if tenant is None:
            tenant = current_tenant.get()
        key = tenant.encode() + b"\x00" + orjson.dumps(source, option=orjson.OPT_SORT_KEYS)
        with self._lock:
            ctx = self._contexts.get(key)
        if ctx is not None and ctx.urls and self.on_use is not None:
            self.on_use(tenant, ctx.urls)
        return ctx

    def _build(self, source: Any, tenant: str, deadline: float) -> Context:
        st = _Fold()
        urls: list[str] = []
        if source is not None:
            leaves = self._flatten(source, tenant, deadline, urls)
            if sum(len(d) for d in leaves) > _MAX_TERMS:
                raise BadRequestData(
                    f"@context defines more than {_MAX_TERMS} terms", field="@context"
                )
            for defs in leaves:
                _reduce(defs, st)
        user_vocab = st.vocab
        # The core context is applied last so that core terms always win.
        _reduce(self._core_defs, st, trusted=True)
        if user_vocab is not None:
            st.vocab = user_vocab
        return Context(
            terms=st.terms,
            vocab=st.vocab,
            source=source,
            vocab_terms=frozenset(st.vocab_terms),
            urls=tuple(urls),
            cache_limit=_CORE_CACHE_LIMIT if source is None else _USER_CACHE_LIMIT,
        )

    def _flatten(
        self, source: Any, tenant: str, deadline: float, urls: list[str]
    ) -> list[Mapping[str, Any]]:
        """The definition objects ``source`` folds, in order, each URL fetched and walked once
        (``urls`` gets them): repeated references cost one entry each, not their content
        again, so nesting cannot multiply the work."""
        memo: dict[str, list[Mapping[str, Any]]] = {}
        docs: dict[str, Any] = {}
        budget = [_MAX_ENTRIES]

        def spend(n: int) -> None:
            budget[0] -= n
            if budget[0] < 0:
                raise BadRequestData(
                    f"@context names too many contexts (more than {_MAX_ENTRIES} entries)",
                    field="@context",
                )

        def url_doc(url: str) -> Any:
            if url in docs:
                return docs[url]
            if len(docs) >= _MAX_URLS:
                raise BadRequestData(
                    f"@context names more than {_MAX_URLS} distinct contexts", field="@context"
                )
            urls.append(url)
            docs[url] = doc = self.fetch(url, tenant, deadline)
            return doc

        def walk(src: Any, depth: int, chain: tuple[str, ...]) -> list[Mapping[str, Any]]:
            spend(1)
            if depth > _MAX_DEPTH:
                raise BadRequestData("@context nests too deeply", field="@context")
            if isinstance(src, list):
                out: list[Mapping[str, Any]] = []
                for item in src:
                    out.extend(walk(item, depth + 1, chain))
                return _last_wins(out)
            if isinstance(src, str):
                if is_core_url(src):
                    return []
                if src in chain:
                    raise BadRequestData(f"@context {src} includes itself", field="@context")
                hit = memo.get(src)
                if hit is None:
                    doc = url_doc(src)
                    hit = walk(doc, depth + 1, (*chain, src))
                    memo[src] = hit
                else:
                    spend(len(hit))
                return hit
            if isinstance(src, dict):
                if "@import" not in src:
                    return [src]
                return [self._imported(src, url_doc)]
            if src is None:
                return []
            raise BadRequestData(
                "@context must be a URL, an object or an array of them", field="@context"
            )

        return walk(source, 0, ())

    @staticmethod
    def _imported(
        defs: Mapping[str, Any],
        url_doc: Callable[[str], Any],
    ) -> dict[str, Any]:
        """A definition object with JSON-LD 1.1 ``@import``: the imported object's terms, then
        its own (which win)."""
        url = defs["@import"]
        if not isinstance(url, str):
            raise BadRequestData("@import must be a URL", field="@context")
        imported = url_doc(url)
        if not isinstance(imported, dict):
            raise BadRequestData(f"@import {url}: its @context must be an object", field="@context")
        if "@import" in imported:
            raise BadRequestData(f"@import {url}: it has an @import itself", field="@context")
        merged = dict(imported)
        merged.update((k, v) for k, v in defs.items() if k != "@import")
        return merged

    def fetch(self, url: str, tenant: str | None = None, deadline: float | None = None) -> Any:
        """The @context member of the document at ``url`` (hosted, preloaded, cached or
        fetched); ``tenant`` is recorded as a user of a cached document."""
        if tenant is None:
            tenant = current_tenant.get()
        if self.local is not None:
            hosted = self.local(url, tenant)
            if hosted is not None:
                return hosted
        with self._lock:
            cached = self._documents.get(url)
            if cached is not None:
                self._documents.move_to_end(url)
                cached.tenants.add(tenant)
                return cached.value
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url):
            raise BadRequestData(f"@context entry {url!r} is not a URL", field="@context")
        path = self.preload.get(url)
        if path is not None:
            try:
                raw = Path(path).read_bytes()
            except OSError as exc:
                raise LdContextNotAvailable(
                    f"preloaded @context {url} could not be read from {path}: {exc}",
                    field="@context",
                ) from exc
            value = _context_member(url, raw)
        else:
            raw = self._download(url, deadline or time.monotonic() + self.fetch_timeout)
        value = _context_member(url, raw)
        with self._lock:
            old = self._documents.pop(url, None)
            if old is not None:
                self._document_bytes -= old.size
                tenant_set = old.tenants
            else:
                tenant_set = set()
            tenant_set.add(tenant)
            self._documents[url] = _Document(value, len(raw), tenant_set)
            self._document_bytes += len(raw)
            while len(self._documents) > 1 and (
                len(self._documents) > self.max_documents
                or self._document_bytes > self.max_document_bytes
            ):
                _, gone = self._documents.popitem(last=False)
                self._document_bytes -= gone.size
        return value

    def documents(self, tenant: str | None = None) -> dict[str, Any]:
        """The remote context documents held in the cache (URL -> @context value); with
        ``tenant``, only those that tenant used."""
        with self._lock:
            return {
                url: doc.value
                for url, doc in self._documents.items()
                if tenant is None or tenant in doc.tenants
            }

    def forget(self, url: str) -> bool:
        """Drop a cached document (and every context built on cached documents)."""
        with self._lock:
            doc = self._documents.pop(url, None)
            if doc is not None:
                self._document_bytes -= doc.size
            self._contexts.clear()
            self._context_terms = 0
        return doc is not None

    def refetch(self, url: str, tenant: str | None = None) -> Any:
        """Fetch ``url`` again; on failure the cached copy stays and the error is raised."""
        with self._lock:
            old = self._documents.pop(url, None)
            if old is not None:
                self._document_bytes -= old.size
        try:
            value = self.fetch(url, tenant)
        except Exception:
            if old is not None:
                with self._lock:
                    if url not in self._documents:
                        self._documents[url] = old
                        self._document_bytes += old.size
            raise
        with self._lock:
            doc = self._documents.get(url)
            if doc is not None and old is not None:
                doc.tenants |= old.tenants
            self._contexts.clear()
            self._context_terms = 0
        return value

    def _download(self, url: str, deadline: float) -> bytes:
        if not self.allow_fetch or not url.startswith(("http://", "https://")):
            raise LdContextNotAvailable(
                f"@context {url} is not preloaded and remote fetching is off", field="@context"
            )
        current = url
        # redirects are followed by hand: each hop's address is checked like the first
        for _ in range(_MAX_REDIRECTS + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LdContextNotAvailable(
                    f"@context {url} took longer than {self.fetch_timeout} s", field="@context"
                )
            target, headers, extensions = self._pinned(url, current)
            body = bytearray()
            try:
                with (
                    httpx.Client(timeout=remaining, follow_redirects=False) as client,
                    client.stream("GET", target, headers=headers, extensions=extensions) as resp,
                ):
                    if resp.is_redirect and "location" in resp.headers:
                        current = urljoin(current, resp.headers["location"])
                        continue
                    if resp.status_code != 200:
                        log.info("@context %s answered HTTP %s", current, resp.status_code)
                        raise _unavailable(url)
                    # httpx's timeout bounds each read; the deadline bounds the whole
                    # resolution, so a server that trickles bytes cannot hold the request
                    for chunk in resp.iter_bytes():
                        body.extend(chunk)
                        if time.monotonic() > deadline:
                            raise LdContextNotAvailable(
                                f"@context {url} took longer than {self.fetch_timeout} s",
                                field="@context",
                            )
                        if len(body) > _MAX_CONTEXT_BYTES:
                            raise BadRequestData(f"@context {url} is too large", field="@context")
            except httpx.HTTPError as exc:
                log.info("@context %s could not be fetched: %r", current, exc)
                raise _unavailable(url) from None
            return bytes(body)
        raise _unavailable(url)

    def _pinned(self, url: str, current: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The request for ``current`` sent to an address checked against the policy: the
        host is resolved here and the connection goes to that address (the Host header and
        TLS name stay the host's), so a second DNS answer cannot swap in another one."""
        parts = urlsplit(current)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise _unavailable(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise _unavailable(url) from None
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            log.info("@context %s: %s does not resolve: %s", current, host, exc)
            raise _unavailable(url) from None
        addresses = []
        for info in infos:
            ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            addresses.append(ip)
        if not addresses:
            raise _unavailable(url)
        for ip in addresses:
            if not self._address_allowed(host, ip):
                raise BadRequestData(
                    f"@context {url}: contexts are not fetched from loopback, link-local, "
                    "private or other non-public addresses (settings context_allow_private "
                    "and context_allow_hosts)",
                    field="@context",
                )
        ip = addresses[0]
        netloc = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {
            "Host": parts.netloc.rpartition("@")[2],
            "Accept": "application/ld+json, application/json;q=0.9",
        }
        extensions: dict[str, Any] = {}
        if parts.scheme == "https":
            extensions["sni_hostname"] = host
        return target, headers, extensions

    def _address_allowed(
        self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> bool:
        if ip.is_global and not ip.is_multicast:
            return True
        if self.allow_private:
            return not ip.is_unspecified and not ip.is_multicast
        name = host.lower().rstrip(".")
        for allowed in self.allow_hosts:
            if isinstance(allowed, str):
                if allowed == name:
                    return True
            elif ip.version == allowed.version and ip in allowed:
                return True
        return False


def _unavailable(url: str) -> LdContextNotAvailable:
    return LdContextNotAvailable(
        f"@context {url} could not be retrieved as a JSON-LD context document", field="@context"
    )


def _context_member(url: str, raw: bytes) -> Any:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequestData(f"@context {url} is not JSON", field="@context") from exc
    if not isinstance(doc, dict) or "@context" not in doc:
        raise BadRequestData(f"@context {url} has no @context member", field="@context")
    return doc["@context"]


LINK_RE = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")


def parse_link_header(value: str | None) -> str | None:
    """The @context URL from a JSON-LD Link header, or None when the header names none."""
    if not value:
        return None
    for m in LINK_RE.finditer(value):
        params = m.group(2).replace(" ", "")
        if f'rel="{JSONLD_CONTEXT_REL}"' in params or f"rel={JSONLD_CONTEXT_REL}" in params:
            return m.group(1).strip()
    return None


def link_header(url: str) -> str:
    return f'<{url}>; rel="{JSONLD_CONTEXT_REL}"; type="application/ld+json"'
