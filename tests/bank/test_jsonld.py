"""@context resolution: member names, collisions, cycles, fan-out, remote fetching, caches."""

from __future__ import annotations

from typing import Any

import pytest

from cityward.bank.errors import BadRequestData, LdContextNotAvailable
from cityward.bank.jsonld import DEFAULT_VOCAB, NGSILD, ContextResolver
from cityward.bank.model import EntityParser, check_attr_name
from cityward.bank.render import View, render_entity
from tests.bank.ctx_server import ctx_server

DV = DEFAULT_VOCAB


def resolver(**kw: Any) -> ContextResolver:
    return ContextResolver(allow_fetch=False, **kw)


# -- 1: member names ------------------------------------------------------------------------
def test_member_iris_never_compact_to_member_names() -> None:
    core = resolver().core
    for iri in (
        DV + "id",
        DV + "type",
        NGSILD + "scope",
        NGSILD + "createdAt",
        NGSILD + "hasValue",
    ):
        assert core.compact(iri) == iri
    assert core.compact(DV + "speed") == "speed"
    # a document stored before: its attributes cannot replace the entity's members in output
    doc = {
        "id": "urn:ngsi-ld:Car:1",
        "type": [DV + "Car"],
        "createdAt": "2024-01-01T00:00:00Z",
        "modifiedAt": "2024-01-01T00:00:00Z",
        "attrs": {
            DV + "id": [{"type": "Property", "value": "urn:ngsi-ld:Car:FAKE"}],
            NGSILD + "createdAt": [{"type": "Property", "value": "1999"}],
            DV + "speed": [
                {
                    "type": "Property",
                    "value": 5,
                    "sub": {NGSILD + "hasValue": {"type": "Property", "value": "FAKE"}},
                }
            ],
        },
    }
    out = render_entity(doc, core, View(fmt="keyValues"))
    assert out["id"] == "urn:ngsi-ld:Car:1" and out["type"] == "Car"
    out = render_entity(doc, core, View(sys_attrs=True))
    assert out["createdAt"] == "2024-01-01T00:00:00Z"
    assert out["speed"]["value"] == 5 and out["speed"][NGSILD + "hasValue"]["value"] == "FAKE"


@pytest.mark.parametrize(
    "name", [DV + "id", DV + "type", "ngsi-ld:scope", "ngsi-ld:createdAt", NGSILD + "hasValue"]
)
def test_attribute_named_by_a_member_iri_is_refused(name: str) -> None:
    parser = EntityParser(resolver().core)
    body = {"id": "urn:ngsi-ld:Car:1", "type": "Car", name: {"type": "Property", "value": 1}}
    with pytest.raises(BadRequestData) as err:
        parser.entity(body, "create")
    assert err.value.field == name
    sub = {
        "id": "urn:ngsi-ld:Car:1",
        "type": "Car",
        "speed": {"type": "Property", "value": 1, name: {"type": "Property", "value": 2}},
    }
    with pytest.raises(BadRequestData):
        parser.entity(sub, "create")
    check_attr_name("speed")  # ordinary names still pass


@pytest.mark.parametrize(
    "ctx",
    [
        {"id": "http://x.org/id"},
        {"type": "http://x.org/type"},
        {"location": "http://x.org/loc"},
        {"value": None},
        [{"@protected": True}, {"scope": {"@id": "http://x.org/scope"}}],
    ],
)
def test_client_context_cannot_redefine_core_terms(ctx: Any) -> None:
    with pytest.raises(BadRequestData) as err:
        resolver().resolve(ctx)
    assert err.value.field in ("id", "type", "location", "value", "scope")


def test_client_term_for_a_member_iri_cannot_name_an_attribute() -> None:
    ctx = resolver().resolve({"myval": "https://uri.etsi.org/ngsi-ld/hasValue"})
    with pytest.raises(BadRequestData) as err:
        ctx.expand("myval")
    assert err.value.field == "myval"


def test_core_terms_repeated_as_they_are_are_fine() -> None:
    ctx = resolver().resolve(
        {
            "id": "@id",
            "type": "@type",
            "ngsi-ld": NGSILD,
            "location": "ngsi-ld:location",
            "brand": "https://example.org/brand",
        }
    )
    assert ctx.expand("location") == NGSILD + "location"
    assert ctx.compact("https://example.org/brand") == "brand"


# -- 4: one short name for one IRI ----------------------------------------------------------
def test_compaction_gives_a_name_only_when_it_expands_back() -> None:
    r = resolver()
    vocab = r.resolve({"@vocab": "http://example.org/"})
    assert vocab.compact("http://example.org/speed") == "speed"
    assert vocab.compact(DV + "speed") == DV + "speed"
    term = r.resolve({"speed": "http://other.org/speed"})
    assert term.compact("http://other.org/speed") == "speed"
    assert term.compact(DV + "speed") == DV + "speed"
    for ctx in (vocab, term):
        for iri in (
            "http://example.org/speed",
            "http://other.org/speed",
            DV + "speed",
            DV + "brand",
        ):
            assert ctx.expand(ctx.compact(iri)) == iri


# -- 5: cycles ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ctx",
    [{"a": "b:x", "b": "a:y"}, {"a": {"@id": "b:x"}, "b": {"@id": "c:y"}, "c": {"@id": "a:z"}}],
)
def test_cyclic_prefixes_are_a_bad_request(ctx: dict[str, Any]) -> None:
    with pytest.raises(BadRequestData):
        resolver().resolve(ctx)


# -- 6: fan-out -----------------------------------------------------------------------------
def test_repeated_references_are_folded_once() -> None:
    h = "http://h.example/x/"
    hosted = {"h0": {"t": "http://x.example/t"}, "h1": [h + "h0"] * 100, "h2": [h + "h1"] * 100}
    calls: list[str] = []
    r = resolver()

    def local(url: str, *tenant: str) -> Any:
        calls.append(url)
        return hosted.get(url.rsplit("/", 1)[1])

    r.local = local
    ctx = r.resolve([h + "h2"] * 20)
    assert ctx.expand("t") == "http://x.example/t"
    assert len(calls) == 3  # each URL once, not 10^4 * 20 times


def test_too_many_entries_are_a_bad_request() -> None:
    with pytest.raises(BadRequestData):
        resolver().resolve([{"t": f"http://x.example/{i}"} for i in range(20_000)])


# -- 9: @import and @protected ------------------------------------------------------------
def test_import_and_protected() -> None:
    r = resolver()
    base = {"speed": "http://vehicles.example/speed", "Car": "http://vehicles.example/Car"}
    r.local = lambda url, *tenant: base if url == "http://h.example/base" else None
    ctx = r.resolve(
        {"@import": "http://h.example/base", "colour": "http://vehicles.example/colour"}
    )
    assert ctx.expand("speed") == "http://vehicles.example/speed"
    assert ctx.expand("colour") == "http://vehicles.example/colour"
    with pytest.raises(BadRequestData):
        r.resolve(
            [
                {"@protected": True, "speed": "http://a.example/speed"},
                {"speed": "http://b.example/speed"},
            ]
        )
    with pytest.raises(BadRequestData):
        r.resolve(
            [{"speed": {"@id": "http://a.example/speed", "@protected": True}}, {"speed": None}]
        )
    # the same definition again is no redefinition
    r.resolve(
        [
            {"@protected": True, "speed": "http://a.example/speed"},
            {"speed": "http://a.example/speed"},
        ]
    )


# -- 3: which addresses are fetched ---------------------------------------------------------
def test_loopback_is_refused_unless_allowed() -> None:
    with ctx_server() as srv:
        url = f"{srv.base}/ctx/brand"
        with pytest.raises(BadRequestData) as err:
            ContextResolver().resolve(url)
        assert "context_allow_private" in str(err.value)
        assert srv.paths == []  # not even asked
        assert (
            ContextResolver(allow_private=True).resolve(url).expand("brand")
            == "https://example.org/brand"
        )
        allowed = ContextResolver(allow_hosts=["127.0.0.1"])
        assert allowed.resolve(url).expand("brand") == "https://example.org/brand"
        # a redirect is followed only to an address that is allowed as well
        hop = f"{srv.base}/redirect?to=http://127.0.0.2:{srv.base.rsplit(':', 1)[1]}/ctx/x"
        with pytest.raises(BadRequestData):
            allowed.resolve(hop)
        assert srv.paths == ["/ctx/brand", "/ctx/brand", hop.split(srv.base)[1]]
        ok = f"{srv.base}/redirect?to={srv.base}/ctx/colour"
        assert allowed.resolve(ok).expand("colour") == "https://example.org/colour"
        for bad in (
            "http://0.0.0.0:1/x",
            "http://169.254.169.254/latest",
            "http://[::1]:1/x",
            "http://10.1.2.3/x",
        ):
            with pytest.raises(BadRequestData):
                ContextResolver().resolve(bad)


def test_one_deadline_for_all_urls() -> None:
    with ctx_server() as srv:
        srv.delay = 0.4
        r = ContextResolver(fetch_timeout=1.0, allow_private=True)
        # each URL alone is well within the timeout; the four together are not
        with pytest.raises(LdContextNotAvailable):
            r.resolve([f"{srv.base}/slow/s{i}" for i in range(4)])


# -- 8: bounded caches ----------------------------------------------------------------------
def test_document_cache_is_bounded() -> None:
    with ctx_server() as srv:
        r = ContextResolver(allow_private=True, max_documents=3, max_document_bytes=64 * 1024)
        for i in range(6):
            r.resolve(f"{srv.base}/ctx/t{i}")
        assert sorted(r.documents()) == [f"{srv.base}/ctx/t{i}" for i in (3, 4, 5)]
        for i in range(3):
            r.resolve(f"{srv.base}/pad/p{i}?kb=20")
        assert 1 <= len(r.documents()) <= 3
        assert sum(len(str(v)) for v in r.documents().values()) < 100 * 1024
