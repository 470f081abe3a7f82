"""History rows from entity document changes, and how each backend inserts them."""

from __future__ import annotations

import functools
import math
import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import orjson
import psycopg

from cityward.bank.query.indexer import normalize_timestamp, path_id
from cityward.bank.temporal.schema import MERGE_ROWS, merge_sqlite
from cityward.bank.temporal.times import iso_to_us

# members kept in columns instead of the stored instance JSON (see schema.py)
_SYSTEM = ("createdAt", "modifiedAt")
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


class HistoryRow(NamedTuple):
    """One attr_history row, dialect-neutral: times are normalized ``...ffffffZ`` texts."""

    e: int
    path: int
    iri: str
    ds: str | None
    obs: str
    created: str
    modified: str
    num: float | None
    inst: str


def _time(value: object, fallback: str) -> str:
    if isinstance(value, str):
        norm = _valid_time(value)
        if norm is not None:
            return norm
    return fallback


@functools.lru_cache(maxsize=1024)
def _valid_time(value: str) -> str | None:
    """The normalized timestamp, or None. Cached: the system times of one write's rows are
    all the same text (its ``now``), and this ran three times for every history row."""
    norm = normalize_timestamp(value)
    return norm if _TIMESTAMP.fullmatch(norm) else None


def numeric_value(inst: Mapping[str, Any]) -> float | None:
    """The number aggregation uses: a Property's numeric (or boolean, as 1/0) value, or None."""
    if inst.get("type", "Property") != "Property" or "value" not in inst:
        return None
    v = inst["value"]
    if type(v) is dict and "@value" in v:  # a typed literal such as {"@type":..., "@value": 3}
        v = v["@value"]
    t = type(v)
    if t is bool:
        return 1.0 if v else 0.0
    if t is int or t is float:
        try:
            f = float(v)
        except OverflowError:  # an integer beyond the float range cannot be aggregated
            return None
        return f if math.isfinite(f) else None
    return None


def instance_row(pk: int, iri: str, inst: Mapping[str, Any], now_iso: str) -> HistoryRow:
    """The row of one attribute instance; missing observedAt/createdAt/modifiedAt are ``now``."""
    now = normalize_timestamp(now_iso)
    body = {k: v for k, v in inst.items() if k not in _SYSTEM}
    ds = inst.get("datasetId")
    return HistoryRow(
        e=pk,
        path=path_id(iri),
        iri=iri,
        ds=ds if isinstance(ds, str) else None,
        obs=_time(inst.get("observedAt"), now),
        created=_time(inst.get("createdAt"), now),
        modified=_time(inst.get("modifiedAt"), now),
        num=numeric_value(inst),
        # sorted keys: the same value is always the same text (distinctCount compares texts)
        inst=orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode(),
    )


def _same(a: Any, b: Any) -> bool:
    """Instances equal but for ``modifiedAt`` (at any depth of sub-attributes)."""
    if type(a) is dict and type(b) is dict:
        # the usual answer, and the quick one: a new reading has a new time or value
        if a.get("observedAt") != b.get("observedAt") or a.get("value") != b.get("value"):
            return False
        keys = a.keys() | b.keys()
        keys.discard("modifiedAt")
        return all(k in a and k in b and _same(a[k], b[k]) for k in keys)
    if type(a) is list and type(b) is list:
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and type(a) is type(b)


def history_rows(
    pk: int,
    old_doc: Mapping[str, Any] | None,
    new_doc: Mapping[str, Any],
    now_iso: str,
) -> list[HistoryRow]:
    """Rows for the attribute instances of ``new_doc`` that are new or changed since ``old_doc``.

    Instances are matched by (attribute, datasetId) and compared ignoring ``modifiedAt``, so
    re-sending an unchanged value records nothing. Removed attributes record nothing either.
    """
    old_attrs: Mapping[str, Any] = old_doc.get("attrs", {}) if old_doc else {}
    rows: list[HistoryRow] = []
    for iri, instances in new_doc.get("attrs", {}).items():
        before = old_attrs.get(iri)
        previous: dict[str | None, Any] = (
            {inst.get("datasetId"): inst for inst in before} if before else {}
        )
        for inst in instances:
            old = previous.get(inst.get("datasetId"))
            if old is None or not _same(old, inst):
                rows.append(instance_row(pk, iri, inst, now_iso))
    return rows


# SQLite: one INSERT ... SELECT over a JSON array per table, not executemany. The rows are then
# inserted by one sqlite3_step with the GIL released; executemany re-takes the GIL per row, and
# while another thread runs Python each re-take waits out the switch interval.
_SQLITE_ATTRS = (
    "INSERT OR IGNORE INTO attr_history_attrs(path, iri) "
    "SELECT value ->> 0, value ->> 1 FROM json_each(?)"
)
_SQLITE_ROWS = (
    "INSERT INTO attr_history_new(id, e, path, ds, obs, created, modified, num, inst) SELECT "
    "? + key, " + ", ".join(f"value ->> {i}" for i in range(8)) + " FROM json_each(?)"
)
# The next free instance id: past every id given so far, merged (the AUTOINCREMENT counter of
# attr_history, which also counts deleted rows) or staged. And how many rows are staged.
_SQLITE_IDS = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'attr_history'), 0), "
    "coalesce((SELECT max(id) FROM attr_history_new), 0)) + 1, "
    # min and max each in a subquery of its own: one index seek each (together: a scan)
    "coalesce((SELECT max(id) FROM attr_history_new) - (SELECT min(id) FROM attr_history_new) "
    "+ 1, 0)"
)


def sqlite_insert(rows: Sequence[HistoryRow], first_id: int) -> list[tuple[str, list[Any]]]:
    """The statements (sql, params) that stage ``rows`` on SQLite with the ids ``first_id``,
    ``first_id + 1``, ...: two, whatever the count."""
    if not rows:
        return []
    attrs = {r.path: r.iri for r in rows}
    # the rows of one write mostly share their system times: convert each text once
    micros: dict[str, int] = {}

    def us(text: str) -> int:
        v = micros.get(text)
        if v is None:
            v = micros[text] = iso_to_us(text)
        return v

    data = [
        (r.e, r.path, r.ds, us(r.obs), us(r.created), us(r.modified), r.num, r.inst) for r in rows
    ]
    return [
        (_SQLITE_ATTRS, [orjson.dumps(list(attrs.items())).decode()]),
        (_SQLITE_ROWS, [first_id, orjson.dumps(data).decode()]),
    ]


def insert_sqlite(
    conn: sqlite3.Connection, rows: Sequence[HistoryRow], merge_at: int = MERGE_ROWS
) -> None:
    """Insert ``rows`` in the caller's transaction: staged in ``attr_history_new``, and all
    staged rows merged into ``attr_history`` once ``merge_at`` or more are waiting (0: now;
    see cityward.bank.temporal.schema)."""
    if not rows:
        return
    first_id, staged = conn.execute(_SQLITE_IDS).fetchone()
    for sql, params in sqlite_insert(rows, int(first_id)):
        conn.execute(sql, params)
    if int(staged) + len(rows) >= merge_at:
        merge_sqlite(conn)


def copy_postgres(conn: psycopg.Connection[Any], rows: Sequence[HistoryRow]) -> None:
    """Insert ``rows`` in the caller's transaction: the IRIs by one upsert, the rows by COPY.

    Rows whose month has no partition yet land in the default partition (see
    schema.ensure_partitions, best called before this in a transaction of its own).
    """
    if not rows:
        return
    attrs = {r.path: r.iri for r in rows}
    conn.execute(
        "INSERT INTO attr_history_attrs(path, iri) SELECT * FROM unnest(%s::bigint[], %s::text[]) "
        "ON CONFLICT DO NOTHING",
        [list(attrs), list(attrs.values())],
    )
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY attr_history (e, path, ds, obs, created, modified, num, inst) FROM STDIN"
        ) as copy,
    ):
        for r in rows:
            copy.write_row((r.e, r.path, r.ds, r.obs, r.created, r.modified, r.num, r.inst))
