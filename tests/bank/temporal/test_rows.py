"""History rows from document changes, and their insertion on both backends."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from cityward.bank.query.indexer import path_id
from cityward.bank.temporal import (
    TemporalQuery,
    history_rows,
    instance_row,
    sqlite_insert,
)
from cityward.bank.temporal.rows import numeric_value
from tests.bank.temporal.conftest import HistoryDb

SPEED = "https://ex.org/speed"
OWNER = "https://ex.org/owner"
NAME = "https://ex.org/name"
NOW = "2024-05-01T12:00:00.000000Z"
LATER = "2024-05-01T12:05:00.000000Z"


def speed(
    value: Any, observed: str | None = "2024-05-01T11:00:00Z", **extra: Any
) -> dict[str, Any]:
    inst: dict[str, Any] = {
        "type": "Property",
        "value": value,
        "createdAt": "2024-05-01T10:00:00.000000Z",
        "modifiedAt": "2024-05-01T10:00:00.000000Z",
        **extra,
    }
    if observed is not None:
        inst["observedAt"] = observed
    return inst


def doc(**attrs: list[dict[str, Any]]) -> dict[str, Any]:
    iris = {"speed": SPEED, "owner": OWNER, "name": NAME}
    return {
        "id": "urn:ngsi-ld:Vehicle:A1",
        "type": ["https://ex.org/Vehicle"],
        "createdAt": "2024-05-01T10:00:00.000000Z",
        "modifiedAt": "2024-05-01T10:00:00.000000Z",
        "attrs": {iris[k]: v for k, v in attrs.items()},
    }


def test_creation_records_every_instance() -> None:
    new = doc(
        speed=[speed(50), speed(7, datasetId="urn:ds:gps")],
        owner=[{"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"}],
    )
    rows = history_rows(3, None, new, NOW)
    assert [(r.e, r.iri, r.ds, r.num) for r in rows] == [
        (3, SPEED, None, 50.0),
        (3, SPEED, "urn:ds:gps", 7.0),
        (3, OWNER, None, None),
    ]
    assert all(r.path == path_id(r.iri) for r in rows)
    first = rows[0]
    assert first.obs == "2024-05-01T11:00:00.000000Z"
    assert (first.created, first.modified) == ("2024-05-01T10:00:00.000000Z",) * 2
    # the JSON keeps everything but the system times (those are columns), keys sorted
    assert first.inst == '{"observedAt":"2024-05-01T11:00:00Z","type":"Property","value":50}'
    # without observedAt or system times the receive time stands in
    owner = rows[2]
    assert (owner.obs, owner.created, owner.modified) == (NOW, NOW, NOW)


def test_only_changed_instances_are_recorded() -> None:
    old = doc(speed=[speed(50), speed(7, datasetId="urn:ds:gps")], name=[speed("x")])
    new = copy.deepcopy(old)
    for inst in new["attrs"][SPEED]:
        inst["modifiedAt"] = LATER  # touched, not changed
    assert history_rows(3, old, new, NOW) == []

    new["attrs"][SPEED][1]["value"] = 8
    new["attrs"][SPEED].append(speed(1, datasetId="urn:ds:radar"))
    del new["attrs"][NAME]  # removal records nothing
    rows = history_rows(3, old, new, NOW)
    assert [(r.ds, r.num) for r in rows] == [("urn:ds:gps", 8.0), ("urn:ds:radar", 1.0)]


def test_value_type_change_is_a_change() -> None:
    old = doc(speed=[speed(1)])
    assert len(history_rows(1, old, doc(speed=[speed(1.0)]), NOW)) == 1
    assert len(history_rows(1, old, doc(speed=[speed(True)]), NOW)) == 1
    assert history_rows(1, old, doc(speed=[speed(1)]), NOW) == []


def test_sub_attributes() -> None:
    sub = {
        "https://ex.org/accuracy": {
            "type": "Property",
            "value": 0.5,
            "createdAt": "2024-05-01T10:00:00.000000Z",
            "modifiedAt": "2024-05-01T10:00:00.000000Z",
        }
    }
    old = doc(speed=[speed(50, sub=sub)])
    new = copy.deepcopy(old)
    new["attrs"][SPEED][0]["sub"]["https://ex.org/accuracy"]["modifiedAt"] = LATER
    assert history_rows(1, old, new, NOW) == []
    new["attrs"][SPEED][0]["sub"]["https://ex.org/accuracy"]["value"] = 0.7
    (row,) = history_rows(1, old, new, NOW)
    stored = orjson.loads(row.inst)
    # sub-attributes keep their own system times inside the JSON
    assert stored["sub"]["https://ex.org/accuracy"]["modifiedAt"] == LATER
    assert "modifiedAt" not in stored


def test_short_observed_at_is_normalized() -> None:
    row = instance_row(1, SPEED, speed(1, observed="2024-05-01T11:00:00.5Z"), NOW)
    assert row.obs == "2024-05-01T11:00:00.500000Z"
    bogus = instance_row(1, SPEED, speed(1, observed="urn:ngsi-ld:null"), NOW)
    assert bogus.obs == NOW


@pytest.mark.parametrize(
    ("inst", "num"),
    [
        ({"type": "Property", "value": 3}, 3.0),
        ({"type": "Property", "value": -2.5}, -2.5),
        ({"type": "Property", "value": True}, 1.0),
        ({"type": "Property", "value": False}, 0.0),
        ({"type": "Property", "value": {"@type": "Number", "@value": 4}}, 4.0),
        ({"type": "Property", "value": 10**400}, None),
        ({"type": "Property", "value": "3"}, None),
        ({"type": "Property", "value": [1, 2]}, None),
        ({"type": "Property", "value": {"a": 1}}, None),
        ({"type": "GeoProperty", "value": {"type": "Point", "coordinates": [1, 2]}}, None),
        ({"type": "Relationship", "object": "urn:x"}, None),
        ({"type": "ListProperty", "valueList": [1]}, None),
        ({"type": "JsonProperty", "json": 5}, None),
    ],
)
def test_numeric_value(inst: dict[str, Any], num: float | None) -> None:
    assert numeric_value(inst) == num


def test_sqlite_insert_is_two_statements() -> None:
    rows = [instance_row(1, SPEED, speed(i), NOW) for i in range(1000)]
    statements = sqlite_insert(rows, 17)
    assert len(statements) == 2
    assert all("json_each(?)" in sql for sql, _ in statements)
    assert [len(params) for _, params in statements] == [1, 2]
    assert statements[1][1][0] == 17  # the first id
    assert sqlite_insert([], 1) == []


def test_rows_round_trip(db: HistoryDb) -> None:
    new = doc(
        speed=[speed(50), speed(7, datasetId="urn:ds:gps")],
        owner=[{"type": "Relationship", "object": "urn:ngsi-ld:Person:P1"}],
        name=[speed("Ünïcode ✓", observed=None)],
    )
    rows = history_rows(3, None, new, NOW)
    db.insert(rows)
    db.insert([])  # nothing to do
    got = db.instances(TemporalQuery(), [3])
    assert len(got) == 4
    by_key = {(i.iri, i.ds): i for i in got}
    for row in rows:
        inst = by_key[(row.iri, row.ds)]
        expected = {k: v for k, v in new["attrs"][row.iri][0 if row.ds is None else 1].items()}
        expected.setdefault("createdAt", NOW)
        expected.setdefault("modifiedAt", NOW)
        assert inst.inst == expected
        assert inst.time == row.obs
        assert inst.e == 3 and inst.path == row.path
    assert len({i.id for i in got}) == 4
