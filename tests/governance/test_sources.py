"""Declared data sources: their id patterns are read alike by both stores."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cityward.bank.access import selection_conjunct
from cityward.bank.store import Store
from cityward.governance.sources import DataSource, check_purpose
from tests.governance.test_register import write


def source(*patterns: str) -> DataSource:
    return DataSource(
        id="cams",
        name="Cameras",
        id_patterns=patterns,
        purposes=("traffic-management",),
        legal_basis="GDPR art. 6(1)(e)",
        retention="P30D",
        owner="Mobility department",
    )


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        (r"urn:ngsi-ld:Camera:(?P<site>\w+)", "named groups and references"),
        (r"urn:ngsi-ld:Camera:c{,3}", "a repeat {,n} is not allowed"),
    ],
)
def test_an_id_pattern_only_python_reads_is_refused_when_the_configuration_loads(
    pattern: str, reason: str
) -> None:
    """Python's re took these, PostgreSQL's ~ refuses or reads them otherwise: on PostgreSQL
    every governed query failed (or selected other entities than on SQLite)."""
    with pytest.raises(ValidationError) as info:
        source(pattern)
    text = str(info.value)
    assert reason in text and "not a valid regex of the subset both stores read alike" in text
    assert f"at position {pattern.index('{' if '{' in pattern else '(?P')}" in text


IDS = [
    "urn:ngsi-ld:Camera:c1",
    "urn:ngsi-ld:Camera:c_2",
    "urn:ngsi-ld:Camera:cé",  # \w is ASCII in the subset, on both stores
    "urn:ngsi-ld:Camera:C3",
    "urn:ngsi-ld:Camera:c1x:y",
]


@pytest.mark.parametrize("pattern", [r"urn:ngsi-ld:Camera:\w+", r"(?i)urn:ngsi-ld:camera:c\d"])
def test_id_patterns_select_alike_in_python_and_in_the_store(store: Store, pattern: str) -> None:
    """The single-entity check (Python) and the query condition (SQL) agree, on both stores."""
    write(store, [{"id": i, "type": "Camera"} for i in IDS])
    compiled = source(pattern).compiled_patterns
    in_python = {i for i in IDS if any(p.search(i) for p in compiled)}
    conjunct = selection_conjunct([], [], [(True, [pattern])], False, store.dialect)
    rows: list[Any] = store.select(
        f"SELECT e.eid FROM entities e WHERE {conjunct.probe}", conjunct.probe_params
    )
    assert {r[0] for r in rows} == in_python
    assert in_python  # the pattern selects something
    assert "urn:ngsi-ld:Camera:cé" not in in_python and "urn:ngsi-ld:Camera:c1x:y" not in in_python


def test_a_purpose_with_a_final_newline_is_refused() -> None:
    # "$" took a final newline
    with pytest.raises(ValueError, match="purpose"):
        check_purpose("traffic-management\n")
