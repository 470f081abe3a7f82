"""JSON-LD @context handling: expand and compact NGSI-LD terms without the network.

We do not run a general JSON-LD processor (pyld): NGSI-LD only needs term <-> IRI mapping for
entity types, attribute names and a few typed values, and a full expansion of every request
would cost more than the rest of the request. A context is reduced to a term map once and cached.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import orjson

from cityward.bank.errors import BadRequestData, LdContextNotAvailable

CORE_CONTEXT_URL = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.9.jsonld"
NGSILD = "https://uri.etsi.org/ngsi-ld/"
DEFAULT_VOCAB = "https://uri.etsi.org/ngsi-ld/default-context/"
JSONLD_CONTEXT_REL = "http://www.w3.org/ns/json-ld#context"
_CORE_URL_RE = re.compile(
    r"^https?://uri\.etsi\.org/ngsi-ld/(v1/)?ngsi-ld-core-context(-v\d+(\.\d+)*)?\.jsonld$"
)
_MAX_DEPTH = 8
_MAX_CONTEXT_BYTES = 4 * 1024 * 1024


def is_core_url(url: str) -> bool:
    """True for any published version of the NGSI-LD core context URL."""
    return bool(_CORE_URL_RE.match(url))


def _load_core_definitions() -> dict[str, Any]:
    raw = resources.files("cityward.bank").joinpath("contexts/ngsi-ld-core-context-v1.9.jsonld")
    doc = orjson.loads(raw.read_bytes())
    defs = doc["@context"]
    assert isinstance(defs, dict)
    return defs


@dataclass
class Context:
    """A resolved @context: the term -> IRI map used to expand and compact names."""

    terms: dict[str, str]
    vocab: str | None
    # the @context value as the client gave it (echoed back in ld+json responses); None = core
    source: Any = None
    # terms whose values are IRIs to expand/compact too (``"@type": "@vocab"``)
    vocab_terms: frozenset[str] = frozenset()
    _reverse: dict[str, str] = field(default_factory=dict, repr=False)
    _expand_cache: dict[str, str] = field(default_factory=dict, repr=False)
    _compact_cache: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        reverse: dict[str, str] = {}
        for term, iri in self.terms.items():
            best = reverse.get(iri)
            if best is None or (len(term), term) < (len(best), best):
                reverse[iri] = term
        self._reverse = reverse

    def expand(self, term: str) -> str:
        """Expand a term, compact IRI or absolute IRI to its full IRI."""
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
        if len(self._expand_cache) < 100_000:
            self._expand_cache[term] = iri
        return iri

    def compact(self, iri: str) -> str:
        """Compact a full IRI to the shortest term the context has for it."""
        hit = self._compact_cache.get(iri)
        if hit is not None:
            return hit
        term = self._reverse.get(iri)
        if term is None:
            term = iri
            for vocab in (self.vocab, DEFAULT_VOCAB):
                if vocab and iri.startswith(vocab) and len(iri) > len(vocab):
                    rest = iri[len(vocab) :]
                    if ":" not in rest and "/" not in rest and "#" not in rest:
                        term = rest
                        break
        if len(self._compact_cache) < 100_000:
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


def _reduce(
    defs: Mapping[str, Any],
    terms: dict[str, str],
    vocab: list[str | None],
    vocab_terms: set[str],
    trusted: bool = False,
) -> None:
    """Fold one context definition object into the running term map (later wins)."""
    if "@vocab" in defs:
        v = defs["@vocab"]
        if v is not None and not isinstance(v, str):
            raise BadRequestData("@vocab must be a string", field="@context")
        vocab[0] = _expand_value(v, defs, terms) if isinstance(v, str) else None
    for term, value in defs.items():
        if term.startswith("@"):
            continue
        if value is None:
            terms.pop(term, None)
            continue
        if isinstance(value, str):
            if value.startswith("@"):
                continue  # keyword alias such as "id": "@id"
            terms[term] = _expand_value(value, defs, terms)
        elif isinstance(value, dict):
            if "@context" in value and not trusted:
                raise BadRequestData(
                    f"scoped contexts are not supported (term {term!r} has its own @context)",
                    field="@context",
                )
            iri = value.get("@id")
            if iri is None:
                iri = (vocab[0] or DEFAULT_VOCAB) + term
            if not isinstance(iri, str):
                raise BadRequestData(f"@id of term {term!r} must be a string", field="@context")
            if iri.startswith("@"):
                continue
            terms[term] = _expand_value(iri, defs, terms)
            if value.get("@type") == "@vocab":
                vocab_terms.add(term)
        else:
            raise BadRequestData(
                f"term {term!r} must map to a string or an object", field="@context"
            )


def _expand_value(value: str, defs: Mapping[str, Any], terms: dict[str, str]) -> str:
    prefix, sep, suffix = value.partition(":")
    if sep and not suffix.startswith("//"):
        base = defs.get(prefix)
        if isinstance(base, dict):
            base = base.get("@id")
        if isinstance(base, str) and base != value:
            return _expand_value(base, defs, terms) + suffix
        known = terms.get(prefix)
        if known is not None:
            return known + suffix
        return value
    if not sep and value in terms:
        return terms[value]
    return value


class ContextResolver:
    """Turns @context values (URLs, objects, arrays) into cached :class:`Context` objects.

    Remote contexts come from the preload map first (air-gapped cities), then from the network
    with a short timeout; a failure is a 504 LdContextNotAvailable, never a hung request.
    """

    def __init__(
        self,
        preload: Mapping[str, Path] | None = None,
        fetch_timeout: float = 3.0,
        allow_fetch: bool = True,
    ) -> None:
        self._core_defs = _load_core_definitions()
        self.preload = dict(preload or {})
        self.fetch_timeout = fetch_timeout
        self.allow_fetch = allow_fetch
        self._documents: dict[str, Any] = {}
        self._contexts: OrderedDict[bytes, Context] = OrderedDict()
        self._lock = threading.Lock()
        # contexts this server hosts itself (/jsonldContexts): URL -> @context value or None
        self.local: Callable[[str], Any | None] | None = None
        self.core = self._build(None)

    def resolve(self, source: Any) -> Context:
        """The Context for a request's @context value (None: the core context alone)."""
        if source is None:
            return self.core
        if isinstance(source, str) and is_core_url(source):
            return self.core
        key = orjson.dumps(source, option=orjson.OPT_SORT_KEYS)
        with self._lock:
            hit = self._contexts.get(key)
            if hit is not None:
                self._contexts.move_to_end(key)
                return hit
        ctx = self._build(source)
        with self._lock:
            self._contexts[key] = ctx
            while len(self._contexts) > 512:
                self._contexts.popitem(last=False)
        return ctx

    def cached(self, source: Any) -> Context | None:
        """The Context for ``source`` if it is known already (never fetches)."""
        if source is None or (isinstance(source, str) and is_core_url(source)):
            return self.core
        key = orjson.dumps(source, option=orjson.OPT_SORT_KEYS)
        with self._lock:
            return self._contexts.get(key)

    def _build(self, source: Any) -> Context:
        terms: dict[str, str] = {}
        vocab: list[str | None] = [None]
        vocab_terms: set[str] = set()
        if source is not None:
            self._fold(source, terms, vocab, vocab_terms, depth=0, seen=())
        user_vocab = vocab[0]
        # The core context is applied last so that core terms always win.
        _reduce(self._core_defs, terms, vocab, vocab_terms, trusted=True)
        if user_vocab is not None:
            vocab[0] = user_vocab
        return Context(
            terms=terms, vocab=vocab[0], source=source, vocab_terms=frozenset(vocab_terms)
        )

    def _fold(
        self,
        source: Any,
        terms: dict[str, str],
        vocab: list[str | None],
        vocab_terms: set[str],
        depth: int,
        seen: tuple[str, ...],
    ) -> None:
        if depth > _MAX_DEPTH:
            raise BadRequestData("@context nests too deeply", field="@context")
        if isinstance(source, list):
            for item in source:
                self._fold(item, terms, vocab, vocab_terms, depth + 1, seen)
        elif isinstance(source, str):
            if is_core_url(source):
                return
            if source in seen:
                raise BadRequestData(f"@context {source} includes itself", field="@context")
            doc = self.fetch(source)
            self._fold(doc, terms, vocab, vocab_terms, depth + 1, (*seen, source))
        elif isinstance(source, dict):
            _reduce(source, terms, vocab, vocab_terms)
        elif source is None:
            return
        else:
            raise BadRequestData(
                "@context must be a URL, an object or an array of them", field="@context"
            )

    def fetch(self, url: str) -> Any:
        """The @context member of the document at ``url`` (preloaded, cached or fetched)."""
        if self.local is not None:
            hosted = self.local(url)
            if hosted is not None:
                return hosted
        with self._lock:
            if url in self._documents:
                return self._documents[url]
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
        else:
            raw = self._download(url)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequestData(f"@context {url} is not JSON", field="@context") from exc
        if not isinstance(doc, dict) or "@context" not in doc:
            raise BadRequestData(f"@context {url} has no @context member", field="@context")
        value = doc["@context"]
        with self._lock:
            self._documents[url] = value
        return value

    def documents(self) -> dict[str, Any]:
        """The remote context documents held in the cache (URL -> @context value)."""
        with self._lock:
            return dict(self._documents)

    def forget(self, url: str) -> bool:
        """Drop a cached document (and every context built on cached documents)."""
        with self._lock:
            found = self._documents.pop(url, None) is not None
            self._contexts.clear()
        return found

    def refetch(self, url: str) -> Any:
        """Fetch ``url`` again; on failure the cached copy stays and the error is raised."""
        with self._lock:
            old = self._documents.pop(url, None)
        try:
            value = self.fetch(url)
        except Exception:
            if old is not None:
                with self._lock:
                    self._documents.setdefault(url, old)
            raise
        with self._lock:
            self._contexts.clear()
        return value

    def _download(self, url: str) -> bytes:
        if not self.allow_fetch or not url.startswith(("http://", "https://")):
            raise LdContextNotAvailable(
                f"@context {url} is not preloaded and remote fetching is off", field="@context"
            )
        # httpx's timeout bounds each read; the deadline bounds the whole download, so a server
        # that trickles bytes cannot hold the request much past the timeout either.
        deadline = time.monotonic() + self.fetch_timeout
        body = bytearray()
        try:
            with httpx.stream(
                "GET", url, timeout=self.fetch_timeout, follow_redirects=True
            ) as resp:
                if resp.status_code != 200:
                    raise LdContextNotAvailable(
                        f"@context {url} answered HTTP {resp.status_code}", field="@context"
                    )
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
            raise LdContextNotAvailable(
                f"@context {url} could not be fetched: {exc.__class__.__name__}", field="@context"
            ) from exc
        return bytes(body)


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
