"""``cityward ingest check``: a mapping validated with the setting named, samples mapped or
rejected with the field, and exit codes a deployment script can use."""

from __future__ import annotations

from pathlib import Path

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
