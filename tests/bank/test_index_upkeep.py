"""attr_index follows every kind of update: an update keeps row keys and changes values (the
SQLite store upserts the rows), a row may disappear, appear, change its kind or shift position.
After each write the table must hold exactly the rows a fresh indexing of the stored documents
gives."""

from __future__ import annotations

from typing import Any

from cityward.bank.service import Bank
from cityward.bank.store import Store
from cityward.bank.store.base import derive

NS = "https://uri.etsi.org/ngsi-ld/default-context/"
EID = "urn:ngsi-ld:Sensor:1"


def frag(**attrs: Any) -> dict[str, Any]:
    return {
        "id": EID,
        "type": [NS + "Sensor"],
        "attrs": {NS + k: [{"type": "Property", "value": v}] for k, v in attrs.items()},
    }


def index_of(store: Store) -> list[tuple[Any, ...]]:
    rows = store._select(
        "SELECT path, vt, num, txt FROM attr_index ORDER BY path, vt, num, txt", []
    )
    return [tuple(r) for r in rows]


def expected(bank: Bank) -> list[tuple[Any, ...]]:
    doc = bank.store.get("", EID)
    assert doc is not None
    rows = [tuple(r) for r in derive(doc).idx]
    key = lambda r: (r[0], r[1], -1e308 if r[2] is None else r[2], r[3] or "")  # noqa: E731
    return sorted(rows, key=key)


def test_index_rows_follow_updates(store: Store) -> None:
    bank = Bank(store)
    steps: list[tuple[str, dict[str, Any]]] = [
        ("update", frag(a=1.5, b="x")),
        ("update", frag(a=2.5)),  # same keys, new value
        ("update", frag(a="text")),  # a number becomes a string
        ("update", frag(c=[1, 2, 3])),  # a list: three rows
        ("replace", frag(c=[4], d=True)),  # the list shrinks, a and b go
        # grows; infinity goes in apart (the stored document cannot hold it: JSON has no
        # infinity, so this step is checked by the next one leaving no stale row behind)
        ("update", frag(c=[5, 6, 7, 8], a=float("inf"))),
        ("update", frag(a=3.0)),  # infinity replaced by a number
        ("replace", frag(z={"k": "v"})),  # everything replaced
        ("update", frag(z={"k": "v"})),  # nothing changes
    ]
    for n, (mode, f) in enumerate(steps):
        result = bank.batch_upsert("", [f], mode)  # type: ignore[arg-type]
        assert not result.errors, (n, result.errors)
        if n == 5:
            assert (float("inf"),) in [(r[2],) for r in index_of(store)]
            continue
        got = sorted(index_of(store), key=lambda r: (r[0], r[1], r[2] or -1e308, r[3] or ""))
        assert got == expected(bank), f"step {n} ({mode} {f['attrs']})"
