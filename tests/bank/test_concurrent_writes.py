"""Two writers changing one entity at the same moment, on real PostgreSQL and SQLite (the
``store`` fixture of tests/conftest.py): the second waits for the first and applies its
change to the first one's result. Nothing is lost, and nobody is told that an entity which
exists was not found."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from cityward.bank.errors import NgsiError
from cityward.bank.jsonld import ContextResolver
from cityward.bank.model import EntityParser
from cityward.bank.service import Bank
from cityward.bank.store import Store

EID = "urn:ngsi-ld:Counter:c1"
ROUNDS = 60


def _race(writer: Callable[[str], None]) -> None:
    """``writer("a")`` and ``writer("b")`` on two threads, started together; both finished."""
    start = threading.Barrier(2)

    def run(name: str) -> None:
        start.wait()
        writer(name)

    threads = [threading.Thread(target=run, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_changes_of_one_entity_wait_for_each_other(store: Store) -> None:
    parser = EntityParser(ContextResolver().core)
    bank = Bank(store)

    def frag(body: dict[str, Any]) -> dict[str, Any]:
        return parser.entity({"id": EID, "type": "Counter", **body}, "create")

    bank.create("", frag({}))
    errors: list[str] = []

    def writer(name: str) -> None:
        for n in range(ROUNDS):
            body = {f"{name}{n}": {"type": "Property", "value": n}}
            try:
                bank.append("", EID, frag(body), no_overwrite=False)
            except NgsiError as exc:
                errors.append(f"{name}{n}: {exc.status} {exc}")

    _race(writer)
    assert errors == []
    doc = bank.retrieve("", EID)
    names = {iri.rsplit("/", 1)[-1] for iri in doc["attrs"]}
    # every append of both writers is there: none was lost to the other's concurrent write
    assert names == {f"{w}{n}" for w in ("a", "b") for n in range(ROUNDS)}


def test_concurrent_batch_upserts_of_the_same_entities_lose_nothing(store: Store) -> None:
    """Two batch writers (the API's batch upsert; ingest writers without their entity locks)
    updating the same existing entities at once: every batch succeeds, every attribute is
    there."""
    parser = EntityParser(ContextResolver().core)
    bank = Bank(store)
    ids = [f"urn:ngsi-ld:Counter:b{k}" for k in range(20)]
    bank.batch_create("", [parser.entity({"id": i, "type": "Counter"}, "create") for i in ids])
    failures: list[str] = []

    def writer(name: str) -> None:
        for n in range(20):
            batch = [
                parser.entity(
                    {"id": i, "type": "Counter", f"{name}{n}": {"type": "Property", "value": n}},
                    "create",
                )
                for i in ids
            ]
            result = bank.batch_upsert("", batch, "update")
            failures.extend(f"{name}{n}: {e}" for e in result.errors)

    _race(writer)
    assert failures == []
    want = {f"{w}{n}" for w in ("a", "b") for n in range(20)}
    for i in ids:
        assert {iri.rsplit("/", 1)[-1] for iri in bank.retrieve("", i)["attrs"]} == want
