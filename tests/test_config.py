"""load_settings: which source wins, where relative paths lead, settings checked together."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cityward.config import Settings, load_settings


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory that is not the TOML file's folder, and no CITYWARD_* variables."""
    import os

    for name in [n for n in os.environ if n.startswith("CITYWARD_")]:
        monkeypatch.delenv(name)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


# -- default_limit and max_limit ---------------------------------------------------------------


def test_default_limit_above_max_limit_is_refused_naming_both(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match=r"default_limit \(500\).*max_limit \(100\)"):
        Settings(default_limit=500, max_limit=100)
    toml = write(tmp_path / "cityward.toml", "max_limit = 100\n")
    monkeypatch.setenv("CITYWARD_DEFAULT_LIMIT", "101")
    with pytest.raises(ValidationError, match=r"default_limit \(101\).*max_limit \(100\)"):
        load_settings(toml)
    monkeypatch.setenv("CITYWARD_DEFAULT_LIMIT", "100")  # equal is fine
    assert (load_settings(toml).default_limit, load_settings(toml).max_limit) == (100, 100)


# -- precedence: command line > environment > TOML file ----------------------------------------


def test_environment_beats_the_file_and_the_command_line_beats_both(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = write(
        tmp_path / "conf" / "cityward.toml",
        'database_url = "postgresql://h/from_toml"\n'
        "context_fetch = false\n"
        "max_limit = 50\n"
        "[governance]\n"
        'jwt_issuer = "from-toml"\n'
        'site_name = "Toml City"\n',
    )
    monkeypatch.setenv("CITYWARD_DATABASE_URL", "postgresql://h/from_env")
    monkeypatch.setenv("CITYWARD_CONTEXT_FETCH", "true")
    # nested settings come from the environment as a JSON object, merged key by key
    monkeypatch.setenv("CITYWARD_GOVERNANCE", '{"jwt_issuer": "from-env"}')
    settings = load_settings(toml)
    assert settings.database_url == "postgresql://h/from_env"
    assert settings.context_fetch is True
    assert settings.max_limit == 50  # not in the environment: the file's
    assert settings.governance.jwt_issuer == "from-env"
    assert settings.governance.site_name == "Toml City"
    cli = load_settings(toml, database_url="postgresql://h/from_cli", data_dir=None)
    assert cli.database_url == "postgresql://h/from_cli"
    assert cli.data_dir == Path("cityward-data")  # None: not given on the command line


# -- relative paths ----------------------------------------------------------------------------


def test_relative_paths_in_the_file_are_relative_to_the_file(
    tmp_path: Path, elsewhere: Path
) -> None:
    conf = tmp_path / "conf"
    toml = write(
        conf / "cityward.toml",
        'data_dir = "data"\n'
        "[contexts]\n"
        '"https://example.org/ctx.jsonld" = "contexts/ctx.jsonld"\n'
        "[governance]\n"
        'audit_key_file = "keys/audit.key"\n'
        'jwks_file = "keys/jwks.json"\n'
        'jwt_public_keys = ["keys/a.pem", "/etc/cityward/b.pem"]\n'
        "[vision]\n"
        'models_dir = "models"\n'
        "[[vision.cameras]]\n"
        'id = "cam-1"\n'
        'url = "videos/cam-1.mp4"\n'
        "[[ingest.sources]]\n"
        'name = "noise-archive"\n'
        'adapter = "replay"\n'
        'options = { path = "replay/noise.csv", time_field = "$.time" }\n'
        "[ingest.sources.mapping]\n"
        'entity_type = "NoiseLevelObserved"\n'
        'id = "urn:ngsi-ld:NoiseLevelObserved:{$.station}"\n'
        'timestamp = { path = "$.time" }\n'
        'attributes.LAeq = { path = "$.laeq", unit = "2N" }\n',
    )
    settings = load_settings(toml)
    assert settings.data_dir == conf / "data"
    assert settings.contexts == {"https://example.org/ctx.jsonld": conf / "contexts/ctx.jsonld"}
    gov = settings.governance
    assert gov.audit_key_file == conf / "keys/audit.key"
    assert gov.jwks_file == conf / "keys/jwks.json"
    assert gov.jwt_public_keys == [conf / "keys/a.pem", Path("/etc/cityward/b.pem")]
    assert settings.vision.models_dir == conf / "models"
    # a camera's url is a string (a file or a stream), resolved by `cityward vision run`
    assert settings.vision.cameras[0].url == "videos/cam-1.mp4"
    assert settings.ingest.sources[0].adapter_config().path == conf / "replay/noise.csv"


def test_relative_paths_from_the_command_line_or_environment_stay_relative_to_the_cwd(
    tmp_path: Path, elsewhere: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = write(tmp_path / "conf" / "cityward.toml", 'data_dir = "data"\n')
    monkeypatch.setenv("CITYWARD_GOVERNANCE", '{"audit_key_file": "env/audit.key"}')
    assert load_settings(toml, data_dir=Path("cli-data")).data_dir == Path("cli-data")
    monkeypatch.setenv("CITYWARD_DATA_DIR", "env-data")
    settings = load_settings(toml)
    assert settings.data_dir == Path("env-data")
    assert settings.governance.audit_key_file == Path("env/audit.key")


# -- [bus] nats_url ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("nats://host:notaport", "not a NATS server URL"),
        ("nats://:4222", "not a NATS server URL"),
        (" , ", "names no server"),
        ("http://bus:4222", "the scheme must be"),
        ("ws://a:4222,nats://b:4222", "mixes websocket"),
    ],
)
def test_a_nats_url_nats_cannot_read_is_refused_when_the_settings_load(
    tmp_path: Path, elsewhere: Path, url: str, why: str
) -> None:
    toml = write(tmp_path / "cityward.toml", f'[bus]\nkind = "nats"\nnats_url = "{url}"\n')
    with pytest.raises(ValidationError, match=rf"bus\.nats_url[\s\S]*{why}"):
        load_settings(toml)


def test_nats_urls_nats_reads_are_taken(tmp_path: Path, elsewhere: Path) -> None:
    urls = "nats://user:pw@a:4222, tls://b:4223,c:4224,d"
    toml = write(tmp_path / "cityward.toml", f'[bus]\nkind = "nats"\nnats_url = "{urls}"\n')
    assert load_settings(toml).bus.nats_url == urls
