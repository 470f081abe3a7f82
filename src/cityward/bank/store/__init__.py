"""Storage backends of the data bank: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from cityward.bank.store.base import QuerySpec, Store, WriteTxn


def backend_name(database_url: str | None) -> str:
    """The product name of the store :func:`open_store` opens for ``database_url`` (ValueError
    for one it does not take), without opening it."""
    if database_url and database_url.startswith(("postgresql://", "postgres://")):
        return "PostgreSQL"
    if not database_url or database_url.startswith("sqlite:///"):
        return "SQLite"
    raise ValueError(
        f"unsupported database URL {database_url!r}: use postgresql://... or sqlite:///path"
    )


def open_store(database_url: str | None, data_dir: Path) -> Store:
    """The store for a database URL (postgresql://...) or SQLite in ``data_dir``."""
    if backend_name(database_url) == "PostgreSQL":
        from cityward.bank.store.postgres import PostgresStore

        return PostgresStore(str(database_url))
    from cityward.bank.store.sqlite import SqliteStore

    if database_url:
        return SqliteStore(Path(database_url.removeprefix("sqlite:///")))
    return SqliteStore(data_dir / "cityward.db")


__all__ = ["QuerySpec", "Store", "WriteTxn", "backend_name", "open_store"]
