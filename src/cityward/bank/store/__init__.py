"""Storage backends of the data bank: SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path

from cityward.bank.store.base import QuerySpec, Store, WriteTxn
from cityward.redact import redact_quoting as _redact_quoting
from cityward.redact import redact_url as _redact_url


def backend_name(database_url: str | None) -> str:
    """The product name of the store :func:`open_store` opens for ``database_url`` (ValueError
    for one it does not take), without opening it."""
    if database_url and database_url.startswith(("postgresql://", "postgres://")):
        return "PostgreSQL"
    if not database_url or database_url.startswith("sqlite:///"):
        return "SQLite"
    # the URL as shown: a mistyped scheme (postgressql://u:secret@...) printed the password
    raise ValueError(
        f"unsupported database URL {redact_url(database_url)!r}: "
        "use postgresql://... or sqlite:///path"
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


class StoreMisconfigured(ValueError):
    """A PostgreSQL URL that no connection can be made with, whatever the server: a query
    parameter libpq does not know, or a value it refuses (``?sslmode=bogus``,
    ``?connect_timeout=abc``). A configuration error (the commands' exit status 2), not an
    unreachable database: it was psycopg's bare message ("invalid URI query parameter: "foo"")
    naming neither the URL nor the setting, exit status 1, or "connection failed" as if the
    server were down. ``parameter`` is the query parameter at fault ("" for the URL's syntax)."""

    def __init__(self, url: str, parameter: str, reason: str) -> None:
        self.url = without_secrets(url, url)
        self.parameter = parameter
        self.reason = reason
        where = f"{parameter}: " if parameter else ""
        super().__init__(f"invalid PostgreSQL URL {self.url}: {where}{reason}")


# libpq's query parameters whose values it checks before connecting: (parameter, the values
# allowed); the integer ones below. Those a libpq build does not know at all it refuses itself
# when it parses the URL ("invalid URI query parameter").
_PG_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": (
        "any",
        "read-write",
        "read-only",
        "primary",
        "standby",
        "prefer-standby",
    ),
    "load_balance_hosts": ("disable", "random"),
    "sslcertmode": ("disable", "allow", "require"),
    "sslnegotiation": ("postgres", "direct"),
    "ssl_min_protocol_version": ("", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
_PG_INTEGERS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_INTEGER = re.compile(r"\s*[+-]?\d+\s*")  # libpq's parse_int_param


def without_secrets(url: str, text: str) -> str:
    """``text`` (a libpq message about ``url``) with the URL shown redacted and any piece of its
    password masked, its user name kept (:func:`cityward.redact.redact_quoting`)."""
    return _redact_quoting(url, text, keep_user=True)


def check_database_url(database_url: str | None) -> None:
    """ValueError for a URL :func:`open_store` does not take, StoreMisconfigured for a
    PostgreSQL URL that libpq would refuse whatever the server (:func:`check_conninfo`):
    what the settings check at load."""
    if backend_name(database_url) == "PostgreSQL":
        check_conninfo(str(database_url))


def check_conninfo(url: str) -> None:
    """StoreMisconfigured for a PostgreSQL URL (or key=value connection string) that libpq
    would refuse whatever the server: its syntax, a query parameter it does not know, a value
    it does not take; without connecting or resolving a host name. Values libpq checks that
    are not listed here are caught when the store connects
    (:func:`cityward.bank.store.postgres.check_reachable`)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(url)
    except ProgrammingError as exc:
        text = " ".join(str(exc).split())
        unknown = re.match(r'invalid URI query parameter: "([^"]*)"', text)
        if unknown:
            raise StoreMisconfigured(
                url, unknown[1], "not a connection parameter libpq knows"
            ) from None
        raise StoreMisconfigured(
            url, "", f"not a valid URL ({without_secrets(url, text)})"
        ) from None
    for name, allowed in _PG_CHOICES.items():
        value = params.get(name)
        if value is not None and str(value) not in allowed:
            shown = ", ".join(a for a in allowed if a)
            raise StoreMisconfigured(url, name, f"{str(value)!r} is not one of {shown}")
    for name in ("port", *_PG_INTEGERS):
        value = params.get(name)
        if value is None:
            continue
        # a port per host (postgresql://h1:5432,h2:5433/db), one of them possibly empty;
        # an empty connect_timeout psycopg refuses ("bad value for connect_timeout: ''")
        items = str(value).split(",") if name == "port" else [str(value)]
        if any(
            (item or name == "connect_timeout") and not _INTEGER.fullmatch(item) for item in items
        ):
            unit = " of seconds" if name == "connect_timeout" else ""
            raise StoreMisconfigured(url, name, f"{str(value)!r} is not a whole number{unit}")


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


def open_store(
    database_url: str | None, data_dir: Path, *, connect_timeout_s: int | None = None
) -> Store:
    """The store for a database URL (postgresql://...) or SQLite in ``data_dir``.

    ``connect_timeout_s``: how long a PostgreSQL connection attempt waits for a server that
    does not answer (the setting ``database_connect_timeout_s``; None: 5 s) unless the URL
    sets libpq's ``connect_timeout``, which wins. StoreMisconfigured for a URL libpq refuses,
    StoreUnreachable for a database that cannot be connected to."""
    if backend_name(database_url) == "PostgreSQL":
        from cityward.bank.store.postgres import PostgresStore

        return PostgresStore(str(database_url), connect_timeout_s=connect_timeout_s)
    from cityward.bank.store.sqlite import SqliteStore

    return SqliteStore(sqlite_file(database_url, data_dir))


__all__ = [
    "QuerySpec",
    "Store",
    "StoreMisconfigured",
    "StoreUnreachable",
    "WriteTxn",
    "backend_name",
    "check_conninfo",
    "check_database_url",
    "describe_store",
    "open_store",
    "redact_url",
    "sqlite_file",
    "without_secrets",
]
