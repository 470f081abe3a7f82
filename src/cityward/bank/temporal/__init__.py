"""The attribute history behind the NGSI-LD temporal API (tables, rows, queries)."""

from cityward.bank.temporal.duration import Duration, parse_duration
from cityward.bank.temporal.params import (
    AGGR_METHODS,
    AggrMethod,
    TemporalQuery,
    TimeProperty,
    Timerel,
    parse_temporal_query,
)
from cityward.bank.temporal.rows import (
    HistoryRow,
    copy_postgres,
    history_rows,
    insert_sqlite,
    instance_row,
    sqlite_insert,
)
from cityward.bank.temporal.schema import (
    create_postgres,
    create_sqlite,
    ensure_partitions,
    existing_partitions,
    merge_sqlite,
)
from cityward.bank.temporal.sql import (
    AggregateBucket,
    AggregateOverflow,
    Dialect,
    HistoryInstance,
    aggregate_sql,
    aggregates,
    decode_aggregates,
    decode_instance_values,
    decode_instances,
    instances_sql,
)

__all__ = [
    "AGGR_METHODS",
    "AggrMethod",
    "AggregateBucket",
    "AggregateOverflow",
    "Dialect",
    "Duration",
    "HistoryInstance",
    "HistoryRow",
    "TemporalQuery",
    "TimeProperty",
    "Timerel",
    "aggregate_sql",
    "aggregates",
    "copy_postgres",
    "create_postgres",
    "create_sqlite",
    "decode_aggregates",
    "decode_instance_values",
    "decode_instances",
    "ensure_partitions",
    "existing_partitions",
    "history_rows",
    "insert_sqlite",
    "instance_row",
    "instances_sql",
    "merge_sqlite",
    "parse_duration",
    "parse_temporal_query",
    "sqlite_insert",
]
