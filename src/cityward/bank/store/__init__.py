"""Storage backends of the data bank: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from cityward.bank.store.base import QuerySpec, Store, WriteTxn


def open_store(database_url: str | None, data_dir: Path) -> Store:
    """The store for a database URL (postgresql://...) or SQLite in ``data_dir``."""
    if database_url and database_url.startswith(("postgresql://", "postgres://")):
        from cityward.bank.store.postgres import PostgresStore

        return PostgresStore(database_url)
    from cityward.bank.store.sqlite import SqliteStore

    if database_url and database_url.startswith("sqlite:///"):
        return SqliteStore(Path(database_url.removeprefix("sqlite:///")))
    if database_url:
        raise ValueError(
            f"unsupported database URL {database_url!r}: use postgresql://... or sqlite:///path"
        )
    return SqliteStore(data_dir / "cityward.db")


__all__ = ["QuerySpec", "Store", "WriteTxn", "open_store"]
