"""``cityward ingest check``: a mapping validated with the setting named, samples mapped or
rejected with the field, and exit codes a deployment script can use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cityward.cli import app

MAPPING = """
entity_type = "AirQualityObserved"
id = "urn:ngsi-ld:AirQualityObserved:{topic[1]}"
timestamp = { path = "$.ts", format = "epoch_ms" }

[attributes.no2]
path = "$.no2"
unit = "GQ"
"""


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["ingest", "check", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_a_valid_mapping_maps_samples(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(MAPPING)
    (tmp_path / "s.jsonl").write_text('{"no2": 41, "ts": 1795400000000}\n\n')
    code, out = run(str(tmp_path / "m.toml"))
    assert code == 0 and "valid; AirQualityObserved, 1 attribute(s)" in out
    code, out = run(
        str(tmp_path / "m.toml"), "--sample", str(tmp_path / "s.jsonl"), "--topic", "air/aq-3"
    )
    assert code == 0, out
    assert "urn:ngsi-ld:AirQualityObserved:aq-3" in out
    assert '"observedAt": "2026-11-23T02:13:20.000Z"' in out


def test_rejected_samples_name_the_field_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(MAPPING)
    (tmp_path / "s.jsonl").write_text(
        '{"no2": 41, "ts": 1795400000000}\n{"no2": "n/a", "ts": 1}\nnot json\n'
    )
    code, out = run(
        str(tmp_path / "m.toml"), "--sample", str(tmp_path / "s.jsonl"), "--topic", "a/b"
    )
    assert code == 1, out
    assert "line 2: rejected: $.no2: expected a number" in out
    assert "line 3: rejected: $: not JSON" in out
    assert "line 1: urn:ngsi-ld:AirQualityObserved:b" in out  # the good one is still mapped


def test_an_invalid_mapping_exits_2_with_the_setting(tmp_path: Path) -> None:
    (tmp_path / "m.toml").write_text(MAPPING.replace('"$.no2"', '"no2"'))
    code, out = run(str(tmp_path / "m.toml"))
    assert code == 2
    assert "attributes.no2.path" in out and "starts with '$'" in out
    (tmp_path / "bad.toml").write_text("entity_type = ")
    code, out = run(str(tmp_path / "bad.toml"))
    assert code == 2 and "not valid TOML" in out
    code, out = run(str(tmp_path / "missing.toml"))
    assert code == 2


def test_ingest_run_refuses_bad_sources_at_load_naming_the_setting(tmp_path: Path) -> None:
    """A topic filter the broker would refuse (it closed the connection, read as "expected
    SUBACK, got packet type 14" for ever) and files that do not exist (a traceback at start)
    are configuration errors: exit 2, the setting named."""
    mapping = (
        '[ingest.sources.mapping]\nentity_type = "AirQualityObserved"\n'
        'id = "urn:ngsi-ld:AirQualityObserved:{topic[1]}"\n'
        'attributes = { no2 = { path = "$.no2" } }\n'
    )
    cases = [
        ("mqtt", 'topics = ["city/#/x"]', "topics", "'#' must be a whole level"),
        ("mqtt", 'topics = [""]', "topics", "not an MQTT topic filter"),
        ("mqtt", 'topics = ["city/a+"]', "topics", "'+' must be a whole level"),
        (
            "mqtt",
            f'topics = ["c/+"]\ntls = true\nca_file = "{tmp_path / "no-ca.pem"}"',
            "ca_file",
            "no file",
        ),
        ("mqtt", 'topics = ["c/+"]\nshare_group = "a/b"', "share_group", "share group"),
        ("replay", f'path = "{tmp_path / "gone.csv"}"', "path", "no file"),
    ]
    for adapter, options, setting, why in cases:
        config = tmp_path / "ingest.toml"
        config.write_text(
            f'[[ingest.sources]]\nname = "s"\nadapter = "{adapter}"\n'
            f"[ingest.sources.options]\n{options}\n" + mapping
        )
        result = CliRunner().invoke(
            app,
            ["ingest", "run", "--config", str(config), "--data-dir", str(tmp_path / "d")],
            env={"COLUMNS": "200"},
        )
        assert result.exit_code == 2, (options, result.output)
        assert setting in result.output and why in result.output, (options, result.output)


@pytest.mark.parametrize(
    ("args", "what", "why"),
    [
        (["check", "{d}/m.toml", "--sample", "{d}/missing.json"], "--sample", "No such file"),
        (["check", "{d}/m.toml", "--sample", "{d}"], "--sample", "Is a directory"),
        (["check", "{d}/latin1.toml"], "latin1.toml", "not UTF-8 text"),
        (
            ["run", "--config", "{d}/broken.toml", "--data-dir", "{d}/data"],
            "broken.toml",
            "not valid TOML",
        ),
        (
            ["dead-letters", "--config", "{d}/broken.toml", "--data-dir", "{d}/data"],
            "broken.toml",
            "not valid TOML",
        ),
    ],
)
def test_unreadable_files_are_one_line_errors_with_exit_2(
    tmp_path: Path, args: list[str], what: str, why: str
) -> None:
    """A missing or directory --sample, a mapping not in UTF-8 and a --config that is not TOML
    were tracebacks with exit code 1, the code of rejected samples."""
    (tmp_path / "m.toml").write_text(MAPPING)
    (tmp_path / "latin1.toml").write_bytes(b'entity_type = "Air\xe9"\n')  # saved as Latin-1
    (tmp_path / "broken.toml").write_text("[ingest\n")
    argv = ["ingest", *(a.format(d=tmp_path) for a in args)]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert what in result.output and why in result.output, result.output


def test_text_from_devices_and_settings_is_printed_as_it_is_not_as_markup(
    tmp_path: Path,
) -> None:
    """A payload, topic or rejection holding "[/]" crashed `ingest dead-letters` and `ingest
    check` (MarkupError); "[bold]" vanished. Messages and help naming [ingest] or
    [[ingest.sources]] lost them, and settings from the environment alone were "None"."""
    from cityward.ingest.deadletter import DeadLetters

    dead = DeadLetters(tmp_path / "d" / "ingest" / "deadletter.db")
    dead.add("noise", b'{"laeq": "[/] [bold]x"}', field="$.laeq", reason="[/]", topic="t/[/]")
    dead.close()
    result = CliRunner().invoke(
        app, ["ingest", "dead-letters", "--data-dir", str(tmp_path / "d")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert "t/[/] $.laeq: [/]" in result.output, result.output
    assert '{"laeq": "[/] [bold]x"}' in result.output, result.output

    (tmp_path / "m.toml").write_text(MAPPING)
    (tmp_path / "s.jsonl").write_text('{"no2": "[/] [bold]", "ts": 1}\n')
    code, out = run(
        str(tmp_path / "m.toml"), "--sample", str(tmp_path / "s.jsonl"), "--topic", "a/b"
    )
    assert code == 1, out
    assert "rejected: $.no2: expected a number, got '[/] [bold]'" in out, out

    (tmp_path / "none.toml").write_text("")
    argv = ["ingest", "run", "--config", str(tmp_path / "none.toml"), "--data-dir", "x"]
    result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "no enabled [[ingest.sources]]" in result.output
    result = CliRunner().invoke(app, ["ingest", "run", "--help"], env={"COLUMNS": "200"})
    assert "with [ingest] sources" in result.output and "With [bus] kind" in result.output

    result = CliRunner().invoke(
        app,
        ["ingest", "dead-letters", "--data-dir", str(tmp_path / "d")],
        env={"COLUMNS": "200", "CITYWARD_MAX_LIMIT": "[/]"},
    )
    assert result.exit_code == 2, (result.output, result.exception)
    assert "command-line/environment settings: 1 error(s)" in result.output, result.output


def test_ingest_run_prints_status_lines_more_often_than_every_half_second(
    tmp_path: Path,
) -> None:
    """`--status-every` under 0.5 was a ZeroDivisionError (the period was taken in half
    seconds, rounded down to 0)."""
    (tmp_path / "m.jsonl").write_text(
        '{"s": "a", "v": 1, "t": "2026-01-01T00:00:00Z"}\n'
        '{"s": "a", "v": 2, "t": "2026-01-01T00:00:01Z"}\n'
    )
    (tmp_path / "c.toml").write_text(
        '[[ingest.sources]]\nname = "r"\nadapter = "replay"\n'
        f'options = {{ path = "{tmp_path / "m.jsonl"}", speed = 1, time_field = "$.t" }}\n'
        '[ingest.sources.mapping]\nentity_type = "X"\nid = "urn:ngsi-ld:X:{$.s}"\n'
        'timestamp = { path = "$.t" }\nattributes.v = { path = "$.v" }\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYWARD_")}
    cmd = [
        sys.executable,
        "-m",
        "cityward.cli",
        "ingest",
        "run",
        "--exit-when-done",
        "--status-every",
        "0.2",
    ]
    out = subprocess.run(
        [*cmd, "--config", str(tmp_path / "c.toml"), "--data-dir", str(tmp_path / "d")],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = out.stdout + out.stderr
    assert out.returncode == 0 and "Traceback" not in output, output
    # the replay takes a second: status lines while it runs, then the last one
    assert out.stdout.count("dead letters 0, pending") >= 2, output
