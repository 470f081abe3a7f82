"""Storage backends of the data bank: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from cityward.bank.store.base import QuerySpec, Store, WriteTxn
from cityward.redact import redact_url as _redact_url


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


class StoreUnreachable(Exception):
    """The database of a URL cannot be connected to when the store opens. Said at once, with
    the URL (password hidden) and why, where the pool waited 30 s for a connection and then
    said only that it had none."""

    def __init__(self, url: str, reason: str, detail: str = "") -> None:
        self.url = redact_url(url)
        self.reason = reason
        self.detail = detail
        super().__init__(
            f"cannot connect to PostgreSQL at {self.url}: {reason}"
            + (f" ({detail})" if detail else "")
        )


def redact_url(url: str) -> str:
    """``url`` with its password (``user:password@``, ``?password=``) shown as ``***``, its
    user name kept, to be printed or logged (:func:`cityward.redact.redact_url`)."""
    return _redact_url(url, keep_user=True)


def sqlite_file(database_url: str | None, data_dir: Path) -> Path:
    """The SQLite file of a sqlite:/// URL, or the one in ``data_dir`` without a URL."""
    return (
        Path(database_url.removeprefix("sqlite:///")) if database_url else data_dir / "cityward.db"
    )


def describe_store(database_url: str | None, data_dir: Path) -> str:
    """What :func:`open_store` opens, for people: "PostgreSQL" (not the URL: it may hold a
    password) or "SQLite in <file>"."""
    if backend_name(database_url) == "PostgreSQL":
        return "PostgreSQL"
    return f"SQLite in {sqlite_file(database_url, data_dir).resolve()}"


def open_store(database_url: str | None, data_dir: Path) -> Store:
    """The store for a database URL (postgresql://...) or SQLite in ``data_dir``."""
    if backend_name(database_url) == "PostgreSQL":
        from cityward.bank.store.postgres import PostgresStore

        return PostgresStore(str(database_url))
    from cityward.bank.store.sqlite import SqliteStore

    return SqliteStore(sqlite_file(database_url, data_dir))


__all__ = [
    "QuerySpec",
    "Store",
    "StoreUnreachable",
    "WriteTxn",
    "backend_name",
    "describe_store",
    "open_store",
    "redact_url",
    "sqlite_file",
]
