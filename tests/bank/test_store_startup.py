"""Start-up against PostgreSQL as the commands say it: a URL libpq refuses is a configuration
error (exit 2) naming the parameter and the URL (password hidden); an unreachable database is
said before `serve` says it listens; the connect timeout is a setting,
``database_connect_timeout_s``, below the URL's own ``connect_timeout``."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from cityward.config import load_settings
from tests.bank.commands import run_cityward
from tests.conftest import PG_URL

pytestmark = pytest.mark.postgres

SECRET = "s3cret"
BANNER = "NGSI-LD API at"


def _free_port() -> int:
    """A port for `serve --port` (never 8000 or 1026, which real servers may hold)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _invoke(args: list[str], **env: str) -> tuple[int, str]:
    """Exit status and output of the command run in this process (typer's CliRunner): for what
    the settings refuse at load, before anything is opened (a process each costs seconds)."""
    from typer.testing import CliRunner

    from cityward.cli import app

    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CITYWARD_")}
    result = CliRunner().invoke(app, args, env={**clean, "COLUMNS": "1000", **env})
    return result.exit_code, result.output + (
        ""
        if result.exception is None or isinstance(result.exception, SystemExit)
        else f"Traceback: {result.exception!r}"
    )


def _ingest_config(tmp_path: Path) -> Path:
    """A configuration with one enabled source, so that `ingest run` gets to open the bank."""
    (tmp_path / "readings.csv").write_text("id,no2\na,1\n")
    config = tmp_path / "ingest.toml"
    config.write_text(
        '[[ingest.sources]]\nname = "s"\nadapter = "replay"\n'
        f'[ingest.sources.options]\npath = "{tmp_path / "readings.csv"}"\n'
        '[ingest.sources.mapping]\nentity_type = "AirQualityObserved"\n'
        'id = "urn:ngsi-ld:AirQualityObserved:{topic[1]}"\n'
        'attributes = { no2 = { path = "$.no2" } }\n'
    )
    return config


def _command(name: str, url: str, tmp_path: Path) -> list[str]:
    db = ["--database-url", url, "--data-dir", str(tmp_path / "d")]
    if name == "serve":
        return ["serve", "--port", str(_free_port()), *db]
    if name == "ingest run":
        return ["ingest", "run", "--config", str(_ingest_config(tmp_path)), *db]
    return ["token", "create", "--role", "admin", *db]


# (the URL, with SECRET as its password; the parameter named; a piece of the reason)
BAD_URLS = [
    (
        f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres?connect_timeout=abc",
        "connect_timeout",
        "'abc' is not a whole number of seconds",
    ),
    (
        f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres?sslmode=bogus",
        "sslmode",
        "'bogus' is not one of disable, allow, prefer, require, verify-ca, verify-full",
    ),
    (
        f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres?foo=1",
        "foo",
        "not a connection parameter libpq knows",
    ),
]


@pytest.mark.parametrize("command", ["serve", "ingest run", "token create"])
@pytest.mark.parametrize(("url", "parameter", "why"), BAD_URLS)
def test_a_url_parameter_libpq_refuses_is_a_configuration_error_naming_it(
    command: str, url: str, parameter: str, why: str, tmp_path: Path
) -> None:
    """It was psycopg's bare message ("invalid URI query parameter: "foo"", "bad value for
    connect_timeout") or "connection failed" as if the server were down, exit status 1,
    after `serve`'s banner."""
    code, out = _invoke(_command(command, url, tmp_path))
    shown = url.replace(f":{SECRET}@", ":***@")
    assert code == 2, out
    assert f"invalid PostgreSQL URL {shown}: {parameter}: {why}" in out.splitlines()[-1], out
    assert "database_url" in out, out  # the setting, as for the other settings' errors
    assert SECRET not in out and "Traceback" not in out and BANNER not in out, out


def test_a_value_only_libpq_checks_is_a_configuration_error_when_the_store_connects(
    tmp_path: Path,
) -> None:
    """require_auth's grammar is libpq's: refused when the store connects, still exit 2."""
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres?require_auth=nonsense"
    code, out = run_cityward(_command("token create", url, tmp_path), tmp_path)
    assert code == 2, out
    assert out.strip().startswith(
        "cityward: invalid PostgreSQL URL postgresql://postgres:***@127.0.0.1:5432/postgres?"
    ), out
    assert "require_auth: " in out and "nonsense" in out, out
    assert len(out.strip().splitlines()) == 1 and SECRET not in out, out


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        # libpq quotes what it could not parse, here the password itself
        ("postgresql://postgres:p4ss word@127.0.0.1:5432/postgres", "p4ss word"),
        # libpq quotes the whole URI
        (f"postgresql://postgres:{SECRET}@[::1/postgres", SECRET),
        # a mistyped scheme: the settings quoted the URL as given
        (f"postgressql://postgres:{SECRET}@127.0.0.1:5432/postgres", SECRET),
    ],
)
def test_a_url_that_does_not_parse_never_shows_its_password(
    url: str, secret: str, tmp_path: Path
) -> None:
    code, out = _invoke(_command("serve", url, tmp_path))
    assert code == 2, out
    assert "postgres:***@" in out, out
    assert secret not in out and "Traceback" not in out and BANNER not in out, out


def test_serve_says_the_database_is_unreachable_before_any_banner(
    closed_port: int, tmp_path: Path
) -> None:
    """With one process the banner ("NGSI-LD API at http://...", the admin token) came first,
    then the failure of the app's start: an operator read that it listened, then that it
    did not. (With --workers N the database was already tried first: test_pg_unreachable.)"""
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:{closed_port}/postgres"
    code, out = run_cityward(_command("serve", url, tmp_path), tmp_path)
    assert code == 1, out
    assert out.strip().splitlines() == [
        f"cityward: cannot connect to PostgreSQL at "
        f"postgresql://postgres:***@127.0.0.1:{closed_port}/postgres: connection refused"
    ], out


def test_the_connect_timeout_is_a_setting_below_the_urls_connect_timeout(
    silent_port: int, tmp_path: Path
) -> None:
    """CITYWARD_DATABASE_CONNECT_TIMEOUT_S sets the wait for a server that never answers; the
    URL's libpq connect_timeout, where given, wins (it speaks of that one database)."""
    url = f"postgresql://postgres@127.0.0.1:{silent_port}/postgres"
    env = {"CITYWARD_DATABASE_CONNECT_TIMEOUT_S": "2"}
    code, out = run_cityward(_command("token create", url, tmp_path), tmp_path, **env)
    assert code == 1, out
    assert out.strip() == f"cityward: cannot connect to PostgreSQL at {url}: timed out after 2 s"

    code, out = run_cityward(
        _command("token create", f"{url}?connect_timeout=3", tmp_path), tmp_path, **env
    )
    assert code == 1, out
    assert out.strip().endswith("?connect_timeout=3: timed out after 3 s"), out

    # serve --workers N tries the database itself before its workers start
    code, out = run_cityward([*_command("serve", url, tmp_path), "--workers", "2"], tmp_path, **env)
    assert code == 1, out
    assert out.strip() == f"cityward: cannot connect to PostgreSQL at {url}: timed out after 2 s"


@pytest.mark.parametrize("value", ["1", "301", "abc"])
def test_a_connect_timeout_setting_out_of_bounds_is_refused_at_load(
    value: str, closed_port: int, tmp_path: Path
) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port}/postgres"  # never reached
    code, out = _invoke(_command("serve", url, tmp_path), CITYWARD_DATABASE_CONNECT_TIMEOUT_S=value)
    assert code == 2, out
    assert "database_connect_timeout_s:" in out and BANNER not in out, out


def test_the_pools_connections_carry_the_connect_timeout(tmp_path: Path) -> None:
    """The pool reconnects (a server restarted) with the same timeout as the first attempt:
    without one it waited as long as the operating system did for a server that vanished."""
    from cityward.bank.store import open_store
    from cityward.bank.store.postgres import PostgresStore

    def pooled_timeout(url: str, setting: int | None) -> str | None:
        store = open_store(url, tmp_path, connect_timeout_s=setting)
        assert isinstance(store, PostgresStore)
        try:
            with store.pool.connection() as conn:
                return conn.info.get_parameters().get("connect_timeout")
        finally:
            store.close()

    assert pooled_timeout(PG_URL, 7) == "7"
    assert pooled_timeout(PG_URL, None) == "5"  # the setting's default
    sep = "&" if "?" in PG_URL else "?"
    assert pooled_timeout(f"{PG_URL}{sep}connect_timeout=9", 7) == "9"


def test_the_settings_check_the_url_without_connecting() -> None:
    """Loading the settings refuses what no server could take (no host is resolved: this
    one does not exist) and takes what libpq takes."""
    from cityward.bank.store import StoreMisconfigured, check_database_url

    host = "db.cityward-test.invalid"
    for good in [
        f"postgresql://u:{SECRET}@{host}:5432/db?connect_timeout=10&sslmode=verify-full",
        f"postgresql://u@{host}:5432,{host}:5433/db?target_session_attrs=read-write",
        f"postgres://{host}/db?keepalives=1&keepalives_idle=30&application_name=cw",
    ]:
        check_database_url(good)
        assert load_settings(None, database_url=good).database_url == good
    for bad, parameter in [
        (f"postgresql://u:{SECRET}@{host}/db?connect_timeout=2.5", "connect_timeout"),
        (f"postgresql://u:{SECRET}@{host}/db?connect_timeout=", "connect_timeout"),
        (f"postgresql://u:{SECRET}@{host}:abc/db", "port"),
        (f"postgresql://u:{SECRET}@{host}/db?keepalives_count=x", "keepalives_count"),
        (f"postgresql://u:{SECRET}@{host}/db?gssencmode=always", "gssencmode"),
        (f"postgresql://u:{SECRET}@{host}/db?password={SECRET}&x=1", "x"),
    ]:
        with pytest.raises(StoreMisconfigured) as caught:
            check_database_url(bad)
        assert caught.value.parameter == parameter, bad
        assert SECRET not in str(caught.value)
        with pytest.raises(ValidationError) as invalid:
            load_settings(None, database_url=bad)
        assert [e["loc"] for e in invalid.value.errors()] == [("database_url",)]
