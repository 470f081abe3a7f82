"""A PostgreSQL that cannot be had at start: one direct connection attempt says why at once
(with the URL, password hidden) instead of the pool's wait of 30 s and its PoolTimeout."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from cityward.bank.store import StoreUnreachable, open_store, redact_url
from tests.bank.commands import run_cityward
from tests.conftest import PG_URL

pytestmark = pytest.mark.postgres

POOL_TIMEOUT_S = float(inspect.signature(ConnectionPool.__init__).parameters["timeout"].default)


def _pg(**parts: str) -> str:
    """PG_URL (the test server) with its user or database replaced."""
    info = conninfo_to_dict(PG_URL)
    user = parts.get("user", str(info.get("user") or "postgres"))
    db = parts.get("dbname", str(info.get("dbname") or "postgres"))
    return f"postgresql://{user}@{info.get('host') or '127.0.0.1'}:{info.get('port') or 5432}/{db}"


def _unreachable(url: str, tmp_path: Path) -> tuple[StoreUnreachable, float]:
    start = time.monotonic()
    with pytest.raises(StoreUnreachable) as caught:
        open_store(url, tmp_path)
    return caught.value, time.monotonic() - start


def test_a_refused_connection_fails_at_once_not_after_the_pool_timeout(
    closed_port: int, tmp_path: Path
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    exc, took = _unreachable(url, tmp_path)
    assert str(exc) == f"cannot connect to PostgreSQL at {url}: connection refused"
    # the direct attempt's error, not the pool's after its wait
    assert isinstance(exc.__cause__, psycopg.OperationalError)
    assert not isinstance(exc.__cause__, PoolTimeout)
    assert took < POOL_TIMEOUT_S / 5


@pytest.mark.parametrize(
    ("parts", "reason", "detail"),
    [
        ({"dbname": "cityward_no_such_db"}, "database does not exist", '"cityward_no_such_db"'),
        ({"user": "cityward_no_such_role"}, "authentication failed", '"cityward_no_such_role"'),
    ],
)
def test_a_server_refusing_the_session_says_why(
    parts: dict[str, str], reason: str, detail: str, tmp_path: Path
) -> None:
    url = _pg(**parts)
    exc, _ = _unreachable(url, tmp_path)
    assert str(exc).startswith(f"cannot connect to PostgreSQL at {url}: {reason} (")
    assert detail in str(exc)
    assert exc.reason == reason
    assert not isinstance(exc.__cause__, PoolTimeout)


def test_a_server_that_never_answers_times_out_after_the_urls_connect_timeout(
    silent_port: int, tmp_path: Path
) -> None:
    """connect_timeout in the URL (libpq's parameter) sets how long the attempt waits."""
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/postgres?connect_timeout=2"
    exc, took = _unreachable(url, tmp_path)
    assert str(exc) == f"cannot connect to PostgreSQL at {url}: timed out after 2 s"
    assert not isinstance(exc.__cause__, PoolTimeout)
    assert took < POOL_TIMEOUT_S / 2


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:p%40ss@h1:1,h2:2/db?x=1", "postgresql://u:***@h1:1,h2:2/db?x=1"),
        ("postgres://h/db?user=u&password=s3cret&x=1", "postgres://h/db?user=u&password=***&x=1"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h", "postgresql://h"),
    ],
)
def test_the_url_shown_hides_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_command_on_an_unreachable_database_says_so_in_one_line(
    closed_port: int, tmp_path: Path
) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{closed_port}/postgres"
    code, out = run_cityward(
        ["token", "create", "--role", "admin", "--database-url", url, "--data-dir", "d"], tmp_path
    )
    assert code == 1, out
    assert out.strip() == (
        f"cityward: cannot connect to PostgreSQL at "
        f"postgresql://postgres:***@127.0.0.1:{closed_port}/postgres: connection refused"
    )


def test_serve_with_workers_on_an_unreachable_database_stops_before_the_workers(
    closed_port: int, tmp_path: Path
) -> None:
    """The workers open the store themselves: each would fail on its own, with a traceback."""
    url = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"
    code, out = run_cityward(
        ["serve", "--workers", "2", "--database-url", url, "--data-dir", "d"], tmp_path
    )
    assert code == 1, out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1] == (
        f"cityward: cannot connect to PostgreSQL at {url}: connection refused"
    )
