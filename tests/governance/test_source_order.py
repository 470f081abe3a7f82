"""A query shows exactly the entities a retrieval by id shows, whatever the catalog's order.

An entity may match the declarations of several sources: the id patterns of two sources, the
id pattern of one and the type of another, types of two sources (an entity with several
types), or a derived id (``urn:ngsi-ld:Alert:from:<source>:``) that a pattern matches too.
:meth:`Catalog.source_of` gives it to the first that matches (derived id, then patterns in
catalog order, then its first declared type); the query restriction (``Selection``, in SQL)
must decide alike. It showed an entity to a token of ANY matching pattern's source: a token
refused an entity by id (403) read it through ``GET /entities?type=...`` and the temporal
API.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cityward.bank.store import Store
from cityward.governance.policy import Role
from cityward.governance.sources import DataSource
from tests.governance.test_authz import catalog_app

E = "/ngsi-ld/v1/entities"
T = "/ngsi-ld/v1/temporal/entities"
TYPES = ["A", "B", "C", "D"]
# ids and types: several match patterns of several sources, some have types of several sources
ENTITIES: list[tuple[str, list[str]]] = [
    ("urn:ngsi-ld:A:north-1", ["A"]),
    ("urn:ngsi-ld:A:south-2", ["A"]),
    ("urn:ngsi-ld:B:north-3", ["B"]),
    ("urn:ngsi-ld:B:south-4", ["B", "A"]),
    ("urn:ngsi-ld:C:north-5", ["C"]),
    ("urn:ngsi-ld:C:east-6", ["C", "D"]),
    ("urn:ngsi-ld:D:west-7", ["D", "C"]),
    ("urn:ngsi-ld:D:north-8", ["D", "B"]),
    ("urn:ngsi-ld:E:north-9", ["E"]),  # a type no source declares
    ("urn:ngsi-ld:E:west-10", ["E", "A"]),
    ("urn:ngsi-ld:Alert:from:s0:north-11", ["A"]),
    ("urn:ngsi-ld:Alert:from:s2:south-12", ["B"]),
    ("urn:ngsi-ld:Alert:from:nosuch:west-13", ["C"]),
    ("urn:ngsi-ld:Alert:camera-14", ["D"]),
]
PATTERNS = [
    r"urn:ngsi-ld:A:.*",
    r"urn:ngsi-ld:[AB]:north-.*",
    r".*:north-\d+",
    r"urn:ngsi-ld:[CD]:.*",
    r"urn:ngsi-ld:Alert:.*",
    r"urn:ngsi-ld:[A-E]:(south|west)-.*",
    r"urn:ngsi-ld:E:.*",
]
PURPOSES = ["p0", "p1", "p2"]
TOKENS = [("p0",), ("p1",), ("p2",), ("p0", "undeclared"), ("p1", "p2"), ("undeclared",)]


def source(sid: str, purpose: str, types: list[str], patterns: list[str]) -> DataSource:
    return DataSource(
        id=sid,
        name=sid,
        types=tuple(types),
        id_patterns=tuple(patterns),
        purposes=(purpose,),
        legal_basis="GDPR art. 6(1)(e)",
        retention="P30D",
        owner="Test department",
    )


def random_catalog(seed: int) -> list[DataSource]:
    """3 to 5 sources with overlapping patterns (and types of several sources on one entity),
    in a random order, each with a random purpose."""
    rnd = random.Random(seed)
    n = rnd.randint(3, 5)
    types = TYPES[:]
    rnd.shuffle(types)
    owned: list[list[str]] = [[] for _ in range(n)]
    for t in types:
        if rnd.random() < 0.8:  # some types are declared by no source
            owned[rnd.randrange(n)].append(t)
    out = []
    for i in range(n):
        patterns = rnd.sample(PATTERNS, rnd.randint(0 if owned[i] else 1, 2))
        out.append(source(f"s{i}", rnd.choice(PURPOSES), owned[i], patterns))
    return out


def ids(docs: Any) -> set[str]:
    assert isinstance(docs, list), docs
    return {str(d["id"]) for d in docs}


def check_catalog(store: Store, tmp_path: Path, sources: list[DataSource]) -> None:
    app, bearer = catalog_app(store, tmp_path, sources)
    with TestClient(app) as c:
        admin = bearer(Role.ADMIN, "*")
        body = [{"id": eid, "type": types, "n": {"value": 1}} for eid, types in ENTITIES]
        r = c.post("/ngsi-ld/v1/entityOperations/upsert", json=body, headers=admin)
        assert r.status_code in (201, 204), r.text
        catalog = app.state.governance.catalog
        for purposes in TOKENS:
            who = f"{purposes} with {[(s.id, s.types, s.id_patterns, s.purposes) for s in sources]}"
            h = bearer(Role.OPERATOR, *purposes)
            readable = set()
            for eid, _ in ENTITIES:
                status = c.get(f"{E}/{eid}", headers=h).status_code
                assert status in (200, 403), (eid, status)
                if status == 200:
                    readable.add(eid)
            # the by-id answer is the catalog's
            expected = {
                eid
                for eid, types in ENTITIES
                if catalog.allows(
                    frozenset(purposes), catalog.source_of(eid, [catalog.expand(t) for t in types])
                )
            }
            assert readable == expected, who
            # a query by attribute, with no type (the general restriction), with its count
            r = c.get(E, params={"attrs": "n", "limit": 1000, "count": "true"}, headers=h)
            assert r.status_code == 200, r.text
            assert ids(r.json()) == readable, who
            assert r.headers["NGSILD-Results-Count"] == str(len(readable)), who
            # per type (the restriction a type query takes), alone and all together
            for t in [*TYPES, "E"]:
                r = c.get(E, params={"type": t, "limit": 1000}, headers=h)
                of_type = {eid for eid, types in ENTITIES if t in types}
                assert ids(r.json()) == readable & of_type, (t, who)
            r = c.get(E, params={"type": ",".join(TYPES), "limit": 1000}, headers=h)
            of_types = {eid for eid, types in ENTITIES if set(types) & set(TYPES)}
            assert ids(r.json()) == readable & of_types, who
            # the temporal API takes the same restriction
            r = c.get(
                T,
                params={
                    "attrs": "n",
                    "timerel": "after",
                    "timeAt": "2000-01-01T00:00:00Z",
                    "limit": 1000,
                },
                headers=h,
            )
            assert r.status_code == 200, r.text
            assert ids(r.json()) == readable, who


def test_an_earlier_hidden_pattern_hides_what_a_later_visible_one_matches(
    store: Store, tmp_path: Path
) -> None:
    """The review's case: ``Camera:north-1`` belongs to cams-north (the first pattern that
    matches it); a token of cams, whose pattern matches it too, got 403 by id and read it
    through a query (the other camera is cams' own)."""
    sources = [
        source("cams-north", "p0", [], [r"urn:ngsi-ld:Camera:north-.*"]),
        source("cams", "p1", ["Camera"], [r"urn:ngsi-ld:Camera:.*"]),
    ]
    app, bearer = catalog_app(store, tmp_path, sources)
    with TestClient(app) as c:
        body = [
            {"id": "urn:ngsi-ld:Camera:north-1", "type": "Camera"},
            {"id": "urn:ngsi-ld:Camera:south-1", "type": "Camera"},
        ]
        r = c.post(
            "/ngsi-ld/v1/entityOperations/upsert", json=body, headers=bearer(Role.ADMIN, "*")
        )
        assert r.status_code in (201, 204), r.text
        cams = bearer(Role.OPERATOR, "p1")
        assert c.get(f"{E}/urn:ngsi-ld:Camera:north-1", headers=cams).status_code == 403
        r = c.get(E, params={"type": "Camera"}, headers=cams)
        assert ids(r.json()) == {"urn:ngsi-ld:Camera:south-1"}
        north = bearer(Role.OPERATOR, "p0")
        r = c.get(E, params={"type": "Camera"}, headers=north)
        assert ids(r.json()) == {"urn:ngsi-ld:Camera:north-1"}


@pytest.mark.parametrize("seed", range(8))
def test_a_query_shows_exactly_what_retrieval_by_id_shows(
    store: Store, tmp_path: Path, seed: int
) -> None:
    check_catalog(store, tmp_path, random_catalog(seed))
