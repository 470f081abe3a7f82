"""The governance commands: token create, device-key create, audit verify, dpia."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cityward.api.app import create_app
from cityward.cli import app as cli_app
from cityward.config import Settings

runner = CliRunner()
E = "/ngsi-ld/v1/entities"


def test_token_create_prints_a_working_token_on_its_last_line(tmp_path: Path) -> None:
    result = runner.invoke(
        cli_app,
        [
            "token",
            "create",
            "--role",
            "operator",
            "--purpose",
            "traffic-management",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip().splitlines()[-1]
    assert token.count(".") == 2 and " " not in token
    with TestClient(create_app(Settings(data_dir=tmp_path, context_fetch=False))) as c:
        r = c.get("/cityward/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
        assert r.json()["role"] == "operator"
        assert r.json()["purposes"] == ["traffic-management"]
    bad = runner.invoke(cli_app, ["token", "create", "--role", "root", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "not a role" in bad.output


def test_device_key_create_prints_a_key_that_writes_its_own_entity(tmp_path: Path) -> None:
    own = "urn:ngsi-ld:TrafficFlowObserved:loop-1"
    result = runner.invoke(
        cli_app,
        [
            "device-key",
            "create",
            "--device",
            "loop-1",
            "--pattern",
            own,
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    key = result.output.strip().splitlines()[-1]
    with TestClient(create_app(Settings(data_dir=tmp_path, context_fetch=False))) as c:
        body = {"id": own, "type": "TrafficFlowObserved", "intensity": 3}
        assert c.post(E, json=body, headers={"X-API-Key": key}).status_code == 201
        other = {**body, "id": own + "0"}
        assert c.post(E, json=other, headers={"X-API-Key": key}).status_code == 403
    # only the hash is at rest
    db = (tmp_path / "cityward.db").read_bytes()
    assert key.split("_", 2)[2].encode() not in db


def _audited_city(tmp_path: Path) -> None:
    with TestClient(create_app(Settings(data_dir=tmp_path, context_fetch=False))) as c:
        token = (tmp_path / "governance" / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        for n in range(30):
            body = {"id": f"urn:ngsi-ld:Thing:{n}", "type": "Thing", "level": n}
            assert c.post(E, json=body, headers=auth).status_code == 201


def test_audit_verify_passes_then_names_the_first_tampered_record(tmp_path: Path) -> None:
    _audited_city(tmp_path)
    ok = runner.invoke(cli_app, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    conn = sqlite3.connect(tmp_path / "audit.db")
    seq = conn.execute(
        "SELECT seq FROM audit_records WHERE path LIKE '%entities%' ORDER BY seq LIMIT 1 OFFSET 5"
    ).fetchone()[0]
    # someone hides that they touched an entity
    conn.execute("UPDATE audit_records SET actor = 'nobody' WHERE seq = ?", [seq])
    conn.commit()
    conn.close()
    bad = runner.invoke(cli_app, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 1, bad.output
    assert str(seq) in bad.output


def test_audit_verify_catches_a_deleted_record(tmp_path: Path) -> None:
    _audited_city(tmp_path)
    conn = sqlite3.connect(tmp_path / "audit.db")
    conn.execute("DELETE FROM audit_records WHERE seq = 7")
    conn.commit()
    conn.close()
    bad = runner.invoke(cli_app, ["audit", "verify", "--data-dir", str(tmp_path)])
    assert bad.exit_code == 1 and "7" in bad.output


def test_dpia_writes_markdown_and_pdf(tmp_path: Path) -> None:
    result = runner.invoke(
        cli_app, ["dpia", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    md = (tmp_path / "out" / "dpia.md").read_text()
    assert "Traffic flow detectors" in md and "| permission |" in md
    assert (tmp_path / "out" / "dpia.pdf").read_bytes().startswith(b"%PDF")


def test_dpia_names_the_backend_a_database_url_opens(tmp_path: Path) -> None:
    """``--database-url sqlite:///...`` gave a DPIA that said PostgreSQL and promised its
    partition drops: any URL was taken for PostgreSQL."""
    for url, says, not_says in (
        (f"sqlite:///{tmp_path / 'city.db'}", "secure_delete", "partitions are"),
        ("postgresql://postgres@127.0.0.1:5432/postgres", "partitions", "secure_delete"),
    ):
        out = tmp_path / says
        result = runner.invoke(
            cli_app,
            ["dpia", "--out", str(out), "--data-dir", str(tmp_path), "--database-url", url],
        )
        assert result.exit_code == 0, result.output
        md = (out / "dpia.md").read_text()
        assert says in md and not_says not in md, (url, md)
    result = runner.invoke(
        cli_app, ["dpia", "--out", str(tmp_path / "x"), "--database-url", "mysql://db/city"]
    )
    assert result.exit_code == 2 and "unsupported database URL" in result.output


def test_audit_verify_creates_nothing_and_refuses_a_missing_log_or_key(tmp_path: Path) -> None:
    """verify made what it did not find: on a mistyped --data-dir a new bank, audit.db and key
    ("Audit log OK: 0 records", exit 0); with the key kept off the machine a new key, with
    which the next server sealed."""
    typo = tmp_path / "typo-dir"
    r = runner.invoke(cli_app, ["audit", "verify", "--data-dir", str(typo)])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("audit verify: no audit log") and "OK" not in r.output, r.output
    assert not typo.exists()

    data = tmp_path / "data"
    made = runner.invoke(cli_app, ["token", "create", "--role", "admin", "--data-dir", str(data)])
    assert made.exit_code == 0, made.output
    key = data / "governance" / "audit.key"
    key.rename(tmp_path / "audit.key.offsite")
    r = runner.invoke(cli_app, ["audit", "verify", "--data-dir", str(data)])
    assert r.exit_code == 2 and "no audit key" in r.output, r.output
    assert not key.exists(), "verify wrote a new audit key"

    # the log and its key alone (a copy for an auditor): checked, and no bank made beside them
    copy = tmp_path / "copy"
    (copy / "governance").mkdir(parents=True)
    (data / "audit.db").rename(copy / "audit.db")
    (tmp_path / "audit.key.offsite").rename(copy / "governance" / "audit.key")
    r = runner.invoke(cli_app, ["audit", "verify", "--data-dir", str(copy)])
    assert r.exit_code == 0 and "Audit log OK" in r.output, r.output
    assert not (copy / "cityward.db").exists()
